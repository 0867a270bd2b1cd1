"""NVFP4: e2m1 values in blocks of 16, one E4M3 scale per block, one fp32 scale per tensor.

    value = e2m1(code) * e4m3(scale byte) * global_scale

Where DeepSeek-V4.1 meets it (vLLM in the project venv, paths relative to ``site-packages/vllm``): the
``nvfp4_ds_mla`` compressed KV cache, "256 B of e2m1 pairs + 32 e4m3 scales" a token, i.e. 512 values in blocks
of 16 (``models/deepseek_v41/attention.py:514-518``), and ModelOpt NVFP4 experts with ``group_size=16``
(``models/deepseek_v41/quant_config.py:126-143``). ``global_scale`` here is the *decode* multiplier; checkpoint
formats that store its reciprocal must invert it before calling ``dequantize_nvfp4``.

The scale byte is E4M3 in either dialect: OCP ``float8_e4m3fn`` (bias 7, max 448; 0x7F / 0xFF NaN) or fnuz
``float8_e4m3fnuz`` (bias 8, max 240; 0x80 NaN). The same byte read in the other dialect is exactly x0.5
(OCP bytes read as fnuz) or x2, which ``conformance.ratio.ratio_signature`` names.

Encoding (golden rule: float64 from the unquantised input, each rounding once):
  * ``global_scale`` (when not given) = amax(|x|) / (6 * scale_max) rounded to fp32 (1.0 for an all-zero tensor),
    so the largest block scale lands on the E4M3 maximum;
  * block scale = e4m3(amax(|block|) / 6 / global_scale), round to nearest even, saturating at the dialect max;
  * code = e2m1(clamp(x / (scale * global_scale), +-6)), round to nearest even (a block whose scale rounds to 0
    encodes as zeros). Rounding the scale down can push x / scale past 6: those values saturate at +-6.
Packing as MXFP4 (``blockscale.pack_nibbles``): two codes a byte, the even (first) element in the low nibble.
"""

from __future__ import annotations

import numpy as np
import torch

from .blockscale import pack_nibbles, unpack_nibbles
from .minifloat import FLOAT4_E2M1FN, get_format

NVFP4_BLOCK = 16
E2M1_MAX = 6.0

__all__ = ["NVFP4_BLOCK", "quantize_nvfp4", "dequantize_nvfp4", "nvfp4_global_scale"]


def _scale_format(dialect: str):
    fmt = get_format(dialect)
    if fmt.name not in ("float8_e4m3fn", "float8_e4m3fnuz"):
        raise ValueError(f"NVFP4 scales are E4M3 (ocp or fnuz), not {fmt.name}")
    return fmt


def nvfp4_global_scale(x, dialect: str = "ocp") -> float:
    """amax(|x|) / (6 * E4M3 max of the dialect), as fp32; 1.0 when x is all zero."""
    a = float(np.abs(np.asarray(x, dtype=np.float64)).max(initial=0.0))
    if a == 0.0:
        return 1.0
    return float(np.float32(a / (E2M1_MAX * _scale_format(dialect).max)))


def quantize_nvfp4(x: torch.Tensor, *, dialect: str = "ocp", global_scale: float | None = None):
    """[..., K] (K a multiple of 16) -> (packed uint8 [..., K/2], scale bytes uint8 [..., K/16], global_scale)."""
    fmt = _scale_format(dialect)
    xa = x.detach().to(torch.float64).cpu().numpy()
    if not np.isfinite(xa).all():
        raise ValueError("quantize_nvfp4: input has NaN or Inf")
    *lead, k = xa.shape
    if k % NVFP4_BLOCK:
        raise ValueError(f"quantize_nvfp4: last dim {k} is not a multiple of {NVFP4_BLOCK}")
    g = nvfp4_global_scale(xa, dialect) if global_scale is None else float(global_scale)
    if not (np.isfinite(g) and g > 0):
        raise ValueError(f"quantize_nvfp4: global_scale must be positive and finite, got {g}")
    b = xa.reshape(*lead, k // NVFP4_BLOCK, NVFP4_BLOCK)
    want = np.abs(b).max(axis=-1) / E2M1_MAX / g
    sbytes = fmt.encode(np.minimum(want, fmt.max), saturate=True)
    s = fmt.decode(sbytes)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(s[..., None] > 0, b / (s[..., None] * g), 0.0)
    codes = FLOAT4_E2M1FN.encode(np.clip(y, -E2M1_MAX, E2M1_MAX), saturate=True).reshape(*lead, k)
    return torch.from_numpy(pack_nibbles(codes)), torch.from_numpy(np.asarray(sbytes, dtype=np.uint8)), g


def dequantize_nvfp4(packed: torch.Tensor, scale_bytes: torch.Tensor, global_scale: float = 1.0, *,
                     dialect: str = "ocp") -> torch.Tensor:
    """(packed [..., K/2], E4M3 scale bytes [..., K/16] in ``dialect``, fp32 global scale) -> float32 [..., K].
    A NaN scale byte (0x7F / 0xFF in OCP, 0x80 in fnuz) gives NaN values for its block."""
    fmt = _scale_format(dialect)
    vals = FLOAT4_E2M1FN.decode(unpack_nibbles(packed.cpu().numpy()))
    *lead, k = vals.shape
    sb = scale_bytes.cpu().numpy()
    if sb.dtype != np.uint8:
        raise ValueError(f"dequantize_nvfp4: scale bytes must be uint8, got {sb.dtype}")
    if tuple(sb.shape) != (*lead, k // NVFP4_BLOCK) or k % NVFP4_BLOCK:
        raise ValueError(f"dequantize_nvfp4: {tuple(sb.shape)} scales do not cover {tuple(vals.shape)} values in "
                         f"blocks of {NVFP4_BLOCK}")
    s = fmt.decode(sb) * float(global_scale)
    out = vals.reshape(*lead, k // NVFP4_BLOCK, NVFP4_BLOCK) * s[..., None]
    return torch.from_numpy(out.reshape(*lead, k).astype(np.float32))
