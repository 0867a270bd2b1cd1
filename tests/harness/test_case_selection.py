"""--case selects the tests that produce that case's rows, and only those: an op case deselects the whole-suite
tests (dialect map, e2e, graph), a dialect / e2e / graph row id selects its whole-suite test alone, an unknown
op id is a usage error. ``rerun`` and bisect steps rely on it (before, a rerun of one router case ran the dialect
map and the e2e model too, and counted their failures as the case's)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _collect(tmp_path, case):
    p = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "conformance" / "suite"), "-p", "no:cacheprovider",
                        "-q", "--collect-only", "--subject", "emulated:ocp", "--case", case, "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    return p, [ln for ln in p.stdout.splitlines() if "::" in ln]


@pytest.mark.parametrize("case,test", [("norm.rms/t7d256/outliers/s1", "test_numeric"),
                                       ("dialect/weights->gemm", "test_dialect_map"),
                                       ("e2e/short20/logits", "test_e2e")])
def test_case_selects_only_the_test_that_writes_its_row(tmp_path, case, test):
    p, ids = _collect(tmp_path, case)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    tests = {re.sub(r"\[.*", "", i.split("::")[1]) for i in ids}
    assert tests == {test}, ids
    assert "deselected" in p.stdout


def test_unknown_op_case_is_a_usage_error(tmp_path):
    p, _ = _collect(tmp_path, "norm.rms/no-such-case")
    assert p.returncode != 0 and "no case has id ['norm.rms/no-such-case']" in p.stdout + p.stderr
