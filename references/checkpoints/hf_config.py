"""``config.json`` in the Hugging Face style of the official releases <-> ``DSV4Config``.

Field names are those of spec section 1 (HF / official ``config.json``); FP8 checkpoints carry
``quantization_config`` (fp8 e4m3, 128x128 blocks, dynamic activations, ue8m0 scales) and ``expert_dtype``.
The bf16 (dequantised) variant has neither (its experts are plain bf16).

DeepSeek-V4.1 (``model_type`` ``deepseek_v41``, or any config with a ``text_config``) nests the text model
under ``text_config`` and a vision tower under ``vision_config`` (vLLM
``transformers_utils/configs/deepseek_v41.py:9-50``, which flattens ``text_config`` onto the top level, skips
its ``model_type``, and takes ``expert_dtype`` from ``quantization_config`` when it is not a text field).
Only ``vision_config.num_hidden_layers`` is read here (a tower adds ``ffn.gate.bias_vl``); the tower itself is
not modelled. ``compress_ratios`` may omit the MTP layers (they are sliding-window: vLLM
``models/deepseek_v41/attention.py:313-318``); the parser appends zeros for them.

Released configs this parser is tested on (tests/data/presets/, docs/presets.md): DeepSeek-V4.1-Flash, V4-Flash-0731
and V4-Pro-0813 as transcribed in public repositories. Real keys the references do not model are accepted by name,
never by a catch-all: the DSpark draft fields (``_DSPARK``: parsed into the config and validated, the draft head not
modelled), ``vision_config`` (``_VISION_KEYS``; only ``num_hidden_layers`` is read), ``image_token_id``
(``_KNOWN_UNMODELLED_TOP``). The 0731 / 0813 configs list three DSpark-stage zeros past ``num_hidden_layers +
num_nextn_predict_layers`` in ``compress_ratios``; they are dropped (``_drop_dspark_stage_ratios``).

Every key must be known: a field the references use, or one of the keys listed in ``_IGNORED`` (HF and
training bookkeeping that changes no value the references compute). Anything else is refused with a
``ConfigError`` naming the key, so a new model field is never silently dropped.
"""

from __future__ import annotations

import dataclasses

from ..config import ConfigError, DSV4Config, QuantConfig, RopeScaling

_PLAIN = ("hidden_size", "num_hidden_layers", "num_nextn_predict_layers", "vocab_size", "num_attention_heads",
          "num_key_value_heads", "head_dim", "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
          "sliding_window", "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts",
          "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size", "num_hash_layers",
          "scoring_func", "topk_method", "norm_topk_prob", "routed_scaling_factor", "swiglu_limit", "hc_mult",
          "hc_sinkhorn_iters", "hc_eps", "rms_norm_eps", "rope_theta", "compress_rope_theta",
          "max_position_embeddings", "hidden_act", "tie_word_embeddings", "bos_token_id", "eos_token_id")

# V4.1 text fields (provenance: references/config.py module docstring)
_V41_PLAIN = ("kv_source_layer_ids", "index_source_layer_ids", "candidate_source_layer_id",
              "candidate_topk_blocks", "candidate_block_size", "engram_layer_ids", "engram_num_embeddings",
              "engram_max_ngram_size", "engram_n_heads", "engram_head_dim", "engram_compressed_vocab_size",
              "engram_pad_token_id", "engram_vocab_size", "dspark_target_layer_ids", "dspark_markov_rank",
              "dspark_n_routed_experts", "dspark_num_experts_per_tok", "dspark_block_size", "dspark_noise_token_id")
# DSpark draft fields a V4 (deepseek_v4) config may carry too: V4-Flash-0731 / V4-Pro-0813 have dspark_block_size,
# dspark_noise_token_id, dspark_target_layer_ids, dspark_markov_rank (docs/presets.md); the draft head is tested as
# components (dspark.input, dspark.markov), the checkpoint layout holds no draft weights.
_DSPARK = ("dspark_target_layer_ids", "dspark_markov_rank", "dspark_n_routed_experts", "dspark_num_experts_per_tok",
           "dspark_block_size", "dspark_noise_token_id")
