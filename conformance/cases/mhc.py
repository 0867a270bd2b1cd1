"""Manifold-constrained hyper-connections: HC_pre with Sinkhorn, HC_post, HC_head (spec 3.4)."""

from __future__ import annotations

import torch

from references.components.mhc import hc_head, hc_post, hc_pre, hc_pre_lagged

from ..components import ComponentSpec, OutputSpec, register
from ._case import Case, add, dist_tensor
from ._serving import level_tolerance, serving_emulation


def mhc_pre(X, fn, base, scale, *, norm_eps: float, hc_eps: float, sinkhorn_iters: int) -> dict:
    a, post, comb = hc_pre(X, fn, base, scale, norm_eps=norm_eps, hc_eps=hc_eps, sinkhorn_iters=sinkhorn_iters)
    return {"a": a, "post": post, "comb": comb}


def mhc_pre_lagged(X, fn, base, scale, pre_prev=None, *, norm_eps: float, hc_eps: float,
                   sinkhorn_iters: int) -> dict:
    """DeepSeek-V4.1 (``references.components.mhc.hc_pre_lagged``): a = sum_j pre_prev_j X_j (X_0 at the model's
    entry), post / comb / pre of this site; ``pre`` is the pre-mix handed to the next sub-layer."""
    a, post, comb, pre = hc_pre_lagged(X, fn, base, scale, pre_prev, norm_eps=norm_eps, hc_eps=hc_eps,
                                       sinkhorn_iters=sinkhorn_iters)
    return {"a": a, "post": post, "comb": comb, "pre": pre}


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


def _lagged_mix_scale(kw, want):
    """a = sum_j pre_prev_j X_j (0 < pre_prev_j <= 1 + hc_eps), or X_0 at the model's entry: errors relative to
    sum_j |pre_prev_j X_j| (the streams can cancel)."""
    X, p = kw["X"].double(), kw.get("pre_prev")
    if p is None:
        return X[..., 0, :].abs()
    return (p.double().abs().unsqueeze(-1) * X.abs()).sum(dim=-2)


# the same arithmetic as mhc.pre: pre is one of the mixes (PRE_TOL), a the collapse of 4 bf16 streams, here with
# the carried pre-mix (exact fp32 inputs) instead of this site's
register(ComponentSpec(
    name="mhc.pre_lagged", family="mhc", reference=mhc_pre_lagged,
    outputs=(OutputSpec("a", tol=A_TOL, scale=_lagged_mix_scale), OutputSpec("post", tol=PRE_TOL),
             OutputSpec("comb", tol=PRE_TOL), OutputSpec("pre", tol=PRE_TOL)),
    description="V4.1 HC_pre lagged by one sub-layer: the layer input collapses the streams with the previous "
                "sub-layer's pre-mix (stream 0 at the entry); this site's pre-mix is handed on",
    spec_section="3.4", emulate=serving_emulation(mhc_pre_lagged, bf16_inputs=("X",), bf16_outputs=("a",)),
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


def _make_pre_lagged(g, p):
    T, D = p["tokens"], p["d"]
    kw = {**_site(g, 4, D, "pre"), "norm_eps": 1e-6, "hc_eps": 1e-6, "sinkhorn_iters": 20}
    if p["entry"]:   # the model's entry: the embedding broadcast to the 4 streams, no carried pre-mix
        e = dist_tensor(g, (T, D), p["dist"])
        return {"X": e[:, None, :].expand(T, 4, D).contiguous(), "pre_prev": None, **kw}
    # a carried pre-mix as a previous site makes it, sigmoid(.) + hc_eps in (0, 1 + hc_eps), far from this site's
    pre_prev = torch.sigmoid(2 * torch.randn(T, 4, generator=g)) + 1e-6
    return {"X": dist_tensor(g, (T, 4, D), p["dist"]), "pre_prev": pre_prev, **kw}


# V4.1 (nvidia/model.py:491-493): the entry (layer 0's attention site) and carried pre-mixes
for tokens, d, dist, entry, seed in [(1, 4096, "normal", False, 60), (9, 256, "outliers", False, 61),
                                     (130, 256, "normal", False, 62), (7, 256, "normal", True, 63),
                                     (2048, 256, "normal", False, 64)]:
    tag = ("decode",) if tokens == 1 else ("prefill", "long") if tokens >= 1024 else ("prefill",)
    add(Case(f"mhc.pre_lagged/t{tokens}d{d}/{'entry' if entry else 'carried'}/{dist}/s{seed}", "mhc.pre_lagged",
             _make_pre_lagged, {"tokens": tokens, "d": d, "entry": entry}, seed, dist, tag + ("v4.1",),
             tier="full" if tokens >= 1024 else "fast"))
