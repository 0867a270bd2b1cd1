import math

import pytest
import torch

from references.components.rope import apply_rope, layer_inv_freq, rope_inv_freq, yarn_low_high
from references.config import FLASH, TINY, RopeScaling

from ._attn_asserts import U32, assert_within

YARN = RopeScaling()


def _x(seed=0, shape=(6, 4, 512), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _complex_reference(x, positions, inv_freq, rope_dim=64):
    """Independent statement of the math: pair i is the complex number x[off+2i] + j x[off+2i+1],
    multiplied by exp(j pos omega_i) (OFF's view_as_complex formulation)."""
    x = x.double()
    off = x.shape[-1] - rope_dim
    z = torch.complex(x[..., off::2], x[..., off + 1 :: 2])
    phi = positions.double()[:, None] * inv_freq.double()
    z = z * torch.polar(torch.ones_like(phi), phi).view(phi.shape[0], *([1] * (x.ndim - 2)), -1)
    out = x.clone()
    out[..., off::2], out[..., off + 1 :: 2] = z.real, z.imag
    return out


def _neox_mutant(x, positions, inv_freq, rope_dim=64, inverse=False):
    """Half-split (NeoX) pairing: (x[off+i], x[off+i+rope_dim/2]). Must be rejected by the tests."""
    off = x.shape[-1] - rope_dim
    phi = positions.double()[:, None] * inv_freq.double() * (-1 if inverse else 1)
    phi = phi.view(phi.shape[0], *([1] * (x.ndim - 2)), -1)
    c, s = phi.cos().to(x.dtype), phi.sin().to(x.dtype)
    a, b = x[..., off : off + rope_dim // 2], x[..., off + rope_dim // 2 :]
    return torch.cat((x[..., :off], a * c - b * s, a * s + b * c), -1)


def _pairing_error(rope_fn) -> float:
    x = _x(3, dtype=torch.float64)
    pos = torch.tensor([0, 1, 7, 100, 4096, 1_000_000])
    f = rope_inv_freq(64, 160000.0, YARN)
    return (rope_fn(x, pos, f) - _complex_reference(x, pos, f)).abs().max().item()


def test_yarn_correction_range():
    got = yarn_low_high(64, 160000.0, YARN)
    assert got == (15, 25), f"yarn_low_high theta=160000: {got}"
    got = yarn_low_high(64, 10000.0, YARN)
    assert got == (20, 33), f"yarn_low_high theta=10000: {got}"


def test_yarn_frequencies_keep_low_pairs_and_divide_high_pairs():
    plain = rope_inv_freq(64, 160000.0)
    yarn = rope_inv_freq(64, 160000.0, YARN)
    assert plain.dtype == torch.float64 and yarn.shape == (32,), (
        f"rope_inv_freq: {plain.dtype} {tuple(yarn.shape)}"
    )
    i = torch.arange(32, dtype=torch.float64)
    assert_within("rope_inv_freq plain", plain, 160000.0 ** (-2 * i / 64), 1e-18)
    assert_within("rope_inv_freq yarn pairs 0..15 keep omega", yarn[:16], plain[:16], 0.0)
    assert_within("rope_inv_freq yarn high pairs", yarn[25:], plain[25:] / 16, 0.0)
    ramp = (i[16:25] - 15) / 10
    assert_within(
        "rope_inv_freq yarn blend", yarn[16:25], plain[16:25] * (1 - ramp) + plain[16:25] / 16 * ramp, 1e-18
    )


def test_layer_inv_freq_variants():
    swa, csa = 0, 2  # FLASH: layers 0-1 SWA, 2 CSA
    assert_within("layer_inv_freq swa official", layer_inv_freq(FLASH, swa), rope_inv_freq(64, 10000.0), 0.0)
    assert_within("layer_inv_freq csa", layer_inv_freq(FLASH, csa), rope_inv_freq(64, 160000.0, YARN), 0.0)
    v = layer_inv_freq(FLASH, swa, variant="vllm-yarn-on-swa")
    plain = rope_inv_freq(64, 10000.0)
    assert torch.equal(v[:21], plain[:21]) and (v[21:] < plain[21:]).all(), (
        "layer_inv_freq vllm-yarn-on-swa: only pairs above low=20 may change"
    )
    assert_within(
        "layer_inv_freq csa vllm",
        layer_inv_freq(FLASH, csa, variant="vllm-yarn-on-swa"),
        layer_inv_freq(FLASH, csa),
        0.0,
    )
    assert_within("layer_inv_freq MTP layer (SWA-only, plain RoPE)", layer_inv_freq(TINY, 3), plain, 0.0)
    with pytest.raises(ValueError, match="variant"):
        layer_inv_freq(FLASH, 0, variant="hf-yarn")


def test_interleaved_pairing_and_neox_mutant_fails():
    # fp64 end to end: the only differences are cos/sin rounding, ~1e-16 relative; |x| <~ 5, and phases up to
    # 1e6 rad are reduced exactly by libm, so 1e-12 is a wide margin.
    err = _pairing_error(apply_rope)
    assert err < 1e-12, f"apply_rope: max |diff| {err:.3g} vs the complex (interleaved) formula"
    err = _pairing_error(_neox_mutant)
    assert err > 1e-3, f"apply_rope: neox mutant not detected by the pairing check (max |diff| {err:.3g})"


def test_nope_dims_untouched_and_only_last_rope_dims_rotate():
    x = _x(1)
    y = apply_rope(x, torch.arange(6) * 37, rope_inv_freq(64, 10000.0))
    assert_within("apply_rope nope dims [0, 448) untouched", y[..., :448], x[..., :448], 0.0)
    # rotation preserves each pair's norm
    n0 = x[..., 448:].view(6, 4, 32, 2).double().norm(dim=-1)
    n1 = y[..., 448:].view(6, 4, 32, 2).double().norm(dim=-1)
    assert_within("apply_rope pair norms", n1, n0, 8 * U32 * n0)


def test_rope_then_inverse_is_identity():
    pos = torch.tensor([0, 3, 64, 127, 65536, 1_048_575])
    f = rope_inv_freq(64, 160000.0, YARN)
    x64 = _x(2, dtype=torch.float64)
    assert_within(
        "apply_rope inverse fp64",
        apply_rope(apply_rope(x64, pos, f), pos, f, inverse=True),
        x64,
        1e-14 * (1 + x64.abs()),
    )
    x = x64.float()
    back = apply_rope(apply_rope(x, pos, f), pos, f, inverse=True)
    # Derivation: per rotation each output is a*c -/+ b*s with c, s rounded (<= u rel each), two products
    # and one sum: error <= 3u (|a| + |b|) + u |out|, with |out| <= |a| + |b|, so <= 4u (|a| + |b|); the
    # second rotation sees inputs bounded by (1 + 4u)(|a| + |b|) * sqrt(2) -> total <= 10u (|a| + |b|).
    pair = x.view(6, 4, -1, 2).abs().sum(-1, keepdim=True).expand(6, 4, -1, 2).reshape(x.shape)
    assert_within("apply_rope inverse fp32", back, x, 10 * U32 * pair)


def test_rope_fp32_vs_fp64_and_relative_position():
    f = rope_inv_freq(64, 160000.0, YARN)
    pos = torch.tensor([5, 1000, 70000, 500_000, 1, 2])
    x = _x(4)
    y32, y64 = apply_rope(x, pos, f), apply_rope(x.double(), pos, f)
    pair = x.view(6, 4, -1, 2).abs().sum(-1, keepdim=True).expand(6, 4, -1, 2).reshape(x.shape).double()
    # one rotation: <= 4u (|a| + |b|) (see the inverse test)
    assert_within("apply_rope fp32 vs fp64", y32, y64, 4 * U32 * pair)
    # q . k after rotation depends only on the position difference
    q, k = _x(5, (1, 1, 512), torch.float64), _x(6, (1, 1, 512), torch.float64)

    def dot(pq, pk):
        return (apply_rope(q, torch.tensor([pq]), f) * apply_rope(k, torch.tensor([pk]), f)).sum().item()

    d0 = dot(10, 3)
    for a in (17, 4099, 900_007):
        assert math.isclose(dot(a + 7, a), d0, rel_tol=1e-9), f"apply_rope: q.k not relative at offset {a}"


def test_apply_rope_refuses_bad_shapes():
    f = rope_inv_freq(64, 10000.0)
    with pytest.raises(ValueError, match="positions"):
        apply_rope(_x(), torch.arange(5), f)
    with pytest.raises(ValueError, match="inv_freq"):
        apply_rope(_x(), torch.arange(6), f[:8])
    with pytest.raises(ValueError, match="x"):
        apply_rope(torch.zeros(6, 32), torch.arange(6), f)
