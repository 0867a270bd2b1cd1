"""Interleaved partial RoPE on the last 64 dims, per-layer theta / YaRN, and its inverse (spec 3.3)."""

from __future__ import annotations

import torch

from references.config import RopeScaling
from references.components.rope import apply_rope, rope_inv_freq

from ..components import ComponentSpec, OutputSpec, register
from ._case import Case, add, dist_tensor
from ._serving import level_tolerance, serving_emulation


def rope(x: torch.Tensor, positions: torch.Tensor, *, theta: float, yarn: bool, inverse: bool = False,
         rope_dim: int = 64) -> torch.Tensor:
    """x [T, H, d]: rotate dims [d-64, d) interleaved at each token's position (YaRN factor 16,
    L0 65536, beta 32/1 when ``yarn``; SWA layers: theta 10000 without YaRN; CSA/HCA: 160000 with)."""
    inv_freq = rope_inv_freq(rope_dim, theta, RopeScaling() if yarn else None)
    return apply_rope(x, positions, inv_freq.to(x.dtype) if x.dtype == torch.float64 else inv_freq,
                      rope_dim, inverse=inverse)


# y = x cos - x' sin: two bf16-rounded inputs per output (2 ub) relative to |x| scale; the phase is
# computed from positions (exact) and inv_freq in fp64 by the golden, in fp32 by serving code: at
# position p the fp32 phase error is about p * u32 radians, added as extra (positions <= 70000 here).
def _scale(kw, want):
    x = kw["x"].double()
    return x.abs().amax(dim=-1, keepdim=True).expand_as(want)


TOL = level_tolerance(n=2, k_inputs=2, what="rope", extra_serving=70000 * 2.0**-24 * 2,
                      extra_reason="fp32 phase at positions up to 70000")
register(ComponentSpec(
    name="rope.apply", family="rope", reference=rope,
    outputs=(OutputSpec("y", tol=TOL, scale=_scale),),
    description="interleaved partial RoPE (forward and inverse) with per-layer theta / YaRN",
    spec_section="3.3", emulate=serving_emulation(rope, bf16_inputs=("x",)),
    divergences=("vLLM at a970fb5a1 applies YaRN to SWA layers too (spec 3.3 warning)",),
))


def _make(g, p):
    T = p["tokens"]
    pos = torch.randint(0, p["max_pos"], (T,), generator=g)
    return {"x": dist_tensor(g, (T, p["heads"], 512), p["dist"]), "positions": pos, "theta": p["theta"],
            "yarn": p["yarn"], "inverse": p["inverse"]}


for theta, yarn in ((10000.0, False), (160000.0, True)):
    for inverse in (False, True):
        for tokens, heads, max_pos, seed in [(1, 8, 70000, 0), (37, 8, 4096, 1)]:
            tag = f"theta{int(theta)}{'-yarn' if yarn else ''}{'-inv' if inverse else ''}"
            add(Case(f"rope.apply/{tag}/t{tokens}/s{seed}", "rope.apply", _make,
                     {"tokens": tokens, "heads": heads, "max_pos": max_pos, "theta": theta, "yarn": yarn,
                      "inverse": inverse}, seed, "normal", ("decode" if tokens == 1 else "prefill",)))
