"""Lightning indexer: weighted ReLU scores and the causal top-k (spec 3.8)."""

from __future__ import annotations

import torch

from references.components.indexer import indexer_scores, indexer_topk
from references.components.qat import quant_indexer
from references.numerics import serving

from ..components import ComponentSpec, OutputSpec, register
from ._case import Case, add, dist_tensor
from ._serving import _round, level_tolerance, serving_emulation


def idx_scores(q, k, w) -> torch.Tensor:
    return indexer_scores(q, k, w)


def idx_topk(scores, positions, *, ratio: int, topk: int) -> torch.Tensor:
    return indexer_topk(scores, positions, ratio=ratio, topk=topk)


def _score_scale(kw, want):
    # I = sum_h w_h ReLU(q_h . k): bounded by sum_h |w_h| sum_i |q_hi k_i|
    q, k, w = kw["q"].double().abs(), kw["k"].double().abs(), kw["w"].double().abs()
    return torch.einsum("th,thd,nd->tn", w, q, k)


def _emulate_scores(profile: str):
    """The serving numerics of the scores: q, K, w arrive in bf16; the serving path then holds q and K in FP8
    (one block per 128-vector, power-of-two scale, the profile's dialect and max: ``serving(profile)
    .indexer_q`` / ``.indexer_k``): q quantised by the fused indexer-q kernel
    (``models/deepseek_v4/common/ops/fused_indexer_q.py:163``, fp8_max 224 on fnuz, 448 OCP, ``:223``), K read
    from the FP8 indexer-K cache the compressor writes (``fused_compress_quant_cache.py:278-291``); the logits
    kernels (``fp8_paged_mqa_logits`` / ``fp8_mqa_logits``) take those FP8 operands and compute in fp32.
    Without these two roundings the emulation was the bf16-only path no serving build runs: every vLLM row then
    sat at 6.5-9.6x the emulated RMS model (calc_diff 4.3e-4 - 7.1e-4 against it, measured 2026-12-07)."""
    numerics = serving(profile)

    def fn(q, k, w):
        q8 = quant_indexer(_round(q), numerics.indexer_q, numerics.indexer_hadamard)
        k8 = quant_indexer(_round(k), numerics.indexer_k, numerics.indexer_hadamard)
        return {"scores": idx_scores(q8, k8, _round(w))}

    fn.__qualname__ = f"_emulate_scores[{profile}]"
    return fn


# Serving: q, K, w bf16 (3 roundings), then q and K one e4m3 rounding each (unit 2^-4) at a power-of-two block
# scale: |dq_i| <= 2^-4 |q_i| for normal codes; subnormal codes (|x| < 2^-6 s, s the block scale) err by at most
# 2^-10 s absolute, below 2^-4 of the block's largest term. Each perturbs one term of the dot product, so the
# logit moves by at most (2 * 2^-4 + 3 ub) sum |q_i k_i|, ReLU is 1-Lipschitz and w weighs the heads: relative to
# the scale sum_h |w_h| sum_i |q_hi k_i|. In quadrature the two e4m3 roundings add 2 (2^-4)^2/3 relative to
# |want| (zero-mean terms).
register(ComponentSpec(
    name="indexer.scores", family="indexer", reference=idx_scores,
    outputs=(OutputSpec("scores", tol=level_tolerance(n=128 * 64, k_inputs=3, fp8_inputs=2, what="indexer scores"),
                        scale=_score_scale),),
    description="I[t,s] = sum_h w[t,h] ReLU(q[t,h] . k[s])", spec_section="3.8",
    emulate=_emulate_scores,
    divergences=("OFF: Hadamard + FP4 on q and K; vLLM: FP8 q/K without Hadamard (spec 8.4)",),
))
register(ComponentSpec(
    name="indexer.topk", family="indexer", reference=idx_topk,
    outputs=(OutputSpec("idx", kind="index-set"),),
    description="causal top-k over compressed entries s < floor((t+1)/ratio), -1 padded", spec_section="3.8",
    emulate=serving_emulation(idx_topk, bf16_inputs=(), bf16_outputs=(), output_names=("idx",)),
))


def _make_scores(g, p):
    T, H, N = p["tokens"], p["heads"], p["n"]
    return {"q": dist_tensor(g, (T, H, 128), p["dist"]), "k": dist_tensor(g, (N, 128), p["dist"]),
            "w": torch.randn(T, H, generator=g) * (128 * H) ** -0.5}


def _make_topk(g, p):
    T, N, ratio = p["tokens"], p["n"], p["ratio"]
    # distinct scores (a permutation of a grid) so the golden set is unambiguous; positions cover the
    # causal boundary: entries visible = floor((t+1)/ratio)
    scores = torch.stack([torch.randperm(N, generator=g).float() for _ in range(T)])
    positions = torch.randint(0, N * ratio, (T,), generator=g)
    positions[0] = p["topk"] * ratio - 1          # exactly topk visible
    if T > 1:
        positions[1] = p["topk"] * ratio - 2      # one fewer than topk visible
    if p.get("whole_context"):
        positions[-1] = N * ratio - 1             # the last token sees every entry (the long context itself)
    return {"scores": scores, "positions": positions, "ratio": ratio, "topk": p["topk"]}


for tokens, heads, n, seed in [(1, 64, 600, 0), (9, 8, 130, 1)]:
    add(Case(f"indexer.scores/t{tokens}h{heads}n{n}/s{seed}", "indexer.scores", _make_scores,
             {"tokens": tokens, "heads": heads, "n": n}, seed, "normal", ("decode" if tokens == 1 else "prefill",)))
for tokens, n, topk, seed in [(4, 600, 512, 0), (33, 1100, 512, 1), (3, 1030, 1024, 2)]:
    add(Case(f"indexer.topk/t{tokens}n{n}k{topk}/s{seed}", "indexer.topk", _make_topk,
             {"tokens": tokens, "n": n, "topk": topk, "ratio": 4}, seed, "permutation",
             ("decode" if tokens == 1 else "prefill", "long-context")))
# Tier full: contexts of 8k, 32k, 131,072 and 262,144 tokens (2,048 / 8,192 / 32,768 / 65,536 compressed entries
# at ratio 4), top-k 512 (Flash) and 1024 (Pro): past 28k tokens real kernels broke, past 2^15 entries an int16
# index wraps.
for tokens, n, topk, seed in [(8, 2048, 512, 10), (8, 8192, 1024, 11), (4, 32768, 512, 12), (3, 65536, 1024, 13)]:
    add(Case(f"indexer.topk/t{tokens}n{n}k{topk}/s{seed}", "indexer.topk", _make_topk,
             {"tokens": tokens, "n": n, "topk": topk, "ratio": 4, "whole_context": True}, seed, "permutation",
             ("prefill", "long-context"), tier="full"))
# scores at 8k, 32k and 131,072 tokens (2,048 / 8,192 / 32,768 entries at ratio 4); [T, H, N] stays <= 4M floats
for tokens, heads, n, seed in [(4, 64, 8192, 10), (4, 64, 2048, 11), (2, 64, 32768, 12)]:
    add(Case(f"indexer.scores/t{tokens}h{heads}n{n}/s{seed}", "indexer.scores", _make_scores,
             {"tokens": tokens, "heads": heads, "n": n}, seed, "normal", ("prefill", "long-context"), tier="full"))
