"""`--baseline` on a conformance run: the run ends with a comparison against it (compare.html + summary)."""

import os
import subprocess
import sys

from .conftest import ROOT, SUBJECT


def test_run_with_baseline_reports_what_got_worse(runs, tmp_path):
    out = tmp_path / "after"
    cmd = [sys.executable, "-m", "conformance", "run", "--subject", "emulated:gfx942", "--subject", SUBJECT,
           "--out", str(out), "--component", "quant.act_fp8", "--", "-k", "test_numeric",
           "--baseline", str(runs["good"])]
    p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, DSV4_GATE_VARIANT="truncating"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout[-2000:]          # the truncating variant fails its cases
    assert "worse: 8" in p.stdout and "comparison with" in p.stdout, p.stdout[-2000:]
    html = (out / "compare.html").read_text()
    assert "worse" in html.lower() and SUBJECT in html
