"""Stored runs, compare, gate, expected failures, JUnit, thresholds: on real runs of the suite."""

import json
import os
from pathlib import Path

import pytest

from conformance.cli import main
from conformance.compare import ThresholdError, compare, parse_threshold, parse_thresholds
from conformance.gate import GateError, gate, load_expected
from conformance.junit import JUnitError, TestOutcome, validate, write_junit
from conformance.store import Run, StoreError, arch_key, load_baseline, load_run, save_baseline
from reports.render import render_compare

from .conftest import SUBJECT


def _quiet(*a, **k):
    pass


def _this_arch() -> str:
    """The baseline key of the machine the fixture runs were made on (cpu here and in CI; sm90 on an H100)."""
    from conformance.env import capture

    return arch_key(capture())


def test_run_is_self_describing(runs):
    m = json.loads((runs["good"] / "manifest.json").read_text())
    assert m["kind"] == "dsv4-conformance-run" and m["schema"] == 1 and m["arch"] == _this_arch()
    assert m["harness"]["commit"] and len(m["harness"]["commit"]) == 40
    assert set(m["subjects"]) == {"emulated:gfx942", SUBJECT}
    assert m["subjects"][SUBJECT]["provides"]["quant.act_fp8"]["backend"] == "torch"
    assert m["env"]["torch"] and m["started"] <= m["finished"] and m["exitstatus"] == 0 and m["rows"] == 12
    assert m["command"].startswith("python -m conformance run")
    run = load_run(runs["good"])
    assert len(run.by_key) == 12 and all(r["schema"] == 1 for r in run.rows)


def test_arch_keys():
    assert arch_key({"device": {"kind": "rocm", "arch": "gfx942:sramecc+:xnack-"}}) == "gfx942"
    assert arch_key({"device": {"kind": "rocm", "arch": "gfx950"}}) == "gfx950"
    assert arch_key({"device": {"kind": "cuda", "arch": "sm90"}}) == "sm90"
    assert arch_key({"device": {"kind": "cpu", "arch": "x86_64"}}) == "cpu"


def test_baseline_roundtrip_and_errors(runs, tmp_path):
    p = save_baseline(load_run(runs["good"]), tmp_path / "baselines", note="test")
    arch = _this_arch()
    assert p == tmp_path / "baselines" / f"{arch}.json"
    b = load_baseline(tmp_path / "baselines", arch)
    assert b.is_baseline and b.arch == arch and len(b.by_key) == 12
    assert not compare(b, load_run(runs["good"])).worse
    with pytest.raises(StoreError, match="no baseline .*gfx942.json"):
        load_baseline(tmp_path / "baselines", "gfx942")
    (tmp_path / "bad.json").write_text('{"kind": "something-else"}')
    with pytest.raises(StoreError, match="expected 'dsv4-conformance-baseline'"):
        load_baseline(tmp_path / "bad.json")


def test_compare_worse_better_backend(runs, tmp_path):
    good, bad, tri = (load_run(runs[v]) for v in ("good", "truncating", "triton"))
    th = parse_thresholds(["calc_diff:+20%", "worst_over_bound:+50%"])
    c = compare(good, bad, th)
    assert len(c.worse) == 8 and not c.better and not c.backend_changed and c.unchanged == 4
    assert all(ch.subject == SUBJECT for ch in c.worse)
    assert any("verdict pass -> fail" in r for ch in c.worse for r in ch.reasons)
    assert any("calc_diff" in r and "allowed calc_diff:+20%" in r for ch in c.worse for r in ch.reasons)
    back = compare(bad, good, th)
    assert len(back.better) == 8 and not back.worse
    sw = compare(good, tri, th)
    assert len(sw.backend_changed) == 8 and not sw.worse and not sw.better
    assert "[torch] -> tests.gate.act_quant_triton [triton]" in sw.backend_changed[0].reasons[0]
    html = render_compare(c, tmp_path / "compare.html").read_text()
    assert "Worse (8)" in html and "verdict pass -&gt; fail" in html and "quant.act_fp8/t7k512/outliers/s1" in html
    assert "http" not in html.split("<style>")[0]      # self-contained: nothing fetched


