"""linear.fp8_block's DeepSeek-V4.1 rows: 32x32 UE8M0 weight-scale tiles (quant_config.py:221-243)."""

import pytest
import torch

from conformance.cases import cases_for
from conformance.cases.linear import MX_ACT, _emulate, fp8_block_weight, fp8_linear_golden
from references.formats.blockscale import dequantize_fp8, quantize_fp8
from references.formats.minifloat import get_format

ONE = int(get_format("float8_e4m3fn").encode(torch.tensor([1.0]).double().numpy())[0])   # e4m3fn code of 1.0


def test_hand_computed_two_tiles():
    """Weight [32, 64] of all 1.0 codes, tile scales 2^0 and 2^1 (e8m0 127, 128): y = 32*1 + 32*2 = 96 per row
    for x = ones; a 128x128 reader would see one tile only."""
    w = torch.full((32, 64), ONE, dtype=torch.uint8)
    s = torch.tensor([[127, 128]], dtype=torch.uint8)
    y = fp8_linear_golden(torch.ones(1, 64), w, s, weight_block=32)["y"]
    assert torch.equal(y, torch.full((1, 32), 96.0))


def test_golden_fp64_matches_fp32():
    g = torch.Generator().manual_seed(5)
    codes, scales, wq = fp8_block_weight(g, 96, 160, std=160**-0.5, spread=3, block=32)
    x = torch.randn(5, 160, generator=g)
    y32 = fp8_linear_golden(x, codes, scales, weight_block=32)["y"]
    y64 = fp8_linear_golden(x.double(), codes, scales, weight_block=32)["y"]
    assert y64.dtype == torch.float64
    # fp32 accumulation of 160 terms: |err| <= 160 u32 sum |x w| (u32 = 2^-24)
    bound = 160 * 2.0**-24 * (x.double().abs() @ wq.double().abs().T)
    assert ((y32.double() - y64).abs() <= bound).all()
    # the spread makes tile scales differ, so the 32x32 grid matters
    assert len(set(scales.flatten().tolist())) > 3


def test_bad_block_and_grid_refused():
    g = torch.Generator().manual_seed(6)
    codes, scales, _ = fp8_block_weight(g, 64, 96, std=0.1, block=32)
    with pytest.raises(ValueError, match=r"weight_block: expected one of \[32, 128\]"):
        fp8_linear_golden(torch.ones(1, 96), codes, scales, weight_block=64)
    with pytest.raises(ValueError, match=r"for 128x128 blocks, got \(2, 3\)"):
        fp8_linear_golden(torch.ones(1, 96), codes, scales)


def test_mx_activation_scale_is_pow2_ceil_of_amax_over_448_per_32_group():
    """mxfp8_utils.py:58-62: scale = 2^ceil(log2(amax / 448)), one per 1x32 K group."""
    x = torch.ones(1, 64)
    x[0, 3] = 448 * 1.5           # group 0: amax 672 -> 2^ceil(log2 1.5) = 2
    x[0, 40] = 448.0 / 8          # group 1: amax 56 -> 2^-3 exactly
    codes, sc = quantize_fp8(x, MX_ACT)
    assert sc.tolist() == [[128, 124]]
    # 672 / 2 = 336 sits midway between the e4m3 neighbours 320 and 352: ties to even gives 320, i.e. 640
    assert dequantize_fp8(codes, sc, MX_ACT)[0, 3] == 640.0


def test_emulations_differ_as_the_platforms_do():
    """gfx942 (EmulationMxfp8LinearKernel) is a bf16 GEMM: x exactly bf16 gives the golden rounded to bf16 (up to
    fp32 order); the native-MX ocp emulation quantises x to e4m3 and differs by more."""
    g = torch.Generator().manual_seed(7)
    codes, scales, _ = fp8_block_weight(g, 64, 96, std=96**-0.5, spread=2, block=32)
    x = torch.randn(4, 96, generator=g).to(torch.bfloat16).float()
    want = fp8_linear_golden(x, codes, scales, weight_block=32)["y"]
    y942 = _emulate("gfx942")(x, codes, scales, weight_block=32)["y"]
    yocp = _emulate("ocp")(x, codes, scales, weight_block=32)["y"]
    ulp = 2.0**-8 * want.abs() + 1e-6
    assert ((y942 - want).abs() <= ulp).all()
    assert ((yocp - want).abs() > ulp).any()


def test_v41_rows_exist_in_both_tiers_and_v4_rows_unchanged():
    ids = [c.id for c in cases_for("linear.fp8_block")]
    wb32 = [c for c in cases_for("linear.fp8_block") if "/wb32/" in c.id]
    assert {c.tier for c in wb32} == {"fast", "full"}
    assert all(c.params["weight_block"] == 32 and "v4.1" in c.tags for c in wb32)
    assert all("weight_block" not in c.params for c in cases_for("linear.fp8_block") if "/wb32/" not in c.id)
    assert "linear.fp8_block/t1n256k512/normal/s0" in ids
