"""Scale formats and the scale rules DSV4 uses (spec section 4.2, 4.3).

* fp32 scales: any positive float.
* UE8M0 / ``float8_e8m0fnu``: a power of two stored as the byte ``exponent + 127``; 0xFF is NaN and
  there is no zero.
* DSV4's power-of-two rule: ``s = 2 ** ceil(log2(max(amax, floor) / fmax))``.

The ceil(log2(.)) is computed exactly with frexp, never with a floating log2 (which can round a value
just above a power of two down onto it).
"""

from __future__ import annotations

import numpy as np

E8M0_BIAS = 127
E8M0_NAN = 0xFF


def ceil_log2(v) -> np.ndarray:
    """Exact ceil(log2(v)) for positive finite float64 ``v`` (elementwise)."""
    v = np.asarray(v, dtype=np.float64)
    if (v <= 0).any() or not np.isfinite(v).all():
        raise ValueError("ceil_log2 needs positive finite values")
    m, e = np.frexp(v)  # v = m * 2**e, m in [0.5, 1)
    return np.where(m == 0.5, e - 1, e).astype(np.int64)


def pow2_scale(amax, fmax: float, floor: float) -> np.ndarray:
    """DSV4's power-of-two scale ``2 ** ceil(log2(max(amax, floor) / fmax))`` as float64."""
    a = np.maximum(np.asarray(amax, dtype=np.float64), floor)
    return np.ldexp(1.0, ceil_log2(a / fmax))


def fp32_scale(amax, fmax: float, floor: float) -> np.ndarray:
    """Exact-amax scale ``max(amax, floor) / fmax`` rounded once to fp32 (vLLM on SM90 / gfx942)."""
    a = np.maximum(np.asarray(amax, dtype=np.float64), floor)
    return (a / fmax).astype(np.float32).astype(np.float64)


def e8m0_encode(scale) -> np.ndarray:
    """Power-of-two scale -> UE8M0 byte (exponent + 127). Refuses anything that is not 2**k."""
    s = np.asarray(scale, dtype=np.float64)
    m, e = np.frexp(s)
    if (s <= 0).any() or not np.isfinite(s).all() or (m != 0.5).any():
        bad = s[(s <= 0) | ~np.isfinite(s) | (m != 0.5)].ravel()[:4]
        raise ValueError(f"UE8M0 holds only powers of two; got {bad.tolist()}")
    byte = (e - 1) + E8M0_BIAS
    if (byte < 0).any() or (byte > 254).any():
        raise ValueError("scale exponent outside the UE8M0 range [-127, 127]")
    return byte.astype(np.uint8)


def e8m0_decode(byte) -> np.ndarray:
    """UE8M0 byte -> float64 scale (0xFF -> NaN)."""
    b = np.asarray(byte, dtype=np.int64)
    out = np.ldexp(1.0, b - E8M0_BIAS)
    return np.where(b == E8M0_NAN, np.nan, out)


def e8m0_double(byte) -> np.ndarray:
    """Multiply a UE8M0 scale by 2: exponent byte + 1 (the OCP -> fnuz weight conversion)."""
    b = np.asarray(byte, dtype=np.int64)
    if (b >= 254).any():
        raise OverflowError("UE8M0 scale 2**127 cannot be doubled")
    return (b + 1).astype(np.uint8)
