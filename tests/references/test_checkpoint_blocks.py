"""Checkpoint reader with the FP8 weight-scale block of the config (issue #18): a tiny checkpoint written with
32x32 UE8M0 scales (DeepSeek-V4.1's dense linears) round-trips exactly when the config says 32x32, and read
as 128x128 it is refused naming the tensor and the block its shapes imply (and the other way round)."""

import json
import shutil

import pytest
import torch

from references.checkpoints.layout import expected_tensors
from references.checkpoints.reader import CheckpointError, CheckpointReader
from references.checkpoints.writer import stored_tensors, write_checkpoint
from references.config import TINY, QuantConfig

TINY32 = TINY.replace(quantization=QuantConfig(weight_block_size=(32, 32)))


@pytest.fixture(scope="module")
def ckpt32(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_b32")
    return d, write_checkpoint(d, TINY32, seed=0)


def _say_block(src, dst, block):
    shutil.copytree(src, dst)
    j = json.loads((dst / "config.json").read_text())
    j["quantization_config"]["weight_block_size"] = list(block)
    (dst / "config.json").write_text(json.dumps(j))
    return dst


def test_32x32_checkpoint_round_trips_exactly(ckpt32):
    d, deq = ckpt32
    r = CheckpointReader(d)
    assert r.config.quantization.weight_block_size == (32, 32)
    assert r.check() > 0
    for name, ref in deq.items():
        assert torch.equal(r.get(name), ref), name
    stored, _ = stored_tensors(TINY32)
    assert tuple(stored["layers.0.attn.wq_a.scale"].shape) == (4, 8)    # [128, 256] in 32x32 blocks
    # the 32x32 scales differ inside 128x128 tiles somewhere: a 128x128 reading would change values
    fp8 = [n for n, t in expected_tensors(TINY32).items() if t.kind == "fp8"]
    mixed = [n for n in fp8 for s in [stored[n[:-len(".weight")] + ".scale"].view(torch.uint8)]
             if any(s[i:i + 4, j:j + 4].unique().numel() > 1
                    for i in range(0, s.shape[0], 4) for j in range(0, s.shape[1], 4))]
    assert len(mixed) >= 10, mixed


def test_32x32_scales_read_as_128x128_are_refused(ckpt32, tmp_path):
    d = _say_block(ckpt32[0], tmp_path / "c", (128, 128))
    want = (r"tensor 'layers\.0\.attn\.wq_a\.scale' \(block scale of 'layers\.0\.attn\.wq_a\.weight'\): "
            r"weight \[128,256\] with scale \[4,8\] implies block \(32,32\); config says 128x128")
    with pytest.raises(CheckpointError, match=want) as ei:
        CheckpointReader(d).get("layers.0.attn.wq_a.weight")
    assert "\n" not in str(ei.value)
    with pytest.raises(CheckpointError, match=want + r" \(and \d+ more problem\(s\)\)"):
        CheckpointReader(d).check()


def test_128x128_scales_read_as_32x32_are_refused(tmp_path):
    write_checkpoint(tmp_path / "a", TINY, seed=0)
    d = _say_block(tmp_path / "a", tmp_path / "c", (32, 32))
    with pytest.raises(CheckpointError, match=r"'layers\.0\.attn\.wq_a\.weight'\): weight \[128,256\] with scale "
                                              r"\[1,2\] implies block \(128,128\); config says 32x32"):
        CheckpointReader(d).get("layers.0.attn.wq_a.weight")


def test_layout_scale_shapes_follow_the_config_block():
    s128, s32 = expected_tensors(TINY), expected_tensors(TINY32)
    assert s128["layers.1.attn.wq_b.weight"].scale_shape == (32, 1)    # [4096, 128]
    assert s32["layers.1.attn.wq_b.weight"].scale_shape == (128, 4)
    assert s32["layers.1.ffn.experts.0.w1.weight"].scale_shape == s128["layers.1.ffn.experts.0.w1.weight"].scale_shape
