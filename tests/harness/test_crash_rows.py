"""A crash is a result (issue 19): a planted segfault, os._exit(3), hang and MemoryError in a plugin subject's
norm.rms each end as a ``crashed`` row, at -n 0 and -n 2, with a written report; the detector stays quiet on the
correct subject; a crashed row against a passing baseline is a gate regression; without isolation the in-flight
marker becomes the row (xdist worker death at -n 2; ``report DIR`` after the process died at -n 0)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.gate import gate
from conformance.store import load_run, save_baseline

ROOT = Path(__file__).resolve().parents[2]
SUBJECT = "tests.harness.crash_subjects:crashy"
BAD = "norm.rms/t7d256/outliers/s1"
GOOD = "norm.rms/t5d256/normal-tiny/s4"


def conformance_run(out, mode, workers=0, *extra):
    cmd = [sys.executable, "-m", "conformance", "run", "--subject", SUBJECT, "--case", BAD, "--case", GOOD,
           "--out", str(out), "--case-timeout", "4", *extra]
    if workers:
        cmd += ["-n", str(workers)]
    cmd += ["--", "-k", "test_numeric"]
    env = dict(os.environ, DSV4_CRASH_MODE=mode, PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


def rows(out):
    return [json.loads(ln) for p in sorted((Path(out) / "results").glob("*.jsonl"))
            for ln in p.read_text().splitlines() if ln.strip()]


WHAT = {"segv": "killed by signal 11 (SIGSEGV", "exit3": "exited with code 3", "hang": "timed out after 4 s",
        "memory": "raised MemoryError"}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("mode", sorted(WHAT))
def test_planted_crash_is_a_crashed_row_and_the_report_is_written(tmp_path, mode, workers):
    out = tmp_path / "run"
    p = conformance_run(out, mode, workers)
    log = p.stdout[-3000:] + p.stderr[-2000:]
    assert p.returncode == 1, log                     # a failing case, not a dead run
    rs = rows(out)
    by_case = {r["case_id"]: r for r in rs}
    assert set(by_case) == {BAD, GOOD}, log           # every case that started is a row
    assert by_case[GOOD]["verdict"] == "pass"
    r = by_case[BAD]
    assert r["verdict"] == "crashed" and r["level"] == "-", r
    assert WHAT[mode] in r["message"], r["message"]
    crash = r["extra"]["crash"]
    assert crash["isolation"] == "fork"
    assert any("about to misbehave" in ln for ln in crash["output_tail"]), crash["output_tail"]
    assert r["rerun"] == f"python -m conformance rerun {BAD} --subject {SUBJECT}"
    assert ("-n 2" in crash["run_command"]) == (workers == 2), crash["run_command"]
    if mode == "segv":
        assert crash["signal"] == 11 and crash["signal_name"] == "SIGSEGV"
        assert "Segmentation fault" in r["message"] and "string_at" in r["message"]
    if mode == "exit3":
        assert crash["exit_code"] == 3
    if mode == "hang":
        assert crash["kind"] == "timeout" and any("Timeout" in ln for ln in crash["output_tail"])
    html = (out / "report.html").read_text()
    assert "crashed" in html and BAD in html
    m = json.loads((out / "manifest.json").read_text())
    assert m["finished"] is not None and m["case_timeout_s"] == 4.0


def test_forked_case_finishes_after_the_parent_used_torchs_thread_pool(tmp_path):
    """-n 0 forks each case from the pytest process; torch's OpenMP pool, once used there, hangs a child's first
    parallel op. Planted: the subject's factory uses the pool at load; both cases must pass, not time out."""
    p = conformance_run(tmp_path / "run", "pool", 0)
    by_case = {r["case_id"]: r for r in rows(tmp_path / "run")}
    assert {c: r["verdict"] for c, r in by_case.items()} == {BAD: "pass", GOOD: "pass"}, p.stdout[-2000:]
    assert p.returncode == 0


def test_correct_subject_gives_no_crashed_row_and_gate_flags_the_crash(tmp_path):
    good = tmp_path / "good"
    p = conformance_run(good, "good")
    assert p.returncode == 0, p.stdout[-3000:]
    assert {r["verdict"] for r in rows(good)} == {"pass"} and len(rows(good)) == 2
    save_baseline(load_run(good), tmp_path / "baselines")
    bad = tmp_path / "bad"
    assert conformance_run(bad, "segv").returncode == 1
    res = gate(baseline=str(tmp_path / "baselines"), out="unused", run_dir=str(bad), printer=lambda *a: None)
    assert res.exit_code == 1 and not res.crash
    assert [r["case_id"] for r in res.failing] == [BAD]
    assert [(c.case_id, c.level) for c in res.regressions] == [(BAD, "fp64")]
    assert "verdict pass -> crashed (killed by signal 11" in res.regressions[0].reasons[0]
    assert not res.comparison.missing and not res.comparison.new
    # the other way round: crashed in the baseline, passing now -> better, not new / missing
    from conformance.compare import compare

    c = compare(load_run(bad), load_run(good))
    assert [(x.case_id, x.level) for x in c.better] == [(BAD, "fp64")] and not c.new and not c.missing


def test_without_isolation_a_dead_worker_still_leaves_a_crashed_row(tmp_path):
    out = tmp_path / "run"
    p = conformance_run(out, "segv", 2, "--isolate", "none")
    assert p.returncode == 1, p.stdout[-3000:]
    r = {r["case_id"]: r for r in rows(out)}[BAD]
    assert r["verdict"] == "crashed" and "process running this case died" in r["message"]
    assert "1 case(s) whose process died were recorded as crashed" in p.stdout
    assert "crashed" in (out / "report.html").read_text()


def test_without_isolation_report_renders_the_unfinished_run(tmp_path):
    out = tmp_path / "run"
    p = conformance_run(out, "segv", 0, "--isolate", "none")
    assert p.returncode == -11 or p.returncode == 139, (p.returncode, p.stdout[-2000:])
    assert not (out / "report.html").exists()
    q = subprocess.run([sys.executable, "-m", "conformance", "report", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert q.returncode == 0, q.stderr
    assert "1 case(s) whose process died recorded as crashed" in q.stdout
    assert {r["case_id"]: r["verdict"] for r in rows(out)}.get(BAD) == "crashed"
    html = (out / "report.html").read_text()
    assert "UNFINISHED RUN" in html


def test_isolation_mode_follows_the_device(monkeypatch):
    """auto forks per case on a CPU machine, and runs in-process where a GPU is present (a GPU subject
    initialises CUDA after the mode is chosen; a forked child could not use it: seen on an H100, every case
    failed 'Cannot re-initialize CUDA in forked subprocess')."""
    import torch

    from conformance.isolate import choose_mode

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_mode("auto")[0] == "fork"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    mode, why = choose_mode("auto")
    assert mode == "none" and "device is present" in why
    assert choose_mode("fork")[0] == "fork"            # asked for explicitly: honoured while CUDA is untouched
    assert choose_mode("none")[0] == "none"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(pytest.UsageError, match="cannot use it"):
        choose_mode("fork")
