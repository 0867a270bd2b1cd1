"""Rotary position embedding of DSV4 (spec 3.3): interleaved (GPT-J) pairs on the trailing dims.

* Only the LAST ``rope_dim`` (64) dims of the last axis rotate; the leading (nope) dims pass through.
* Pair i is ``(x[off + 2i], x[off + 2i + 1])`` with ``off = d - rope_dim`` (interleaved, not the
  NeoX half-split pairing ``(x[off + i], x[off + i + rope_dim/2])``).
* ``x'_{2i} = x_{2i} cos(phi) - x_{2i+1} sin(phi)``, ``x'_{2i+1} = x_{2i} sin(phi) + x_{2i+1} cos(phi)``,
  ``phi = pos * omega_i``; the inverse uses ``-phi``.
* Frequencies and phases are computed in float64 (golden); cos/sin are then rounded once to the dtype
  of ``x`` and the rotation is done in that dtype. (OFF builds the table in fp32; the difference is the
  fp32 rounding of omega_i, a few ulp of phase, which the golden deliberately avoids.)
"""

from __future__ import annotations

import math

import torch

from ..config import DSV4Config, RopeScaling
from ._checks import compute_dtype, float_tensor

ROPE_VARIANTS = ("official", "vllm-yarn-on-swa")


def yarn_low_high(rope_dim: int, theta: float, yarn: RopeScaling) -> tuple[int, int]:
    """YaRN correction range (spec 3.3): ``corr(k) = dim ln(L0 / (2 pi k)) / (2 ln theta)``,
    ``low = max(floor(corr(beta_fast)), 0)``, ``high = min(ceil(corr(beta_slow)), dim - 1)``.

    theta=160000 -> (15, 25); theta=10000 -> (20, 33).
    """

    def corr(k: float) -> float:
        return (
            rope_dim
            * math.log(yarn.original_max_position_embeddings / (2 * math.pi * k))
            / (2 * math.log(theta))
        )

    low = max(math.floor(corr(yarn.beta_fast)), 0)
    high = min(math.ceil(corr(yarn.beta_slow)), rope_dim - 1)
    return low, high


def rope_inv_freq(rope_dim: int, theta: float, yarn: RopeScaling | None = None) -> torch.Tensor:
    """Per-pair angular frequencies ``omega_i`` (float64, shape [rope_dim/2]).

    Plain: ``omega_i = theta ** (-2i / rope_dim)``. With YaRN (spec 3.3): ramp_i =
    clamp((i - low) / (high - low), 0, 1) over the pair index i, and ``omega_i' = omega_i / s * ramp_i
    + omega_i * (1 - ramp_i)``: pairs below ``low`` keep their frequency, pairs at or above ``high`` are
    divided by the factor s. No mscale (cos / sin are not rescaled), as OFF, HF and vLLM agree.
    """
    if rope_dim <= 0 or rope_dim % 2:
        raise ValueError(f"rope_dim: must be a positive even number, got {rope_dim}")
    if not theta > 1:
        raise ValueError(f"theta: must be > 1, got {theta}")
    i = torch.arange(rope_dim // 2, dtype=torch.float64)
    omega = float(theta) ** (-2.0 * i / rope_dim)
    if yarn is None or yarn.factor == 1.0:
        return omega
    low, high = yarn_low_high(rope_dim, theta, yarn)
    if low == high:
        high = high + 0.001  # as the sources do, to avoid a zero-width ramp
    ramp = ((i - low) / (high - low)).clamp(0.0, 1.0)
    return omega / yarn.factor * ramp + omega * (1.0 - ramp)


def layer_inv_freq(cfg: DSV4Config, layer: int, variant: str = "official") -> torch.Tensor:
    """The frequency table of one layer (q / kv, its compressor and its indexer share it).

    variant:
      * ``"official"`` (OFF, HF; vLLM after ``06d0369d``): SWA-only layers theta=10000 without YaRN;
        CSA / HCA layers theta=160000 with YaRN.
      * ``"vllm-yarn-on-swa"`` (vLLM ``a970fb5a1``, spec 3.3 warning / section 8.1): YaRN on every
        layer, theta per layer type; SWA layers then blend pairs 20..31.
    """
    if variant not in ROPE_VARIANTS:
        raise ValueError(f"variant: {variant!r} not in {ROPE_VARIANTS}")
    if not 0 <= layer < cfg.n_layers_total:
        raise ValueError(f"layer: {layer} outside [0, {cfg.n_layers_total})")
    theta = cfg.rope_theta_for(layer)
    use_yarn = cfg.uses_yarn(layer) or (variant == "vllm-yarn-on-swa" and cfg.rope_scaling is not None)
    return rope_inv_freq(cfg.qk_rope_head_dim, theta, cfg.rope_scaling if use_yarn else None)


def apply_rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    rope_dim: int = 64,
    inverse: bool = False,
) -> torch.Tensor:
    """Rotate the last ``rope_dim`` dims of ``x``'s last axis (interleaved pairs), out of place.

    positions: integer (or float) tensor whose shape is a prefix of ``x.shape[:-1]`` (e.g. [T] for
    x [T, H, d]); it broadcasts over the remaining leading dims.
    """
    float_tensor("x", x)
    if x.shape[-1] < rope_dim:
        raise ValueError(f"x: last dim {x.shape[-1]} smaller than rope_dim {rope_dim}")
    if not isinstance(positions, torch.Tensor):
        raise TypeError("positions: expected a tensor")
    if tuple(positions.shape) != tuple(x.shape[: positions.ndim]) or positions.ndim >= x.ndim:
        raise ValueError(
            f"positions: shape {tuple(positions.shape)} is not a prefix of x.shape[:-1] {tuple(x.shape[:-1])}"
        )
    if tuple(inv_freq.shape) != (rope_dim // 2,):
        raise ValueError(f"inv_freq: expected shape ({rope_dim // 2},), got {tuple(inv_freq.shape)}")
    dt = compute_dtype(x)
    x = x.to(dt)
    # phase in float64: pos * omega, exact enough for positions up to 2**20 and beyond
    phi = positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64)
    if inverse:
        phi = -phi
    phi = phi.reshape(*positions.shape, *([1] * (x.ndim - 1 - positions.ndim)), rope_dim // 2)
    cos, sin = torch.cos(phi).to(dt), torch.sin(phi).to(dt)
    nope, rot = x[..., :-rope_dim], x[..., -rope_dim:]
    a, b = rot[..., 0::2], rot[..., 1::2]
    out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((nope, out), dim=-1)
