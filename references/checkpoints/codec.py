"""Encode / decode one checkpoint tensor between float values and its stored form (spec 1, 4.2, 4.3).

All quantisation goes through ``references.formats`` (bit-level codecs); torch's float8 dtypes are used
only as storage containers (bytes are reinterpreted with ``.view``, never converted by torch casts).
Matrices whose sides are not multiples of the FP8 block (``spec.block``: 128x128 in V4, 32x32 in V4.1; tiny
configs) are zero-padded to the block grid, quantised, and cropped: the scale grid is ``ceil(R/br) x ceil(C/bc)``
as in the release. ``decode`` refuses a scale grid that is not the spec's block grid, naming the block the
weight / scale shapes imply.

The Engram table (kind ``fp8_rows``) is FP8 e4m3 (OCP) codes with one UE8M0 scale per 32 values of a row
(``ENGRAM_TABLE``; amax -> 448 rounded up to a power of two, the weights' ue8m0 recipe on a (1, 32) block). ``decode``
gives fp32 ``code x 2^(byte - 127)`` (exact) and refuses a NaN code (0x7F / 0xFF) or a NaN scale byte (0xFF) naming
where it sits; ``table_bytes`` returns the stored bytes (codes, scales) as uint8 for the golden, which decodes them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..formats.blockscale import (
    BlockFP8,
    block_mismatch,
    dequantize_fp8,
    dequantize_mxfp4,
    quantize_fp8,
    quantize_mxfp4,
)
from ..formats.nvfp4 import E2M1_MAX, dequantize_nvfp4, quantize_nvfp4
from ..formats.scales import e8m0_decode
from .layout import ENGRAM_TABLE_BLOCK, FP8_BLOCK, TensorSpec

FP8_WEIGHT = BlockFP8.of("ocp", (FP8_BLOCK, FP8_BLOCK))                       # ue8m0 scales
FP8_WEIGHT_FP32 = BlockFP8.of("ocp", (FP8_BLOCK, FP8_BLOCK), scale_fmt="fp32")  # Flash-Base style
SCALE_DTYPES = ("e8m0", "uint8", "fp32")
# NVFP4 (tiny writer): the activation amax its input_scale stands for (metadata the golden does not use: the golden
# takes unquantised activations), and the E4M3 maximum the weight_scale_2 aims the largest block scale at
NVFP4_INPUT_AMAX = 8.0
E4M3_MAX = 448.0
ENGRAM_TABLE = BlockFP8.of("ocp", (1, ENGRAM_TABLE_BLOCK))                    # ue8m0 scale per 32 row values


def fp8_weight_recipe(block=(FP8_BLOCK, FP8_BLOCK), *, fp32_scales: bool = False) -> BlockFP8:
    """The e4m3 (OCP) weight recipe with ``block`` scales: ue8m0, or fp32 (Flash-Base style)."""
    return BlockFP8.of("ocp", tuple(block), scale_fmt="fp32" if fp32_scales else "ue8m0")


def _pad_to_block(x: torch.Tensor, block=(FP8_BLOCK, FP8_BLOCK)) -> torch.Tensor:
    r, c = x.shape
    br, bc = block
    return F.pad(x, (0, (-c) % bc, 0, (-r) % br))


def encode(spec: TensorSpec, value: torch.Tensor, *, scale_dtype: str = "e8m0") -> dict[str, torch.Tensor]:
    """Float value (logical shape) -> {name: stored tensor[, scale_name: scale]}."""
    if tuple(value.shape) != spec.shape:
        raise ValueError(f"{spec.name}: value shape {tuple(value.shape)} != layout shape {spec.shape}")
    if spec.kind == "fp8":
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype: one of {SCALE_DTYPES}, got {scale_dtype!r}")
        r, c = spec.shape
        codes, scales = quantize_fp8(_pad_to_block(value.double(), spec.block), fp8_weight_recipe(spec.block))
        codes = codes[:r, :c].contiguous()
        if scale_dtype == "fp32":
            s = torch.from_numpy(e8m0_decode(scales.numpy())).float()  # the same powers of two, as fp32
        elif scale_dtype == "e8m0":
            s = scales.view(torch.float8_e8m0fnu)
        else:
            s = scales
        return {spec.name: codes.view(torch.float8_e4m3fn), spec.scale_name: s}
    if spec.kind == "fp8_rows":
        codes, scales = quantize_fp8(value.double(), ENGRAM_TABLE)
        return {spec.name: codes.view(torch.float8_e4m3fn), spec.scale_name: scales.view(torch.float8_e8m0fnu)}
    if spec.kind == "fp4":
        packed, scales = quantize_mxfp4(value.double())
        return {spec.name: packed.view(torch.int8), spec.scale_name: scales.view(torch.float8_e8m0fnu)}
    if spec.kind == "nvfp4":
        # weight_scale_2 = 2^ceil(log2(amax / (6 x 448))): ModelOpt's amax / (6 x 448) rounded up to a power of two,
        # so every dequantised value (e2m1 x e4m3 x 2^k, <= 5 significant bits) is exact in bf16 too (dtype="bf16")
        a = float(value.abs().max())
        g = 2.0 ** math.ceil(math.log2(a / (E2M1_MAX * E4M3_MAX))) if a > 0 else 1.0
        packed, sbytes, _ = quantize_nvfp4(value.double(), global_scale=g)
        n = spec.nvfp4_names()
        return {spec.name: packed, n["weight_scale"]: sbytes.view(torch.float8_e4m3fn),
                n["weight_scale_2"]: torch.tensor(g, dtype=torch.float32),
                n["input_scale"]: torch.tensor(NVFP4_INPUT_AMAX / (E2M1_MAX * E4M3_MAX), dtype=torch.float32)}
    if spec.kind == "bf16":
        return {spec.name: value.to(torch.bfloat16)}
    if spec.kind == "fp32":
        return {spec.name: value.to(torch.float32)}
    if spec.kind == "int":
        return {spec.name: value.to(torch.int64)}
    raise ValueError(f"{spec.name}: unknown kind {spec.kind!r}")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def nvfp4_check(spec: TensorSpec, scale: torch.Tensor, extra: dict) -> None:
    """Refuse (ValueError naming the stored tensor) what an NVFP4 checkpoint cannot hold: a NaN scale byte (0x7F /
    0xFF), a negative one (sign bit: ModelOpt's scales are amax / 6 / weight_scale_2 >= 0), a global or input scale
    that is not one positive finite fp32 value."""
    n = spec.nvfp4_names()
    b = _bytes(scale)
    bad = ((b & 0x7F) == 0x7F) | (b > 0x80)       # 0x80 (-0) reads as zero: accepted
    if bool(bad.any()):
        i = tuple(int(v) for v in torch.nonzero(bad)[0])
        what = "a NaN" if (int(b[i]) & 0x7F) == 0x7F else "a negative"
        raise ValueError(f"{n['weight_scale']}: {what} E4M3 scale byte 0x{int(b[i]):02X} at {list(i)}")
    for k in ("weight_scale_2", "input_scale"):
        t = extra[k]
        if t.numel() != 1 or not (math.isfinite(float(t.reshape(-1)[0])) and float(t.reshape(-1)[0]) > 0):
            raise ValueError(f"{n[k]}: expected one positive finite fp32 value, got {t.reshape(-1)[:4].tolist()} "
                             f"(shape {tuple(t.shape)})")


def table_bytes(spec: TensorSpec, weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An Engram table (kind ``fp8_rows``) as stored -> (codes uint8 [rows, hd], UE8M0 bytes uint8 [rows, hd / 32]),
    checked: the scale grid is one per 32 values of a row, no NaN code (0x7F / 0xFF: OCP e4m3's NaNs), no NaN scale
    byte (0xFF). ValueError naming the stored tensor otherwise."""
    codes, sb = _bytes(weight), _bytes(scale)
    if tuple(codes.shape) != spec.shape:
        raise ValueError(f"{spec.name}: shape {tuple(codes.shape)}; the config implies {spec.shape}")
    if tuple(sb.shape) != spec.scale_shape:
        raise ValueError(f"{spec.scale_name}: shape {tuple(sb.shape)}; one UE8M0 scale per {ENGRAM_TABLE_BLOCK} "
                         f"values of a row implies {spec.scale_shape}")
    for name, b, nan in ((spec.name, codes, (codes & 0x7F) == 0x7F), (spec.scale_name, sb, sb == 0xFF)):
        if bool(nan.any()):
            i = [int(v) for v in torch.nonzero(nan)[0]]
            raise ValueError(f"{name}: NaN byte 0x{int(b[tuple(i)]):02X} at {i}")
    return codes, sb


def decode(spec: TensorSpec, weight: torch.Tensor, scale: torch.Tensor | None,
           extra: dict | None = None) -> torch.Tensor:
    """Stored tensor (+ scale; NVFP4: + ``extra`` {"weight_scale_2", "input_scale"}) -> float32 values of the
    logical shape (exact: code value x scale [x weight_scale_2])."""
    if spec.kind == "nvfp4" and weight.dtype == torch.uint8:
        nvfp4_check(spec, scale, extra)
        return dequantize_nvfp4(weight, _bytes(scale), float(extra["weight_scale_2"].reshape(-1)[0]))
    if spec.kind == "fp8" and weight.dtype != torch.bfloat16 and weight.dtype != torch.float32:
        r, c = spec.shape
        bad = block_mismatch((r, c), tuple(scale.shape), spec.block)
        if bad is not None:   # diagnosed on the logical shape, before padding to the (wrong) block grid
            raise ValueError(bad)
        codes = _pad_to_block(_bytes(weight), spec.block)
        if scale.dtype == torch.float32:
            vals = dequantize_fp8(codes, scale, fp8_weight_recipe(spec.block, fp32_scales=True))
        else:
            vals = dequantize_fp8(codes, _bytes(scale), fp8_weight_recipe(spec.block))
        return vals[:r, :c].contiguous()
    if spec.kind == "fp8_rows":
        codes, sb = table_bytes(spec, weight, scale)
        return dequantize_fp8(codes, sb, ENGRAM_TABLE)
    if spec.kind == "fp4" and weight.dtype in (torch.int8, torch.uint8):
        return dequantize_mxfp4(_bytes(weight), _bytes(scale))
    if spec.kind == "int":
        return weight.to(torch.int64)
    return weight.to(torch.float32)
