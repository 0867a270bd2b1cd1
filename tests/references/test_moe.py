"""MoE references (spec 3.12-3.14): stable sqrt-softplus, routing rules, clamped SwiGLU, weight placement."""

import math

import pytest
import torch

from references.components.moe import expert_ffn, gate_logits, moe, route, sqrt_softplus
from references.numerics import official

U32 = 2.0**-24
TINY32 = 2.0**-149  # smallest fp32 subnormal: the absolute resolution of results below 2**-126


def _sqrt_softplus_ok(fn) -> bool:
    """fp32 result vs an fp64 evaluation of the same fp32 inputs.

    Inputs are exact in both. Each branch evaluates at most 6 correctly-rounded-or-1-ulp ops (exp, log1p,
    divide, sqrt, multiply, add), so the relative error is <= 12 u32 (2 ulp per op); below 2**-126 the
    result is subnormal and only an absolute 2**-149 resolution exists, hence the additive TINY32.
    """
    z = torch.tensor([-1000.0, -200.0, -104.0, -90.0, -30.0, -5.0, -1e-3, 0.0, 1e-3, 3.0, 19.9, 20.1,
                      40.0, 88.0, 100.0, 1e4, 3e38])
    got = fn(z).double()
    zd = z.double()
    # fp64 truth: e^{z/2} sqrt(log1p(t)/t), t = e^z, for z <= 0 (the ratio is 1 to fp64 precision once
    # t < 1e-17, and e^{z/2} is a normal fp64 number down to z = -1000); z + log1p(e^-z) for z > 0
    t = torch.exp(zd.clamp(max=0))
    ratio = torch.where(t > 1e-17, torch.log1p(t) / t, torch.ones_like(t))
    ref = torch.where(zd > 0, torch.sqrt(zd + torch.log1p(torch.exp(-zd.clamp(min=0)))),
                      torch.exp(zd.clamp(max=0) / 2) * torch.sqrt(ratio))
    return bool(((got - ref).abs() <= 12 * U32 * ref + TINY32).all() and torch.isfinite(got).all())


def test_sqrt_softplus_fp32_within_bound_and_naive_underflow_mutant_fails():
    assert _sqrt_softplus_ok(sqrt_softplus)
    assert sqrt_softplus(torch.tensor([-200.0])).item() > 0  # e^-100 = 3.7e-44 is a fp32 subnormal

    def naive(z):  # log(1 + exp(z)) underflows to 0 at z = -200 (and overflows at z = 100)
        return torch.sqrt(torch.log(1 + torch.exp(z)))

    assert not _sqrt_softplus_ok(naive)


def _logits(T=7, E=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=g)


def test_route_weights_from_unbiased_scores_and_biased_mutant_fails():
    logits = _logits()
    bias = torch.linspace(-1, 1, 16)
    w, ids = route(logits, bias=bias, topk=4, route_scale=1.5)
    s = sqrt_softplus(logits)
    # selection by s + bias
    assert torch.equal(ids, torch.sort(s + bias, dim=-1, descending=True, stable=True).indices[:, :4])
    expect = s.gather(1, ids)
    expect = expect / expect.sum(-1, keepdim=True) * 1.5
    # same ops in the same order: identical bits
    assert torch.equal(w, expect)
    # mutant: weights taken from the biased scores
    wb = (s + bias).gather(1, ids)
    wb = wb / wb.sum(-1, keepdim=True) * 1.5
    assert not torch.allclose(w, wb, rtol=1e-3, atol=0)
    # the renormalised weights sum to route_scale: 4-term sum + divide + multiply <= (4 + 2) u32 relative
    assert ((w.sum(-1) - 1.5).abs() <= 1.5 * 6 * U32).all()


def test_hash_routing_ignores_bias():
    logits = _logits()
    hash_ids = torch.randint(0, 16, (7, 4), generator=torch.Generator().manual_seed(1))
    w0, i0 = route(logits, topk=4, route_scale=2.5, hash_ids=hash_ids)
    w1, i1 = route(logits, bias=torch.randn(16) * 100, topk=4, route_scale=2.5, hash_ids=hash_ids)
    assert torch.equal(i0, hash_ids) and torch.equal(i1, hash_ids) and torch.equal(w0, w1)
    s = sqrt_softplus(logits).gather(1, hash_ids)
    assert torch.equal(w0, s / s.sum(-1, keepdim=True) * 2.5)


