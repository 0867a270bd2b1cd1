"""Checkpoint writer / lazy reader (official layout, spec section 1)."""

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open

from references.checkpoints.layout import expected_tensors
from references.checkpoints.reader import CheckpointError, CheckpointReader
from references.checkpoints.writer import write_checkpoint
from references.config import TINY
from tests._checkpoint_files import rewrite_shard


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_fp8")
    return d, write_checkpoint(d, TINY, seed=0)


def test_round_trip_is_exact(ckpt):
    d, deq = ckpt
    r = CheckpointReader(d)
    assert r.quantized and r.config.hidden_size == TINY.hidden_size
    assert r.config.compress_ratios == TINY.compress_ratios
    assert set(deq) == set(expected_tensors(TINY))
    for name, ref in deq.items():
        got = r.get(name)
        assert got.dtype == ref.dtype and torch.equal(got, ref), name


def test_layout_dtypes_match_the_release(ckpt):
    d, _ = ckpt
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    want = {"layers.0.attn.wq_a.weight": ("F8_E4M3", [128, 256]), "layers.0.attn.wq_a.scale": ("F8_E8M0", [1, 2]),
            "layers.1.ffn.experts.3.w1.weight": ("I8", [64, 128]),
            "layers.1.ffn.experts.3.w1.scale": ("F8_E8M0", [64, 8]),
            "layers.1.ffn.experts.3.w2.weight": ("I8", [256, 32]),
            "layers.0.ffn.gate.tid2eid": ("I64", [1024, 6]), "layers.1.ffn.gate.bias": ("F32", [64]),
            "layers.0.hc_attn_fn": ("F32", [24, 1024]), "embed.weight": ("BF16", [1024, 256]),
            "mtp.0.e_proj.weight": ("F8_E4M3", [256, 256]), "layers.2.attn.compressor.ape": ("F32", [128, 512]),
            "layers.1.attn.indexer.compressor.ape": ("F32", [4, 256])}
    for name, (dt, shp) in want.items():
        with safe_open(str(d / wm[name]), "pt") as f:
            sl = f.get_slice(name)
            assert (sl.get_dtype(), sl.get_shape()) == (dt, shp), name
    assert "layers.0.ffn.gate.bias" not in wm and "layers.1.ffn.gate.tid2eid" not in wm
    assert "mtp.0.ffn.gate.bias" in wm  # the MTP layer never uses hash routing
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert cfg["quantization_config"]["scale_fmt"] == "ue8m0" and cfg["expert_dtype"] == "fp4"


def test_bf16_variant_holds_the_same_dequantised_weights(ckpt, tmp_path):
    _, deq = ckpt
    deq_b = write_checkpoint(tmp_path, TINY, seed=0, dtype="bf16")
    r = CheckpointReader(tmp_path)
    assert not r.quantized
    wm = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(n.endswith(".scale") for n in wm)
    for name in ("layers.0.attn.wq_b.weight", "layers.1.ffn.experts.5.w2.weight", "mtp.0.h_proj.weight"):
        assert torch.equal(r.get(name), deq[name]) and torch.equal(deq_b[name], deq[name])


@pytest.mark.parametrize("scale_dtype", ["uint8", "fp32"])
def test_reader_accepts_uint8_and_fp32_block_scales(ckpt, tmp_path, scale_dtype):
    _, deq = ckpt
    write_checkpoint(tmp_path, TINY, seed=0, scale_dtype=scale_dtype)
    r = CheckpointReader(tmp_path)
    for name in ("layers.0.attn.wq_a.weight", "layers.2.attn.wo_b.weight", "layers.1.ffn.shared_experts.w2.weight"):
        assert torch.equal(r.get(name), deq[name])


def test_reading_one_layer_reads_no_other(ckpt):
    d, _ = ckpt
    r = CheckpointReader(d)
    assert r.reads == []  # constructing reads no tensor data
    w = r.layer(1)
    assert w["attn.wq_a"].shape == (128, 256) and "ffn.experts.63.w2" in w
    assert r.reads and all(n.startswith("layers.1.") for n in r.reads)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_names_file_and_tensor(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    f = d / wm["layers.2.attn.wkv.weight"]
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(d).get("layers.2.attn.wkv.weight")
    msg = str(ei.value)
    assert f.name in msg and "layers.2.attn.wkv.weight" in msg


def test_missing_tensor_names_file_and_tensor(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    name = "layers.1.attn.wo_a.scale"
    f = rewrite_shard(d, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(d).get("layers.1.attn.wo_a.weight")
    assert f.name in str(ei.value) and name in str(ei.value)
    # a name absent from the index altogether
    idx = d / "model.safetensors.index.json"
    j = json.loads(idx.read_text())
    del j["weight_map"]["norm.weight"]
    idx.write_text(json.dumps(j))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json.*'norm\.weight'"):
        CheckpointReader(d).get("norm.weight")


def test_wrong_shape_and_dtype_name_file_and_tensor(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    name = "layers.0.attn.wkv.weight"

    def shrink(t):
        t[name] = t[name][:256].contiguous()

    f = rewrite_shard(d, name, shrink)
    with pytest.raises(CheckpointError, match=r"shape") as ei:
        CheckpointReader(d).get(name)
    assert f.name in str(ei.value) and name in str(ei.value)
    name2 = "layers.0.hc_ffn_base"
    f2 = rewrite_shard(d, name2, lambda t: t.__setitem__(name2, t[name2].to(torch.bfloat16)))
    with pytest.raises(CheckpointError, match=r"dtype") as ei:
        CheckpointReader(d).get(name2)
    assert f2.name in str(ei.value) and name2 in str(ei.value)


def test_synthetic_weights_keep_the_tiny_model_in_range(ckpt):
    _, deq = ckpt
    for name, t in deq.items():
        if t.dtype.is_floating_point:
            assert torch.isfinite(t).all(), name
    # projections ~ N(0, 1/fan_in): the FP8 dequantised values keep that RMS within a few percent
    w = deq["layers.1.attn.wq_b.weight"]
    assert abs(w.square().mean().sqrt().item() * math.sqrt(w.shape[1]) - 1) < 0.05
