"""The two libraries our bit-layout codecs are checked against: ml_dtypes and torch.

Each oracle is a decode table (value of every code) or an encode function (float32 inputs -> codes).
What each library does where formats leave room (overflow, NaN payload, e8m0 zero) was probed, not
assumed; ``OVERFLOW`` records it and test_oracle_behaviour.py re-probes it on every run, so a library
upgrade that changes behaviour fails there with a clear message instead of somewhere downstream.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from references.formats.minifloat import FORMATS
from references.formats.verify import Capabilities

NAMES = tuple(
    FORMATS
)  # float8_e4m3fn, float8_e4m3fnuz, float8_e5m2, float8_e5m2fnuz, float8_e8m0fnu, float4_e2m1fn

ML_DTYPES = {n: getattr(ml_dtypes, n) for n in NAMES}
# torch has no unpacked fp4 dtype; float4_e2m1fn_x2 exists but cannot be converted to float (probed)
TORCH = {n: getattr(torch, n) for n in NAMES if n != "float4_e2m1fn"}

# What a plain cast does with a finite value past the overflow boundary and with +-inf (probed with
# torch 2.13 and ml_dtypes 0.6):
#   "nan"      -> the format's NaN
#   "inf"      -> +-inf
#   "saturate" -> +-max   (torch 2.13's float8_e4m3fn cast clamps, even +-inf; ml_dtypes' e2m1 has no NaN)
# torch's float8_e4m3fn cast changed between versions: NaN on overflow in 2.11 (probed: 2.11.0+cu130, CPU
# tensors, on the lent H100 machine), clamping in 2.13 (2.13.0+cpu). Other versions are not recorded: for
# them the mode is probed once here, and test_oracle_behaviour.py says so.
TORCH_E4M3FN_OVERFLOW = {(2, 11): "nan", (2, 13): "saturate"}
TORCH_MINOR = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def probe_torch_e4m3fn_overflow() -> str:
    x = torch.tensor([1000.0, -1000.0, float("inf"), float("-inf")])
    codes = set(x.to(torch.float8_e4m3fn).view(torch.uint8).tolist())
    return {frozenset({0x7E, 0xFE}): "saturate", frozenset({0x7F, 0xFF}): "nan"}.get(frozenset(codes),
                                                                                    f"mixed {sorted(codes)}")


OVERFLOW = {
    ("ml_dtypes", "float8_e4m3fn"): "nan",
    ("ml_dtypes", "float8_e4m3fnuz"): "nan",
    ("ml_dtypes", "float8_e5m2"): "inf",
    ("ml_dtypes", "float8_e5m2fnuz"): "nan",
    ("ml_dtypes", "float8_e8m0fnu"): "nan",
    ("ml_dtypes", "float4_e2m1fn"): "saturate",
    ("torch", "float8_e4m3fn"): TORCH_E4M3FN_OVERFLOW.get(TORCH_MINOR) or probe_torch_e4m3fn_overflow(),
    ("torch", "float8_e4m3fnuz"): "nan",
    ("torch", "float8_e5m2"): "inf",
    ("torch", "float8_e5m2fnuz"): "nan",
    ("torch", "float8_e8m0fnu"): "nan",
}
ORACLES = tuple(sorted(OVERFLOW))  # (library, format) pairs with an encode oracle


def decode_ml_dtypes(name: str) -> np.ndarray:
    n = 1 << FORMATS[name].bits
    return np.arange(n, dtype=np.uint8).view(ML_DTYPES[name]).astype(np.float64)


def decode_torch(name: str) -> np.ndarray:
    n = 1 << FORMATS[name].bits
    return torch.arange(n, dtype=torch.uint8).view(TORCH[name]).to(torch.float32).double().numpy()


def _f32(x) -> np.ndarray:
    with np.errstate(over="ignore"):  # float64 -> float32 overflow to inf is intended in overflow probes
        return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def encode_ml_dtypes(name: str, x) -> np.ndarray:
    return _f32(x).astype(ML_DTYPES[name]).view(np.uint8)


def encode_torch(name: str, x) -> np.ndarray:
    return torch.from_numpy(_f32(x)).to(TORCH[name]).view(torch.uint8).numpy()


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
