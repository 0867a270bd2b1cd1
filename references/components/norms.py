"""RMSNorm variants (spec 3.2).

``y = x * rsqrt(mean(x**2) + eps) * w`` over the last dim, computed in the dtype of ``x`` (fp32 golden,
fp64 cross-check; bf16 / fp16 inputs are computed in fp32 and returned in fp32).
"""

from __future__ import annotations

import torch

from ._checks import compute_dtype, finite, float_tensor

RMS_NORM_VARIANTS = ("official", "hf")


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x**2, -1) + eps)``: the per-head q norm (OFF ``q *= rsqrt(...)``, HF
    ``DeepseekV4UnweightedRMSNorm``) and the mHC input scaling."""
    float_tensor("x", x)
    if not eps >= 0:
        raise ValueError(f"eps: must be >= 0, got {eps}")
    x = x.to(compute_dtype(x))
    return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, variant: str = "official") -> torch.Tensor:
    """Weighted RMSNorm over the last dim.

    variant:
      * ``"official"`` (OFF ``RMSNorm``, vLLM ``fused_q_kv_rmsnorm``): normalise and multiply by the
        weight in one precision (the compute dtype).
      * ``"hf"`` (HF ``DeepseekV4RMSNorm``): the normalised x is rounded to the *weight's* dtype before
        the weight multiply. Only differs from "official" when ``weight`` is lower precision (bf16).
    """
    float_tensor("x", x)
    float_tensor("weight", weight, ndim=1, last=x.shape[-1])
    finite("weight", weight)
    if variant not in RMS_NORM_VARIANTS:
        raise ValueError(f"variant: {variant!r} not in {RMS_NORM_VARIANTS}")
    dt = compute_dtype(x)
    n = unweighted_rms_norm(x, eps)
    if variant == "hf":
        n = n.to(weight.dtype).to(dt)
    return n * weight.to(dt)
