"""Deliberately wrong codecs must FAIL the same checks the exhaustive tests pass, with a useful message.

Each mutant goes through the very helper its exhaustive test uses (check_decode_table,
check_capabilities, run_encode_checks, check_e8m0_double, converted_mismatches, hand_built_ds_mla)
against the same oracle. A check that a mutant passed would be a check that cannot fail. The messages are
asserted too: they must show the code with its sign / exponent / mantissa fields (MiniFloat.describe)
and both decodings, so a real failure is diagnosable from the report alone.
"""

import dataclasses

import numpy as np
import torch

from references.formats import cache_layouts, conversion
from references.formats.minifloat import FNUZ, OCP, MiniFloat
from references.formats.verify import check_capabilities, check_decode_table, check_e8m0_double, report

from .oracles import DECODE, OVERFLOW, finfo_capabilities
from .test_cache_layouts import hand_built_ds_mla
from .test_conversion import converted_mismatches, edge_weights
from .test_minifloat_encode import clamp, run_encode_checks


def _same_fields(fmt: MiniFloat, cls, **changes) -> MiniFloat:
    """A copy of ``fmt`` as an instance of the mutant class ``cls`` (fields optionally changed)."""
    return cls(**{**{f.name: getattr(fmt, f.name) for f in dataclasses.fields(fmt)}, **changes})


def _messages(mism) -> str:
    return "\n".join(str(m) for m in mism)


# -- 1. exponent bias off by one ---------------------------------------------------------------------
def test_bias_off_by_one_fails_decode():
    mutant = dataclasses.replace(OCP, bias=8)  # e4m3fn fields, fnuz's bias: every value halves
    mism = check_decode_table(mutant, DECODE["ml_dtypes"]("float8_e4m3fn"), oracle_name="ml_dtypes")
    # every finite non-zero code is wrong (252 of them: 256 minus +-0 and the two NaNs)
    assert len(mism) == 252, report("bias mutant", mism, 256)
    msg = {m.index: m.detail for m in mism}[0x38]
    assert "0x38 s=0 e=0111 m=000" in msg and "ml_dtypes decodes to 1.0" in msg and "codec to 0.5" in msg
    assert "decodes like float8_e4m3fnuz" in msg  # the dialect verdict names what the mutant really is
    assert check_capabilities(mutant, finfo_capabilities("float8_e4m3fn"))  # max 224, not 448


def test_bias_off_by_one_fails_encode():
    mutant = dataclasses.replace(FNUZ, bias=7)
    mism, total = run_encode_checks("torch", "float8_e4m3fnuz", lambda f, x: x, False, impl=mutant)
    assert mism and "encode/codes" in {m.check for m in mism}, report("bias mutant encode", mism, total)


# -- 2. 0x80 decoded as -0 in fnuz -------------------------------------------------------------------
class NegativeZeroFnuz(MiniFloat):
    def _decode_one(self, code: int) -> float:
        return -0.0 if code == self.sign_mask else super()._decode_one(code)


def test_fnuz_0x80_as_negative_zero_fails():
    mutant = _same_fields(FNUZ, NegativeZeroFnuz)
    for lib in ("ml_dtypes", "torch"):
        mism = check_decode_table(mutant, DECODE[lib]("float8_e4m3fnuz"), oracle_name=lib)
        assert [m.index for m in mism] == [0x80], report("0x80 mutant", mism, 256)
        msg = mism[0].detail
        assert "0x80 s=1 e=0000 m=000" in msg and f"{lib} decodes to nan" in msg and "codec to -0.0" in msg
        assert "decodes like float8_e4m3fn" in msg  # it behaves like the OCP dialect on this byte
    caps = _messages(
        check_capabilities(mutant, finfo_capabilities("float8_e4m3fnuz"), oracle_name="ml_dtypes")
    )
    assert (
        "has_nan: ml_dtypes True, codec False" in caps
        and "has_negative_zero: ml_dtypes False, codec True" in caps
    )


# -- 3. truncation instead of round-to-nearest-even --------------------------------------------------
class Truncating(MiniFloat):
    def encode(self, x, *, saturate: bool = True) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        c = super().encode(x, saturate=saturate).astype(np.int64)
        v = self.table[c]
        rounded_up = np.isfinite(v) & np.isfinite(x) & (np.abs(v) > np.abs(x))
        return np.where(rounded_up, c - 1, c).astype(np.uint8)  # one code down in magnitude = toward zero


