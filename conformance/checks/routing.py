"""MoE routing conformance (issue 7): router, expert fingerprinting, routing metadata, canaries, expert parallel.

Everything is compared *per token* and every difference is named by token:
``token 17: experts {3, 9, 12, 40, 41, 63}, expected {3, 9, 12, 40, 41, 62}``.

Router (``moe.router``, ``moe.hash_router``; spec 3.12)
  * expert-id sets must be equal. A differing row is a *near-tie* (reported, not failed) when every expert
    in the symmetric difference could trade places with the selection boundary under the score errors the
    comparison level allows (``ScoreModel``): got-only experts have a golden selection score no lower than
    the k-th best minus both error bounds, expected-only experts one no higher than the (k+1)-th best plus
    both bounds.
  * weights are aligned by expert id and compared with a per-element bound derived from the score bounds
    (``weight_bound``); a near-tie row's weights are compared with the golden formula evaluated on the
    subject's own selection.

Score error model. logits z = x W^T; M = sum_i |x_i W_ji|. The score s = sqrt(softplus(z)) has
d log s / dz = sigmoid(z) / (2 softplus(z)) <= 1/2 (softplus >= sigmoid for every z), so a logit error dz
changes s by at most a factor exp(dz/2): |ds| <= s expm1(dz/2). The two sides' sqrt-softplus evaluations
add 12 u32 s each (6 ops, <= 2 ulp) plus the fp32 subnormal resolution 2^-149 (scores of z < -174 are
subnormal in fp32). dz per level:
  fp64      fp32 golden accumulation: 6 sqrt(D) u32 M + u32 |z| (storage)
  serving   + bf16 rounding of the gate input x and of W (2 u_bf16 M); on gfx942 the gate GEMM returns bf16
            logits (spec 8.12): + u_bf16 |z|
  emulated  both sides' fp32 accumulation (2x the fp64 term); on gfx942 one bf16 logit may round to the
            neighbouring value: + 2 u_bf16 |z|

Weights w_i = rs s_i / (sum_S s + eps): with per-score errors e_j and S = the selected set,
|w'_i - w_i| <= rs (e_i Sigma + s_i sum_S e) / (Sigma (Sigma - sum_S e)), Sigma = sum_S s + eps (exact, not
linearised; rs when sum_S e >= Sigma), plus the renormalisation's own (k + 3) u32 rounding on both sides.

Expert fingerprinting (``moe.layer``, ``moe.experts``; spec 3.13)
  The input's lane 0 is the constant 1 and the experts are built so that expert e computes
  g = W1 x = G0, u = W3 x = U0 on its first intermediate row only (zero elsewhere) and W2 maps that row to
  output lane e. Every expert therefore outputs A e_lane(e) with A = SiLU(G0) U0, and the layer output is
  y[t, e] = A w_{t,e}: the non-zero lanes are the experts that processed token t, y / A their weights.

Random expert weights (``moe.experts`` / ``moe.layer`` rows with ``weights="random"``; issue 16)
  The fingerprint's constant intermediate SiLU(4) * 1 is exact in FP8 and bf16 and every dot has one non-zero
  product, so a less accurate expert backend (FP8 intermediate, bf16 accumulation, no clamp above 4) passes it.
  Random-weight rows compare y elementwise against ``random_expert_tol(level) * random_expert_scale`` (a
  per-element random-sum magnitude of every rounding source inside the experts; x and weights are bf16-exact);
  a whole layer adds the routing weights' own bound and leaves out near-tie tokens (counted in the message).

Routing metadata (``moe.routing_metadata``)
  The data a fused MoE kernel consumes: per-expert counts and offsets, the (token, slot) pairs sorted by
  expert (gather) and each pair's position in that order (scatter), -1 for dropped pairs. Compared exactly,
  decoded back to per-token expert sets for the message, with guard bands (canaries) around every output
  buffer. ``routing_metadata_blocked`` emulates a block-structured builder (BLOCK = 32 top_k lanes padded
  to the next power of two, stage 1 per-block histogram, stage 2 scatter); ``lane_mask="global"`` is the
  bring-up bug of spec 7 (padded lanes masked only against the global bound).

Expert parallel: rank r owns a contiguous range of experts and gets an expert map (global -> local, -1 for
remote) plus its local weights; the sum of all ranks' outputs must equal the single-rank output.
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from dataclasses import dataclass

import torch

from references.components.moe import RENORM_EPS_HF_VLLM, sqrt_softplus

from ..cases._moe_model import (
    FP_FLOOR,
    META_OUTPUTS,
    fingerprint_amplitude,
    guarded,
    meta_shapes,
    touched_guards,
)
from ..metrics import Comparison
from ..results import CheckResult
from ..subjects.base import Unsupported, absent_reason
from ..tolerances import Tolerance, gamma_prob

U32 = 2.0**-24
UBF16 = 2.0**-8
TINY32 = 2.0**-149
MAX_DIAG = 20          # per-token diagnostics kept per comparison (the count covers all tokens)


def _fmt_set(s) -> str:
    return "{" + ", ".join(str(int(i)) for i in sorted(s)) + "}"


def token_message(t: int, got, want, what: str = "experts") -> str:
    return f"token {t}: {what} {_fmt_set(got)}, expected {_fmt_set(want)}"


# ---------------------------------------------------------------------------------------------------
# score model and bounds
@dataclass
class ScoreModel:
    s: torch.Tensor          # [T, E] fp64 golden scores sqrt(softplus(z)), z from the inputs in fp64
    sel: torch.Tensor        # [T, E] selection scores (s + bias; s for hash routing)
    e: torch.Tensor          # [T, E] bound on |score difference| between the two compared sides
    esel: torch.Tensor       # [T, E] the same for the selection scores (adds the bias addition's rounding)
    derivation: str


def score_model(x: torch.Tensor, weight: torch.Tensor, bias, level: str, profile: str) -> ScoreModel:
    x64, w64 = x.double(), weight.double()
    z = x64 @ w64.T
    m = x64.abs() @ w64.abs().T
    d = x.shape[-1]
    acc = gamma_prob(d, U32) * m + U32 * z.abs()
    how = f"fp32 accumulation 6 sqrt({d}) u32 M + u32 |z|"
    if level == "fp64":
        dz = acc
    elif level == "serving":
        # bf16 rounding of the gate input (and of W unless it is bf16-exact): worst case u_bf16 M per
        # rounded operand; independent roundings give 6 u_bf16 ||x o w||_2 (the probabilistic bound the
        # harness uses for reductions, Higham & Mary); the smaller of the two
        # (an operand that is already bf16-exact rounds to itself: no term)
        l2 = torch.sqrt((x64 * x64) @ (w64 * w64).T)
        rounded = [n for n, t in (("input", x), ("weight", weight))
                   if not bool((t.to(torch.bfloat16).to(t.dtype) == t).all())]
        n_ops = len(rounded)
        dz = 2 * acc + n_ops * UBF16 * torch.minimum(m, 6 * l2)
        how = (f"2x ({how}) + bf16 rounding of the gate {' and '.join(rounded) or '(none: bf16-exact operands)'} "
               f"{n_ops} u_bf16 min(M, 6 ||x o w||_2)")
        if profile == "gfx942":
            dz = dz + UBF16 * (z.abs() + dz)
            how += " + bf16 logits on gfx942 u_bf16 |z|"
    elif level == "emulated":
        dz = 2 * acc
        how = f"2x ({how})"
        if profile == "gfx942":
            dz = dz + 2 * UBF16 * (z.abs() + dz)
            how += " + one bf16 logit ulp on gfx942 2 u_bf16 |z|"
    else:
        raise ValueError(f"unknown comparison level {level!r}")
    s = sqrt_softplus(z)
    e = s * torch.expm1(dz / 2) * (1 + 1e-9) + 24 * U32 * s + 4 * TINY32
    if bias is not None:
        sel = s + bias.double()
        esel = e + 2 * U32 * sel.abs()
    else:
        sel, esel = s, e
    der = (f"logit error dz = {how}; score error s expm1(dz/2) (d log s/dz <= 1/2) + 2x12 u32 s + 4x2^-149; "
           f"max dz {float(dz.max()):.3g}")
    return ScoreModel(s, sel, e, esel, der)


def weight_bound(s_sel: torch.Tensor, e_sel: torch.Tensor, route_scale: float, eps: float,
                 w_ref: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |w_got - w_ref| for one selected set per row (see module docstring)."""
    k = s_sel.shape[-1]
    sig = s_sel.sum(-1, keepdim=True) + eps
    se = e_sel.sum(-1, keepdim=True)
    den = sig * (sig - se)
    b = torch.where(den > 0, route_scale * (e_sel * sig + s_sel * se) / den.clamp_min(1e-300),
                    torch.full_like(s_sel, route_scale))
    return b + 2 * (k + 3) * U32 * w_ref.abs() + 4 * TINY32


