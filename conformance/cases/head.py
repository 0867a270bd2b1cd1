"""The model's two ends: token embedding + HC expansion (spec 3.1) and the final HC head + final RMSNorm + LM head
(spec 3.16; the MTP head's step 5, spec 3.15, is the same map with the MTP's own hc_head / norm weights).

Inputs are bf16-exact where the serving path holds them in bf16 (the embedding table, the head and norm
weights, the residual streams X): the checkpoint stores them in bf16 and the residual stream is bf16 between
layers, so a subject that takes bf16 inputs loses nothing, and every serving-level error below comes from the
arithmetic, not from the case feeding values bf16 cannot hold.
"""

from __future__ import annotations

import torch

from references.components.embedding import embed, hc_expand
from references.components.head import final_head
from references.components.mhc import hc_head
from references.components.norms import rms_norm

from ..components import ComponentSpec, OutputSpec, register
from ..rms import head_rms
from ..tolerances import Tolerance
from ._case import Case, add, dist_tensor
from ._serving import U32, UB


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


# ------------------------------------------------------------------------------------------------ embed
def embed_golden(ids: torch.Tensor, table: torch.Tensor, *, hc_mult: int) -> dict:
    """X [T, hc_mult, D] = hc_mult identical copies of table[ids] (no scaling)."""
    return {"X": hc_expand(embed(ids, table), hc_mult)}


def _emulate_embed(profile: str):
    def embed_serving(ids, table, *, hc_mult):
        """VocabParallelEmbedding over the bf16 table, unsqueeze(-2).repeat(1, hc, 1) (spec 3.1)."""
        return {"X": _bf16(table)[ids.long()].unsqueeze(-2).repeat(1, hc_mult, 1)}
    return embed_serving


def _exact(params, level):
    return Tolerance(0.0, 0.0, "a gather of bf16-exact table rows and a copy: no arithmetic, exact at every level")


register(ComponentSpec(
    name="embed", family="embedding", reference=embed_golden,
    outputs=(OutputSpec("X", tol=_exact),),
    description="token embedding lookup and the hc_mult-fold stream expansion (no scaling)", spec_section="3.1",
    emulate=_emulate_embed,
))


def _make_embed(g, p):
    V, D, T = p["vocab"], p["d"], p["tokens"]
    ids = torch.randint(0, V, (T,), generator=g)
    ids[0] = 0                                  # bos and the last row: off-by-one reads fall off the table
    if T > 1:
        ids[1] = V - 1
    return {"ids": ids.to(getattr(torch, p.get("ids_dtype", "int64"))),
            "table": _bf16(dist_tensor(g, (V, D), p["dist"])), "hc_mult": 4}


for tokens, vocab, d, dist, ids_dtype, seed in [(1, 1000, 256, "normal", "int64", 0),
                                                (37, 1000, 256, "wide", "int32", 1),
                                                (129, 4096, 128, "outliers", "int64", 2)]:
    add(Case(f"embed/t{tokens}v{vocab}d{d}/{dist}/s{seed}", "embed", _make_embed,
             {"tokens": tokens, "vocab": vocab, "d": d, "ids_dtype": ids_dtype}, seed, dist,
             ("decode" if tokens == 1 else "prefill",)))
# Flash's vocabulary (129,280 rows): ids past 2^16 and the last row
add(Case("embed/t64v129280d64/normal/s3", "embed", _make_embed, {"tokens": 64, "vocab": 129280, "d": 64}, 3,
         "normal", ("prefill", "flash-vocab")))


# ---------------------------------------------------------------------------------------------- head.lm
def lm_head_golden(X: torch.Tensor, hc_fn: torch.Tensor, hc_base: torch.Tensor, hc_scale: torch.Tensor,
                   norm_weight: torch.Tensor, head_weight: torch.Tensor, *, norm_eps: float, hc_eps: float) -> dict:
    """X [T, hc, D] (the last layer's streams, or the MTP block's) -> {"logits": [T, vocab]}:
    HC_head -> final RMSNorm -> head (unquantised; OFF keeps it fp32)."""
    return {"logits": final_head(X, hc_fn, hc_base, hc_scale, norm_weight, head_weight, norm_eps=norm_eps,
                                 hc_eps=hc_eps)}


def _emulate_head(profile: str):
    def lm_head_serving(X, hc_fn, hc_base, hc_scale, norm_weight, head_weight, *, norm_eps, hc_eps):
        """vLLM: HCHeadOp (fp32 math on the bf16 streams, bf16 h) -> RMSNorm (fp32 inside, bf16 out) ->
        ParallelLMHead (bf16 weight, fp32 accumulation, bf16 logits)."""
        h = _bf16(hc_head(_bf16(X), hc_fn, hc_base, hc_scale, norm_eps=norm_eps, hc_eps=hc_eps))
        n = _bf16(rms_norm(h, _bf16(norm_weight), norm_eps))
        return {"logits": _bf16(n @ _bf16(head_weight).T)}
    return lm_head_serving


