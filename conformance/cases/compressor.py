"""KV compressors: CSA (ratio 4, two overlapping series) and HCA (ratio 128), gated softmax pooling over the
window, position bias, RMSNorm, RoPE at the window's first position (spec 3.7)."""

from __future__ import annotations

import torch

from references.config import RopeScaling
from references.components.compressor import compress
from references.components.rope import rope_inv_freq

from ..components import ComponentSpec, OutputSpec, register
from ._case import Case, add, dist_tensor
from ._serving import level_tolerance, serving_emulation


def compressor_kv(x, wkv, wgate, ape, norm, *, ratio: int, head_dim: int, eps: float) -> torch.Tensor:
    """All compressed entries (golden: no QAT) of x [T, D] -> [T // ratio, head_dim]; theta 160000 + YaRN."""
    inv = rope_inv_freq(64, 160000.0, RopeScaling())
    return compress(x, wkv, wgate, ape, norm, ratio=ratio, head_dim=head_dim, eps=eps, inv_freq=inv)


# Each pooled channel is a softmax-weighted mean of bf16-projected kv (a length-D dot product each) with
# weights from bf16-projected scores (logit perturbation ~ 6 ub sqrt(D) |x||w| ~ small for the case
# weights, scaled 1/sqrt(D)); RMSNorm re-normalises (cond 1), RoPE mixes pairs (2 terms). The entries
# are O(1) after the norm, so the bound is relative to |entry| with k_inputs = 4 (x, wkv, wgate, norm).
TOL = level_tolerance(n=4096, k_inputs=4, cond=2, what="compressor entry")
register(ComponentSpec(
    name="compressor.kv", family="compressor", reference=compressor_kv,
    outputs=(OutputSpec("entries", tol=TOL, scale=lambda kw, want: want.abs().amax(dim=-1, keepdim=True)
                        .expand_as(want)),),
    description="CSA/HCA compressor: projections, position bias, per-channel softmax over the window, "
                "RMSNorm, RoPE at i*m", spec_section="3.7",
    emulate=serving_emulation(compressor_kv, bf16_inputs=("x", "wkv", "wgate", "norm"), output_names=("entries",)),
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
                                         (259, 256, 128, 512, 3)]:
    kind = "csa" if ratio == 4 else "hca"
    add(Case(f"compressor.kv/{kind}/t{tokens}hd{head_dim}/s{seed}", "compressor.kv", _make,
             {"tokens": tokens, "d": d, "ratio": ratio, "head_dim": head_dim}, seed, "normal", ("prefill", kind)))
