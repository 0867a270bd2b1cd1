"""Manifold-constrained hyper-connections (mHC), spec section 3.4.

The residual stream of DSV4 is ``X in R^{hc x D}`` (hc = 4 parallel streams). Every block is wrapped by

* ``hc_pre``  - mixes the streams into one block input ``a = sum_j pre_j X_j`` and produces the ``post``
  and ``comb`` (doubly stochastic) mixes from a projection of the RMS-normalised flattened streams;
* ``hc_post`` - ``X'_j = post_j F + sum_i comb[i, j] X_i`` (the sum runs over comb's *first* index);
* ``hc_head`` - the final collapse (only ``pre``, no Sinkhorn), used before the final norm and by MTP.

All math is done in the dtype of the floating inputs (fp32 golden, fp64 cross-check). Sources: OFF
``Block.hc_pre/hc_post``, ``ParallelHead.hc_head``, ``kernel.py hc_split_sinkhorn_kernel``; HF
``DeepseekV4HyperConnection``/``DeepseekV4HyperHead``; vLLM ``kernels/mhc/torch.py``.
"""

from __future__ import annotations

import torch

from ..numerics import GOLDEN, Numerics
from ._validate import check_float, check_shape, compute_dtype, round_act

__all__ = ["hc_pre", "hc_post", "hc_head", "sinkhorn", "hc_mixes"]


def sinkhorn(comb_logits: torch.Tensor, *, iters: int, eps: float) -> torch.Tensor:
    """Sinkhorn-Knopp projection of ``comb_logits [..., hc, hc]`` onto (nearly) doubly stochastic matrices.

    Exactly the official schedule (spec 3.4 step 7-8):
      1. ``C = softmax over the last axis (rows) + eps``  - this counts as the first row step;
      2. ``C = C / (colsum(C) + eps)``                    - the first column step (colsum over axis -2);
      3. ``iters - 1`` times: row-normalise ``C / (rowsum + eps)`` then column-normalise.
    So there are ``iters`` row steps and ``iters`` column steps, the last one a column step: every column
    sums to ``1 - O(eps)``, rows to within the (geometrically shrinking) Sinkhorn residual of 1.
    """
    check_float("comb_logits", comb_logits)
    if comb_logits.dim() < 2 or comb_logits.shape[-1] != comb_logits.shape[-2]:
        raise ValueError(f"comb_logits: need [..., hc, hc], got {tuple(comb_logits.shape)}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters: need an int >= 1, got {iters!r}")
    c = torch.softmax(comb_logits, dim=-1) + eps
    c = c / (c.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(dim=-1, keepdim=True) + eps)
        c = c / (c.sum(dim=-2, keepdim=True) + eps)
    return c


def _mix_logits(X: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """mu = (fn . flatten(X)) * rsqrt(mean(flatten(X)^2) + norm_eps), shape [..., fn.shape[0]].

    Applying the RMS factor after the projection equals projecting the normalised vector (linear map);
    this is the order OFF / vLLM use.
    """
    x = X.flatten(-2)
    rho = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + norm_eps)
    return (x @ fn.transpose(0, 1)) * rho


