"""Manifold-constrained hyper-connections: HC_pre with Sinkhorn, HC_post, HC_head (spec 3.4)."""

from __future__ import annotations

import torch

from references.components.mhc import hc_head, hc_post, hc_pre

from ..components import ComponentSpec, OutputSpec, register
from ._case import Case, add, dist_tensor
from ._serving import level_tolerance, serving_emulation


def mhc_pre(X, fn, base, scale, *, norm_eps: float, hc_eps: float, sinkhorn_iters: int) -> dict:
    a, post, comb = hc_pre(X, fn, base, scale, norm_eps=norm_eps, hc_eps=hc_eps, sinkhorn_iters=sinkhorn_iters)
    return {"a": a, "post": post, "comb": comb}


def mhc_post(F, X, post, comb) -> torch.Tensor:
    return hc_post(F, X, post, comb)


def mhc_head(X, fn, base, scale, *, norm_eps: float, hc_eps: float) -> torch.Tensor:
    return hc_head(X, fn, base, scale, norm_eps=norm_eps, hc_eps=hc_eps)


# mixes mu = (fn . x) rho: a length 4D dot product of bf16 x with fp32 fn; post/comb are smooth functions
# (sigmoid, softmax, 20 Sinkhorn steps of normalisation, each a contraction) of mu, so their error is of
# the order of mu's: k_inputs = 1 (x), cond 4 (softmax + normalisations amplify relative error by at most
# the number of terms, 4). a = sum_j pre_j X_j: 4 bf16 terms (scale: sum |pre_j X_j|).
PRE_TOL = level_tolerance(n=4 * 4096, k_inputs=2, cond=4, what="hc_pre mixes")
A_TOL = level_tolerance(n=4 * 4096, k_inputs=2, cond=4, what="hc_pre layer input")


def _mix_scale(kw, want):
    """a = sum_j pre_j X_j with 0 < pre_j <= 1 + hc_eps: errors are bounded relative to sum_j |X_j|, not
    |a| (the four streams can cancel)."""
    return kw["X"].double().abs().sum(dim=-2).expand_as(want) * (1 + kw["hc_eps"])


register(ComponentSpec(
    name="mhc.pre", family="mhc", reference=mhc_pre,
    outputs=(OutputSpec("a", tol=A_TOL, scale=_mix_scale), OutputSpec("post", tol=PRE_TOL),
             OutputSpec("comb", tol=PRE_TOL)),
    description="HC_pre: RMS-scaled mixes, pre/post sigmoids, Sinkhorn-Knopp comb, layer input",
    spec_section="3.4", emulate=serving_emulation(mhc_pre, bf16_inputs=("X",), bf16_outputs=("a",)),
))


def _post_scale(kw, want):
    F, X, post, comb = (kw[k].double() for k in ("F", "X", "post", "comb"))
    return post.abs()[..., None] * F.abs()[..., None, :] + torch.einsum("...ij,...id->...jd", comb.abs(), X.abs())


register(ComponentSpec(
    name="mhc.post", family="mhc", reference=mhc_post,
    outputs=(OutputSpec("y", tol=level_tolerance(n=5, k_inputs=2, what="hc_post"), scale=_post_scale),),
    description="HC_post: X'_j = post_j F + sum_i comb[i,j] X_i", spec_section="3.4",
    emulate=serving_emulation(mhc_post, bf16_inputs=("F", "X")),
    divergences=("HF rounds post/comb to bf16 before mixing (spec 8.7)",),
))
register(ComponentSpec(
    name="mhc.head", family="mhc", reference=mhc_head,
    outputs=(OutputSpec("y", tol=level_tolerance(n=4 * 4096, k_inputs=2, cond=4, what="hc_head"), scale=_mix_scale),),
    description="HC_head: final 4-stream collapse", spec_section="3.4",
    emulate=serving_emulation(mhc_head, bf16_inputs=("X",)),
))


def _site(g, hc, D, sites):
    n = (2 + hc) * hc if sites == "pre" else hc
    return {"fn": torch.randn(n, hc * D, generator=g) * (hc * D) ** -0.5,
            "base": torch.randn(n, generator=g) * 0.5,
            "scale": 0.5 + torch.rand(3 if sites == "pre" else 1, generator=g)}


def _make_pre(g, p):
    X = dist_tensor(g, (p["tokens"], 4, p["d"]), p["dist"])
    return {"X": X, **_site(g, 4, p["d"], "pre"), "norm_eps": 1e-6, "hc_eps": 1e-6, "sinkhorn_iters": 20}


def _make_head(g, p):
    X = dist_tensor(g, (p["tokens"], 4, p["d"]), p["dist"])
    return {"X": X, **_site(g, 4, p["d"], "head"), "norm_eps": 1e-6, "hc_eps": 1e-6}


def _make_post(g, p):
    T, D = p["tokens"], p["d"]
    comb = torch.softmax(torch.randn(T, 4, 4, generator=g), dim=-1)
    return {"F": dist_tensor(g, (T, D), p["dist"]), "X": dist_tensor(g, (T, 4, D), p["dist"]),
            "post": 2 * torch.sigmoid(torch.randn(T, 4, generator=g)), "comb": comb}


for tokens, d, dist, seed in [(1, 4096, "normal", 0), (9, 256, "outliers", 1), (130, 256, "normal", 2),
                              (2048, 256, "normal", 3)]:
    tag = "decode" if tokens == 1 else ("prefill", "long") if tokens >= 1024 else "prefill"
    add(Case(f"mhc.pre/t{tokens}d{d}/{dist}/s{seed}", "mhc.pre", _make_pre, {"tokens": tokens, "d": d},
             seed, dist, tag if isinstance(tag, tuple) else (tag,)))
    add(Case(f"mhc.post/t{tokens}d{d}/{dist}/s{seed}", "mhc.post", _make_post, {"tokens": tokens, "d": d},
             seed, dist, tag if isinstance(tag, tuple) else (tag,)))
    add(Case(f"mhc.head/t{tokens}d{d}/{dist}/s{seed}", "mhc.head", _make_head, {"tokens": tokens, "d": d},
             seed, dist, tag if isinstance(tag, tuple) else (tag,)))
