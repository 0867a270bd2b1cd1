"""``references.numerics.serving_v41``: V4.1's serving rounding points (docs/v41-serving-numerics.md), and that the
whole-model path (``indexer_k_latent(numerics=...)``, ``DSV41Model``) rounds exactly as the component emulations do
(the model composes them; nothing re-derived)."""

import pytest
import torch

from conformance.cases import indexer_v41 as CI
from references.components.indexer_v41 import indexer_k_latent
from references.components.qat import linear
from references.components.rope import rope_inv_freq
from references.config import RopeScaling
from references.numerics import GOLDEN, MXFP8_ACT, V41_KV_NOPE_COMPRESSED, serving, serving_v41


@pytest.mark.parametrize("profile", ["gfx942", "ocp"])
def test_rounding_points_per_profile(profile):
    nm, v4 = serving_v41(profile), serving(profile)
    assert nm.act_dtype == torch.bfloat16 and nm.name == f"serving-v41:{profile}"
    # gfx942 has no MX hardware: the MXFP8 linear is EmulationMxfp8LinearKernel, bf16 activations
    assert nm.linear_act == (None if profile == "gfx942" else MXFP8_ACT)
    # the sliding-window record is V4's; the compressed cache is e4m3fn 448 on every platform
    assert nm.kv_nope == v4.kv_nope and nm.kv_nope_compressed == V41_KV_NOPE_COMPRESSED
    assert V41_KV_NOPE_COMPRESSED.fmt.name == "float8_e4m3fn" and V41_KV_NOPE_COMPRESSED.block == (1, 64)
    assert nm.indexer_q == v4.indexer_q
    assert nm.indexer_k.fmt.name == v4.dialect and nm.indexer_k.fmax == (224.0 if profile == "gfx942" else 448.0)
    assert MXFP8_ACT.block == (1, 32) and MXFP8_ACT.scale_fmt == "ue8m0" and MXFP8_ACT.fmax == 448.0


def test_unknown_profile_is_one_clear_error():
    with pytest.raises(KeyError, match="unknown serving profile 'gfx90a'"):
        serving_v41("gfx90a")


def test_mxfp8_linear_input_hand_checked():
    # one 32-group with amax 3.5 -> scale 2^ceil(log2(3.5 / 448)) = 2^-7; 3.5 / 2^-7 = 448 (exact), 0.3 / 2^-7 = 38.4
    # -> e4m3 spacing 4 in [32, 64): 40 -> 0.3125; the second group (all 1.0) is exact. The weight picks elements.
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1], x[0, 32:] = 3.5, 0.3, 1.0
    w = torch.zeros(3, 64)
    w[0, 0], w[1, 1], w[2, 40] = 1.0, 1.0, 1.0
    y = linear(x, w, serving_v41("ocp"))
    assert y.tolist() == [[3.5, 0.3125, 1.0]]
    assert linear(x, w, serving_v41("gfx942")).tolist() == linear(x, w, GOLDEN).tolist()   # no activation quant


@pytest.mark.parametrize("profile", ["gfx942", "ocp"])
def test_index_keys_round_exactly_as_the_component_emulation(profile):
    g = torch.Generator().manual_seed(7)
    N, ratio = 40, 2
    positions = (torch.sort(torch.randperm(200, generator=g)[:N]).values + 1) * ratio - 1
    lat = torch.randn(N, 512, generator=g).bfloat16().float()
    wk = (torch.randn(128, 512, generator=g) * 512 ** -0.5).bfloat16().float()
    k_norm = (1 + 0.2 * torch.randn(128, generator=g)).bfloat16().float()
    inv = rope_inv_freq(64, 160000.0, RopeScaling())
    got = indexer_k_latent(lat, wk, k_norm, positions, inv, ratio=ratio, numerics=serving_v41(profile))
    want = CI._emulate_k(profile)(lat, wk, k_norm, positions, inv, ratio=ratio)
    assert torch.equal(got, want), float((got - want).abs().max())
    gold = indexer_k_latent(lat, wk, k_norm, positions, inv, ratio=ratio)
    assert not torch.equal(got, gold)      # the rounding points are live