def hc_mixes(X, fn, base, scale, *, norm_eps: float, hc_eps: float, sinkhorn_iters: int):
    """(pre [..., hc], post [..., hc], comb [..., hc, hc]) of one HC_pre site (no stream mixing)."""
    check_float("X", X)
    if X.dim() < 2:
        raise ValueError(f"X: need [..., hc, D], got {tuple(X.shape)}")
    hc, D = X.shape[-2], X.shape[-1]
    dt = compute_dtype(X)
    check_shape("fn", fn, ((2 + hc) * hc, hc * D))
    check_shape("base", base, ((2 + hc) * hc,))
    check_shape("scale", scale, (3,))
    fn, base, scale = fn.to(dt), base.to(dt), scale.to(dt)
    mu = _mix_logits(X, fn, norm_eps)
    pre = torch.sigmoid(mu[..., :hc] * scale[0] + base[:hc]) + hc_eps
    # the factor 2 lets post reach (0, 2); no eps here (vLLM calls it hc_post_mult_value)
    post = 2.0 * torch.sigmoid(mu[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb_logits = (mu[..., 2 * hc:] * scale[2] + base[2 * hc:]).unflatten(-1, (hc, hc))  # [j,k]=mu[8+4j+k]
    comb = sinkhorn(comb_logits, iters=sinkhorn_iters, eps=hc_eps)
    return pre, post, comb


def hc_pre(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *,
           norm_eps: float, hc_eps: float, sinkhorn_iters: int, numerics: Numerics = GOLDEN):
    """HC_pre: ``X [..., hc, D] -> (a [..., D], post [..., hc], comb [..., hc, hc])``.

    fn [(2+hc)*hc, hc*D], base [(2+hc)*hc], scale [3] are the site's ``hc_{attn,ffn}_{fn,base,scale}``.
    ``a = sum_j pre_j X_j`` (pre is *not* normalised to sum 1). ``numerics.act_dtype`` (official: bf16)
    rounds ``a`` as OFF does when it casts the mixed input back to the activation dtype; GOLDEN: none.
    """
    pre, post, comb = hc_mixes(X, fn, base, scale, norm_eps=norm_eps, hc_eps=hc_eps,
                               sinkhorn_iters=sinkhorn_iters)
    a = (pre.unsqueeze(-1) * X).sum(dim=-2)
    return round_act(a, numerics), post, comb


def hc_pre_lagged(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                  pre_prev: torch.Tensor | None, *, norm_eps: float, hc_eps: float, sinkhorn_iters: int,
                  numerics: Numerics = GOLDEN):
    """DeepSeek-V4.1's HC_pre, lagged by one sub-layer: ``-> (a, post, comb, pre)``.

    The site's mixes (pre, post, comb) come from ``X`` as in :func:`hc_pre`, but the layer input collapses the
    streams with the PREVIOUS sub-layer's pre-mix, ``a = sum_j pre_prev_j X_j`` (stream 0, ``a = X_0``, at the
    model's entry, ``pre_prev`` None), and this site's ``pre`` is handed on to the next sub-layer. vLLM
    ``models/deepseek_v41/nvidia/model.py:491-493`` ("The reference collapses each sublayer's input with the
    *previous* sublayer's pre-mix: attention uses the pre-mix carried in (identity for the first layer), the FFN
    uses this layer's attention pre-mix"), ``:501-526``, ``:590-606``; ``model_executor/layers/mhc.py:308-321``
    (``MHCPreDelayedOp``), ``model_executor/kernels/mhc/torch.py:6-43`` (``mhc_pre_delayed_torch``).
    """
    pre, post, comb = hc_mixes(X, fn, base, scale, norm_eps=norm_eps, hc_eps=hc_eps,
                               sinkhorn_iters=sinkhorn_iters)
    if pre_prev is None:
        a = X[..., 0, :].to(pre.dtype)
    else:
        check_float("pre_prev", pre_prev)
        check_shape("pre_prev", pre_prev, tuple(X.shape[:-1]))
        a = (pre_prev.to(pre.dtype).unsqueeze(-1) * X.to(pre.dtype)).sum(dim=-2)
    return round_act(a, numerics), post, comb, pre


HC_POST_VARIANTS = ("official", "hf")


def hc_post(F: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, *,
            variant: str = "official", numerics: Numerics = GOLDEN) -> torch.Tensor:
    """HC_post: ``X'_j = post_j F + sum_i comb[i, j] X_i`` -> [..., hc, D].

    F [..., D] block output, X [..., hc, D] the residual that entered HC_pre, post [..., hc],
    comb [..., hc, hc].

    variant:
      * "official" (default; OFF ``Block.hc_post`` and vLLM ``mhc_post_torch``): post and comb used in
        full precision (fp32 in OFF).
      * "hf" (HF ``DeepseekV4HyperConnection``, spec section 8 item 7): post and comb are rounded to bf16
        before the mixing (the rest of the arithmetic stays in the compute dtype here).
    """
    if variant not in HC_POST_VARIANTS:
        raise ValueError(f"variant: unknown {variant!r}; known {HC_POST_VARIANTS}")
    for n, t in (("F", F), ("X", X), ("post", post), ("comb", comb)):
        check_float(n, t)
    hc, D = X.shape[-2], X.shape[-1]
    lead = tuple(X.shape[:-2])
    check_shape("F", F, lead + (D,))
    check_shape("post", post, lead + (hc,))
    check_shape("comb", comb, lead + (hc, hc))
    dt = compute_dtype(F, X)
    if variant == "hf":
        post = post.to(torch.bfloat16)
        comb = comb.to(torch.bfloat16)
    post, comb, F, X = post.to(dt), comb.to(dt), F.to(dt), X.to(dt)
    out = post.unsqueeze(-1) * F.unsqueeze(-2) + torch.einsum("...ij,...id->...jd", comb, X)
    return round_act(out, numerics)


def hc_head(X: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, *,
            norm_eps: float, hc_eps: float, numerics: Numerics = GOLDEN) -> torch.Tensor:
    """HC_head: ``X [..., hc, D] -> h = sum_j pre_j X_j [..., D]``, pre_j = sigmoid(mu_j*scale + base_j) + eps.

    fn [hc, hc*D], base [hc], scale [1]. No post / comb / Sinkhorn.
    """
    check_float("X", X)
    if X.dim() < 2:
        raise ValueError(f"X: need [..., hc, D], got {tuple(X.shape)}")
    hc, D = X.shape[-2], X.shape[-1]
    dt = compute_dtype(X)
    check_shape("fn", fn, (hc, hc * D))
    check_shape("base", base, (hc,))
    check_shape("scale", scale, (1,))
    mu = _mix_logits(X, fn.to(dt), norm_eps)
    pre = torch.sigmoid(mu * scale.to(dt)[0] + base.to(dt)) + hc_eps
    return round_act((pre.unsqueeze(-1) * X).sum(dim=-2), numerics)
