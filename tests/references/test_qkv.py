"""Goldens of attn.q_path and attn.kv_insert (conformance/cases/qkv.py): what they compute, what they refuse (one
line each), and that the SWA-cache emulation writes only the mapped slots and reads back what the codec encodes."""

import pytest
import torch

from conformance.cases import cases_for
from conformance.cases.qkv import HIGH_BLOCK, _emulate_kv_insert, kv_insert_golden, q_path_golden
from references.components.attention import query_path
from references.formats.blockscale import dequantize_fp8
from references.formats.cache_layouts import DsMlaLayout, DsMlaTokens, dequantize_ds_mla_tokens
from references.formats.minifloat import get_format


def _kw(component, pick=0):
    return cases_for(component)[pick].make_inputs()


def test_q_path_at_position_zero_is_query_path_of_the_dequantised_weights():
    kw = _kw("attn.q_path")
    kw["positions"] = torch.zeros_like(kw["positions"])            # RoPE at position 0 is the identity
    out = q_path_golden(**kw)
    from conformance.cases.linear import W_SPEC

    wa = dequantize_fp8(kw["wq_a"], kw["wq_a_scale"], W_SPEC)
    wb = dequantize_fp8(kw["wq_b"], kw["wq_b_scale"], W_SPEC)
    qr, q = query_path(kw["x"], wa, kw["q_norm"], wb, n_heads=kw["n_heads"], eps=kw["eps"])
    assert torch.equal(out["qr"], qr) and torch.equal(out["q"], q)


def test_q_path_rotates_only_the_last_64_dims():
    kw = _kw("attn.q_path", 1)
    a = q_path_golden(**kw)["q"]
    b = q_path_golden(**dict(kw, positions=kw["positions"] + 1000))["q"]
    assert torch.equal(a[..., :448], b[..., :448]) and not torch.equal(a[..., 448:], b[..., 448:])


@pytest.mark.parametrize("change,match", [
    (lambda kw: dict(kw, n_heads=kw["n_heads"] + 1), "n_heads \\* 512"),
    (lambda kw: dict(kw, wq_a=kw["wq_a"].float()), "uint8 OCP e4m3fn codes"),
    (lambda kw: dict(kw, wq_b_scale=kw["wq_b_scale"][:-1]), "wq_b_scale: expected"),
    (lambda kw: dict(kw, x=kw["x"].index_fill(1, torch.tensor([3]), float("nan"))), "non-finite"),
])
def test_q_path_refuses_bad_inputs_in_one_line(change, match):
    with pytest.raises((ValueError, TypeError), match=match) as e:
        q_path_golden(**change(_kw("attn.q_path")))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("profile", ["gfx942", "ocp"])
def test_kv_insert_emulation_writes_only_mapped_slots_and_reads_back_the_codec(profile):
    kw = _kw("attn.kv_insert")
    slots = kw["slot_mapping"]
    assert (slots == -1).any() and not (slots == 0).any()           # padding rows; slot 0 free
    out = _emulate_kv_insert(profile)(**kw)
    gold = kv_insert_golden(**kw)
    assert torch.equal(out["untouched"], gold["untouched"])         # nothing but the mapped slots changed
    dialect = {"gfx942": "float8_e4m3fnuz", "ocp": "float8_e4m3fn"}[profile]
    fmax = kw["fnuz_fmax"] if profile == "gfx942" else 448.0
    tok = DsMlaTokens(out["codes"], out["scales"], out["rope"].to(torch.bfloat16))
    assert torch.equal(dequantize_ds_mla_tokens(tok, dialect), out["kv"])   # the outputs are one encoding
    assert out["kv"].shape == (int((slots >= 0).sum()), 512) and (out["scales"][:, 7] == 0).all()
    # UE8M0: each block's largest code magnitude lies in (fmax / 2, fmax] (scale 2^ceil(log2(amax / fmax)))
    top = get_format(dialect).decode(out["codes"].numpy()).reshape(-1, 7, 64)
    top = abs(top).max(-1)
    assert (top <= fmax).all() and (top > fmax / 2 * (1 - 2.0**-3)).all(), top


def test_kv_insert_high_block_base_is_the_same_write_shifted():
    kw = next(c for c in cases_for("attn.kv_insert") if c.params["block_base"] == HIGH_BLOCK).make_inputs()
    assert HIGH_BLOCK * DsMlaLayout().block_stride > 2**31
    low = dict(kw, block_base=0, slot_mapping=torch.where(kw["slot_mapping"] >= 0,
                                                          kw["slot_mapping"] - HIGH_BLOCK * 64, -1))
    a, b = _emulate_kv_insert("ocp")(**kw), _emulate_kv_insert("ocp")(**low)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change,match", [
    (lambda kw: dict(kw, slot_mapping=kw["slot_mapping"].masked_fill(kw["slot_mapping"] >= 0, 10**6)),
     "outside the pool's blocks"),
    (lambda kw: dict(kw, slot_mapping=kw["slot_mapping"].masked_fill(kw["slot_mapping"] < 0, -2)),
     "neither a slot nor the padding value -1"),
    (lambda kw: dict(kw, cache=kw["cache"][:, :-1]), "cache: expected uint8"),
    (lambda kw: dict(kw, fnuz_fmax=448.0), "fnuz_fmax"),
    (lambda kw: dict(kw, slot_mapping=kw["slot_mapping"][:-1]), "slot_mapping: expected"),
])
def test_kv_insert_refuses_bad_inputs_in_one_line(change, match):
    with pytest.raises((ValueError, TypeError, IndexError), match=match) as e:
        kv_insert_golden(**change(_kw("attn.kv_insert")))
    assert "\n" not in str(e.value)


def test_v41_q_path_has_no_head_norm():
    """q_head_norm=False (V4.1, models/deepseek_v41/attention.py:1082): q = rope(wq_b qr), qr unchanged; the V4
    golden's q is that z normalised per head (so q_v4 = rope(z / rms(z_h)) = q_v41 / rms(z_h), RoPE being a
    rotation per pair, hence rms-preserving and linear)."""
    case = next(c for c in cases_for("attn.q_path") if "/v41/" in c.id and c.tier == "fast")
    kw = case.make_inputs()
    assert kw["q_head_norm"] is False
    v41 = q_path_golden(**kw)
    v4 = q_path_golden(**dict(kw, q_head_norm=True))
    assert torch.equal(v41["qr"], v4["qr"])
    z = v41["q"].double()
    rms = (z.square().mean(-1, keepdim=True) + kw["eps"]).sqrt()
    assert torch.allclose(v4["q"].double(), z / rms, rtol=1e-5, atol=1e-6)
    # heads of different magnitude: the norm is not a no-op
    assert (rms.max() / rms.min()) > 4
    with pytest.raises(TypeError, match="q_head_norm: expected a bool"):
        q_path_golden(**dict(kw, q_head_norm=0))
