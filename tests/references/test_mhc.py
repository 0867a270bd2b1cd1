"""mHC references (spec 3.4): fp32 vs fp64, Sinkhorn schedule and doubly-stochastic bound, HC_post algebra."""

import math

import numpy as np
import pytest
import torch

from references.components.mhc import hc_head, hc_mixes, hc_post, hc_pre, sinkhorn

U32 = 2.0**-24  # fp32 unit roundoff
U64 = 2.0**-53  # fp64 unit roundoff
HC, D, T = 4, 64, 5
EPS = 1e-6


def _site(seed, T=T, D=D, hc=HC):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, hc, D, generator=g, dtype=torch.float64)
    fn = torch.randn((2 + hc) * hc, hc * D, generator=g, dtype=torch.float64) / math.sqrt(hc * D)
    base = torch.randn((2 + hc) * hc, generator=g, dtype=torch.float64) * 0.5
    scale = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    return X, fn, base, scale


def _numpy_sinkhorn(logits, iters, eps):
    """Independent fp64 transcription of the spec 3.4 schedule, counting row/column steps explicitly."""
    z = np.asarray(logits, dtype=np.float64)
    c = np.exp(z - z.max(-1, keepdims=True))
    c = c / c.sum(-1, keepdims=True) + eps          # row step 1 (softmax) + eps
    rows, cols = 1, 0
    c = c / (c.sum(-2, keepdims=True) + eps)        # column step 1
    cols += 1
    while rows < iters:
        c = c / (c.sum(-1, keepdims=True) + eps)
        rows += 1
        c = c / (c.sum(-2, keepdims=True) + eps)
        cols += 1
    assert rows == cols == iters
    return c


# Sinkhorn vs the independent transcription, both fp64. Each of the 2*iters normalisations rounds every
# entry with <= (hc + 2) operations (hc-1 adds, +eps, divide), relative error <= (hc+2)*u64 each; the
# normalisation is a diagonal scaling, which is non-expansive in Hilbert's projective metric
# (Birkhoff-Hopf), so errors add instead of compounding: <= 2*iters*(hc+2)*u64 + softmax's (hc+3)*u64.
# With iters = 20, hc = 4: (240 + 7) u64 ~ 2.7e-14; we allow 4x that for the different summation orders.
SINKHORN_AGREE = 4 * (2 * 20 * (HC + 2) + HC + 3) * U64


def _sinkhorn_matches_transcription(fn, logits):
    got = fn(torch.from_numpy(logits), iters=20, eps=EPS).numpy()
    ref = _numpy_sinkhorn(logits, 20, EPS)
    return np.max(np.abs(got - ref) / ref) <= SINKHORN_AGREE


def test_sinkhorn_matches_spec_schedule_and_mutant_with_one_iteration_fewer_fails():
    rng = np.random.default_rng(0)
    # a wide logit spread converges slowly, so one missing iteration is far above rounding
    logits = rng.uniform(-6, 6, size=(16, HC, HC))
    assert _sinkhorn_matches_transcription(sinkhorn, logits)

    def mutant(lg, *, iters, eps):
        return sinkhorn(lg, iters=iters - 1, eps=eps)

    assert not _sinkhorn_matches_transcription(mutant, logits)


def test_sinkhorn_doubly_stochastic_within_derived_bound():
    g = torch.Generator().manual_seed(1)
    logits = torch.rand(64, HC, HC, generator=g) * 2 - 1          # logits in [-1, 1], fp32
    c = sinkhorn(logits, iters=20, eps=EPS).double()
    # Columns (last step is a column normalisation): colsum = s/(s+eps) (exact) = 1 - eps/(s+eps), with
    # s ~ 1, plus fp32 rounding of the hc-term sum and the divide: <= eps + (hc + 2) u32.
    col_bound = EPS + (HC + 2) * U32
    assert (c.sum(-2) - 1).abs().max() <= col_bound
    # Rows: Birkhoff: each scaling step contracts the Hilbert-metric distance to the doubly stochastic
    # limit by kappa = tanh(d_H(C0)/4); d_H(C0) <= max over 2x2 minors of |l_ik + l_jl - l_jk - l_il|
    # <= 4 for logits in [-1, 1] (the +eps perturbs it by O(eps)). The rows start (after the first column
    # step) at d_H <= 4, and 2*iters - 1 = 39 further half-steps follow: row deviation <=
    # (e^{d} - 1) with d = 4 kappa^39, plus eps terms and rounding.
    kappa = math.tanh(4 / 4)
    row_bound = math.expm1(4 * kappa**39) + 2 * HC * EPS + 2 * (HC + 2) * U32
    assert (c.sum(-1) - 1).abs().max() <= row_bound
    assert (c > 0).all()