def test_compare_cli_and_escaping(runs, tmp_path, capsys):
    a = load_run(runs["good"])
    rows = [dict(r) for r in a.rows]
    rows[0] = dict(rows[0], verdict="fail", message="<script>alert(1)</script>")
    b = Run("synthetic", a.manifest, rows)
    html = render_compare(compare(a, b), tmp_path / "c.html").read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html
    rc = main(["compare", str(runs["good"]), str(runs["truncating"]), "--threshold", "calc_diff:+20%",
               "--html", str(tmp_path / "cli.html")])
    out = capsys.readouterr().out
    assert rc == 0 and "worse: 8" in out and "WORSE (8)" in out and (tmp_path / "cli.html").exists()
    rc = main(["compare", str(runs["good"]), str(runs["good"]), "--threshold", "calc_diff:20%"])
    assert rc == 2 and "must start with +" in capsys.readouterr().err


def test_metric_threshold_regression_at_same_verdict(runs):
    a = load_run(runs["good"])
    rows = []
    for r in a.rows:
        r = json.loads(json.dumps(r))
        if r["subject"] == SUBJECT and r["level"] == "serving":
            r["metrics"]["dequant.calc_diff"] *= 1.5        # still passing, but 50 % worse
        rows.append(r)
    b = Run("b", a.manifest, rows)
    assert not compare(a, b).worse                                             # no threshold: not a change
    assert len(compare(a, b, parse_thresholds(["calc_diff:+20%"])).worse) == 4
    assert not compare(a, b, parse_thresholds(["calc_diff:+60%"])).worse
    assert len(compare(b, a, parse_thresholds(["calc_diff:+20%"])).better) == 4


def test_gate_exit_codes_and_junit(runs, fresh, tmp_path, capsys):
    save_baseline(load_run(runs["good"]), tmp_path / "baselines")
    th = parse_thresholds(["calc_diff:+20%"])
    ok = gate(baseline=str(tmp_path / "baselines"), out="unused", run_dir=str(fresh("good")), thresholds=th,
              printer=_quiet)
    assert ok.exit_code == 0 and not ok.failing and not ok.regressions
    assert validate(Path(ok.run.path) / "junit.xml") == {"tests": 12, "failures": 0, "errors": 0, "skipped": 0}
    bad = gate(baseline=str(tmp_path / "baselines"), out="unused", run_dir=str(fresh("truncating")), thresholds=th,
               printer=_quiet)
    assert bad.exit_code == 1 and len(bad.failing) == 8 and len(bad.regressions) == 8
    d = Path(bad.run.path)
    assert validate(d / "junit.xml")["failures"] == 8
    assert "FAIL" in (d / "gate.html").read_text() and (d / "report.html").exists()
    assert json.loads((d / "gate.json").read_text())["gate"] == "FAIL"
    # a backend switch alone is reported, not a failure
    sw = gate(baseline=str(tmp_path / "baselines"), out="unused", run_dir=str(fresh("triton")), printer=_quiet)
    assert sw.exit_code == 0 and len(sw.comparison.backend_changed) == 8
    # through the CLI entry point, as CI calls it
    for v, rc in (("good", 0), ("truncating", 1)):
        got = main(["gate", "--baseline", str(tmp_path / "baselines"), "--run", str(fresh(v)),
                    "--threshold", "calc_diff:+20%", "--junit", str(tmp_path / f"junit-{v}.xml")])
        out = capsys.readouterr().out
        assert got == rc, out
        assert out.startswith(f"DSV4 conformance gate: {'PASS' if rc == 0 else 'FAIL'}")
        validate(tmp_path / f"junit-{v}.xml")
    assert main(["gate", "--baseline", str(tmp_path / "nowhere"), "--run", str(fresh("good"))]) == 2


def test_gate_arch_mismatch_is_usage_error(runs, fresh, tmp_path):
    b = load_run(runs["good"])
    b.manifest = dict(b.manifest, arch="gfx942")
    save_baseline(b, tmp_path / "gfx942.json")
    with pytest.raises(GateError, match=f"baseline .* is for arch gfx942, this run is {_this_arch()}"):
        gate(baseline=str(tmp_path / "gfx942.json"), out="unused", run_dir=str(fresh("good")), printer=_quiet)


def _crash_gate(tmp_path, name, *extra):
    old = os.environ.get("DSV4_GATE_VARIANT")
    os.environ["DSV4_GATE_VARIANT"] = "crash"
    try:
        return gate(baseline=str(tmp_path / "baselines"), out=str(tmp_path / name),
                    run_args=["--subject", "emulated:gfx942", "--subject", SUBJECT, *extra,
                              "--component", "quant.act_fp8", "--", "-k", "test_numeric"], printer=_quiet)
    finally:
        os.environ.pop("DSV4_GATE_VARIANT") if old is None else os.environ.update(DSV4_GATE_VARIANT=old)


