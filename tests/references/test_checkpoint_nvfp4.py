"""NVFP4 experts in the checkpoint reader / tiny writer (issue 18): the ModelOpt / Quark layout (packed uint8,
float8_e4m3fn weight_scale per 16, fp32 scalar weight_scale_2 and input_scale, quantization_config.moe_quant_algo
"NVFP4") round-trips exactly, its pieces feed moe.experts_nvfp4's golden, and malformed or truncated tensors are
refused in one line naming the tensor."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from conformance.cases.moe_nvfp4 import experts_nvfp4_golden
from references.checkpoints.hf_config import ConfigError, from_hf_dict
from references.checkpoints.reader import CheckpointError, CheckpointReader
from references.checkpoints.writer import write_checkpoint
from references.config import TINY
from references.formats.nvfp4 import dequantize_nvfp4
from tests._checkpoint_files import rewrite_shard

NV = TINY.replace(expert_dtype="nvfp4")
W1 = "layers.1.ffn.experts.3.w1.weight"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_nvfp4")
    return d, write_checkpoint(d, NV, seed=0)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _one_line_naming(e, *names):
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in names:
        assert n in msg, msg
    return msg


def test_round_trip_is_exact_and_the_layout_is_modelopt(ckpt):
    d, deq = ckpt
    r = CheckpointReader(d)
    assert r.config.expert_dtype == "nvfp4" and r.check() > 0
    for name, ref in deq.items():
        assert torch.equal(r.get(name), ref), name
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    want = {W1: ("U8", [64, 128]), "layers.1.ffn.experts.3.w1.weight_scale": ("F8_E4M3", [64, 16]),
            "layers.1.ffn.experts.3.w1.weight_scale_2": ("F32", []),
            "layers.1.ffn.experts.3.w1.input_scale": ("F32", []),
            "layers.1.ffn.experts.3.w2.weight": ("U8", [256, 32]),
            "layers.1.ffn.experts.3.w2.weight_scale": ("F8_E4M3", [256, 4])}
    for name, (dt, shp) in want.items():
        with safe_open(str(d / wm[name]), "pt") as f:
            assert (f.get_slice(name).get_dtype(), f.get_slice(name).get_shape()) == (dt, shp), name
    assert "layers.1.ffn.experts.3.w1.scale" not in wm
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quantization_config"]["moe_quant_algo"] == "NVFP4" and cfg["expert_dtype"] == "fp4"


def test_pieces_feed_the_component_golden(ckpt):
    """reader.nvfp4(name) gives the component's inputs; decoded they are reader.get(name), and the golden on them
    equals moe.experts' golden on the read weights."""
    d, _ = ckpt
    r = CheckpointReader(d)
    kw = {}
    for n in ("w1", "w3", "w2"):
        ps = [r.nvfp4(f"layers.1.ffn.experts.{e}.{n}.weight") for e in (3, 5)]
        for e, p in zip((3, 5), ps):
            assert torch.equal(dequantize_nvfp4(p["weight"], p["weight_scale"], float(p["weight_scale_2"])),
                               r.get(f"layers.1.ffn.experts.{e}.{n}.weight"))
        kw[n] = torch.stack([p["weight"] for p in ps])
        kw[f"{n}_scale"] = torch.stack([p["weight_scale"] for p in ps])
        kw[f"{n}_scale_2"] = torch.stack([p["weight_scale_2"] for p in ps])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, NV.hidden_size, generator=g)
    ids, w = torch.tensor([[0, 1]] * 5), torch.rand(5, 2, generator=g)
    y = experts_nvfp4_golden(x, ids, w, **kw, w13_input_scale=torch.ones(2), w2_input_scale=torch.ones(2),
                             limit=10.0)["y"]
    from conformance.cases.moe import experts_golden

    dq = {n: torch.stack([r.get(f"layers.1.ffn.experts.{e}.{n}.weight") for e in (3, 5)]) for n in ("w1", "w3", "w2")}
    assert torch.equal(y, experts_golden(x, ids, w, dq["w1"], dq["w3"], dq["w2"], limit=10.0)["y"])


def test_bf16_variant_holds_the_same_dequantised_weights(ckpt, tmp_path):
    deq_b = write_checkpoint(tmp_path, NV, seed=0, dtype="bf16")
    r = CheckpointReader(tmp_path)
    assert torch.equal(r.get(W1), ckpt[1][W1]) and torch.equal(deq_b[W1], ckpt[1][W1])


