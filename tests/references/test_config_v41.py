"""DeepSeek-V4.1 configuration: fields, sharing invariants, HF ``config.json`` (``text_config``) parsing, and
unknown keys refused by name (issue #18)."""

import json

import pytest

from references.checkpoints.hf_config import from_hf_dict, to_hf_dict
from references.config import FLASH, PRO, TINY, TINY_V41, ConfigError, DSV4Config, get_preset


def _hf(cfg=TINY_V41):
    return json.loads(json.dumps(to_hf_dict(cfg)))


def test_preview_presets_keep_preview_behaviour():
    for c in (FLASH, PRO, TINY):
        assert c.version == "v4" and not c.is_v41 and c.kv_source_layer_ids == ()
        assert c.kv_source_of(c.num_hidden_layers - 1) is None
    assert FLASH.is_hash_layer(2) and not FLASH.is_hash_layer(3)
    assert get_preset("tiny-v41") is TINY_V41


def test_v41_sharing_resolution():
    c = TINY_V41
    assert [c.kv_source_of(i) for i in range(5)] == [None, 1, 2, 2, 2]
    assert [c.index_source_of(i) for i in range(5)] == [None, 1, 2, 2, 4]
    assert [c.layer_type(i) for i in range(3)] == ["sliding_attention", "full_compressed_attention",
                                                   "ratio2_compressed_attention"]
    assert not any(c.is_hash_layer(i) for i in range(5))       # V4.1: no hash routing
    assert c.quantization.weight_block_size == (32, 32)


@pytest.mark.parametrize("kw, msg", [
    (dict(kv_source_layer_ids=(2,)), r"kv_source_layer_ids: layer 1 \(compress ratio 1\) has no compressor source"),
    (dict(index_source_layer_ids=(2, 4)), r"index_source_layer_ids: layer 1 .* has no indexer source"),
    (dict(index_source_layer_ids=(0, 1, 2)), r"index_source_layer_ids: layer\(s\) \[0\] are sliding-window only"),
    (dict(kv_source_layer_ids=(1, 5)), r"kv_source_layer_ids: layer ids must be backbone layers in \[0, "
                                       r"num_hidden_layers=5\)"),
    (dict(kv_source_layer_ids=(2, 1)), r"kv_source_layer_ids: must be strictly increasing"),
    (dict(kv_source_layer_ids=(1, 3)), r"layer 2 \(ratio 2\) reuses the compressor of layer 1 \(ratio 1\)"),
    (dict(compress_ratios=(0, 4, 2, 2, 2)), r"compress_ratios: V4.1 entries must be 0 \(SWA\), 1 or 2"),
    (dict(candidate_source_layer_id=3), r"candidate_source_layer_id: 3 is not an index source"),
    (dict(candidate_topk_blocks=0), r"candidate_topk_blocks: candidate filtering \(source layer 2\) needs"),
    (dict(engram_layer_ids=(9,)), r"engram_layer_ids: layer ids must be backbone layers"),
    (dict(dspark_n_routed_experts=8, dspark_num_experts_per_tok=9), r"dspark_num_experts_per_tok: must be in"),
    (dict(version="v5"), r"version: must be one of"),
])
def test_v41_invariants_refused_in_one_line(kw, msg):
    with pytest.raises(ConfigError, match=msg) as ei:
        TINY_V41.replace(**kw)
    assert "\n" not in str(ei.value)


def test_v41_fields_refused_on_a_v4_config():
    with pytest.raises(ConfigError, match=r"^kv_source_layer_ids: is a V4.1 field"):
        TINY.replace(kv_source_layer_ids=(1,))
    with pytest.raises(ConfigError, match=r"compress_ratios: entries must be 0 \(SWA\), 4 \(CSA\) or 128"):
        TINY.replace(compress_ratios=(0, 1, 2, 0))


def test_dict_and_hf_round_trips():
    for c in (FLASH, PRO, TINY, TINY_V41):
        assert DSV4Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c
        got, quantized = from_hf_dict(json.loads(json.dumps(to_hf_dict(c))), name=c.name)
        assert got == c and quantized
    d = _hf()
    assert d["model_type"] == "deepseek_v41" and "hidden_size" not in d
    assert d["text_config"]["kv_source_layer_ids"] == [1, 2]
    assert d["quantization_config"]["weight_block_size"] == [32, 32]
    assert d["quantization_config"]["expert_dtype"] == "fp4"