def renorm_eps(variant: str) -> float:
    return RENORM_EPS_HF_VLLM if variant == "hf-vllm" else 0.0


# ---------------------------------------------------------------------------------------------------
# per-token route comparison
def _verdict_weights(err, bound, got, ref) -> tuple[str, int, float, list]:
    finite_ref = torch.isfinite(ref)
    nonfin = ~torch.isfinite(got) & finite_ref
    e = torch.where(nonfin, torch.full_like(err, math.inf), err)
    over = e > bound
    n = int(over.sum())
    ratio = torch.where(bound > 0, e / bound.clamp_min(1e-300), torch.where(e > 0, math.inf, 0.0))
    worst = float(ratio.max()) if ratio.numel() else 0.0
    if nonfin.any():
        return "catastrophic", n, worst, [f"{int(nonfin.sum())} NaN/Inf weights where the golden is finite"]
    if n == 0:
        return "pass", 0, worst, []
    if n <= max(1, int(1e-3 * e.numel())) and worst <= 4.0:
        return "degraded", n, worst, []
    return "fail", n, worst, []


def compare_route(got_ids, got_w, want_ids, want_w, sm: ScoreModel, *, route_scale: float, eps: float,
                  label: str, hashed: bool = False, extra_rel: float = 0.0,
                  what: str = "experts") -> tuple[list[Comparison], list[dict]]:
    """Compare a subject's routing (ids [T,k], weights [T,k]) with the golden one, token by token.

    ``got_ids`` may contain -1 (a token the subject routed to fewer experts); ``extra_rel`` widens the
    weight bound by a relative term (the expert path's rounding for fingerprint-decoded weights).
    Returns the ids and weights comparisons and the per-token diagnostics (first MAX_DIAG of each kind).
    """
    diags: list[dict] = []
    T, k = want_ids.shape
    E = sm.s.shape[-1]
    if tuple(got_ids.shape) != (T, k) or tuple(got_w.shape) != (T, k):
        msg = (f"{label} ids/weights: shapes {tuple(got_ids.shape)} / {tuple(got_w.shape)}, expected ({T}, {k})")
        return [Comparison("ids", "fail", message=msg)], diags
    gi = got_ids.detach().cpu().long()
    wi = want_ids.detach().cpu().long()
    gw = got_w.detach().cpu().double()
    ww = want_w.detach().cpu().double()
    # -1 = no expert in that slot (a dropped slot, or an unobservable fingerprint lane); anything else
    # outside [0, E) is invalid
    valid = (gi >= -1) & (gi < E)
    gs = torch.sort(torch.where(valid, gi, torch.full_like(gi, -1)), dim=-1).values
    ws = torch.sort(wi, dim=-1).values
    dup = (gs[:, 1:] == gs[:, :-1]) & (gs[:, 1:] >= 0)
    eq = (gs == ws).all(-1) & valid.all(-1)
    # boundary scores of the golden selection: k-th and (k+1)-th best selection score per row
    if not hashed:
        top = torch.topk(sm.sel, min(k + 1, E), dim=-1)
        kth_v, kth_i = top.values[:, k - 1], top.indices[:, k - 1]
        if k < E:
            k1_v, k1_i = top.values[:, k], top.indices[:, k]
        else:
            k1_v, k1_i = torch.full((T,), -math.inf, dtype=torch.float64), kth_i
    bad_rows, tie_rows = [], []
    for t in torch.nonzero(~eq).flatten().tolist():
        g_set = {i for i in gi[t].tolist() if 0 <= i < E}
        w_set = {i for i in wi[t].tolist() if i >= 0}
        kind = "mismatch"
        reason = ""
        if bool(dup[t].any()):
            reason = "the same expert twice"
        elif not bool(valid[t].all()):
            reason = f"invalid ids {sorted(i for i in gi[t].tolist() if not -1 <= i < E)}"
        elif not hashed and len(g_set) == len(w_set) == k:
            go, wo = g_set - w_set, w_set - g_set
            ok = all(float(sm.sel[t, i]) >= float(kth_v[t]) - float(sm.esel[t, i] + sm.esel[t, kth_i[t]])
                     for i in go)
            ok &= all(float(sm.sel[t, i]) <= float(k1_v[t]) + float(sm.esel[t, i] + sm.esel[t, k1_i[t]])
                      for i in wo)
            if ok:
                kind = "near-tie"
        (tie_rows if kind == "near-tie" else bad_rows).append(t)
        n_kind = sum(1 for d in diags if d["kind"] == kind)
        if n_kind < MAX_DIAG:
            d = {"token": t, "kind": kind, "got": sorted(g_set), "want": sorted(w_set),
                 "message": token_message(t, g_set, w_set, what) + (f" ({reason})" if reason else "")
                 + (" [near-tie within the scores' rounding]" if kind == "near-tie" else "")}
            if not hashed:
                d["selection_scores"] = {int(i): float(sm.sel[t, i]) for i in (g_set ^ w_set)}
                d["kth_score"] = float(kth_v[t])
            diags.append(d)
    metrics = {"rows": T, "rows_differing": len(bad_rows), "near_tie_rows": len(tie_rows)}
    ids_tol = ("exact expert-id sets per token; a difference is a near-tie when each differing expert's golden "
               "selection score is within both score bounds of the selection boundary")
    if bad_rows:
        first = [d["message"] for d in diags if d["kind"] == "mismatch"][:3]
        ids_c = Comparison("ids", "fail", metrics, {"rows_differing": 0}, {"tolerance": ids_tol},
                           {"index": [bad_rows[0]]},
                           f"{label} ids: {len(bad_rows)} / {T} tokens routed to a different expert set "
                           f"({len(tie_rows)} near-tie); " + "; ".join(first))
    else:
        ids_c = Comparison("ids", "pass", metrics, {"rows_differing": 0}, {"tolerance": ids_tol},
                           message=f"{label} ids: equal sets on {T} tokens ({len(tie_rows)} near-tie tokens)")
    # weights: rows with equal sets against the golden (aligned by id); near-tie rows against the golden
    # formula on the subject's own selection (fp64 scores)
    cmp_rows = torch.zeros(T, dtype=torch.bool)
    cmp_rows[eq] = True
    if tie_rows:
        cmp_rows[torch.tensor(tie_rows)] = True
    rows = torch.nonzero(cmp_rows).flatten()
    if rows.numel() == 0:
        return [ids_c, Comparison("weights", "pass", message=f"{label} weights: no comparable token")], diags
    gid_raw = gi[rows]
    present = gid_raw >= 0
    gid = gid_raw.clamp(min=0)
    dense = torch.zeros(rows.numel(), E, dtype=torch.float64)
    wrows = wi[rows]
    dense.scatter_(1, wrows.clamp(min=0), torch.where(wrows >= 0, ww[rows], 0.0))
    ref = dense.gather(1, gid)
    s_sel = sm.s[rows].gather(1, gid)
    e_sel = sm.e[rows].gather(1, gid)
    tie_mask = ~eq[rows]
    if tie_mask.any():
        recompute = route_scale * s_sel / (s_sel.sum(-1, keepdim=True) + eps)
        ref = torch.where(tie_mask.unsqueeze(-1), recompute, ref)
    # the bound's normalising sum runs over the golden selection (unobservable lanes included)
    bound = weight_bound(s_sel, e_sel, route_scale, eps, ref) + extra_rel * ref.abs()
    if not bool(present.all()):
        full = wrows.clamp(min=0)
        s_full, e_full = sm.s[rows].gather(1, full), sm.e[rows].gather(1, full)
        sig = s_full.sum(-1, keepdim=True) + eps
        se = e_full.sum(-1, keepdim=True)
        den = sig * (sig - se)
        b2 = torch.where(den > 0, route_scale * (e_sel * sig + s_sel * se) / den.clamp_min(1e-300),
                         torch.full_like(s_sel, route_scale)) + 2 * (k + 3) * U32 * ref.abs() + 4 * TINY32
        bound = torch.where(present.all(-1, keepdim=True), bound, b2 + extra_rel * ref.abs())
    got = torch.where(present, gw[rows], ref)
    err = (got - ref).abs()
    err = torch.where(torch.isnan(got) & torch.isnan(ref), torch.zeros_like(err), err)
    verdict, n_over, worst, reasons = _verdict_weights(err, bound, got, ref)
    ratio = torch.where(bound > 0, err / bound, torch.full_like(err, math.inf))
    ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, math.inf), ratio)
    flat = int(torch.argmax(ratio)) if ratio.numel() else 0
    r, c = divmod(flat, k)
    t_w, ex = int(rows[r]), int(gid[r, c])
    worst_d = {"index": [t_w, c], "token": t_w, "expert": ex, "got": float(got[r, c]), "want": float(ref[r, c]),
               "bound": float(bound[r, c])}
    wder = ("|w - w_ref| <= rs (e_i S + s_i sum e)/(S (S - sum e)) + 2(k+3) u32 |w|"
            + (f" + {extra_rel:.3g} |w| (expert path)" if extra_rel else "") + "; " + sm.derivation)
    wmet = {"max_abs": float(err[torch.isfinite(err)].max()) if torch.isfinite(err).any() else math.inf,
            "worst_over_bound": worst, "violations": n_over, "elements": err.numel()}
    if verdict == "pass":
        wmsg = f"{label} weights: within the derived bound (worst {worst:.3g}x)"
    else:
        bad = torch.nonzero((err > bound) | (torch.isnan(got) & ~torch.isnan(ref)))
        seen = []
        for rr, cc in bad.tolist():
            t = int(rows[rr])
            if len(seen) >= MAX_DIAG:
                break
            m = (f"token {t}: expert {int(gid[rr, cc])} weight {float(got[rr, cc]):.8g}, expected "
                 f"{float(ref[rr, cc]):.8g} (bound {float(bound[rr, cc]):.3g})")
            seen.append(m)
            diags.append({"token": t, "kind": "weight", "expert": int(gid[rr, cc]), "got": float(got[rr, cc]),
                          "want": float(ref[rr, cc]), "bound": float(bound[rr, cc]), "message": m})
        wmsg = (f"{label} weights: {verdict}; {n_over} / {err.numel()} weights beyond the derived bound "
                f"(worst {worst:.3g}x); " + "; ".join(seen[:3]) + ("; " + "; ".join(reasons) if reasons else ""))
    return [ids_c, Comparison("weights", verdict, wmet, {"worst_over_bound": 1.0, "violations": 0},
                              {"tolerance": wder}, worst_d, wmsg)], diags


