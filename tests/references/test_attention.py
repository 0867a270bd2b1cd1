import pytest
import torch

from references.components.attention import (
    AttentionState,
    attention_layer,
    attention_set,
    kv_projection,
    output_projection,
    query_path,
    random_attention_weights,
    sparse_attention,
    sparse_attention_gather,
    swa_indices,
)
from references.components.norms import rms_norm
from references.components.rope import apply_rope, layer_inv_freq, rope_inv_freq
from references.config import TINY
from references.formats.blockscale import fake_quant_fp8
from references.numerics import GOLDEN, official

from ._attn_asserts import U32, assert_equal_idx, assert_within, gamma

# TINY keeps head_dim 512 / rope 64; a short window and top-k make every set non-trivial at small T.
CFG = TINY.replace(sliding_window=8, index_topk=3)
LAYERS = {"swa": (0, 21), "csa": (1, 27), "hca": (2, 300)}  # layer id, sequence length
TAU = 512**-0.5


def _attn_inputs(T=12, H=4, N=20, K=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, 512, generator=g, dtype=torch.float64)
    kv = torch.randn(N, 512, generator=g, dtype=torch.float64)
    idx = torch.randint(-1, N, (T, K), generator=g)
    idx[0] = -1  # an empty row
    sink = torch.randn(H, generator=g, dtype=torch.float64)
    return q.to(dtype), kv.to(dtype), idx, sink.to(dtype)


def _explicit_attention(q, kv, idx, sink, with_sink=True):
    q, kv, sink = q.double(), kv.double(), sink.double()
    out = torch.zeros_like(q)
    for t in range(q.shape[0]):
        js = [int(j) for j in idx[t] if j >= 0]
        for h in range(q.shape[1]):
            if not js:
                continue
            v = kv[js]
            lg = TAU * (v @ q[t, h])
            m = max(lg.max().item(), sink[h].item()) if with_sink else lg.max().item()
            e = torch.exp(lg - m)
            den = e.sum() + (torch.exp(sink[h] - m) if with_sink else 0.0)
            out[t, h] = (e[:, None] * v).sum(0) / den
    return out


def test_sparse_attention_matches_definition_and_no_sink_mutant_fails():
    q, kv, idx, sink = _attn_inputs()
    got = sparse_attention(q, kv, idx, sink, scale=TAU, chunk=5)
    ref = _explicit_attention(q, kv, idx, sink)
    assert_within("sparse_attention vs definition", got, ref, 1e-13)
    assert_within("sparse_attention empty row", got[0], torch.zeros_like(got[0]), 0.0)
    no_sink = _explicit_attention(q, kv, idx, sink, with_sink=False)
    gap = (no_sink - ref).abs().max().item()
    assert gap > 1e-3, f"sparse_attention: no-sink mutant indistinguishable (max |diff| {gap:.3g})"
    # the sink has no value vector: output norm shrinks by exactly sum(e) / (sum(e) + e^sink) relative to
    # the sink-free softmax
    t, h = 3, 1
    js = [int(j) for j in idx[t] if j >= 0]
    lg = TAU * (kv[js] @ q[t, h])
    frac = torch.exp(lg).sum() / (torch.exp(lg).sum() + torch.exp(sink[h]))
    assert_within("sparse_attention sink denominator-only", got[t, h], no_sink[t, h] * frac, 1e-13)


def test_sparse_attention_padding_and_order_invariance():
    q, kv, idx, sink = _attn_inputs(seed=1)
    base = sparse_attention(q, kv, idx, sink, scale=TAU)
    padded = torch.cat((torch.full((idx.shape[0], 3), -1), idx.flip(1)), 1)
    assert_within(
        "sparse_attention -1 padding / order", sparse_attention(q, kv, padded, sink, scale=TAU), base, 1e-13
    )
    # -inf sink (padded heads of serving kernels) and an empty row: 0, not NaN
    o = sparse_attention(q, kv, torch.full_like(idx, -1), torch.full_like(sink, float("-inf")), scale=TAU)
    assert_within("sparse_attention empty rows, -inf sink", o, torch.zeros_like(o), 0.0)