def test_scales_per_32_values_are_refused_naming_the_grouping(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    name = "layers.1.ffn.experts.3.w1.weight_scale"
    f = rewrite_shard(d, name, lambda t: t.__setitem__(name, t[name][:, :8].contiguous()))
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(d).get(W1)
    _one_line_naming(ei, f.name, name, "one scale per 32 values; NVFP4 has one per 16")
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(d).check()
    _one_line_naming(ei, name)


def test_truncated_shard_and_missing_global_scale_name_the_tensor(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    name = "layers.1.ffn.experts.3.w1.weight_scale_2"
    f = rewrite_shard(d, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(d).get(W1)
    _one_line_naming(ei, f.name, name)
    d2 = _copy(ckpt[0], tmp_path / "t")
    wm = json.loads((d2 / "model.safetensors.index.json").read_text())["weight_map"]
    f2 = d2 / wm[W1]
    f2.write_bytes(f2.read_bytes()[:-64])
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(d2).get(W1)
    _one_line_naming(ei, f2.name, W1)


STEM = W1[:-len(".weight")]


def _set_byte(name, index, byte):
    def edit(t):
        b = t[name].view(torch.uint8).clone()
        b[index] = byte
        t[name] = b.view(t[name].dtype)
    return edit


@pytest.mark.parametrize("target,edit,msg", [
    (STEM + ".weight_scale", _set_byte(STEM + ".weight_scale", (2, 5), 0x7F), "a NaN E4M3 scale byte 0x7F at [2, 5]"),
    (STEM + ".weight_scale", _set_byte(STEM + ".weight_scale", (0, 1), 0xB8),
     "a negative E4M3 scale byte 0xB8 at [0, 1]"),
    (STEM + ".weight_scale_2", lambda t: t.__setitem__(STEM + ".weight_scale_2", torch.tensor(0.0)),
     "weight_scale_2: expected one positive finite fp32 value"),
    (STEM + ".input_scale", lambda t: t.__setitem__(STEM + ".input_scale", torch.tensor(float("inf"))),
     "input_scale: expected one positive finite fp32 value"),
    (W1, lambda t: t.__setitem__(W1, t[W1].view(torch.int8)), "has dtype I8"),
], ids=["nan-scale-byte", "negative-scale-byte", "zero-global-scale", "inf-input-scale", "int8-packed-weight"])
def test_malformed_nvfp4_tensors_are_refused_in_one_line(ckpt, tmp_path, target, edit, msg):
    d = _copy(ckpt[0], tmp_path / "c")
    rewrite_shard(d, target, edit)
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(d).get(W1)
    _one_line_naming(ei, target, msg)


def _hf(**quant):
    from references.checkpoints.hf_config import to_hf_dict

    d = to_hf_dict(NV)
    d["quantization_config"].update(quant)
    return d


def _v41_hf(**quant):
    from references.checkpoints.hf_config import to_hf_dict
    from references.config import TINY_V41

    d = to_hf_dict(TINY_V41)
    d["quantization_config"].update(quant)
    return d


def test_config_moe_quant_algo_parsed_and_refused_by_name():
    assert from_hf_dict(_hf())[0].expert_dtype == "nvfp4"
    with pytest.raises(ConfigError, match="moe_quant_algo 'MXFP4' is not modelled"):
        from_hf_dict(_hf(moe_quant_algo="MXFP4"))
    with pytest.raises(ConfigError, match="moe_quant_algo 1 is not modelled"):     # V4.1 config: the same field
        from_hf_dict(_v41_hf(moe_quant_algo=1))
    assert from_hf_dict(_v41_hf(moe_quant_algo="NVFP4"))[0].expert_dtype == "nvfp4"
    d = _hf()
    d["expert_dtype"] = "fp8"
    with pytest.raises(ConfigError, match="moe_quant_algo 'NVFP4' but expert_dtype 'fp8'"):
        from_hf_dict(d)


def test_golden_model_runs_on_the_read_nvfp4_checkpoint(ckpt):
    """references.model reads the NVFP4 experts through the reader (W4A16 golden): the same logits as from the
    writer's dequantised weights, bit for bit, and finite."""
    from references.model import forward

    d, deq = ckpt
    r = CheckpointReader(d)
    ids = torch.tensor([1, 2, 3, 4, 5])
    got = forward(ids, r, r.config)
    assert torch.isfinite(got).all() and torch.equal(got, forward(ids, deq, NV))
