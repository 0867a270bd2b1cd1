"""The two libraries our bit-layout codecs are checked against: ml_dtypes and torch.

Each oracle is a decode table (value of every code) or an encode function (float32 inputs -> codes).
What each library does where formats leave room (overflow, NaN payload, e8m0 zero and subnormals) is
probed, not assumed, and recorded per library release in tests/quirks.py; test_oracle_behaviour.py checks
the record on every run, so a library upgrade that changes behaviour fails there (recorded release) or is
reported as drift (unrecorded release) instead of failing somewhere downstream.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from references.formats.minifloat import FORMATS
from references.formats.verify import Capabilities

from ..quirks import OVERFLOW_FORMATS, encode, overflow_mode

NAMES = tuple(
    FORMATS
)  # float8_e4m3fn, float8_e4m3fnuz, float8_e5m2, float8_e5m2fnuz, float8_e8m0fnu, float4_e2m1fn

ML_DTYPES = {n: getattr(ml_dtypes, n) for n in NAMES}
# torch has no unpacked fp4 dtype; float4_e2m1fn_x2 exists but cannot be converted to float (probed)
TORCH = {n: getattr(torch, n) for n in NAMES if n != "float4_e2m1fn"}

# What a plain cast does with a finite value past the overflow boundary and with +-inf, as the installed
# library does it ("nan" -> the format's NaN, "inf" -> +-inf, "saturate" -> +-max): probed, and recorded per
# library release in tests/quirks.py (test_oracle_behaviour.py asserts the record or reports an unrecorded
# release). torch's float8_e4m3fn cast gives NaN in 2.11 and clamps in 2.13.
OVERFLOW = {(lib, name): overflow_mode(lib, name) for lib, names in OVERFLOW_FORMATS.items() for name in names}
ORACLES = tuple(sorted(OVERFLOW))  # (library, format) pairs with an encode oracle


def decode_ml_dtypes(name: str) -> np.ndarray:
    n = 1 << FORMATS[name].bits
    return np.arange(n, dtype=np.uint8).view(ML_DTYPES[name]).astype(np.float64)


def decode_torch(name: str) -> np.ndarray:
    n = 1 << FORMATS[name].bits
    return torch.arange(n, dtype=torch.uint8).view(TORCH[name]).to(torch.float32).double().numpy()


def encode_ml_dtypes(name: str, x) -> np.ndarray:
    return encode("ml_dtypes", name, x)


def encode_torch(name: str, x) -> np.ndarray:
    return encode("torch", name, x)


DECODE = {"ml_dtypes": decode_ml_dtypes, "torch": decode_torch}
ENCODE = {"ml_dtypes": encode_ml_dtypes, "torch": encode_torch}


def finfo_capabilities(name: str) -> Capabilities:
    """Capabilities from ml_dtypes: numbers from ``finfo``, inf / NaN / -0 from casting probes."""
    fi = ml_dtypes.finfo(ML_DTYPES[name])

    def back(v):
        return np.array([v], np.float32).astype(ML_DTYPES[name]).astype(np.float64)[0]

    neg0 = back(-0.0)
    return Capabilities(
        bits=int(fi.bits),
        has_inf=bool(np.isinf(back(np.inf))),
        has_nan=bool(np.isnan(back(np.nan))),
        has_negative_zero=bool(neg0 == 0 and np.signbit(neg0)),
        max=float(fi.max),
        smallest_normal=float(fi.smallest_normal),
        smallest_subnormal=float(fi.smallest_subnormal),
        eps=float(fi.eps),
    )