def test_v41_parsing_follows_the_vllm_config_class():
    d = _hf()
    d["text_config"]["compress_ratios"] = [0, 1, 2, 2, 2]        # MTP entries may be omitted
    d["text_config"]["num_nextn_predict_layers"] = 1
    c, _ = from_hf_dict(d)
    assert c.compress_ratios == (0, 1, 2, 2, 2, 0) and c.num_nextn_predict_layers == 1
    d = _hf()
    d["text_config"]["expert_dtype"] = "fp8"                       # a text field wins over quantization_config's
    assert from_hf_dict(d)[0].expert_dtype == "fp8"
    d = _hf()
    del d["quantization_config"]["expert_dtype"]                  # vLLM's default: fp4
    assert from_hf_dict(d)[0].expert_dtype == "fp4"
    d = _hf()
    d["vision_config"] = {"num_hidden_layers": 24, "hidden_size": 1024, "patch_size": 14}
    assert from_hf_dict(d)[0].vision_n_layers == 24
    d = _hf()
    d["eos_token_id"] = 1                                          # a model field at the top level, same value
    assert from_hf_dict(d)[0].eos_token_id == 1
    d["eos_token_id"] = 7
    with pytest.raises(ConfigError, match=r"field 'eos_token_id' is 7 at the top level but 1 in text_config"):
        from_hf_dict(d)


@pytest.mark.parametrize("where, key", [
    ("text", "q_head_norm"), ("top", "kv_lora_rank"), ("quant", "kv_cache_quant_algo"), ("v4", "first_k_dense_replace"),
    ("v4quant", "ignored_layers"),
])
def test_unknown_keys_refused_by_name(where, key):
    d = to_hf_dict(TINY) if where.startswith("v4") else _hf()
    target = {"text": d.get("text_config"), "top": d, "quant": d["quantization_config"], "v4": d,
              "v4quant": d["quantization_config"]}[where]
    target[key] = 1
    with pytest.raises(ConfigError) as ei:
        from_hf_dict(d)
    msg = str(ei.value)
    prefix = {"text": "text_config.", "quant": "quantization_config.", "v4quant": "quantization_config."}
    assert f"unknown field '{prefix.get(where, '')}{key}'" in msg and "\n" not in msg


def test_ignored_and_neutral_keys_accepted():
    for d in (to_hf_dict(TINY), _hf()):
        d = dict(d, transformers_version="5.19.0", use_cache=True, initializer_range=0.02, n_group=1)
        from_hf_dict(d)
        with pytest.raises(ConfigError, match=r"n_group=8 is not modelled"):
            from_hf_dict(dict(d, n_group=8))
        from_hf_dict(dict(d, attention_bias=False, mlp_bias=False))
        # a bias flag set describes weights the references do not compute: refused by name, never ignored
        with pytest.raises(ConfigError, match=r"attention_bias=True is not modelled"):
            from_hf_dict(dict(d, attention_bias=True))
        with pytest.raises(ConfigError, match=r"mlp_bias=True is not modelled"):
            from_hf_dict(dict(d, mlp_bias=True))


def test_transformers_generic_config_fields_are_accepted():
    """transformers' PretrainedConfig.to_dict() adds its generic fields (output_hidden_states, return_dict,
    id2label, ...) to a DSV4 config: bookkeeping, accepted and ignored, the parsed config unchanged."""
    base = from_hf_dict(to_hf_dict(TINY))
    d = dict(to_hf_dict(TINY), output_hidden_states=False, output_attentions=False, return_dict=True,
             id2label={0: "LABEL_0"}, label2id={"LABEL_0": 0}, problem_type=None, is_encoder_decoder=False,
             chunk_size_feed_forward=0)
    assert from_hf_dict(d) == base


def test_v41_config_refusals_name_the_field():
    d = _hf()
    del d["text_config"]["hidden_size"]
    with pytest.raises(ConfigError, match=r"missing field\(s\) \['text_config.hidden_size'\]"):
        from_hf_dict(d)
    d = _hf()
    d["text_config"]["index_source_layer_ids"] = [2, 4]
    with pytest.raises(ConfigError, match=r"index_source_layer_ids: layer 1 .* no indexer source"):
        from_hf_dict(d)
    d = _hf()
    d["quantization_config"]["quant_method"] = "modelopt"
    with pytest.raises(ConfigError, match=r"quant_method 'modelopt' is not one of"):
        from_hf_dict(d)
    with pytest.raises(ConfigError, match=r"needs a text_config object"):
        from_hf_dict({"model_type": "deepseek_v41"})
