"""The report leads with what failed (issue 19): counts, failures grouped by diagnosis, the component x subject
matrix, the filter and the pictures; checked in the rendered HTML and, where Chromium is found, in a real
headless browser (filter works, nothing asks for the network, hostile names and messages stay text)."""

import json
import re

import pytest

from conformance.results import CheckResult, ResultWriter
from reports.render import build_context, render_report
from tests.browser import RecordingProxy, chromium_path, dump_dom, with_script

EVIL = "<script>document.title='PWNED'</script>"
EVIL_MSG = "<img src=x onerror=\"document.title='PWNED2'\"> beyond bound"


def _run(tmp_path):
    out = tmp_path / "run"
    w = ResultWriter(out, worker="t")
    for i in range(6):
        w.write(CheckResult("emulated:ocp", f"norm.rms/t{i}/s{i}", "norm.rms", "numeric", "serving", "pass",
                            metrics={"y.worst_over_bound": 0.1 * (i + 1)}, bounds={"y.worst_over_bound": 1.0},
                            rerun=f"python -m conformance rerun norm.rms/t{i}/s{i} --subject emulated:ocp"))
    w.write(CheckResult(EVIL, "quant.act_fp8/t7/s1", "quant.act_fp8", "numeric", "emulated", "fail",
                        message=EVIL_MSG, metrics={"codes.mismatches": 12.0}, bounds={"codes.mismatches": 0.0},
                        device="cpu", rerun="python -m conformance rerun quant.act_fp8/t7/s1 --subject evil"))
    for s in ("vllm-triton:gfx942", "vllm"):
        w.write(CheckResult(s, "dialect/indexer_k->logits", "indexer_k->logits", "dialect", "bytes", "fail",
                            message="edge indexer_k->logits: MISMATCH x0.5", device="cpu",
                            extra={"edge": {"producer": "indexer_k", "consumer": "logits", "verdict": "MISMATCH",
                                            "factor": "x0.5"}}))
        w.write(CheckResult(s, "dialect/weights->gemm", "weights->gemm", "dialect", "bytes", "pass",
                            extra={"edge": {"producer": "weights", "consumer": "gemm", "verdict": "consistent"}}))
    w.write(CheckResult("crashy", "norm.rms/t7d256/outliers/s1", "norm.rms", "numeric", "-", "crashed",
                        message="CRASHED: killed by signal 11 (SIGSEGV: segmentation fault)",
                        rerun="python -m conformance rerun norm.rms/t7d256/outliers/s1 --subject crashy",
                        extra={"crash": {"kind": "signal", "signal": 11, "signal_name": "SIGSEGV", "what": "killed",
                                         "run_command": "python -m conformance run --subject crashy -n 2",
                                         "output_tail": ["Fatal Python error: Segmentation fault"]}}))
    (out / "subjects.json").write_text(json.dumps({}))
    return out, render_report(out)


def test_diagnosis_reads_past_the_rows_label():
    """A row's message starts with its "[component | case | subject]" label, which holds " | " itself: the
    diagnosis is the text after it, never a piece of the label."""
    from reports.render import diagnosis

    r = dict(verdict="catastrophic", check="numeric", component="moe.router", extra={},
             message="[moe.router | moe.router/T33E256k6/deep_negative/s108 | vllm] weights: catastrophic; 198 / 198 "
                     "weights beyond the derived bound (worst infx) | ids: equal sets")
    head, where = diagnosis(r)
    assert (head, where) == ("router weights beyond their bound", "component moe.router")
    # the emulated-level row of the same defect groups with it
    emu = dict(r, message=r["message"].replace("vllm] weights", "vllm] vs emulated:ocp weights"))
    assert diagnosis(emu) == (head, where)
    other = dict(r, message="[norm.rms | norm.rms/t7/s1 | x] y: fail; worst 3.2x its bound at [0, 5]")
    assert diagnosis(other)[0] == "catastrophic: y: fail; worst Nx its bound at [N, N]"


