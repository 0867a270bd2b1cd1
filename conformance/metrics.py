"""Error metrics and comparisons, structure first, then values (the message contract of STYLE.md).

Every comparison returns a ``Comparison`` with the measured metrics, the bound, the worst element (index,
got, want), a verdict tier and a message naming component, case and output. Nothing stops at the first
violation: counts cover every element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from references.formats.minifloat import get_format

from .rms import rms_judgement
from .tolerances import EXACT, Tolerance, unit_roundoff, verdict_from_errors

VERDICT_TIER_RANK = {"pass": 0, "degraded": 1, "fail": 2, "catastrophic": 3}


@dataclass
class Comparison:
    output: str
    verdict: str
    metrics: dict = field(default_factory=dict)
    bounds: dict = field(default_factory=dict)
    derivation: dict = field(default_factory=dict)
    worst: dict = field(default_factory=dict)
    message: str = ""
    histogram: list = field(default_factory=list)   # (log10 err/bound bin edge, count)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's global similarity metric 1 - 2 sum(xy) / sum(x^2 + y^2), in fp64 (0 = identical)."""
    x, y = x.double().flatten(), y.double().flatten()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    n = x.norm() * y.norm()
    return float((x @ y) / n) if n > 0 else (1.0 if x.norm() == y.norm() else 0.0)


def rel_fro(got: torch.Tensor, want: torch.Tensor) -> float:
    w = want.double()
    n = w.norm()
    d = (got.double() - w).norm()
    return float(d / n) if n > 0 else float(d)


def _histogram(ratio: torch.Tensor) -> list:
    r = ratio[torch.isfinite(ratio) & (ratio > 0)].double()
    if r.numel() == 0:
        return []
    edges = torch.arange(-6, 3, 0.5, dtype=torch.float64)
    lg = torch.log10(r).clamp(edges[0].item(), edges[-1].item())
    counts = torch.histc(lg, bins=len(edges) - 1, min=edges[0].item(), max=edges[-1].item())
    return [(float(e), int(c)) for e, c in zip(edges[:-1], counts)]


# Systematic-error detector (issue #16): an error that keeps one sign or one gain across an output is no rounding
# error, whatever its size. Round-to-nearest is unbiased, so the least-squares gain of got on want deviates from
# 1, and the mean signed error from 0, only by chance. Roundings are not independent element by element: a row
# shares its normalisation factor, softmax denominator or scale, rounded once, and a token's rows can share more
# (Sinkhorn's column sums couple a token's 4 x 4 matrix). So the standard errors (SE) are cluster-robust with the
# leading dim (tokens) as clusters; each token's shared roundings then count once. A deviation is systematic when
# it exceeds BOTH Z_SYSTEMATIC SE (not chance: 4 sigma, p ~ 6e-5) and FLOOR_SYSTEMATIC unit roundoffs u of the
# level's format (large enough to matter: half a rounding unit; one row's shared scalar may be off by up to u).
# Fewer than MIN_CLUSTERS clusters: not judged (the SE is then unreliable).
# Levels judged (SYSTEMATIC_LEVELS): fp32 and emulated, where both sides compute the same roundings. Measured, not
# judged: the serving level, where the subject meets the unquantised golden and FP8 noise has genuine second-order
# effects of the size of a bf16 unit (noisy scores flatten a softmax: E[softmax(s + e)] shrinks the output by
# O(u_e4m3^2) = O(2^-8)); and the fp64 level (the fp32 golden against fp64), where each chained fp32 step rounds
# shared scalars (Sinkhorn's 20 normalisations) so the golden carries gains up to about ops * u32 by design, which
# its elementwise bound (ops * u32) already allows.
Z_SYSTEMATIC = 4.0
FLOOR_SYSTEMATIC = 0.5
MIN_CLUSTERS = 16
SYSTEMATIC_LEVELS = ("fp32", "emulated")


def _pow2(x: float) -> str:
    return f"{'+' if x > 0 else '-'}2^{math.log2(abs(x)):.1f}" if x else "0"


