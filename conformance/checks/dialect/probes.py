"""Probe inputs that make the two FP8 e4m3 dialects (and the three fmax values) produce different bytes.

Producer probes are float values laid out in quantisation blocks. Every block is anchored by its amax,
chosen so that the power-of-two scale rule ``2**ceil(log2(amax / fmax))`` gives a different pattern of
scales for each fmax in {448, 240, 224}:

    anchor amax   fmax 448   fmax 240   fmax 224
    232           1          1          2
    300           1          2          2
    448           1          2          2       (plus: 448 itself only fits unclipped when fmax = 448)

Inside each block the values are the ones whose codes differ between dialects (every nonzero value does:
the same value is code+8 in fnuz, one exponent step higher), with 1.0 first (0x38 OCP, 0x40 fnuz), powers
of two, 224 / 240 / 448 and values just above each, subnormals of both dialects, tiny negatives that
underflow (OCP writes -0 = 0x80, fnuz must write 0x00 because 0x80 is its NaN), and -0.0 itself.

Consumer probes are bytes: every code that is a finite number in the fed dialect, in blocks with known
scales, so the values read can be matched against each decoding.
"""

from __future__ import annotations

import numpy as np
import torch

from references.formats.minifloat import MiniFloat
from references.formats.scales import e8m0_decode, e8m0_encode

ANCHORS = (232.0, 300.0, 448.0)
FMAX_CANDIDATES = (448.0, 240.0, 224.0)
TINY_NEGATIVE = -(2.0**-14)  # below half of fnuz's smallest subnormal (2**-10) for any scale >= 1/2

# designed magnitudes (signed), in the order they appear in a block; filtered to |v| <= anchor
_DESIGNED = (
    1.0,
    -1.0,
    2.0,
    0.5,
    0.25,
    4.0,
    8.0,
    16.0,
    64.0,
    128.0,
    1.125,
    1.5,
    3.0,
    -3.0,
    224.0,
    232.0,
    240.0,
    248.0,
    256.0,
    288.0,
    300.0,
    320.0,
    384.0,
    416.0,
    448.0,
    -224.0,
    -240.0,
    -448.0,
    TINY_NEGATIVE,
    -0.0,
    -(2.0**-20),
    0.0,
    2.0**-9,
    2.0**-10,
    2.0**-7,
    2.0**-6,
    -(2.0**-9),
    0.015625 * 3,
)


def _block_pattern(anchor: float, width: int) -> np.ndarray:
    vals = [v for v in _DESIGNED if abs(v) <= anchor]
    if anchor not in vals:
        vals.insert(1, anchor)
    # pad with a ladder of distinct normal values (mantissas 1..1.875, exponents -3..6), alternating sign
    k = 0
    while len(vals) < width:
        man, exp = 1.0 + (k % 8) / 8.0, (k // 8) % 10 - 3
        vals.append((-1.0) ** k * man * 2.0**exp)
        k += 1
    return np.array(vals[:width], dtype=np.float64)


def producer_probe_values(block: tuple[int, int] = (1, 128)) -> torch.Tensor:
    """float32 [rows, cols]: one block per anchor (side by side for square weight tiles)."""
    br, bc = block
    if br == 1:
        out = np.stack([_block_pattern(a, bc) for a in ANCHORS])
    else:
        tiles = []
        for a in ANCHORS:
            pat = _block_pattern(a, bc)
            # every row of the tile carries the pattern rotated, so the tile's amax is still `a`
            tiles.append(np.stack([np.roll(pat, r) for r in range(br)]))
        out = np.concatenate(tiles, axis=1)
    t = torch.from_numpy(out.astype(np.float32))
    return t


def consumer_probe(dialect: MiniFloat, block: tuple[int, int] = (1, 128), scale_fmt: str = "ue8m0"):
    """(codes uint8 [rows, cols], scales, scale values float64 per block) covering every finite code.

    Block scales cycle through 1, 2, 0.5 so a consumer that ignores or inverts its scales shows up.
    """
    codes = np.array([c for c in range(256) if np.isfinite(dialect.table[c])], dtype=np.uint8)
    br, bc = block
    per_block = br * bc
    n_blocks = max(3, -(-len(codes) // per_block))
    flat = np.resize(codes, n_blocks * per_block)
    if br == 1:
        c = flat.reshape(n_blocks, bc)
    else:
        c = np.concatenate(
            [flat[i * per_block : (i + 1) * per_block].reshape(br, bc) for i in range(n_blocks)], axis=1
        )
    s = np.array([1.0, 2.0, 0.5] * n_blocks)[:n_blocks].reshape((n_blocks, 1) if br == 1 else (1, n_blocks))
    scales = (
        torch.from_numpy(e8m0_encode(s)) if scale_fmt == "ue8m0" else torch.from_numpy(s.astype(np.float32))
    )
    return torch.from_numpy(c.copy()), scales, s


def scales_as_float(scales, scale_fmt: str) -> np.ndarray:
    s = scales.detach().cpu().numpy() if isinstance(scales, torch.Tensor) else np.asarray(scales)
    if scale_fmt == "ue8m0":
        if s.dtype != np.uint8:
            raise TypeError(f"ue8m0 scales must be uint8 bytes, got {s.dtype}")
        return e8m0_decode(s)
    return s.astype(np.float64)


def expand_scales(scale_vals: np.ndarray, block: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Per-block scale values [..., R/br, C/bc] -> per-element [..., R, C]."""
    s = np.asarray(scale_vals, dtype=np.float64)
    if s.shape == tuple(shape):
        return s
    br, bc = block
    if s.ndim == 1 and len(shape) == 2:
        s = s.reshape(shape[0] // br, shape[1] // bc)
    return np.repeat(np.repeat(s, br, axis=-2), bc, axis=-1).reshape(shape)


def block_amax(values: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    v = np.abs(np.asarray(values, dtype=np.float64))
    r, c = v.shape[-2:]
    br, bc = block
    return v.reshape(*v.shape[:-2], r // br, br, c // bc, bc).max(axis=(-3, -1))


__all__ = [
    "ANCHORS",
    "FMAX_CANDIDATES",
    "TINY_NEGATIVE",
    "producer_probe_values",
    "consumer_probe",
    "scales_as_float",
    "expand_scales",
    "block_amax",
]