def test_sparse_attention_fp32_vs_fp64_within_derived_bound():
    q, kv, idx, sink = _attn_inputs(T=16, K=24, seed=2, dtype=torch.float32)
    got = sparse_attention(q, kv, idx, sink, scale=TAU)
    q, kv, sink = q.double(), kv.double(), sink.double()
    ref = sparse_attention(q, kv, idx, sink, scale=TAU)
    # Derivation (u = 2^-24, d = 512, K = index slots):
    #  * logits l_j = tau q.kv_j: |dl_j| <= tau gamma_{d+1} sum_i |q_i||kv_ji| =: dl (max over j per row).
    #  * weights pi_j = e^{l_j - M} / (sum + e^{sink - M}): relative error <= 2 dl + (K + 4) u (exp of a
    #    perturbed argument, K + 1 term sum, one division).
    #  * o = sum_j pi_j v_j with sum_j pi_j <= 1: |do| <= (2 dl + (2K + 5) u) max_j |v_j| elementwise.
    K = idx.shape[1]
    valid = idx >= 0
    g = kv.abs()[idx.clamp(min=0)]  # [T, K, d]
    dl = TAU * gamma(513) * torch.einsum("thd,tkd->thk", q.abs(), g).masked_fill(~valid[:, None], 0).amax(-1)
    vmax = g.masked_fill(~valid[..., None], 0).amax(1)  # [T, d]
    bound = (2 * dl[..., None] + (2 * K + 5) * U32) * vmax[:, None, :]
    assert_within("sparse_attention fp32 vs fp64", got, ref, bound)


def test_swa_indices_and_attention_sets():
    pos = torch.tensor([0, 3, 9, 130])
    sw = swa_indices(pos, 8)
    assert_equal_idx("swa_indices", sw[1], torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3]))
    assert_equal_idx("swa_indices", sw[3], torch.arange(123, 131))
    assert_within(
        "swa_indices causality (excess over t)",
        (sw - pos[:, None]).clamp(min=0).double(),
        torch.zeros(sw.shape, dtype=torch.float64),
        0.0,
    )
    pos = torch.arange(250, 260)
    hca = attention_set("heavily_compressed_attention", pos, 8, 128, compressed_offset=1000)
    n_vis = ((hca >= 1000).sum(1)).tolist()
    assert n_vis == [1] * 5 + [2] * 5, f"attention_set hca: visible entry counts {n_vis}"
    topk = torch.tensor([[0, 1, -1]] * 10)
    csa = attention_set("csa", pos, 8, 4, topk, token_offset=240, compressed_offset=20)
    assert_equal_idx("attention_set csa", csa[0], torch.tensor([3, 4, 5, 6, 7, 8, 9, 10, 20, 21, -1]))
    with pytest.raises(ValueError, match="topk_idx"):
        attention_set("csa", torch.tensor([6]), 8, 4, torch.tensor([[1]]))  # entry 1 completes at token 7


