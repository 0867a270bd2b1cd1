"""Real runs of the conformance suite for the gate tests: the same plugin subject (tests.gate.gate_subjects)
in three variants, run once per session, in parallel, in child processes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBJECT = "tests.gate.gate_subjects:switchable"
VARIANTS = ("good", "truncating", "triton")


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("gate-runs")
    procs = {}
    for v in VARIANTS:
        cmd = [sys.executable, "-m", "conformance", "run", "--subject", "emulated:gfx942", "--subject", SUBJECT,
               "--out", str(base / v), "--component", "quant.act_fp8", "--", "-k", "test_numeric"]
        procs[v] = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, DSV4_GATE_VARIANT=v),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for v, p in procs.items():
        out, _ = p.communicate(timeout=300)
        assert p.returncode == (1 if v == "truncating" else 0), out
    return {v: base / v for v in VARIANTS}


@pytest.fixture
def fresh(runs, tmp_path):
    """A private copy of a session run (gate writes its outputs into the run folder)."""
    n = [0]

    def copy(v):
        n[0] += 1
        dest = tmp_path / f"{v}-{n[0]}"
        shutil.copytree(runs[v], dest)
        return dest
    return copy