def test_gate_crashed_cases_are_rows_and_regressions(runs, tmp_path):
    """Isolated (the default): each case that dies is a crashed row; against the passing baseline every level it
    had is a regression, and the run itself did not crash."""
    save_baseline(load_run(runs["good"]), tmp_path / "baselines")
    res = _crash_gate(tmp_path, "crash")
    out = tmp_path / "crash"
    assert res.exit_code == 1 and res.crash == ""
    crashed = [r for r in res.failing if r["verdict"] == "crashed"]
    assert len(crashed) == 4 and all("exited with code 139" in r["message"] for r in crashed)
    assert len(res.regressions) == 8 and not res.comparison.missing   # 4 cases x 2 levels, none "missing"
    assert validate(out / "junit.xml")["errors"] == 4
    assert (out / "report.html").exists()


def test_gate_crash_still_writes_junit_and_reports(runs, tmp_path):
    """--isolate none: the first crash takes the run down (-n 0); the gate still writes its outputs, and the
    in-flight marker is the crashed row of the case that was running."""
    save_baseline(load_run(runs["good"]), tmp_path / "baselines")
    res = _crash_gate(tmp_path, "crash", "--isolate", "none")
    out = tmp_path / "crash"
    assert res.exit_code == 1 and "crashed" in res.crash
    tot = validate(out / "junit.xml")
    assert tot["errors"] == 2                      # the run's crash and the crashed row of the case it died in
    assert (out / "report.html").exists() and "Run crashed" in (out / "gate.html").read_text()
    crashed = [r for r in res.failing if r["verdict"] == "crashed"]
    assert len(crashed) == 1 and "process running this case died" in crashed[0]["message"]
    assert len(res.comparison.missing) == 6        # the 3 cases after it never started (2 levels each)
    assert len([c for c in res.regressions if c.b and c.b["verdict"] == "crashed"]) == 2


def test_expected_failures_xfail_and_xpass(runs, fresh, tmp_path):
    save_baseline(load_run(runs["good"]), tmp_path / "baselines")
    xf = tmp_path / "xfail.toml"
    xf.write_text('[[expected_failure]]\ncase = "quant.act_fp8/*"\nsubject = "tests.gate.*"\n'
                  'reason = "rounds toward zero (known upstream bug)"\n'
                  'link = "https://github.com/vllm-project/vllm/issues/1"\n')
    res = gate(baseline=str(tmp_path / "baselines"), out="unused", run_dir=str(fresh("truncating")),
               expected_failures=str(xf), printer=_quiet)
    assert res.exit_code == 0 and len(res.xfailed) == 8 and not res.regressions and not res.xpassed
    assert validate(Path(res.run.path) / "junit.xml")["skipped"] == 8
    lines = []
    res = gate(baseline=str(tmp_path / "baselines"), out="unused", run_dir=str(fresh("good")),
               expected_failures=str(xf), printer=lines.append)
    assert res.exit_code == 0 and [e.case for e in res.xpassed] == ["quant.act_fp8/*"]
    assert "XPASS: quant.act_fp8/* passes now: remove its expected-failure entry" in lines[0]
    assert "xpass: remove entry" in (Path(res.run.path) / "gate.html").read_text()
    strict = gate(baseline=str(tmp_path / "baselines"), out="unused", run_dir=str(fresh("good")),
                  expected_failures=str(xf), strict_xfail=True, printer=_quiet)
    assert strict.exit_code == 1


@pytest.mark.parametrize("text,err", [
    ('[[expected_failure]]\ncase = "x"\nreason = "r"\n', "'link' is required"),
    ('[[expected_failure]]\ncase = "x"\nreason = "r"\nlink = "issue 12"\n', "is not an http"),
    ('[[expected_failure]]\ncase = "x"\nreason = "r"\nlink = "https://x"\nwhy = 1\n', "unknown keys"),
    ('[[expected_failure]\n', "cannot parse"),
])
def test_expected_failures_file_errors(tmp_path, text, err):
    p = tmp_path / "x.toml"
    p.write_text(text)
    with pytest.raises(GateError, match=err):
        load_expected(p)