def hc_pre_fp32_bounds(X, fn, base, scale, p64, c64):
    """Elementwise bounds (a, post) and per-matrix relative bound (comb) for an fp32 HC_pre vs fp64.

    Inputs are rounded to fp32 first (relative u32 each). mu = (fn.x) * rho: the dot product of length
    K = hc*D errs by <= (K+1) u32 (|fn|.|x|) (input rounding + gamma_K); rho = rsqrt(mean(x^2)+eps) by
    <= (K + 4) u32 relatively. So |d mu| <= (2K + 6) u32 M with M = (|fn|.|x|) rho.
    * post = 2 sigmoid(mu s1 + b): sigmoid' <= 1/4, so |d post| <= 2 * 1/4 (|s1| dmu + 2 u32 |arg|)
      + 3 u32 post (sigmoid's own rounding; the factor 2 is exact).
    * comb: logit errors |d l| <= |s2| dmu + 20 u32 (|l| <= 20 here); softmax turns them into relative
      entry errors <= 2 max|d l| + (hc + 3) u32; Sinkhorn is non-expansive in Hilbert's metric (see above)
      and adds <= 2 iters (hc+2) u32 of rounding; relative entry error <= 2 x Hilbert distance.
    * a = sum_j pre_j X_j: pre errs by <= 1/4 |s0| dmu + 3 u32 pre; the hc-term sum adds (hc+2) u32 sum|.|.
    """
    hc = X.shape[-2]
    K = X.shape[-2] * X.shape[-1]
    x = X.flatten(-2)
    rho = torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS)
    M = (x.abs() @ fn.abs().T) * rho
    dmu = (2 * K + 6) * U32 * M
    arg = (p64 / 2).logit()
    dpost = 0.5 * (scale[1] * dmu[..., hc:2 * hc] + U32 * arg.abs() * 2) + 3 * U32 * p64
    dl = (scale[2] * dmu[..., 2 * hc:] + U32 * 20).max(-1).values
    rel_c = 2 * 2 * dl + (hc + 3 + 2 * 20 * (hc + 2)) * U32
    pre = torch.sigmoid((x @ fn.T * rho)[..., :hc] * scale[0] + base[:hc]) + EPS
    dpre = 0.25 * scale[0] * dmu[..., :hc] + 3 * U32 * pre
    da = (dpre.unsqueeze(-1) * X.abs()).sum(-2) + (hc + 2) * U32 * (pre.unsqueeze(-1) * X.abs()).sum(-2)
    return da, dpost, rel_c


def hc_head_fp32_bound(X, fn, base, scale):
    """As for HC_pre's ``a`` (see hc_pre_fp32_bounds) with the head's fn [hc, hc D] and scale [1]."""
    hc, K = X.shape[-2], X.shape[-2] * X.shape[-1]
    x = X.flatten(-2)
    rho = torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS)
    pre = torch.sigmoid(x @ fn.T * rho * scale[0] + base) + EPS
    dpre = 0.25 * scale[0] * (2 * K + 6) * U32 * (x.abs() @ fn.abs().T) * rho + 3 * U32 * pre
    return (dpre.unsqueeze(-1) * X.abs()).sum(-2) + (hc + 2) * U32 * (pre.unsqueeze(-1) * X.abs()).sum(-2)


def test_hc_pre_fp32_vs_fp64():
    X, fn, base, scale = _site(2)
    a64, p64, c64 = hc_pre(X, fn, base, scale, norm_eps=EPS, hc_eps=EPS, sinkhorn_iters=20)
    a32, p32, c32 = hc_pre(X.float(), fn.float(), base.float(), scale.float(), norm_eps=EPS, hc_eps=EPS,
                           sinkhorn_iters=20)
    assert a32.dtype == torch.float32 and a64.dtype == torch.float64
    da, dpost, rel_c = hc_pre_fp32_bounds(X, fn, base, scale, p64, c64)
    assert ((p32.double() - p64).abs() <= dpost).all()
    assert (((c32.double() - c64).abs() / c64).amax((-1, -2)) <= rel_c).all()
    assert ((a32.double() - a64).abs() <= da).all()