_V41_TUPLES = {"kv_source_layer_ids", "index_source_layer_ids", "engram_layer_ids", "engram_num_embeddings",
               "dspark_target_layer_ids"}

_OPTIONAL = {"num_key_value_heads", "topk_method", "norm_topk_prob", "hidden_act", "tie_word_embeddings",
             "bos_token_id", "eos_token_id", "max_position_embeddings", "scoring_func", "swiglu_limit",
             "hc_mult", "hc_sinkhorn_iters", "hc_eps", "rms_norm_eps", "rope_theta", "compress_rope_theta",
             "num_nextn_predict_layers", "n_shared_experts"}
_OPTIONAL_V41 = _OPTIONAL | {"num_hash_layers"}   # V4.1 has no hash routing (config.py docstring)

# Keys accepted and ignored: they change no value the references compute.
_IGNORED = {
    # HF / hub bookkeeping
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "auto_map", "_name_or_path",
    "use_cache",
    # transformers' PretrainedConfig generic fields (a config written by to_dict / save_pretrained carries them)
    "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id", "problem_type",
    "is_encoder_decoder", "chunk_size_feed_forward",
    # training-only (initialisation, dropout, router losses)
    "initializer_range", "attention_dropout", "output_router_logits",
    "router_aux_loss_coef", "router_jitter_noise", "pad_token_id",
    # HF DeepseekV4Config's derived views of compress_ratios / num_hash_layers / qk_rope_head_dim
    # (transformers models/deepseek_v4/configuration_deepseek_v4.py); compress_ratios stays authoritative
    "layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor",
}
# Known real keys of the released configs that the references do not model, accepted by name (docs/presets.md):
# image_token_id is the V4.1 vision tower's image placeholder token (DeepSeek-V4.1-Flash config.json top level).
_KNOWN_UNMODELLED_TOP = {"image_token_id"}
# vision_config keys of DeepSeek-V4.1-Flash (docs/presets.md); only num_hidden_layers is read (vision_n_layers),
# the tower is not modelled. Any other key is refused by name.
_VISION_KEYS = {"model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                "patch_size", "rope_theta", "downsample_ratio", "max_image_tokens", "min_pixels", "max_wh_ratio"}
# Accepted only at the value that means "not used" (vLLM reads n_group with default 1: grouped routing off).
# keys accepted only at the value that means "absent": DSV4 has no attention / MLP biases, so a true bias flag
# describes weights the references do not compute
_NEUTRAL = {"n_group": 1, "topk_group": 1, "attention_bias": False, "mlp_bias": False}
_QUANT_KEYS = {"quant_method", "fmt", "weight_block_size", "activation_scheme", "scale_fmt", "moe_quant_algo"}
_QUANT_METHODS = ("fp8", "deepseek_v4_fp8")   # vLLM models/deepseek_v41/quant_config.py:175-178


def to_hf_dict(cfg: DSV4Config, *, quantized: bool = True) -> dict:
    if cfg.is_v41:
        return _to_hf_dict_v41(cfg, quantized=quantized)
    d = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "torch_dtype": "bfloat16"}
    for k in _PLAIN:
        d[k] = getattr(cfg, k)
    d["compress_ratios"] = list(cfg.compress_ratios)
    for k in _DSPARK:   # only the DSpark fields a config sets (a config without a draft carries none)
        v = getattr(cfg, k)
        if v != _DSPARK_DEFAULTS[k]:
            d[k] = list(v) if isinstance(v, tuple) else v
    d["rope_scaling"] = _rope_dict(cfg)
    if quantized:
        d["expert_dtype"] = "fp4" if cfg.expert_dtype == "nvfp4" else cfg.expert_dtype
        d["quantization_config"] = _quant_dict(cfg)
    return d