def test_truncation_fails_encode():
    for name, fmt in (("float8_e4m3fn", OCP), ("float8_e4m3fnuz", FNUZ)):
        mutant = _same_fields(fmt, Truncating)
        mism, total = run_encode_checks("ml_dtypes", name, lambda f, x: x, False, impl=mutant)
        groups = {m.check for m in mism}
        assert {"encode/around_midpoints", "encode/random"} <= groups, report("truncation", mism, total)
        assert "encode/codes" not in groups  # exact values are still exact: only rounding is wrong
    ocp_mut = _same_fields(OCP, Truncating)
    mism, _ = run_encode_checks("torch", "float8_e4m3fn", clamp, True, impl=ocp_mut)
    # the float32 just above the midpoint 1 + 1/16 of 0x38 / 0x39 must round up to 0x39; truncation keeps 0x38
    above_mid = float(np.nextafter(np.float32(1.0625), np.float32(2)))
    msg = [m.detail for m in mism if m.detail.startswith(f"x={above_mid!r} ")]
    assert (
        msg
        and "torch gives 0x39 s=0 e=0111 m=001 (1.125" in msg[0]
        and "codec gives 0x38 s=0 e=0111 m=000 (1.0" in msg[0]
    )


# -- 4. non-saturating where saturating is asked -----------------------------------------------------
class NeverSaturates(MiniFloat):
    def encode(self, x, *, saturate: bool = True) -> np.ndarray:
        return super().encode(x, saturate=False)


def test_ignoring_saturate_fails():
    for name, fmt in (("float8_e4m3fn", OCP), ("float8_e4m3fnuz", FNUZ)):
        mutant = _same_fields(fmt, NeverSaturates)
        for lib in ("ml_dtypes", "torch"):
            mism, total = run_encode_checks(lib, name, clamp, True, impl=mutant)
            assert mism, report("never saturates", mism, total)
            assert {m.check for m in mism} <= {"encode/overflow_boundary", "encode/specials", "encode/random"}
            assert any("(nan as" in m.detail and "saturate=True" in m.detail for m in mism)
    # where torch's own e4m3fn cast saturates (2.13), the plain-cast comparison catches it as well; where it
    # gives NaN (2.11) the plain cast agrees with the mutant, and the clamp comparison above is what catches it
    if OVERFLOW[("torch", "float8_e4m3fn")] != "saturate":
        return
    mism, _ = run_encode_checks(
        "torch", "float8_e4m3fn", lambda f, x: x, True, impl=_same_fields(OCP, NeverSaturates)
    )
    inf_msg = [m.detail for m in mism if m.detail.startswith("x=inf ")]
    assert (
        inf_msg
        and "torch gives 0x7E s=0 e=1111 m=110 (448.0" in inf_msg[0]
        and "codec gives 0x7F" in inf_msg[0]
    )


# -- 5. e8m0 scale doubled by multiplying the byte by 2 ----------------------------------------------
def byte_times_two(byte):
    return (np.asarray(byte, dtype=np.int64) * 2 % 256).astype(np.uint8)


def test_e8m0_byte_times_two_fails_double_check():
    mism = check_e8m0_double(byte_times_two)
    assert len(mism) == 253, report("byte x 2", mism, 254)  # only byte 1 -> 2 is right by accident
    msg = {m.index: m.detail for m in mism}[0x7F]
    assert "scale 0x7F e=01111111 (1.0 as float8_e8m0fnu) doubled should be 2.0" in msg
    assert "got 0xFE e=11111110 (1.7014118346046923e+38" in msg


def test_e8m0_byte_times_two_fails_conversion(monkeypatch):
    monkeypatch.setattr(conversion, "e8m0_double", byte_times_two)
    codes, scales = edge_weights("ue8m0")
    mism = converted_mismatches(codes, scales, "ue8m0")
    assert mism, "the OCP -> fnuz value check passed a conversion that multiplies the scale byte by 2"
    # the message shows the element byte in both dialects and the scale bytes before / after
    assert (
        "code 0x7E s=0 e=1111 m=110 (448.0 as float8_e4m3fn) / 0x7E s=0 e=1111 m=110 (224.0 as"
        in _messages(mism)
    )
    assert "scale 0x78 e=01111000 (0.0078125 as float8_e8m0fnu) -> 0xF0 e=11110000" in _messages(mism)


# -- a layout mutant: rope written big-endian -------------------------------------------------------
def test_big_endian_rope_fails_hand_built_layout(monkeypatch):
    real = cache_layouts._bf16_to_bytes

    def big_endian(x: torch.Tensor) -> np.ndarray:
        b = real(x)
        return np.stack([b[..., 1::2], b[..., 0::2]], axis=-1).reshape(b.shape)

    monkeypatch.setattr(cache_layouts, "_bf16_to_bytes", big_endian)
    _, bad = hand_built_ds_mla("ocp", 448.0, 124)
    assert bad[:2] == ["byte 4480: got 0x3F, want 0x80", "byte 4481: got 0x80, want 0x3F"], bad
