"""Scale conversion checks and scale provenance.

Loading an OCP checkpoint for a fnuz device doubles every block scale (the fnuz reading of a byte is half
the OCP reading). Correct: fp32 scale x 2, or e8m0 exponent byte + 1. The failure modes named here:
  byte*2        the e8m0 *byte* multiplied by 2 (as an integer or as a float): 2**e becomes 2**(2e+127)
  applied twice fp32 x 4 / byte + 2 (the conversion ran in the loader and again in the layer)
  not applied   scales unchanged while the bytes were reinterpreted as fnuz (x0.5 downstream)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from references.formats.scales import e8m0_decode

CONVERSIONS = ("exponent+1", "x2", "not applied", "byte*2", "applied twice", "other")


@dataclass
class ScaleCheck:
    conversion: str  # one of CONVERSIONS
    scale_fmt: str
    expected: str  # "double" | "none"
    ok: bool
    message: str
    factor_log2: float | None = None  # median log2(after / before) of the decoded scales
    worst: dict = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ScaleProvenance:
    """Where a scale came from, carried into the report next to the edge it belongs to."""

    edge: str
    scale_fmt: str  # ue8m0 | fp32
    rule: str  # pow2 | fp32 (amax / fmax)
    computed_for: str  # dialect the scale was computed for (float8_e4m3fn for checkpoints)
    converted: str  # "no" | conversion name from check_scale_conversion
    fmax: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _arr(x):
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)


def check_scale_conversion(before_scales, after_scales, fmt: str, *, expected: str = "double") -> ScaleCheck:
    """Classify how ``after`` was derived from ``before`` (fmt: "ue8m0" bytes or "fp32" values)."""
    b, a = _arr(before_scales), _arr(after_scales)
    if b.shape != a.shape:
        raise ValueError(f"scale shapes differ: before {b.shape}, after {a.shape}")
    if fmt == "ue8m0":
        bi, ai = b.astype(np.int64), a.astype(np.int64)
        rel = ai - bi
        bv, av = e8m0_decode(bi), e8m0_decode(ai)
        if np.all(rel == 1):
            conv = "exponent+1"
        elif np.all(rel == 0):
            conv = "not applied"
        elif np.all(rel == 2):
            conv = "applied twice"
        elif np.all(ai == (2 * bi) % 256) or np.all(ai == np.minimum(2 * bi, 255)):
            conv = "byte*2"
        else:
            conv = "other"
    elif fmt == "fp32":
        bv, av = b.astype(np.float64), a.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = av / bv
        conv = (
            "x2"
            if np.all(q == 2)
            else "not applied"
            if np.all(q == 1)
            else "applied twice"
            if np.all(q == 4)
            else "other"
        )
    else:
        raise ValueError(f"unknown scale format {fmt!r}")
    with np.errstate(divide="ignore", invalid="ignore"):
        lg = np.log2(av / bv)
    fin = lg[np.isfinite(lg)]
    med = float(np.median(fin)) if fin.size else None
    good = {"double": ("exponent+1", "x2"), "none": ("not applied",)}[expected]
    ok = conv in good
    dev = np.abs(np.where(np.isfinite(lg), lg, np.inf) - (1.0 if expected == "double" else 0.0))
    wi = np.unravel_index(int(np.argmax(dev)), dev.shape) if dev.size else ()
    worst = (
        dict(
            index=[int(i) for i in wi],
            before=float(b[wi]),
            after=float(a[wi]),
            before_value=float(bv[wi]),
            after_value=float(av[wi]),
        )
        if dev.size
        else {}
    )
    what = {
        "exponent+1": "e8m0 exponent byte + 1 (x2)",
        "x2": "fp32 scale x 2",
        "not applied": "scales unchanged",
        "applied twice": "x2 applied twice (x4)",
        "byte*2": "e8m0 byte multiplied by 2 as a number instead of exponent + 1",
        "other": "no known rule",
    }[conv]
    msg = (
        f"scale conversion ({fmt}): {what}"
        + (
            f"; worst block {worst['index']}: {worst['before']:g} -> {worst['after']:g}"
            f" (scale {worst['before_value']:g} -> {worst['after_value']:g})"
            if worst
            else ""
        )
        + ("" if ok else f"; expected {' or '.join(good)}")
    )
    return ScaleCheck(conv, fmt, expected, ok, msg, med, worst)


__all__ = ["ScaleCheck", "ScaleProvenance", "check_scale_conversion", "CONVERSIONS"]
