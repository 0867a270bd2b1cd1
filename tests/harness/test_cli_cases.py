"""`python -m conformance cases --presets`: one line per preset, read from references.config, and the named
non-presets with why."""

import subprocess
import sys

from references.config import PRESETS


def test_cases_presets_lists_every_preset_and_why_others_are_missing():
    r = subprocess.run([sys.executable, "-m", "conformance", "cases", "--presets"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    named = [ln.split(":")[0].removeprefix("preset ") for ln in lines if ln.startswith("preset ")]
    assert named == list(PRESETS)
    v41 = next(ln for ln in lines if ln.startswith("preset tiny-v41:"))
    assert "version v4.1" in v41 and "weight blocks 32x32" in v41 and "hash layers 0" in v41
    assert "kv sources [1, 2]" in v41
    pro = next(ln for ln in lines if ln.startswith("preset pro:"))
    assert "index_topk 1024" in pro and "weight blocks 128x128" in pro
    missing = [ln for ln in lines if ln.startswith("not a preset:")]
    assert any("v41-flash" in ln and "config.json" in ln for ln in missing)
    assert any("flash-0731" in ln and "pro-0813" in ln for ln in missing)
