"""Goldens of the V4.1 indexer changes (references.components.indexer_v41): small hand-computed cases, fp64
agreement within the derived bound, properties, bad-input errors, and the comparison hooks' tie handling."""

import math

import pytest
import torch

from conformance.cases import CASES, cases_for
from conformance.cases import indexer_v41 as cv
from references.components.indexer_v41 import (
    candidate_block_scores,
    candidate_blocks,
    group_positions,
    indexer_k_latent,
    indexer_topk_two_level,
    topk_in_candidates,
)
from references.precision import golden_mode


# ------------------------------------------------------------------------------------------ index keys
def test_k_latent_hand_computed():
    # latent e0, wk rows (1, 2, 3, 4) e0^T: k_pre = (1, 2, 3, 4); unit k_norm: / rms = sqrt(7.5); RoPE on the last
    # pair at the group position of token 3 at ratio 2, i.e. 2, with omega 0.5: angle 1
    latent = torch.tensor([[1.0, 0.0, 0.0]])
    wk = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [3.0, 0, 0], [4.0, 0, 0]])
    out = indexer_k_latent(latent, wk, torch.ones(4), torch.tensor([3]), torch.tensor([0.5], dtype=torch.float64),
                           ratio=2, eps=0.0, rope_dim=2)
    r = math.sqrt(7.5)
    want = torch.tensor([[1 / r, 2 / r, (3 * math.cos(1) - 4 * math.sin(1)) / r,
                          (3 * math.sin(1) + 4 * math.cos(1)) / r]])
    torch.testing.assert_close(out, want, rtol=4 * 2.0**-24, atol=0)


def test_k_latent_group_position_and_ratio_one():
    assert group_positions(torch.tensor([1, 3, 7]), 2).tolist() == [0, 2, 6]
    assert group_positions(torch.tensor([0, 5]), 1).tolist() == [0, 5]