def test_threshold_parser():
    t = parse_threshold("calc_diff:+20%")
    assert (t.metric, t.direction, t.amount, t.relative) == ("calc_diff", 1, 0.2, True)
    assert t.matches("dequant.calc_diff") and t.matches("calc_diff") and not t.matches("calc_diff_x")
    assert parse_threshold("worst_over_bound:+0.5").relative is False
    assert parse_threshold("cosine:-0.01%").direction == -1
    assert parse_threshold("x:+1e-3").amount == 1e-3
    assert t.judge(1.0, 1.19) is None and t.judge(1.0, 1.21)[0] == "worse" and t.judge(1.0, 0.7)[0] == "better"
    assert t.judge(0.1, "inf")[0] == "worse" and t.judge("nan", "nan") is None
    for bad, msg in (("calc_diff", "missing ':'"), (":+20%", "no metric name"), ("calc_diff:20%", "must start with"),
                     ("calc_diff:+twenty%", "cannot read"), ("calc_diff:+20%%", "cannot read")):
        with pytest.raises(ThresholdError, match=msg):
            parse_threshold(bad)
    with pytest.raises(ThresholdError, match="given twice"):
        parse_thresholds(["a:+1%", "a:+2%"])


def test_junit_validator_catches_inconsistency(tmp_path):
    p = write_junit([TestOutcome("s", "s.c", "t1", "failure", "boom\x01", kind="fail"),
                     TestOutcome("s", "s.c", "t2", "passed")], tmp_path / "j.xml")
    assert validate(p) == {"tests": 2, "failures": 1, "errors": 0, "skipped": 0}
    p.write_text(p.read_text().replace('failures="1"', 'failures="0"', 1))
    with pytest.raises(JUnitError, match="failures"):
        validate(p)


def _planted(run_dir: Path, factor: float) -> Path:
    """The run's results rewritten with every serving-level calc_diff of the plugin subject scaled by ``factor``
    (a build whose error grew while every case still passes)."""
    for f in (run_dir / "results").glob("*.jsonl"):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        for r in rows:
            if r["subject"] == SUBJECT and r["level"] == "serving":
                r["metrics"] = {k: (v * factor if k.endswith("calc_diff") else v) for k, v in r["metrics"].items()}
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_gate_default_thresholds_catch_a_30_percent_calc_diff_growth(runs, fresh, tmp_path, capsys, monkeypatch):
    """What `nox -s gate` runs (no --threshold: the defaults): a planted 30 % calc_diff growth with every verdict
    still pass fails the gate; the unchanged build and a 10 % growth pass; --no-default-thresholds sees nothing."""
    save_baseline(load_run(runs["good"]), tmp_path / "baselines")
    base = ["gate", "--baseline", str(tmp_path / "baselines"), "--expected-failures", "ci/expected-failures.toml"]
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    assert main([*base, "--run", str(fresh("good"))]) == 0
    assert main([*base, "--run", str(_planted(fresh("good"), 1.10))]) == 0
    grown = _planted(fresh("good"), 1.30)
    assert main([*base, "--run", str(grown)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "calc_diff" in out and "+30.0%" in out and "allowed calc_diff:+20%" in out
    assert all(r["verdict"] == "pass" for r in load_run(grown).rows if r["subject"] == SUBJECT)
    assert main([*base, "--run", str(_planted(fresh("good"), 1.30)), "--no-default-thresholds"]) == 0
    # a --threshold on the same metric replaces the default
    assert main([*base, "--run", str(_planted(fresh("good"), 1.30)), "--threshold", "calc_diff:+40%"]) == 0


def test_gate_fails_on_a_named_components_backend_change(runs, fresh, tmp_path, capsys):
    """The same numbers from another backend (torch -> triton): reported only, unless the component is named."""
    save_baseline(load_run(runs["good"]), tmp_path / "baselines")
    base = ["gate", "--baseline", str(tmp_path / "baselines")]
    assert main([*base, "--run", str(fresh("triton"))]) == 0
    assert main([*base, "--run", str(fresh("triton")), "--fail-on-backend-change", "moe.*", "norm.*"]) == 0
    capsys.readouterr()
    assert main([*base, "--run", str(fresh("triton")), "--fail-on-backend-change", "quant.*"]) == 1
    out = capsys.readouterr().out
    assert "backend changed: tests.gate.act_quant_torch [torch] -> tests.gate.act_quant_triton [triton]" in out
    assert "--fail-on-backend-change quant.*" in out
    assert main([*base, "--run", str(fresh("good")), "--fail-on-backend-change", "quant.*"]) == 0
    assert main(["gate", "--run", str(fresh("triton")), "--fail-on-backend-change", "quant.*"]) == 2  # no baseline
