"""Probes of what ml_dtypes and torch do where the formats leave room; documents, then pins, behaviour."""

import numpy as np
import pytest
import torch

from references.formats.minifloat import FORMATS
from references.formats.verify import ulp_of_max

from .oracles import ENCODE, ORACLES, OVERFLOW, TORCH_E4M3FN_OVERFLOW, TORCH_MINOR


def _classify(fmt, codes):
    vals = fmt.decode(codes)
    if np.isnan(vals).all():
        return "nan"
    if np.isinf(vals).all():
        return "inf"
    if (np.abs(vals) == fmt.max).all():
        return "saturate"
    return f"mixed {[fmt.describe(c) for c in codes]}"


@pytest.mark.parametrize("lib,name", ORACLES, ids=[f"{lib}-{n}" for lib, n in ORACLES])
def test_overflow_behaviour(lib, name):
    """Finite overflow (far past and just past the rounding boundary) and +-inf behave as OVERFLOW says."""
    fmt = FORMATS[name]
    over = [np.nextafter(np.float32(fmt.max + ulp_of_max(fmt) / 2), np.float32(np.inf)), fmt.max * 4, np.inf]
    if fmt.signed:
        over += [-v for v in over]
    got = _classify(fmt, ENCODE[lib](name, np.array(over, dtype=np.float64)))
    assert got == OVERFLOW[(lib, name)], (
        f"{lib} {name}: overflow now gives {got}, recorded {OVERFLOW[(lib, name)]}"
    )


def test_torch_e4m3fn_overflow_mode_is_recorded_for_this_version():
    """torch's OCP e4m3 cast clamps in 2.13 and gives NaN in 2.11: pinned per recorded version; an unrecorded
    version must at least behave uniformly (all NaN or all clamped), which the encode tests rely on."""
    mode = OVERFLOW[("torch", "float8_e4m3fn")]
    assert mode in ("nan", "saturate"), f"torch {torch.__version__}: float8_e4m3fn overflow is {mode}"
    if TORCH_MINOR in TORCH_E4M3FN_OVERFLOW:
        from .oracles import probe_torch_e4m3fn_overflow

        assert probe_torch_e4m3fn_overflow() == TORCH_E4M3FN_OVERFLOW[TORCH_MINOR]


def test_torch_e4m3fn_and_e4m3fnuz_overflow_differently():
    """The asymmetry that matters on gfx942: fnuz casts give NaN (0x80); the OCP cast clamps to +-448 in
    torch 2.13 and gives its own NaN codes (0x7F / 0xFF) in 2.11 — never the fnuz NaN."""
    x = torch.tensor([1000.0, -1000.0, float("inf")])
    ocp = x.to(torch.float8_e4m3fn).view(torch.uint8).tolist()
    want = [0x7E, 0xFE, 0x7E] if OVERFLOW[("torch", "float8_e4m3fn")] == "saturate" else [0x7F, 0xFF, 0x7F]
    assert ocp == want
    assert x.to(torch.float8_e4m3fnuz).view(torch.uint8).tolist() == [0x80, 0x80, 0x80]


def test_nan_codes_differ_between_libraries():
    """NaN payloads are not portable: e5m2 NaN is 0x7E in ml_dtypes, 0x7F in torch (and in our codec)."""
    nan = np.array([np.nan])
    assert ENCODE["ml_dtypes"]("float8_e5m2", nan).tolist() == [0x7E]
    assert ENCODE["torch"]("float8_e5m2", nan).tolist() == [0x7F]
    assert FORMATS["float8_e5m2"].encode(nan).tolist() == [0x7F]


def test_e8m0_zero_and_negative():
    """E8M0 has no zero and no sign. ml_dtypes maps 0 and negatives to NaN; torch drops the sign and maps
    0 to 2**-127; our codec maps 0 to 2**-127 (nearest) and refuses negatives."""
    x = np.array([0.0, -0.0, -4.0])
    assert ENCODE["ml_dtypes"]("float8_e8m0fnu", x).tolist() == [0xFF, 0xFF, 0xFF]
    assert ENCODE["torch"]("float8_e8m0fnu", x).tolist() == [0x00, 0x00, 0x81]
    assert FORMATS["float8_e8m0fnu"].encode([0.0]).tolist() == [0x00]
    with pytest.raises(ValueError, match="unsigned"):
        FORMATS["float8_e8m0fnu"].encode([-4.0])


def test_e8m0_ties_round_up_in_both_libraries():
    """1.5 * 2**k is a tie between 2**k and 2**(k+1); both libraries round it up whatever k's parity."""
    x = np.array([0.75, 1.5, 3.0, 6.0, 12.0])
    want = [0x7F, 0x80, 0x81, 0x82, 0x83]
    assert ENCODE["ml_dtypes"]("float8_e8m0fnu", x).tolist() == want
    assert ENCODE["torch"]("float8_e8m0fnu", x).tolist() == want


def test_ml_dtypes_e2m1_nan_is_not_a_nan():
    """float4_e2m1fn has no NaN: ml_dtypes turns NaN into a zero code (sign from the NaN); our codec
    refuses it, and refuses non-saturating overflow (no inf, no NaN to overflow to)."""
    assert FORMATS["float4_e2m1fn"].decode(ENCODE["ml_dtypes"]("float4_e2m1fn", np.array([np.nan]))) == 0
    with pytest.raises(ValueError, match="NaN"):
        FORMATS["float4_e2m1fn"].encode([np.nan])
    with pytest.raises(OverflowError):
        FORMATS["float4_e2m1fn"].encode([7.0], saturate=False)


def test_torch_float4_has_no_conversion():
    x = torch.tensor([0x21], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    with pytest.raises(RuntimeError):
        x.float()


def test_e8m0_float32_subnormals_round_up_in_both_libraries():
    """Inputs in (2**-127, 2**-126) are float32 subnormals. Both libraries send all of them to 2**-126
    (code 0x01), even 1.2 * 2**-127 whose nearest power of two is 2**-127; at or below 2**-127 they give
    0x00. Our codec rounds to nearest, so the encode comparison skips (2**-127, 1.5 * 2**-127)."""
    x = np.array([2.0**-149, 2.0**-128, 2.0**-127, 1.0001 * 2.0**-127, 1.2 * 2.0**-127, 1.99 * 2.0**-127])
    want = [0x00, 0x00, 0x00, 0x01, 0x01, 0x01]
    assert ENCODE["ml_dtypes"]("float8_e8m0fnu", x).tolist() == want
    assert ENCODE["torch"]("float8_e8m0fnu", x).tolist() == want
    assert FORMATS["float8_e8m0fnu"].encode(x).tolist() == [0x00, 0x00, 0x00, 0x00, 0x00, 0x01]
