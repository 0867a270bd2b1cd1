"""Argument checks shared by the model-side references: errors name the argument."""

from __future__ import annotations

import torch

from ..numerics import Numerics


def check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating tensor, got {t.dtype}")


def check_shape(name: str, t, shape: tuple) -> None:
    check_float(name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    """The dtype references compute in: the widest of the floating *activation* inputs (fp32 / fp64).

    Low-precision activations (bf16 / fp16) are computed in fp32, the precision the official code uses
    inside every op; weights never decide the compute dtype (they are cast to it).
    """
    dt = torch.promote_types(ts[0].dtype, torch.float32)
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def round_act(x: torch.Tensor, numerics: Numerics) -> torch.Tensor:
    """Round to ``numerics.act_dtype`` and back (the cast OFF does between ops); identity for GOLDEN."""
    if numerics.act_dtype is None:
        return x
    return x.to(numerics.act_dtype).to(x.dtype)
