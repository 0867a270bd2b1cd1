"""Derived RMS-error (calc_diff / cosine) limits: the second judgement of every float output (issue #16 item 3).

The elementwise bound (``tolerances.Tolerance``) is a worst case: every rounding step at its largest relative
error, all of one sign. An implementation can stay inside it while erring on *every* element by a sizeable share
of it: a power-of-two scale truncation (gain 0.51) sits at 0.32x of attn.output's serving bound; an FP8
intermediate in the MoE experts (2^-4 relative) at 0.6-0.8x of the random-expert bound, with 16x the RMS error of
bf16 rounding. The same rounding model, summed in quadrature instead of worst case, predicts the *expected*
squared error, and that is a far tighter limit on the sum of squares.

Rounding model (the one the elementwise bounds use). Round-to-nearest of a value x to a format with unit
roundoff u (half an ulp relative: bf16 2^-8, e4m3 2^-4, fp32 2^-24) leaves an absolute error uniform in
+-ulp(x)/2, i.e. a relative error of variance <= u^2/3 (= ulp^2/12 with ulp = 2u). Independent steps add their
variances, so an output fed by steps k (relative sizes u_k, condition factors c_k, magnitudes m_k):

    E[e^2] = sum_k c_k^2 u_k^2 m_k^2 / 3                                              (quadrature)

where the elementwise bound sums c_k u_k m_k (worst case). A reduction of length n in fp32 rounds n partial sums,
each at most the magnitude sum |a_i b_i| (the bound's ``scale`` s): variance <= n u32^2 s^2 / 3. A bf16 rounding
of a dot product's inputs, e = sum a_i b_i (da_i + db_i), has variance (2 u^2/3) sum (a_i b_i)^2, and for
zero-mean independent terms (every seeded random row) E[want^2] = E[sum (a_i b_i)^2]: the input roundings are
relative to |want| in mean square, while the fp32 reduction and the worst-case extras stay relative to s.

The declared model (``Tolerance.ms_rel``, ``ms_scale``, ``flip_ulp``) gives the expected sum of squares

    E = ms_rel * sum m^2 + ms_scale * sum s^2 + n atol^2 / 3

(m = |want|, or the magnitude the comparison passes: the random experts pass their quadrature magnitude). Where a
tolerance declares no model, the family fallback is the elementwise bound itself as ONE uniform step:
ms_scale = rtol^2 / 3. That is an upper bound on any quadrature split of the same worst-case sum
(sum_k t_k^2 <= (sum_k t_k)^2), exact for single-rounding outputs (an FP8 quantisation), weak for long chains.

At the emulated level the subject and the emulation round the same bf16 inputs; they differ by the fp32
evaluation order (delta, variance 2 (n + ops) u32^2 / 3 relative to |want|) and, where the output is stored in a
low-precision format, by a whole ulp where the two fp32 values straddle a rounding boundary: probability
|delta| / ulp, squared error ulp^2, so E[e^2] = E|delta| ulp <= sqrt(E delta^2) * 2u |want|. That alone is the
model of a subject that rounds exactly where the emulation does; vLLM CPU does not: it carries one more bf16
rounding inside the op on every float output measured (calc_diff 1.3e-06 - 4.2e-06 against the emulation, 8-24x
the flip-only model; docs/rms-limits.md), which the emulated elementwise bound (one bf16 ulp) allows. The model
therefore admits ONE intermediate bf16 rounding placed differently: u^2/3 for it, and it decorrelates the two
sides' output roundings (2 u^2/3): u^2 in all (``conformance.cases._serving``).

Limit and finite-sample allowance. The measured sum of squares is a sum of n positive terms:
  * continuous errors (fp64 / fp32 / serving): chi-square like, relative SD sqrt(2 / n) (Gaussian errors; the
    uniform rounding errors have a smaller kurtosis, 9/5 < 3, so this is conservative): allowance
    1 + K_RMS sqrt(2 / n);
  * flip errors (an FP8 store read back at the emulated level): a count of lambda = E n / (flip_ulp^2 sum m^2)
    expected Poisson events (a lower estimate: a flip of a value costs at most (flip_ulp m)^2); Bennett's
    inequality puts the upper tail at P(X >= lambda + t) <= exp(-t^2 / (2 (lambda + t/3))), which at
    t = K sqrt(lambda) + K^2 / 3 is <= exp(-K^2/2):
    allowance 1 + K_RMS / sqrt(lambda) + K_RMS^2 / (3 lambda).
  limit = E * allowance * SAFETY_CORRELATED.
K_RMS = 4 is the systematic detector's z (p ~ 3e-5 one-sided). SAFETY_CORRELATED = 2 covers rounding steps that
are not independent: two steps of equal size whose errors are fully correlated (a value rounded to bf16 and then
an FP8 code or a product derived from the same rounded value, a per-token scale shared by a row) contribute
(u + u)^2 / 3 instead of 2 u^2 / 3: twice the quadrature sum, the most a pair can add. Not tuned to any run.
Outputs with fewer than N_MIN_RMS elements are not judged (the chi-square approximation at 4 sigma needs a sample:
at n = 64 the allowance is already 1.71); the row says so.

The judgement is on the sum of squared errors; it is reported as the equivalent calc_diff limit,
calc_diff = |got - want|^2 / (|got|^2 + |want|^2) exactly (1 - 2<x,y>/(|x|^2+|y|^2)), so calc_diff <= limit
/ (|got|^2 + |want|^2), and the cosine lower bound it implies, cos >= sqrt(1 - limit / |want|^2) (an error of
norm r |want| turns the vector by at most asin r). Judged at RMS_LEVELS (serving: got against the unquantised
golden, the model is the profile's full quantisation noise; emulated: got against the emulated serving numerics);
measured at fp64 / fp32.
"""

