"""Sparse attention with the per-head sink (spec 3.10) and the inverse-RoPE grouped output projection
(spec 3.11)."""

from __future__ import annotations

import torch

from references.components.attention import output_projection, sparse_attention
from references.components.qat import quant_kv_nope
from references.components.rope import rope_inv_freq
from references.config import RopeScaling
from references.numerics import GOLDEN, Numerics

from ..components import ComponentSpec, OutputSpec, register
from ._case import Case, add, dist_tensor
from ._serving import UB, level_tolerance, serving_emulation

SCALE = 512**-0.5
# Precondition of the attention bound below: tau * sqrt(sum_i (q_i kv_i)^2) <= L_MAX for every (t, h, j).
L_MAX = 3.0


def attn_sparse(q, kv, indices, sink, *, scale: float, numerics: Numerics = GOLDEN) -> torch.Tensor:
    """Golden: unquantised kv. With ``numerics``, kv is what the FP8 cache returns: nope dims [0, 448)
    quantised in blocks of 64 in the profile's dialect, rope dims bf16 (spec 3.6, 4.5)."""
    if numerics.kv_nope is not None:
        kv = quant_kv_nope(kv, kv.shape[-1] - 64, numerics)
    return sparse_attention(q, kv, indices, sink, scale=scale, numerics=numerics)


def _attn_scale(kw, want):
    """o is a convex combination of the selected kv rows (scaled by 1 - sink weight): its error is measured
    against the largest |kv| entry of the row's selected set."""
    kv, idx = kw["kv"].double(), kw["indices"].long()
    mag = kv.abs().amax(dim=-1)[idx.clamp(min=0)].masked_fill(idx < 0, 0).amax(dim=-1)  # [T]
    return mag[:, None, None].expand_as(want)


# bf16 q and kv perturb each logit by a random sum of 512 rounding errors: |dl| <= 6 ub tau
# sqrt(sum (q_i kv_i)^2) <= 6 ub L_MAX (probabilistic, lambda = 6); a logit error dl changes the
# normalised weights by at most 2 dl relative, so o moves by 2 dl max|kv|; plus kv's own rounding (ub)
# and the output rounding (ub). The serving path also reads kv from an FP8 cache (nope dims, block 64):
# the values move by at most 2^-4 max|kv| and the logits by a random sum of e4m3 rounding errors,
# |dl| <= 6 * 2^-4 * L (same argument with u = 2^-4), so 2 dl max|kv| more. This bound is loose by
# construction (an fp32 golden against FP8 attention); the emulated level, which quantises kv the same
# way, is the tight one.
FP8_U = 2.0**-4
ATTN_TOL = level_tolerance(n=512, k_inputs=1, what="sparse attention",
                           extra_serving=2 * 6 * UB * L_MAX + FP8_U + 2 * 6 * FP8_U * L_MAX,
                           extra_reason=f"logit perturbation 2*6*(ub + 2^-4)*L, L={L_MAX}, + FP8 kv values 2^-4")
register(ComponentSpec(
    name="attn.sparse", family="attention", reference=attn_sparse,
    outputs=(OutputSpec("o", tol=ATTN_TOL, scale=_attn_scale),),
    description="sparse MQA attention over selected KV rows with the per-head sink in the denominator",
    spec_section="3.10", emulate=serving_emulation(attn_sparse, bf16_inputs=("q", "kv"), output_names=("o",)),
    divergences=("OFF rounds probabilities to bf16 before P.V (spec 8.11)",),
))


def attn_output(o, positions, wo_a, wo_b, *, o_groups: int, theta: float, yarn: bool) -> torch.Tensor:
    inv = rope_inv_freq(64, theta, RopeScaling() if yarn else None)
    return output_projection(o, positions, inv, wo_a, wo_b, o_groups=o_groups)


