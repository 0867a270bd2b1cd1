"""Argument checks and small numeric helpers shared by the attention-side references.

Every error names the offending argument, so a harness failure points at the input that was wrong.
"""

from __future__ import annotations

import torch

from ..numerics import Numerics


def float_tensor(name: str, t, *, ndim: int | None = None, last: int | None = None) -> torch.Tensor:
    """Refuse anything that is not a floating tensor of the expected rank / last-dim size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating tensor, got {t.dtype}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if last is not None and t.shape[-1] != last:
        raise ValueError(f"{name}: expected last dim {last}, got shape {tuple(t.shape)}")
    return t


def shape_is(name: str, t, shape: tuple) -> torch.Tensor:
    float_tensor(name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """Refuse NaN / Inf, reporting the first offending index."""
    bad = ~torch.isfinite(t)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: non-finite value {t[idx].item()} at index {idx}")
    return t


def index_tensor(name: str, t, *, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"{name}: expected an int64/int32 tensor, got "
            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}"
        )
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    return t


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """References compute in the dtype of their float activations (fp32 golden, fp64 cross-check).

    bf16 / fp16 activations are promoted to fp32 (what the official code does inside every op);
    weights never decide the compute dtype.
    """
    return torch.promote_types(x.dtype, torch.float32)


def round_act(x: torch.Tensor, numerics: Numerics) -> torch.Tensor:
    """Round to ``numerics.act_dtype`` and back (a bf16 tensor boundary of OFF); identity for GOLDEN."""
    if numerics.act_dtype is None:
        return x
    return x.to(numerics.act_dtype).to(x.dtype)
