"""Block FP8 (spec 4.2) and MXFP4 (4.3) against an independent computation with torch's / ml_dtypes' casts.

The independent side computes amax, the scale and the element codes with torch ops (frexp for the
power-of-two exponent, torch's own fp8 cast for the rounding); for MXFP4, ml_dtypes' e2m1 cast (torch
has no fp4 conversion). With a power-of-two scale, x / s is exact, so torch's cast rounds exactly once.
With fp32 scales the division is done in float64 and torch converts float64 -> float32 -> fp8: a double
rounding that can differ from our single rounding only within 2**-24 relative of a tie; the fixed seed
below has none (if a new seed hits one, the message shows it).
"""

import ml_dtypes
import numpy as np
import pytest
import torch

from references.formats.blockscale import (
    BlockFP8,
    dequantize_fp8,
    dequantize_mxfp4,
    pack_nibbles,
    quantize_fp8,
    quantize_mxfp4,
    unpack_nibbles,
)
from references.formats.minifloat import FORMATS
from references.formats.verify import check_codes, check_values, report

TORCH_FP8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e4m3fnuz": torch.float8_e4m3fnuz}

# (dialect, fmax) rows: OCP with its own max and with the fnuz maxima (what fnuz-targeting kernels use),
# fnuz with 240 and the 224 of vLLM's USE_FNUZ indexer path.
DIALECT_FMAX = [("ocp", 448.0), ("ocp", 240.0), ("ocp", 224.0), ("fnuz", 240.0), ("fnuz", 224.0)]
BLOCKS = [(1, 64), (1, 128), (128, 128)]
CASES = [(d, f, b, s) for d, f in DIALECT_FMAX for b in BLOCKS for s in ("ue8m0", "fp32")]


