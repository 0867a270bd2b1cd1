"""Tolerances derived from the formats' unit roundoff and the reduction length, and verdict tiers.

Every bound carries its derivation (a sentence the report prints next to the number). Overrides are
joined with ``max`` (``Tolerance.join``), never silently replaced, and an explicit zero stays zero.

Unit roundoff u of a format with m stored mantissa bits under round-to-nearest is 2**-(m+1):
fp64 2**-53, fp32 2**-24, bf16 2**-8, fp16 2**-11, e4m3 2**-4, e5m2 2**-3, e2m1 2**-2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "bfloat16": 2.0**-8,
    "float16": 2.0**-11,
    "float8_e4m3fn": 2.0**-4,
    "float8_e4m3fnuz": 2.0**-4,
    "float8_e5m2": 2.0**-3,
    "float8_e5m2fnuz": 2.0**-3,
    "float4_e2m1fn": 2.0**-2,
}


def unit_roundoff(dtype) -> float:
    name = str(dtype).replace("torch.", "")
    try:
        return UNIT_ROUNDOFF[name]
    except KeyError:
        raise KeyError(f"no unit roundoff for {name!r}; known: {sorted(UNIT_ROUNDOFF)}") from None


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): worst-case relative error of an n-term recursive sum/dot."""
    nu = n * u
    if nu >= 1:
        return math.inf
    return nu / (1 - nu)


def gamma_prob(n: int, u: float, lam: float = 6.0) -> float:
    """Probabilistic bound lam * sqrt(n) * u (Higham & Mary 2019): holds with probability at least
    1 - 2 exp(-lam^2 / 2) ~ 1 - 3e-8 for lam = 6 under independent rounding errors; far tighter than
    gamma_n for long reductions and still derived from u and n only."""
    return lam * math.sqrt(n) * u


@dataclass(frozen=True)
class Tolerance:
    """|got - want| <= atol + rtol * scale, elementwise, where scale is |want| or a supplied magnitude
    (e.g. sum |a_i b_i| of a dot product). ``derivation`` says where each number comes from."""

    atol: float
    rtol: float
    derivation: str
    degraded_factor: float = 4.0       # errors up to this multiple of the bound on few elements: degraded
    degraded_share: float = 1e-3       # ... on at most this share of elements
    # quadrature rounding model (conformance.rms, docs/rms-limits.md): the expected sum of squared errors is
    # ms_rel * sum m^2 + ms_scale * sum scale^2 (m = |want| or the magnitude the comparison passes); nan = not
    # declared (the family fallback then applies); flip_ulp > 0: the errors are RNE disagreements of one
    # output ulp (flip_ulp relative to m), counted as Poisson events for the finite-sample allowance
    ms_rel: float = math.nan
    ms_scale: float = math.nan
    flip_ulp: float = 0.0
    ms_derivation: str = ""
    # + ms_excess * sum (scale - |want|)^2: the random-sum part of a ``lambda Q + |y|`` scale (conformance.rms)
    ms_excess: float = 0.0

    def join(self, other: Tolerance, reason: str) -> Tolerance:
        def mx(a, b):   # an undeclared (nan) model on either side leaves the joined model undeclared
            return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)
        return Tolerance(max(self.atol, other.atol), max(self.rtol, other.rtol),
                         f"{self.derivation}; joined with max: {other.derivation} ({reason})",
                         max(self.degraded_factor, other.degraded_factor),
                         max(self.degraded_share, other.degraded_share),
                         mx(self.ms_rel, other.ms_rel), mx(self.ms_scale, other.ms_scale),
                         max(self.flip_ulp, other.flip_ulp),
                         "; ".join(d for d in (self.ms_derivation, other.ms_derivation) if d),
                         max(self.ms_excess, other.ms_excess))

    def with_rms(self, *, ms_rel: float = 0.0, ms_scale: float = 0.0, flip_ulp: float = 0.0,
                 derivation: str, ms_excess: float = 0.0) -> Tolerance:
        """The same elementwise bound with a declared quadrature rounding model (``conformance.rms``)."""
        from dataclasses import replace
        return replace(self, ms_rel=ms_rel, ms_scale=ms_scale, flip_ulp=flip_ulp, ms_derivation=derivation,
                       ms_excess=ms_excess)

    def bound(self, scale: torch.Tensor) -> torch.Tensor:
        return self.atol + self.rtol * scale.abs()


