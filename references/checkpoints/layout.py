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
  * ``nvfp4`` - NVFP4 routed experts (ModelOpt / Quark, ``quantization_config.moe_quant_algo = "NVFP4"``):
               ``<name>`` packed uint8 [R, C/2] (low nibble = even element), ``<stem>.weight_scale``
               float8_e4m3fn (OCP; uint8 bytes accepted) [R, C/16], ``<stem>.weight_scale_2`` fp32 scalar (the
               decode multiplier), ``<stem>.input_scale`` fp32 scalar (activation amax / (6 x 448)); the names
               vLLM's loader maps (``quantization/modelopt.py:911-1006``: w13_/w2_ weight, weight_scale,
               weight_scale_2, input_scale)
  * ``bf16`` - a bf16 tensor (fp32 accepted: OFF keeps some norms in fp32)
  * ``fp32`` - an fp32 tensor (mHC params, attention sinks, compressor ape, router bias)
  * ``int``  - integer table (``ffn.gate.tid2eid``: int64 in the release, int32 accepted)
  * ``fp8_rows`` - the V4.1 Engram hash table ``layers.{l}.engram.embed.weight``: FP8 e4m3 (OCP) codes
               [rows, head_dim] (float8_e4m3fn, or raw uint8 bytes) + ``engram.embed.scale`` UE8M0 bytes
               [rows, head_dim / 32] (float8_e8m0fnu or uint8), one power-of-two scale per 32 values of a row.
               Stored in this form in *every* checkpoint, quantised or not: vLLM's parameter is always
               float8_e4m3fn + uint8 whatever the quant config (``models/deepseek_v41/common/engram.py:1035-1080``)
               and its loader copies the bytes (``:604-616``: float8_e8m0fnu scales viewed as uint8)