def make_x(seed: int, shape=(256, 256)) -> torch.Tensor:
    """Normal values with a per-64-column-and-row-group magnitude from 2**-12 to 2**12, plus edge rows: an
    all-zero row (amax floor), a row hitting the floor exactly, tiny values next to large ones (fp8
    subnormals and underflow to +-0), and exact powers of two."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    mag = torch.exp2(torch.randint(-12, 13, (shape[0] // 8, shape[1] // 64), generator=g).double())
    x = x * mag.repeat_interleave(8, 0).repeat_interleave(64, 1)
    x[0] = 0.0
    x[1] = 1e-4 * torch.sign(torch.randn(shape[1], generator=g, dtype=torch.float64))
    x[2, ::2] = 1000.0
    x[2, 1::2] = -1e-6 * torch.arange(shape[1] // 2, dtype=torch.float64)
    x[3] = torch.exp2(torch.randint(-10, 10, (shape[1],), generator=g).double())
    return x.float()


def torch_block_fp8(x: torch.Tensor, dialect_name: str, fmax: float, block, scale_fmt: str, floor: float):
    """(codes uint8, scale bytes / fp32 scales, dequantised float32) computed with torch only."""
    r, c = x.shape
    br, bc = block
    xb = x.double().reshape(r // br, br, c // bc, bc)
    amax = xb.abs().amax(dim=(1, 3)).clamp_min(floor)
    if scale_fmt == "ue8m0":
        m, e = torch.frexp(amax / fmax)
        e = e - (m == 0.5).int()  # ceil(log2(v)): v = m * 2**e, exact power of two when m == 0.5
        s = torch.ldexp(torch.ones_like(amax), e)
        stored = (e + 127).to(torch.uint8)
    else:
        s = (amax / fmax).float().double()
        stored = s.float()
    y = (xb / s[:, None, :, None]).clamp(-fmax, fmax)
    q = y.to(TORCH_FP8[dialect_name])
    codes = q.view(torch.uint8).reshape(r, c)
    deq = (q.double() * s[:, None, :, None]).reshape(r, c).float()
    return codes, stored, deq


@pytest.mark.parametrize(
    "dialect,fmax,block,scale_fmt", CASES, ids=[f"{d}-fmax{f:g}-{b[0]}x{b[1]}-{s}" for d, f, b, s in CASES]
)
def test_block_fp8_against_torch(dialect, fmax, block, scale_fmt):
    spec = BlockFP8.of(dialect, block, fmax=fmax, scale_fmt=scale_fmt)
    x = make_x(seed=CASES.index((dialect, fmax, block, scale_fmt)))
    codes, scales = quantize_fp8(x, spec)
    t_codes, t_scales, t_deq = torch_block_fp8(x, spec.fmt.name, fmax, block, scale_fmt, spec.amax_floor)

    def where(i):
        r, c = divmod(i, x.shape[1])
        return f"[{r},{c}] x={float(x[r, c])!r} block ({r // block[0]},{c // block[1]})"

    mism = check_codes(codes.numpy(), t_codes.numpy(), spec.fmt, check="codes", where=where)
    if scale_fmt == "ue8m0":
        mism += check_codes(scales.numpy(), t_scales.numpy(), FORMATS["float8_e8m0fnu"], check="scales")
    else:
        mism += check_values(scales.numpy(), t_scales.numpy(), check="scales")
    mism += check_values(
        dequantize_fp8(codes, scales, spec).numpy(), t_deq.numpy(), check="dequant", where=where
    )
    assert not mism, report(f"block fp8 {dialect} fmax={fmax} block={block} {scale_fmt}", mism, x.numel())


def test_fnuz_refuses_fmax_448():
    with pytest.raises(ValueError, match="fmax 448"):
        BlockFP8.of("fnuz", (1, 128), fmax=448.0)


def test_block_fp8_refuses_bad_input():
    spec = BlockFP8.of("ocp", (1, 64))
    with pytest.raises(ValueError, match="multiple of the block"):
        quantize_fp8(torch.zeros(2, 100), spec)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_fp8(torch.tensor([[float("inf")] + [0.0] * 63]), spec)


def test_block_fp8_hand_example():
    """One 64-block, OCP, fmax 448: amax 896 -> scale 2 (byte 128); 896 -> 448 (0x7E), 1 -> 0.5 (0x30),
    -3 -> -1.5 (0xBC)."""
    x = torch.zeros(64)
    x[0], x[1], x[2] = 896.0, 1.0, -3.0
    spec = BlockFP8.of("ocp", (1, 64))
    codes, scales = quantize_fp8(x, spec)
    assert codes[:3].tolist() == [0x7E, 0x30, 0xBC] and scales.tolist() == [128]
    assert dequantize_fp8(codes, scales, spec)[:3].tolist() == [896.0, 1.0, -3.0]


# -- MXFP4 -------------------------------------------------------------------------------------------
def mxfp4_independent(x: torch.Tensor):
    xb = x.double().reshape(*x.shape[:-1], -1, 32)
    amax = xb.abs().amax(-1).clamp_min(6.0 * 2.0**-126)
    m, e = torch.frexp(amax / 6.0)
    e = e - (m == 0.5).int()
    s = torch.ldexp(torch.ones_like(amax), e)
    y = (xb / s[..., None]).clamp(-6, 6).reshape(x.shape).float().numpy()
    codes = y.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # low nibble = even element
    deq = y.astype(ml_dtypes.float4_e2m1fn).astype(np.float64) * np.repeat(s.numpy(), 32, axis=-1)
    return packed, (e + 127).to(torch.uint8).numpy(), deq.astype(np.float32)


def test_mxfp4_against_ml_dtypes():
    x = make_x(seed=7, shape=(64, 512))
    packed, sb = quantize_mxfp4(x)
    w_packed, w_sb, w_deq = mxfp4_independent(x)
    e2m1, e8m0 = FORMATS["float4_e2m1fn"], FORMATS["float8_e8m0fnu"]
    mism = check_codes(unpack_nibbles(packed.numpy()), unpack_nibbles(w_packed), e2m1, check="nibbles")
    mism += check_values(packed.numpy(), w_packed, check="packed bytes", fmt_name="uint8")
    mism += check_codes(sb.numpy(), w_sb, e8m0, check="scales")
    mism += check_values(dequantize_mxfp4(packed, sb).numpy(), w_deq, check="dequant")
    assert not mism, report("mxfp4", mism, x.numel())


def test_mxfp4_nibble_order_hand_example():
    """amax 2 -> scale 2**ceil(log2(2/6)) = 0.5 (e8m0 byte 126); 1.0 -> 2.0 = 0x4, 2.0 -> 4.0 = 0x6; the
    even element (1.0) sits in the low nibble: byte 0x64. -0.25 -> -0.5 = 0x9, 0.75 -> 1.5 = 0x3: 0x39."""
    x = torch.zeros(32)
    x[0], x[1], x[2], x[3] = 1.0, 2.0, -0.25, 0.75
    packed, sb = quantize_mxfp4(x)
    assert sb.tolist() == [126]
    assert packed[:2].tolist() == [0x64, 0x39]
    assert unpack_nibbles(np.array([0x64, 0x39], np.uint8)).tolist() == [0x4, 0x6, 0x9, 0x3]
    assert pack_nibbles(np.array([0x4, 0x6, 0x9, 0x3])).tolist() == [0x64, 0x39]
    assert dequantize_mxfp4(packed, sb)[:4].tolist() == [1.0, 2.0, -0.25, 0.75]


def test_mxfp4_pack_unpack_all_pairs():
    pairs = np.array([(a, b) for a in range(16) for b in range(16)], np.uint8).ravel()
    packed = pack_nibbles(pairs)
    assert packed.tolist() == [a | (b << 4) for a in range(16) for b in range(16)]
    assert (unpack_nibbles(packed) == pairs).all()
    with pytest.raises(ValueError, match="odd"):
        pack_nibbles(np.zeros(3, np.uint8))


def test_fp32_scale_quantiser_divides_in_fp32_like_the_serving_kernels():
    """vLLM's per_token_group_fp8_quant computes y_s = amax / fmax and q = x / y_s in float, then rounds to FP8
    (nearest even): the quotient is rounded to fp32 first. The fp32-scale spec reproduces that byte for byte; a
    fp64 quotient would differ on values sitting within an fp32 ulp of an FP8 tie (checked to happen here)."""
    import numpy as np

    g = torch.Generator().manual_seed(7)
    x = (torch.randn(4096, 128, generator=g) * 3).to(torch.bfloat16).float()
    for dialect, fmax, dt in (("float8_e4m3fn", 448.0, torch.float8_e4m3fn),
                              ("float8_e4m3fnuz", 224.0, torch.float8_e4m3fnuz)):
        spec = BlockFP8.of(dialect, (1, 128), fmax=fmax, scale_fmt="fp32", amax_floor=1e-10)
        codes, scales = quantize_fp8(x, spec)
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-10) / fmax          # fp32, as the kernel
        want = (x / s).clamp(-fmax, fmax).to(dt).view(torch.uint8)
        assert torch.equal(scales, s), dialect
        assert torch.equal(codes, want), f"{dialect}: {(codes != want).sum()} codes differ from the fp32 kernel"
        y64 = np.clip(x.double().numpy() / s.double().numpy(), -fmax, fmax)
        c64 = torch.from_numpy(spec.fmt.encode(y64, saturate=True))
        assert (c64 != want).any(), f"{dialect}: no near-tie value in the sample; the test would not see fp64"
