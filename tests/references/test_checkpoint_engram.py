"""V4.1 Engram tables in the checkpoint layout / reader / tiny writer (issue #18).

The checkpoint holds, per Engram layer, ``engram.embed.weight`` (FP8 e4m3 codes, OCP) + ``engram.embed.scale``
(UE8M0 per 32 values of a row) in every checkpoint (quantised or bf16), ``engram.wkv.weight`` as any linear and
bf16 ``engram.q_weight`` / ``k_weight`` (vLLM 0.32's names: references/checkpoints/layout.py). The round trip is exact,
the golden's names read the same bytes, and a malformed, mis-shaped or truncated table is refused in one line naming
the tensor."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from references.checkpoints.codec import decode, encode
from references.checkpoints.layout import TensorSpec, expected_tensors
from references.checkpoints.reader import CheckpointError, CheckpointReader
from references.checkpoints.writer import write_checkpoint
from references.components.engram import engram_lookup
from references.config import TINY_V41
from references.formats.minifloat import get_format
from tests._checkpoint_files import rewrite_shard

# TINY_V41 + Engram on layer 1 (conformance.checks.e2e_v41.E2E_ENGRAM): 2- and 3-grams, one head of 64, bucket
# ranges the primes 101 and 103 -> 204 rows of 64 values, two UE8M0 scales per row
CFG = TINY_V41.replace(index_topk=32, engram_layer_ids=(1,), engram_num_embeddings=(204,), engram_max_ngram_size=3,
                       engram_n_heads=1, engram_head_dim=64, engram_compressed_vocab_size=1024, engram_pad_token_id=2,
                       engram_vocab_size=101)
TABLE = "layers.1.engram.embed.weight"
SCALE = "layers.1.engram.embed.scale"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for dt in ("fp8", "bf16"):
        d = tmp_path_factory.mktemp(f"engram_{dt}")
        out[dt] = (d, write_checkpoint(d, CFG, seed=0, dtype=dt))
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _one_line_naming(e, *names):
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in names:
        assert n in msg, msg
    return msg


def _stored(d, name):
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(d / wm[name]), "pt") as f:
        return f.get_slice(name).get_dtype(), f.get_slice(name).get_shape(), f.get_tensor(name)


def test_layout_has_vllms_engram_names_on_engram_layers_only():
    specs = expected_tensors(CFG)
    eng = {n: (s.shape, s.kind) for n, s in specs.items() if ".engram." in n}
    D, hc = CFG.hidden_size, CFG.hc_mult
    assert eng == {TABLE: ((204, 64), "fp8_rows"), "layers.1.engram.wkv.weight": (((hc + 1) * D, 2 * 64), "fp8"),
                   "layers.1.engram.q_weight": ((hc, D), "bf16"), "layers.1.engram.k_weight": ((hc, D), "bf16")}
    assert specs[TABLE].scale_name == SCALE and specs[TABLE].scale_shape == (204, 2)
    # the table's rows are the layer's prime bucket ranges (101 + 103), every row reachable
    assert CFG.engram_num_embeddings == (101 + 103,)
    with pytest.raises(ValueError, match=r"layout: the V4\.1 MTP / DSpark tensors are not modelled "
                                         r"\(num_nextn_predict_layers=1\)"):
        expected_tensors(CFG.replace(num_nextn_predict_layers=1, compress_ratios=CFG.compress_ratios + (0,)))
    with pytest.raises(ValueError, match="engram_head_dim 48 is not a multiple of the table's scale block 32"):
        expected_tensors(CFG.replace(engram_head_dim=48))


def test_hand_checked_row_encodes_to_known_bytes():
    """One row of 64: block 0 has amax 3.5 -> scale 2^ceil(log2(3.5/448)) = 2^-7 (byte 120); 1.0 / 2^-7 = 128 = 2^7
    is e4m3 exponent field 7 + 7 = 14, mantissa 0: 0x70; -3.5 / 2^-7 = -448 is the largest code 0xFE. Block 1 is all
    0.25 -> amax 0.25, scale 2^ceil(log2(0.25/448)) = 2^-10 (byte 117), 0.25 / 2^-10 = 256 = 2^8: 0x78."""
    spec = TensorSpec("t.weight", (1, 64), "fp8_rows")
    v = torch.zeros(1, 64, dtype=torch.float64)
    v[0, 0], v[0, 1] = 1.0, -3.5
    v[0, 32:] = 0.25
    enc = encode(spec, v)
    codes, sb = enc["t.weight"].view(torch.uint8), enc["t.scale"].view(torch.uint8)
    assert enc["t.weight"].dtype == torch.float8_e4m3fn and enc["t.scale"].dtype == torch.float8_e8m0fnu
    assert sb.tolist() == [[120, 117]]
    assert int(codes[0, 0]) == 0x70 and int(codes[0, 1]) == 0xFE and int(codes[0, 2]) == 0x00
    assert set(codes[0, 32:].tolist()) == {0x78}
    assert torch.equal(decode(spec, enc["t.weight"], enc["t.scale"]), v.float())   # exactly representable


def test_round_trip_is_exact_in_both_dtypes_and_the_table_stays_fp8(ckpts):
    for dt, (d, deq) in ckpts.items():
        r = CheckpointReader(d)
        assert r.config.engram_layer_ids == (1,) and r.quantized == (dt == "fp8") and r.check() > 0
        for name, ref in deq.items():
            assert torch.equal(r.get(name), ref), (dt, name)
        assert _stored(d, TABLE)[:2] == ("F8_E4M3", [204, 64]) and _stored(d, SCALE)[:2] == ("F8_E8M0", [204, 2])
        wkv = _stored(d, "layers.1.engram.wkv.weight")[0]
        assert wkv == ("F8_E4M3" if dt == "fp8" else "BF16"), (dt, wkv)
        assert _stored(d, "layers.1.engram.q_weight")[0] == "BF16"
    # the bf16 checkpoint holds the same dequantised values as the fp8 one
    for name, ref in ckpts["fp8"][1].items():
        assert torch.equal(ckpts["bf16"][1][name], ref), name


def test_golden_names_read_the_stored_bytes(ckpts):
    """``layers.1.engram.table`` / ``table_scale`` are the stored bytes (uint8), ``wkv`` the decoded linear; the
    golden's lookup over every row of them is the reader's decoded table (float64 check: exact)."""
    d, deq = ckpts["fp8"]
    r = CheckpointReader(d)
    codes, sb = r.get("layers.1.engram.table"), r.get("layers.1.engram.table_scale")
    assert codes.dtype == sb.dtype == torch.uint8
    assert torch.equal(codes, _stored(d, TABLE)[2].view(torch.uint8))
    assert torch.equal(sb, _stored(d, SCALE)[2].view(torch.uint8))
    assert torch.equal(r.get("layers.1.engram.wkv"), deq["layers.1.engram.wkv.weight"])
    assert torch.equal(r.get("layers.1.engram.q_weight"), deq["layers.1.engram.q_weight"])
    rows = engram_lookup(torch.arange(204)[:, None], codes, sb)[:, 0]
    assert torch.equal(rows, deq[TABLE])
    dec = get_format("float8_e4m3fn").decode(codes.numpy()).astype(np.float64)
    ref = dec * np.exp2(np.repeat(sb.numpy().astype(np.float64) - 127, 32, axis=1))
    assert np.array_equal(ref.astype(np.float32), deq[TABLE].numpy())
    assert "layers.1.engram.table" in r and "layers.2.engram.table" not in r and "layers.1.engram.nope" not in r
    with pytest.raises(CheckpointError, match="'layers.2.engram.table' is not a tensor"):
        r.get("layers.2.engram.table")


def test_the_fnuz_reading_of_the_table_is_exactly_half(ckpts):
    """What the FnuzEngramTableModel mutant does to the table: the same byte read as float8_e4m3fnuz is half the
    OCP value (exponent bias 8, not 7) for every finite code but -0 (0x80: NaN in fnuz)."""
    codes = CheckpointReader(ckpts["fp8"][0]).get("layers.1.engram.table").numpy()
    ocp, fnuz = get_format("float8_e4m3fn").decode(codes), get_format("float8_e4m3fnuz").decode(codes)
    keep = codes != 0x80
    assert keep.sum() > 0.99 * codes.size
    assert np.array_equal(fnuz[keep], ocp[keep] / 2)
    every = np.arange(256, dtype=np.uint8)
    fin = (every & 0x7F != 0x7F) & (every != 0x80)
    assert np.array_equal(get_format("float8_e4m3fnuz").decode(every)[fin],
                          get_format("float8_e4m3fn").decode(every)[fin] / 2)


def test_table_with_a_wrong_dtype_is_refused_naming_it(ckpts, tmp_path):
    for dt, (src, _) in ckpts.items():
        d = _copy(src, tmp_path / dt)
        f = rewrite_shard(d, TABLE, lambda t: t.__setitem__(TABLE, t[TABLE].float().to(torch.bfloat16)))
        with pytest.raises(CheckpointError) as ei:
            CheckpointReader(d).get(TABLE)
        msg = _one_line_naming(ei, f.name, TABLE, "has dtype BF16")
        assert "float8_e4m3fn" in msg and "torch.uint8" in msg
        with pytest.raises(CheckpointError) as ei:
            CheckpointReader(d).check()
        _one_line_naming(ei, TABLE, "has dtype BF16")
        with pytest.raises(CheckpointError) as ei:       # what the golden reads goes through the same check
            CheckpointReader(d).get("layers.1.engram.table")
        _one_line_naming(ei, TABLE)


def test_mis_shaped_table_and_scale_are_refused_naming_them(ckpts, tmp_path):
    d = _copy(ckpts["fp8"][0], tmp_path / "rows")
    f = rewrite_shard(d, TABLE, lambda t: t.__setitem__(TABLE, t[TABLE][:203].contiguous()))
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(d).get(TABLE)
    _one_line_naming(ei, f.name, TABLE, "has shape (203, 64); the config implies (204, 64)")
    d = _copy(ckpts["fp8"][0], tmp_path / "scale")
    f = rewrite_shard(d, SCALE, lambda t: t.__setitem__(SCALE, t[SCALE][:, :1].contiguous()))
    for call in (lambda r: r.get(TABLE), lambda r: r.check()):
        with pytest.raises(CheckpointError) as ei:
            call(CheckpointReader(d))
        _one_line_naming(ei, SCALE, f"UE8M0 scales of the Engram table '{TABLE}'", "one scale per 64 values; the "
                         "table has one per 32 (expects (204, 2))")


def test_truncated_table_shard_and_missing_scale_are_refused_naming_the_tensor(ckpts, tmp_path):
    d = _copy(ckpts["bf16"][0], tmp_path / "t")
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    f = d / wm[TABLE]
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(d).get("layers.1.engram.table")
    _one_line_naming(ei, f.name, TABLE)
    # about one tensor per shard: check() names the table of its truncated shard
    d = tmp_path / "one"
    write_checkpoint(d, CFG, seed=0, dtype="bf16", max_shard_bytes=1)
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert {n for n, v in wm.items() if v == wm[TABLE]} <= {TABLE, SCALE}
    f = d / wm[TABLE]
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(d).check()
    _one_line_naming(ei, f.name, TABLE, "cannot read the shard header")
    d = _copy(ckpts["fp8"][0], tmp_path / "m")
    rewrite_shard(d, SCALE, lambda t: t.pop(SCALE))
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(d).get("layers.1.engram.table_scale")
    _one_line_naming(ei, SCALE, "absent from the shard")


@pytest.mark.parametrize("target,index,byte,msg", [
    (TABLE, (7, 3), 0x7F, f"{TABLE}: NaN byte 0x7F at [7, 3]"),
    (TABLE, (0, 63), 0xFF, f"{TABLE}: NaN byte 0xFF at [0, 63]"),
    (SCALE, (5, 1), 0xFF, f"{SCALE}: NaN byte 0xFF at [5, 1]"),
])
def test_nan_codes_and_scale_bytes_are_refused_naming_where(ckpts, tmp_path, target, index, byte, msg):
    d = _copy(ckpts["fp8"][0], tmp_path / "n")

    def edit(t):
        b = t[target].view(torch.uint8).clone()
        b[index] = byte
        t[target] = b.view(t[target].dtype)
    rewrite_shard(d, target, edit)
    for name in (TABLE, "layers.1.engram.table", "layers.1.engram.table_scale"):
        with pytest.raises(CheckpointError) as ei:
            CheckpointReader(d).get(name)
        _one_line_naming(ei, msg)


def test_uint8_storage_is_accepted_and_reads_the_same(ckpts, tmp_path):
    """Raw uint8 bytes for the table and its scales (vLLM's parameter dtypes) read as the float8 containers do."""
    d = _copy(ckpts["fp8"][0], tmp_path / "u")
    rewrite_shard(d, TABLE, lambda t: t.update({TABLE: t[TABLE].view(torch.uint8), SCALE: t[SCALE].view(torch.uint8)}))
    r = CheckpointReader(d)
    assert _stored(d, TABLE)[0] == "U8" and _stored(d, SCALE)[0] == "U8" and r.check() > 0
    assert torch.equal(r.get(TABLE), ckpts["fp8"][1][TABLE])
    d2 = tmp_path / "w"
    write_checkpoint(d2, CFG, seed=0, scale_dtype="uint8")
    assert _stored(d2, SCALE)[0] == "U8" and torch.equal(CheckpointReader(d2).get(TABLE), ckpts["fp8"][1][TABLE])


def test_engram_tensors_on_a_layer_without_engram_are_refused(ckpts, tmp_path):
    """A config that lost ``engram_layer_ids`` (or names other layers) would serve the checkpoint without its
    memory: the reader refuses it at open, naming the layer and a tensor."""
    d = _copy(ckpts["bf16"][0], tmp_path / "c")
    cf = d / "config.json"
    j = json.loads(cf.read_text())
    tc = j.get("text_config", j)
    for k in [k for k in tc if k.startswith("engram_")]:
        del tc[k]
    cf.write_text(json.dumps(j))
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(d)
    _one_line_naming(ei, "model.safetensors.index.json", "layer 1 has Engram tensors (layers.1.engram.embed.scale) but "
                     "is not in engram_layer_ids []")


def test_golden_model_reads_either_layout_to_the_same_logits(ckpts):
    """DSV41Model over the FP8 checkpoint (FP8 wkv + block scales) and over the bf16 one (bf16 wkv) reads the same
    dequantised weights and the same table bytes: bitwise equal logits; Engram changes them (a zero table would not:
    tests/references/test_model_v41.py)."""
    from references.model_v41 import DSV41Model

    ids = torch.randint(0, CFG.vocab_size, (24,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = DSV41Model(CheckpointReader(ckpts["fp8"][0]), CFG).forward(ids)
        b = DSV41Model(CheckpointReader(ckpts["bf16"][0]), CFG).forward(ids)
        no_eng = CFG.replace(engram_layer_ids=(), engram_num_embeddings=())
        c = DSV41Model(ckpts["bf16"][1], no_eng).forward(ids)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