def decode_fingerprint(y: torch.Tensor, num_experts: int, topk: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Layer output [T, D] -> (ids [T, topk] (-1 padded), weights [T, topk], overflow tokens).

    Non-zero lanes are the experts that processed the token; a token with more than ``topk`` non-zero lanes
    keeps its ``topk`` largest and is listed in overflow with its full set."""
    yl = y.detach().cpu().double()[:, :num_experts]
    amp = fingerprint_amplitude()
    nz = (yl.abs() > FP_FLOOR) | torch.isnan(yl)
    cnt = nz.sum(-1)
    key = torch.where(nz, yl.abs().nan_to_num(math.inf), torch.full_like(yl, -1.0))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :topk]
    ids = torch.where(torch.gather(nz, 1, order), order, torch.full_like(order, -1))
    w = torch.where(ids >= 0, yl.gather(1, order) / amp, torch.zeros_like(yl[:, :topk]))
    overflow = [(t, torch.nonzero(nz[t]).flatten().tolist()) for t in torch.nonzero(cnt > topk).flatten().tolist()]
    return ids, w, overflow


def dense_routes(ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, E] sum of weights per (token, expert), ignoring -1 ids."""
    ids = ids.long()
    ok = ids >= 0
    d = torch.zeros(ids.shape[0], num_experts, dtype=torch.float64)
    d.scatter_add_(1, torch.where(ok, ids, torch.zeros_like(ids)), torch.where(ok, weights.double(), 0.0))
    return d


def compare_dense(got: torch.Tensor, want: torch.Tensor, *, label: str, rel: float, output: str = "y",
                  what: str = "experts") -> tuple[list[Comparison], list[dict]]:
    """Fingerprint comparison of two dense [T, E] weight maps: the sets of non-zero lanes must match exactly
    per token and the weights within ``rel`` relative (+ fp32 subnormal resolution)."""
    diags = []
    gz = (got.abs() > FP_FLOOR) | torch.isnan(got)
    wz = (want.abs() > FP_FLOOR) | torch.isnan(want)
    rows_bad = torch.nonzero((gz != wz).any(-1)).flatten().tolist()
    for t in rows_bad[:MAX_DIAG]:
        g_set = torch.nonzero(gz[t]).flatten().tolist()
        w_set = torch.nonzero(wz[t]).flatten().tolist()
        diags.append({"token": t, "kind": "mismatch", "got": g_set, "want": w_set,
                      "message": token_message(t, g_set, w_set, what)})
    both = gz & wz
    err = (got - want).abs()
    bound = rel * want.abs() + 4 * TINY32
    over = both & ((err > bound) | torch.isnan(got))
    for t, e in torch.nonzero(over).tolist()[:MAX_DIAG]:
        diags.append({"token": t, "kind": "weight", "expert": e, "got": float(got[t, e]), "want": float(want[t, e]),
                      "bound": float(bound[t, e]),
                      "message": f"token {t}: expert {e} weight {float(got[t, e]):.8g}, expected "
                                 f"{float(want[t, e]):.8g} (bound {float(bound[t, e]):.3g})"})
    n_over = int(over.sum())
    verdict = "pass"
    if torch.isnan(got).any() and not torch.isnan(want).any():
        verdict = "catastrophic"
    elif rows_bad or n_over:
        verdict = "fail"
    msgs = [d["message"] for d in diags][:4]
    msg = (f"{label} {output}: {len(rows_bad)} / {got.shape[0]} tokens processed by a different expert set, "
           f"{n_over} weights beyond {rel:.3g} relative" + ("; " + "; ".join(msgs) if msgs else ""))
    return [Comparison(output, verdict, {"rows_differing": len(rows_bad), "violations": n_over},
                       {"rows_differing": 0, "violations": 0},
                       {"tolerance": f"fingerprint: exact expert sets; weights within {rel:.3g} relative"},
                       {"index": [rows_bad[0]]} if rows_bad else {},
                       msg if verdict != "pass" else f"{label} {output}: fingerprints equal")], diags


# ---------------------------------------------------------------------------------------------------
# random (not fingerprint) expert weights: an elementwise float comparison with a derived per-element scale
RANDOM_LAMBDA = 6.0   # Hoeffding / Higham-Mary lambda of every random sum below (tolerances.gamma_prob)


def random_expert_scale(x, ids, weights, w1, w3, w2, *, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element magnitude scale S [T, D] of y = sum_k w_k E_k(x) with random expert weights, and the
    per-slot expert outputs' magnitude |E_k(x)| summed as ``ye_abs`` [T, k, D] (for routing-weight errors).

    x and the weights are bf16-exact in the random rows (``conformance.cases.moe._make_random_experts``), so
    no subject rounds an input: every rounding source lies inside the expert. For expert e on token t with
    g = W1 x, u = W3 x, a = SiLU(min(g, L)) clamp(u, -L, L), ye = W2 a:
        S_i = lambda sqrt(sum_k w_k^2 [sum_m W2_im^2 (fg_m^2 G_m^2 + fu_m^2 U_m^2 + a_m^2) + ye_i^2]) + |y_i|
    fg = d a / d g = SiLU'(g) clamp(u) on the unclamped side (g < L + margin), fu = SiLU(min(g, L)) where
    |u| < L + margin (the clamp is 1-Lipschitz); margin = 2 lambda u_bf16 sqrt(G^2) so a g that either side
    may round across the clamp keeps its sensitivity. G_m^2 = sum_j (W1_mj x_j)^2 + g_m^2 is GEMM-1's
    random-sum magnitude (accumulation and the rounding of g), U likewise; a_m^2 the activation's rounding,
    ye_i^2 the rounding of each expert's output before it is weighted (vLLM applies the routing weight after
    W2, spec 8.5), |y_i| the output's. The rounding of each source is <= u |v| with independent signs, so
    each level's relative tolerance times S bounds the error at lambda = 6. fp64."""
    x = x.detach().double()
    T, D = x.shape
    k = ids.shape[1]
    ids = ids.long()
    L = float(limit)
    acc = torch.zeros(T, D, dtype=torch.float64)
    y = torch.zeros(T, D, dtype=torch.float64)
    ye_abs = torch.zeros(T, k, D, dtype=torch.float64)
    lam = RANDOM_LAMBDA
    for e in torch.unique(ids[ids >= 0]).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        xe = x[tok]
        a1, a3, a2 = w1[e].double(), w3[e].double(), w2[e].double()
        g, u = xe @ a1.T, xe @ a3.T
        G2 = (xe * xe) @ (a1 * a1).T + g * g
        U2 = (xe * xe) @ (a3 * a3).T + u * u
        gc, uc = g.clamp(max=L), u.clamp(-L, L)
        sg = torch.sigmoid(gc)
        act = gc * sg
        fg = sg * (1 + gc * (1 - sg)) * uc * (g < L + 2 * lam * UBF16 * G2.sqrt())
        fu = act * (u.abs() < L + 2 * lam * UBF16 * U2.sqrt())
        a = act * uc
        ye = a @ a2.T
        we = weights[tok, slot].double().unsqueeze(-1)
        t_k = (fg * fg * G2 + fu * fu * U2 + a * a) @ (a2 * a2).T + ye * ye
        acc.index_add_(0, tok, we * we * t_k)
        y.index_add_(0, tok, we * ye)
        ye_abs[tok, slot] = ye.abs()
    return lam * acc.sqrt() + y.abs(), ye_abs


def random_expert_tol(level: str, n: int) -> Tolerance:
    """Relative tolerance on ``random_expert_scale`` per level (n = max(D, I), the longest reduction)."""
    return _random_expert_elementwise_tol(level, n).with_rms(**_random_expert_rms(level, n))


def _random_expert_rms(level: str, n: int) -> dict:
    """Quadrature model (``conformance.rms``) relative to the quadrature magnitude Q of
    ``random_expert_quadrature``: Q^2 = sum over the rounding sources of their squared magnitude, so one
    rounding of unit roundoff u per source gives E[e^2] = u^2/3 Q^2; the fp32 GEMMs add (n + 4) u32^2/3 S^2."""
    fp = (n + 4) * U32**2 / 3
    if level == "fp64":
        return dict(ms_scale=fp, derivation=f"random experts: ({n}+4) fp32 roundings u32^2/3 = {fp:.3g} S^2")
    if level == "fp32":
        return dict(ms_scale=2 * fp, derivation=f"random experts: two fp32 evaluations = {2 * fp:.3g} S^2")
    if level == "emulated":
        r = (2 * (n + 4) / 3) ** 0.5 * U32
        ms = UBF16**2 + 2 * UBF16 * r + r * r
        return dict(ms_rel=ms, derivation=(
            f"random experts: per source one intermediate bf16 rounding placed differently (ub^2, as "
            f"conformance.cases._serving) + bf16 flips under the fp32 order disagreement r = sqrt(2({n}+4)/3) u32 "
            f"= {r:.3g}: ub^2 + 2 ub r + r^2 = {ms:.3g} Q^2"))
    rel = UBF16**2 / 3
    return dict(ms_rel=rel, ms_scale=fp, derivation=(
        f"random experts: one bf16 rounding per source (g, u, a, expert output, y) ub^2/3 = {rel:.3g} Q^2 "
        f"+ fp32 ({n}+4) u32^2/3 S^2"))


def _random_expert_elementwise_tol(level: str, n: int) -> Tolerance:
    g32 = (n + 4) * U32   # fp32: each GEMM's 6 sqrt(n) u32 sum|.| <= 6 n u32 sqrt(sum (.)^2), 4 elementwise ops
    # 1.1 covers second-order terms (products of two relative errors, each <= 2^-7)
    if level == "fp64":
        r = 1.1 * g32
        return Tolerance(0.0, r, f"random experts: fp32 golden 1.1*({n}+4)*u32 = {r:.3g} of S")
    if level == "fp32":
        r = 2.2 * g32
        return Tolerance(0.0, r, f"random experts: two fp32 evaluations 2*1.1*({n}+4)*u32 = {r:.3g} of S")
    if level == "emulated":
        # identical bf16 x and weights: g, u, a, ye, y may round to the neighbouring bf16 value (2 u_bf16) where
        # the two sides' fp32 values straddle a rounding boundary, plus both sides' fp32 order
        r = 1.1 * (2 * UBF16 + 2 * g32)
        return Tolerance(0.0, r, f"random experts: one bf16 ulp of each rounded value (2*2^-8) + fp32 order "
                         f"2*({n}+4)*u32, x1.1 = {r:.3g} of S")
    if level == "serving":
        r = 1.1 * (UBF16 + g32)
        return Tolerance(0.0, r, f"random experts: every rounding source (bf16 g, u, a, expert output, y) <= 2^-8 "
                         f"relative, random sums at lambda 6 in S, + fp32 ({n}+4)*u32, x1.1 = {r:.3g} of S")
    raise ValueError(f"unknown comparison level {level!r}")


def compare_random_experts(got_y, want_y, kwargs: dict, ids, weights, *, level: str, label: str,
                           dw: torch.Tensor | None = None, skip_rows: torch.Tensor | None = None,
                           output: str = "y") -> Comparison:
    """y of a random-weight row against the golden: |got - want| <= r_level S + sum_k dw_k |E_k(x)| elementwise
    (dw: the routing weights' own error bound, ``weight_bound``, for a whole layer; None for given routes), with
    the systematic gain / offset statistics (``metrics.compare_float``). ``skip_rows``: tokens not compared
    (a whole layer's near-tie tokens, whose expert set may legitimately differ)."""
    from ..metrics import compare_float

    n = max(kwargs["w1"].shape[-1], kwargs["w1"].shape[-2])
    tol = random_expert_tol(level, n)
    S, ye_abs = random_expert_scale(kwargs["x"], ids, weights, kwargs["w1"], kwargs["w3"], kwargs["w2"],
                                    limit=kwargs["limit"])
    w = want_y.detach().cpu().double()
    # the quadrature magnitude of the rounding sources (RMS model, _random_expert_rms): (S - |y|) / lambda is
    # their root sum of squares, |y| the output's own rounding
    Q2 = ((S - w.abs()).clamp_min(0) / RANDOM_LAMBDA).square() + w.square()
    if dw is not None:
        # the routing weights' error moves each expert's output wholesale: a worst-case sum over the k slots,
        # folded into the scale so that the bound stays r S + sum_k dw_k |E_k|
        dterm = (dw.double().unsqueeze(-1) * ye_abs).sum(1)
        S = S + dterm / tol.rtol
        # in the RMS model the same worst-case term counts as one uniform step: dterm^2 / 3 expected
        Q2 = Q2 + dterm.square() / (3 * tol.ms_rel)
        tol = dataclasses.replace(tol, derivation=tol.derivation + " + sum_k dw_k |E_k(x)| (routing-weight bound)",
                                  ms_derivation=tol.ms_derivation + " + (sum_k dw_k |E_k(x)|)^2/3 (routing weights)")
    g = got_y.detach().cpu().double()
    if skip_rows is not None and bool(skip_rows.any()):
        keep = ~skip_rows
        g, w, S, Q2 = g[keep], w[keep], S[keep], Q2[keep]
    Q = Q2.sqrt()
    return compare_float(g, w, tol, output=output, scale=S, label=label, ulp_dtype=torch.bfloat16, level=level,
                         rms_magnitude=Q)


def decode_metadata(meta: dict, topk: int, num_tokens: int, num_experts: int) -> tuple[list, list]:
    """Per token: the expert set the metadata sends it to (from gather_idx + offsets) and from scatter_idx."""
    gather = meta["gather_idx"].long()
    offs = meta["expert_offsets"].long()
    via_gather = [set() for _ in range(num_tokens)]
    pos = torch.arange(gather.numel())
    ok = (gather >= 0) & (gather < num_tokens * topk)
    seg = torch.searchsorted(offs[1:].contiguous(), pos, right=True)
    ok &= seg < num_experts
    for p_, e_ in zip(gather[ok].tolist(), seg[ok].tolist()):
        via_gather[p_ // topk].add(e_)
    return via_gather, []


def compare_metadata(got: dict, want: dict, topk_ids: torch.Tensor, *, label: str,
                     guards: dict | None = None) -> tuple[list[Comparison], list[dict]]:
    """Exact comparison of every metadata output, explained per token, plus the guard bands."""
    comps, diags = [], []
    T, k = topk_ids.shape
    E = want["expert_counts"].numel()
    for name in META_OUTPUTS:
        if name not in got:
            comps.append(Comparison(name, "fail", message=f"{label} {name}: missing output"))
            continue
        g, w = got[name].detach().cpu().long().flatten(), want[name].long().flatten()
        if g.shape != w.shape:
            comps.append(Comparison(name, "fail", message=f"{label} {name}: shape {tuple(got[name].shape)} "
                                                          f"!= {tuple(want[name].shape)}"))
            continue
        bad = torch.nonzero(g != w).flatten()
        if bad.numel() == 0:
            comps.append(Comparison(name, "pass", {"mismatches": 0}, {"mismatches": 0},
                                    message=f"{label} {name}: exact"))
            continue
        i = int(bad[0])
        if name in ("gather_idx",):
            what = (f"position {i} holds pair {int(g[i])} (token {int(g[i]) // k}, slot {int(g[i]) % k}), "
                    f"expected pair {int(w[i])} (token {int(w[i]) // k}, slot {int(w[i]) % k})")
        elif name == "scatter_idx":
            what = (f"token {i // k} slot {i % k} (expert {int(topk_ids.flatten()[i])}): position {int(g[i])}, "
                    f"expected {int(w[i])}")
        else:
            what = f"expert {i}: {int(g[i])}, expected {int(w[i])}"
        comps.append(Comparison(name, "fail", {"mismatches": int(bad.numel())}, {"mismatches": 0},
                                {"tolerance": "exact"}, {"index": [i], "got": int(g[i]), "want": int(w[i])},
                                f"{label} {name}: {bad.numel()} / {g.numel()} entries differ; first: {what}"))
    # per-token view: where does the gather order send each token?
    if all(n in got for n in ("gather_idx", "expert_offsets")) and not all(c.verdict == "pass" for c in comps):
        via, _ = decode_metadata({k_: got[k_].detach().cpu() for k_ in ("gather_idx", "expert_offsets")},
                                 k, T, E)
        ids = topk_ids.long()
        bad_tok = []
        for t in range(T):
            want_set = {i for i in ids[t].tolist() if i >= 0}
            if via[t] != want_set:
                bad_tok.append(t)
                if len(bad_tok) <= MAX_DIAG:
                    diags.append({"token": t, "kind": "mismatch", "got": sorted(via[t]), "want": sorted(want_set),
                                  "message": token_message(t, via[t], want_set) + " (decoded from gather_idx)"})
        # duplicates in gather
        g = got["gather_idx"].detach().cpu().long().flatten()
        gv = g[g >= 0]
        n_dup = int(gv.numel() - torch.unique(gv).numel())
        if bad_tok or n_dup:
            msgs = [d["message"] for d in diags[:3]]
            comps.append(Comparison("tokens", "fail", {"tokens_differing": len(bad_tok), "duplicate_pairs": n_dup},
                                    {"tokens_differing": 0, "duplicate_pairs": 0}, {"tolerance": "exact"},
                                    {"index": [bad_tok[0]] if bad_tok else []},
                                    f"{label} tokens: {len(bad_tok)} / {T} tokens reach a different expert set "
                                    f"through gather_idx, {n_dup} duplicated pairs; " + "; ".join(msgs)))
    if guards:
        comps.append(guard_comparison(guards, label))
    return comps, diags


def guard_comparison(guards: dict, label: str) -> Comparison:
    hits = {name: t for name, t in guards.items() if t["before"] or t["after"]}
    if not hits:
        return Comparison("canaries", "pass", {"guard_writes": 0}, {"guard_writes": 0},
                          message=f"{label} canaries: untouched ({len(guards)} buffers)")
    parts = []
    for name, t in hits.items():
        side = []
        if t["before"]:
            side.append(f"{len(t['before'])} element(s) before the start (offset {t['before'][0]})")
        if t["after"]:
            side.append(f"{len(t['after'])} element(s) past the end (first at end+{t['after'][0]})")
        parts.append(f"{name}: " + ", ".join(side))
    n = sum(len(t["before"]) + len(t["after"]) for t in hits.values())
    return Comparison("canaries", "fail", {"guard_writes": n}, {"guard_writes": 0},
                      {"tolerance": "guard bands must stay untouched"}, {},
                      f"{label} canaries: out-of-bounds writes into guard bands: " + "; ".join(parts))


# ---------------------------------------------------------------------------------------------------
# expert parallel
def expert_maps(num_experts: int, ranks: int) -> list[torch.Tensor]:
    """Contiguous partition: rank r owns [r E/R, (r+1) E/R); map[g] = g - start there, -1 elsewhere."""
    if num_experts % ranks:
        raise ValueError(f"{num_experts} experts do not split evenly over {ranks} ranks")
    per = num_experts // ranks
    maps = []
    for r in range(ranks):
        m = torch.full((num_experts,), -1, dtype=torch.int32)
        m[r * per:(r + 1) * per] = torch.arange(per, dtype=torch.int32)
        maps.append(m)
    return maps


# ---------------------------------------------------------------------------------------------------
# the check: one case, one subject -> CheckResult rows (check="routing")
def _context(info):
    from .numeric import context_params

    return context_params(info)


def _mk_row(name, info, impl, case, level, comps, diags, t, ctx, rerun, what="") -> CheckResult:
    from .numeric import comparisons_row

    near = [d for d in diags if d.get("kind") == "near-tie"]
    return comparisons_row("routing", name, info, impl, case, level, comps, t, ctx, rerun,
                           prefix=f"[{what}] " if what else "",
                           extra={"tokens": diags[:3 * MAX_DIAG], "near_ties": [d["message"] for d in near],
                                  "what": what})


def _levels(subject, spec):
    level = getattr(subject, "comparison_level", lambda: "serving")()
    out = [(level, None)]
    prof = subject.emulation_profile()
    if prof and spec.emulate is not None:
        out.append(("emulated", prof))
    return out


def run_routing(subject, case, *, subject_name: str | None = None, rerun: str = "",
                emulated_cache: dict | None = None, ranks: tuple = (2, 4)) -> list[CheckResult]:
    """Routing checks of one moe.* case against one subject (rows with check="routing")."""
    from .. import components
    from .numeric import _as_outputs, _clone, emulated_outputs

    spec = components.get(case.component)
    info = subject.info()
    name = subject_name or info.name
    impls = subject.provides()
    if case.component not in impls:
        return [CheckResult(name, case.id, case.component, "routing", "-", "not-provided",
                            message=absent_reason(subject, case.component, name), device=info.device,
                            dialect=info.dialect, emulated=info.emulated, params=dict(case.params, **_context(info)),
                            rerun=rerun)]
    impl = impls[case.component]
    ctx = _context(info)
    kwargs = case.make_inputs()
    params = dict(case.params, **ctx)
    label = f"[{case.component} | {case.id} | {name}]"
    from references.precision import golden_mode

    def err_row(what, e):
        if isinstance(e, Unsupported):   # the implementation does not do these inputs: not a verdict
            return CheckResult(name, case.id, case.component, "routing", what, "not-provided",
                               message=f"{label} {impl.function} does not support this case: {e}",
                               function=impl.function, backend=impl.backend, device=info.device,
                               dialect=info.dialect, emulated=info.emulated, params=params, seed=case.seed,
                               rerun=rerun)
        return CheckResult(name, case.id, case.component, "routing", what, "error",
                           message=f"{label} {impl.function} raised {type(e).__name__}: {e}",
                           function=impl.function, backend=impl.backend, device=info.device,
                           dialect=info.dialect, emulated=info.emulated, params=params, seed=case.seed,
                           rerun=rerun, extra={"traceback": traceback.format_exc(limit=8)})

    with golden_mode():
        want = _as_outputs(spec, spec.reference(**_clone(kwargs)))
    rows = []
    t0 = time.perf_counter()
    extra_kw, guards_bases = {}, {}
    if case.component == "moe.routing_metadata":
        for nm, shp in meta_shapes(kwargs["topk_ids"], kwargs["num_experts"]).items():
            base, view = guarded(shp, torch.int32)
            guards_bases[nm] = (base, math.prod(shp))
            extra_kw.setdefault("out", {})[nm] = view
    elif case.component == "moe.experts":
        base, view = guarded(tuple(kwargs["x"].shape), torch.float32)
        guards_bases["out"] = (base, kwargs["x"].numel())
        extra_kw["out"] = view
    try:
        got = _as_outputs(spec, impl.fn(**_clone(kwargs), **extra_kw))
    except MemoryError:   # out of memory is a crash of the case (conformance.isolate), not a verdict
        raise
    except Exception as e:
        return [err_row("-", e)]
    t = time.perf_counter() - t0
    guards = {nm: touched_guards(b, n) for nm, (b, n) in guards_bases.items()}
    for level, prof in _levels(subject, spec):
        ref = want if prof is None else emulated_outputs(spec, case, kwargs, prof, emulated_cache)
        lab = label + (f" vs emulated:{prof}" if prof else "")
        comps, diags = routing_compare(case.component, got, ref, params, level, lab, kwargs,
                                       guards=guards if prof is None else None)
        rows.append(_mk_row(name, info, impl, case, level, comps, diags, t, ctx, rerun))
    # expert parallel: the expert map is a routing property, checked on the fingerprint rows (whose decoded
    # lanes name the expert that ran); random-weight rows check the arithmetic
    if case.component == "moe.experts" and ranks and case.params.get("weights") != "random":
        try:
            rows.extend(run_expert_parallel(impl, kwargs, want, params, name, info, case, ctx, rerun, label,
                                            ranks, level=rows[0].level))
        except MemoryError:
            raise
        except Exception as e:
            rows.append(err_row("expert-parallel", e))
    return rows


# the components routing_compare judges (the routing suite runs these; other moe.* components with their own
# compare hook, such as moe.experts_nvfp4, are judged by the numeric suite alone)
ROUTED_COMPONENTS = ("moe.router", "moe.hash_router", "moe.layer", "moe.experts", "moe.routing_metadata")


def routing_compare(component: str, got: dict, want: dict, params: dict, level: str, label: str, kwargs: dict,
                    guards: dict | None = None) -> tuple[list[Comparison], list[dict]]:
    """Dispatch on the component (also the ``compare`` hook of the moe.* ComponentSpecs)."""
    profile = params.get("profile", "ocp")
    if component in ("moe.router", "moe.hash_router"):
        hashed = component == "moe.hash_router"
        bias = None if hashed else kwargs.get("bias")
        sm = score_model(kwargs["x"], kwargs["weight"], bias, level, profile)
        return compare_route(got["ids"], got["weights"], want["ids"], want["weights"], sm,
                             route_scale=kwargs["route_scale"], eps=renorm_eps(kwargs.get("variant", "official")),
                             label=label, hashed=hashed)
    if component == "moe.layer" and params.get("weights") == "random":
        return _compare_random_layer(got, want, params, level, label, kwargs, profile), []
    if component == "moe.layer":
        hashed = kwargs.get("tid2eid") is not None
        E = kwargs["w1"].shape[0]
        k = kwargs["topk"]
        sm = score_model(kwargs["x"], kwargs["gate_weight"], None if hashed else kwargs.get("gate_bias"),
                         level, profile)
        g_ids, g_w, overflow = decode_fingerprint(got["y"], E, k)
        w_ids, w_w, _ = decode_fingerprint(want["y"], E, k) if "ids" not in want else (want["ids"], want["weights"], [])
        comps, diags = compare_route(g_ids, g_w, w_ids, w_w, sm, route_scale=kwargs["route_scale"],
                                     eps=renorm_eps(kwargs.get("route_variant", "official")), label=label + " y",
                                     hashed=hashed, extra_rel=_expert_rel(level))
        if overflow:
            t, s = overflow[0]
            comps.append(Comparison("y", "fail", {"overflow_tokens": len(overflow)}, {"overflow_tokens": 0}, {}, {},
                                    f"{label} y: {len(overflow)} tokens processed by more than {k} experts; token "
                                    f"{t}: experts {_fmt_set(s)}"))
        return comps, diags
    if component == "moe.experts" and params.get("weights") == "random":
        comps = [compare_random_experts(got["y"], want["y"], kwargs, kwargs["ids"], kwargs["weights"], level=level,
                                        label=label)]
        if guards:
            comps.append(guard_comparison(guards, label))
        return comps, []
    if component == "moe.experts":
        E = kwargs["num_experts"] if "num_experts" in kwargs else kwargs["w1"].shape[0]
        gd = decode_dense(got["y"], E)
        wd = decode_dense(want["y"], E)
        comps, diags = compare_dense(gd, wd, label=label, rel=_expert_rel(level))
        if guards:
            comps.append(guard_comparison(guards, label))
        return comps, diags
    if component == "moe.routing_metadata":
        return compare_metadata(got, want, kwargs["topk_ids"], label=label, guards=guards)
    raise KeyError(f"no routing comparison for component {component!r}")


def _compare_random_layer(got, want, params, level, label, kwargs, profile) -> list[Comparison]:
    """A whole routed layer with random experts: y against the golden's y on the golden's routes, the bound
    widened by the routing weights' error (``weight_bound`` on the level's score model). Tokens whose golden
    selection boundary is a near-tie under that score model (k-th and (k+1)-th selection scores within both
    bounds) may legitimately take another expert set; they are not compared and are counted in the message."""
    hashed = kwargs.get("tid2eid") is not None
    k = kwargs["topk"]
    sm = score_model(kwargs["x"], kwargs["gate_weight"], None if hashed else kwargs.get("gate_bias"), level, profile)
    ids, w = want["ids"].long(), want["weights"].double()
    T = ids.shape[0]
    tie = torch.zeros(T, dtype=torch.bool)
    if not hashed and k < sm.sel.shape[-1]:
        top = torch.topk(sm.sel, k + 1, dim=-1)
        kv, ki, k1v, k1i = top.values[:, k - 1], top.indices[:, k - 1], top.values[:, k], top.indices[:, k]
        tie = (kv - k1v) <= sm.esel.gather(1, ki[:, None])[:, 0] + sm.esel.gather(1, k1i[:, None])[:, 0]
    gid = ids.clamp(min=0)
    dw = weight_bound(sm.s.gather(1, gid), sm.e.gather(1, gid), kwargs["route_scale"],
                      renorm_eps(kwargs.get("route_variant", "official")), w)
    dw = torch.where(ids >= 0, dw, torch.zeros_like(dw))
    c = compare_random_experts(got["y"], want["y"], kwargs, ids, w, level=level, label=label, dw=dw, skip_rows=tie)
    c.metrics["near_tie_rows"] = int(tie.sum())
    c.message += f"; {int(tie.sum())} / {T} near-tie tokens not compared"
    return [c]


def _expert_rel(level: str) -> float:
    """Relative rounding of a fingerprint weight through the expert path: fp64 level 4 u32 (x, a, y, w);
    serving 6 u_bf16 (bf16 input, activation, product and output, weight placement before/after W2);
    emulated 4 u_bf16 (the same roundings may land on neighbouring bf16 values)."""
    return {"fp64": 4 * U32, "serving": 6 * UBF16, "emulated": 4 * UBF16}[level]


def decode_dense(y: torch.Tensor, num_experts: int) -> torch.Tensor:
    return y.detach().cpu().double()[:, :num_experts] / fingerprint_amplitude()


def run_expert_parallel(impl, kwargs, want, params, name, info, case, ctx, rerun, label, ranks, level):
    """Sum over ranks of the subject's experts with per-rank expert maps == its single-rank output (and the
    golden fingerprint)."""
    from .. import components
    from .numeric import _as_outputs, _clone

    spec = components.get(case.component)
    E = kwargs["w1"].shape[0]
    rows = []
    single = _as_outputs(spec, impl.fn(**_clone(kwargs)))["y"]
    sd = decode_dense(single, E)
    wd = decode_dense(want["y"], E)
    rel = _expert_rel(level)
    for R in ranks:
        if E % R:
            continue
        t0 = time.perf_counter()
        total = None
        for m in expert_maps(E, R):
            own = torch.nonzero(m >= 0).flatten()
            kw = dict(_clone(kwargs), w1=kwargs["w1"][own].clone(), w3=kwargs["w3"][own].clone(),
                      w2=kwargs["w2"][own].clone(), expert_map=m.clone())
            y = _as_outputs(spec, impl.fn(**kw))["y"].detach().cpu().double()
            total = y if total is None else total + y
        td = total[:, :E] / fingerprint_amplitude()
        lab = f"{label} EP {R} ranks"
        c1, d1 = compare_dense(td, sd, label=lab + " sum vs single rank", rel=2 * rel, output="rank_sum")
        c2, d2 = compare_dense(td, wd, label=lab + " sum vs golden", rel=rel, output="rank_sum_golden")
        rows.append(_mk_row(name, info, impl, case, f"ep{R}", c1 + c2, d1 + d2, time.perf_counter() - t0, ctx,
                            rerun, what=f"expert parallel, {R} ranks"))
    return rows


__all__ = ["run_routing", "routing_compare", "compare_route", "score_model", "weight_bound", "decode_fingerprint",
           "expert_maps", "token_message"]
