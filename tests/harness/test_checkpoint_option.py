"""``--checkpoint PATH`` refusals (no vLLM needed): each a one-sentence error naming the file and tensor, either a
usage error before any case (folder missing, no config.json / index) or a failing ``e2e/load`` row before vLLM
starts (truncated shard, missing tensor, wrong dtype / shape); a subject that serves no model gets a
"not-provided" row saying why; the replay's numerics are judged only where derived; the nox sessions pass
``DSV4_CHECKPOINT`` on."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conformance.checks import e2e as E
from conformance.checks import e2e_golden as G
from conformance.subjects import SubjectInfo
from references.checkpoints.writer import write_checkpoint
from references.config import TINY
from tests._checkpoint_files import rewrite_shard

ROOT = Path(__file__).resolve().parents[2]
INFO = SubjectInfo("vllm", "stand-in", "cpu", "float8_e4m3fn", False, profile="ocp")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck") / "good"
    write_checkpoint(d, TINY, seed=0, dtype="bf16")
    return d


def _truncate(d):
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    f = d / wm["layers.2.attn.wkv.weight"]
    f.write_bytes(f.read_bytes()[:-100])
    return f.name, "file not fully covered"


def _drop(d):
    name = "layers.1.attn.wo_a.weight"
    return rewrite_shard(d, name, lambda t: t.pop(name)).name, name


def _dtype(d):
    name = "layers.0.hc_ffn_base"
    return rewrite_shard(d, name, lambda t: t.__setitem__(name, t[name].to(torch.bfloat16))).name, "dtype"


def _shape(d):
    name = "layers.0.attn.wkv.weight"
    return rewrite_shard(d, name, lambda t: t.__setitem__(name, t[name][:256].contiguous())).name, "shape"


@pytest.mark.parametrize("defect", [_truncate, _drop, _dtype, _shape], ids=lambda f: f.__name__[1:])
def test_tensor_level_defect_is_one_failing_load_row(good, tmp_path, defect):
    d = tmp_path / "ck"
    shutil.copytree(good, d)
    fname, what = defect(d)
    rows = E.run_e2e("vllm", INFO, checkpoint=d, platform="cpu")   # returns before vLLM is imported
    assert len(rows) == 1
    r = rows[0]
    assert (r.case_id, r.verdict) == ("e2e/load", "fail")
    assert r.message.startswith("refused before starting vLLM: --checkpoint") and "\n" not in r.message
    assert fname in r.message and what in r.message, r.message
    assert f"--checkpoint {d}" in r.rerun


@pytest.mark.parametrize("case", ["missing", "file", "no-config", "no-index"])
def test_folder_level_defect_is_a_usage_error(good, tmp_path, case):
    d = tmp_path / "ck"
    if case == "file":
        d.write_text("x")
    elif case != "missing":
        shutil.copytree(good, d)
        (d / ("config.json" if case == "no-config" else "model.safetensors.index.json")).unlink()
    with pytest.raises(E.CheckpointRefused) as ei:
        E.open_checkpoint(d)
    assert "\n" not in str(ei.value)
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "conformance" / "suite" / "test_e2e.py"), "-q", "-p",
           "no:cacheprovider", "--subject", "reference", "--checkpoint", str(d), "--out", str(tmp_path / "o"),
           "--no-report"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 4, p.stdout + p.stderr         # pytest's usage-error exit code
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert err == [e for e in err if "--checkpoint" in e] and len(err) == 1, p.stderr
    assert "Traceback" not in p.stdout + p.stderr


def test_subject_without_a_model_says_why(good, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "conformance" / "suite" / "test_e2e.py"), "-q", "-p",
           "no:cacheprovider", "--subject", "reference", "--checkpoint", str(good), "--out", str(out),
           "--no-report", "-rs"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [json.loads(line) for f in (out / "results").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert [(r["case_id"], r["verdict"]) for r in rows] == [("e2e/checkpoint", "not-provided")]
    assert f"--checkpoint {good} is not used" in rows[0]["message"] and rows[0]["params"]["checkpoint"] == str(good)


def test_golden_checkpoint_of_another_architecture_is_refused(good, tmp_path):
    import dataclasses

    other = tmp_path / "other"
    write_checkpoint(other, dataclasses.replace(TINY, num_hidden_layers=2, compress_ratios=(0, 4, 0)), seed=0)
    rows = E.run_e2e("vllm", INFO, checkpoint=good, golden_checkpoint=other, platform="cpu")
    assert [(r.case_id, r.verdict) for r in rows] == [("e2e/load", "fail")]
    assert "num_hidden_layers" in rows[0].message


def test_replay_numerics_judged_only_where_derived():
    assert G.replay_numerics("cpu", False).derived
    for plat, q in (("cpu", True), ("rocm-gfx942", True), ("rocm-gfx942", False), ("cuda", True),
                    ("rocm-gfx950", True)):
        rn = G.replay_numerics(plat, q)
        assert not rn.derived and rn.why, (plat, q)
    assert G.replay_numerics("rocm-gfx942", True).numerics.dialect == "float8_e4m3fnuz"
    # a layer table that would pass or fail on the CPU bound is "not-run", with no bound, elsewhere
    table = [{k: (10 * b, b) for k, (b, _) in E.TOL.items()}]
    base = dict(subject="vllm", component="model", check="e2e")
    rn = G.replay_numerics("rocm-gfx942", True)
    r = E._layer_row(base, "short20", table, (0, "attn_pre", 1.0, 0.1), 20, rn)
    assert r.verdict == "not-run" and not r.bounds and "NOT JUDGED" in r.message and r.metrics
    assert E._layer_row(base, "short20", table, (0, "attn_pre", 1.0, 0.1), 20,
                        G.replay_numerics("cpu", False)).verdict == "fail"


def test_nox_sessions_pass_dsv4_checkpoint(monkeypatch):
    nox = pytest.importorskip("nox")
    assert nox
    sys.path.insert(0, str(ROOT))
    try:
        import noxfile
    finally:
        sys.path.remove(str(ROOT))

    class S:
        posargs = []
    monkeypatch.setenv("DSV4_CHECKPOINT", "/ck/flash")
    assert noxfile._pytest_args(S()) == ["--", "--checkpoint", "/ck/flash"]
    S.posargs = ["-k", "test_e2e", "--checkpoint", "/other"]
    assert noxfile._pytest_args(S()) == ["--", "-k", "test_e2e", "--checkpoint", "/other"]
    monkeypatch.delenv("DSV4_CHECKPOINT")
    S.posargs = []
    assert noxfile._pytest_args(S()) == []
