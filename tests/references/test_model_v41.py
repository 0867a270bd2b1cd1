"""Whole tiny DeepSeek-V4.1 model (references/model_v41.py): fp32 vs fp64, decode == prefill, the V4.1 structure
(shared compressed entries and top-k, candidate blocks, lagged HC, final collapse, Engram), checkpoint round trip."""

import pytest
import torch

from references.checkpoints.reader import CheckpointReader
from references.checkpoints.writer import stored_tensors, write_checkpoint
from references.components.indexer import causal_bound
from references.components.indexer_v41 import candidate_mask
from references.config import TINY, TINY_V41
from references.formats.minifloat import get_format
from references.model_v41 import DSV41Model, V41State

from ._attn_asserts import U32, assert_within

U64 = 2.0**-53
# Forward error bound of one logit (as tests/references/test_model.py for V4): the longest dependent chain of one
# V4.1 layer has the reductions hc_pre 4D=1024, attn_norm 256, wq_a 256, q_norm 128, wq_b 128 (no head norm),
# q.kv 512, P.V <= window 128 + top-k 32 keys, wo_a 2048, wo_b 256, hc_pre 1024, ffn_norm 256, gate 256, W1/W3 256,
# W2 64 (the compressor chain wkv 256, pool <= 2, norm 512 runs beside wkv/kv_norm and is shorter; engram's wkv 128
# and its two 256-norms beside hc_pre): ~6.6e3 per layer; 5 layers plus the collapse 4, final norm 256 and head 256:
# N ~ 3.4e4. Every stage is Lipschitz-O(1) on normalised activations, so |d logit| <= N u (1 + |logit|).
CHAIN = 34_000
T_SEQ = 150
# index_topk 32 (TINY_V41 keeps the kernels' 512): at T = 150 the ratio-1 layer sees up to 150 entries and the
# ratio-2 layers up to 75, so every top-k really drops entries, and the candidate blocks (4 x 16 = 64 entries) of
# layer 2 really restrict layer 4 (its own index source). The weights have the same shapes.
CFG = TINY_V41.replace(index_topk=32)
# Engram on layer 3 (2-grams and 3-grams, 2 heads of 32): the bucket ranges are the 4 consecutive primes >= 101
# (101, 103, 107, 109), 420 rows in all.
ECFG = CFG.replace(engram_layer_ids=(3,), engram_num_embeddings=(420,), engram_max_ngram_size=3, engram_n_heads=2,
                   engram_head_dim=32, engram_compressed_vocab_size=CFG.vocab_size, engram_vocab_size=101)


