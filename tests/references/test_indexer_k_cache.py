"""indexer.k_cache (conformance.cases.indexer_cache): the golden's and the emulated writer/reader's known
properties (spec 3.8, 4.5), exactly."""

import pytest
import torch

from conformance.cases import cases_for
from conformance.cases.indexer_cache import _emulate, gather_slots, indexer_k_cache_golden
from references.formats import cache_layouts as cl

CASE = "indexer.k_cache/prefill/b2n103p3/normal/s1"


def _kw(case_id=CASE):
    (c,) = [c for c in cases_for("indexer.k_cache") if c.id == case_id]
    return c.make_inputs()


def test_gather_follows_the_block_table():
    bt = torch.tensor([[5, 2, -1], [7, -1, -1]], dtype=torch.int32)
    got = gather_slots(bt, torch.tensor([66, 3]), 64)
    assert got[:64].tolist() == list(range(320, 384)) and got[64:66].tolist() == [128, 129]
    assert got[66:].tolist() == [448, 449, 450]


def test_golden_returns_the_written_key_of_each_gathered_slot_and_the_pool_as_given():
    kw = _kw()
    out = indexer_k_cache_golden(**kw)
    read = gather_slots(kw["block_table"], kw["seq_lens"], 64)
    row = {int(s): i for i, s in enumerate(kw["slot_mapping"].tolist()) if s >= 0}
    assert torch.equal(out["k"], kw["k"][[row[int(s)] for s in read]])
    assert torch.equal(out["cache"], kw["cache"])


@pytest.mark.parametrize("profile,dialect,fmax", [("ocp", "float8_e4m3fn", 448.0),
                                                  ("gfx942", "float8_e4m3fnuz", 224.0)])
def test_emulation_writes_only_the_written_slots_and_reads_back_the_codes(profile, dialect, fmax):
    kw = _kw()
    out = _emulate(profile)(**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in kw.items()})
    lay = cl.IndexerKLayout(block_size=64)
    touched = torch.zeros(kw["cache"].shape, dtype=torch.bool)
    keep = kw["slot_mapping"] >= 0
    for s in kw["slot_mapping"][keep].tolist():
        b, o = divmod(s, 64)
        touched[b, o * 128:(o + 1) * 128] = True
        touched[b, lay.scale_offset(o):lay.scale_offset(o) + 4] = True
    assert torch.equal(out["cache"][~touched], kw["cache"][~touched])          # padding rows: written nowhere
    tok = cl.encode_indexer_k_tokens(kw["k"][keep], dialect, fmax)
    back = cl.read_indexer_k_tokens(out["cache"], kw["slot_mapping"][keep].tolist(), layout=lay)
    assert torch.equal(back.values, tok.values) and torch.equal(back.scales, tok.scales)
    scales = back.scales.view(torch.float32).reshape(-1)
    m, _ = torch.frexp(scales)
    assert (m == 0.5).all()                                                    # one power-of-two scale per token


def test_fnuz_writes_no_0x80_for_values_rounding_to_zero_from_below():
    kw = _kw("indexer.k_cache/prefill/b1n40p2/negzero/s3")
    out = _emulate("gfx942")(**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in kw.items()})
    ocp = _emulate("ocp")(**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in kw.items()})
    keep = (kw["slot_mapping"] >= 0).tolist()
    slots = [s for s, w in zip(kw["slot_mapping"].tolist(), keep) if w]
    lay = cl.IndexerKLayout(block_size=64)
    fnuz = cl.read_indexer_k_tokens(out["cache"], slots, layout=lay).values
    fn = cl.read_indexer_k_tokens(ocp["cache"], slots, layout=lay).values
    assert (fn[:, 1:17] == 0x80).all()               # OCP: -0
    assert (fnuz[:, 1:17] == 0x00).all()             # fnuz: +0 (0x80 would be NaN)
    assert torch.isfinite(out["k"]).all()


