"""Final HC head, final RMSNorm and LM head (spec 3.16, 3.2 "final norm").

``h = HC_head(X^L)``; ``logits = Head . RMSNorm(h; norm)``. OFF keeps the head weight in fp32 and returns
fp32 logits; here logits come out in the compute dtype (fp32 golden, fp64 cross-check) for every position.
"""

from __future__ import annotations

import torch

from ..numerics import GOLDEN, Numerics
from ._validate import check_float
from .mhc import hc_head
from .norms import rms_norm

__all__ = ["lm_head", "final_head"]


def lm_head(h: torch.Tensor, norm_weight: torch.Tensor, head_weight: torch.Tensor, *, eps: float) -> torch.Tensor:
    """``RMSNorm(h; norm) . Head^T`` -> logits [..., vocab] (head is unquantised: no FP8 simulation)."""
    check_float("head_weight", head_weight)
    if head_weight.dim() != 2 or head_weight.shape[1] != h.shape[-1]:
        raise ValueError(f"head_weight: expected [vocab, {h.shape[-1]}], got {tuple(head_weight.shape)}")
    y = rms_norm(h, norm_weight, eps)
    return y @ head_weight.to(y.dtype).transpose(0, 1)


def final_head(X: torch.Tensor, hc_fn, hc_base, hc_scale, norm_weight, head_weight, *, norm_eps: float,
               hc_eps: float, numerics: Numerics = GOLDEN, return_h: bool = False):
    """``X^L [..., hc, D]`` -> logits: HC_head (its own fn/base/scale) -> final norm -> LM head.
    return_h: return ``(h, logits)``, h the HC_head output [..., D] the final norm reads."""
    h = hc_head(X, hc_fn, hc_base, hc_scale, norm_eps=norm_eps, hc_eps=hc_eps, numerics=numerics)
    logits = lm_head(h, norm_weight, head_weight, eps=norm_eps)
    return (h, logits) if return_h else logits
