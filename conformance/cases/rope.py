"""Interleaved partial RoPE on the last 64 dims, per-layer theta / YaRN, and its inverse (spec 3.3)."""

from __future__ import annotations

import torch

from references.components.rope import apply_rope, rope_inv_freq
from references.config import RopeScaling

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


PHASE = 70000 * 2.0**-24 * 2  # |d phi| <= pos * u32 (fp32 product) + pos * |d omega|: 2 pos u32 radians
TOL = level_tolerance(n=2, k_inputs=2, what="rope", extra_serving=PHASE, extra_fp32=PHASE,
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


# ------------------------------------------------------------------------------------------ rope.layer
# The rope a layer gets as the model builds it: theta and scaling come from the config for the layer's
# attention type, not from the case. A case can then see an implementation that gives a layer type the wrong
# scaling (vLLM 0.27-0.29 applied YaRN to SWA layers; section 8.1), which rope.apply, handed the table,
# cannot.
LAYER_TYPES = {0: "swa", 4: "csa", 128: "hca"}


def rope_layer(x: torch.Tensor, positions: torch.Tensor, *, compress_ratio: int, inverse: bool = False,
               preset: str = "flash", rope_dim: int = 64) -> torch.Tensor:
    """x [T, H, d]: the RoPE of a layer whose ``compress_ratio`` is 0 (SWA), 4 (CSA) or 128 (HCA) in config
    ``preset`` (flash | pro), built as the official model builds it (references.components.rope.layer_inv_freq:
    SWA theta = rope_theta without YaRN, CSA / HCA compress_rope_theta with the config's YaRN)."""
    from references.components.rope import layer_inv_freq
    from references.config import FLASH, PRO

    cfg = {"flash": FLASH, "pro": PRO}.get(preset)
    if cfg is None:
        raise ValueError(f"preset: {preset!r} not in ('flash', 'pro')")
    if compress_ratio not in cfg.compress_ratios:
        raise ValueError(f"compress_ratio: {compress_ratio} is no layer type of {preset} "
                         f"({sorted(set(cfg.compress_ratios))})")
    if rope_dim != cfg.qk_rope_head_dim:
        raise ValueError(f"rope_dim: {rope_dim} differs from {preset}'s qk_rope_head_dim {cfg.qk_rope_head_dim}")
    inv_freq = layer_inv_freq(cfg, cfg.compress_ratios.index(compress_ratio))
    return apply_rope(x, positions, inv_freq.to(x.dtype) if x.dtype == torch.float64 else inv_freq, rope_dim,
                      inverse=inverse)


register(ComponentSpec(
    name="rope.layer", family="rope", reference=rope_layer,
    outputs=(OutputSpec("y", tol=TOL, scale=_scale),),
    description="a layer's RoPE built from the config by layer type (SWA: theta 10000, no YaRN; CSA/HCA: "
                "160000 with YaRN)",
    spec_section="3.3", emulate=serving_emulation(rope_layer, bf16_inputs=("x",)),
    divergences=("vLLM 0.27-0.29 (build_deepseek_v4_rope) applies YaRN to SWA layers too: spec 8.1",),
))


def _make_layer(g, p):
    T = p["tokens"]
    pos = torch.randint(0, p["max_pos"], (T,), generator=g)
    return {"x": dist_tensor(g, (T, p["heads"], 512), p["dist"]), "positions": pos,
            "compress_ratio": p["compress_ratio"], "inverse": p["inverse"]}


for ratio, kind in LAYER_TYPES.items():
    for inverse in (False, True):
        # positions past YaRN's original 65536 and in the ramp's range: where SWA with and without YaRN differ most
        for tokens, max_pos, seed in [(1, 70000, 0), (37, 70000, 1)]:
            add(Case(f"rope.layer/{kind}{'-inv' if inverse else ''}/t{tokens}/s{seed}", "rope.layer", _make_layer,
                     {"tokens": tokens, "heads": 8, "max_pos": max_pos, "compress_ratio": ratio,
                      "inverse": inverse}, seed, "normal", ("decode" if tokens == 1 else "prefill",)))