from __future__ import annotations

import math

import torch

from .tolerances import Tolerance

K_RMS = 4.0
SAFETY_CORRELATED = 2.0
N_MIN_RMS = 64
RMS_LEVELS = ("serving", "emulated")


def model_terms(tol: Tolerance) -> tuple[float, float, str]:
    """(ms_rel, ms_scale, derivation) of ``tol``'s declared model, or the one-uniform-step fallback (the
    declared ``ms_excess`` term, on sum (s - |want|)^2, is read by ``rms_judgement`` itself)."""
    if not math.isnan(tol.ms_rel) or not math.isnan(tol.ms_scale):
        return (0.0 if math.isnan(tol.ms_rel) else tol.ms_rel, 0.0 if math.isnan(tol.ms_scale) else tol.ms_scale,
                tol.ms_derivation)
    return 0.0, tol.rtol**2 / 3, (f"family fallback: the elementwise bound as one uniform rounding step, "
                                  f"E[e^2] = rtol^2/3 s^2 = {tol.rtol**2 / 3:.3g} s^2")


def rms_judgement(g: torch.Tensor, w: torch.Tensor, s: torch.Tensor, tol: Tolerance, *, level: str,
                  magnitude: torch.Tensor | None = None) -> dict:
    """The RMS judgement of one float output (fp64 tensors of one shape; s the bound's scale). Returns a dict:
    judged (bool), reason (why not judged), expected / limit (sums of squared error), sse, calc_diff_limit,
    cosine_min, rms_vs_model (sqrt(sse / expected)), allowance, n, derivation."""
    if tol.rtol == 0 and tol.atol == 0:
        return {"judged": False, "reason": "exact bound: the elementwise comparison decides"}
    ok = torch.isfinite(g) & torch.isfinite(w) & torch.isfinite(s)
    n = int(ok.sum())
    if n < N_MIN_RMS:
        return {"judged": False, "reason": f"not judged: n = {n} < N_min = {N_MIN_RMS} finite elements (the "
                f"chi-square allowance at K = {K_RMS:g} needs a sample)"}
    gg, ww, ss = g[ok], w[ok], s[ok].abs()
    m = (magnitude.double().expand_as(w)[ok] if magnitude is not None else ww).abs()
    ms_rel, ms_scale, how = model_terms(tol)
    sum_m2, sum_s2 = float((m * m).sum()), float((ss * ss).sum())
    expected = ms_rel * sum_m2 + ms_scale * sum_s2 + n * tol.atol**2 / 3
    if tol.ms_excess > 0:   # the random-sum part lambda Q of a ``lambda Q + |y|`` scale (MODELS below)
        expected += tol.ms_excess * float((ss - ww.abs()).clamp_min(0).square().sum())
    sse = float(((gg - ww) ** 2).sum())
    if expected <= 0:
        return {"judged": False, "reason": "not judged: the rounding model predicts no error (zero magnitude)"}
    if tol.flip_ulp > 0:
        lam = expected * n / (tol.flip_ulp**2 * sum_m2) if sum_m2 > 0 else math.inf
        allowance = 1 + K_RMS / math.sqrt(lam) + K_RMS**2 / (3 * lam)
        how_a = f"Bennett/Poisson allowance 1 + {K_RMS:g}/sqrt(lambda) + {K_RMS:g}^2/(3 lambda), lambda = {lam:.3g}"
    else:
        lam = math.nan
        allowance = 1 + K_RMS * math.sqrt(2 / n)
        how_a = f"chi-square allowance 1 + {K_RMS:g} sqrt(2/{n})"
    limit = expected * allowance * SAFETY_CORRELATED
    sum_w2, sum_g2 = float((ww * ww).sum()), float((gg * gg).sum())
    denom = sum_w2 + sum_g2
    return {
        "judged": level in RMS_LEVELS, "reason": "" if level in RMS_LEVELS else f"measured, not judged at {level}",
        "expected": expected, "limit": limit, "sse": sse, "n": n, "allowance": allowance, "flips": lam,
        "calc_diff": sse / denom if denom > 0 else 0.0,
        "calc_diff_limit": limit / denom if denom > 0 else math.inf,
        "cosine_min": math.sqrt(max(0.0, 1 - limit / sum_w2)) if sum_w2 > 0 else 0.0,
        "rms_vs_model": math.sqrt(sse / expected),
        "derivation": (f"sum (got-want)^2 <= E x allowance x {SAFETY_CORRELATED:g} (correlated-rounding safety); "
                       f"E = {how}; {how_a}"),
    }


