"""Whole tiny model (spec section 2): decode == prefill, fp32 vs fp64, checkpoint-backed == in-memory, ranges."""


import pytest
import torch

from references.checkpoints.reader import CheckpointReader
from references.checkpoints.writer import stored_tensors, write_checkpoint
from references.config import TINY
from references.model import TRACE_KEYS, DSV4Model, ModelState, layer_weights

from ._attn_asserts import U32, assert_within

U64 = 2.0**-53
# A whole-model forward error bound (forward error analysis, no cancellation assumed): along the longest
# dependent chain of one layer the reductions have lengths hc_pre 4D=1024, attn_norm 256, wq_a 256,
# q_norm 128, wq_b 128, head norm 512, q.kv 512, P.V <= 640 keys, wo_a 2048, wo_b 256, hc_pre 1024,
# ffn_norm 256, gate 256, W1/W3 256, W2 64: ~7.6e3 per layer; 3 layers plus HC_head 1024 + norm 256 +
# head 256 gives N ~ 2.45e4. Every stage is Lipschitz-O(1) on RMS-normalised activations (RMSNorm right
# before each block, softmax is 1-Lipschitz, sigmoid 1/4), so |d logit| <= N u (1 + |logit|).
CHAIN = 24_500
T_SEQ = 140  # crosses the HCA boundary (128) and 35 CSA windows


@pytest.fixture(scope="module")
def deq():
    return stored_tensors(TINY, 0)[1]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, TINY.vocab_size, (T_SEQ,), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def full64(deq, ids):
    m = DSV4Model(deq, TINY, dtype=torch.float64)
    return m, m.forward(ids, return_hidden=True)


def test_decode_and_chunked_prefill_equal_prefill_fp64(full64, ids):
    m, (ref, hid) = full64
    st = ModelState()
    out = [m.prefill(ids[:100], st)[0], m.step(ids[100:129], st)]   # chunk ends right after an HCA window
    out += [m.step(ids[t:t + 1], st) for t in range(129, 134)]            # single-token decode
    out.append(m.step(ids[134:], st))
    got = torch.cat(out)
    # same math, different reduction groupings: <= 2 x the fp64 forward bound N u64 (1 + |logit|)
    assert_within("decode vs prefill (fp64)", got, ref, 2 * CHAIN * U64 * (1 + ref.abs()))
    assert st.next_pos == T_SEQ


def test_mtp_decode_equals_prefill_fp64(full64, ids):
    m, (_, hid) = full64
    X, nxt = hid["final"][:-1], ids[1:]
    ref = m.mtp(X, nxt)
    st = ModelState()
    got = torch.cat([m.mtp(X[:130], nxt[:130], state=st)] + [m.mtp(X[t:t + 1], nxt[t:t + 1], state=st)
                                                              for t in range(130, X.shape[0])])
    assert torch.isfinite(ref).all() and ref.shape == (T_SEQ - 1, TINY.vocab_size)
    assert_within("mtp decode vs prefill (fp64)", got, ref, 2 * CHAIN * U64 * (1 + ref.abs()))


def test_return_hidden_h_is_the_hc_head_output_the_logits_read(full64, deq):
    """hidden["h"] is HC_head(X^L) and the logits are the final norm + LM head of exactly that h."""
    from references.components.head import lm_head
    from references.components.mhc import hc_head

    m, (logits, hid) = full64
    w = {k: deq[k].double() for k in ("hc_head_fn", "hc_head_base", "hc_head_scale", "norm.weight", "head.weight")}
    h = hc_head(hid["final"], w["hc_head_fn"], w["hc_head_base"], w["hc_head_scale"], norm_eps=TINY.rms_norm_eps,
                hc_eps=TINY.hc_eps)
    assert hid["h"].shape == (T_SEQ, TINY.hidden_size)
    assert torch.equal(hid["h"], h)
    assert torch.equal(lm_head(hid["h"], w["norm.weight"], w["head.weight"], eps=TINY.rms_norm_eps), logits)


@pytest.fixture(scope="module")
def full32(deq, ids):
    return DSV4Model(deq, TINY).forward(ids, return_hidden=True)




def test_fp32_vs_fp64_whole_model(full64, full32):
    _, (ref, hid64) = full64
    got, hid32 = full32
    assert got.dtype == torch.float32
    # routing is discontinuous: the bound only applies if both runs pick the same experts
    for layer in range(TINY.num_hidden_layers):
        assert torch.equal(hid32["layers"][layer]["route_ids"], hid64["layers"][layer]["route_ids"]), layer
    assert_within("tiny model logits fp32 vs fp64", got, ref, CHAIN * U32 * (1 + ref.abs()))