def systematic_error(g: torch.Tensor, w: torch.Tensor, u: float) -> dict | None:
    """Least-squares gain of ``g`` on ``w`` and the mean signed error, each with its cluster-robust standard error
    (the leading dim's entries are the clusters; a 1-D output's elements are) and its allowed deviation (module
    comment); None when fewer than MIN_CLUSTERS clusters have a finite, non-zero reference. fp64."""
    g2 = g.double().reshape(g.shape[0], -1) if g.ndim >= 2 else g.double().reshape(-1, 1)
    w2 = w.double().reshape(w.shape[0], -1) if w.ndim >= 2 else w.double().reshape(-1, 1)
    ok = torch.isfinite(g2) & torch.isfinite(w2)
    g2, w2 = torch.where(ok, g2, 0.0), torch.where(ok, w2, 0.0)
    keep = (w2 * w2).sum(-1) > 0
    g2, w2, ok = g2[keep], w2[keep], ok[keep]
    R, n = g2.shape[0], int(ok.sum())
    if R < MIN_CLUSTERS:
        return None
    sww = float((w2 * w2).sum())
    gain = float((g2 * w2).sum()) / sww
    resid = torch.where(ok, g2 - gain * w2, 0.0)
    se_gain = math.sqrt(float(((w2 * resid).sum(-1) ** 2).sum())) / sww
    d = torch.where(ok, g2 - w2, 0.0)
    mean = float(d.sum()) / n
    se_mean = math.sqrt(float((torch.where(ok, d - mean, 0.0).sum(-1) ** 2).sum())) / n
    mag = float(w2.abs().sum()) / n
    return {
        "gain_dev": gain - 1.0, "gain_se": se_gain,
        "gain_allowed": max(Z_SYSTEMATIC * se_gain, FLOOR_SYSTEMATIC * u),
        "mean_err": mean, "mean_err_se": se_mean,
        "mean_allowed": max(Z_SYSTEMATIC * se_mean, FLOOR_SYSTEMATIC * u * mag),
        "n": n, "clusters": R, "u": u,
    }


def systematic_verdict(st: dict | None, output: str) -> str | None:
    """A diagnosis sentence when the gain or the mean error is systematic, else None."""
    if st is None:
        return None
    why = []
    if abs(st["gain_dev"]) > st["gain_allowed"]:
        why.append(f"systematic gain {_pow2(st['gain_dev'])} (gain {1 + st['gain_dev']:.6g}, SE {st['gain_se']:.2g}; "
                   f"allowed |gain-1| {st['gain_allowed']:.2g} = max({Z_SYSTEMATIC:g} SE, {FLOOR_SYSTEMATIC:g} u)) "
                   f"on {output}")
    if abs(st["mean_err"]) > st["mean_allowed"]:
        why.append(f"systematic offset: mean signed error {st['mean_err']:.3g} (SE {st['mean_err_se']:.2g}; allowed "
                   f"{st['mean_allowed']:.2g} = max({Z_SYSTEMATIC:g} SE, {FLOOR_SYSTEMATIC:g} u mean|want|)) on "
                   f"{output}")
    return "; ".join(why) or None


def structure_mismatch(got, want, output: str) -> str | None:
    if not isinstance(got, torch.Tensor):
        return f"{output}: expected a tensor, got {type(got).__name__}"
    if tuple(got.shape) != tuple(want.shape):
        return f"{output}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    return None