def _head_scale(kw, want):
    """S_v = 6 (2 Q_v + rho |z_v|) + |z_v|: the sensitivity of logit v to independent unit relative roundings of
    h (through the norm: a tangential part sum_d W_vd n_d d_d and a radial part z_v (h.dh)/|h|^2) and of n.
    Q_v = sqrt(sum_d (W_vd n_d)^2), rho = sqrt(sum h^4) / sum h^2 (the radial part's random-sum factor)."""
    X = kw["X"].double()
    h = hc_head(X, kw["hc_fn"].double(), kw["hc_base"].double(), kw["hc_scale"].double(), norm_eps=kw["norm_eps"],
                hc_eps=kw["hc_eps"])
    n = rms_norm(h, kw["norm_weight"].double(), kw["norm_eps"])
    W = kw["head_weight"].double()
    z = n @ W.T
    Q = torch.sqrt(n.square() @ W.square().T)
    rho = torch.sqrt(h.pow(4).sum(-1, keepdim=True)) / h.square().sum(-1, keepdim=True)
    return 6 * (2 * Q + rho * z.abs()) + z.abs()


def _head_tol(params, level):
    """The elementwise bound below with its quadrature (RMS) model ``conformance.rms.head_rms``."""
    D = params["d"]
    g32 = (5 * D + 8) * U32 * (2 if level == "fp32" else 1)
    return _head_elementwise(params, level).with_rms(**head_rms(level, D, g32=g32))


def _head_elementwise(params, level):
    D = params["d"]
    # fp32 arithmetic of the golden, relative to S: the head GEMM's accumulation 6 sqrt(D) u32 sum|W n| <=
    # 6 D u32 Q (Cauchy-Schwarz), h's 4-term mix and the pre weights (a 4D-long fp32 dot product through a
    # sigmoid, |d pre| <= (1/4) scale 6 sqrt(4D) u32 sum|fn x| rho: relative to h below 4D u32 for these cases),
    # the norm's D-long mean: (4D + D + 8) u32 in all.
    g32 = (5 * D + 8) * U32
    if level == "fp64":
        return Tolerance(0.0, g32, f"head.lm: fp32 golden (4D mix + D accumulation + 8 ops) u32 = {g32:.3g} of S")
    if level == "fp32":
        return Tolerance(0.0, 2 * g32, f"head.lm: two fp32 evaluations 2*(5D+8) u32 = {2 * g32:.3g} of S")
    if level == "emulated":
        # same bf16 inputs: h and n may round to neighbouring bf16 values where the fp32 order differs (one ulp,
        # 2 ub, inside S's unit), the logits by one ulp (2 ub |z| <= 2 ub S), plus both sides' fp32 order
        r = 2 * UB + 2 * g32
        return Tolerance(0.0, r, f"head.lm: one bf16 ulp of h, n, logits (2*2^-8) + fp32 order 2*(5D+8) u32 = {r:.3g}"
                         " of S")
    # serving: bf16 h (ub each, independent), bf16 n (ub), bf16 logits (ub |z|), all inside ub x S (S counts
    # each random sum at 6 sigma); the weights and X are bf16-exact; margin 1.1 for second-order terms
    r = 1.1 * UB + g32
    return Tolerance(0.0, r, f"head.lm: bf16 roundings of h, n, logits, random sums at lambda 6 (in S): 1.1*2^-8 + "
                     f"fp32 (5D+8) u32 = {r:.3g} of S (S_v = 6(2 Q_v + rho |z_v|) + |z_v|)")


register(ComponentSpec(
    name="head.lm", family="head", reference=lm_head_golden,
    outputs=(OutputSpec("logits", tol=_head_tol, scale=_head_scale),),
    description="final HC head (4-stream collapse) -> final RMSNorm -> LM head logits (also the MTP's step 5)",
    spec_section="3.16", emulate=_emulate_head,
    divergences=("OFF computes logits for the last position only; here every position",),
))


def _make_head(g, p):
    T, D, V, hc = p["tokens"], p["d"], p["vocab"], 4
    return {"X": _bf16(dist_tensor(g, (T, hc, D), p["dist"])),
            "hc_fn": torch.randn(hc, hc * D, generator=g) * (hc * D) ** -0.5,
            "hc_base": torch.randn(hc, generator=g) * 0.5, "hc_scale": 0.5 + torch.rand(1, generator=g),
            "norm_weight": _bf16(1 + 0.1 * torch.randn(D, generator=g)),
            "head_weight": _bf16(torch.randn(V, D, generator=g) * D**-0.5), "norm_eps": 1e-6, "hc_eps": 1e-6}


for tokens, d, vocab, dist, tag, seed in [(1, 256, 1000, "normal", "main", 0), (7, 512, 2048, "outliers", "main", 1),
                                          (33, 256, 1000, "normal", "mtp", 2), (3, 64, 129280, "normal", "main", 3)]:
    add(Case(f"head.lm/{tag}/t{tokens}d{d}v{vocab}/{dist}/s{seed}", "head.lm", _make_head,
             {"tokens": tokens, "d": d, "vocab": vocab}, seed, dist,
             ("decode" if tokens == 1 else "prefill",) + (("mtp",) if tag == "mtp" else ())))
