"""Assertion helpers for the reference tests: every failure names the component and the worst element."""

from __future__ import annotations

import torch

U32 = 2.0**-24  # unit roundoff of float32 (round to nearest)


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): bound on the relative error of an n-term float sum/dot."""
    return n * u / (1 - n * u)


def assert_within(component: str, got: torch.Tensor, ref: torch.Tensor, bound) -> None:
    """|got - ref| <= bound elementwise (bound a tensor broadcastable to ref, or a float)."""
    assert got.shape == ref.shape, f"{component}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    err = (got.double() - ref.double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    bad = ~(err <= bound)
    if bad.any():
        excess = torch.where(bad, err - bound, torch.full_like(err, -1.0)).nan_to_num(nan=float("inf"))
        idx = tuple(int(i) for i in torch.unravel_index(excess.argmax(), err.shape))
        raise AssertionError(
            f"{component}: {int(bad.sum())} / {err.numel()} elements outside the bound; worst at {idx}: "
            f"got {got[idx].item():.9g}, ref {ref[idx].item():.9g}, |diff| {err[idx].item():.3g} > "
            f"bound {bound[idx].item():.3g}"
        )


def assert_equal_idx(component: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape, f"{component}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    bad = got != ref
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{component}: {int(bad.sum())} / {got.numel()} indices differ; first at {idx}: "
            f"got {got[idx].item()}, ref {ref[idx].item()}"
        )