def test_activations_stay_order_one_and_logits_spread(full64):
    _, (logits, hid) = full64
    assert set(hid["layers"][0]) == set(TRACE_KEYS)
    assert torch.equal(hid["final"], hid["layers"][-1]["out"])
    for layer, tr in enumerate(hid["layers"]):
        rms = tr["out"].square().mean().sqrt().item()
        assert 0.3 < rms < 3, (layer, rms)
        assert torch.isfinite(tr["out"]).all()
    assert torch.isfinite(logits).all()
    assert 0.3 < logits.std().item() < 5 and logits.abs().max().item() < 50
    # logits vary with the position (not a constant distribution)
    assert (logits.argmax(-1).unique().numel()) > 10


def test_checkpoint_backed_model_equals_in_memory(full32, ids, tmp_path):
    write_checkpoint(tmp_path, TINY, seed=0)
    r = CheckpointReader(tmp_path)
    got = DSV4Model(r, TINY, cache_weights=False).forward(ids)
    assert torch.equal(got, full32[0])   # the same float32 weights, the same ops: identical bits
    n = len(r.reads)
    layer_weights(r, TINY, 2)
    assert all(name.startswith("layers.2.") for name in r.reads[n:])


@pytest.mark.parametrize("T", [1, 3, 20])
def test_short_sequence_forward_equals_prefill_then_decode(deq, T):
    """Shorter than an HCA window (128), and for T < 4 than a CSA window: the whole forward must run (no
    compressed entry yet) and equal a prefill followed by single-token decode steps (fp64, same bound)."""
    m = DSV4Model(deq, TINY, dtype=torch.float64)
    ids = torch.randint(0, TINY.vocab_size, (T,), generator=torch.Generator().manual_seed(T))
    ref = m.forward(ids)
    assert ref.shape == (T, TINY.vocab_size) and torch.isfinite(ref).all()
    st = ModelState()
    half = (T + 1) // 2
    got = torch.cat([m.prefill(ids[:half], st)[0]] + [m.step(ids[t:t + 1], st) for t in range(half, T)])
    assert_within(f"decode vs prefill at T={T} (fp64)", got, ref, 2 * CHAIN * U64 * (1 + ref.abs()))
    got32 = DSV4Model(deq, TINY).forward(ids)
    assert_within(f"fp32 vs fp64 at T={T}", got32, ref, CHAIN * U32 * (1 + ref.abs()))


def test_forward_input_errors_name_the_argument(deq):
    m = DSV4Model(deq, TINY)
    with pytest.raises(ValueError, match="^ids:"):
        m.forward(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="^ids:"):
        m.forward(torch.tensor([0, 5000]))
    with pytest.raises(ValueError, match="^positions:"):
        m.forward(torch.tensor([1, 2]), positions=torch.tensor([3, 4]))


@pytest.mark.parametrize("form", ["w1-w3", "w13"])
def test_decoder_layer_with_stacked_experts_equals_per_expert_bitwise(deq, ids, form):
    """A layer dict that carries the routed experts stacked (``ffn.experts.w13`` / ``.w1`` ``.w3``, ``.w2``,
    an engine's in-memory layout) computes the same layer, bit for bit, as the checkpoint's per-expert
    tensors, on both a hash-routed and a bias-routed layer."""
    from references.model import decoder_layer

    g = torch.Generator().manual_seed(5)
    X = torch.randn(24, TINY.hc_mult, TINY.hidden_size, generator=g)
    for layer in (0, TINY.num_hidden_layers - 1):
        w = {k: v.float() if v.dtype.is_floating_point else v for k, v in layer_weights(deq, TINY, layer).items()}
        per = decoder_layer(X, w, TINY, layer, ids[:24], torch.arange(24))
        E = TINY.n_routed_experts
        st = {n: torch.stack([w.pop(f"ffn.experts.{e}.{n}") for e in range(E)]) for n in ("w1", "w3", "w2")}
        if form == "w13":
            st["w13"] = torch.cat((st.pop("w1"), st.pop("w3")), dim=1)
        w.update({f"ffn.experts.{n}": t for n, t in st.items()})
        got = decoder_layer(X, w, TINY, layer, ids[:24], torch.arange(24))
        assert torch.equal(got, per), f"layer {layer}: max |diff| {(got - per).abs().max().item():.3g}"
        # a mutant with two experts' stacked rows swapped changes the layer
        bad = {k: v.clone() for k, v in st.items()}
        bad["w2"][[0, 1]] = bad["w2"][[1, 0]]
        w.update({f"ffn.experts.{n}": t for n, t in bad.items()})
        assert not torch.equal(decoder_layer(X, w, TINY, layer, ids[:24], torch.arange(24)), per)


def test_stacked_experts_without_gate_or_up_are_refused_naming_the_keys():
    from references.model import layer_experts

    with pytest.raises(KeyError, match=r"missing \['ffn.experts.w3'\]"):
        layer_experts({"ffn.experts.w1": torch.zeros(2, 4, 8), "ffn.experts.w2": torch.zeros(2, 8, 4)})