def _rope_dict(cfg: DSV4Config) -> dict | None:
    rs = cfg.rope_scaling
    return None if rs is None else {
        "type": rs.type, "factor": rs.factor, "original_max_position_embeddings": rs.original_max_position_embeddings,
        "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow}


def _quant_dict(cfg: DSV4Config) -> dict:
    q = cfg.quantization
    d = {"quant_method": "fp8", "fmt": q.fmt, "weight_block_size": list(q.weight_block_size),
         "activation_scheme": q.activation_scheme, "scale_fmt": q.scale_fmt}
    if cfg.expert_dtype == "nvfp4":
        d["moe_quant_algo"] = "NVFP4"
    return d


def _expert_dtype(qc: dict, declared: str | None, default: str) -> str:
    """The experts' storage from ``expert_dtype`` and ``quantization_config.moe_quant_algo`` (vLLM reads NVFP4
    experts from the latter: models/deepseek_v41/quant_config.py:96-104; ModelOpt's name for the e2m1 element type
    is fp4, so expert_dtype "fp4" or absent with moe_quant_algo "NVFP4" means NVFP4 experts)."""
    algo = qc.get("moe_quant_algo")
    if algo is None:
        if declared == "nvfp4":
            raise ConfigError("config.json: expert_dtype 'nvfp4' needs quantization_config.moe_quant_algo 'NVFP4'")
        return declared or default
    if str(algo).upper() != "NVFP4":
        raise ConfigError(f"config.json: quantization_config.moe_quant_algo {algo!r} is not modelled (only 'NVFP4')")
    if declared not in (None, "fp4", "nvfp4"):
        raise ConfigError(f"config.json: quantization_config.moe_quant_algo 'NVFP4' but expert_dtype {declared!r}")
    return "nvfp4"


def _to_hf_dict_v41(cfg: DSV4Config, *, quantized: bool) -> dict:
    text = {"model_type": "deepseek_v41_text"}
    for k in _PLAIN + _V41_PLAIN:
        v = getattr(cfg, k)
        text[k] = list(v) if isinstance(v, tuple) else v
    text["compress_ratios"] = list(cfg.compress_ratios)
    text["rope_scaling"] = _rope_dict(cfg)
    d = {"architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41", "torch_dtype": "bfloat16",
         "text_config": text}
    if cfg.vision_n_layers:
        d["vision_config"] = {"num_hidden_layers": cfg.vision_n_layers}
    if quantized:
        q = _quant_dict(cfg)
        # where V4.1 keeps it (configs/deepseek_v41.py:46-50); NVFP4 experts say fp4 + moe_quant_algo NVFP4
        q["expert_dtype"] = "fp4" if cfg.expert_dtype == "nvfp4" else cfg.expert_dtype
        d["quantization_config"] = q
    return d


_DSPARK_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DSV4Config) if f.name in _DSPARK}


def _drop_dspark_stage_ratios(ratios: list, n_total: int, has_draft: bool, where: str) -> list:
    """``compress_ratios`` longer than num_hidden_layers + num_nextn_predict_layers: the V4-Flash-0731 / V4-Pro-0813
    config.json list 43 + 3 / 61 + 3 entries with num_nextn_predict_layers 1, the three trailing zeros being the
    DSpark draft stages' (sliding-window) ratios (docs/presets.md). Accepted only for a config with a DSpark draft
    and only when every surplus entry is 0; the surplus is dropped (the draft is not modelled)."""
    extra = ratios[n_total:]
    if not extra:
        return ratios
    if not has_draft or any(r != 0 for r in extra):
        raise ConfigError(f"config.json: {where}compress_ratios has {len(ratios)} entries for num_hidden_layers + "
                          f"num_nextn_predict_layers = {n_total}; surplus trailing entries {extra} are accepted only "
                          f"as a DSpark draft's stages (dspark_block_size set, every surplus entry 0)")
    return ratios[:n_total]