def test_summary_groups_failures_by_diagnosis(tmp_path):
    out, page = _run(tmp_path)
    ctx = build_context(out)
    groups = {(g["diagnosis"], g["where"]): g for g in ctx["groups"]}
    assert set(groups) == {("crashed (SIGSEGV)", "norm.rms"), ("dialect x0.5", "edge indexer_k->logits"),
                           (groups and next(k for k in groups if k[1] == "component quant.act_fp8"))}
    assert groups[("dialect x0.5", "edge indexer_k->logits")]["n"] == 2           # two subjects, one diagnosis
    assert ctx["groups"][0]["verdict"] == "crashed"                             # worst first
    q = next(g for g in ctx["groups"] if g["where"] == "component quant.act_fp8")
    assert q["measured"] == "codes.mismatches = 12 (allowed 0)"
    html = page.read_text()
    top = html[html.index('id="summary"'):html.index('id="matrix"')]
    for s in ("crashed 1", "fail 3", "pass 8", "dialect x0.5", "crashed (SIGSEGV)", "edge indexer_k-&gt;logits",
              "python -m conformance run --subject crashy -n 2"):
        assert s in top, s
    assert "<svg class=\"dmap\"" in html and "<svg class=\"wob\"" in html
    assert EVIL not in html and EVIL_MSG not in html
    assert "&lt;script&gt;document.title=" in html
    assert not re.search(r"<(link|img|iframe)\b|src=\"http|href=\"http", html)   # self-contained


PROBE = """<script>
window.addEventListener('load', function () {
  var res = {title_before: document.title};
  var visible = function () { return Array.prototype.filter.call(document.querySelectorAll('tr.r'),
      function (e) { return getComputedStyle(e).display !== 'none'; })
      .map(function (e) { return e.getAttribute('data-v'); }); };
  res.all = visible();
  var sel = document.getElementById('f-v'); sel.value = 'fail'; sel.dispatchEvent(new Event('change'));
  res.fail = visible();
  var ss = document.getElementById('f-s'); ss.value = 'vllm'; ss.dispatchEvent(new Event('change'));
  res.fail_vllm = visible().length;
  res.failures_rows = Array.prototype.filter.call(document.querySelectorAll('tr.f'),
      function (e) { return getComputedStyle(e).display !== 'none'; }).length;
  var td = document.querySelector('#cmatrix td.comp'); td.click();
  res.detail_open = getComputedStyle(td.parentNode.nextElementSibling).display;
  res.resources = performance.getEntriesByType('resource').length;
  res.imgs = document.querySelectorAll('img').length;
  res.scripts = document.querySelectorAll('script').length;
  var d = document.createElement('pre'); d.id = 'probe-result'; d.textContent = JSON.stringify(res);
  document.body.appendChild(d);
});
</script>"""


def test_report_in_headless_chromium(tmp_path):
    exe = chromium_path()
    if exe is None:
        pytest.skip("no headless Chromium found (set DSV4_CHROMIUM, or put chromium-headless-shell / chromium on "
                    "PATH; .ci/run installs Debian's chromium-headless-shell with apt-get where it can)")
    _, page = _run(tmp_path)
    probe = with_script(page, PROBE, tmp_path / "probe.html")
    proxy = RecordingProxy()
    try:
        dom = dump_dom(exe, probe, proxy=proxy)
    finally:
        proxy.close()
    m = re.search(r'<pre id="probe-result">(.*?)</pre>', dom, re.S)
    assert m, dom[-2000:]
    res = json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                     .replace("&amp;", "&"))
    assert res["title_before"] == "DSV4 conformance report"        # neither injected script ran
    assert "PWNED" not in dom.split("<pre id=\"probe-result\">")[0].split("<title>")[1].split("</title>")[0]
    assert len(res["all"]) == 12 and res["fail"] == ["fail"] * 3   # the verdict filter
    assert res["fail_vllm"] == 1 and res["failures_rows"] == 1      # + the subject filter, summary too
    assert res["detail_open"] == "table-row"                        # per-level detail one click away
    assert res["imgs"] == 0 and res["scripts"] == 2                 # the hostile markup stayed text
    assert res["resources"] == 0 and proxy.requests == [], proxy.requests   # nothing asked for the network
