"""Multi-token-prediction (MTP) input mixing and head (spec 3.15).

MTP layer k predicts token t+k+1 from the main model's **pre-HC_head** 4-stream residual at t and the
embedding of token t+1 (``next_ids``):
  1. e = enorm(Embed(next_ids))
  2. X_in = hnorm(X_main) per stream
  3. X = h_proj(X_in) + broadcast_hc(e_proj(e))     (both FP8 D x D linears)
  4. X -> one full decoder block (SWA-only, RoPE theta 10000, no hash routing; ``references.model``)
  5. logits = Head . norm(HC_head(X; mtp.hc_head_*))  (shared LM head)

Weights are keyed relative to the MTP layer (``e_proj``, ``h_proj``, ``enorm``, ``hnorm``, ``norm``,
``hc_head_fn``, ``hc_head_base``, ``hc_head_scale``).

variant (``mtp_input``): "official" (OFF ``MTPBlock``: every position's embedding is used) or "vllm"
(vLLM ``DeepSeekV4MultiTokenPredictorLayer`` zeroes the embedding at position 0).
"""

from __future__ import annotations

import torch

from ..numerics import GOLDEN, Numerics
from ._validate import check_float, compute_dtype, round_act
from .embedding import embed
from .head import final_head
from .moe import linear
from .norms import rms_norm

__all__ = ["mtp_input", "mtp_logits", "MTP_VARIANTS"]

MTP_VARIANTS = ("official", "vllm")


def mtp_input(X_main: torch.Tensor, next_ids: torch.Tensor, embed_table: torch.Tensor, w, *, eps: float,
              positions: torch.Tensor | None = None, variant: str = "official",
              numerics: Numerics = GOLDEN) -> torch.Tensor:
    """Steps 1-3: ``X_main [T, hc, D]``, ``next_ids [T]`` -> MTP block input [T, hc, D]."""
    if variant not in MTP_VARIANTS:
        raise ValueError(f"variant: unknown {variant!r}; known {MTP_VARIANTS}")
    check_float("X_main", X_main)
    if X_main.dim() != 3:
        raise ValueError(f"X_main: expected [T, hc, D], got {tuple(X_main.shape)}")
    if next_ids.shape != X_main.shape[:1]:
        raise ValueError(f"next_ids: expected shape ({X_main.shape[0]},), got {tuple(next_ids.shape)}")
    dt = compute_dtype(X_main)
    e = embed(next_ids, embed_table).to(dt)
    if variant == "vllm":
        pos = positions if positions is not None else torch.arange(len(next_ids))
        e = torch.where((pos == 0).unsqueeze(-1), torch.zeros_like(e), e)
    e = round_act(rms_norm(e, w["enorm"], eps), numerics)
    x_in = round_act(rms_norm(X_main.to(dt), w["hnorm"], eps), numerics)
    X = linear(x_in, w["h_proj"], numerics) + linear(e, w["e_proj"], numerics).unsqueeze(-2)
    return round_act(X, numerics)


def mtp_logits(X: torch.Tensor, w, head_weight: torch.Tensor, *, norm_eps: float, hc_eps: float,
               numerics: Numerics = GOLDEN) -> torch.Tensor:
    """Step 5: the MTP block output [T, hc, D] -> logits [T, vocab] via the MTP's own HC head and norm."""
    return final_head(X, w["hc_head_fn"], w["hc_head_base"], w["hc_head_scale"], w["norm"], head_weight,
                      norm_eps=norm_eps, hc_eps=hc_eps, numerics=numerics)
