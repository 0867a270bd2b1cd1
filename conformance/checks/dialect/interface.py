"""What a subject implements to be probed: FP8 producers and consumers, each declared with its edge.

Producer: ``fn(values float32 [R, C]) -> (codes uint8 [R, C], scales)`` - a quantiser (activation quant,
          cache writers, indexer q/K). ``kind="loader"``: ``fn(ocp_codes, ocp_scales) -> (codes, scales)``
          - the checkpoint loader; the harness makes the OCP checkpoint from the probe values with
          ``checkpoint`` (a BlockFP8 recipe) and feeds it in.
Consumer: ``fn(codes uint8 [R, C], scales) -> values float [R, C]`` - what the GEMM / attention reader /
          logits kernel *reads*. An adapter for a real kernel makes the values observable (a GEMM against
          an identity matrix, attention with one key and a one-hot value, logits with unit weights).

``scales`` are uint8 e8m0 bytes when ``scale_fmt == "ue8m0"`` and float32 values when ``"fp32"`` (a
power-of-two value stored as fp32 still says "fp32"; the rule is inferred), one per ``block``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from references.formats.blockscale import BlockFP8


@dataclass(frozen=True)
class Edge:
    name: str
    producer: str
    consumer: str
    block: tuple[int, int]


# The DSV4 producer -> consumer edges that carry FP8 bytes (spec 3.6-3.8, 4.1-4.5).
DSV4_EDGES: dict[str, Edge] = {
    e.name: e
    for e in (
        Edge(
            "weights->gemm",
            "checkpoint weight loading (+ OCP->fnuz conversion)",
            "FP8 block GEMM (weight operand)",
            (128, 128),
        ),
        Edge(
            "act_quant->gemm",
            "activation quantisation (per-token-group FP8)",
            "FP8 block GEMM (activation operand)",
            (1, 128),
        ),
        Edge(
            "swa_cache->sparse_attn",
            "SWA KV cache writer (nope part)",
            "sparse attention (SWA cache reader)",
            (1, 64),
        ),
        Edge(
            "compressed_cache->sparse_attn",
            "compressed KV cache writer (compressor)",
            "sparse attention (compressed cache reader)",
            (1, 64),
        ),
        Edge(
            "indexer_k->logits",
            "indexer K writer (indexer compressor)",
            "indexer logits (K operand)",
            (1, 128),
        ),
        Edge("indexer_q->logits", "indexer q quantisation", "indexer logits (q operand)", (1, 128)),
        # NVFP4 checkpoints (issue 18): the experts' E4M3 block-scale bytes (one per 16 e2m1 values) with the
        # tensor's fp32 weight_scale_2 as their scale; a row of the probe is one scale tensor
        Edge(
            "nvfp4_scales->experts",
            "NVFP4 checkpoint block scales (OCP E4M3 bytes + weight_scale_2, as loaded)",
            "NVFP4 expert weight dequant (e2m1 x scale byte x weight_scale_2)",
            (1, 128),
        ),
    )
}


@dataclass(frozen=True)
class Producer:
    edge: str
    fn: Callable
    block: tuple[int, int]
    scale_fmt: str  # ue8m0 | fp32
    function: str = ""  # what runs, e.g. "vllm...fused_indexer_q_rope_quant"
    kind: str = "quantizer"  # quantizer | loader
    checkpoint: BlockFP8 | None = None  # loader only: the recipe that makes the OCP checkpoint
    amax_floor: float = 0.0
    note: str = ""

    def __post_init__(self):
        if self.scale_fmt not in ("ue8m0", "fp32"):
            raise ValueError(f"Producer {self.edge}: scale_fmt must be ue8m0 or fp32, not {self.scale_fmt!r}")
        if self.kind == "loader" and self.checkpoint is None:
            raise ValueError(f"Producer {self.edge}: a loader needs the checkpoint recipe")


@dataclass(frozen=True)
class Consumer:
    edge: str
    fn: Callable
    block: tuple[int, int]
    scale_fmt: str
    dialect: str  # the dialect it declares it reads (what the probe feeds)
    function: str = ""
    note: str = ""


__all__ = ["Edge", "DSV4_EDGES", "Producer", "Consumer"]
