"""The DSpark golden (references/components/dspark.py): hand-computed small cases, properties, the fp32 golden
within its derived bound of the fp64 run, the planted Markov margins, and one-line input errors."""

import pytest
import torch

from conformance.cases import cases_for
from conformance.cases.dspark import (
    MARGIN,
    _logits_scale,
    _logits_tol,
    _main_x_scale,
    _main_x_tol,
    dspark_input_golden,
    dspark_markov_golden,
)
from references.components.dspark import confidence, dspark_block, dspark_taps, markov_chain, tap_stream_index


def test_taps_by_hand():
    # L = 2 layers -> 3 boundaries, T = 1, hc = 2, D = 2; stream i copy h = [10 i + h, -(10 i + h)]
    s = torch.tensor([[[[10.0 * i + h, -(10.0 * i + h)] for h in range(2)]] for i in range(3)])
    # v4.1 id 1 reads S[1] (mean over h of 10, 11 = 10.5); v4 id 1 reads S[2] (20.5)
    assert dspark_taps(s, [1], variant="v4.1").tolist() == [[10.5, -10.5]]
    assert dspark_taps(s, [1], variant="v4").tolist() == [[20.5, -20.5]]
    assert dspark_taps(s, [0, 2], variant="v4.1").tolist() == [[0.5, -0.5, 20.5, -20.5]]   # concatenated in id order


def test_tap_variants_relation():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 3, 4, 8, generator=g)
    assert torch.equal(dspark_taps(s, [1, 2, 3], variant="v4"), dspark_taps(s, [2, 3, 4], variant="v4.1"))


def test_block_by_hand():
    # two requests: positions 0..3 (1 rejected -> last accepted position 2), then 7..8
    ids, pos = dspark_block(torch.tensor([11, 22]), torch.tensor([0, 1, 2, 3, 7, 8]), torch.tensor([0, 4, 6]),
                            torch.tensor([1, 0]), block_size=3, noise_token_id=99)
    assert ids.tolist() == [11, 99, 99, 22, 99, 99]
    assert pos.tolist() == [3, 4, 5, 9, 10, 11]
    _, pos = dspark_block(torch.tensor([5]), torch.tensor([17]), torch.tensor([0, 1]), torch.tensor([0]),
                          block_size=4, noise_token_id=0, max_model_len=20)
    assert pos.tolist() == [18, 19, 19, 19]          # clamped to max_model_len - 1
    ids, pos = dspark_block(torch.tensor([5]), torch.tensor([0]), torch.tensor([0, 1]), torch.tensor([0]),
                            block_size=1, noise_token_id=0)
    assert ids.tolist() == [5] and pos.tolist() == [1]   # a first token at position 0: the block starts at 1


def test_markov_by_hand():
    # V = 3, r = 1: w1 = [[1], [2], [3]], w2 = [[1], [0], [-1]]; bias(prev) = w1[prev] * [1, 0, -1]
    w1, w2 = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [0.0], [-1.0]])
    U = torch.tensor([[[0.0, 2.5, 0.0], [0.0, 0.0, 5.0]]])
    out = markov_chain(U, torch.tensor([2]), w1, w2)
    # step 0: prev 2 -> bias [3, 0, -3] -> [3, 2.5, -3] -> token 0; step 1: prev 0 -> bias [1, 0, -1] -> [1, 0, 4]
    assert out["logits"].tolist() == [[[3.0, 2.5, -3.0], [1.0, 0.0, 4.0]]]
    assert out["tokens"].tolist() == [[0, 2]]
    assert out["embed"].tolist() == [[[3.0], [1.0]]]
    c = confidence(torch.tensor([[[1.0], [0.0]]]), out["embed"], torch.tensor([0.5, 0.25]))
    assert torch.allclose(c, torch.sigmoid(torch.tensor([[0.5 + 0.75, 0.25]])))


