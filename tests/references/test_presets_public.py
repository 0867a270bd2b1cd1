"""The presets of released checkpoints (v41-flash, flash-0731, pro-0813) against their public config.json.

tests/data/presets/<preset>.config.json is the checkpoint's config.json as transcribed in public repositories (its
``_provenance`` key, stripped here, names the sources; docs/presets.md has the per-field table and the sources'
disagreements). Each must parse into exactly its preset, field by field; unknown keys and sharing-invariant
violations must be refused naming the field.
"""

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from references.checkpoints.hf_config import from_hf_dict, to_hf_dict
from references.config import (
    FLASH,
    FLASH_0731,
    PRESETS,
    PRO,
    PRO_0813,
    V41_FLASH,
    V41_FLASH_FACTS,
    ConfigError,
    DSV4Config,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "presets"
PUBLIC = {"v41-flash": V41_FLASH, "flash-0731": FLASH_0731, "pro-0813": PRO_0813}


def _released(name: str) -> dict:
    d = json.loads((DATA / f"{name}.config.json").read_text())
    prov = d.pop("_provenance")
    assert prov["checkpoint"].startswith("deepseek-ai/") and prov["transcribed_from"] and prov["cross_checked"]
    return d


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_config_parses_into_exactly_the_preset(name):
    cfg, quantized = from_hf_dict(_released(name), name=name)
    preset = PUBLIC[name]
    assert quantized
    diff = {f.name: (getattr(cfg, f.name), getattr(preset, f.name)) for f in dataclasses.fields(DSV4Config)
            if getattr(cfg, f.name) != getattr(preset, f.name)}
    assert not diff, f"{name}: parsed config.json differs from the preset (parsed, preset): {diff}"
    assert PRESETS[name] is preset


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_preset_round_trips_through_hf_and_dict(name):
    c = PUBLIC[name]
    assert from_hf_dict(json.loads(json.dumps(to_hf_dict(c))), name=name)[0] == c
    assert DSV4Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_dated_v4_releases_are_the_preview_architecture_plus_a_dspark_draft():
    """Flash-0731 / Pro-0813 change no field of the preview Flash / Pro except the DSpark draft's (OpenTallas' Pro
    record lists the keys that move against Flash; none is a non-DSpark key that differs from the PRO preset)."""
    for dated, preview in ((FLASH_0731, FLASH), (PRO_0813, PRO)):
        moved = {f.name for f in dataclasses.fields(DSV4Config) if getattr(dated, f.name) != getattr(preview, f.name)}
        assert moved == {"name", "dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids",
                         "dspark_markov_rank"}
        assert dated.version == "v4" and dated.num_nextn_predict_layers == 1
        assert dated.dspark_target_layer_ids[-1] == dated.num_hidden_layers - 1   # the last three backbone layers
    assert PRO_0813.index_topk == 1024 and FLASH_0731.index_topk == 512


def test_v41_flash_agrees_with_what_the_installed_vllm_states():
    """A third, independent source: the V4.1-Flash widths the installed vLLM's kernels are built for."""
    for k, v in V41_FLASH_FACTS.items():
        got = V41_FLASH.quantization.weight_block_size if k == "weight_block_size" else getattr(V41_FLASH, k)
        assert got == v, f"{k}: preset {got!r}, installed vLLM {v!r}"


def test_v41_flash_sharing_layout():
    c = V41_FLASH
    assert [c.layer_type(i) for i in (0, 1, 2, 19, 20, 39, 40)] == [
        "sliding_attention", "sliding_attention", "ratio2_compressed_attention", "ratio2_compressed_attention",
        "full_compressed_attention", "full_compressed_attention", "sliding_attention"]
    assert [c.kv_source_of(i) for i in (1, 2, 7, 8, 19, 20, 39)] == [None, 2, 2, 8, 14, 20, 20]
    assert [c.index_source_of(i) for i in (23, 24, 39)] == [20, 24, 36]
    assert c.rms_norm_eps == 1e-20 and not any(c.is_hash_layer(i) for i in range(c.n_layers_total))


def test_dissenting_v41_compress_ratios_is_refused_naming_the_field():
    """One public transcription (freetoken test, find_string id 69290201134) gives [0,0]+[2]*10+[1]*28 (40 entries):
    its layers 12..19 would be ratio 1 but reuse kv source 8's ratio-2 compressor; refused, naming compress_ratios."""
    d = _released("v41-flash")
    d["text_config"]["compress_ratios"] = [0, 0] + [2] * 10 + [1] * 28
    with pytest.raises(ConfigError, match=r"compress_ratios: layer 12 \(ratio 1\) reuses the compressor of layer 8 "
                                          r"\(ratio 2\); ratios differ") as ei:
        from_hf_dict(d)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("name, path, key", [
    ("v41-flash", ("text_config",), "q_head_norm"),
    ("v41-flash", ("vision_config",), "num_key_value_heads"),
    ("v41-flash", (), "audio_token_id"),
    ("flash-0731", (), "dspark_num_stages"),
    ("pro-0813", ("quantization_config",), "ignored_layers"),
])
def test_unknown_field_in_a_released_config_is_refused_by_name(name, path, key):
    d = _released(name)
    target = d
    for p in path:
        target = target[p]
    target[key] = 1
    where = "".join(p + "." for p in path)
    with pytest.raises(ConfigError, match=rf"unknown field '{where}{key}'") as ei:
        from_hf_dict(d)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("name, edit, msg", [
    ("v41-flash", lambda t: t.update(kv_source_layer_ids=[8, 14, 20]),
     r"kv_source_layer_ids: layer 2 \(compress ratio 2\) has no compressor source at or below it"),
    ("v41-flash", lambda t: t.update(index_source_layer_ids=[2, 8, 14, 24, 28, 32, 36]),
     r"candidate_source_layer_id: 20 is not an index source"),
    ("v41-flash", lambda t: t.update(kv_source_layer_ids=[1, 8, 14, 20]),
     r"kv_source_layer_ids: layer\(s\) \[1\] are sliding-window only"),
    ("v41-flash", lambda t: t.update(dspark_target_layer_ids=[38, 39, 40]),
     r"dspark_target_layer_ids: layer ids must be backbone layers in \[0, num_hidden_layers=40\)"),
    ("flash-0731", lambda t: t.update(dspark_noise_token_id=129280),
     r"dspark_noise_token_id: must be a token id in \[0, vocab_size=129280\)"),
    ("flash-0731", lambda t: t.pop("dspark_block_size"),
     r"compress_ratios has 46 entries .* accepted only as a DSpark draft's stages"),
    ("pro-0813", lambda t: t["compress_ratios"].__setitem__(-1, 4),
     r"surplus trailing entries \[0, 4\] are accepted only"),
    ("pro-0813", lambda t: t.update(dspark_block_size=0, compress_ratios=t["compress_ratios"][:62]),
     r"dspark_block_size: a DSpark draft needs both dspark_target_layer_ids and dspark_block_size > 0"),
])
def test_inconsistent_released_config_is_refused_naming_the_field(name, edit, msg):
    d = copy.deepcopy(_released(name))
    edit(d["text_config"] if "text_config" in d else d)
    with pytest.raises(ConfigError, match=msg) as ei:
        from_hf_dict(d)
    assert "\n" not in str(ei.value)


def test_dspark_stage_ratios_are_dropped_only_as_trailing_zeros():
    d = _released("flash-0731")
    assert len(d["compress_ratios"]) == 46 and d["num_nextn_predict_layers"] == 1
    c, _ = from_hf_dict(d)
    assert len(c.compress_ratios) == 44 and c.compress_ratios[-1] == 0
    exact = dict(d, compress_ratios=d["compress_ratios"][:44])      # the 43 + 1 form parses to the same preset
    assert from_hf_dict(exact, name="flash-0731")[0] == FLASH_0731


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_checkpoint_layout_refuses_the_unmodelled_draft_rather_than_omitting_it(name):
    from references.checkpoints.layout import expected_tensors

    with pytest.raises(ValueError, match=r"layout: the .*DSpark.* not modelled"):
        expected_tensors(PUBLIC[name])
    assert expected_tensors(FLASH)   # the preview Flash (no draft) still has its layout


def test_e2e_config_label_tells_presets_of_one_backbone_apart():
    """flash / flash-0731 (and pro / pro-0813) share every architecture field but the DSpark draft: the e2e row's
    config label names the preset the checkpoint is, not the first of the same shape."""
    from conformance.checks.e2e import config_label
    from references.config import PRESETS

    for name, cfg in PRESETS.items():
        assert config_label(cfg).startswith(f"{name}-shaped ("), (name, config_label(cfg))