V4.1 Engram layers (``engram_layer_ids``) carry, besides the block's tensors (``_v41_engram_tensors``):
``engram.embed.weight`` / ``engram.embed.scale`` (the table, kind ``fp8_rows``), ``engram.wkv.weight`` [(hc + 1) D,
(N - 1) H head_dim] (a linear: ``fp8`` with the config's block in a quantised checkpoint), ``engram.q_weight`` /
``engram.k_weight`` [hc, D] bf16. The golden (``references.model_v41``) names the table ``engram.table`` (codes) /
``engram.table_scale`` (bytes) and the projection ``engram.wkv``: ``ENGRAM_GOLDEN_NAMES`` maps them, and the reader
serves both spellings.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DSV4Config

FP8_BLOCK = 128
MXFP4_BLOCK = 32
NVFP4_GROUP = 16
ENGRAM_TABLE_BLOCK = 32   # one UE8M0 scale per 32 values of a table row (common/engram.py:958, block_size=32)
KINDS = ("fp8", "fp4", "nvfp4", "bf16", "fp32", "int", "fp8_rows")
NVFP4_PARTS = ("weight_scale", "weight_scale_2", "input_scale")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]   # logical (dequantised) shape
    kind: str
    block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)   # FP8 weight-scale block (kind "fp8" only)

    @property
    def stem(self) -> str:
        return self.name[:-len(".weight")] if self.name.endswith(".weight") else self.name

    @property
    def scale_name(self) -> str | None:
        if self.kind == "nvfp4":
            return self.stem + ".weight_scale"
        if self.kind not in ("fp8", "fp4", "fp8_rows"):
            return None
        return self.stem + ".scale"

    def nvfp4_names(self) -> dict[str, str]:
        """NVFP4 only: {"weight_scale" | "weight_scale_2" | "input_scale": stored name}."""
        return {k: f"{self.stem}.{k}" for k in NVFP4_PARTS}

    @property
    def stored_shape(self) -> tuple[int, ...]:
        if self.kind in ("fp4", "nvfp4"):
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
        if self.kind == "nvfp4":
            return (*self.shape[:-1], self.shape[-1] // NVFP4_GROUP)
        if self.kind == "fp8_rows":
            return (*self.shape[:-1], self.shape[-1] // ENGRAM_TABLE_BLOCK)
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
    if cfg.is_v41:
        _v41_supported(cfg)
    elif cfg.dspark_target_layer_ids:
        # V4-Flash-0731 / V4-Pro-0813 (docs/presets.md) ship a DSpark draft whose tensors this layout does not list
        raise ValueError(f"layout: the DSpark draft tensors are not modelled (dspark_target_layer_ids="
                         f"{cfg.dspark_target_layer_ids!r})")
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
    if cfg.is_v41:
        out += _v41_attention_extras(cfg, layer)
    elif ratio:
        c = 2 if ratio == 4 else 1  # overlapping (CSA) compressors carry two series
        out += [
            TensorSpec("attn.compressor.wkv.weight", (c * hd, D), "bf16"),
            TensorSpec("attn.compressor.wgate.weight", (c * hd, D), "bf16"),
            TensorSpec("attn.compressor.ape", (ratio, c * hd), "fp32"),
            TensorSpec("attn.compressor.norm.weight", (hd,), "bf16"),
        ]
    if ratio == 4 and not cfg.is_v41:
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
    if cfg.is_v41 and cfg.vision_n_layers:
        # the second routing bias for image tokens (vLLM models/deepseek_v41/amd/model.py:116-128)
        out.append(TensorSpec("ffn.gate.bias_vl", (E,), "fp32"))
    ek = {"fp4": "fp4", "fp8": "fp8", "bf16": "bf16", "nvfp4": "nvfp4"}[cfg.expert_dtype]
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
    if cfg.is_v41 and layer in cfg.engram_layer_ids:
        out += _v41_engram_tensors(cfg, layer)
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


def _v41_supported(cfg: DSV4Config) -> None:
    """The V4.1 tensors this layout does not describe (MTP / DSpark) are refused rather than guessed."""
    unmodelled = [f"{k}={v!r}" for k, v in (("num_nextn_predict_layers", cfg.num_nextn_predict_layers),
                                            ("dspark_target_layer_ids", cfg.dspark_target_layer_ids)) if v]
    if unmodelled:
        raise ValueError(f"layout: the V4.1 MTP / DSpark tensors are not modelled ({', '.join(unmodelled)})")
    if cfg.engram_layer_ids and cfg.engram_head_dim % ENGRAM_TABLE_BLOCK:
        raise ValueError(f"layout: engram_head_dim {cfg.engram_head_dim} is not a multiple of the table's scale "
                         f"block {ENGRAM_TABLE_BLOCK}")


# golden key (references.model_v41, relative to the layer) -> (checkpoint name relative to the layer, what of it)
ENGRAM_GOLDEN_NAMES = {
    "engram.table": ("engram.embed.weight", "codes"),          # uint8 FP8 codes, as stored
    "engram.table_scale": ("engram.embed.weight", "scale"),    # uint8 UE8M0 bytes of engram.embed.scale
    "engram.wkv": ("engram.wkv.weight", "value"),
    "engram.q_weight": ("engram.q_weight", "value"),
    "engram.k_weight": ("engram.k_weight", "value"),
}


def _v41_engram_tensors(cfg: DSV4Config, layer: int) -> list[TensorSpec]:
    r"""One Engram layer's tensors under the checkpoint's names (vLLM 0.32 is the authority on them):

    * ``engram.embed.weight`` [engram_num_embeddings[j], engram_head_dim] FP8 + ``engram.embed.scale`` UE8M0
      [rows, head_dim / 32]: vLLM's module attribute is ``embed_tokens`` so that the weights mapper's suffix rule
      ``embed.weight -> embed_tokens.weight`` renames the checkpoint's ``engram.embed.weight`` onto it
      (``common/engram.py:1548-1551``); the scale is routed by ``(engram\.embed)\.scale$ ->
      \1_tokens.weight_scale_inv`` (``nvidia/model.py:1456-1459``, ``:1471-1472``; ``amd/model.py:932-935``; the
      Quark spelling ``engram.embed.weight_scale``, ``amd/model.py:936-941``, is not accepted here). Parameter
      dtypes float8_e4m3fn / uint8 (``common/engram.py:1045-1052``), filled by a byte copy (``:604-616``);
    * ``engram.wkv.weight`` [(hc_mult + 1) D, (N - 1) H head_dim]: ``ColumnParallelLinear(n_hash_cols * head_dim,
      D (hc_mult + 1), quant_config=...)`` (``common/engram.py:1552-1564``), a block-FP8 linear like the others
      (its ``.scale`` goes through the generic ``\.scale$`` rule);
    * ``engram.q_weight``, ``engram.k_weight`` [hc_mult, D] bf16 (``common/engram.py:1565-1572``).
    """
    j = cfg.engram_layer_ids.index(layer)
    D, hc, hd = cfg.hidden_size, cfg.hc_mult, cfg.engram_head_dim
    cols = (cfg.engram_max_ngram_size - 1) * cfg.engram_n_heads
    return [TensorSpec("engram.embed.weight", (cfg.engram_num_embeddings[j], hd), "fp8_rows"),
            TensorSpec("engram.wkv.weight", ((hc + 1) * D, cols * hd), "fp8"),
            TensorSpec("engram.q_weight", (hc, D), "bf16"),
            TensorSpec("engram.k_weight", (hc, D), "bf16")]


def _v41_attention_extras(cfg: DSV4Config, layer: int) -> list[TensorSpec]:
    """V4.1 compressor and indexer tensors, only on their source layers (vLLM ``models/deepseek_v41``):

    * kv source: ``attn.compressor.wkv`` [hd, D] (+ ``wgate`` [hd, D] at ratio 2; ratio 1 has no gate), bf16 (no
      quant config), ``attn.compressor.norm`` [hd] (``compressor.py:208-232``); no ``ape`` (the V4.1 compressor
      registers no such parameter);
    * index source: ``attn.indexer.wq_b`` [ih * ihd, q_lora] FP8, ``attn.indexer.weights_proj`` [ih, D] bf16; on a
      layer that is also a kv source, the K projection ``attn.indexer.wk`` [ihd, hd] bf16 and ``attn.indexer.k_norm``
      [ihd] (``attention.py:1310-1354``). There is no indexer compressor in V4.1.
    """
    D, hd, ql = cfg.hidden_size, cfg.head_dim, cfg.q_lora_rank
    ih, ihd = cfg.index_n_heads, cfg.index_head_dim
    out = []
    kv_src = cfg.kv_source_of(layer) == layer
    if kv_src:
        out.append(TensorSpec("attn.compressor.wkv.weight", (hd, D), "bf16"))
        if cfg.compress_ratio(layer) > 1:
            out.append(TensorSpec("attn.compressor.wgate.weight", (hd, D), "bf16"))
        out.append(TensorSpec("attn.compressor.norm.weight", (hd,), "bf16"))
    if cfg.index_source_of(layer) == layer:
        out += [TensorSpec("attn.indexer.wq_b.weight", (ih * ihd, ql), "fp8"),
                TensorSpec("attn.indexer.weights_proj.weight", (ih, D), "bf16")]
        if kv_src:
            out += [TensorSpec("attn.indexer.wk.weight", (ihd, hd), "bf16"),
                    TensorSpec("attn.indexer.k_norm.weight", (ihd,), "bf16")]
    return out


def sharing_problems(cfg: DSV4Config, names) -> list[str]:
    """V4.1: what in a checkpoint's tensor names contradicts ``kv_source_layer_ids`` / ``index_source_layer_ids``
    (one line each, empty when consistent; always empty for V4). Compressor weights belong to kv sources only and
    indexer weights to index sources only; the indexer's K projection (``wk`` / ``k_norm``) to layers that are
    both. A layer holding its own copy where the config makes it reuse a source's is the V4-style layout read with
    a V4.1 config (or a config that lost a source); a source without them is a checkpoint that lost them. Engram
    tensors (``layers.{l}.engram.*``) belong to ``engram_layer_ids`` only."""
    if not cfg.is_v41:
        return []
    by_layer: dict[tuple[int, str], list[str]] = {}
    for n in sorted(names):
        parts = n.split(".")
        if len(parts) > 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] == "attn" \
                and parts[3] in ("compressor", "indexer"):
            by_layer.setdefault((int(parts[1]), parts[3]), []).append(n)
    out = []
    for layer in range(cfg.num_hidden_layers):
        ratio = cfg.compress_ratio(layer)
        want = {t.name for t in _v41_attention_extras(cfg, layer)}
        for part, field, source in (("compressor", "kv_source_layer_ids", cfg.kv_source_of(layer)),
                                    ("indexer", "index_source_layer_ids", cfg.index_source_of(layer))):
            have = by_layer.get((layer, part), [])
            if ratio == 0:
                if have:
                    out.append(f"layer {layer} is sliding-window only (compress ratio 0) but has {part} weights "
                               f"({have[0]})")
                continue
            if source != layer:
                if have:
                    out.append(f"layer {layer} has its own {part} weights ({have[0]}) but {field} makes it reuse "
                               f"layer {source}'s")
                continue
            missing = sorted(w for w in want if w.startswith(f"attn.{part}.") and f"layers.{layer}.{w}" not in have)
            allowed = {f"layers.{layer}.{w}" for w in want} | {
                f"layers.{layer}.{w[:-len('.weight')]}.scale" for w in want if w == "attn.indexer.wq_b.weight"}
            extra = [h for h in have if h not in allowed and not h.startswith(f"layers.{layer}.attn.indexer.wk.")
                     and not h.startswith(f"layers.{layer}.attn.indexer.k_norm.")]
            if extra:
                out.append(f"layer {layer} has {part} tensor {extra[0]}, which the V4.1 layout does not have "
                           f"(V4-style {part} weights?)")
            if part == "indexer" and cfg.kv_source_of(layer) != layer:
                own_k = [h for h in have if h.startswith(f"layers.{layer}.attn.indexer.wk.")
                         or h.startswith(f"layers.{layer}.attn.indexer.k_norm.")]
                if own_k:
                    out.append(f"layer {layer}'s indexer has its own K projection ({own_k[0]}) but is not in "
                               f"kv_source_layer_ids; it reads the index keys of layer {cfg.kv_source_of(layer)}")
            if missing:
                what = "a kv source (kv_source_layer_ids)" if part == "compressor" else \
                    "an index source (index_source_layer_ids)"
                out.append(f"layer {layer} is {what} but has no {part} weights (layers.{layer}.{missing[0]} missing)"
                           if len(missing) == len([w for w in want if w.startswith(f"attn.{part}.")]) else
                           f"layer {layer} is {what} but lacks layers.{layer}.{missing[0]}")
    # Engram tensors on a layer the config gives none: a config that lost engram_layer_ids (or the wrong layer ids)
    # would otherwise serve the checkpoint without its memory, silently
    stray = {}
    for n in sorted(names):
        parts = n.split(".")
        if len(parts) > 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] == "engram" \
                and int(parts[1]) not in cfg.engram_layer_ids:
            stray.setdefault(int(parts[1]), n)
    for layer, n in sorted(stray.items()):
        out.append(f"layer {layer} has Engram tensors ({n}) but is not in engram_layer_ids "
                   f"{list(cfg.engram_layer_ids)}")
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