def _refuse_unknown(d: dict, known, where: str) -> None:
    for k in d:
        if k in known or k in _IGNORED:
            continue
        if k in _NEUTRAL:
            if d[k] != _NEUTRAL[k]:
                raise ConfigError(f"config.json: field {where}{k}={d[k]!r} is not modelled (only "
                                  f"{_NEUTRAL[k]!r}, which means unused, is accepted)")
            continue
        raise ConfigError(f"config.json: unknown field '{where}{k}' (not a DSV4 field the references model, nor "
                          f"in the allow-list of ignored keys)")


def _quantization(qc: dict, where: str) -> QuantConfig:
    if not isinstance(qc, dict):
        raise ConfigError(f"config.json: {where}quantization_config must be an object, got {type(qc).__name__}")
    _refuse_unknown(qc, _QUANT_KEYS | {"expert_dtype"}, f"{where}quantization_config.")
    qm = qc.get("quant_method", "fp8")
    if qm not in _QUANT_METHODS:
        raise ConfigError(f"config.json: quantization_config.quant_method {qm!r} is not one of {_QUANT_METHODS}")
    return QuantConfig(fmt=qc.get("fmt", "e4m3"), weight_block_size=tuple(qc.get("weight_block_size", (128, 128))),
                       activation_scheme=qc.get("activation_scheme", "dynamic"),
                       scale_fmt=qc.get("scale_fmt", "ue8m0"))


def _rope(d: dict):
    rs = d.get("rope_scaling")
    if rs is None:
        if d.get("rope_parameters") is not None:
            raise ConfigError("config.json: rope_parameters without rope_scaling is not parsed (give the flat "
                              "rope_scaling form of the release)")
        return None
    return RopeScaling(type=rs.get("type", rs.get("rope_type", "yarn")), factor=rs["factor"],
                       original_max_position_embeddings=rs["original_max_position_embeddings"],
                       beta_fast=rs["beta_fast"], beta_slow=rs["beta_slow"])


def from_hf_dict(d: dict, *, name: str = "checkpoint") -> tuple[DSV4Config, bool]:
    """-> (config, quantized). ``quantized`` is True when ``quantization_config`` is present."""
    if not isinstance(d, dict):
        raise ConfigError(f"config.json: must hold an object, got {type(d).__name__}")
    if d.get("model_type") == "deepseek_v41" or "text_config" in d:
        return _from_hf_dict_v41(d, name=name)
    known = set(_PLAIN) | set(_DSPARK) | {"compress_ratios", "rope_scaling", "rope_parameters",
                                          "quantization_config", "expert_dtype"}
    _refuse_unknown(d, known, "")
    missing = [k for k in _PLAIN + ("compress_ratios",) if k not in d and k not in _OPTIONAL]
    if missing:
        raise ConfigError(f"config.json: missing field(s) {missing}")
    kw = {k: d[k] for k in _PLAIN if k in d}
    for k in _DSPARK:
        if k in d:
            kw[k] = tuple(d[k]) if k in _V41_TUPLES else d[k]
    n_total = kw["num_hidden_layers"] + kw.get("num_nextn_predict_layers", 1)
    kw["compress_ratios"] = tuple(_drop_dspark_stage_ratios(list(d["compress_ratios"]), n_total,
                                                            bool(kw.get("dspark_block_size")), ""))
    kw["rope_scaling"] = _rope(d)
    qc = d.get("quantization_config")
    if qc is not None:
        kw["quantization"] = _quantization(qc, "")
        if "expert_dtype" in qc:
            raise ConfigError("config.json: quantization_config.expert_dtype is the V4.1 place for it; a V4 "
                              "config keeps expert_dtype at the top level")
        # no expert_dtype: the FP8-expert Base layout
        kw["expert_dtype"] = _expert_dtype(qc, d.get("expert_dtype"), "fp8")
    else:
        kw["expert_dtype"] = "bf16"
    return DSV4Config(name=name, **kw), qc is not None


