"""The official DSV4 checkpoint layout (spec section 1): every tensor's name, logical shape and storage kind.

Names follow DeepSeek's released checkpoints (``inference/model.py`` parameter names): main layers under
``layers.{i}.``, the MTP layer under ``mtp.{k}.``, top-level ``embed.weight``, ``norm.weight``,
``head.weight``, ``hc_head_{fn,base,scale}``.

Storage kinds:
  * ``fp8``  - FP8 e4m3 ``<name>`` [R, C] + ``<stem>.scale`` [ceil(R/br), ceil(C/bc)] (e8m0 bytes as uint8 or
               float8_e8m0fnu; fp32 in the Flash-Base release); the block (br, bc) is the config's
               ``quantization.weight_block_size``: 128x128 in V4, 32x32 in V4.1
  * ``fp4``  - MXFP4 ``<name>`` packed int8/uint8 [R, C/2] (low nibble = even element) + ``<stem>.scale``
               [R, C/32] e8m0
  * ``bf16`` - a bf16 tensor (fp32 accepted: OFF keeps some norms in fp32)
  * ``fp32`` - an fp32 tensor (mHC params, attention sinks, compressor ape, router bias)
  * ``int``  - integer table (``ffn.gate.tid2eid``: int64 in the release, int32 accepted)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DSV4Config

FP8_BLOCK = 128
MXFP4_BLOCK = 32
KINDS = ("fp8", "fp4", "bf16", "fp32", "int")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]   # logical (dequantised) shape
    kind: str
    block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)   # FP8 weight-scale block (kind "fp8" only)

    @property
    def scale_name(self) -> str | None:
        if self.kind not in ("fp8", "fp4"):
            return None
        stem = self.name[:-len(".weight")] if self.name.endswith(".weight") else self.name
        return stem + ".scale"

    @property
    def stored_shape(self) -> tuple[int, ...]:
        if self.kind == "fp4":
            return (*self.shape[:-1], self.shape[-1] // 2)
        return self.shape

    @property
    def scale_shape(self) -> tuple[int, ...] | None:
        if self.kind == "fp8":
            r, c = self.shape
            br, bc = self.block
            return (-(-r // br), -(-c // bc))
        if self.kind == "fp4":
            return (*self.shape[:-1], self.shape[-1] // MXFP4_BLOCK)
        return None


def layer_prefix(cfg: DSV4Config, layer: int) -> str:
    """``layers.{i}.`` for main layers, ``mtp.{k}.`` for layer ids >= num_hidden_layers (MTP)."""
    if not 0 <= layer < cfg.n_layers_total:
        raise ValueError(f"layer: must be in [0, {cfg.n_layers_total}), got {layer}")
    n = cfg.num_hidden_layers
    return f"layers.{layer}." if layer < n else f"mtp.{layer - n}."


def layer_tensors(cfg: DSV4Config, layer: int) -> list[TensorSpec]:
    """The tensors of one decoder block (main or MTP), names relative to the layer prefix."""
    D, H, hd, hc = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.hc_mult
    ql, g, ol = cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank
    E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
    ratio = cfg.compress_ratio(layer)
    out = [
        TensorSpec("attn_norm.weight", (D,), "bf16"),
        TensorSpec("ffn_norm.weight", (D,), "bf16"),
        TensorSpec("attn.wq_a.weight", (ql, D), "fp8"),
        TensorSpec("attn.q_norm.weight", (ql,), "bf16"),
        TensorSpec("attn.wq_b.weight", (H * hd, ql), "fp8"),
        TensorSpec("attn.wkv.weight", (hd, D), "fp8"),
        TensorSpec("attn.kv_norm.weight", (hd,), "bf16"),
        TensorSpec("attn.wo_a.weight", (g * ol, H * hd // g), "fp8"),
        TensorSpec("attn.wo_b.weight", (D, g * ol), "fp8"),
        TensorSpec("attn.attn_sink", (H,), "fp32"),
    ]
    if ratio:
        c = 2 if ratio == 4 else 1  # overlapping (CSA) compressors carry two series
        out += [
            TensorSpec("attn.compressor.wkv.weight", (c * hd, D), "bf16"),
            TensorSpec("attn.compressor.wgate.weight", (c * hd, D), "bf16"),
            TensorSpec("attn.compressor.ape", (ratio, c * hd), "fp32"),
            TensorSpec("attn.compressor.norm.weight", (hd,), "bf16"),
        ]
    if ratio == 4:
        ih, ihd = cfg.index_n_heads, cfg.index_head_dim
        out += [
            TensorSpec("attn.indexer.wq_b.weight", (ih * ihd, ql), "fp8"),
            TensorSpec("attn.indexer.weights_proj.weight", (ih, D), "bf16"),
            TensorSpec("attn.indexer.compressor.wkv.weight", (2 * ihd, D), "bf16"),
            TensorSpec("attn.indexer.compressor.wgate.weight", (2 * ihd, D), "bf16"),
            TensorSpec("attn.indexer.compressor.ape", (4, 2 * ihd), "fp32"),
            TensorSpec("attn.indexer.compressor.norm.weight", (ihd,), "bf16"),
        ]
    for site in ("attn", "ffn"):
        out += [
            TensorSpec(f"hc_{site}_fn", ((2 + hc) * hc, hc * D), "fp32"),
            TensorSpec(f"hc_{site}_base", ((2 + hc) * hc,), "fp32"),
            TensorSpec(f"hc_{site}_scale", (3,), "fp32"),
        ]
    out.append(TensorSpec("ffn.gate.weight", (E, D), "bf16"))
    if cfg.is_hash_layer(layer):
        out.append(TensorSpec("ffn.gate.tid2eid", (cfg.vocab_size, cfg.num_experts_per_tok), "int"))
    else:
        out.append(TensorSpec("ffn.gate.bias", (E,), "fp32"))
    ek = {"fp4": "fp4", "fp8": "fp8", "bf16": "bf16"}[cfg.expert_dtype]
    for e in range(E):
        out += [
            TensorSpec(f"ffn.experts.{e}.w1.weight", (I, D), ek),
            TensorSpec(f"ffn.experts.{e}.w3.weight", (I, D), ek),
            TensorSpec(f"ffn.experts.{e}.w2.weight", (D, I), ek),
        ]
    Is = I * cfg.n_shared_experts
    out += [
        TensorSpec("ffn.shared_experts.w1.weight", (Is, D), "fp8"),
        TensorSpec("ffn.shared_experts.w3.weight", (Is, D), "fp8"),
        TensorSpec("ffn.shared_experts.w2.weight", (D, Is), "fp8"),
    ]
    if layer >= cfg.num_hidden_layers:  # MTP extras
        out += [
            TensorSpec("e_proj.weight", (D, D), "fp8"),
            TensorSpec("h_proj.weight", (D, D), "fp8"),
            TensorSpec("enorm.weight", (D,), "bf16"),
            TensorSpec("hnorm.weight", (D,), "bf16"),
            TensorSpec("norm.weight", (D,), "bf16"),
            TensorSpec("hc_head_fn", (hc, hc * D), "fp32"),
            TensorSpec("hc_head_base", (hc,), "fp32"),
            TensorSpec("hc_head_scale", (1,), "fp32"),
        ]
    return out


def top_tensors(cfg: DSV4Config) -> list[TensorSpec]:
    D, V, hc = cfg.hidden_size, cfg.vocab_size, cfg.hc_mult
    return [
        TensorSpec("embed.weight", (V, D), "bf16"),
        TensorSpec("norm.weight", (D,), "bf16"),
        TensorSpec("head.weight", (V, D), "bf16"),
        TensorSpec("hc_head_fn", (hc, hc * D), "fp32"),
        TensorSpec("hc_head_base", (hc,), "fp32"),
        TensorSpec("hc_head_scale", (1,), "fp32"),
    ]


def expected_tensors(cfg: DSV4Config) -> dict[str, TensorSpec]:
    """Every logical tensor of the checkpoint, by full name (no ``.scale`` entries)."""
    block = tuple(cfg.quantization.weight_block_size)
    out = {t.name: TensorSpec(t.name, t.shape, t.kind, block) for t in top_tensors(cfg)}
    for layer in range(cfg.n_layers_total):
        p = layer_prefix(cfg, layer)
        for t in layer_tensors(cfg, layer):
            out[p + t.name] = TensorSpec(p + t.name, t.shape, t.kind, block)
    return out


def relative_key(name: str) -> str:
    """Checkpoint name relative to its layer -> the key of a layer weight dict (DESIGN.md): the trailing
    ``.weight`` is dropped (``attn.wq_a.weight`` -> ``attn.wq_a``; ``hc_attn_fn`` stays)."""
    return name[:-len(".weight")] if name.endswith(".weight") else name
