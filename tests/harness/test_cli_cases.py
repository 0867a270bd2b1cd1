"""`python -m conformance cases --presets`: one line per preset, read from references.config, and where the
released-checkpoint presets come from."""

import subprocess
import sys

from references.config import PRESETS


def test_cases_presets_lists_every_preset_and_where_released_ones_come_from():
    r = subprocess.run([sys.executable, "-m", "conformance", "cases", "--presets"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    named = [ln.split(":")[0].removeprefix("preset ") for ln in lines if ln.startswith("preset ")]
    assert named == list(PRESETS)
    assert {"v41-flash", "flash-0731", "pro-0813"} <= set(named)
    v41 = next(ln for ln in lines if ln.startswith("preset tiny-v41:"))
    assert "version v4.1" in v41 and "weight blocks 32x32" in v41 and "hash layers 0" in v41
    assert "kv sources [1, 2]" in v41
    pro = next(ln for ln in lines if ln.startswith("preset pro:"))
    assert "index_topk 1024" in pro and "weight blocks 128x128" in pro
    flash41 = next(ln for ln in lines if ln.startswith("preset v41-flash:"))
    assert "version v4.1" in flash41 and "40 layers + 3 MTP" in flash41 and "kv sources [2, 8, 14, 20]" in flash41
    assert "candidate source 20" in flash41 and "dspark targets [37, 38, 39] block 5" in flash41
    pro0813 = next(ln for ln in lines if ln.startswith("preset pro-0813:"))
    assert "version v4" in pro0813 and "index_topk 1024" in pro0813 and "dspark targets [58, 59, 60]" in pro0813
    flash0731 = next(ln for ln in lines if ln.startswith("preset flash-0731:"))
    assert "43 layers + 1 MTP" in flash0731 and "hash layers 3" in flash0731
    assert "dspark targets [40, 41, 42]" in flash0731
    assert not [ln for ln in lines if ln.startswith("not a preset:")]
    assert any("docs/presets.md" in ln for ln in lines)
