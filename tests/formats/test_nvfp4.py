"""NVFP4 codec (e2m1 in blocks of 16 x E4M3 scale x fp32 tensor scale), checked against ml_dtypes' own decodes
and casts, exhaustively over the 16 e2m1 codes and the 256 scale bytes in both E4M3 dialects; and a scale decoded
in the wrong dialect caught by the repo's ratio signature (x0.5: OCP bytes read as fnuz)."""

import ml_dtypes
import numpy as np
import pytest
import torch

from conformance.ratio import ratio_signature
from references.formats.blockscale import pack_nibbles, unpack_nibbles
from references.formats.nvfp4 import NVFP4_BLOCK, dequantize_nvfp4, nvfp4_global_scale, quantize_nvfp4

ML = {"ocp": ml_dtypes.float8_e4m3fn, "fnuz": ml_dtypes.float8_e4m3fnuz}
E2M1 = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float64)


def _scales(dialect):
    return np.arange(256, dtype=np.uint8).view(ML[dialect]).astype(np.float64)


@pytest.mark.parametrize("dialect", ["ocp", "fnuz"])
@pytest.mark.parametrize("g", [1.0, 0.125, 3.0])
def test_decode_every_code_with_every_scale_byte(dialect, g):
    codes = np.tile(np.arange(16, dtype=np.uint8), (256, 1))           # row r: the 16 codes, scale byte r
    packed = torch.from_numpy(pack_nibbles(codes))
    sb = torch.arange(256, dtype=torch.uint8)[:, None]
    got = dequantize_nvfp4(packed, sb, g, dialect=dialect).numpy().astype(np.float64)
    want = E2M1[None, :] * _scales(dialect)[:, None] * g
    np.testing.assert_array_equal(got, want.astype(np.float32).astype(np.float64))
    nan_rows = {"ocp": [0x7F, 0xFF], "fnuz": [0x80]}[dialect]
    assert sorted(np.flatnonzero(np.isnan(got).all(axis=1)).tolist()) == nan_rows
    assert np.isfinite(np.delete(got, nan_rows, axis=0)).all()


@pytest.mark.parametrize("dialect", ["ocp", "fnuz"])
def test_encode_recovers_every_scale_byte_and_code(dialect):
    """A block holding all 16 e2m1 values times a representable scale s encodes back to s's byte and the same
    values, for every positive finite scale byte (subnormals included)."""
    s_all = _scales(dialect)
    rows = [b for b in range(1, 256) if np.isfinite(s_all[b]) and s_all[b] > 0]
    assert len(rows) == {"ocp": 126, "fnuz": 127}[dialect]
    x = torch.from_numpy(E2M1[None, :] * s_all[rows][:, None])
    packed, sb, g = quantize_nvfp4(x, dialect=dialect, global_scale=1.0)
    assert g == 1.0 and sb.numpy()[:, 0].tolist() == rows
    got = unpack_nibbles(packed.numpy()).astype(np.int64)
    np.testing.assert_array_equal(E2M1[got], np.broadcast_to(E2M1, got.shape))
    np.testing.assert_array_equal(dequantize_nvfp4(packed, sb, 1.0, dialect=dialect).numpy(), x.numpy())
    zp, zs, _ = quantize_nvfp4(torch.zeros(2, 16), dialect=dialect, global_scale=1.0)   # scale 0 -> zeros
    assert zs.numpy().tolist() == [[0], [0]] and not dequantize_nvfp4(zp, zs, 1.0, dialect=dialect).any()


@pytest.mark.parametrize("dialect", ["ocp", "fnuz"])
def test_encode_random_against_ml_dtypes_casts(dialect):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=gen, dtype=torch.float64) * \
        (2.0 ** torch.randint(-20, 6, (64, 1), generator=gen)).double()
    packed, sb, g = quantize_nvfp4(x, dialect=dialect)
    fmax = float(ml_dtypes.finfo(ML[dialect]).max)
    assert g == float(np.float32(x.abs().max().item() / (6 * fmax))) == nvfp4_global_scale(x.numpy(), dialect)
    xb = x.numpy().reshape(64, 16, NVFP4_BLOCK)
    want_s = (np.abs(xb).max(axis=-1) / 6 / g).astype(ML[dialect])    # ml_dtypes: round to nearest even
    np.testing.assert_array_equal(sb.numpy(), want_s.view(np.uint8))
    s = want_s.astype(np.float64)
    den = np.broadcast_to(s[..., None] * g, xb.shape)
    y = np.divide(xb, den, out=np.zeros_like(xb), where=den > 0)       # a scale that underflows to 0: zeros
    want_q = np.clip(y, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float64)
    got = dequantize_nvfp4(packed, sb, g, dialect=dialect).numpy().reshape(64, 16, NVFP4_BLOCK)
    np.testing.assert_array_equal(got, (want_q * s[..., None] * g).astype(np.float32))
    assert s.max() <= fmax and np.isclose(s.max(), fmax, rtol=2**-3)  # the largest block scale at the E4M3 max
    # blocks whose scale is a normal E4M3 value: within one e2m1 step of the top binade (+ the scale's rounding);
    # blocks far below the tensor's max get subnormal, coarse scales (NVFP4's limited range), not bounded here
    normal = np.abs(xb).max(axis=-1) / 6 / g >= float(ml_dtypes.finfo(ML[dialect]).smallest_normal)
    assert normal.sum() > 100
    assert (np.abs(got - xb) <= 1.5 * s[..., None] * g)[normal].all()


def test_wrong_scale_dialect_is_diagnosed_by_the_ratio_signature():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 512, generator=gen, dtype=torch.float64)
    packed, sb, g = quantize_nvfp4(x, dialect="ocp")
    ref = dequantize_nvfp4(packed, sb, g, dialect="ocp")
    assert not ratio_signature(ref, ref).flagged                        # quiet on the right reading
    sig = ratio_signature(dequantize_nvfp4(packed, sb, g, dialect="fnuz"), ref)
    assert sig.signature == "x0.5:exact" and sig.factor == "x0.5"
    assert "bias 7 (OCP) bytes read with bias 8 (fnuz)" in sig.meaning
    assert sig.counts["x0.5:exact"] == int((ref != 0).sum())           # every nonzero value, exactly
    p2, s2, g2 = quantize_nvfp4(x, dialect="fnuz")
    sig2 = ratio_signature(dequantize_nvfp4(p2, s2, g2, dialect="ocp"), dequantize_nvfp4(p2, s2, g2, dialect="fnuz"))
    assert sig2.signature == "x2:exact" and "bias 8 (fnuz) bytes read with bias 7 (OCP)" in sig2.meaning


def test_bad_input_refused_in_one_line():
    with pytest.raises(ValueError, match=r"last dim 20 is not a multiple of 16"):
        quantize_nvfp4(torch.zeros(2, 20))
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        quantize_nvfp4(torch.full((1, 16), float("nan")))
    with pytest.raises(ValueError, match=r"\(2, 3\) scales do not cover \(2, 32\) values in blocks of 16"):
        dequantize_nvfp4(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"NVFP4 scales are E4M3 \(ocp or fnuz\), not float8_e5m2"):
        quantize_nvfp4(torch.zeros(1, 16), dialect="float8_e5m2")
    with pytest.raises(ValueError, match=r"global_scale must be positive and finite"):
        quantize_nvfp4(torch.zeros(1, 16), global_scale=0.0)
