"""Block-scaled FP8 (spec section 4.2) and MXFP4 (section 4.3) quantisers and dequantisers.

Golden rule: compute in float64 from the unquantised input, round once to the target format.

Block shapes used by DSV4:
  * weights:       (128, 128)  one scale per 128x128 tile; (32, 32) in DeepSeek-V4.1 (dense linears, UE8M0
                   scales: vLLM ``models/deepseek_v41/quant_config.py:221-243``). ``infer_block`` reads the block
                   back from a weight / scale shape pair and ``dequantize_fp8`` refuses a scale grid that does
                   not match its block, naming the block the shapes imply
  * activations:   (1, 128)    one scale per token per 128-wide group ("act_quant", vLLM
                   per_token_group_quant_fp8)
  * KV nope part:  (1, 64)     7 blocks over the 448 nope dims (SWA / compressed caches)
  * indexer K / q: (1, 128)    one block per vector
  * MXFP4:         (1, 32)     e2m1 values, e8m0 scale

``fmax`` is explicit because the dialect alone does not fix it: OCP uses 448, fnuz uses 240, and some
vLLM fnuz paths use 224 (``USE_FNUZ`` in the indexer q kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .minifloat import FLOAT4_E2M1FN, MiniFloat, get_format
from .scales import e8m0_decode, e8m0_encode, fp32_scale, pow2_scale


@dataclass(frozen=True)
class BlockFP8:
    """One block-scaled FP8 recipe.

    fmt        : element format (``float8_e4m3fn`` or ``float8_e4m3fnuz``)
    fmax       : the value amax is mapped to (448, 240 or 224)
    block      : (rows, cols) of one scale block over the last two dims
    scale_fmt  : "ue8m0" (power-of-two scale, stored as an e8m0 byte) or "fp32" (amax / fmax)
    amax_floor : lower bound on amax before the scale is taken (1e-4 in DSV4, 1e-10 in vLLM SM90)
    """

    fmt: MiniFloat
    fmax: float
    block: tuple[int, int]
    scale_fmt: str = "ue8m0"
    amax_floor: float = 1e-4

    def __post_init__(self):
        if self.scale_fmt not in ("ue8m0", "fp32"):
            raise ValueError(f"scale_fmt must be 'ue8m0' or 'fp32', not {self.scale_fmt!r}")
        if not 0 < self.fmax <= self.fmt.max:
            raise ValueError(f"fmax {self.fmax} outside (0, {self.fmt.max}] of {self.fmt.name}")

    @classmethod
    def of(cls, dialect: str, block, *, fmax: float | None = None, scale_fmt="ue8m0", amax_floor=1e-4):
        fmt = get_format(dialect)
        return cls(fmt, float(fmax if fmax is not None else fmt.max), tuple(block), scale_fmt, amax_floor)


def _blocks(x: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, tuple]:
    """View [..., R, C] as [..., R/br, br, C/bc, bc]; R and C must be multiples (refuse otherwise)."""
    if x.ndim < 2:
        x = x[None, :]
    *lead, r, c = x.shape
    br, bc = block
    if r % br or c % bc:
        raise ValueError(f"shape {tuple(x.shape)} is not a multiple of the block {block}")
    return x.reshape(*lead, r // br, br, c // bc, bc), (*lead, r, c)


def infer_block(shape, scale_shape) -> tuple[int, ...] | None:
    """The smallest power-of-two block per dim for which a [R, C] tensor has a ``scale_shape`` grid
    (``ceil(R / br) x ceil(C / bc)``); None when no power of two gives that grid. A side shorter than the block
    has one scale either way, so blocks of 32 and 128 are told apart only on sides longer than 32."""
    if len(shape) != len(scale_shape):
        return None
    out = []
    for n, a in zip(shape, scale_shape):
        b = 1
        while -(-n // b) > a and b < (1 << 30):
            b *= 2
        if a < 1 or -(-n // b) != a:
            return None
        out.append(b)
    return tuple(out)


def block_mismatch(shape, scale_shape, block) -> str | None:
    """None when ``scale_shape`` is the ``block`` grid of ``shape``; otherwise the one-line diagnosis
    ``weight [N,K] with scale [a,b] implies block (x,y); config says 128x128``."""
    shape, scale_shape, block = tuple(shape), tuple(scale_shape), tuple(block)
    if len(shape) == len(block) == len(scale_shape) and all(
            -(-n // b) == a for n, a, b in zip(shape, scale_shape, block)):
        return None
    inferred = infer_block(shape, scale_shape)
    says = "x".join(str(b) for b in block)
    implies = (f"block ({','.join(str(b) for b in inferred)})" if inferred is not None
               else "no power-of-two block")
    return (f"weight [{','.join(map(str, shape))}] with scale [{','.join(map(str, scale_shape))}] implies "
            f"{implies}; config says {says}")


def quantize_fp8(x: torch.Tensor, spec: BlockFP8) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` (any float dtype, [..., R, C]) -> (codes uint8 [..., R, C], scales).

    scales: float32 [..., R/br, C/bc] for "fp32"; uint8 e8m0 bytes of the same shape for "ue8m0".
    NaN / Inf in the input are refused: a scale computed from them is meaningless.
    """
    xa = x.detach().to(torch.float64).cpu().numpy()
    if not np.isfinite(xa).all():
        raise ValueError("quantize_fp8: input has NaN or Inf")
    squeeze = xa.ndim == 1
    b, shape = _blocks(xa, spec.block)
    amax = np.abs(b).max(axis=(-3, -1))
    if spec.scale_fmt == "ue8m0":
        s = pow2_scale(amax, spec.fmax, spec.amax_floor)
    else:
        s = fp32_scale(amax, spec.fmax, spec.amax_floor)
    if spec.scale_fmt == "ue8m0":
        y = b / s[..., :, None, :, None]          # a power of two: exact in any precision
    else:
        # an fp32 scale: the serving quantisers divide in fp32 (vLLM's per_token_group_fp8_quant: x / y_s in
        # float), so x / s is rounded to fp32 before the FP8 rounding. In fp64 a quotient just below an FP8
        # rounding tie stays below it while fp32 rounds it onto the tie (then to even): a different code.
        y = (b.astype(np.float32) / s[..., :, None, :, None].astype(np.float32)).astype(np.float64)
    y = np.clip(y, -spec.fmax, spec.fmax)
    codes = spec.fmt.encode(y, saturate=True).reshape(shape)
    scales = e8m0_encode(s) if spec.scale_fmt == "ue8m0" else s.astype(np.float32)
    if squeeze:
        codes, scales = codes[0], scales[0]
    return torch.from_numpy(codes.copy()), torch.from_numpy(np.ascontiguousarray(scales))