def test_fmax_band_rows_get_other_scales_at_224_and_240():
    kw = _kw("indexer.k_cache/prefill/b2n57p1/fmax-band/s4")
    keep = kw["slot_mapping"] >= 0
    a = cl.encode_indexer_k_tokens(kw["k"][keep], "float8_e4m3fnuz", 224.0).scales
    b = cl.encode_indexer_k_tokens(kw["k"][keep], "float8_e4m3fnuz", 240.0).scales
    assert (a.view(torch.float32) == 2 * b.view(torch.float32)).all()


@pytest.mark.parametrize("change,msg", [
    (lambda kw: kw.update(slot_mapping=kw["slot_mapping"][:-1]), "slot mapping must have shape"),
    (lambda kw: kw.update(cache=kw["cache"][:, :-1]), "cache must have shape"),
    (lambda kw: kw.update(k=kw["k"][:, :64]), "k must have shape"),
    (lambda kw: kw["slot_mapping"].copy_(torch.where(kw["slot_mapping"] >= 0, kw["slot_mapping"], 0)),
     "written more than once|not written"),
    (lambda kw: kw.update(seq_lens=kw["seq_lens"] + 64), "seq_lens|not written"),
])
def test_bad_input_is_refused_in_one_line(change, msg):
    kw = _kw()
    change(kw)
    with pytest.raises((ValueError, TypeError, IndexError), match=msg) as e:
        indexer_k_cache_golden(**kw)
    assert "\n" not in str(e.value)


def test_gathering_an_unwritten_slot_is_refused():
    kw = _kw()
    kw["slot_mapping"][kw["slot_mapping"] >= 0] = torch.where(kw["slot_mapping"][kw["slot_mapping"] >= 0] == 0, 0, -1)
    with pytest.raises(ValueError, match="not written in this call"):
        indexer_k_cache_golden(**kw)


@pytest.mark.parametrize("layout", ["normal", "shuffle"])
def test_layout_maps_the_value_region_one_to_one(layout):
    from conformance.cases.indexer_cache import KCacheLayout

    lay = KCacheLayout(64, layout)
    cols = torch.cat([lay.value_cols(s) for s in range(64)])
    assert torch.equal(cols.sort().values, torch.arange(64 * 128))          # every value byte, once
    scs = torch.cat([lay.scale_cols(s) for s in range(64)])
    assert torch.equal(scs, torch.arange(64 * 128, 64 * 132))               # then every scale byte, in entry order
    if layout == "shuffle":     # entry 17, dim 35: group 1, tile 2, row 1, byte 3
        assert int(lay.value_cols(17)[35]) == 1 * 16 * 128 + 2 * 256 + 1 * 16 + 3
        assert lay.value_cols(0)[:16].tolist() == list(range(16)) and int(lay.value_cols(1)[0]) == 16


# -- MXFP4 rows ---------------------------------------------------------------------------------------------------
def _emu(profile, kw):
    return _emulate(profile)(**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in kw.items()})


def test_mxfp4_hand_checked_entry_bytes_block_flat():
    """One key, hand-encoded: block 0 = (5, -1.25, 3.5, 0.25, 0 ...) with amax 5 -> scale 2^ceil(log2(5/6)) = 1
    (byte 127); 5 -> 4 (0x6), -1.25 -> -1 (tie to even: 0xA), 3.5 -> 4 (tie to even: 0x6), 0.25 -> 0 (tie to
    even). Block 1 = 24 at dim 32 -> scale 2^ceil(log2(4)) = 4 (byte 129), code 6 (0x7). Packed low nibble first:
    byte 0 = 0xA6, byte 1 = 0x06, byte 16 = 0x07."""
    from conformance.cases.indexer_cache import KCacheLayout

    k = torch.zeros(1, 128)
    k[0, :4] = torch.tensor([5.0, -1.25, 3.5, 0.25])
    k[0, 32] = 24.0
    lay = KCacheLayout(64, "mxfp4")
    pool = torch.zeros(1, lay.block_stride, dtype=torch.uint8)
    kw = {"k": k, "slot_mapping": torch.tensor([3]), "cache": pool, "block_table": torch.tensor([[0]]),
          "seq_lens": torch.tensor([4]), "block_size": 64, "layout": "mxfp4"}
    with pytest.raises(ValueError, match="gathered slot 0 is not written"):
        _emu("ocp", kw)
    kw["seq_lens"] = torch.tensor([0])
    out = _emu("ocp", kw)["cache"][0]
    v = out[3 * 64:4 * 64]
    assert v[0] == 0xA6 and v[1] == 0x06 and v[16] == 0x07 and int(v.sum()) == 0xA6 + 0x06 + 0x07
    # blocks 2, 3 all zero: amax floored at 6 * 2^-126 -> scale 2^-126, byte 1 (vLLM: the same floor and rule)
    assert out[64 * 64 + 3 * 4:64 * 64 + 4 * 4].tolist() == [127, 129, 1, 1]
    assert int(out.sum()) == int(v.sum()) + 127 + 129 + 1 + 1