EXACT = Tolerance(0.0, 0.0, "exact: integer / byte / index outputs must match bit for bit")


def dot_tolerance(n: int, compute_dtype="float32", out_dtype=None, *, prob=True, extra_u: float = 0.0,
                  what: str = "dot product") -> Tolerance:
    """Bound for outputs that are length-n reductions computed in ``compute_dtype`` and stored in
    ``out_dtype``, relative to the magnitude sum |a_i b_i| passed as scale (or |want| as fallback).

    rtol = g(n, u_compute) + u_out + extra_u, where g is the probabilistic sqrt(n) bound (or gamma_n).
    """
    u = unit_roundoff(compute_dtype)
    g = gamma_prob(n, u) if prob else gamma(n, u)
    u_out = unit_roundoff(out_dtype) if out_dtype is not None else 0.0
    rtol = g + u_out + extra_u
    how = f"6*sqrt({n})*u" if prob else f"gamma_{n}"
    return Tolerance(0.0, rtol, f"{what}: {how} with u={compute_dtype} ({u:.3g})"
                     + (f" + storage rounding u={out_dtype} ({u_out:.3g})" if out_dtype else "")
                     + (f" + {extra_u:.3g} from quantised inputs" if extra_u else "")
                     + f" = {rtol:.3g} relative to sum|a*b|")


def elementwise_tolerance(ops: int, compute_dtype="float32", out_dtype=None, what="elementwise") -> Tolerance:
    """``ops`` roundings in ``compute_dtype`` then one in ``out_dtype``: rtol = ops*u + u_out."""
    u = unit_roundoff(compute_dtype)
    u_out = unit_roundoff(out_dtype) if out_dtype is not None else 0.0
    rtol = ops * u + u_out
    return Tolerance(0.0, rtol, f"{what}: {ops} roundings at u={compute_dtype} ({u:.3g})"
                     + (f" + output rounding u={out_dtype} ({u_out:.3g})" if out_dtype else "")
                     + f" = {rtol:.3g} relative")


@dataclass
class Verdict:
    tier: str
    violations: int
    total: int
    worst_ratio: float               # max over elements of err / bound (inf where bound is 0)
    reasons: list = field(default_factory=list)


def verdict_from_errors(err: torch.Tensor, bound: torch.Tensor, want: torch.Tensor, got: torch.Tensor,
                        tol: Tolerance) -> Verdict:
    """Tiers: pass (every element within bound), degraded (violations on at most degraded_share of
    elements and none beyond degraded_factor x bound), fail, catastrophic (NaN/Inf where the reference
    is finite, or an error larger than half the reference's largest magnitude)."""
    total = err.numel()
    reasons = []
    finite_want = torch.isfinite(want)
    nonfinite_got = ~torch.isfinite(got) & finite_want
    ref_mag = want[finite_want].abs().max().item() if finite_want.any() else 0.0
    if nonfinite_got.any():
        reasons.append(f"{int(nonfinite_got.sum())} NaN/Inf where the reference is finite")
    e = torch.where(nonfinite_got, torch.full_like(err, math.inf), err)
    over = e > bound
    n_over = int(over.sum())
    with torch.no_grad():
        ratio = torch.where(bound > 0, e / bound.clamp_min(1e-300), torch.where(e > 0, math.inf, 0.0))
    worst_ratio = float(ratio.max()) if total else 0.0
    max_err = float(e.max()) if total else 0.0
    if reasons or (ref_mag > 0 and max_err > 0.5 * ref_mag):
        if not reasons:
            reasons.append(f"max error {max_err:.4g} exceeds half the reference magnitude {ref_mag:.4g}")
        return Verdict("catastrophic", n_over, total, worst_ratio, reasons)
    if n_over == 0:
        return Verdict("pass", 0, total, worst_ratio)
    if n_over <= max(1, int(tol.degraded_share * total)) and worst_ratio <= tol.degraded_factor:
        return Verdict("degraded", n_over, total, worst_ratio,
                       [f"{n_over} element(s) beyond the bound, at most {worst_ratio:.3g}x"])
    return Verdict("fail", n_over, total, worst_ratio)