def test_hc_pre_mixes_structure():
    X, fn, base, scale = _site(3)
    pre, post, comb = hc_mixes(X, fn, base, scale, norm_eps=EPS, hc_eps=EPS, sinkhorn_iters=20)
    a, post2, comb2 = hc_pre(X, fn, base, scale, norm_eps=EPS, hc_eps=EPS, sinkhorn_iters=20)
    assert torch.equal(post, post2) and torch.equal(comb, comb2)
    torch.testing.assert_close(a, torch.einsum("tj,tjd->td", pre, X), rtol=0, atol=1e-13)
    assert ((post > 0) & (post < 2)).all() and (pre > EPS).all() and (pre < 1 + EPS).all()
    # the RMS factor is scale-invariant: scaling X scales a linearly and leaves the mixes alone
    a3, post3, comb3 = hc_pre(3 * X, fn, base, scale, norm_eps=0.0, hc_eps=EPS, sinkhorn_iters=20)
    a1, post1, comb1 = hc_pre(X, fn, base, scale, norm_eps=0.0, hc_eps=EPS, sinkhorn_iters=20)
    torch.testing.assert_close(a3, 3 * a1, rtol=1e-13, atol=0)
    torch.testing.assert_close(comb3, comb1, rtol=1e-13, atol=0)


def test_hc_post_sums_over_first_comb_index():
    g = torch.Generator().manual_seed(4)
    F = torch.randn(T, D, generator=g, dtype=torch.float64)
    X = torch.randn(T, HC, D, generator=g, dtype=torch.float64)
    post = torch.rand(T, HC, generator=g, dtype=torch.float64) * 2
    comb = torch.rand(T, HC, HC, generator=g, dtype=torch.float64)
    out = hc_post(F, X, post, comb)
    ref = torch.empty_like(X)
    for t in range(T):
        for j in range(HC):
            ref[t, j] = post[t, j] * F[t] + sum(comb[t, i, j] * X[t, i] for i in range(HC))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)
    # the transposed mutant (sum over the second index) differs
    wrong = post.unsqueeze(-1) * F.unsqueeze(-2) + torch.einsum("tji,tid->tjd", comb, X)
    assert (wrong - ref).abs().max() > 1e-3


def test_hc_post_hf_variant_rounds_post_and_comb_to_bf16():
    g = torch.Generator().manual_seed(5)
    F = torch.randn(T, D, generator=g)
    X = torch.randn(T, HC, D, generator=g)
    post = torch.rand(T, HC, generator=g) * 2
    comb = torch.rand(T, HC, HC, generator=g)
    hf = hc_post(F, X, post, comb, variant="hf")
    manual = hc_post(F, X, post.bfloat16().float(), comb.bfloat16().float())
    torch.testing.assert_close(hf, manual, rtol=0, atol=0)
    assert (hf - hc_post(F, X, post, comb)).abs().max() > 0
    with pytest.raises(ValueError, match="variant"):
        hc_post(F, X, post, comb, variant="bogus")


def test_hc_head_fp32_vs_fp64_and_shapes():
    g = torch.Generator().manual_seed(6)
    X = torch.randn(T, HC, D, generator=g, dtype=torch.float64)
    fn = torch.randn(HC, HC * D, generator=g, dtype=torch.float64) / math.sqrt(HC * D)
    base = torch.randn(HC, generator=g, dtype=torch.float64)
    scale = torch.rand(1, generator=g, dtype=torch.float64) + 0.5
    h64 = hc_head(X, fn, base, scale, norm_eps=EPS, hc_eps=EPS)
    h32 = hc_head(X.float(), fn.float(), base.float(), scale.float(), norm_eps=EPS, hc_eps=EPS)
    assert h32.shape == (T, D) and h32.dtype == torch.float32
    assert ((h32.double() - h64).abs() <= hc_head_fp32_bound(X, fn, base, scale)).all()


@pytest.mark.parametrize("bad", ["fn", "base", "scale"])
def test_hc_pre_bad_shapes_name_the_argument(bad):
    X, fn, base, scale = _site(7)
    args = dict(fn=fn, base=base, scale=scale)
    args[bad] = args[bad][..., :-1]
    with pytest.raises(ValueError, match=f"^{bad}:"):
        hc_pre(X, **args, norm_eps=EPS, hc_eps=EPS, sinkhorn_iters=20)