def test_k_latent_norm_and_rotation_properties():
    kw = CASES["indexer.k_latent/tiny-v41-l2r2/n16p4096/normal/s20"].make_inputs()
    with golden_mode():
        k = cv.k_latent_golden(**{a: kw[a] for a in ("latent", "wk", "k_norm", "positions", "inv_freq")},
                               ratio=kw["ratio"]).double()
    p = kw["latent"].double() @ kw["wk"].double().T
    kn = p / (p.square().mean(-1, keepdim=True) + 1e-6).sqrt() * kw["k_norm"].double()
    # nope dims: k_norm(wk latent) itself; rope pairs: the pair norms of k_norm(wk latent)
    torch.testing.assert_close(k[:, :64], kn[:, :64], rtol=1e-5, atol=1e-6)
    pn = lambda x: (x[:, 64::2].square() + x[:, 65::2].square()).sqrt()  # noqa: E731
    torch.testing.assert_close(pn(k), pn(kn), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cid", [c.id for c in cases_for("indexer.k_latent") if c.tier == "fast"])
def test_k_latent_fp32_within_derived_fp64_bound(cid):
    kw = CASES[cid].make_inputs()
    with golden_mode():
        k32 = cv.k_latent_golden(**kw)
        k64 = cv.k_latent_golden(**{a: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                                    for a, v in kw.items()})
    bound = cv._k_bound(kw, "fp64")
    assert ((k32.double() - k64).abs() <= bound).all()
    # below a quarter of one bf16 rounding of the row amax (else the fp64 level would not tell a bf16 cast)
    assert (bound <= 2.0**-10 * k64.abs().amax(-1, keepdim=True)).all()


def test_k_latent_refuses_non_boundary_positions_and_bad_shapes():
    lat, wk, g, inv = torch.randn(2, 8), torch.randn(128, 8), torch.ones(128), torch.ones(32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"positions\[1\] = 2 is not a group boundary"):
        indexer_k_latent(lat, wk, g, torch.tensor([1, 2]), inv, ratio=2)
    with pytest.raises(ValueError, match="wk: expected last dim 8"):
        indexer_k_latent(lat, torch.randn(128, 9), g, torch.tensor([1, 3]), inv, ratio=2)
    with pytest.raises(ValueError, match="positions: length 1 != latent rows 2"):
        indexer_k_latent(lat, wk, g, torch.tensor([1]), inv, ratio=2)


def test_k_latent_second_serving_evaluation_passes_the_emulated_level():
    """A correct serving chain that accumulates its GEMM in another order (fp64, then bf16) is within the emulated
    bound; the bound is zero (bitwise equality required) where no e4m3 boundary is in reach."""
    for c in cases_for("indexer.k_latent"):
        if c.tier != "fast":
            continue
        kw = c.make_inputs()
        bf = lambda x: x.to(torch.bfloat16).float()  # noqa: E731
        p = bf((bf(kw["latent"]).double() @ bf(kw["wk"]).double().T).float())
        from references.components.norms import rms_norm
        from references.components.rope import apply_rope

        x = bf(apply_rope(bf(rms_norm(p, bf(kw["k_norm"]), kw["eps"])), group_positions(kw["positions"], kw["ratio"]),
                          kw["inv_freq"]))
        other = cv._k_fp8(x, "ocp")
        emu = cv._emulate_k("ocp")(**kw)
        comp = cv.compare_k_latent({"k": other}, {"k": emu}, {"profile": "ocp"}, "emulated", c.id, kw)
        assert comp[0].verdict == "pass", comp[0].message
        zero = (cv._k_bound(kw, "emulated", "ocp") == 0).float().mean()
        print(c.id, float(zero))
        assert zero > 0.15, (c.id, float(zero))


# ----------------------------------------------------------------------------------------- two-level top-k
def _hand():
    # 10 entries, blocks of 4: [0..3] [4..7] [8, 9]; a query at t = 9 (ratio 1) sees all ten
    src = torch.tensor([[0.0, 5, 1, 2, 9, 0, 0, 0, 1, 1]])
    cons = torch.tensor([[7.0, 1, 2, 3, 0, 9, 8, 4, 6, 5]])
    return src, cons, torch.tensor([9])


def test_candidate_blocks_hand_computed():
    src, _, pos = _hand()
    bs = candidate_block_scores(src, pos, ratio=1, block_size=4)
    assert bs.tolist() == [[5.0, 9.0, math.inf]]                 # block maxima; the newest block (8, 9) pinned
    assert candidate_blocks(src, pos, ratio=1, topk_blocks=2, block_size=4).tolist() == [[2, 1]]
    # more blocks asked than exist: -1 padded
    assert candidate_blocks(src, pos, ratio=1, topk_blocks=5, block_size=4).tolist() == [[2, 1, 0, -1, -1]]
    # causal: a query at t = 4 sees entries 0..4: block 1 (entry 4 only) is the newest, block 2 has nothing
    assert candidate_blocks(src, torch.tensor([4]), ratio=1, topk_blocks=3, block_size=4).tolist() == [[1, 0, -1]]


def test_consumer_topk_hand_computed():
    src, cons, pos = _hand()
    out = indexer_topk_two_level(src, cons, pos, ratio=1, topk=3, topk_blocks=2, block_size=4)
    # candidates {1, 2} = entries 4..9: consumer scores 0, 9, 8, 4, 6, 5 -> 5, 6, 8 (entry 0's 7 is masked)
    assert out["idx"].tolist() == [[5, 6, 8]]
    # M = 6 candidate entries < topk = 8 < n = 10: dense fills with the visible non-candidates (ties at -inf,
    # lower index first); candidates_only pads with -1
    d = indexer_topk_two_level(src, cons, pos, ratio=1, topk=8, topk_blocks=2, block_size=4)["idx"]
    assert d.tolist() == [[5, 6, 8, 9, 7, 4, 0, 1]]
    c = indexer_topk_two_level(src, cons, pos, ratio=1, topk=8, topk_blocks=2, block_size=4,
                               variant="candidates_only")["idx"]
    assert c.tolist() == [[5, 6, 8, 9, 7, 4, -1, -1]]
    # n <= topk: every visible entry, candidates or not (dense)
    assert sorted(indexer_topk_two_level(src, cons, pos, ratio=1, topk=10, topk_blocks=1, block_size=4)["idx"]
                  .tolist()[0]) == list(range(10))


def test_two_level_ratio_two_position_zero_sees_nothing():
    s = torch.randn(2, 8)
    out = indexer_topk_two_level(s, s, torch.tensor([0, 3]), ratio=2, topk=2, topk_blocks=2, block_size=2)
    assert out["candidates"].tolist()[0] == [-1, -1] and out["idx"].tolist()[0] == [-1, -1]
    assert sorted(out["idx"].tolist()[1]) == [0, 1]          # t = 3 at ratio 2: entries 0, 1 (n = 2 <= topk)


def test_two_level_refuses_bad_input():
    s = torch.randn(1, 8)
    with pytest.raises(ValueError, match="NaN / Inf among the visible"):
        indexer_topk_two_level(torch.full((1, 8), float("nan")), s, torch.tensor([7]), ratio=1, topk=2,
                               topk_blocks=1, block_size=4)
    with pytest.raises(ValueError, match="candidates: block id 2 outside"):
        topk_in_candidates(s, torch.tensor([7]), torch.tensor([[2]]), ratio=1, topk=2, block_size=4)
    with pytest.raises(ValueError, match="variant"):
        topk_in_candidates(s, torch.tensor([7]), torch.tensor([[0]]), ratio=1, topk=2, block_size=4, variant="x")


def _cmp(got, kw):
    want = cv.topk_two_level_golden(**kw)
    return {c.output: c for c in cv.compare_two_level(got, want, {}, "serving", "case", kw)}


def test_two_level_compare_accepts_ties_and_names_duplicates_and_misses():
    kw = CASES["indexer.topk_two_level/tiny-v41/t8n600/dense/exact_ties/s3"].make_inputs()
    want = cv.topk_two_level_golden(**kw)
    # a block tied with the k-th selected one swapped in on row 0 (torch.topk may pick either)
    bs = candidate_block_scores(kw["src_scores"], kw["positions"], ratio=kw["ratio"], block_size=kw["block_size"])
    r = 0
    sel = want["candidates"][r].tolist()
    kth = min(float(bs[r, b]) for b in sel if b >= 0)
    alt = [b for b in range(bs.shape[1]) if float(bs[r, b]) == kth and b not in sel]
    assert alt, "the exact-ties case has a tied block outside the selection on row 0"
    cand = want["candidates"].clone()
    cand[r, sel.index(next(b for b in sel if float(bs[r, b]) == kth))] = alt[0]
    idx = topk_in_candidates(kw["scores"], kw["positions"], cand, ratio=kw["ratio"], topk=kw["topk"],
                             block_size=kw["block_size"])
    c = _cmp({"candidates": cand, "idx": idx}, kw)
    assert c["candidates"].verdict == "pass" and c["candidates"].metrics["tie_rows"] >= 1, c["candidates"].message
    assert c["idx"].verdict == "pass", c["idx"].message
    # a duplicated entry fails, named
    dup = want["idx"].clone()
    dup[0, 1] = dup[0, 0]
    c = _cmp({"candidates": want["candidates"], "idx": dup}, kw)
    assert c["idx"].verdict == "fail" and "duplicate entries" in c["idx"].message
    # a missing non-tied entry fails with both sides named
    kw2 = CASES["indexer.topk_two_level/synthetic-k40b16/t9n1100/dense/permutation/s5"].make_inputs()
    w2 = cv.topk_two_level_golden(**kw2)
    bad = w2["idx"].clone()
    vis = set(range(int((kw2["positions"][0] + 1) // kw2["ratio"])))
    bad[0, 0] = min(vis - set(bad[0].tolist()))
    c = _cmp({"candidates": w2["candidates"], "idx": bad}, kw2)
    assert c["idx"].verdict == "fail" and "not expected, missing" in c["idx"].message, c["idx"].message
