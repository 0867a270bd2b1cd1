"""Reference producers and consumers: the DSV4 serving numerics of a profile, built from references.

These are the *correct implementations*: the dialect map must be all-consistent for them under both
profiles. They are also the building blocks tests use for mixed-but-consistent setups.
"""

from __future__ import annotations

import torch

from references.formats.blockscale import BlockFP8, dequantize_fp8, quantize_fp8
from references.formats.conversion import ocp_to_fnuz
from references.formats.scales import e8m0_decode
from references.numerics import PROFILES, serving

from .interface import Consumer, Producer

CHECKPOINT_E8M0 = BlockFP8.of("ocp", (128, 128), scale_fmt="ue8m0")  # fp4-expert checkpoints
CHECKPOINT_FP32 = BlockFP8.of("ocp", (128, 128), scale_fmt="fp32")  # Flash-Base
# NVFP4 experts' block scales: OCP E4M3 bytes (ModelOpt / Quark write float8_e4m3fn) with one fp32 scale a tensor
# (weight_scale_2 = amax / (6 * 448): the largest block scale lands on 448)
CHECKPOINT_NVFP4_SCALES = BlockFP8.of("ocp", (1, 128), scale_fmt="fp32")
NVFP4_EDGE = "nvfp4_scales->experts"


def quantizer_producer(
    edge: str, spec: BlockFP8, *, scales_as_fp32: bool = False, function: str = ""
) -> Producer:
    """A block quantiser from references.formats; ``scales_as_fp32`` stores pow2 scales as fp32 values."""

    def fn(x):
        codes, scales = quantize_fp8(x, spec)
        if scales_as_fp32 and spec.scale_fmt == "ue8m0":
            scales = torch.from_numpy(e8m0_decode(scales.numpy())).float()
        return codes, scales

    fmt = "fp32" if scales_as_fp32 else spec.scale_fmt
    return Producer(
        edge,
        fn,
        spec.block,
        fmt,
        function=function
        or f"references quantize_fp8({spec.fmt.name}, fmax {spec.fmax:g}, {spec.scale_fmt})",
        amax_floor=spec.amax_floor,
    )


def loader_producer(edge: str, dialect: str, checkpoint: BlockFP8 = CHECKPOINT_E8M0) -> Producer:
    """Checkpoint loader: OCP bytes kept as they are, or converted to fnuz (0x80 -> 0, scale x2)."""
    fnuz = dialect in ("fnuz", "float8_e4m3fnuz")

    def fn(codes, scales):
        return ocp_to_fnuz(codes, scales, checkpoint.scale_fmt) if fnuz else (codes, scales)

    return Producer(
        edge,
        fn,
        checkpoint.block,
        checkpoint.scale_fmt,
        kind="loader",
        checkpoint=checkpoint,
        function="references ocp_to_fnuz" if fnuz else "references (OCP bytes as loaded)",
    )


def dequant_consumer(edge: str, dialect: str, block, scale_fmt: str) -> Consumer:
    spec = BlockFP8.of(dialect, block, scale_fmt=scale_fmt)

    def fn(codes, scales):
        return dequantize_fp8(codes, scales, spec)

    return Consumer(
        edge,
        fn,
        tuple(block),
        scale_fmt,
        spec.fmt.name,
        function=f"references dequantize_fp8({spec.fmt.name})",
    )


def reference_producers(profile: str, *, checkpoint: BlockFP8 = CHECKPOINT_E8M0) -> dict[str, Producer]:
    n = serving(profile)
    return {
        "weights->gemm": loader_producer("weights->gemm", n.dialect, checkpoint),
        "act_quant->gemm": quantizer_producer("act_quant->gemm", n.linear_act),
        "swa_cache->sparse_attn": quantizer_producer("swa_cache->sparse_attn", n.kv_nope),
        "compressed_cache->sparse_attn": quantizer_producer("compressed_cache->sparse_attn", n.kv_nope),
        "indexer_k->logits": quantizer_producer("indexer_k->logits", n.indexer_k, scales_as_fp32=True),
        "indexer_q->logits": quantizer_producer("indexer_q->logits", n.indexer_q, scales_as_fp32=True),
        # vLLM 0.32 keeps the NVFP4 scale bytes as loaded and decodes them as OCP on every arch (Triton float8e4nv
        # bitcast, fused_moe/experts/nvfp4_emulation_moe.py:223; oracle/nvfp4.py:480-505 converts nothing)
        NVFP4_EDGE: loader_producer(NVFP4_EDGE, "ocp", CHECKPOINT_NVFP4_SCALES),
    }


def reference_consumers(profile: str, *, checkpoint: BlockFP8 = CHECKPOINT_E8M0) -> dict[str, Consumer]:
    d = PROFILES[profile]["dialect"]
    return {
        "weights->gemm": dequant_consumer("weights->gemm", d, checkpoint.block, checkpoint.scale_fmt),
        "act_quant->gemm": dequant_consumer("act_quant->gemm", d, (1, 128), "fp32"),
        "swa_cache->sparse_attn": dequant_consumer("swa_cache->sparse_attn", d, (1, 64), "ue8m0"),
        "compressed_cache->sparse_attn": dequant_consumer(
            "compressed_cache->sparse_attn", d, (1, 64), "ue8m0"
        ),
        "indexer_k->logits": dequant_consumer("indexer_k->logits", d, (1, 128), "fp32"),
        "indexer_q->logits": dequant_consumer("indexer_q->logits", d, (1, 128), "fp32"),
        NVFP4_EDGE: dequant_consumer(NVFP4_EDGE, "ocp", (1, 128), "fp32"),
    }


__all__ = [
    "quantizer_producer",
    "loader_producer",
    "dequant_consumer",
    "reference_producers",
    "reference_consumers",
    "CHECKPOINT_E8M0",
    "CHECKPOINT_FP32",
    "CHECKPOINT_NVFP4_SCALES",
    "NVFP4_EDGE",
]
