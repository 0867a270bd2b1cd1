import pytest
import torch

from references.components.norms import rms_norm, unweighted_rms_norm

from ._attn_asserts import U32, assert_within


def _inputs(seed=0, n=512, rows=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * 3.0
    w = 1.0 + 0.1 * torch.randn(n, generator=g)
    return x, w


def test_rms_norm_fp32_vs_fp64_within_roundoff_bound():
    x, w = _inputs()
    n = x.shape[-1]
    y32 = rms_norm(x, w, 1e-6)
    y64 = rms_norm(x.double(), w.double(), 1e-6)
    assert (y32.dtype, y64.dtype) == (torch.float32, torch.float64), (
        f"rms_norm: dtypes {y32.dtype}, {y64.dtype}"
    )
    # Derivation: fl(sum of n squares) has relative error <= gamma_n ~ n u (sequential summation; any
    # pairwise / blocked order is tighter); the mean, + eps, rsqrt and the two products each add <= u
    # (rsqrt halves the sum's relative error: d(s^-1/2)/s^-1/2 = -1/2 ds/s). So
    # |y32 - y64| <= (n/2 + 5) u |y64|, with a tiny absolute floor for y ~ 0.
    bound = (n / 2 + 5) * U32 * y64.abs() + 1e-30
    assert_within("rms_norm fp32 vs fp64", y32, y64, bound)


def test_unweighted_matches_definition_and_per_head_axis():
    x, _ = _inputs(1)
    xh = x.double().view(64, 4, 128)
    y = unweighted_rms_norm(xh, 1e-6)
    ref = xh / torch.sqrt((xh**2).mean(-1, keepdim=True) + 1e-6)
    assert_within("unweighted_rms_norm", y, ref, 1e-14)
    # each head normalised on its own: mean square 1 (up to eps)
    assert_within("unweighted_rms_norm ms", (y**2).mean(-1), torch.ones(64, 4, dtype=torch.float64), 1e-5)


def test_hf_variant_rounds_normalised_x_to_weight_dtype():
    x, w = _inputs(2)
    wb = w.bfloat16()
    off = rms_norm(x, wb, 1e-6)
    hf = rms_norm(x, wb, 1e-6, variant="hf")
    n = unweighted_rms_norm(x, 1e-6)
    assert_within("rms_norm hf", hf, n.bfloat16().float() * wb.float(), 0.0)
    assert (off - hf).abs().max() > 0, "rms_norm: hf variant should differ from official with a bf16 weight"
    # with an fp32 weight the variants coincide
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6, variant="hf"))


def test_rms_norm_refuses_bad_input():
    x, w = _inputs()
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, w[:-1], 1e-6)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.full_like(w, float("nan")), 1e-6)
    with pytest.raises(ValueError, match="variant"):
        rms_norm(x, w, 1e-6, variant="neox")
    with pytest.raises(TypeError, match="x"):
        rms_norm(x.long(), w, 1e-6)