def _out_scale(kw, want):
    # |y| <= |wo_b| |wo_a| |o| elementwise bound: the sum of absolute products of both GEMMs
    o = kw["o"].double().abs()
    T, H, d = o.shape
    g = kw["o_groups"]
    wa = kw["wo_a"].double().abs().view(g, -1, H // g * d)
    z = torch.einsum("tgk,grk->tgr", o.reshape(T, g, -1), wa).reshape(T, -1)
    return (z @ kw["wo_b"].double().abs().T).expand_as(want)


register(ComponentSpec(
    name="attn.output", family="attention", reference=attn_output,
    outputs=(OutputSpec("y", tol=level_tolerance(n=4096 + 1024, k_inputs=3, what="inverse rope + wo_a + wo_b"),
                        scale=_out_scale),),
    description="inverse RoPE at the query position, grouped low-rank wo_a, then wo_b", spec_section="3.11",
    emulate=serving_emulation(attn_output, bf16_inputs=("o", "wo_a", "wo_b")),
    divergences=("vLLM CUDA quantises o to FP8 per 128 before an FP8 einsum; ROCm uses bf16 (spec 8.10)",),
))


def _make_sparse(g, p):
    T, H, N, K = p["tokens"], p["heads"], p["n_kv"], p["k"]
    q = dist_tensor(g, (T, H, 512), p["dist"])
    kv = dist_tensor(g, (N, 512), p["dist"])
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(T)])
    # a ragged batch: each row keeps a random number of valid entries, the rest -1 (and one empty row)
    keep = torch.randint(0, K + 1, (T,), generator=g)
    keep[0] = K
    if T > 2:
        keep[1] = 0
    idx = torch.where(torch.arange(K)[None, :] < keep[:, None], idx, -1)
    sink = torch.randn(H, generator=g) * 2
    L = SCALE * torch.sqrt(torch.einsum("thd,nd->thn", q.double() ** 2, kv.double() ** 2)).max()
    if L > L_MAX:  # the tolerance derivation's precondition: fail loudly instead of passing vacuously
        raise ValueError(f"case inputs break the attention bound's precondition: L = {L:.3g} > {L_MAX}")
    return {"q": q, "kv": kv, "indices": idx, "sink": sink, "scale": SCALE}


def _make_out(g, p):
    T, H, D, gr, r = p["tokens"], p["heads"], p["d"], p["groups"], p["rank"]
    return {"o": dist_tensor(g, (T, H, 512), p["dist"]), "positions": torch.randint(0, 5000, (T,), generator=g),
            "wo_a": torch.randn(gr * r, H // gr * 512, generator=g) * (H // gr * 512) ** -0.5,
            "wo_b": torch.randn(D, gr * r, generator=g) * (gr * r) ** -0.5, "o_groups": gr,
            "theta": p["theta"], "yarn": p["yarn"]}


for tokens, heads, n_kv, k, seed in [(1, 64, 300, 256, 0), (5, 8, 700, 640, 1), (33, 8, 200, 128, 2),
                                     (1024, 4, 2048, 512, 3)]:
    add(Case(f"attn.sparse/t{tokens}h{heads}/kv{n_kv}k{k}/s{seed}", "attn.sparse", _make_sparse,
             {"tokens": tokens, "heads": heads, "n_kv": n_kv, "k": k}, seed, "normal",
             ("decode",) if tokens == 1 else ("prefill", "long") if tokens >= 1024 else ("prefill",)))
for tokens, heads, d, groups, rank, theta, yarn, seed in [(1, 8, 256, 2, 128, 10000.0, False, 0),
                                                         (9, 8, 256, 2, 128, 160000.0, True, 1),
                                                         (3, 64, 4096, 8, 1024, 160000.0, True, 2),
                                                         # 37 tokens: enough clusters for the systematic detector
                                                         (37, 8, 256, 2, 128, 160000.0, True, 3)]:
    add(Case(f"attn.output/t{tokens}h{heads}g{groups}/theta{int(theta)}/s{seed}", "attn.output", _make_out,
             {"tokens": tokens, "heads": heads, "d": d, "groups": groups, "rank": rank, "theta": theta,
              "yarn": yarn}, seed, "normal", ("decode" if tokens == 1 else "prefill",)))
