"""KV compressors: CSA (ratio 4, two overlapping series) and HCA (ratio 128), gated softmax pooling over the
window, position bias, RMSNorm, RoPE at the window's first position (spec 3.7).

DeepSeek-V4.1 rows (``compressor.kv/v41-r1/...``, ``v41-r2``): ratios 1 and 2, no position bias (``ape=None``),
no gate at ratio 1 (``wgate=None``), attention head 512 (``references.components.compressor`` names the vLLM
lines). Serving (vLLM ``models/deepseek_v41``): ``kv_score = mm(bf16 x, bf16 [wkv; wgate]^T, out fp32)``
(``attention.py:954-959``), pooling + RMSNorm in fp32 with a bf16 latent (``_store_latent``), RoPE on that latent
in fp32 and a bf16 store, the nope dims quantised in 7 blocks of 64 to e4m3fn with UE8M0 scales at fmax 448, amax
floor 1e-4, on every platform (``_rope_quant_insert_kernel``: ``tl.float8e4nv``, no fnuz branch,
``common/ops/fused_compress_quant_cache.py:304-350``; the 584-byte record). Rows cover prompt lengths of both
residues mod 2 and the group boundaries (T = 2, 3, 127, 128, 129; ratio 1 also T = 1). The 528-byte MXFP8 and
288-byte NVFP4 compressed records (``:355-506``) are not modelled.
"""

from __future__ import annotations

import dataclasses

import torch

from references.components.compressor import compress
from references.components.rope import rope_inv_freq
from references.config import RopeScaling
from references.formats.blockscale import BlockFP8
from references.numerics import GOLDEN, Numerics, serving

from ..components import ComponentSpec, OutputSpec, register
from ._case import Case, add, dist_tensor
from ._serving import level_tolerance


def compressor_kv(x, wkv, wgate, ape, norm, *, ratio: int, head_dim: int, eps: float,
                  numerics: Numerics = GOLDEN, variant: str = "official") -> torch.Tensor:
    """All compressed entries of x [T, D] -> [T // ratio, head_dim]; theta 160000 + YaRN. V4.1: ``ape`` None,
    ``wgate`` None at ratio 1.

    Golden: no quantisation. ``numerics`` adds what the cache stores: head_dim 512 is the attention
    compressor (FP8 nope dims in blocks of 64, rope dims bf16), head_dim 128 the indexer's (one FP8 block of
    128 in vLLM)."""
    inv = rope_inv_freq(64, 160000.0, RopeScaling())
    kind = "indexer" if head_dim == 128 else "attn"
    return compress(x, wkv, wgate, ape, norm, ratio=ratio, head_dim=head_dim, eps=eps, inv_freq=inv,
                    numerics=numerics, kind=kind, variant=variant)


# V4.1's compressed-cache writer (fused_compress_quant_cache.py:329-335): 64-wide blocks, 2^ceil(log2(amax/448)),
# amax floored at 1e-4, tl.float8e4nv (OCP e4m3fn) on every platform
V41_KV_NOPE = BlockFP8.of("float8_e4m3fn", (1, 64), fmax=448.0, scale_fmt="ue8m0", amax_floor=1e-4)


def _emulate(profile: str):
    numerics = serving(profile)
    v41 = dataclasses.replace(numerics, kv_nope=V41_KV_NOPE)

    def compressor_kv_serving(x, wkv, wgate, ape, norm, *, ratio, head_dim, eps):
        """vLLM's compressor: bf16 activations and projection weights, pooling and RMSNorm in fp32, one bf16
        rounding, then the cache's FP8 quantisation in the profile's dialect (spec 3.7, 8.8); the entries
        are what a reader of the cache gets back. V4.1 (ape None): bf16 latent, RoPE, bf16, and the cache's
        e4m3fn at 448 whatever the profile (module docstring)."""
        b = {k: None if v is None else v.to(torch.bfloat16).float()
             for k, v in dict(x=x, wkv=wkv, wgate=wgate, norm=norm).items()}
        if ape is None:
            return compressor_kv(**b, ape=None, ratio=ratio, head_dim=head_dim, eps=eps, numerics=v41,
                                 variant="vllm41")
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
    if p.get("version") == "v4.1":
        # wgate rows scaled 3x: the two scores of a ratio-2 pair differ by O(1), so the softmax weights are far
        # from 1/2 (a mean-pool or a swapped pair is then visible)
        return {"x": dist_tensor(g, (T, D), p["dist"]), "wkv": torch.randn(d, D, generator=g) * D**-0.5,
                "wgate": None if m == 1 else torch.randn(d, D, generator=g) * 3 * D**-0.5, "ape": None,
                "norm": 1 + 0.1 * torch.randn(d, generator=g), "ratio": m, "head_dim": d, "eps": 1e-6}
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

# V4.1: ratios 1 and 2 (attention head 512): prompt lengths of both residues mod 2, the first group boundaries and
# 127 / 128 / 129 (a partial trailing pair produces no ratio-2 entry; ratio 1 has an entry per token). A one-token
# ratio-2 prompt has no entry at all: tests/references/test_compressor_v41.py checks that (the comparison needs a
# non-empty output)
for ratio, tokens, seed in [(2, 2, 41), (2, 3, 42), (2, 127, 43), (2, 128, 44), (2, 129, 45),
                            (1, 1, 50), (1, 2, 51), (1, 129, 52), (2, 2048, 46)]:
    add(Case(f"compressor.kv/v41-r{ratio}/t{tokens}hd512/s{seed}", "compressor.kv", _make,
             {"tokens": tokens, "d": 256, "ratio": ratio, "head_dim": 512, "version": "v4.1"}, seed, "normal",
             ("prefill", "v4.1", f"ratio{ratio}") + (("long",) if tokens >= 1024 else ()),
             tier="full" if tokens >= 1024 else "fast"))