# ------------------------------------------------------------------------------------------------------------
# Models of the components that had only the one-step fallback (issue #16 item 3, docs/rms-limits.md "Models of
# the former fallback components"). Each returns the keyword arguments of ``Tolerance.with_rms`` for one level.
#
# Their elementwise bounds share one shape: the scale is s = lam R + |y|, where R is the root sum of squares of the
# output's sensitivities to every rounding source at unit relative size (a random sum: R_i^2 = sum_j (W_ij e_j)^2
# for a GEMM) and lam its Hoeffding factor (1 where the rtol carries the 6; 6 where the scale does). The
# quadrature model of the same sources is then exact in R: a source of unit roundoff u_k rounded to nearest has
# variance <= u_k^2/3 (relative, times its own magnitude: e_j >= |x_j| covers subnormal FP8 results), and
# independent sources add, so E[e_i^2] = sum_k u_k^2/3 R_ik^2 <= max_k u_k^2/3 R_i^2 = u^2/(3 lam^2) (s_i - |y_i|)^2
# (the ``ms_excess`` term of ``rms_judgement``) + ub^2/3 y_i^2 for the output's own bf16 rounding (``ms_rel``).
# The fp32 accumulation of a K-long GEMM: K partial sums, each <= sum_j |W_ij x_j| <= sqrt(K) R_i (Cauchy-Schwarz),
# each rounding with variance u32^2/3 of it: (K^2 + 4) u32^2/3 R^2 with 4 elementwise ops (scales, second
# accumulator). Emulated level (same bf16 inputs, same FP8 bytes on both sides): as ``cases._serving``, ONE
# intermediate bf16 rounding placed differently and the output's bf16 flips under the fp32 order disagreement
# r (relative to R: sqrt(2 (K^2 + 4)/3) u32): E|delta| ulp <= r R 2 ub |y| <= ub r (R^2 + y^2); so
# (ub^2 + ub r) y^2 + (ub r + r^2) R^2.

U32_ = 2.0**-24
UB_ = 2.0**-8
U8_ = 2.0**-4
U_ACT_ = U8_ * (1 + UB_) + UB_   # bf16 then e4m3 of one activation (cases.linear.U_ACT)