def test_route_renorm_variants_and_extreme_logits():
    # fp32 scores of z <= -200 are subnormal (e^{z/2}); the naive sqrt(log1p(e^z)) would give 0/0 here
    logits = torch.full((2, 8), -200.0)
    logits[1] = torch.linspace(-200, -180, 8)
    w, ids = route(logits, topk=3, route_scale=1.0)
    assert torch.isfinite(w).all() and ((w.sum(-1) - 1).abs() < 1e-5).all()
    # "hf-vllm" adds 1e-20 to the denominator: identical for ordinary logits, different when sum(w) << 1e-20
    lg = _logits()
    assert torch.equal(route(lg, topk=4, route_scale=1.5)[0], route(lg, topk=4, route_scale=1.5, variant="hf-vllm")[0])
    wh, _ = route(logits, topk=3, route_scale=1.0, variant="hf-vllm")
    assert (wh.sum(-1) < 0.5).all()
    with pytest.raises(ValueError, match="variant"):
        route(lg, topk=4, route_scale=1.5, variant="x")
    with pytest.raises(ValueError, match="^bias:"):
        route(lg, bias=torch.zeros(3), topk=4, route_scale=1.5)
    with pytest.raises(ValueError, match="^hash_ids:"):
        route(lg, topk=4, route_scale=1.5, hash_ids=torch.zeros(7, 3, dtype=torch.long))


def test_route_ties_go_to_lower_index():
    w, ids = route(torch.zeros(1, 8), topk=3, route_scale=1.0)
    assert ids.tolist() == [[0, 1, 2]]


def test_expert_clamp_is_max_side_for_gate_and_both_sides_for_up():
    D, I = 4, 2
    x = torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64)
    w1 = torch.zeros(I, D, dtype=torch.float64)
    w3 = torch.zeros(I, D, dtype=torch.float64)
    w1[:, 0] = torch.tensor([50.0, -50.0])   # gate 50 -> 10; gate -50 stays -50
    w3[:, 0] = torch.tensor([-30.0, 30.0])   # up -30 -> -10; up 30 -> 10
    w2 = torch.eye(D, I, dtype=torch.float64)
    y = expert_ffn(x, w1, w3, w2, limit=10.0)
    silu = torch.nn.functional.silu
    d = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    expect = torch.stack([silu(d(10.0)) * -10, silu(d(-50.0)) * 10, d(0.0), d(0.0)])
    torch.testing.assert_close(y[0], expect, rtol=1e-12, atol=1e-30)
    y_nc = expert_ffn(x, w1, w3, w2, limit=None)
    assert y_nc[0, 0] < -1000  # silu(50) * -30


def _moe_weights(E=8, D=32, I=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    ex = {e: {"w1": torch.randn(I, D, generator=g, dtype=dtype) / D**0.5,
              "w3": torch.randn(I, D, generator=g, dtype=dtype) / D**0.5,
              "w2": torch.randn(D, I, generator=g, dtype=dtype) / I**0.5} for e in range(E)}
    sh = {k: v.clone() for k, v in ex[0].items()}
    return ex, sh


def test_moe_equals_per_token_sum_and_stacked_form():
    ex, sh = _moe_weights()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 32, generator=g, dtype=torch.float64) * 3
    w, ids = route(torch.randn(6, 8, generator=g, dtype=torch.float64), topk=3, route_scale=1.5)
    y = moe(x, ids, w, ex, sh, limit=1.0)
    ref = torch.stack([
        sum(w[t, k] * expert_ffn(x[t:t + 1], **ex[int(ids[t, k])], limit=1.0)[0] for k in range(3))
        + expert_ffn(x[t:t + 1], **sh, limit=1.0)[0] for t in range(6)])
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for form in ("stacked", "stacked-w13"):   # fp64: the per-segment loop slices the stacked tensors
        torch.testing.assert_close(moe(x, ids, w, _as_source(ex, form), sh, limit=1.0), y, rtol=0, atol=1e-14)
    # variants: after-w2 is the same map in exact arithmetic; no-clamp changes the shared expert
    torch.testing.assert_close(moe(x, ids, w, ex, sh, limit=1.0, variant="after-w2"), y, rtol=1e-12, atol=1e-12)
    assert (moe(x, ids, w, ex, sh, limit=1.0, shared_variant="no-clamp") - y).abs().max() > 1e-3


def _as_source(ex, form):
    """The same experts as moe() accepts them: per expert, stacked {w1, w3, w2}, or stacked {w13, w2}."""
    if form == "per-expert":
        return ex
    st = {k: torch.stack([ex[e][k] for e in range(len(ex))]) for k in ("w1", "w3", "w2")}
    if form == "stacked-w13":
        st = {"w13": torch.cat((st.pop("w1"), st.pop("w3")), dim=1), "w2": st["w2"]}
    return st


