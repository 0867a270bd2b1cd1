import pytest
import torch

from references.components import compressor as C
from references.components.compressor import CompressorState, compress
from references.components.rope import apply_rope, rope_inv_freq
from references.config import RopeScaling
from references.formats.blockscale import fake_quant_fp8
from references.numerics import official, serving

from ._attn_asserts import U32, assert_within, gamma

D = 128
FREQ = rope_inv_freq(64, 160000.0, RopeScaling())
EPS = 1e-6


def _weights(ratio, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    c = 2 if ratio == 4 else 1
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    w = (r(c * d, D) * D**-0.5, r(c * d, D) * D**-0.5, 0.5 * r(ratio, c * d), 1 + 0.1 * r(d))
    return tuple(t.to(dtype) for t in w)


def _x(T, seed=1, dtype=torch.float64):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _explicit_pooled(x, wkv, wgate, ape, ratio, d):
    """Spec 3.7 restated with loops: entry i, channel k, slots listed one by one, softmax over slots."""
    x, wkv, wgate, ape = (t.double() for t in (x, wkv, wgate, ape))
    Cm = x @ wkv.T
    Zm = x @ wgate.T + ape[torch.arange(x.shape[0]) % ratio]
    n = x.shape[0] // ratio
    out = torch.zeros(n, d, dtype=torch.float64)
    for i in range(n):
        cur = range(ratio * i, ratio * i + ratio)
        if ratio == 4:
            prev = range(ratio * (i - 1), ratio * i) if i > 0 else []
            slots = [(Cm[t, :d], Zm[t, :d]) for t in prev] + [(Cm[t, d:], Zm[t, d:]) for t in cur]
        else:
            slots = [(Cm[t], Zm[t]) for t in cur]
        c = torch.stack([s[0] for s in slots])
        z = torch.stack([s[1] for s in slots])
        e = torch.exp(z - z.max(0).values)
        out[i] = (e * c).sum(0) / e.sum(0)
    return out


def _finish_explicit(pooled, norm, ratio):
    h = pooled / torch.sqrt((pooled**2).mean(-1, keepdim=True) + EPS) * norm.double()
    return apply_rope(h, torch.arange(h.shape[0]) * ratio, FREQ)


def _error_vs_spec(fn, ratio, d, T):
    w = _weights(ratio, d)
    x = _x(T)
    ref = _finish_explicit(_explicit_pooled(x, *w[:3], ratio, d), w[3], ratio)
    got = fn(x, *w, ratio=ratio, head_dim=d, eps=EPS, inv_freq=FREQ)
    return (got - ref).abs().max().item()


# mutants: each rebuilds the pooled vector wrongly, then reuses the module's norm / rope tail
def _mutant(pool):
    def fn(x, wkv, wgate, ape, norm, *, ratio, head_dim, eps, inv_freq):
        kv, sc = C._project(x, wkv, wgate, ape, torch.arange(x.shape[0]), ratio)
        n = x.shape[0] // ratio
        pooled = pool(kv[: n * ratio].view(n, ratio, -1), sc[: n * ratio].view(n, ratio, -1), head_dim)
        return C._finish(
            pooled,
            torch.arange(n),
            norm,
            ratio=ratio,
            eps=eps,
            inv_freq=inv_freq,
            rope_dim=64,
            numerics=C.GOLDEN,
            kind="attn",
            variant="official",
        )

    return fn


def _overlap_slots(kv, sc, d, prev_half):
    n, m, _ = kv.shape
    pk = torch.cat((kv.new_zeros(1, m, d), prev_half(kv)[:-1]), 0)
    ps = torch.cat((sc.new_full((1, m, d), float("-inf")), prev_half(sc)[:-1]), 0)
    return torch.cat((pk, kv[:, :, d:]), 1), torch.cat((ps, sc[:, :, d:]), 1)


def _softmax_over_channels(kv, sc, d):
    k, s = _overlap_slots(kv, sc, d, lambda t: t[:, :, :d])
    s = s.nan_to_num(neginf=-1e30)
    return (torch.softmax(s, dim=-1) * k).sum(1)


def _pair_current_first_half(kv, sc, d):
    # wrong series: the CURRENT window's first half in place of the previous window's
    k = torch.cat((kv[:, :, :d], kv[:, :, d:]), 1)
    s = torch.cat((sc[:, :, :d], sc[:, :, d:]), 1)
    return (torch.softmax(s, dim=1) * k).sum(1)


def _pair_previous_second_half(kv, sc, d):
    k, s = _overlap_slots(kv, sc, d, lambda t: t[:, :, d:])
    return (torch.softmax(s, dim=1) * k).sum(1)


@pytest.mark.parametrize("ratio,d,T", [(4, 512, 26), (4, 128, 17), (128, 512, 300)])
def test_compress_matches_spec_loops(ratio, d, T):
    # fp64 both sides; differences are reassociation only, ~1e-15 relative on O(1) values
    err = _error_vs_spec(compress, ratio, d, T)
    assert err < 1e-12, f"compress ratio {ratio} d {d}: max |diff| vs the spec loops {err:.3g}"


def test_softmax_over_window_not_channels_mutant_fails():
    assert _error_vs_spec(_mutant(_softmax_over_channels), 4, 512, 26) > 1e-3, (
        "compressor softmax-over-channels mutant was not detected"
    )


def test_csa_pairing_mutants_fail():
    for name, pool in (
        ("current-first-half", _pair_current_first_half),
        ("previous-second-half", _pair_previous_second_half),
    ):
        assert _error_vs_spec(_mutant(pool), 4, 512, 26) > 1e-3, f"CSA pairing mutant {name} was not detected"


def test_entry0_has_no_previous_window_and_causality():
    ratio, d = 4, 512
    w = _weights(ratio, d)
    x = _x(24)
    base = compress(x, *w, ratio=ratio, head_dim=d, eps=EPS, inv_freq=FREQ)
    # entry 0 only sees tokens 0..3; entry i sees tokens 4(i-1)..4i+3
    x2 = x.clone()
    x2[8:12] += 1.0  # window 2: affects entries 2 and 3 only
    out = compress(x2, *w, ratio=ratio, head_dim=d, eps=EPS, inv_freq=FREQ)
    changed = ((out - base).abs().amax(-1) > 0).tolist()
    assert changed == [False, False, True, True, False, False], f"compress CSA window dependence: {changed}"
    # a trailing partial window produces no entry
    shape = tuple(compress(x[:23], *w, ratio=ratio, head_dim=d, eps=EPS, inv_freq=FREQ).shape)
    assert shape == (5, d), f"compress: partial window produced an entry, shape {shape}"


def test_compress_fp32_vs_fp64_within_derived_bound():
    ratio, d, T = 4, 512, 32
    w64 = _weights(ratio, d)
    x64 = _x(T)
    w32, x32 = tuple(t.float() for t in w64), x64.float()
    w64, x64 = tuple(t.double() for t in w32), x32.double()  # same (fp32-representable) inputs
    got = compress(x32, *w32, ratio=ratio, head_dim=d, eps=EPS, inv_freq=FREQ)
    ref = compress(x64, *w64, ratio=ratio, head_dim=d, eps=EPS, inv_freq=FREQ)
    # Derivation (elementwise, u = 2^-24, S = 2m = 8 slots):
    #  * C, Z are D-term dots: |dC|, |dZ| <= gamma_{D+1} sum|x||w| (+ape add: +u|Z|) =: eC, eZ.
    #  * softmax weights pi_s = e^{z_s - max} / sum: relative error <= 2 max|dZ| + (S + 4) u.
    #  * P = sum_s pi_s C_s: |dP| <= max|C| (2 eZ + (S + 4) u) + eC + gamma_S max|C|.
    #  * RMSNorm y = P w / rms: |dy_k| <= |w_k| / rms (|dP_k| + |P_k| max|dP| / rms) + (n/2 + 5) u |y_k|.
    #  * RoPE on a pair: <= 4u (|a| + |b|) + sqrt(2) times the pair's incoming error.
    x, wkv, wg, ape, nrm = x64, *w64
    ax = x.abs()
    eC = gamma(D + 1) * (ax @ wkv.abs().T)
    eZ = gamma(D + 2) * (ax @ wg.abs().T + ape.abs()[torch.arange(T) % ratio])
    n = T // ratio
    Cw = (x @ wkv.T).abs()[: n * ratio].view(n, ratio, -1)
    Cmax = torch.maximum(Cw[..., :d].amax(1).roll(1, 0), Cw[..., d:].amax(1))
    eCw = eC[: n * ratio].view(n, ratio, -1)
    eZw = eZ[: n * ratio].view(n, ratio, -1)
    eCmax = torch.maximum(eCw[..., :d].amax(1).roll(1, 0), eCw[..., d:].amax(1))
    eZmax = torch.maximum(eZw[..., :d].amax(1).roll(1, 0), eZw[..., d:].amax(1))
    dP = Cmax * (2 * eZmax + (2 * ratio + 4) * U32) + eCmax + gamma(2 * ratio) * Cmax
    P = _explicit_pooled(x, wkv, wg, ape, ratio, d)
    rms = torch.sqrt((P**2).mean(-1, keepdim=True))
    dy = nrm.abs() / rms * (dP + P.abs() * dP.amax(-1, keepdim=True) / rms)
    y = P / rms * nrm
    dy = dy + (d / 2 + 5) * U32 * y.abs()
    pair_y = y[:, -64:].abs().view(n, 32, 2).sum(-1, keepdim=True).expand(n, 32, 2).reshape(n, 64)
    pair_d = dy[:, -64:].view(n, 32, 2).amax(-1, keepdim=True).expand(n, 32, 2).reshape(n, 64)
    bound = dy.clone()
    bound[:, -64:] = 4 * U32 * pair_y + 2**0.5 * 2 * pair_d
    assert_within("compress fp32 vs fp64", got, ref, bound)


@pytest.mark.parametrize(
    "ratio,d,T,cuts",
    [(4, 512, 27, (1, 4, 5, 11, 12, 20)), (4, 128, 19, (3, 7, 8)), (128, 512, 300, (100, 255, 256, 257))],
)
def test_state_decode_equals_compress(ratio, d, T, cuts):
    w = _weights(ratio, d)
    x = _x(T)
    ref = compress(x, *w, ratio=ratio, head_dim=d, eps=EPS, inv_freq=FREQ)
    st = CompressorState(*w, ratio=ratio, head_dim=d, eps=EPS, inv_freq=FREQ)
    outs, ids = [], []
    bounds = (0, *cuts, T)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        o, i = st.update(x[a:b], torch.arange(a, b))
        outs.append(o)
        ids.append(i)
    got = torch.cat(outs)
    assert torch.equal(torch.cat(ids), torch.arange(T // ratio)), (
        "CompressorState: entry ids not 0..n-1 in order"
    )
    # fp64; same math in a different batching: reassociation only
    assert_within("CompressorState vs compress", got, ref, 1e-12 * (1 + ref.abs()))
    with pytest.raises(ValueError, match="positions"):
        st.update(x[:1], torch.arange(1))


def test_qat_attn_nope_on_fp8_grid_and_indexer_variants():
    w = _weights(4, 512, dtype=torch.float32)
    x = _x(16, dtype=torch.float32)
    n = official()
    out = compress(x, *w, ratio=4, head_dim=512, eps=EPS, inv_freq=FREQ, numerics=n)
    nope = out[:, :448]
    assert_within("compress attn: nope dims on the FP8 grid", fake_quant_fp8(nope, n.kv_nope), nope, 0.0)
    gap = (out - compress(x, *w, ratio=4, head_dim=512, eps=EPS, inv_freq=FREQ)).abs().max().item()
    assert gap > 0, "compress official: identical to golden (QAT not applied)"
    wi = _weights(4, 128, dtype=torch.float32)
    for num in (official(), serving("gfx942")):
        k = compress(x, *wi, ratio=4, head_dim=128, eps=EPS, inv_freq=FREQ, numerics=num, kind="indexer")
        g = compress(x, *wi, ratio=4, head_dim=128, eps=EPS, inv_freq=FREQ, kind="indexer")
        rel = ((k - C.quant_indexer(g, None, num.indexer_hadamard)).norm() / g.norm()).item()
        assert 1e-4 < rel < 0.25, f"compress indexer {num.name}: relative quantisation error {rel:.3g}"


def test_compress_refuses_bad_input():
    w = _weights(4, 512)
    x = _x(8)
    with pytest.raises(ValueError, match="ape"):
        compress(x, w[0], w[1], w[2][:, :512], w[3], ratio=4, head_dim=512, eps=EPS, inv_freq=FREQ)
    with pytest.raises(ValueError, match="kind"):
        compress(x, *w, ratio=4, head_dim=512, eps=EPS, inv_freq=FREQ, kind="mla")
    xn = x.clone()
    xn[3, 5] = float("nan")
    with pytest.raises(ValueError, match="x"):
        compress(xn, *w, ratio=4, head_dim=512, eps=EPS, inv_freq=FREQ)


@pytest.mark.parametrize("ratio,d", [(4, 512), (128, 512), (4, 128)])
@pytest.mark.parametrize("T", [0, 1, 3])
def test_sequence_shorter_than_one_window_gives_no_entry(ratio, d, T):
    """T < ratio: compress returns an empty [0, head_dim] (no crash); the state holds the partial window."""
    if T >= ratio:
        pytest.skip("not shorter than a window")
    w = _weights(ratio, d)
    x = _x(T)
    got = compress(x, *w, ratio=ratio, head_dim=d, eps=EPS, inv_freq=FREQ)
    assert got.shape == (0, d) and got.dtype == torch.float64
    st = CompressorState(*w, ratio=ratio, head_dim=d, eps=EPS, inv_freq=FREQ)
    new, ids = st.update(x, torch.arange(T))
    assert new.shape == (0, d) and ids.numel() == 0 and st.next_pos == T