def test_markov_properties():
    g = torch.Generator().manual_seed(1)
    U = torch.randn(2, 4, 50, generator=g)
    w1, w2 = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    a = torch.tensor([3, 7])
    out = markov_chain(U, a, w1, torch.zeros_like(w2))       # no Markov term: greedy on U
    assert torch.equal(out["tokens"], U.argmax(-1)) and torch.equal(out["logits"], U)
    out = markov_chain(U, a, w1, w2)
    # each step's embedding is the previous token's row (the anchor first)
    prev = torch.cat([a[:, None], out["tokens"][:, :-1]], 1)
    assert torch.equal(out["embed"], w1[prev])
    assert torch.allclose(out["logits"], U + w1[prev] @ w2.T)
    # a chain is per request: one request alone gives the same rows
    one = markov_chain(U[1:], a[1:], w1, w2)
    assert torch.equal(one["tokens"], out["tokens"][1:])


def test_main_x_is_scale_free_in_the_streams():
    # main_norm normalises main_proj's output: scaling every stream by 4 (a power of two) leaves main_x unchanged
    case = cases_for("dspark.input")[1]
    kw = case.make_inputs()
    a = dspark_input_golden(**kw)["main_x"]
    b = dspark_input_golden(**dict(kw, streams=kw["streams"] * 4))["main_x"]
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [c for c in cases_for("dspark.input") if c.tier == "fast"], ids=lambda c: c.id)
def test_input_fp32_golden_within_bound_of_fp64(case):
    kw = case.make_inputs()
    f32 = dspark_input_golden(**kw)
    f64 = dspark_input_golden(**{k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                                 for k, v in kw.items()})
    t = _main_x_tol(case.params, "fp64")
    S = _main_x_scale(kw, f64["main_x"])
    assert ((f32["main_x"].double() - f64["main_x"]).abs() <= t.rtol * S).all()
    assert torch.equal(f32["ids"], f64["ids"]) and torch.equal(f32["positions"], f64["positions"])
    assert torch.equal(f32["X0"].double(), f64["X0"])


@pytest.mark.parametrize("case", [c for c in cases_for("dspark.markov") if c.tier == "fast"], ids=lambda c: c.id)
def test_markov_planted_margin_exceeds_the_serving_bound(case):
    """The greedy token of every step beats every other token by more than twice the serving bound on the two
    logits (so no serving-precision subject may pick another token), and the Markov term decides it: the two
    largest base logits tie."""
    kw = case.make_inputs()
    out = dspark_markov_golden(**{k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                                  for k, v in kw.items()})
    lg, tok = out["logits"], out["tokens"]
    bound = _logits_tol(case.params, "serving").rtol * _logits_scale(kw, lg)
    win = lg.gather(-1, tok[..., None])
    others = lg.scatter(-1, tok[..., None], float("-inf"))
    slack = win - (others + bound.gather(-1, tok[..., None]) + bound).amax(-1, keepdim=True)
    assert (slack > 0).all(), slack.min()
    top2 = kw["U"].topk(2, -1).values
    assert torch.equal(top2[..., 0], top2[..., 1])
    assert (win.squeeze(-1) - others.amax(-1) >= min(MARGIN, 1.0)).all()


def test_bad_inputs_refused_in_one_line():
    with pytest.raises(ValueError, match=r"variant: unknown tap semantics 'v5'"):
        tap_stream_index(3, "v5", 10)
    with pytest.raises(ValueError, match=r"dspark_target_layer_ids: id 9 \(v4\) reads stream 10, outside the 10"):
        tap_stream_index(9, "v4", 10)
    with pytest.raises(ValueError, match=r"request 0: no accepted context token"):
        dspark_block(torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([0, 2]), torch.tensor([2]),
                     block_size=5, noise_token_id=0)
    with pytest.raises(ValueError, match=r"block_size: must be >= 1"):
        dspark_block(torch.tensor([1]), torch.tensor([0]), torch.tensor([0, 1]), torch.tensor([0]), block_size=0,
                     noise_token_id=0)
    with pytest.raises(ValueError, match=r"markov_w1 / markov_w2: expected \[V_in, r\] / \[3, r\]"):
        markov_chain(torch.zeros(1, 1, 3), torch.tensor([0]), torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"confidence weight: expected \(5,\) = D \+ r"):
        confidence(torch.zeros(1, 3), torch.zeros(1, 2), torch.zeros(4))
