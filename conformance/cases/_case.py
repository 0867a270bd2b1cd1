"""The Case row and seeded input distributions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

CASES: dict[str, "Case"] = {}


@dataclass(frozen=True)
class Case:
    id: str                         # stable, unique: "<component>/<shape tag>/<dist>/s<seed>"
    component: str
    maker: Callable[[torch.Generator, dict], dict]   # (generator, params) -> kwargs of the reference
    params: dict = field(default_factory=dict)
    seed: int = 0
    dist: str = "normal"
    tags: tuple = ()                # e.g. ("decode", "batch1"), ("prefill", "long"), ("adversarial",)
    tier: str = "fast"              # fast (every run) | full (big shapes: `--tier full`, which nox -s cpu uses)

    def make_inputs(self) -> dict:
        g = torch.Generator().manual_seed(self.seed)
        return self.maker(g, dict(self.params, dist=self.dist))


TIERS = ("fast", "full")


def add(case: Case) -> Case:
    if case.tier not in TIERS:
        raise ValueError(f"case {case.id!r}: tier {case.tier!r} not in {TIERS}")
    if case.id in CASES:
        raise ValueError(f"duplicate case id {case.id!r}")
    CASES[case.id] = case
    return case


def all_cases() -> list[Case]:
    return list(CASES.values())


def cases_for(component: str) -> list[Case]:
    return [c for c in CASES.values() if c.component == component]


def dist_tensor(g: torch.Generator, shape, dist: str, *, scale: float = 1.0) -> torch.Tensor:
    """Named input distributions (all seeded through ``g``, fp32).

    normal      N(0, scale^2)
    outliers    normal with 1% of entries x 100 (activation outliers)
    all_negative -|normal|
    near_ties   values on a coarse grid (many exact and near-exact ties)
    wide        log-uniform magnitudes over 2^-20 .. 2^10, random signs (exercises subnormals/saturation)
    """
    x = torch.randn(shape, generator=g, dtype=torch.float32) * scale
    if dist == "normal":
        return x
    if dist == "outliers":
        m = torch.rand(shape, generator=g) < 0.01
        return torch.where(m, x * 100, x)
    if dist == "all_negative":
        return -x.abs()
    if dist == "near_ties":
        return torch.round(x * 4) / 4 + 1e-6 * torch.randn(shape, generator=g)
    if dist == "wide":
        e = torch.rand(shape, generator=g) * 30 - 20
        s = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
        return s * torch.exp2(e) * scale
    raise ValueError(f"unknown input distribution {dist!r}")
