"""FP8 weight-scale block size as a parameter (issue #18): 32x32 UE8M0 blocks (DeepSeek-V4.1) are told apart
from 128x128 ones by the scale grid, and a grid that does not match the recipe's block is refused naming the
block the shapes imply."""

import numpy as np
import pytest
import torch

from references.formats.blockscale import BlockFP8, block_mismatch, dequantize_fp8, infer_block, quantize_fp8
from references.formats.scales import e8m0_decode

B32 = BlockFP8.of("ocp", (32, 32))
B128 = BlockFP8.of("ocp", (128, 128))


def _x():
    """[256, 256] with a different power-of-two magnitude in every 32x32 block (so a 128x128 reading of the
    32x32 scales would mis-scale most of them)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 256, generator=g, dtype=torch.float64)
    mag = 2.0 ** torch.arange(-8, 8, dtype=torch.float64)[torch.randint(0, 16, (8, 8), generator=g)]
    return x * mag.repeat_interleave(32, 0).repeat_interleave(32, 1)


@pytest.mark.parametrize("shape, grid, want", [
    ((256, 256), (8, 8), (32, 32)), ((256, 256), (2, 2), (128, 128)), ((100, 300), (4, 10), (32, 32)),
    ((100, 300), (1, 3), (128, 128)), ((4096, 128), (128, 4), (32, 32)), ((32, 32), (1, 1), (32, 32)),
    ((256, 256), (3, 8), None), ((256, 256), (8,), None),
])
def test_infer_block(shape, grid, want):
    assert infer_block(shape, grid) == want


def test_block_mismatch_wording():
    assert block_mismatch((256, 512), (8, 16), (32, 32)) is None
    assert block_mismatch((256, 512), (8, 16), (128, 128)) == \
        "weight [256,512] with scale [8,16] implies block (32,32); config says 128x128"
    assert block_mismatch((256, 512), (2, 4), (32, 32)) == \
        "weight [256,512] with scale [2,4] implies block (128,128); config says 32x32"
    # a side no longer than both blocks has one scale either way: nothing to tell apart, nothing refused
    assert block_mismatch((32, 32), (1, 1), (128, 128)) is None


def test_32x32_scales_round_trip_and_refuse_a_128x128_reading():
    x = _x()
    codes, scales = quantize_fp8(x, B32)
    assert scales.shape == (8, 8)
    s = e8m0_decode(scales.numpy())
    # the 32x32 scales really differ inside a 128x128 tile: information a 128x128 reading would lose
    assert any(len(np.unique(s[i:i + 4, j:j + 4])) > 1 for i in (0, 4) for j in (0, 4))
    vals = dequantize_fp8(codes, scales, B32)
    # exact: each value is its e4m3 code (torch's own decode) times its own 32x32 block's scale
    want = codes.view(torch.float8_e4m3fn).double() * torch.from_numpy(s).repeat_interleave(32, 0) \
        .repeat_interleave(32, 1)
    assert torch.equal(vals.double(), want)
    assert (vals.double() - x).abs().max() <= (x.abs() * 2.0**-4).max()   # and close to the input (e4m3: 3 bits)
    with pytest.raises(ValueError, match=r"^weight \[256,256\] with scale \[8,8\] implies block \(32,32\); "
                                         r"config says 128x128$"):
        dequantize_fp8(codes, scales, B128)
    c128, s128 = quantize_fp8(x, B128)
    with pytest.raises(ValueError, match=r"implies block \(128,128\); config says 32x32$"):
        dequantize_fp8(c128, s128, B32)
    # the two recipes do give different values here (the check guards a real difference)
    assert not torch.equal(dequantize_fp8(c128, s128, B128), vals)
