"""``config.json`` in the Hugging Face style of the official releases <-> ``DSV4Config``.

Field names are those of spec section 1 (HF / official ``config.json``); FP8 checkpoints carry
``quantization_config`` (fp8 e4m3, 128x128 blocks, dynamic activations, ue8m0 scales) and ``expert_dtype``.
The bf16 (dequantised) variant has neither (its experts are plain bf16).
"""

from __future__ import annotations

from ..config import ConfigError, DSV4Config, QuantConfig, RopeScaling

_PLAIN = ("hidden_size", "num_hidden_layers", "num_nextn_predict_layers", "vocab_size", "num_attention_heads",
          "num_key_value_heads", "head_dim", "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
          "sliding_window", "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts",
          "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size", "num_hash_layers",
          "scoring_func", "topk_method", "norm_topk_prob", "routed_scaling_factor", "swiglu_limit", "hc_mult",
          "hc_sinkhorn_iters", "hc_eps", "rms_norm_eps", "rope_theta", "compress_rope_theta",
          "max_position_embeddings", "hidden_act", "tie_word_embeddings", "bos_token_id", "eos_token_id")


def to_hf_dict(cfg: DSV4Config, *, quantized: bool = True) -> dict:
    d = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "torch_dtype": "bfloat16"}
    for k in _PLAIN:
        d[k] = getattr(cfg, k)
    d["compress_ratios"] = list(cfg.compress_ratios)
    rs = cfg.rope_scaling
    d["rope_scaling"] = None if rs is None else {
        "type": rs.type, "factor": rs.factor, "original_max_position_embeddings": rs.original_max_position_embeddings,
        "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow}
    if quantized:
        q = cfg.quantization
        d["expert_dtype"] = cfg.expert_dtype
        d["quantization_config"] = {"quant_method": "fp8", "fmt": q.fmt,
                                    "weight_block_size": list(q.weight_block_size),
                                    "activation_scheme": q.activation_scheme, "scale_fmt": q.scale_fmt}
    return d


def from_hf_dict(d: dict, *, name: str = "checkpoint") -> tuple[DSV4Config, bool]:
    """-> (config, quantized). ``quantized`` is True when ``quantization_config`` is present."""
    missing = [k for k in _PLAIN + ("compress_ratios",) if k not in d and k not in _OPTIONAL]
    if missing:
        raise ConfigError(f"config.json: missing field(s) {missing}")
    kw = {k: d[k] for k in _PLAIN if k in d}
    kw["compress_ratios"] = tuple(d["compress_ratios"])
    rs = d.get("rope_scaling")
    if rs is not None:
        kw["rope_scaling"] = RopeScaling(type=rs.get("type", rs.get("rope_type", "yarn")), factor=rs["factor"],
                                         original_max_position_embeddings=rs["original_max_position_embeddings"],
                                         beta_fast=rs["beta_fast"], beta_slow=rs["beta_slow"])
    else:
        kw["rope_scaling"] = None
    qc = d.get("quantization_config")
    if qc is not None:
        kw["quantization"] = QuantConfig(fmt=qc.get("fmt", "e4m3"),
                                         weight_block_size=tuple(qc.get("weight_block_size", (128, 128))),
                                         activation_scheme=qc.get("activation_scheme", "dynamic"),
                                         scale_fmt=qc.get("scale_fmt", "ue8m0"))
        kw["expert_dtype"] = d.get("expert_dtype", "fp8")  # no expert_dtype: the FP8-expert Base layout
    else:
        kw["expert_dtype"] = "bf16"
    return DSV4Config(name=name, **kw), qc is not None


_OPTIONAL = {"num_key_value_heads", "topk_method", "norm_topk_prob", "hidden_act", "tie_word_embeddings",
             "bos_token_id", "eos_token_id", "max_position_embeddings", "scoring_func", "swiglu_limit",
             "hc_mult", "hc_sinkhorn_iters", "hc_eps", "rms_norm_eps", "rope_theta", "compress_rope_theta",
             "num_nextn_predict_layers", "n_shared_experts"}