@pytest.mark.parametrize("form", ["per-expert", "stacked", "stacked-w13"])
@pytest.mark.parametrize("variant", ["official", "after-w2"])
def test_moe_bulk_evaluation_equals_expert_by_expert_bitwise(variant, form, monkeypatch):
    """The grouped evaluation (one gather, per-expert GEMM segments or torch's grouped GEMM for fp32
    stacked experts, row-wise parts in bulk) gives exactly what calling ``expert_ffn`` expert by expert
    gives, FP8 activation quantisation and bf16 rounding included (all row-wise), accumulated in the same
    order (experts ascending)."""
    import references.components.moe as moe_mod

    calls = []
    if moe_mod._grouped_mm is not None:
        real = moe_mod._grouped_mm
        monkeypatch.setattr(moe_mod, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    ex, sh = _moe_weights(D=128, I=64, dtype=torch.float32)
    src = _as_source(ex, form)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(10, 128, generator=g) * 4
    w, ids = route(torch.randn(10, 8, generator=g), topk=3, route_scale=1.5)
    num = official()
    ref = torch.zeros_like(x)
    for e in sorted(set(ids.flatten().tolist())):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if variant == "official":
            ye = expert_ffn(x[tok], **ex[e], limit=1.0, numerics=num, route_weight=w[tok, slot])
        else:
            ye = expert_ffn(x[tok], **ex[e], limit=1.0, numerics=num) * w[tok, slot].unsqueeze(-1)
        ref.index_add_(0, tok, ye)
    ref = ref + expert_ffn(x, **sh, limit=1.0, numerics=num)
    ref = ref.to(torch.bfloat16).float()   # official numerics round the MoE output to bf16
    got = moe(x, ids, w, src, sh, limit=1.0, numerics=num, variant=variant)
    assert torch.equal(got, ref), f"max |diff| {(got - ref).abs().max().item():.3g}"
    if moe_mod._grouped_mm is not None:   # fp32 stacked experts take torch's grouped GEMM, per expert the loop
        assert len(calls) == {"per-expert": 0, "stacked": 3, "stacked-w13": 2}[form]
    # a mutant that drops the routing weight is caught by the same comparison
    bad = moe(x, ids, torch.ones_like(w), src, sh, limit=1.0, numerics=num, variant=variant)
    assert not torch.equal(bad, ref)


def test_moe_looks_up_each_expert_tensor_once_when_used():
    """Lazy sources (a checkpoint streamed one layer at a time): only routed experts' tensors are read, each
    once, and an unrouted expert's are never touched."""
    ex, sh = _moe_weights()
    reads = []

    class Recording(dict):
        def __init__(self, e):
            super().__init__(ex[e])
            self.e = e

        def __getitem__(self, k):
            reads.append((self.e, k))
            return super().__getitem__(k)

    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 32, generator=g, dtype=torch.float64)
    ids = torch.tensor([[1, 4], [4, 6], [1, 6]])
    w = torch.rand(3, 2, generator=g, dtype=torch.float64)
    moe(x, ids, w, lambda e: Recording(e), None, limit=1.0)
    assert sorted(set(reads)) == sorted((e, k) for e in (1, 4, 6) for k in ("w1", "w3", "w2"))
    assert len(reads) == len(set(reads))


def moe_fp32_bound(x, ids, w, ex, sh, limit=10.0):
    """Elementwise bound on |moe_fp32 - moe_fp64| (magnitudes from fp64; the clamp is 1-Lipschitz).

    Per expert: W1/W3 dot products of length D err by <= (D+2) u32 (|W||x|) incl. input rounding;
    SiLU(g)*u with |SiLU'| <= 1.1: the activation errs by <= (D+2) u32 (1.1 |u| |W1||x| + |silu g| |W3||x|)
    + 4 u32 |a|; W2's dot product of length I adds (I+2) u32 |W2||a|; the route weight (+2 u32) and the
    sum over k+1 experts ((k+2) u32) give the remaining (I + 8) u32 |W2||a| term.
    """
    D = x.shape[-1]
    bound = torch.zeros_like(x)
    silu = torch.nn.functional.silu
    for t in range(x.shape[0]):
        terms = [(w[t, k].abs(), ex[int(ids[t, k])]) for k in range(ids.shape[1])]
        if sh is not None:
            terms.append((torch.tensor(1.0, dtype=torch.float64), sh))
        for wt, p in terms:
            I = p["w1"].shape[0]
            xa = x[t].abs()
            g_ = (p["w1"] @ x[t]).clamp(max=limit)
            u_ = (p["w3"] @ x[t]).clamp(-limit, limit)
            a = silu(g_) * u_
            da = (D + 2) * U32 * (1.1 * u_.abs() * (p["w1"].abs() @ xa) + silu(g_).abs() * (p["w3"].abs() @ xa)) \
                + 4 * U32 * a.abs()
            bound[t] += wt * (p["w2"].abs() @ da + (I + 8) * U32 * (p["w2"].abs() @ a.abs()))
    return bound