def compare_float(got: torch.Tensor, want: torch.Tensor, tol: Tolerance, *, output: str,
                  scale: torch.Tensor | None = None, label: str = "", ulp_dtype=None,
                  level: str = "", rms_magnitude: torch.Tensor | None = None) -> Comparison:
    """Elementwise comparison against ``tol`` (bound = atol + rtol * |scale or want|), and, with ``ulp_dtype``,
    the systematic-error statistics (judged at the SYSTEMATIC_LEVELS, measured elsewhere), and the derived
    RMS-error (calc_diff) limit of ``conformance.rms`` (judged at its RMS_LEVELS; ``rms_magnitude``: the
    magnitude the tolerance's quadrature model is relative to, default |want|)."""
    bad = structure_mismatch(got, want, output)
    if bad:
        return Comparison(output, "fail", message=f"{label} {bad}")
    g = got.detach().cpu().double()
    w = want.detach().cpu().double()
    s = (scale.detach().cpu().double() if scale is not None else w).expand_as(w)
    err = (g - w).abs()
    err = torch.where(torch.isnan(err) & torch.isnan(w) & torch.isnan(g), torch.zeros_like(err), err)
    bound = tol.bound(s)
    v = verdict_from_errors(err, bound, w, g, tol)
    e_for_max = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)
    flat = int(torch.argmax(e_for_max)) if err.numel() else 0
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), w.shape)) if err.numel() else ()
    rel = err / w.abs().clamp_min(1e-30)
    metrics = {
        "max_abs": float(e_for_max.max()) if err.numel() else 0.0,
        "max_rel": float(rel[torch.isfinite(rel)].max()) if torch.isfinite(rel).any() else 0.0,
        "worst_over_bound": v.worst_ratio,
        "rel_fro": rel_fro(g, w),
        "calc_diff": calc_diff(g, w),
        "cosine": cosine(g, w),
        "violations": v.violations,
        "elements": v.total,
    }
    bounds = {"worst_over_bound": 1.0, "violations": 0}
    systematic = None
    st = None
    if ulp_dtype is not None:
        # error in units of the target format's rounding at the bound's magnitude scale (one ulp = 2u x)
        metrics["ulp_max"] = float((err / (2 * unit_roundoff(ulp_dtype) * s.abs().clamp_min(1e-300))).max()) \
            if err.numel() else 0.0
        st = systematic_error(g, w, unit_roundoff(ulp_dtype))
        if st is not None:
            judged = level in SYSTEMATIC_LEVELS
            metrics.update(bias_gain_dev=abs(st["gain_dev"]), bias_gain_se=st["gain_se"],
                           bias_mean_err=abs(st["mean_err"]), bias_mean_err_se=st["mean_err_se"])
            if judged:
                bounds.update(bias_gain_dev=st["gain_allowed"], bias_mean_err=st["mean_allowed"])
                systematic = systematic_verdict(st, output)
    rj = rms_judgement(g, w, s, tol, level=level,
                       magnitude=rms_magnitude.detach().cpu().double() if rms_magnitude is not None else None)
    rms_fail = None
    if "rms_vs_model" in rj:
        metrics["rms_vs_model"] = rj["rms_vs_model"]
        if rj["judged"]:
            bounds["calc_diff"] = rj["calc_diff_limit"]
            if rj["sse"] > rj["limit"]:
                gain = f"; least-squares gain-1 {st['gain_dev']:+.2g}" if st is not None else ""
                rms_fail = (f"calc_diff {rj['calc_diff']:.3g} > limit {rj['calc_diff_limit']:.3g} (RMS error "
                            f"{rj['rms_vs_model']:.3g}x the rounding model's, allowed "
                            f"{math.sqrt(rj['limit'] / rj['expected']):.3g}x; cosine {metrics['cosine']:.6g}, "
                            f"bound >= {rj['cosine_min']:.6g}{gain}) on {output}")
    worst = {"index": list(idx), "got": float(g[idx]) if idx else float("nan"),
             "want": float(w[idx]) if idx else float("nan"),
             "bound": float(bound[idx]) if idx else float("nan")}
    body = (f"{v.violations} / {v.total} "
            f"({100.0 * v.violations / max(v.total, 1):.3g}%) beyond bound; worst at {list(idx)}: "
            f"got {worst['got']:.8g} want {worst['want']:.8g} |err| {metrics['max_abs']:.3g} "
            f"allowed {worst['bound']:.3g} ({v.worst_ratio:.3g}x bound); bound: {tol.derivation}")
    if v.reasons:
        body += "; " + "; ".join(v.reasons)
    if not rj.get("judged") and rj.get("reason", "").startswith("not judged"):
        body += f"; RMS limit {rj['reason']}"
    systematic = "; ".join(x for x in (systematic, rms_fail) if x) or None
    tier = v.tier
    if systematic and VERDICT_TIER_RANK[tier] < VERDICT_TIER_RANK["fail"]:
        # within every elementwise bound or not, a consistent bias is a failure of its own, diagnosed first
        tier = "fail"
        msg = f"{label} {output}: fail; {systematic}; elementwise: {v.tier}, {body}"
    else:
        msg = f"{label} {output}: {tier}; {body}" + (f"; {systematic}" if systematic else "")
    ratio = err / bound.clamp_min(1e-300)
    derivation = {"tolerance": tol.derivation}
    if "bias_gain_dev" in bounds:
        derivation["systematic"] = (f"|gain-1| and |mean error| within max({Z_SYSTEMATIC:g} cluster-robust "
                                    f"standard errors (rows as clusters), {FLOOR_SYSTEMATIC:g} u) with u = "
                                    f"{ulp_dtype} unit roundoff: round-to-nearest is unbiased")
    derivation["rms"] = rj.get("derivation") or rj.get("reason", "")
    return Comparison(output, tier, metrics, bounds, derivation, worst, msg.strip(), _histogram(ratio))


