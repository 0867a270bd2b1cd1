"""DeepSeek-V4 configuration presets (spec section 1) and validation.

Field names follow the Hugging Face ``config.json`` of the official checkpoints. ``compress_ratios``
has ``num_hidden_layers + num_nextn_predict_layers`` entries; the last belongs to the MTP layer.
Inconsistent configurations are refused with a ``ConfigError`` that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

ATTN_TYPES = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


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
        return ATTN_TYPES[self.compress_ratios[layer]]

    def is_hash_layer(self, layer: int) -> bool:
        """Hash routing for main layers below num_hash_layers; the MTP layer (id >= n_layers) never."""
        return layer < self.num_hash_layers and layer < self.num_hidden_layers

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
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | Path) -> DSV4Config:
        return cls.from_dict(json.loads(Path(path).read_text()))


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
    bad = [r for r in c.compress_ratios if r not in ATTN_TYPES]
    _req(not bad, "compress_ratios", f"entries must be 0 (SWA), 4 (CSA) or 128 (HCA); got {bad}")
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
    _req(c.expert_dtype in ("fp4", "fp8", "bf16"), "expert_dtype", f"unknown {c.expert_dtype!r}")
    _req(c.routed_scaling_factor > 0 and math.isfinite(c.routed_scaling_factor), "routed_scaling_factor",
         "must be positive and finite")
    if c.rope_scaling is not None:
        _req(c.rope_scaling.type == "yarn", "rope_scaling.type", "only yarn is defined for DSV4")
        _req(c.rope_scaling.factor >= 1, "rope_scaling.factor", "must be >= 1")


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

PRESETS = {c.name: c for c in (FLASH, PRO, TINY)}


def get_preset(name: str) -> DSV4Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown DSV4 preset {name!r}; known: {sorted(PRESETS)}") from None
