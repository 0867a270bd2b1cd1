"""KV compressors: CSA (ratio 4, two overlapping series) and HCA (ratio 128), gated softmax pooling over the
window, position bias, RMSNorm, RoPE at the window's first position (spec 3.7)."""

from __future__ import annotations

import torch

from references.components.compressor import compress
from references.components.rope import rope_inv_freq
from references.config import RopeScaling
from references.numerics import GOLDEN, Numerics, serving

from ..components import ComponentSpec, OutputSpec, register
from ._case import Case, add, dist_tensor
from ._serving import level_tolerance


def compressor_kv(x, wkv, wgate, ape, norm, *, ratio: int, head_dim: int, eps: float,
                  numerics: Numerics = GOLDEN, variant: str = "official") -> torch.Tensor:
    """All compressed entries of x [T, D] -> [T // ratio, head_dim]; theta 160000 + YaRN.

    Golden: no quantisation. ``numerics`` adds what the cache stores: head_dim 512 is the attention
    compressor (FP8 nope dims in blocks of 64, rope dims bf16), head_dim 128 the indexer's (one FP8 block of
    128 in vLLM)."""
    inv = rope_inv_freq(64, 160000.0, RopeScaling())
    kind = "indexer" if head_dim == 128 else "attn"
    return compress(x, wkv, wgate, ape, norm, ratio=ratio, head_dim=head_dim, eps=eps, inv_freq=inv,
                    numerics=numerics, kind=kind, variant=variant)


def _emulate(profile: str):
    numerics = serving(profile)

    def compressor_kv_serving(x, wkv, wgate, ape, norm, *, ratio, head_dim, eps):
        """vLLM's compressor: bf16 activations and projection weights, pooling and RMSNorm in fp32, one bf16
        rounding, then the cache's FP8 quantisation in the profile's dialect (spec 3.7, 8.8); the entries
        are what a reader of the cache gets back."""
        b = {k: v.to(torch.bfloat16).float() for k, v in dict(x=x, wkv=wkv, wgate=wgate, norm=norm).items()}
        return compressor_kv(**b, ape=ape, ratio=ratio, head_dim=head_dim, eps=eps, numerics=numerics,
                             variant="vllm")

    return compressor_kv_serving


# Each pooled channel is a softmax-weighted mean of bf16-projected kv (a length-D dot product each) with
# weights from bf16-projected scores (logit perturbation ~ 6 ub sqrt(D) |x||w| ~ small for the case
# weights, scaled 1/sqrt(D)); RMSNorm re-normalises (cond 1), RoPE mixes pairs (2 terms). The entries
# are O(1) after the norm, so the bound is relative to |entry| with k_inputs = 4 (x, wkv, wgate, norm).
# The serving path stores the entries in an FP8 cache (spec 3.7, 4.5): one e4m3 rounding at a power-of-two
# block scale adds at most half an ulp, 2^-4 |v| <= 2^-4 max|row| (subnormal results: at most
# (2 amax / fmax) 2^-10, far smaller); the rope dims stay bf16.
TOL = level_tolerance(n=4096, k_inputs=4, cond=2, what="compressor entry", extra_serving=2.0**-4,
                      extra_reason="FP8 cache rounding of the stored entry", stored_fp8=True)
register(ComponentSpec(
    name="compressor.kv", family="compressor", reference=compressor_kv,
    outputs=(OutputSpec("entries", tol=TOL, scale=lambda kw, want: want.abs().amax(dim=-1, keepdim=True)
                        .expand_as(want)),),
    description="CSA/HCA compressor: projections, position bias, per-channel softmax over the window, "
                "RMSNorm, RoPE at i*m", spec_section="3.7",
    emulate=_emulate,
    divergences=("OFF rounds the pooled vector to bf16 before RMSNorm; vLLM normalises in fp32 (spec 8.8)",),
))


def _make(g, p):
    T, D, m, d = p["tokens"], p["d"], p["ratio"], p["head_dim"]
    c = 2 if m == 4 else 1
    return {"x": dist_tensor(g, (T, D), p["dist"]),
            "wkv": torch.randn(c * d, D, generator=g) * D**-0.5,
            "wgate": torch.randn(c * d, D, generator=g) * D**-0.5,
            "ape": torch.randn(m, c * d, generator=g) * 0.5,
            "norm": 1 + 0.1 * torch.randn(d, generator=g), "ratio": m, "head_dim": d, "eps": 1e-6}


for tokens, d, ratio, head_dim, seed in [(64, 256, 4, 512, 0), (30, 256, 4, 128, 1), (256, 256, 128, 512, 2),
                                         (259, 256, 128, 512, 3), (2048, 256, 4, 512, 4)]:
    kind = "csa" if ratio == 4 else "hca"
    add(Case(f"compressor.kv/{kind}/t{tokens}hd{head_dim}/s{seed}", "compressor.kv", _make,
             {"tokens": tokens, "d": d, "ratio": ratio, "head_dim": head_dim}, seed, "normal",
             ("prefill", kind) + (("long",) if tokens >= 1024 else ())))
