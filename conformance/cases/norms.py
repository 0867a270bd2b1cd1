"""RMSNorm variants (spec 3.2): weighted (attn/ffn/q/kv/final norms) and the unweighted per-head q norm."""

from __future__ import annotations

import torch

from references.components.norms import rms_norm, unweighted_rms_norm

from ..components import ComponentSpec, OutputSpec, register
from ._case import Case, add, dist_tensor
from ._serving import level_tolerance, serving_emulation


def norm_rms(x: torch.Tensor, weight: torch.Tensor, *, eps: float) -> torch.Tensor:
    """Weighted RMSNorm over the last dim (golden: official variant, one precision)."""
    return rms_norm(x, weight, eps)


def norm_head(q: torch.Tensor, *, eps: float) -> torch.Tensor:
    """Per-head unweighted RMSNorm of q [T, H, d] over d."""
    return unweighted_rms_norm(q, eps)


# y = x w / rms(x): x and w rounded to bf16 each feed y linearly (2 ub), rms(x) feeds through a sqrt
# (ub/2 after averaging, counted as 1): k_inputs = 3; the mean of squares is a length-D reduction.
register(ComponentSpec(
    name="norm.rms", family="norms", reference=norm_rms,
    outputs=(OutputSpec("y", tol=level_tolerance(n=4096, k_inputs=3, what="rms_norm")),),
    description="weighted RMSNorm (attn_norm, ffn_norm, q_norm, kv_norm, final norm)", spec_section="3.2",
    emulate=serving_emulation(norm_rms, bf16_inputs=("x", "weight")),
    divergences=("HF 5.19 and vLLM's CPU RMSNorm round the normalised x to bf16 before the weight multiply",),
))
register(ComponentSpec(
    name="norm.head", family="norms", reference=norm_head,
    outputs=(OutputSpec("y", tol=level_tolerance(n=512, k_inputs=2, what="per-head rms_norm")),),
    description="unweighted per-head RMSNorm of q (512 per head)", spec_section="3.2",
    emulate=serving_emulation(norm_head, bf16_inputs=("q",)),
))


def _make_rms(g, p):
    return {"x": dist_tensor(g, (p["tokens"], p["d"]), p["dist"], scale=p.get("scale", 1.0)),
            "weight": 1 + 0.1 * torch.randn(p["d"], generator=g), "eps": 1e-6}


def _make_head(g, p):
    return {"q": dist_tensor(g, (p["tokens"], p["heads"], 512), p["dist"]), "eps": 1e-6}


for tokens, d, dist, seed in [(1, 4096, "normal", 0), (7, 256, "outliers", 1), (129, 512, "wide", 2),
                              (33, 1024, "all_negative", 3)]:
    add(Case(f"norm.rms/t{tokens}d{d}/{dist}/s{seed}", "norm.rms", _make_rms, {"tokens": tokens, "d": d},
             seed, dist, ("decode" if tokens == 1 else "prefill",)))
add(Case("norm.rms/t4096d256/normal/s5", "norm.rms", _make_rms, {"tokens": 4096, "d": 256}, 5, "normal",
         ("prefill", "long")))
# tiny activations: mean(x^2) ~ eps, where a missing or misplaced eps changes the output by ~sqrt(2)
add(Case("norm.rms/t5d256/normal-tiny/s4", "norm.rms", _make_rms, {"tokens": 5, "d": 256, "scale": 1e-3}, 4,
         "normal", ("prefill", "small-magnitude")))
for tokens, heads, dist, seed in [(1, 64, "normal", 0), (17, 8, "outliers", 1)]:
    add(Case(f"norm.head/t{tokens}h{heads}/{dist}/s{seed}", "norm.head", _make_head,
             {"tokens": tokens, "heads": heads}, seed, dist, ("decode" if tokens == 1 else "prefill",)))