def compare_exact(got: torch.Tensor, want: torch.Tensor, *, output: str, label: str = "",
                  fp8_format: str | None = None) -> Comparison:
    """Bit-for-bit comparison (indices, codes, bytes). For FP8 bytes the worst element is decoded with
    sign / exponent / mantissa in the expected format and in the other e4m3 dialect."""
    bad = structure_mismatch(got, want, output)
    if bad:
        return Comparison(output, "fail", message=f"{label} {bad}")
    g, w = got.detach().cpu(), want.detach().cpu()
    neq = g != w
    if g.is_floating_point():
        neq &= ~(torch.isnan(g) & torch.isnan(w))
    n = int(neq.sum())
    metrics = {"mismatches": n, "elements": w.numel()}
    if n == 0:
        return Comparison(output, "pass", metrics, {"mismatches": 0}, {"tolerance": EXACT.derivation},
                          message=f"{label} {output}: exact match")
    flat = int(torch.nonzero(neq.flatten())[0])
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), w.shape))
    worst = {"index": list(idx), "got": g[idx].item(), "want": w[idx].item()}
    msg = (f"{label} {output}: {n} / {w.numel()} elements differ; first at {list(idx)}: "
           f"got {worst['got']} want {worst['want']}")
    if fp8_format:
        f = get_format(fp8_format)
        other = get_format("float8_e4m3fnuz" if f.name == "float8_e4m3fn" else "float8_e4m3fn")
        worst["got_decoded"] = f.describe(int(worst["got"]))
        worst["want_decoded"] = f.describe(int(worst["want"]))
        worst["got_as_other_dialect"] = other.describe(int(worst["got"]))
        msg += f"; got {worst['got_decoded']} [{worst['got_as_other_dialect']}], want {worst['want_decoded']}"
    return Comparison(output, "fail", metrics, {"mismatches": 0}, {"tolerance": EXACT.derivation}, worst, msg)


def topk_overlap(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per row |got ∩ want| / |want| of index sets (-1 entries ignored)."""
    out = []
    for a, b in zip(got.tolist(), want.tolist()):
        sa, sb = {i for i in a if i >= 0}, {i for i in b if i >= 0}
        out.append(len(sa & sb) / len(sb) if sb else float(not sa))
    return torch.tensor(out, dtype=torch.float64)


def compare_index_sets(got: torch.Tensor, want: torch.Tensor, *, output: str, label: str = "",
                       scores: torch.Tensor | None = None, tie_window: float = 0.0) -> Comparison:
    """Set equality per row (order ignored). Differences whose scores lie within ``tie_window`` of the
    k-th selected score are near-ties: reported, not failed."""
    bad = structure_mismatch(got, want, output)
    if bad:
        return Comparison(output, "fail", message=f"{label} {bad}")
    rows_bad, ties, first = 0, 0, None
    for r, (a, b) in enumerate(zip(got.tolist(), want.tolist())):
        sa, sb = {i for i in a if i >= 0}, {i for i in b if i >= 0}
        if sa == sb:
            continue
        diff = (sa - sb) | (sb - sa)
        if scores is not None and tie_window > 0 and sb and all(i >= 0 for i in diff):
            kth = min(scores[r, i].item() for i in sb)
            if all(abs(scores[r, i].item() - kth) <= tie_window for i in diff) and len(sa) == len(sb):
                ties += 1
                continue
        rows_bad += 1
        if first is None:
            first = (r, sorted(sa - sb), sorted(sb - sa))
    ov = topk_overlap(got, want)
    metrics = {"rows_differing": rows_bad, "near_tie_rows": ties, "rows": got.shape[0],
               "min_overlap": float(ov.min()) if ov.numel() else 1.0}
    if rows_bad == 0:
        return Comparison(output, "pass", metrics, {"rows_differing": 0}, {"tolerance": "exact set equality; "
                          f"differences within {tie_window:.3g} of the k-th score are near-ties"},
                          message=f"{label} {output}: sets equal ({ties} near-tie rows)")
    r, extra, missing = first
    msg = (f"{label} {output}: {rows_bad} / {got.shape[0]} rows select a different set; row {r}: "
           f"selected {extra[:8]} not expected, missing {missing[:8]}")
    return Comparison(output, "fail", metrics, {"rows_differing": 0}, {"tolerance": "exact set equality"},
                      {"index": [r], "got": extra[:8], "want": missing[:8]}, msg)
