"""OCP -> fnuz weight conversion (spec 4.1): dequantised weights are identical before and after."""

import numpy as np
import pytest
import torch

from references.formats.blockscale import BlockFP8, dequantize_fp8, quantize_fp8
from references.formats.conversion import ocp_to_fnuz, ocp_to_fnuz_codes, ocp_to_fnuz_scales
from references.formats.minifloat import FNUZ, OCP
from references.formats.verify import check_same_dequant, report

BLOCK = (128, 128)
OCP_NAN = (0x7F, 0xFF)


def converted_mismatches(codes: torch.Tensor, scales: torch.Tensor, scale_fmt: str, convert=ocp_to_fnuz):
    """Dequantise with OCP, convert, dequantise with fnuz; report every element that changed."""
    before = dequantize_fp8(codes, scales, BlockFP8.of("ocp", BLOCK, scale_fmt=scale_fmt))
    c2, s2 = convert(codes, scales, scale_fmt)
    after = dequantize_fp8(c2, s2, BlockFP8.of("fnuz", BLOCK, scale_fmt=scale_fmt))
    n_cols = codes.shape[1] // BLOCK[1]

    def scale_index(i):
        r, c = divmod(i, codes.shape[1])
        return (r // BLOCK[0]) * n_cols + c // BLOCK[1]

    sb = (scales.numpy().ravel(), s2.numpy().ravel()) if scale_fmt == "ue8m0" else None
    return check_same_dequant(
        before.numpy(),
        after.numpy(),
        codes.numpy(),
        (OCP, FNUZ),
        check="ocp_to_fnuz",
        scale_bytes=sb,
        scale_index=scale_index if sb else None,
    )


def edge_weights(scale_fmt: str):
    """Three 128x128 blocks holding every non-NaN OCP code (0x80 = -0, 0x7E/0xFE = +-448, 0x01 = smallest
    subnormal ...) at least 64 times each, with the smallest scale, an ordinary one and the largest whose
    products stay finite in float32 (448 * 2**119 < 2**128): an overflow to inf on both sides would hide
    a wrong doubling."""
    codes = np.array([c for c in range(256) if c not in OCP_NAN], np.uint8)
    codes = torch.from_numpy(np.resize(codes, (128, 384)).copy())
    if scale_fmt == "ue8m0":
        scales = torch.tensor([[0, 120, 246]], dtype=torch.uint8)  # 2**-127, 2**-7, 2**119
    else:
        scales = torch.tensor([[2.0**-126, 0.0123, 2.0**119]], dtype=torch.float32)
    return codes, scales


@pytest.mark.parametrize("scale_fmt", ["ue8m0", "fp32"])
def test_edge_codes_keep_their_values(scale_fmt):
    codes, scales = edge_weights(scale_fmt)
    assert {0x80, 0x7E, 0xFE, 0x01, 0x81}.issubset(set(codes.unique().tolist()))
    mism = converted_mismatches(codes, scales, scale_fmt)
    assert not mism, report(f"ocp_to_fnuz edge codes {scale_fmt}", mism, codes.numel())


@pytest.mark.parametrize("scale_fmt", ["ue8m0", "fp32"])
def test_random_weights_keep_their_values(scale_fmt):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(384, 512, generator=g) * torch.exp2(torch.randint(-8, 8, (384, 1), generator=g).float())
    codes, scales = quantize_fp8(w, BlockFP8.of("ocp", BLOCK, scale_fmt=scale_fmt))
    mism = converted_mismatches(codes, scales, scale_fmt)
    assert not mism, report(f"ocp_to_fnuz random {scale_fmt}", mism, codes.numel())


def test_codes_and_scales_hand_example():
    codes, scales = ocp_to_fnuz(
        torch.tensor([[0x80, 0x7E, 0x01, 0xB8]], dtype=torch.uint8),
        torch.tensor([[126]], dtype=torch.uint8),
        "ue8m0",
    )
    assert codes.tolist() == [[0x00, 0x7E, 0x01, 0xB8]] and scales.tolist() == [[127]]
    assert ocp_to_fnuz_scales(torch.tensor([0.75]), "fp32").tolist() == [1.5]


def test_ocp_nan_codes_do_not_survive():
    """Documented limit: only 0x80 is rewritten, so OCP's NaN bytes 0x7F / 0xFF become fnuz +-240 (x scale).
    Checkpoints hold no NaN weights; vLLM's normalize_e4m3fn_to_e4m3fnuz behaves the same (spec 4.1)."""
    c = ocp_to_fnuz_codes(torch.tensor(OCP_NAN, dtype=torch.uint8))
    assert c.tolist() == list(OCP_NAN) and FNUZ.decode(c.numpy()).tolist() == [240.0, -240.0]


def test_conversion_refuses():
    with pytest.raises(TypeError, match="uint8"):
        ocp_to_fnuz_codes(torch.zeros(4, dtype=torch.int8))
    with pytest.raises(TypeError, match="uint8"):
        ocp_to_fnuz_scales(torch.zeros(4, dtype=torch.float32), "ue8m0")
    with pytest.raises(ValueError, match="unknown scale format"):
        ocp_to_fnuz_scales(torch.zeros(4), "fp16")
    with pytest.raises(OverflowError):
        ocp_to_fnuz_scales(torch.tensor([254], dtype=torch.uint8), "ue8m0")