def test_query_and_kv_projection():
    w = random_attention_weights(CFG, 0, seed=3, dtype=torch.float64)
    x = torch.randn(5, CFG.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    qr, q = query_path(
        x, w["attn.wq_a"], w["attn.q_norm"], w["attn.wq_b"], n_heads=CFG.num_attention_heads, eps=1e-6
    )
    assert_within("query_path qr", qr, rms_norm(x @ w["attn.wq_a"].T, w["attn.q_norm"], 1e-6), 1e-13)
    assert q.shape == (5, CFG.num_attention_heads, 512), f"query_path: q shape {tuple(q.shape)}"
    assert_within(
        "query_path per-head rms", q.square().mean(-1), torch.ones(q.shape[:2], dtype=torch.float64), 1e-4
    )
    kv = kv_projection(x, w["attn.wkv"], w["attn.kv_norm"], eps=1e-6)
    assert_within("kv_projection", kv, rms_norm(x @ w["attn.wkv"].T, w["attn.kv_norm"], 1e-6), 1e-13)


def test_output_projection_inverse_rope_then_grouped():
    g = torch.Generator().manual_seed(5)
    T, H, G, R, D = 3, 8, 2, 16, 64
    o = torch.randn(T, H, 512, generator=g, dtype=torch.float64)
    wo_a = torch.randn(G * R, H // G * 512, generator=g, dtype=torch.float64)
    wo_b = torch.randn(D, G * R, generator=g, dtype=torch.float64)
    pos = torch.tensor([1, 77, 4000])
    f = rope_inv_freq(64, 10000.0)
    got = output_projection(o, pos, f, wo_a, wo_b, o_groups=G)
    un = apply_rope(o, pos, f, inverse=True)
    z = torch.cat(
        [
            un[:, gi * H // G : (gi + 1) * H // G].reshape(T, -1) @ wo_a[gi * R : (gi + 1) * R].T
            for gi in range(G)
        ],
        -1,
    )
    assert_within("output_projection", got, z @ wo_b.T, 1e-10)
    # RoPE'd values come back to the un-rotated frame: a rotated o equals the plain one after projection
    rot = apply_rope(o, pos, f)
    assert_within(
        "output_projection inverse rope",
        output_projection(rot, pos, f, wo_a, wo_b, o_groups=G),
        output_projection(o, pos * 0, f, wo_a, wo_b, o_groups=G),
        1e-9,
    )


def _layer(name, dtype=torch.float64, seed=0):
    layer, T = LAYERS[name]
    w = random_attention_weights(CFG, layer, seed=seed, dtype=dtype)
    x = torch.randn(
        T, CFG.hidden_size, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64
    )
    return layer, T, w, x.to(dtype)


@pytest.mark.parametrize("name", LAYERS)
def test_layer_no_attention_to_future_positions(name):
    layer, T, w, x = _layer(name)
    y = attention_layer(x, w, CFG, layer, torch.arange(T))
    cut = T - 6 if name != "hca" else 255  # HCA: entry 1 completes at token 255
    x2 = x.clone()
    x2[cut:] += torch.randn(T - cut, x.shape[1], dtype=x.dtype, generator=torch.Generator().manual_seed(9))
    y2 = attention_layer(x2, w, CFG, layer, torch.arange(T))
    assert_within(f"attention_layer {name} causality (rows < {cut})", y2[:cut], y[:cut], 0.0)
    assert (y2[cut:] - y[cut:]).abs().max() > 1e-3, f"attention_layer {name}: perturbation had no effect"


@pytest.mark.parametrize("name", LAYERS)
def test_layer_decode_equals_prefill_and_chunked_equals_single(name):
    layer, T, w, x = _layer(name)
    ref = attention_layer(x, w, CFG, layer, torch.arange(T))
    # fp64 everywhere; the paths differ only in batching and summation order: ~1e-15 relative per op
    tol = 1e-11 * (1 + ref.abs())
    st, ys = AttentionState(), []
    cut = T - 12 if name != "hca" else 200  # HCA decode crosses the entry fired at token 255
    ys.append(attention_layer(x[:cut], w, CFG, layer, torch.arange(cut), state=st))
    step = 1 if name != "hca" else 4
    for t in range(cut, T, step):
        b = min(t + step, T)
        ys.append(attention_layer(x[t:b], w, CFG, layer, torch.arange(t, b), state=st))
    assert_within(f"attention_layer {name} decode vs prefill", torch.cat(ys), ref, tol)
    st, ys, bounds = AttentionState(), [], (0, 5, 6, 13, T - 3, T)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        ys.append(attention_layer(x[a:b], w, CFG, layer, torch.arange(a, b), state=st))
    assert_within(f"attention_layer {name} chunked vs single prefill", torch.cat(ys), ref, tol)
    assert st.next_pos == T and st.swa_kv.shape[0] == CFG.sliding_window, (
        f"AttentionState {name}: next_pos {st.next_pos}, swa_kv rows {st.swa_kv.shape[0]}"
    )


def test_layer_csa_topk_is_exercised():
    layer, T, w, x = _layer("csa")
    st = AttentionState()
    attention_layer(x, w, CFG, layer, torch.arange(T), state=st)
    assert st.index_k.shape == (T // 4, CFG.index_head_dim) and T // 4 > CFG.index_topk, (
        f"attention_layer csa: index_k {tuple(st.index_k.shape)} vs topk {CFG.index_topk}"
    )


def test_layer_official_numerics_qat_and_variants():
    layer, T, w, x = _layer("swa", dtype=torch.float32)
    st = AttentionState()
    n = official()
    y = attention_layer(x, w, CFG, layer, torch.arange(T), numerics=n, state=st)
    nope = st.swa_kv[:, :448]
    assert torch.equal(fake_quant_fp8(nope, n.kv_nope), nope), (
        "attention_layer official: kv nope not on FP8 grid"
    )
    y0 = attention_layer(x, w, CFG, layer, torch.arange(T))
    rel = ((y - y0).norm() / y0.norm()).item()
    assert 1e-3 < rel < 0.2, f"attention_layer official vs golden: relative difference {rel:.3g}"
    yv = attention_layer(x, w, CFG, layer, torch.arange(T), variant="vllm-yarn-on-swa")
    gap = (yv - y0).abs().max().item()
    assert gap > 0, "attention_layer: vllm-yarn-on-swa should change an SWA layer (max |diff| 0)"
    assert_within(
        "layer_inv_freq csa variant", layer_inv_freq(CFG, 1, "vllm-yarn-on-swa"), layer_inv_freq(CFG, 1), 0.0
    )


def test_layer_refuses_bad_input():
    layer, T, w, x = _layer("swa")
    with pytest.raises(ValueError, match="positions"):
        attention_layer(x, w, CFG, layer, torch.arange(1, T + 1))
    with pytest.raises(KeyError, match="attn.wkv"):
        attention_layer(x, {k: v for k, v in w.items() if k != "attn.wkv"}, CFG, layer, torch.arange(T))
    st = AttentionState()
    attention_layer(x[:4], w, CFG, layer, torch.arange(4), state=st)
    with pytest.raises(ValueError, match="state"):
        attention_layer(x[4:5], w, CFG, layer, torch.arange(4, 5), state=st, numerics=official())
    with pytest.raises(ValueError, match="indices"):
        q, kv, idx, sink = _attn_inputs()
        sparse_attention(q, kv, idx + 5, sink, scale=TAU)
    assert GOLDEN.simulates_anything is False, "numerics: GOLDEN must simulate nothing"


# -- the block evaluation of sparse_attention == the per-slot gather it replaced ---------------------
def _attention_bound(q, kv, idx, u, probs_ulp=0.0):
    """Forward error bound of either evaluation (see test_sparse_attention_fp32_vs_fp64_within_derived_bound):
    (2 dl + (2K + 5) u) max_j |v_j|, dl = tau gamma_{d+1}(u) max_j sum_i |q_i||kv_ji|. Both evaluations add
    the same nonzero terms (the block form only adds exact zeros for unreferenced rows), so each is within
    this bound of the exact value and they differ by at most twice it. ``probs_ulp``: with probabilities
    rounded to a narrow format, perturbed logits can round one ulp (relative ``probs_ulp``) apart."""
    valid = idx >= 0
    g = kv.double().abs()[idx.clamp(min=0)]
    dl = TAU * gamma(q.shape[-1] + 1, u) * torch.einsum("thd,tkd->thk", q.double().abs(), g).masked_fill(
        ~valid[:, None], 0).amax(-1)
    vmax = g.masked_fill(~valid[..., None], 0).amax(1)
    return (2 * dl[..., None] + (2 * idx.shape[1] + 5) * u + probs_ulp) * vmax[:, None, :]


def _structured_set(T, window, ratio, kind, seed):
    """Window + compressed indices as attention_layer builds them (csa: random causal top-k)."""
    pos = torch.arange(T)
    topk = None
    if kind == "csa":
        g = torch.Generator().manual_seed(seed)
        n = T // ratio
        bound = (pos + 1) // ratio
        topk = torch.full((T, 6), -1)
        for t in range(T):
            if bound[t]:
                pick = torch.randperm(int(bound[t]), generator=g)[:6]
                topk[t, : pick.numel()] = pick
        return attention_set(kind, pos, window, ratio, topk, compressed_offset=T), T + n
    return attention_set(kind, pos, window, ratio, compressed_offset=T), T + T // ratio


@pytest.mark.parametrize("case", ["random", "swa", "csa", "hca"])
@pytest.mark.parametrize("chunk", [1, 7, 256])
def test_block_evaluation_equals_per_slot_gather(case, chunk):
    """fp64 and fp32: the block form (distinct rows + slot counts) equals the old per-slot gather within
    twice the derived forward bound (same terms, other addition order); duplicates, -1 padding, empty rows
    and -inf sinks included. Observed differences are printed."""
    if case == "random":
        q, kv, idx, sink = _attn_inputs(T=23, K=17, N=30, seed=5)
        idx[3, :4] = 7  # duplicate slots count twice
        sink[1] = float("-inf")
    else:
        idx, N = _structured_set(40, 8, 4 if case == "csa" else 8, case, seed=6)
        g = torch.Generator().manual_seed(7)
        q = torch.randn(40, 4, 512, generator=g, dtype=torch.float64)
        kv = torch.randn(N, 512, generator=g, dtype=torch.float64)
        sink = torch.randn(4, generator=g, dtype=torch.float64)
    for dt, u in ((torch.float64, 2.0**-53), (torch.float32, U32)):
        args = (q.to(dt), kv.to(dt), idx, sink.to(dt))
        new = sparse_attention(*args, scale=TAU, chunk=chunk)
        old = sparse_attention_gather(*args, scale=TAU, chunk=chunk)
        assert new.dtype == dt
        print(f"\n{case} chunk={chunk} {dt}: max|block - gather| = {(new - old).abs().max().item():.3g}")
        assert_within(f"block vs gather ({case}, {dt})", new, old, 2 * _attention_bound(q, kv, idx, u))
    # bf16-rounded probabilities (official numerics): at most one bf16 ulp (2^-7 relative) apart per weight
    args = (q.float(), kv.float(), idx, sink.float())
    new = sparse_attention(*args, scale=TAU, chunk=chunk, numerics=official())
    old = sparse_attention_gather(*args, scale=TAU, chunk=chunk, numerics=official())
    assert_within(f"block vs gather ({case}, bf16 probs)", new, old,
                  2 * _attention_bound(q, kv, idx, U32, probs_ulp=2.0**-7))


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_cuda_block_evaluation_equals_per_slot_gather(chunk):
    """The evaluation sparse_attention uses on CUDA (per-slot blocks, padding columns kept), run here on
    the CPU: bitwise the per-slot oracle, official numerics (bf16 probabilities) included."""
    from references.components.attention import _per_slot_blocks

    g = torch.Generator().manual_seed(11)
    T, H, d, N, K = 40, 3, 16, 50, 9
    q, kv = torch.randn(T, H, d, generator=g), torch.randn(N, d, generator=g)
    idx = torch.randint(-1, N, (T, K), generator=g)
    idx[5] = -1   # an empty row
    sink = torch.randn(H, generator=g)
    for num in (None, official()):
        kw = {} if num is None else {"numerics": num}
        got = _per_slot_blocks(q, kv, idx, sink, TAU, num or GOLDEN, chunk)
        want = sparse_attention_gather(q, kv, idx, sink, scale=TAU, chunk=5, **kw)
        assert torch.equal(got, want), f"max |diff| {(got - want).abs().max().item():.3g}"


def test_query_blocks_split_when_many_distinct_rows():
    from references.components.attention import _query_blocks

    idx = torch.arange(64).view(16, 4)  # every query its own 4 rows: U grows with the block
    blocks = list(_query_blocks(idx, chunk=16, heads=2, budget=4 * 2 * 16))  # t heads U <= budget: t = 4 (U = 16)
    assert blocks[0][:2] == (0, 4) and all(b1 == a2 for (_, b1, _), (a2, _, _) in zip(blocks, blocks[1:]))
    assert blocks[-1][1] == 16 and all((b - a) * 2 * rows.numel() <= 128 for a, b, rows in blocks)
    assert all(torch.equal(rows, idx[a:b].flatten()) for a, b, rows in blocks)
    one = list(_query_blocks(torch.full((3, 5), -1), chunk=2, heads=8, budget=1))
    assert [(a, b, r.numel()) for a, b, r in one] == [(0, 2, 0), (2, 3, 0)]


def test_both_block_forms_are_exercised(monkeypatch):
    """Window sets over a long block take the per-slot form (U > 4K on CPU), single queries the distinct-row
    form."""
    import references.components.attention as A

    used = []
    for name in ("_attend_block", "_attend_gathered"):
        fn = getattr(A, name)
        monkeypatch.setattr(A, name, lambda *a, _fn=fn, _n=name, **k: used.append(_n) or _fn(*a, **k))
    idx, N = _structured_set(80, 8, 8, "swa", seed=0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(80, 2, 512, generator=g, dtype=torch.float64)
    kv = torch.randn(N, 512, generator=g, dtype=torch.float64)
    sink = torch.zeros(2, dtype=torch.float64)
    a = sparse_attention(q, kv, idx, sink, scale=TAU, chunk=128)
    assert used == ["_attend_gathered"]
    b = sparse_attention(q, kv, idx, sink, scale=TAU, chunk=1)
    assert set(used[1:]) == {"_attend_block"}
    assert_within("forms agree", a, b, 2 * _attention_bound(q, kv, idx, 2.0**-53))
