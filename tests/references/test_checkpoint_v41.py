"""DeepSeek-V4.1 checkpoints (issue #18): compressors only on ``kv_source_layer_ids``, indexers only on
``index_source_layer_ids`` (K projection only on layers that are both). The reader refuses a layer that owns
what the config makes it reuse, and a source that lacks it, naming the layer and the source."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from references.checkpoints.layout import expected_tensors, sharing_problems
from references.checkpoints.reader import CheckpointError, CheckpointReader
from references.checkpoints.writer import write_checkpoint
from references.config import TINY, TINY_V41
from tests._checkpoint_files import rewrite_shard


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_v41")
    return d, write_checkpoint(d, TINY_V41, seed=0)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _weight_map(d):
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]


def _edit(d, anchor, fn):
    """Edit the shard holding ``anchor`` with ``fn(tensors)`` and make the index list exactly its tensors."""
    f = rewrite_shard(d, anchor, fn)
    with safe_open(str(f), "pt") as sf:
        keys = set(sf.keys())
    idx = d / "model.safetensors.index.json"
    j = json.loads(idx.read_text())
    j["weight_map"] = {k: v for k, v in j["weight_map"].items() if v != f.name or k in keys}
    j["weight_map"].update({k: f.name for k in keys})
    idx.write_text(json.dumps(j))


def _copy_part(d, src_layer, dst_layer, part):
    """Give ``dst_layer`` a copy of ``src_layer``'s ``attn.<part>.`` tensors (the V4 habit of one per layer)."""
    wm = _weight_map(d)
    names = [n for n in wm if n.startswith(f"layers.{src_layer}.attn.{part}.")]
    tensors = {}
    for n in names:
        with safe_open(str(d / wm[n]), "pt") as sf:
            tensors[n.replace(f"layers.{src_layer}.", f"layers.{dst_layer}.", 1)] = sf.get_tensor(n)
    anchor = f"layers.{dst_layer}.attn.wq_a.weight"
    _edit(d, anchor, lambda t: t.update(tensors))


def _drop_part(d, layer, prefix):
    wm = _weight_map(d)
    for n in [n for n in wm if n.startswith(f"layers.{layer}.attn.{prefix}")]:
        _edit(d, n, lambda t, n=n: t.pop(n))


def test_v41_layout_puts_compressors_and_indexers_on_sources_only():
    names = set(expected_tensors(TINY_V41))
    comp = {n.split(".")[1] for n in names if ".attn.compressor." in n}
    idx = {n.split(".")[1] for n in names if ".attn.indexer." in n}
    wk = {n.split(".")[1] for n in names if ".attn.indexer.wk." in n}
    assert comp == {"1", "2"} and idx == {"1", "2", "4"} and wk == {"1", "2"}
    assert "layers.1.attn.compressor.wgate.weight" not in names       # ratio 1: no gate
    assert "layers.2.attn.compressor.wgate.weight" in names
    assert not any(n.endswith(".ape") or ".indexer.compressor." in n for n in names)
    assert not any("tid2eid" in n for n in names)                     # no hash routing
    assert sharing_problems(TINY_V41, names) == [] and sharing_problems(TINY, set(expected_tensors(TINY))) == []


def test_v41_checkpoint_round_trips_exactly(ckpt):
    d, deq = ckpt
    r = CheckpointReader(d)
    assert r.config.is_v41 and r.config.kv_source_layer_ids == (1, 2) and r.check() > 0
    for name, ref in deq.items():
        assert torch.equal(r.get(name), ref), name
    assert json.loads((d / "config.json").read_text())["text_config"]["index_source_layer_ids"] == [1, 2, 4]


def test_layer_with_its_own_indexer_where_v41_shares_it(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    _copy_part(d, 2, 3, "indexer")
    with pytest.raises(CheckpointError, match=r"layer 3 has its own indexer weights \(layers\.3\.attn\.indexer\.\S+\) "
                                              r"but index_source_layer_ids makes it reuse layer 2's$") as ei:
        CheckpointReader(d)
    assert "model.safetensors.index.json" in str(ei.value) and "\n" not in str(ei.value)


def test_layer_with_its_own_compressor_where_v41_shares_it(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    _copy_part(d, 2, 4, "compressor")
    with pytest.raises(CheckpointError, match=r"layer 4 has its own compressor weights \(layers\.4\.attn\.compressor\."
                                              r"\S+\) but kv_source_layer_ids makes it reuse layer 2's$"):
        CheckpointReader(d)


def test_source_layers_without_their_weights(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "i")
    _drop_part(d, 4, "indexer.")
    with pytest.raises(CheckpointError, match=r"layer 4 is an index source \(index_source_layer_ids\) but has no "
                                              r"indexer weights \(layers\.4\.attn\.indexer\.weights_proj\.weight "
                                              r"missing\)$"):
        CheckpointReader(d)
    d = _copy(ckpt[0], tmp_path / "k")
    _drop_part(d, 1, "compressor.")
    with pytest.raises(CheckpointError, match=r"layer 1 is a kv source \(kv_source_layer_ids\) but has no compressor "
                                              r"weights \(layers\.1\.attn\.compressor\.norm\.weight missing\)$"):
        CheckpointReader(d)
    d = _copy(ckpt[0], tmp_path / "w")
    _drop_part(d, 2, "indexer.wk.")
    with pytest.raises(CheckpointError, match=r"layer 2 is an index source .* but lacks "
                                              r"layers\.2\.attn\.indexer\.wk\.weight$"):
        CheckpointReader(d)


def test_k_projection_only_on_kv_sources(ckpt, tmp_path):
    d = _copy(ckpt[0], tmp_path / "c")
    wm = _weight_map(d)
    with safe_open(str(d / wm["layers.2.attn.indexer.wk.weight"]), "pt") as sf:
        wk = sf.get_tensor("layers.2.attn.indexer.wk.weight")
    _edit(d, "layers.4.attn.wq_a.weight", lambda t: t.__setitem__("layers.4.attn.indexer.wk.weight", wk))
    with pytest.raises(CheckpointError, match=r"layer 4's indexer has its own K projection "
                                              r"\(layers\.4\.attn\.indexer\.wk\.weight\) but is not in "
                                              r"kv_source_layer_ids; it reads the index keys of layer 2$"):
        CheckpointReader(d)


def test_v4_style_checkpoint_read_with_a_v41_config(ckpt, tmp_path):
    """Every compressed layer owning its indexer (the V4 layout): the first sharing layer is named, the rest
    are counted."""
    d = _copy(ckpt[0], tmp_path / "c")
    _copy_part(d, 2, 3, "indexer")
    _copy_part(d, 2, 3, "compressor")
    _copy_part(d, 2, 4, "compressor")
    with pytest.raises(CheckpointError, match=r"layer 3 has its own compressor weights .* reuse layer 2's "
                                              r"\(and 2 more problem\(s\)\)$"):
        CheckpointReader(d)


def test_sharing_problems_stays_quiet_on_a_consistent_config_change(ckpt):
    """The same names under a config that makes layer 4 reuse layer 2's indexer: now layer 4's indexer is the
    problem (the detector follows the config, not a fixed layout)."""
    names = set(_weight_map(ckpt[0]))
    assert sharing_problems(TINY_V41, names) == []
    cfg = TINY_V41.replace(index_source_layer_ids=(1, 2))
    got = sharing_problems(cfg, names)
    assert got and got[0].startswith("layer 4 has its own indexer weights (layers.4.attn.indexer.")
    assert got[0].endswith("but index_source_layer_ids makes it reuse layer 2's")