def test_mxfp4_emulation_bytes_match_the_references_writers_in_both_layouts():
    for case, layout in (("indexer.k_cache/prefill/b2n103p3/mxfp4-normal/s31", "mxfp4"),
                         ("indexer.k_cache/prefill/b2n90p3/mxfp4-gfx950-normal/s41", "mxfp4-gfx950")):
        kw = _kw(case)
        out = _emu("ocp", kw)
        ref = kw["cache"].clone()
        if layout == "mxfp4":
            cl.write_indexer_k(ref, kw["slot_mapping"], kw["k"], layout=cl.IndexerKLayout(value_format="mxfp4"))
        else:
            cl.write_indexer_k_mxfp4_shuffled(ref, kw["slot_mapping"], kw["k"])
        assert torch.equal(out["cache"], ref), case
        golden = indexer_k_cache_golden(**kw)["k"]
        assert out["k"].shape == golden.shape


def test_mxfp4_ties_row_rounds_to_nearest_even_at_the_exact_pow2_scale():
    """The ties row: every block's amax is 6 * 2^j (scale exactly 2^j, byte 127 + j; the next power up would put
    6 on code 3) and every other value a midpoint of E2M1's grid, rounded to the even neighbour."""
    kw = _kw("indexer.k_cache/prefill/b2n49p2/mxfp4-ties/s33")
    out = _emu("ocp", kw)
    read = gather_slots(kw["block_table"], kw["seq_lens"], 64)
    row = {int(s): i for i, s in enumerate(kw["slot_mapping"].tolist()) if s >= 0}
    x = kw["k"][[row[int(s)] for s in read]].double().reshape(-1, 4, 32)
    s = x.abs().amax(-1, keepdim=True) / 6
    assert torch.equal(torch.log2(s), torch.log2(s).round())                    # 6 * 2^j exactly
    even = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0, 6.0: 6.0}
    y = (x / s).abs()
    want = torch.tensor([even[float(v)] for v in y.reshape(-1)], dtype=torch.float64).reshape(y.shape)
    want = want * torch.sign(x) * s
    assert torch.equal(out["k"].double().reshape(want.shape), want)


def test_mxfp4_rows_are_not_provided_by_the_gfx942_emulation():
    from conformance.subjects import Unsupported

    with pytest.raises(Unsupported, match="gfx942 uses the FP8 indexer cache"):
        _emu("gfx942", _kw("indexer.k_cache/decode/b4n4p4/mxfp4-normal/s30"))


def test_mxfp4_serving_bound_is_tight_and_holds_on_the_emulation():
    """err <= 2^-2 max(|x|, amax/3): the emulated bytes reach at least 3/4 of it on a random row (y near 5)."""
    from conformance.cases.indexer_cache import _k_scale, _k_tol

    kw = _kw("indexer.k_cache/prefill/b2n103p3/mxfp4-normal/s31")
    got = _emu("ocp", kw)["k"].double()
    want = indexer_k_cache_golden(**kw)["k"].double()
    ratio = ((got - want).abs() / (_k_tol("serving", "mxfp4").rtol * _k_scale(want, "mxfp4"))).max()
    assert 0.75 <= float(ratio) <= 1.0