def _from_hf_dict_v41(d: dict, *, name: str) -> tuple[DSV4Config, bool]:
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError("config.json: a deepseek_v41 config needs a text_config object")
    fields = set(_PLAIN) | set(_V41_PLAIN) | {"compress_ratios", "rope_scaling", "rope_parameters",
                                             "expert_dtype", "n_mtp_layers"}
    _refuse_unknown(d, fields | {"text_config", "vision_config", "quantization_config"} | _KNOWN_UNMODELLED_TOP, "")
    _refuse_unknown(text, fields | {"quantization_config"}, "text_config.")
    # model fields may also sit at the top level (vLLM passes them to PreTrainedConfig); the same field in both
    # places with different values is ambiguous
    t = dict(text)
    t.pop("model_type", None)
    for k in fields:
        if k in d:
            if k in t and t[k] != d[k]:
                raise ConfigError(f"config.json: field {k!r} is {d[k]!r} at the top level but {t[k]!r} in "
                                  f"text_config")
            t[k] = d[k]
    if "quantization_config" in d and "quantization_config" in t:
        raise ConfigError("config.json: quantization_config both at the top level and in text_config")
    qc = d.get("quantization_config", t.get("quantization_config"))
    if "n_mtp_layers" in t:   # the DSpark draft reads n_mtp_layers or num_nextn_predict_layers (nvidia/dspark.py)
        if "num_nextn_predict_layers" in t and t["num_nextn_predict_layers"] != t["n_mtp_layers"]:
            raise ConfigError(f"config.json: n_mtp_layers {t['n_mtp_layers']} != num_nextn_predict_layers "
                              f"{t['num_nextn_predict_layers']}")
        t["num_nextn_predict_layers"] = t["n_mtp_layers"]
    missing = [k for k in _PLAIN + ("compress_ratios",) if k not in t and k not in _OPTIONAL_V41]
    if missing:
        raise ConfigError(f"config.json: missing field(s) {['text_config.' + k for k in missing]}")
    kw = {k: t[k] for k in _PLAIN if k in t}
    kw.setdefault("num_hash_layers", 0)
    for k in _V41_PLAIN:
        if k in t:
            kw[k] = tuple(t[k]) if k in _V41_TUPLES else t[k]
    n_total = kw["num_hidden_layers"] + kw.get("num_nextn_predict_layers", 1)
    ratios = _drop_dspark_stage_ratios(list(t["compress_ratios"]), n_total, bool(kw.get("dspark_block_size")),
                                       "text_config.")
    if kw["num_hidden_layers"] <= len(ratios) < n_total:
        ratios += [0] * (n_total - len(ratios))   # MTP layers past the list: sliding window
    kw["compress_ratios"] = tuple(ratios)
    kw["rope_scaling"] = _rope(t)
    vis = d.get("vision_config") or {}
    if not isinstance(vis, dict):
        raise ConfigError(f"config.json: vision_config must be an object, got {type(vis).__name__}")
    _refuse_unknown(vis, _VISION_KEYS, "vision_config.")
    kw["vision_n_layers"] = int(vis.get("num_hidden_layers", 0))
    if qc is not None:
        kw["quantization"] = _quantization(qc, "")
        # top-level / text expert_dtype wins over quantization_config's (configs/deepseek_v41.py:46-50); vLLM's
        # default when neither has it is fp4 (models/deepseek_v41/quant_config.py:75)
        kw["expert_dtype"] = _expert_dtype(qc, t.get("expert_dtype", qc.get("expert_dtype")), "fp4")
    else:
        kw["expert_dtype"] = "bf16"
    return DSV4Config(name=name, version="v4.1", **kw), qc is not None