def engram_weights(cfg, layer, seed=5, *, zero=False):
    g = torch.Generator().manual_seed(seed)
    rows, hd, D, hc = cfg.engram_num_embeddings[0], cfg.engram_head_dim, cfg.hidden_size, cfg.hc_mult
    cols = (cfg.engram_max_ngram_size - 1) * cfg.engram_n_heads
    x = torch.randn(rows, hd, generator=g, dtype=torch.float64)
    codes = torch.from_numpy(get_format("float8_e4m3fn").encode(x.numpy())).to(torch.uint8)
    p = f"layers.{layer}.engram."
    return {p + "table": torch.zeros_like(codes) if zero else codes,
            p + "table_scale": torch.randint(124, 128, (rows, hd // 32), generator=g, dtype=torch.uint8),
            p + "wkv": torch.randn((hc + 1) * D, cols * hd, generator=g, dtype=torch.float64).mul((cols * hd) ** -0.5)
            .float(),
            p + "q_weight": (1 + 0.1 * torch.randn(hc, D, generator=g)), p + "k_weight": (1 + 0.1 * torch.randn(hc, D,
                                                                                                            generator=g))}


@pytest.fixture(scope="module")
def deq():
    d = dict(stored_tensors(TINY_V41, 0)[1])
    d.update(engram_weights(ECFG, 3))
    return d


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, CFG.vocab_size, (T_SEQ,), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def full64(deq, ids):
    m = DSV41Model(deq, ECFG, dtype=torch.float64)
    return m, m.forward(ids, return_hidden=True)


@pytest.fixture(scope="module")
def full32(deq, ids):
    return DSV41Model(deq, ECFG).forward(ids, return_hidden=True)


def test_fp32_vs_fp64_whole_model(full64, full32):
    (_, (ref, h64)), (got, h32) = full64, full32
    # the discrete choices must coincide for the bound to describe a rounding error (a top-k near-tie would be a
    # jump, not an error): every layer's index top-k and every route agree on this seeded input
    for layer, (a, b) in enumerate(zip(h64["layers"], h32["layers"])):
        if a["topk"] is not None:
            assert torch.equal(a["topk"], b["topk"]), f"layer {layer}: fp32 and fp64 top-k differ (near tie)"
        assert torch.equal(a["route_ids"], b["route_ids"]), f"layer {layer}: routes differ"
    assert_within("fp32 vs fp64 logits", got, ref, CHAIN * U32 * (1 + ref.abs()))


def test_decode_and_chunked_prefill_equal_prefill_fp64(full64, ids):
    m, (ref, _) = full64
    st = V41State()
    out = [m.prefill(ids[:100], st)[0], m.step(ids[100:131], st)]      # chunk ends mid ratio-2 group
    out += [m.step(ids[t:t + 1], st) for t in range(131, 136)]          # single-token decode
    out.append(m.step(ids[136:], st))
    # the same math in other reduction groupings: <= 2 x the fp64 forward bound
    assert_within("decode vs prefill (fp64)", torch.cat(out), ref, 2 * CHAIN * U64 * (1 + ref.abs()))
    assert st.next_pos == T_SEQ and st.layers[2].compressed_kv.shape[0] == T_SEQ // 2
    assert st.layers[3].compressed_kv is None and st.layers[4].compressor is None   # readers keep no cache


def test_readers_use_the_sources_objects(full64):
    _, (_, hid) = full64
    L = hid["layers"]
    assert L[0]["topk"] is None and L[0]["compressed_kv"] is None                 # SWA
    assert L[3]["compressed_kv"] is L[2]["compressed_kv"] and L[3]["topk"] is L[2]["topk"]
    assert L[4]["compressed_kv"] is L[2]["compressed_kv"] and L[4]["index_k"] is L[2]["index_k"]
    assert L[4]["topk"] is not L[2]["topk"] and not torch.equal(L[4]["topk"], L[2]["topk"])
    assert L[1]["compressed_kv"].shape[0] == T_SEQ and L[2]["compressed_kv"].shape[0] == T_SEQ // 2
    # top-k never selects a future entry and, with more than 32 visible, selects 32
    for layer in (1, 2, 4):
        m = CFG.compress_ratio(layer)
        n = causal_bound(torch.arange(T_SEQ), m)
        tk = L[layer]["topk"]
        assert (tk < n[:, None]).all()
        assert torch.equal((tk >= 0).sum(1), n.clamp(max=32))


def test_candidate_blocks_restrict_the_later_index_source(full64):
    _, (_, hid) = full64
    L = hid["layers"]
    cand, tk4 = L[4]["candidates"], L[4]["topk"]
    assert cand is L[2]["candidates"] and L[3]["candidates"] is None    # published by layer 2, used by layer 4
    n = causal_bound(torch.arange(T_SEQ), 2)
    inside = candidate_mask(cand, T_SEQ // 2, CFG.candidate_block_size)
    vis = torch.arange(T_SEQ // 2)[None, :] < n[:, None]
    n_cand = (inside & vis).sum(1)
    rows = n_cand >= 32
    assert ((n - n_cand) > 0).any(), "the candidate blocks never exclude a visible entry: the case does not bite"
    sel_in = inside.gather(1, tk4.clamp(min=0)) & (tk4 >= 0)
    assert sel_in[rows].all(), "layer 4 selected an entry outside layer 2's candidate blocks"


def test_lagged_hc_collapses_with_the_previous_sublayers_mix(full64):
    _, (_, hid) = full64
    L = hid["layers"]
    assert torch.equal(L[0]["attn_pre"], L[0]["X"][:, 0])            # identity pre-mix at the entry
    for layer in range(len(L)):
        t = L[layer]
        src = t["engram_out"] if t["engram_out"] is not None else t["X"]
        if layer:
            want = (L[layer - 1]["ffn_mix_pre"].unsqueeze(-1) * src).sum(-2)
            torch.testing.assert_close(t["attn_pre"], want, rtol=0, atol=0)
            v4 = (t["attn_mix_pre"].unsqueeze(-1) * src).sum(-2)           # V4: the site's own pre-mix
            assert (v4 - want).abs().max() > 1e-3, f"layer {layer}: lagged and own pre-mix coincide"
        want_f = (t["attn_mix_pre"].unsqueeze(-1) * t["after_attn"]).sum(-2)
        torch.testing.assert_close(t["ffn_pre"], want_f, rtol=0, atol=0)
    h = (L[-1]["ffn_mix_pre"].unsqueeze(-1) * L[-1]["out"]).sum(-2)
    assert hid["final_pre"] is L[-1]["ffn_mix_pre"]
    torch.testing.assert_close(hid["h"], h, rtol=0, atol=0)


def test_zero_engram_table_changes_nothing_and_a_real_table_only_engram_layers(deq, ids, full64):
    _, (ref, hid) = full64
    zero = dict(deq)
    zero.update(engram_weights(ECFG, 3, zero=True))
    z_logits, zh = DSV41Model(zero, ECFG, dtype=torch.float64).forward(ids, return_hidden=True)
    plain = DSV41Model(deq, CFG, dtype=torch.float64).forward(ids)
    # a zero table gives zero rows, kv = 0, value = 0: x + gate * 0 = x exactly, so the model is the engram-free one
    assert torch.equal(zh["layers"][3]["engram_out"], zh["layers"][3]["X"])
    assert torch.equal(z_logits, plain)
    # with the real table: layers 0-2 untouched (bitwise), layer 3's stream moves
    for layer in range(3):
        assert torch.equal(hid["layers"][layer]["out"], zh["layers"][layer]["out"]), layer
    d = (hid["layers"][3]["engram_out"] - hid["layers"][3]["X"]).abs().max()
    assert d > 1e-2 and (ref - plain).abs().max() > 1e-3


def test_checkpoint_round_trip_into_the_model(ids, tmp_path):
    deq = write_checkpoint(tmp_path, TINY_V41, seed=0, dtype="bf16")
    r = CheckpointReader(tmp_path)
    assert r.config.is_v41   # a bf16 checkpoint has no quantization_config (no block size to read back)
    got = DSV41Model(r, r.config.replace(index_topk=32)).forward(ids)
    want = DSV41Model(deq, CFG).forward(ids)
    assert torch.equal(got, want)   # the same float32 weights, the same ops: identical bits
    qdeq = write_checkpoint(tmp_path / "fp8", TINY_V41, seed=0)      # FP8, 32x32 UE8M0 blocks
    q = CheckpointReader(tmp_path / "fp8")
    assert q.config.quantization.weight_block_size == (32, 32)
    assert torch.equal(DSV41Model(q, CFG).forward(ids[:40]), DSV41Model(qdeq, CFG).forward(ids[:40]))


def test_bad_inputs_are_refused_with_one_line(deq):
    with pytest.raises(ValueError, match="needs a V4.1 config"):
        DSV41Model(deq, TINY)
    with pytest.raises(ValueError, match="ids: expected a 1-D integer"):
        DSV41Model(deq, CFG).forward(torch.zeros(3))
    with pytest.raises(ValueError, match="engram on layer 0"):
        DSV41Model(deq, ECFG.replace(engram_layer_ids=(0,)))
    with pytest.raises(ValueError, match="step\\(\\) needs"):
        DSV41Model(deq, CFG).step(torch.tensor([1]), None)
