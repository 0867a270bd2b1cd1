"""Unit checks of the dialect classifiers, ratio signature and scale checks (fast, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conformance.checks.dialect import (
    check_scale_conversion,
    classify_codes,
    classify_decoding,
    consumer_probe,
    producer_probe_values,
    ratio_signature,
)
from references.formats.blockscale import BlockFP8, dequantize_fp8, quantize_fp8, scales_to_float
from references.formats.minifloat import FNUZ, OCP


def _quant(dialect, fmax, scale_fmt, block=(1, 128)):
    spec = BlockFP8.of(dialect, block, fmax=fmax, scale_fmt=scale_fmt)
    x = producer_probe_values(block)
    codes, scales = quantize_fp8(x, spec)
    return x, codes, scales_to_float(scales, spec), spec


def test_probe_design_separates_dialects_at_one():
    x = producer_probe_values((1, 64))
    assert x[0, 0] == 1.0 and OCP.encode(1.0) == 0x38 and FNUZ.encode(1.0) == 0x40
    assert (x.abs().amax(1) == torch.tensor([232.0, 300.0, 448.0])).all()
    assert (torch.signbit(x) & (x.abs() < 2.0**-12)).any()  # tiny negatives / -0 present


@pytest.mark.parametrize("dialect,fmax", [("ocp", 448.0), ("fnuz", 240.0), ("fnuz", 224.0)])
@pytest.mark.parametrize("scale_fmt", ["ue8m0", "fp32"])
def test_classify_codes_names_dialect_and_fmax(dialect, fmax, scale_fmt):
    x, codes, s, spec = _quant(dialect, fmax, scale_fmt)
    v = classify_codes(codes, x, s, fmax, block=spec.block)
    assert v.dialect == spec.fmt.name and v.fmax_guess == fmax and v.ok, v.evidence + v.defects
    assert v.match[spec.fmt.name] == 1.0


def test_classify_codes_neither_when_scale_is_off_by_a_power_of_two():
    x, codes, s, spec = _quant("fnuz", 240.0, "ue8m0")
    v = classify_codes(codes, x, s * 8, block=spec.block)
    assert v.dialect == "neither"
    assert v.scale_offset_log2["float8_e4m3fnuz"] == 3 and v.scale_offset_log2["float8_e4m3fn"] == 4
    assert "worst" in " ".join(v.evidence) and "s=" in " ".join(v.evidence)


def test_classify_codes_expected_fmax_224_vs_240():
    x, codes, s, spec = _quant("fnuz", 240.0, "ue8m0")
    v = classify_codes(codes, x, s, 224.0, block=spec.block)
    assert v.dialect == "float8_e4m3fnuz" and [d["kind"] for d in v.defects] == ["fmax_mismatch"]


@pytest.mark.parametrize("fed,read_as,k", [(FNUZ, OCP, 1), (OCP, FNUZ, -1), (OCP, OCP, 0), (FNUZ, FNUZ, 0)])
def test_classify_decoding(fed, read_as, k):
    codes, scales, s = consumer_probe(fed, (1, 64), "ue8m0")
    read = dequantize_fp8(codes, scales, BlockFP8.of(read_as.name, (1, 64)))
    v = classify_decoding(codes, fed.name, read, s, block=(1, 64))
    assert v.decoded_as == read_as.name and v.ok == (k == 0)
    assert v.ratio["signature"] == {1: "x2:exact", -1: "x0.5:exact", 0: "match"}[k]


def test_classify_decoding_other_bias_is_neither_with_factor():
    codes, scales, s = consumer_probe(FNUZ, (1, 64), "ue8m0")
    read = dequantize_fp8(codes, scales, BlockFP8.of("fnuz", (1, 64))) * 2.0**-7  # e4m3b15-like reading
    v = classify_decoding(codes, FNUZ.name, read, s, block=(1, 64))
    assert v.decoded_as == "neither" and v.factor_log2["float8_e4m3fnuz"] == -7


def test_ratio_signature_no_alarm_on_fp8_rounding_noise():
    g = torch.Generator().manual_seed(0)
    for dialect in ("ocp", "fnuz"):
        x = torch.randn(64, 128, generator=g) * 3
        spec = BlockFP8.of(dialect, (1, 128))
        deq = dequantize_fp8(*quantize_fp8(x, spec), spec).to(torch.bfloat16)
        sig = ratio_signature(deq, x, ignore_below=spec.fmt.smallest_subnormal * 8 * 2.0**4)
        assert not sig.flagged, sig.summary()


@pytest.mark.parametrize(
    "factor,name",
    [
        (2.0, "x2:exact"),
        (0.5, "x0.5:exact"),
        (240 / 448, "fmax240/448:exact"),
        (448 / 240, "fmax448/240:exact"),
        (224 / 240, "fmax224/240:exact"),
    ],
)
def test_ratio_signature_peaks(factor, name):
    r = np.linspace(1.0, 9.0, 50)
    sig = ratio_signature(r * factor, r, edge="indexer_q->logits")
    assert sig.signature == name and sig.counts[name] == 50 and sig.suspect == "indexer_q->logits"


def test_ratio_signature_nan_at_0x80_and_noisy_x2():
    r = np.linspace(1.0, 9.0, 50)
    s = r * 2 * (1 + 0.03 * (-1.0) ** np.arange(50))
    assert ratio_signature(s, r).signature == "x2:noisy"
    s = r.copy()
    s[7] = np.nan
    codes = np.zeros(50, np.uint8)
    codes[7] = 0x80
    sig = ratio_signature(s, r, codes=codes)
    assert sig.signature == "nan_at_0x80" and sig.worst["index"] == [7] and sig.worst["code"] == 0x80


@pytest.mark.parametrize(
    "after,conv,ok",
    [
        (lambda b: b + 1, "exponent+1", True),
        (lambda b: b, "not applied", False),
        (lambda b: b + 2, "applied twice", False),
        (lambda b: (b.astype(np.float32) * 2.0).astype(np.uint8), "byte*2", False),
    ],
)
def test_check_scale_conversion_e8m0(after, conv, ok):
    before = np.array([[120, 127], [130, 118]], np.uint8)
    sc = check_scale_conversion(before, after(before).astype(np.uint8), "ue8m0")
    assert (sc.conversion, sc.ok) == (conv, ok), sc.message


def test_check_scale_conversion_fp32_and_expected_none():
    b = np.array([0.5, 0.25, 3.0], np.float32)
    assert check_scale_conversion(b, b * 2, "fp32").conversion == "x2"
    assert check_scale_conversion(b, b * 4, "fp32").conversion == "applied twice"
    assert check_scale_conversion(b, b, "fp32", expected="none").ok


@pytest.mark.parametrize("dialect", ["ocp", "fnuz"])
def test_classify_codes_names_subnormal_flush_not_a_dialect(dialect):
    x, codes, s, spec = _quant(dialect, None, "ue8m0")
    f = OCP if dialect == "ocp" else FNUZ
    c = codes.numpy().copy()
    sub = ((c.astype(np.int64) >> 3) & 0xF) == 0
    assert sub.any() and (c[sub] & 0x7F).any(), "the probe must contain subnormal codes"
    c[sub] = 0                                        # a writer that flushes subnormals to zero
    v = classify_codes(c, x, s, block=spec.block)
    assert v.dialect == f.name, v.evidence
    kinds = [d["kind"] for d in v.defects]
    assert kinds == ["subnormal_mishandled"], v.defects
    assert "subnormal" in v.defects[0]["message"] and "s=" in v.defects[0]["message"]
    # and the correct writer raises nothing
    ok = classify_codes(codes, x, s, block=spec.block)
    assert ok.dialect == f.name and not ok.defects


def test_classify_decoding_names_subnormal_misdecode():
    codes, _, s = consumer_probe(OCP, (1, 128), "fp32")
    c = codes.numpy()
    sv = np.broadcast_to(s, c.shape)
    read = OCP.decode(c) * sv
    sub = ((c.astype(np.int64) >> 3) & 0xF) == 0
    m = sub & ((c & 0x7) != 0)
    assert m.any()
    # exponent-0 codes read as if normal: (1 + m/8) * 2**(1-7) instead of (m/8) * 2**(1-7)
    read = np.where(m, np.where(c & 0x80, -1, 1) * (1 + (c & 0x7) / 8) * 2.0**-6 * sv, read)
    v = classify_decoding(c, "float8_e4m3fn", read, s, block=(1, 128))
    assert v.decoded_as == "float8_e4m3fn" and not v.ok
    assert [d["kind"] for d in v.defects] == ["subnormal_mishandled"]
    good = classify_decoding(c, "float8_e4m3fn", OCP.decode(c) * sv, s, block=(1, 128))
    assert good.ok and not good.defects


def test_classify_codes_names_nan_written_for_in_range_values():
    """A writer that stores NaN (0x7F) where a finite value rounds to +0 (0x00 in both dialects, so the dialect
    is still named from the other bytes): a defect with its count, first index and both decodings; the
    correct bytes have no defect. (A NaN where the dialects' codes differ makes the producer "neither", with
    the ratio signature naming the NaN: tests/dialect/test_mutants.py.)"""
    x, codes, s, spec = _quant("ocp", 448.0, "ue8m0")
    ok = classify_codes(codes, x, s, 448.0, block=spec.block)
    assert ok.dialect == "float8_e4m3fn" and not ok.defects
    bad = codes.clone()
    zero = (bad == 0x00) & ~torch.signbit(x)
    assert zero.any()
    bad[zero] = 0x7F
    v = classify_codes(bad, x, s, 448.0, block=spec.block)
    assert v.dialect == "float8_e4m3fn", v.evidence
    d = [d for d in v.defects if d["kind"] == "nan_written"]
    assert d and d[0]["count"] == int(zero.sum()), v.defects
    assert tuple(d[0]["index"]) == tuple(int(i) for i in torch.nonzero(zero)[0])
    assert "NaN bytes for finite in-range inputs" in d[0]["message"] and "s=0 e=1111 m=111" in d[0]["message"]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_classify_codes_refuses_a_non_positive_or_non_finite_scale(bad):
    """A zero, negative, NaN or infinite scale is a bad_scale defect naming the block, and no dialect verdict;
    the same codes with their real scales classify cleanly (test_classify_codes_names_dialect_and_fmax)."""
    x, codes, s, spec = _quant("fnuz", 240.0, "fp32")
    s = torch.as_tensor(s).clone()
    s.view(-1)[1] = bad
    v = classify_codes(codes, x, s, 240.0, block=spec.block)
    assert v.dialect == "neither" and [d["kind"] for d in v.defects] == ["bad_scale"]
    d = v.defects[0]   # counted per element: the block of row 1 (128 elements), first at [1, 0]
    assert d["count"] == 128 and d["index"] == [1, 0], d
    assert d["message"].endswith(f"is {bad!r} (not a positive finite number)"), d
