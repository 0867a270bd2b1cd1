"""python -m conformance findings: one page per distinct defect, from a real run with a planted defect."""

from conformance.cli import main
from conformance.findings import findings

from .conftest import SUBJECT


def test_planted_defect_gets_its_page(runs, tmp_path, capsys):
    """The truncating plugin subject (FP8 codes rounded toward zero) fails quant.act_fp8: one defect page that
    names the subject, the function that ran, the failing cases and their rerun commands; the good run has none."""
    out = tmp_path / "findings"
    assert main(["findings", str(runs["truncating"]), "--out", str(out)]) == 0
    pages = [p for p in out.glob("*.md") if p.name != "index.md"]
    assert len(pages) == 1, [p.name for p in pages]
    text = pages[0].read_text()
    assert "**Kind**: defect" in text and f"`{SUBJECT}`" in text
    assert "`tests.gate.act_quant_torch`" in text and "quant.act_fp8" in text
    assert "python -m conformance rerun quant.act_fp8/" in text and f"--subject {SUBJECT}" in text
    assert "| fail |" in text or "| catastrophic |" in text
    assert "Whole model: not measured" in text
    assert main(["findings", str(runs["good"]), "--out", str(tmp_path / "none")]) == 0
    assert [p.name for p in (tmp_path / "none").glob("*.md")] == ["index.md"]


def test_kinds_and_grouping():
    base = dict(subject="s", check="numeric", level="serving", function="f.x", metrics={}, bounds={}, rerun="r")
    rows = [dict(base, case_id="c/1", component="norm.rms", verdict="fail", message="systematic gain +2^-7 on y"),
            dict(base, case_id="c/2", component="norm.rms", verdict="fail", message="systematic gain +2^-7 on y"),
            dict(base, case_id="c/3", component="rope.apply", verdict="error", message="f.x raised TypeError: no"),
            dict(base, case_id="e2e/finding/renorm-eps", component="model", check="e2e", verdict="xfail",
                 message="FINDING renorm-eps (spec 8.6): measured"),
            dict(base, case_id="c/4", component="norm.rms", verdict="pass", message="fine")]
    fs = {f.component: f for f in findings(rows)}
    assert fs["norm.rms"].kind == "defect" and len(fs["norm.rms"].rows) == 2
    assert fs["norm.rms"].diagnosis == "systematic gain"
    assert fs["rope.apply"].kind == "harness-limitation" and fs["rope.apply"].diagnosis == "raised TypeError"
    assert fs["e2e/finding/renorm-eps"].kind == "source-difference"


def test_compare_names_findings_that_appear_or_disappear(runs, capsys):
    assert main(["compare", str(runs["good"]), str(runs["truncating"])]) == 0
    out = capsys.readouterr().out
    assert "FINDINGS: appeared 1, disappeared 0, still 0" in out and "APPEARED    quant.act_fp8" in out
    assert main(["compare", str(runs["truncating"]), str(runs["good"])]) == 0
    assert "DISAPPEARED quant.act_fp8" in capsys.readouterr().out


def test_a_finding_noted_on_a_passing_edge_row_gets_its_own_page_and_kind():
    """The e8m0 scale conversion raises (torch's CPU e8m0 multiply) while the edge itself passes: the edge row's
    message carries the probe's note, and the finding is a harness limitation with the functions blamed."""
    base = dict(check="dialect", level="bytes", function="f", metrics={}, bounds={}, rerun="r",
                case_id="dialect/weights->gemm", component="weights->gemm", verdict="pass")
    note = ("edge weights->gemm [consistent x1]: ...; note: e8m0 scales not convertible in this vLLM: "
            "NotImplementedError: \"mul_cpu_reduced_float\" not implemented for 'Float8_e8m0fnu'")
    rows = [dict(base, subject="vllm-triton:gfx942", message=note),
            dict(base, subject="vllm-triton:ocp", message="edge weights->gemm [consistent x1]: fine")]
    fs = findings(rows)
    assert len(fs) == 1
    f = fs[0]
    assert f.subject == "vllm-triton:gfx942" and f.kind == "harness-limitation" and "torch" in f.why
    assert any("normalize_e4m3fn_to_e4m3fnuz" in s for s in f.source)
    assert f.diagnosis == "raised NotImplementedError" and len(f.rows) == 1