def block_fp8_gemm_rms(level: str, k: int, *, what: str, lam: float = 1.0, u_src: float = U_ACT_) -> dict:
    """One block-FP8 GEMM y = x . W^T (bf16 x quantised to e4m3 in 1x128 / 1x32 groups at a per-group scale,
    exact dequantised weights, fp32 accumulation, bf16 y) against the scale s = lam Q + |y| of
    ``cases.linear._scale`` (lam 1, Q_i = sqrt(sum_j (W_ij e_j)^2)). Shared by linear.fp8_block, the q path's
    wq_a / wq_b GEMMs and the MTP projections (their scales have the same Q + |y| form).
      serving   u_src^2/3 Q^2 (every activation: bf16 then e4m3, variance <= U_ACT^2/3 e_j^2; W exact) +
                (k^2 + 4) u32^2/3 Q^2 (accumulation) + ub^2/3 y^2 (bf16 y)
      emulated  (ub^2 + ub r) y^2 + (ub r + r^2) Q^2, r = sqrt(2 (k^2 + 4)/3) u32 (module note above)
      fp64/fp32 (k^2 + 4) u32^2/3 Q^2, twice at fp32 (measured, not judged)
    u_src is an upper bound for V4.1's 32x32 rows on gfx942 too (bf16 activations, not quantised: ub < U_ACT):
    the model covers every serving profile, as the elementwise bound does."""
    fp = (k * k + 4) * U32_**2 / 3
    l2 = lam * lam
    if level in ("fp64", "fp32"):
        c = fp if level == "fp64" else 2 * fp
        return dict(ms_excess=c / l2, derivation=f"{what}: fp32 accumulation ({k}^2 + 4) u32^2/3"
                    + (" x 2" if level == "fp32" else "") + f" = {c:.3g} Q^2")
    if level == "emulated":
        r = math.sqrt(2 * fp)
        return dict(ms_rel=UB_**2 + UB_ * r, ms_excess=(UB_ * r + r * r) / l2, derivation=(
            f"{what}: one intermediate bf16 rounding placed differently + bf16 flips of y under the fp32 order "
            f"disagreement r = sqrt(2({k}^2+4)/3) u32 = {r:.3g} of Q: (ub^2 + ub r) y^2 + (ub r + r^2) Q^2"))
    ex = u_src**2 / 3 + fp
    return dict(ms_rel=UB_**2 / 3, ms_excess=ex / l2, derivation=(
        f"{what}: activation roundings (bf16 then e4m3) {u_src:.4g}^2/3 Q^2 + accumulation ({k}^2+4) u32^2/3 Q^2 "
        f"= {ex:.3g} Q^2 + bf16 output ub^2/3 y^2 (Q = s - |y|, the random-sum part of the scale)"))


def head_rms(level: str, d: int, *, what: str = "head.lm", g32: float) -> dict:
    """The LM head (HC head -> RMSNorm -> bf16 head GEMM) against ``cases.head._head_scale``
    S = 6 (2 Q + rho |z|) + |z|: the sources are h's bf16 rounding (a tangential part of size Q through the norm
    and a radial part rho |z|), n's bf16 rounding (Q) and the logits' (|z|); weights and X are bf16-exact.
      serving   ub^2/3 (2 Q^2 + rho^2 z^2) + ub^2/3 z^2; since (S - |z|)^2 / 36 = (2Q + rho|z|)^2
                >= 4 Q^2 + rho^2 z^2: c_Q Q^2 + c_rho rho^2 z^2 <= max(c_Q / 4, c_rho) (S - |z|)^2 / 36 with
                c_Q = 2 ub^2/3, c_rho = ub^2/3 -> ub^2/108 (S - |z|)^2; the fp32 chain's (5D + 8) roundings, each
                <= u32 S in the elementwise count, in quadrature: (5D + 8) u32^2/3 S^2
      emulated  h and n: one intermediate bf16 rounding placed differently (ub^2/3) and flips under the fp32 order
                r = sqrt(2 (5D + 8)/3) u32 (2 ub r each): c_Q = ub^2/3 + 4 ub r + 2 r^2, c_rho = ub^2/3 + 2 ub r
                + r^2; the logits' flips + their intermediate: (ub^2 + 2 ub r + r^2) z^2
      fp64/fp32 (5D + 8) u32^2/3 S^2, twice at fp32 (measured, not judged)"""
    # the fp32 chain in quadrature: (5D + 8) roundings, each <= u32 S in the elementwise count (g32 = (5D+8) u32 S
    # summed worst case): (5D + 8) u32^2/3 S^2 (twice at fp32)
    fp = g32 * U32_ / 3
    if level in ("fp64", "fp32"):
        return dict(ms_scale=fp, derivation=f"{what}: fp32 chain, {g32 / U32_:.0f} roundings u32^2/3 = {fp:.3g} S^2")
    if level == "emulated":
        r = math.sqrt(2 * (5 * d + 8) / 3) * U32_
        cq, cr = UB_**2 / 3 + 4 * UB_ * r + 2 * r * r, UB_**2 / 3 + 2 * UB_ * r + r * r
        ex = max(cq / 4, cr) / 36
        rel = UB_**2 + 2 * UB_ * r + r * r
        return dict(ms_rel=rel, ms_excess=ex, derivation=(
            f"{what}: h / n one intermediate bf16 rounding placed differently + flips under the fp32 order r = "
            f"{r:.3g}: max(c_Q/4, c_rho)/36 = {ex:.3g} (S-|z|)^2; logits (ub^2 + 2 ub r + r^2) = {rel:.3g} z^2"))
    ex = max(2 * UB_**2 / 3 / 4, UB_**2 / 3) / 36
    return dict(ms_rel=UB_**2 / 3, ms_excess=ex, ms_scale=fp, derivation=(
        f"{what}: bf16 h (tangential Q, radial rho|z|) and n (Q): max(c_Q/4, c_rho)/36 = ub^2/108 = {ex:.3g} "
        f"(S-|z|)^2 + bf16 logits ub^2/3 z^2 + fp32 chain {g32 / U32_:.0f} u32^2/3 = {fp:.3g} S^2"))


