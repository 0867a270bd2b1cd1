"""OCP -> fnuz FP8 weight conversion as done when loading an OCP checkpoint on MI300X (spec 4.1).

The same byte decodes to exactly half its OCP value in fnuz (bias 8 vs 7), so:
  * bytes 0x80 (-0 in OCP, NaN in fnuz) become 0x00;
  * the bytes are reinterpreted unchanged;
  * the block scale is doubled: x2 for fp32 scales, exponent byte + 1 for e8m0 scales.
Dequantised weights are then identical before and after (OCP codes of magnitude 448 decode to 224 in
fnuz, which is inside fnuz's range, so nothing saturates).
"""

from __future__ import annotations

import numpy as np
import torch

from .scales import e8m0_double


def ocp_to_fnuz_codes(codes: torch.Tensor) -> torch.Tensor:
    """Reinterpret OCP e4m3fn bytes as fnuz bytes, replacing 0x80 (OCP -0, fnuz NaN) with 0x00."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"FP8 codes must be uint8 bytes, got {codes.dtype}")
    out = codes.clone()
    out[out == 0x80] = 0
    return out


def ocp_to_fnuz_scales(scales: torch.Tensor, scale_fmt: str) -> torch.Tensor:
    """Double each block scale: fp32 x 2, or e8m0 exponent byte + 1 (never multiply the byte)."""
    if scale_fmt == "fp32":
        return scales.to(torch.float32) * 2
    if scale_fmt == "ue8m0":
        if scales.dtype != torch.uint8:
            raise TypeError(f"UE8M0 scales must be uint8 bytes, got {scales.dtype}")
        return torch.from_numpy(e8m0_double(scales.cpu().numpy()))
    raise ValueError(f"unknown scale format {scale_fmt!r}")


def ocp_to_fnuz(codes: torch.Tensor, scales: torch.Tensor, scale_fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    return ocp_to_fnuz_codes(codes), ocp_to_fnuz_scales(scales, scale_fmt)


def e8m0_byte_is_pow2_double(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """True where ``after`` encodes exactly twice ``before`` (used by the dialect checks)."""
    return np.asarray(after, np.int64) == np.asarray(before, np.int64) + 1
