"""Token embedding and hyper-connection expansion (spec 3.1): ``e = E[id]``, ``X = [e] * hc``. No scaling."""

from __future__ import annotations

import torch

from ._validate import check_float

__all__ = ["embed", "hc_expand"]


def embed(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[ids]`` -> [..., D] in the table's dtype (a gather: no arithmetic, nothing to round)."""
    check_float("table", table)
    if table.dim() != 2:
        raise ValueError(f"table: expected [vocab, D], got {tuple(table.shape)}")
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"ids: expected an integer tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]):
        raise ValueError(f"ids: token ids must lie in [0, {table.shape[0]}), got "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    return table[ids.long()]


def hc_expand(e: torch.Tensor, hc_mult: int) -> torch.Tensor:
    """[..., D] -> [..., hc_mult, D]: ``hc_mult`` identical copies of the embedding (the initial streams)."""
    check_float("e", e)
    if not isinstance(hc_mult, int) or hc_mult < 1:
        raise ValueError(f"hc_mult: need an int >= 1, got {hc_mult!r}")
    return e.unsqueeze(-2).expand(*e.shape[:-1], hc_mult, e.shape[-1]).contiguous()