def random_sum_rms(level: str, n: int, *, what: str, lam: float = 6.0, u_src: float = U_ACT_,
                   extra: float = 0.0) -> dict:
    """An output y whose scale is S = lam R + |y| with R^2 = sum over rounding sources of their squared
    sensitivity-weighted magnitudes (``cases.moe._shared_scale``: x and a rounded bf16 then e4m3 (U_ACT), g, u
    bf16 (ub < U_ACT: counted at U_ACT, an upper bound), fp32 GEMMs of length <= n in its random-sum terms).
      serving   u_src^2/(3 lam^2) (S - |y|)^2 + ub^2/3 y^2 + ((n + 4) u32)^2/3 S^2 (fp32, one step)
      emulated  same bf16 x and FP8 bytes: ONE intermediate bf16 rounding placed differently (ub^2/3 R^2); g, u
                bf16 flips under the fp32 order r = sqrt(2 (n + 4)/3) u32 (2 ub r R^2); a's e4m3 code flips under
                a pre-store disagreement r_a = sqrt(ub^2 + 2 ub r) (probability r_a / (2 u8), cost (2 u8)^2:
                2 u8 r_a R^2); y: (ub^2 + 2 ub r + r^2) y^2
      fp64/fp32 ((n + 4) u32)^2/3 S^2, twice at fp32 (measured, not judged)
    ``extra``: a further worst-case term of the elementwise bound relative to S (the q path's fp32 RoPE phase,
    the MTP projections' bf16 outputs) kept as one uniform step, extra^2/3 S^2, at serving and emulated.
    Also the q path (attn.q_path qr: S = 6 R + 2 |qr|; q: the head norm's Jacobian bound (B_i + |nh_i| ||B_h||) /
    rms adds a factor 2 in variance, (a + b)^2 <= 2 (a^2 + b^2): lam = 6 / sqrt 2) and the MTP mixing (mtp.head X:
    S = Q_h + |y_h| + Q_e + |y_e| >= (Q_h + Q_e) + |X|, lam = 1; its FP8 activation codes are made in-component
    from bf16 norm outputs, the emulated e4m3 flips below)."""
    g32 = (n + 4) * U32_
    if level in ("fp64", "fp32"):
        c = (g32 if level == "fp64" else 2 * g32) ** 2 / 3
        return dict(ms_scale=c, derivation=f"{what}: fp32 as one step = {c:.3g} S^2")
    l2 = lam * lam
    if level == "emulated":
        r = math.sqrt(2 * (n + 4) / 3) * U32_
        ra = math.sqrt(UB_**2 + 2 * UB_ * r)
        c = UB_**2 / 3 + 2 * UB_ * r + 2 * U8_ * ra
        rel = UB_**2 + 2 * UB_ * r + r * r
        return dict(ms_rel=rel, ms_excess=c / l2, ms_scale=extra**2 / 3, derivation=(
            f"{what}: one intermediate bf16 rounding placed differently + bf16 flips of g, u (r = {r:.3g}) + e4m3 "
            f"flips of a (2 u8 r_a, r_a = {ra:.3g}): {c:.3g} R^2 (R = (S-|y|)/{lam:g}); y {rel:.3g} y^2"
            + (f" + extra {extra:.3g}^2/3 S^2" if extra else "")))
    ex = u_src**2 / 3 / l2
    return dict(ms_rel=UB_**2 / 3, ms_excess=ex, ms_scale=(g32**2 + extra**2) / 3, derivation=(
        f"{what}: every source at {u_src:.4g}^2/3 of its magnitude: {ex:.3g} (S-|y|)^2 (R = (S-|y|)/{lam:g}) + "
        f"bf16 y ub^2/3 y^2 + fp32 (({n}+4) u32)^2/3 S^2" + (f" + extra {extra:.3g}^2/3 S^2" if extra else "")))


