import pytest
import torch

from references.components.indexer import (
    causal_bound,
    indexer_q,
    indexer_scores,
    indexer_topk,
    indexer_topk_chunked,
    indexer_weights,
)
from references.components.qat import hadamard
from references.components.rope import apply_rope, rope_inv_freq
from references.config import RopeScaling
from references.formats.blockscale import fake_quant_mxfp4
from references.numerics import official, serving

from ._attn_asserts import assert_equal_idx, assert_within, gamma

FREQ = rope_inv_freq(64, 160000.0, RopeScaling())


def _qkw(T=40, H=8, hd=128, N=12, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return r(T, H, hd), r(N, hd), r(T, H)


def test_scores_match_definition():
    q, k, w = _qkw()
    ref = torch.zeros(q.shape[0], k.shape[0], dtype=torch.float64)
    for t in range(q.shape[0]):
        for s in range(k.shape[0]):
            ref[t, s] = sum(w[t, h] * torch.relu(q[t, h] @ k[s]) for h in range(q.shape[1]))
    assert_within("indexer_scores vs definition", indexer_scores(q, k, w), ref, 1e-12)


def test_scores_fp32_vs_fp64_within_derived_bound():
    q, k, w = _qkw(dtype=torch.float32)
    got = indexer_scores(q, k, w)
    q, k, w = q.double(), k.double(), w.double()
    ref = indexer_scores(q, k, w)
    # Derivation: each q.k is an hd-term dot, error <= gamma_hd sum_i |q_i k_i|; ReLU is 1-Lipschitz; the
    # product with w adds u; the sum over H heads adds gamma_H. Altogether
    # |dI| <= gamma_{hd + H + 1} sum_h |w_h| sum_i |q_hi| |k_i|.
    hd, H = q.shape[2], q.shape[1]
    bound = gamma(hd + H + 1) * torch.einsum("th,thd,nd->tn", w.abs(), q.abs(), k.abs())
    assert_within("indexer_scores fp32 vs fp64", got, ref, bound)


def test_weights_scale():
    g = torch.Generator().manual_seed(3)
    x, wp = torch.randn(5, 256, generator=g), torch.randn(64, 256, generator=g)
    assert_within(
        "indexer_weights",
        indexer_weights(x.double(), wp.double(), n_heads=64, head_dim=128),
        (x.double() @ wp.double().T) / (128**0.5 * 64**0.5),
        1e-13,
    )


def _brute_topk_set(scores, positions, ratio, topk):
    out = []
    for t in range(scores.shape[0]):
        b = min((int(positions[t]) + 1) // ratio, scores.shape[1])
        vis = sorted(range(b), key=lambda s: (-scores[t, s].item(), s))
        out.append(vis[:topk])
    return out


def _topk_error(topk_fn, ratio=4, topk=3):
    """Number of rows whose selection differs from the brute-force causal top-k; the scores of not yet
    complete entries are made huge so that any leak past the bound is selected."""
    T, N = 48, 14
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(T, N, generator=g, dtype=torch.float64)
    pos = torch.arange(T)
    future = torch.arange(N)[None, :] >= causal_bound(pos, ratio)[:, None]
    scores = torch.where(future, torch.full_like(scores, 1e6), scores)
    got = topk_fn(scores, pos, ratio=ratio, topk=topk)
    exp = _brute_topk_set(scores, pos, ratio, topk)
    bad = []
    for t in range(T):
        sel = [int(s) for s in got[t] if s >= 0]
        if sel != exp[t] or (got[t, len(sel) :] != -1).any().item():
            bad.append(f"row t={t}: got {got[t].tolist()}, expected {exp[t]} + -1 padding")
    return len(bad), (bad[0] if bad else "")


def test_topk_never_selects_future_and_matches_brute_force():
    for topk in (3, 20):
        n, first = _topk_error(indexer_topk, ratio=4, topk=topk)
        assert n == 0, (
            f"indexer_topk topk={topk}: {n} rows differ from brute-force causal top-k; first {first}"
        )


def test_topk_off_by_one_mutants_fail():
    def leaky(scores, positions, *, ratio, topk):  # admits entry floor((t+1)/m), not yet complete
        return indexer_topk(scores, positions + ratio, ratio=ratio, topk=topk)

    def late(scores, positions, *, ratio, topk):  # bound floor(t/m): drops the just-completed entry
        return indexer_topk(scores, positions - 1, ratio=ratio, topk=topk)

    assert _topk_error(leaky)[0] > 0, "top-k mutant admitting the entry at the causal bound was not detected"
    assert _topk_error(late)[0] > 0, "top-k mutant with bound floor(t/m) was not detected"


def test_topk_tie_break_lower_index_and_padding():
    scores = torch.zeros(3, 10, dtype=torch.float64)
    scores[2, 7] = 1.0
    got = indexer_topk(scores, torch.tensor([2, 13, 39]), ratio=4, topk=4)
    exp = torch.tensor([[-1, -1, -1, -1], [0, 1, 2, -1], [7, 0, 1, 2]])
    assert_equal_idx("indexer_topk ties / padding", got, exp)


def test_chunked_equals_unchunked():
    q, k, w = _qkw(T=70, N=40, seed=7, dtype=torch.float32)
    pos = torch.arange(70) + 90  # bounds 22..40: all of N visible at the end
    ref = indexer_topk(indexer_scores(q, k, w), pos, ratio=4, topk=6)
    for chunk, kc in ((1, 1), (7, 5), (16, 64), (128, 4096)):
        got = indexer_topk_chunked(q, k, w, pos, ratio=4, topk=6, chunk=chunk, key_chunk=kc)
        assert_equal_idx(f"indexer_topk_chunked chunk={chunk} key_chunk={kc}", got, ref)


def test_indexer_q_rope_and_qat():
    g = torch.Generator().manual_seed(9)
    qr, wq = torch.randn(6, 128, generator=g), torch.randn(8 * 128, 128, generator=g) / 128**0.5
    pos = torch.arange(6) * 11
    q = indexer_q(qr, wq, pos, FREQ, n_heads=8, head_dim=128)
    raw = (qr @ wq.T).view(6, 8, 128)
    assert_within("indexer_q golden", q, apply_rope(raw, pos, FREQ), 1e-6)
    assert_within("indexer_q: dims [0, 64) untouched by RoPE", q[..., :64], raw[..., :64], 0.0)
    qo = indexer_q(
        qr,
        wq,
        pos,
        FREQ,
        n_heads=8,
        head_dim=128,
        numerics=official().__class__(name="idx-only", indexer_q="fp4", indexer_hadamard=True),
    )
    assert_within("indexer_q official = MXFP4(Hadamard(q))", qo, fake_quant_mxfp4(hadamard(q)), 0.0)
    qs = indexer_q(qr, wq, pos, FREQ, n_heads=8, head_dim=128, numerics=serving("ocp"))
    rel = ((qs - q).norm() / q.norm()).item()
    assert 1e-4 < rel < 0.1, f"indexer_q serving: relative error {rel:.3g}"


def test_hadamard_orthonormal_involution():
    x = torch.randn(5, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_within("hadamard involution", hadamard(hadamard(x)), x, 1e-13)
    y = torch.randn(5, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert_within("hadamard dot", (hadamard(x) * hadamard(y)).sum(-1), (x * y).sum(-1), 1e-12)
    h = hadamard(torch.eye(4, dtype=torch.float64))
    assert_within(
        "hadamard H4",
        h,
        torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64) / 2,
        1e-15,
    )


def test_refuses_bad_input():
    q, k, w = _qkw()
    with pytest.raises(ValueError, match="w"):
        indexer_scores(q, k, w[:, :3])
    with pytest.raises(ValueError, match="k"):
        indexer_scores(q, k[:, :64], w)
    s = torch.zeros(4, 5)
    s[3, 0] = float("nan")
    with pytest.raises(ValueError, match="scores"):
        indexer_topk(s, torch.arange(4), ratio=4, topk=2)
    s[3, 0] = 0.0
    s[3, 4] = float("nan")  # masked (future) entries may hold anything
    indexer_topk(s, torch.arange(4), ratio=4, topk=2)
