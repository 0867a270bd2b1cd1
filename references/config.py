"""DeepSeek-V4 configuration presets (spec section 1) and validation.

Field names follow the Hugging Face ``config.json`` of the official checkpoints. ``compress_ratios``
has ``num_hidden_layers + num_nextn_predict_layers`` entries; the last belongs to the MTP layer.
Inconsistent configurations are refused with a ``ConfigError`` that names the field.

Versions (``DSV4Config.version``):

* ``"v4"``: the preview DeepSeek-V4 Flash / Pro (spec section 1). Every V4.1 field keeps its default.
* ``"v4.1"``: DeepSeek-V4.1. What is known of it comes from the vLLM package installed in the project venv
  (``site-packages/vllm``, paths below relative to it), cross-checked against public transcriptions of the
  DeepSeek-V4.1-Flash ``config.json`` (preset ``V41_FLASH``; provenance in docs/presets.md):

  - ``compress_ratios`` entries are 0 (sliding window only), 1 (full-length compressed cache) or 2 (ratio-2
    compressed), not 4 / 128 (``models/deepseek_v41/attention.py:303-321``, ``compressor.py:196-199``);
    MTP entries past the list are sliding-window (``attention.py:313-318``).
  - compressors live only on ``kv_source_layer_ids``, indexers only on ``index_source_layer_ids``; every other
    compressed layer reuses the most recent source at or below it, ``max(s for s in sources if s <= layer)``,
    and sources are backbone layers (``attention.py:321-347``, ``:431-472``, ``:573-600``). An indexer owns its
    K projection (``wk`` / ``k_norm``) only on a layer that is also a kv source (``attention.py:434-472``,
    ``:1343-1354``).
  - two-level candidate filtering: ``candidate_source_layer_id`` (an index source, -1 = off),
    ``candidate_topk_blocks``, ``candidate_block_size`` (``attention.py:328-330``, ``:460-461``,
    ``:1265-1268``; ``nvidia/model.py:711-723``).
  - Engram on ``engram_layer_ids`` with ``engram_*`` sizes (``common/engram.py:8``, ``:218-243``).
  - a bundled DSpark draft head: ``dspark_target_layer_ids``, ``dspark_markov_rank``, ``dspark_n_routed_experts``,
    ``dspark_num_experts_per_tok`` (``nvidia/dspark.py:83``, ``:148-154``; ``nvidia/model.py:136-142``),
    ``dspark_block_size`` (``config/speculative.py:1483-1490``: the default ``num_speculative_tokens``) and
    ``dspark_noise_token_id`` (``v1/worker/gpu/spec_decode/utils.py:92-115``); docs/dspark.md.
  - no hash routing: vLLM builds every V4.1 MoE with ``num_hash_layers=0`` (``nvidia/model.py:149``,
    ``amd/model.py:102-114``), so ``is_hash_layer`` is False for V4.1 whatever ``num_hash_layers`` says.
  - dense FP8 linears with 32x32 UE8M0 weight-scale blocks (``quantization_config.weight_block_size`` [32, 32],
    served as MXFP8: ``quant_config.py:221-243``, ``nvidia/model.py:1430-1440``).
  - HF ``config.json`` nests the text model under ``text_config`` (``transformers_utils/configs/deepseek_v41.py
    :9-50``), parsed by ``references.checkpoints.hf_config``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

ATTN_TYPES = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
# V4.1 ratios (vLLM ``models/deepseek_v41/attention.py:308-311``: "0 = pure sliding window, 1 = full-length
# compressed cache, 2 = ratio-2 compressed"); the type names are this project's.
ATTN_TYPES_V41 = {0: "sliding_attention", 1: "full_compressed_attention", 2: "ratio2_compressed_attention"}
VERSIONS = ("v4", "v4.1")


class ConfigError(ValueError):
    """A DSV4 configuration that cannot describe a real model; the message names the field."""


@dataclass(frozen=True)
class RopeScaling:
    type: str = "yarn"
    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class QuantConfig:
    fmt: str = "e4m3"
    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"
    scale_fmt: str = "ue8m0"


@dataclass(frozen=True)
class DSV4Config:
    name: str
    hidden_size: int
    num_hidden_layers: int
    num_nextn_predict_layers: int
    vocab_size: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    compress_ratios: tuple[int, ...]
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    moe_intermediate_size: int
    num_hash_layers: int
    routed_scaling_factor: float
    num_key_value_heads: int = 1
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 1048576
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    quantization: QuantConfig = field(default_factory=QuantConfig)
    expert_dtype: str = "fp4"
    bos_token_id: int = 0
    eos_token_id: int = 1
    # -- V4.1 (defaults = preview V4 behaviour; provenance in the module docstring) -------------------------
    version: str = "v4"
    kv_source_layer_ids: tuple[int, ...] = ()
    index_source_layer_ids: tuple[int, ...] = ()
    candidate_source_layer_id: int = -1
    candidate_topk_blocks: int = 0
    candidate_block_size: int = 0
    engram_layer_ids: tuple[int, ...] = ()
    engram_num_embeddings: tuple[int, ...] = ()
    engram_max_ngram_size: int = 0
    engram_n_heads: int = 0
    engram_head_dim: int = 0
    engram_compressed_vocab_size: int = 0
    engram_pad_token_id: int = 0
    engram_vocab_size: int = 0
    dspark_target_layer_ids: tuple[int, ...] = ()
    dspark_markov_rank: int = 0
    dspark_n_routed_experts: int = 0
    dspark_num_experts_per_tok: int = 0
    # DSpark draft block (tokens drafted per step) and the noise / mask token it fills a block with; carried by the
    # V4.1-Flash, V4-Flash-0731 and V4-Pro-0813 config.json (docs/presets.md); the draft head is modelled by
    # references/components/dspark.py (docs/dspark.md)
    dspark_block_size: int = 0          # draft block width N (v1/worker/gpu/spec_decode/dspark/speculator.py:46-55)
    dspark_noise_token_id: int = -1     # the block's fill token (v1/worker/gpu/spec_decode/utils.py:92-115)
    vision_n_layers: int = 0   # only whether a vision tower exists (it adds ffn.gate.bias_vl); not modelled

    def __post_init__(self):
        validate(self)

    # -- derived --------------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def n_layers_total(self) -> int:
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def compress_ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def layer_type(self, layer: int) -> str:
        return (ATTN_TYPES_V41 if self.is_v41 else ATTN_TYPES)[self.compress_ratios[layer]]

    @property
    def is_v41(self) -> bool:
        return self.version == "v4.1"

    def is_hash_layer(self, layer: int) -> bool:
        """Hash routing for main layers below num_hash_layers; the MTP layer (id >= n_layers) never; V4.1 never
        (vLLM ``models/deepseek_v41/nvidia/model.py:149`` builds its MoE with ``num_hash_layers=0``)."""
        return not self.is_v41 and layer < self.num_hash_layers and layer < self.num_hidden_layers

    # -- V4.1 sharing ---------------------------------------------------------------------------------
    def _source_of(self, layer: int, sources: tuple[int, ...]) -> int | None:
        if not self.is_v41 or self.compress_ratios[layer] == 0 or layer >= self.num_hidden_layers:
            return None
        below = [s for s in sources if s <= layer]
        return max(below) if below else None

    def kv_source_of(self, layer: int) -> int | None:
        """V4.1: the layer whose compressor / compressed KV cache ``layer`` uses (itself for a kv source);
        None for sliding-window layers and for V4 (every compressed V4 layer owns its compressor)."""
        return self._source_of(layer, self.kv_source_layer_ids)

    def index_source_of(self, layer: int) -> int | None:
        """V4.1: the layer whose indexer top-k ``layer`` uses (itself for an index source); None otherwise."""
        return self._source_of(layer, self.index_source_layer_ids)

    def rope_theta_for(self, layer: int) -> float:
        return self.rope_theta if self.compress_ratios[layer] == 0 else self.compress_rope_theta

    def uses_yarn(self, layer: int) -> bool:
        """Official code: YaRN only on compressed (CSA/HCA) layers; SWA-only layers get plain RoPE."""
        return self.compress_ratios[layer] != 0 and self.rope_scaling is not None

    def replace(self, **kw) -> DSV4Config:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        for k in _TUPLE_FIELDS:
            d[k] = list(getattr(self, k))
        d["quantization"]["weight_block_size"] = list(self.quantization.weight_block_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DSV4Config:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {unknown}")
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if isinstance(d.get("quantization"), dict):
            q = dict(d["quantization"])
            q["weight_block_size"] = tuple(q.get("weight_block_size", (128, 128)))
            d["quantization"] = QuantConfig(**q)
        d["compress_ratios"] = tuple(d["compress_ratios"])
        for k in _TUPLE_FIELDS:
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> DSV4Config:
        return cls.from_dict(json.loads(Path(path).read_text()))


_TUPLE_FIELDS = ("kv_source_layer_ids", "index_source_layer_ids", "engram_layer_ids", "engram_num_embeddings",
                 "dspark_target_layer_ids")
# DSpark fields are not V4.1-only: the V4-Flash-0731 / V4-Pro-0813 config.json (model_type deepseek_v4) carry them
# (docs/presets.md), so a V4 config may set them.
_V41_ONLY = {"kv_source_layer_ids": (), "index_source_layer_ids": (), "candidate_source_layer_id": -1,
             "candidate_topk_blocks": 0, "candidate_block_size": 0, "engram_layer_ids": ()}


def _req(cond: bool, fieldname: str, msg: str):
    if not cond:
        raise ConfigError(f"{fieldname}: {msg}")


def validate(c: DSV4Config) -> None:
    for f in ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "head_dim",
              "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "index_n_heads",
              "index_head_dim", "index_topk", "n_routed_experts", "num_experts_per_tok",
              "moe_intermediate_size", "hc_mult", "hc_sinkhorn_iters"):
        _req(getattr(c, f) > 0, f, f"must be positive, got {getattr(c, f)}")
    _req(c.num_key_value_heads == 1, "num_key_value_heads", "DSV4 shares one K=V head (MQA); must be 1")
    _req(0 < c.qk_rope_head_dim < c.head_dim and c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
         f"must be even and inside head_dim {c.head_dim}, got {c.qk_rope_head_dim}")
    _req(c.index_head_dim > c.qk_rope_head_dim and c.index_head_dim % 2 == 0, "index_head_dim",
         f"must exceed qk_rope_head_dim {c.qk_rope_head_dim}")
    _req(len(c.compress_ratios) == c.num_hidden_layers + c.num_nextn_predict_layers, "compress_ratios",
         f"needs num_hidden_layers + num_nextn_predict_layers = "
         f"{c.num_hidden_layers + c.num_nextn_predict_layers} entries, got {len(c.compress_ratios)}")
    _req(c.version in VERSIONS, "version", f"must be one of {VERSIONS}, got {c.version!r}")
    if c.is_v41:
        bad = [r for r in c.compress_ratios if r not in ATTN_TYPES_V41]
        _req(not bad, "compress_ratios", f"V4.1 entries must be 0 (SWA), 1 or 2 (compressed); got {bad}")
    else:
        bad = [r for r in c.compress_ratios if r not in ATTN_TYPES]
        _req(not bad, "compress_ratios", f"entries must be 0 (SWA), 4 (CSA) or 128 (HCA); got {bad}")
        for k, default in _V41_ONLY.items():
            _req(getattr(c, k) == default, k, f"is a V4.1 field (version='v4.1'); a V4 config must leave it at "
                 f"{default!r}, got {getattr(c, k)!r}")
    if c.num_nextn_predict_layers:
        _req(all(r == 0 for r in c.compress_ratios[c.num_hidden_layers:]), "compress_ratios",
             "MTP layers (the trailing entries) must be SWA-only (0)")
    _req(c.num_attention_heads % c.o_groups == 0, "o_groups",
         f"{c.o_groups} does not divide num_attention_heads {c.num_attention_heads}")
    _req(c.num_experts_per_tok <= c.n_routed_experts, "num_experts_per_tok",
         f"{c.num_experts_per_tok} > n_routed_experts {c.n_routed_experts}")
    _req(0 <= c.num_hash_layers <= c.num_hidden_layers, "num_hash_layers",
         f"must be in [0, num_hidden_layers={c.num_hidden_layers}]")
    _req(c.scoring_func == "sqrtsoftplus", "scoring_func", f"DSV4 uses sqrtsoftplus, got {c.scoring_func!r}")
    _req(c.hidden_size % 128 == 0, "hidden_size", "must be a multiple of 128 (FP8 block size)")
    _req(c.moe_intermediate_size % 32 == 0, "moe_intermediate_size", "must be a multiple of 32 (MXFP4 block)")
    _req(c.nope_head_dim % 64 == 0, "head_dim", "the nope part must be a multiple of 64 (KV quant block)")
    # "nvfp4": ModelOpt / Quark NVFP4 experts (quantization_config.moe_quant_algo "NVFP4", vLLM
    # models/deepseek_v41/quant_config.py:96-104), e2m1 with E4M3 scales per 16 (checkpoints/layout.py)
    _req(c.expert_dtype in ("fp4", "fp8", "bf16", "nvfp4"), "expert_dtype", f"unknown {c.expert_dtype!r}")
    _req(c.routed_scaling_factor > 0 and math.isfinite(c.routed_scaling_factor), "routed_scaling_factor",
         "must be positive and finite")
    if c.rope_scaling is not None:
        _req(c.rope_scaling.type == "yarn", "rope_scaling.type", "only yarn is defined for DSV4")
        _req(c.rope_scaling.factor >= 1, "rope_scaling.factor", "must be >= 1")
    wb = c.quantization.weight_block_size
    _req(len(wb) == 2 and all(isinstance(b, int) and b > 0 and b & (b - 1) == 0 for b in wb),
         "quantization.weight_block_size", f"must be two positive powers of two, got {list(wb)}")
    _validate_dspark(c)
    if c.is_v41:
        _validate_v41(c)


def _validate_dspark(c: DSV4Config) -> None:
    """The DSpark draft fields (V4 and V4.1 alike). The draft head is tested component by component (dspark.input,
    dspark.markov: docs/dspark.md); checkpoints and the whole-model goldens hold no draft."""
    _layer_ids(c, "dspark_target_layer_ids", c.dspark_target_layer_ids)
    if c.dspark_n_routed_experts or c.dspark_num_experts_per_tok:
        _req(0 < c.dspark_num_experts_per_tok <= c.dspark_n_routed_experts, "dspark_num_experts_per_tok",
             f"must be in [1, dspark_n_routed_experts={c.dspark_n_routed_experts}], got "
             f"{c.dspark_num_experts_per_tok}")
    _req(c.dspark_markov_rank >= 0, "dspark_markov_rank", f"must be >= 0, got {c.dspark_markov_rank}")
    _req(c.dspark_block_size >= 0, "dspark_block_size", f"must be >= 0, got {c.dspark_block_size}")
    # every public config that has a draft names both its target layers and its block size (docs/presets.md)
    _req(bool(c.dspark_target_layer_ids) == (c.dspark_block_size > 0), "dspark_block_size",
         f"a DSpark draft needs both dspark_target_layer_ids and dspark_block_size > 0 (or neither), got "
         f"{list(c.dspark_target_layer_ids)} / {c.dspark_block_size}")
    if c.dspark_block_size:
        _req(0 <= c.dspark_noise_token_id < c.vocab_size, "dspark_noise_token_id",
             f"must be a token id in [0, vocab_size={c.vocab_size}), got {c.dspark_noise_token_id}")


def _layer_ids(c: DSV4Config, fieldname: str, ids: tuple[int, ...]) -> None:
    n = c.num_hidden_layers
    _req(all(isinstance(i, int) and 0 <= i < n for i in ids), fieldname,
         f"layer ids must be backbone layers in [0, num_hidden_layers={n}), got {list(ids)}")
    _req(list(ids) == sorted(set(ids)), fieldname, f"must be strictly increasing, got {list(ids)}")


def _validate_v41(c: DSV4Config) -> None:
    """The V4.1 sharing invariants (vLLM ``models/deepseek_v41/attention.py:321-347``, ``:431-472``)."""
    n = c.num_hidden_layers
    r = c.compress_ratios
    for fieldname in ("kv_source_layer_ids", "index_source_layer_ids"):
        ids = getattr(c, fieldname)
        _layer_ids(c, fieldname, ids)
        swa = [i for i in ids if r[i] == 0]
        # a source builds a compressor (ratio 1 or 2 only, compressor.py:196-199) / an index K cache of
        # max_model_len // ratio entries (attention.py:1334-1336): a ratio-0 layer cannot be one
        _req(not swa, fieldname, f"layer(s) {swa} are sliding-window only (compress ratio 0) and cannot own "
             f"{'a compressor' if fieldname.startswith('kv') else 'an indexer'}")
    for layer in range(n):
        if r[layer] == 0:
            continue
        for fieldname, what in (("kv_source_layer_ids", "compressor"), ("index_source_layer_ids", "indexer")):
            ids = getattr(c, fieldname)
            _req(any(s <= layer for s in ids), fieldname,
                 f"layer {layer} (compress ratio {r[layer]}) has no {what} source at or below it in {list(ids)}")
        s = c.kv_source_of(layer)
        # a consumer reads its source's compressed cache; one written at another ratio cannot describe it
        # (this project's inference: vLLM keys the cache by the source's prefix, attention.py:586-593)
        _req(r[s] == r[layer], "compress_ratios",
             f"layer {layer} (ratio {r[layer]}) reuses the compressor of layer {s} (ratio {r[s]}); ratios differ")
    cs = c.candidate_source_layer_id
    if cs != -1:
        _req(cs in c.index_source_layer_ids, "candidate_source_layer_id",
             f"{cs} is not an index source (index_source_layer_ids {list(c.index_source_layer_ids)}); only an "
             f"indexer publishes candidate blocks")
        _req(c.candidate_topk_blocks > 0 and c.candidate_block_size > 0, "candidate_topk_blocks",
             f"candidate filtering (source layer {cs}) needs candidate_topk_blocks and candidate_block_size > 0, "
             f"got {c.candidate_topk_blocks} / {c.candidate_block_size}")
    _layer_ids(c, "engram_layer_ids", c.engram_layer_ids)


def _flash_ratios() -> tuple[int, ...]:
    # layers 0-1 SWA; even 2..42 CSA; odd 3..41 HCA; MTP SWA
    main = [0, 0] + [4 if i % 2 == 0 else 128 for i in range(2, 43)]
    return tuple(main + [0])


def _pro_ratios() -> tuple[int, ...]:
    # layers 0-1 HCA; even 2..60 CSA; odd 3..59 HCA; MTP SWA
    main = [128, 128] + [4 if i % 2 == 0 else 128 for i in range(2, 61)]
    return tuple(main + [0])


FLASH = DSV4Config(
    name="flash", hidden_size=4096, num_hidden_layers=43, num_nextn_predict_layers=1, vocab_size=129280,
    num_attention_heads=64, head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8,
    o_lora_rank=1024, sliding_window=128, compress_ratios=_flash_ratios(), index_n_heads=64,
    index_head_dim=128, index_topk=512, n_routed_experts=256, num_experts_per_tok=6, n_shared_experts=1,
    moe_intermediate_size=2048, num_hash_layers=3, routed_scaling_factor=1.5,
)

PRO = DSV4Config(
    name="pro", hidden_size=7168, num_hidden_layers=61, num_nextn_predict_layers=1, vocab_size=129280,
    num_attention_heads=128, head_dim=512, qk_rope_head_dim=64, q_lora_rank=1536, o_groups=16,
    o_lora_rank=1024, sliding_window=128, compress_ratios=_pro_ratios(), index_n_heads=64,
    index_head_dim=128, index_topk=1024, n_routed_experts=384, num_experts_per_tok=6, n_shared_experts=1,
    moe_intermediate_size=3072, num_hash_layers=3, routed_scaling_factor=2.5,
)

# Tiny: keeps what real kernels insist on (head_dim 512 / rope 64, index_topk 512, 64 experts top-6,
# one shared expert, hc 4) and shrinks the rest. Layer 0 = SWA + hash routing, 1 = CSA, 2 = HCA, MTP.
TINY = DSV4Config(
    name="tiny", hidden_size=256, num_hidden_layers=3, num_nextn_predict_layers=1, vocab_size=1024,
    num_attention_heads=8, head_dim=512, qk_rope_head_dim=64, q_lora_rank=128, o_groups=2,
    o_lora_rank=128, sliding_window=128, compress_ratios=(0, 4, 128, 0), index_n_heads=8,
    index_head_dim=128, index_topk=512, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=1,
    moe_intermediate_size=64, num_hash_layers=1, routed_scaling_factor=1.5,
)

# Tiny V4.1 (synthetic; not a released model): backbone layers 0 SWA, 1 ratio 1 (kv + index source), 2 ratio 2
# (kv + index source, candidate source), 3 ratio 2 reusing layer 2's compressor and indexer, 4 ratio 2 with its own
# indexer (an index source, no K projection) on layer 2's compressor; no MTP; 32x32 weight-scale blocks; no hash
# routing. Dimensions as TINY.
TINY_V41 = DSV4Config(
    name="tiny-v41", version="v4.1", hidden_size=256, num_hidden_layers=5, num_nextn_predict_layers=0,
    vocab_size=1024, num_attention_heads=8, head_dim=512, qk_rope_head_dim=64, q_lora_rank=128, o_groups=2,
    o_lora_rank=128, sliding_window=128, compress_ratios=(0, 1, 2, 2, 2), index_n_heads=8, index_head_dim=128,
    index_topk=512, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=1, moe_intermediate_size=64,
    num_hash_layers=0, routed_scaling_factor=1.5, kv_source_layer_ids=(1, 2), index_source_layer_ids=(1, 2, 4),
    candidate_source_layer_id=2, candidate_topk_blocks=4, candidate_block_size=16,
    quantization=QuantConfig(weight_block_size=(32, 32)),
)

# -- released checkpoints whose config.json is transcribed in public repositories (docs/presets.md) ------------------
# Every value below is the checkpoint's config.json as transcribed by at least two independent public sources; the
# per-field provenance, the sources' disagreements and how each was resolved are in docs/presets.md, and
# tests/data/presets/*.json hold the transcribed config.json that tests/references/test_presets_public.py parses
# into exactly these presets. "OpenTallas" = bojieli/OpenTallas compiler/frontend/deepseek_v4_releases.py
# @066b562bcd29b52c808b7bf8507d75e8f7386921 (a pinned record per release with the config.json sha256).

# DeepSeek-V4-Flash-0731 (deepseek-ai/DeepSeek-V4-Flash-0731, model_type deepseek_v4): the preview Flash architecture
# unchanged (every FLASH field equal) plus a bundled DSpark draft. Its config.json lists 46 compress_ratios (43 +
# three DSpark stages, all 0) while num_nextn_predict_layers says 1; the parser drops the surplus trailing zeros
# (hf_config._drop_dspark_stage_ratios), so the preset keeps 43 + 1 entries.
FLASH_0731 = FLASH.replace(
    name="flash-0731", dspark_block_size=5, dspark_noise_token_id=128799, dspark_target_layer_ids=(40, 41, 42),
    dspark_markov_rank=256,
)

# DeepSeek-V4-Pro-0813 (deepseek-ai/DeepSeek-V4-Pro-0813, model_type deepseek_v4): the preview Pro architecture (every
# PRO field equal, index_topk 1024) plus a DSpark draft; 64 compress_ratios for 61 + 1 layers, as Flash-0731.
PRO_0813 = PRO.replace(
    name="pro-0813", dspark_block_size=5, dspark_noise_token_id=128799, dspark_target_layer_ids=(58, 59, 60),
    dspark_markov_rank=512,
)

# DeepSeek-V4.1-Flash (deepseek-ai/DeepSeek-V4.1-Flash @dba1be0a40aa45a94ad051997016db3960a90277, model_type
# deepseek_v41, text model under text_config): 40 backbone layers = 2 SWA + 18 ratio-2 ("encoder", kv sources 2/8/14)
# + 20 ratio-1 ("decoder", kv source 20), 3 MTP (DSpark) layers; rms_norm_eps 1e-20 (not V4's 1e-6). One public
# transcription gives compress_ratios [0,0]+[2]*10+[1]*28, which the sharing invariants refuse (docs/presets.md).
V41_FLASH = DSV4Config(
    name="v41-flash", version="v4.1", hidden_size=5120, num_hidden_layers=40, num_nextn_predict_layers=3,
    vocab_size=129280, num_attention_heads=64, head_dim=512, qk_rope_head_dim=64, q_lora_rank=1280, o_groups=8,
    o_lora_rank=1024, sliding_window=128, compress_ratios=(0, 0) + (2,) * 18 + (1,) * 20 + (0, 0, 0),
    index_n_heads=32, index_head_dim=128, index_topk=512, n_routed_experts=384, num_experts_per_tok=6,
    n_shared_experts=1, moe_intermediate_size=2304, num_hash_layers=0, routed_scaling_factor=1.5,
    rms_norm_eps=1e-20, quantization=QuantConfig(weight_block_size=(32, 32)), expert_dtype="fp4",
    kv_source_layer_ids=(2, 8, 14, 20), index_source_layer_ids=(2, 8, 14, 20, 24, 28, 32, 36),
    candidate_source_layer_id=20, candidate_topk_blocks=2048, candidate_block_size=8,
    engram_layer_ids=(1, 14), engram_num_embeddings=(384006168, 384016682), engram_max_ngram_size=4,
    engram_n_heads=8, engram_head_dim=256, engram_compressed_vocab_size=99092, engram_pad_token_id=2,
    engram_vocab_size=16000000, dspark_target_layer_ids=(37, 38, 39), dspark_markov_rank=256,
    dspark_n_routed_experts=128, dspark_num_experts_per_tok=3, dspark_block_size=5, dspark_noise_token_id=128799,
    vision_n_layers=32,
)

# What the installed vLLM states about DeepSeek-V4.1-Flash (not enough for a preset on its own: num_hidden_layers,
# vocab_size, compress_ratios, the source layer ids, moe_intermediate_size and n_shared_experts are not in it).
# V41_FLASH above (from public config.json transcriptions) agrees with every entry; a test checks it. Paths
# relative to site-packages/vllm.
V41_FLASH_FACTS = {
    # models/deepseek_v41/amd/mono/attention/plan.py:8-21 (the V4.1-Flash attention mega kernel's widths)
    "hidden_size": 5120, "q_lora_rank": 1280, "head_dim": 512, "qk_rope_head_dim": 64, "num_attention_heads": 64,
    "o_groups": 8, "o_lora_rank": 1024, "sliding_window": 128, "index_topk": 512,
    # models/deepseek_v41/attention.py:1301-1304 (comments on the indexer's config reads)
    "index_n_heads": 32, "index_head_dim": 128,
    # models/deepseek_v41/amd/mono_decode.py:163-172 (the MoE routing the V4.1-Flash mono kernels serve)
    "n_routed_experts": 384, "num_experts_per_tok": 6, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0,
    "scoring_func": "sqrtsoftplus",
    # models/deepseek_v41/quant_config.py:221-243, nvidia/model.py:1430-1440
    "weight_block_size": (32, 32),
}

PRESETS = {c.name: c for c in (FLASH, PRO, TINY, TINY_V41, V41_FLASH, FLASH_0731, PRO_0813)}


def get_preset(name: str) -> DSV4Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown DSV4 preset {name!r}; known: {sorted(PRESETS)}") from None