def kv_insert_rms(level: str, n: int, *, phase: float) -> dict:
    """attn.kv_insert's read-back kv against ``cases.qkv._kv_scale`` S = (6 R + 2|kv|, pair-summed on the rope
    dims) + e + 2^-12 amax, e = max(|kv|, 2^-12 amax of its 64-block): the chain sources at U_ACT (as the q path's
    qr: U_ACT^2/108 (S - |kv|)^2, an upper bound since S - |kv| >= 6 R) and the FP8 store of the nope dims,
    u8^2/3 e^2 <= u8^2/3 ((1 + 2^-12) kv^2 + (2^-12 + 2^-24) S^2) (e <= |kv| + 2^-12 S); the fp32 chain and the
    fp32 RoPE phase as one step each ((n+4) u32, phase: /3 S^2).
    Emulated: both sides store FP8 from the same bf16 kv up to bf16 flips: the e4m3 store flips one ulp (2 u8)
    where the pre-store values disagree, r8 = sqrt(ub^2 + 2 ub r), r = sqrt(2 (n+4)/3) u32 (``cases._serving``
    stored_fp8): E[e^2] <= r8 2 u8 kv^2, counted as flips (Bennett / Poisson allowance); the bf16 rope dims flip
    at ub^2 + 2 ub r < r8 2 u8 (covered)."""
    g32 = (n + 4) * U32_
    if level in ("fp64", "fp32"):
        c = (g32 if level == "fp64" else 2 * g32 + phase) ** 2 / 3
        return dict(ms_scale=c, derivation=f"kv read back: fp32 as one step = {c:.3g} S^2")
    if level == "emulated":
        r = math.sqrt(2 * (n + 4) / 3) * U32_
        r8 = math.sqrt(UB_**2 + 2 * UB_ * r)
        ms = r8 * 2 * U8_
        return dict(ms_rel=ms, flip_ulp=2 * U8_, ms_scale=phase**2 / 3, derivation=(
            f"kv read back: e4m3 store flips under the pre-store disagreement r8 = {r8:.3g}: {ms:.3g} kv^2 + fp32 "
            f"phase {phase:.3g}^2/3 S^2"))
    ex = U_ACT_**2 / 108
    rel = U8_**2 / 3 * (1 + 2.0**-12)
    sc = U8_**2 / 3 * (2.0**-12 + 2.0**-24) + (g32**2 + phase**2) / 3
    return dict(ms_rel=rel, ms_excess=ex, ms_scale=sc, derivation=(
        f"kv read back: chain sources U_ACT^2/108 = {ex:.3g} (S-|kv|)^2 + FP8 store u8^2/3 e^2 <= {rel:.3g} kv^2 + "
        f"{sc:.3g} S^2 (the store's subnormal floor, fp32 ({n}+4) u32 and the RoPE phase as one step)"))


def kv_rope_rms(level: str, n: int, *, phase: float) -> dict:
    """attn.kv_insert's stored bf16 rope values (compared at the emulated level only) against the pair magnitude
    S = |r_2i| + |r_2i+1| + 2^-12 max: the three bf16 steps of the elementwise bound (kv store, y through the norm,
    the stored value) in quadrature: each source ONE intermediate rounding placed differently (ub^2/3) or a flip
    under the fp32 order r = sqrt(2 (n+4)/3) u32 (2 ub r), both members of the pair mixed by the rotation
    (|cos|, |sin| <= 1: relative to S): 2 (ub^2/3 + 2 ub r) S^2; the stored value (ub^2 + 2 ub r + r^2) r^2; the
    fp32 phase as one step."""
    r = math.sqrt(2 * (n + 4) / 3) * U32_
    sc = 2 * (UB_**2 / 3 + 2 * UB_ * r) + phase**2 / 3
    rel = UB_**2 + 2 * UB_ * r + r * r
    return dict(ms_rel=rel, ms_scale=sc, derivation=(
        f"stored rope: kv store and y through the norm {2 * (UB_**2 / 3 + 2 * UB_ * r):.3g} S^2 + phase "
        f"{phase:.3g}^2/3 S^2; the stored value's flips {rel:.3g} r^2"))