def scales_to_float(scales: torch.Tensor, spec: BlockFP8) -> np.ndarray:
    s = scales.cpu().numpy()
    return e8m0_decode(s) if spec.scale_fmt == "ue8m0" else s.astype(np.float64)


def dequantize_fp8(codes: torch.Tensor, scales: torch.Tensor, spec: BlockFP8) -> torch.Tensor:
    """codes uint8 [..., R, C] and per-block scales -> float32 values (exact: decode x scale)."""
    c = codes.cpu().numpy()
    squeeze = c.ndim == 1
    if c.ndim >= 2:
        bad = block_mismatch(c.shape[-2:], tuple(scales.shape[-2:]), spec.block)
        if bad is not None:
            raise ValueError(bad)
    vals = spec.fmt.decode(c)
    b, shape = _blocks(vals, spec.block)
    s = scales_to_float(scales, spec)
    if squeeze:
        s = s[None]
    out = (b * s[..., :, None, :, None]).reshape(shape)
    if squeeze:
        out = out[0]
    return torch.from_numpy(out.astype(np.float32))


def fake_quant_fp8(x: torch.Tensor, spec: BlockFP8) -> torch.Tensor:
    """Quantise-dequantise (the QAT simulation ``act_quant(..., inplace)`` of the official code)."""
    return dequantize_fp8(*quantize_fp8(x, spec), spec).to(x.dtype if x.dtype.is_floating_point else torch.float32)


# -- MXFP4 --------------------------------------------------------------------------------------------
MXFP4_BLOCK = 32
E2M1_MAX = 6.0
MXFP4_AMAX_FLOOR = 6.0 * 2.0**-126


def quantize_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] -> (packed uint8 [..., K/2], e8m0 scale bytes [..., K/32]).

    scale = 2 ** ceil(log2(max(amax, 6 * 2**-126) / 6)); value = e2m1(clamp(x / scale, +-6)), round
    to nearest even; two values per byte with the *low* nibble holding the even (first) element.
    """
    xa = x.detach().to(torch.float64).cpu().numpy()
    if not np.isfinite(xa).all():
        raise ValueError("quantize_mxfp4: input has NaN or Inf")
    *lead, k = xa.shape
    if k % MXFP4_BLOCK:
        raise ValueError(f"last dim {k} is not a multiple of {MXFP4_BLOCK}")
    b = xa.reshape(*lead, k // MXFP4_BLOCK, MXFP4_BLOCK)
    s = pow2_scale(np.abs(b).max(axis=-1), E2M1_MAX, MXFP4_AMAX_FLOOR)
    y = np.clip(b / s[..., None], -E2M1_MAX, E2M1_MAX)
    nib = FLOAT4_E2M1FN.encode(y, saturate=True).reshape(*lead, k)
    return torch.from_numpy(pack_nibbles(nib)), torch.from_numpy(e8m0_encode(s))


def pack_nibbles(nib: np.ndarray) -> np.ndarray:
    nib = np.asarray(nib, dtype=np.uint8)
    if nib.shape[-1] % 2:
        raise ValueError("an odd number of 4-bit values cannot be packed two per byte")
    return (nib[..., 0::2] & 0xF) | ((nib[..., 1::2] & 0xF) << 4)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0xF
    out[..., 1::2] = packed >> 4
    return out


def dequantize_mxfp4(packed: torch.Tensor, scale_bytes: torch.Tensor) -> torch.Tensor:
    """(packed [..., K/2], e8m0 [..., K/32]) -> float32 [..., K]."""
    nib = unpack_nibbles(packed.cpu().numpy())
    vals = FLOAT4_E2M1FN.decode(nib)
    *lead, k = vals.shape
    s = e8m0_decode(scale_bytes.cpu().numpy())
    if s.shape[-1] * MXFP4_BLOCK != k:
        raise ValueError(f"{s.shape[-1]} scales do not cover {k} values in blocks of {MXFP4_BLOCK}")
    out = vals.reshape(*lead, k // MXFP4_BLOCK, MXFP4_BLOCK) * s[..., None]
    return torch.from_numpy(out.reshape(*lead, k).astype(np.float32))


def fake_quant_mxfp4(x: torch.Tensor) -> torch.Tensor:
    return dequantize_mxfp4(*quantize_mxfp4(x)).to(x.dtype)