def test_moe_fp32_vs_fp64():
    ex, sh = _moe_weights()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 32, generator=g, dtype=torch.float64)
    w, ids = route(torch.randn(6, 8, generator=g, dtype=torch.float64), topk=3, route_scale=1.5)
    y64 = moe(x, ids, w, ex, sh, limit=10.0)
    f = lambda d: {k: v.float() for k, v in d.items()}  # noqa: E731
    y32 = moe(x.float(), ids, w.float(), {e: f(v) for e, v in ex.items()}, f(sh), limit=10.0)
    # Per expert: W1/W3 dot products of length D err by <= (D+2) u32 (|W||x|) incl. input rounding;
    # SiLU(g)*u: |SiLU'| <= 1.1, so the activation errs by <= (D+2) u32 (1.1 |u| |W1||x| + |silu g| |W3||x|)
    # + 4 u32 |a|; W2's dot product of length I adds (I+2) u32 |W2||a|. Times route weight (+2 u32) and
    # summed over k+1 experts ((k+2) u32). We bound with the fp64 magnitudes.
    bound = moe_fp32_bound(x, ids, w, ex, sh)
    assert ((y32.double() - y64).abs() <= bound).all()


def test_moe_weight_placement_differs_under_fp8_activation_quant():
    ex, sh = _moe_weights(D=128, I=128, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 128, generator=g)
    w, ids = route(torch.randn(4, 8, generator=g), topk=3, route_scale=1.5)
    a = moe(x, ids, w, ex, sh, limit=10.0, numerics=official())
    b = moe(x, ids, w, ex, sh, limit=10.0, numerics=official(), variant="after-w2")
    assert (a - b).abs().max() > 0


def test_gate_logits_shape_errors():
    with pytest.raises(ValueError, match="^weight:"):
        gate_logits(torch.zeros(2, 8), torch.zeros(4, 7))
    assert gate_logits(torch.ones(2, 8), torch.ones(4, 8)).shape == (2, 4)
    assert math.isclose(float(gate_logits(torch.ones(1, 8), torch.ones(1, 8))), 8.0)


def test_moe_stacked_experts_refuse_bad_shapes_and_out_of_range_ids():
    ex, sh = _moe_weights()
    x = torch.randn(3, 32, dtype=torch.float64)
    ids = torch.tensor([[1, 4], [4, 6], [1, 7]])
    w = torch.ones(3, 2, dtype=torch.float64)
    st = _as_source(ex, "stacked-w13")
    with pytest.raises(ValueError, match=r"expert id 7, but the stacked experts hold 7"):
        moe(x, ids, w, {k: v[:7] for k, v in st.items()}, sh, limit=1.0)
    with pytest.raises(ValueError, match=r"experts w13: expected \(8, 32, 32\)"):
        moe(x, ids, w, {"w13": st["w13"][:, :16], "w2": st["w2"]}, sh, limit=1.0)
    with pytest.raises(ValueError, match=r"experts w1: expected a stacked \[E, out, in\] tensor"):
        moe(x, ids, w, {"w1": st["w13"][0], "w3": st["w13"][0], "w2": st["w2"]}, sh, limit=1.0)


def test_moe_refuses_negative_expert_ids():
    """A -1 (padding) id would index the last expert of a stacked tensor silently: refused, naming where."""
    ex, sh = _moe_weights()
    stacked = {k: torch.stack([ex[e][k] for e in range(8)]) for k in ("w1", "w3", "w2")}
    x = torch.randn(3, 32, dtype=torch.float64)
    ids = torch.tensor([[1, 2], [3, -1], [0, 4]])
    with pytest.raises(ValueError, match="negative expert id -1 at token 1, slot 1"):
        moe(x, ids, torch.ones(3, 2, dtype=torch.float64), stacked, sh, limit=1.0)
