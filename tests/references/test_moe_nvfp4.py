"""moe.experts_nvfp4's golden (NVFP4 weights dequantised exactly, then moe.experts' golden), its activation
quantiser bound, and vLLM's emulated activation quantiser: a hand-computed case, fp64 agreement, the bound holding
on every element (normal, subnormal and clipping scales), one-line refusals naming the tensor."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from conformance.cases import cases_for
from conformance.cases.moe_nvfp4 import _bounds, _qdq_bound, experts_nvfp4_golden, nvfp4_act_qdq


def _one_expert(code1, byte1, code3, byte3, code2, byte2, g13, g2, D=16, I=16):
    def proj(code, byte, out, inp, g):
        return {"": torch.full((1, out, inp // 2), code | (code << 4), dtype=torch.uint8),
                "_scale": torch.full((1, out, inp // 16), byte, dtype=torch.uint8),
                "_scale_2": torch.tensor([g], dtype=torch.float32)}
    kw = {}
    for n, (c, b, o, i, g) in {"w1": (code1, byte1, I, D, g13), "w3": (code3, byte3, I, D, g13),
                               "w2": (code2, byte2, D, I, g2)}.items():
        kw.update({n + k: v for k, v in proj(c, b, o, i, g).items()})
    return kw


def test_hand_computed_single_expert():
    """W1 = e2m1 1.0 (code 2) x OCP 1.0 (byte 0x38) x 0.5 = 0.5, W3 = 1.0 x 2.0 (0x40) x 0.5 = 1.0, W2 = 0.5 (code 1)
    x 1.0 x 1.0; x = 0.25: g = 16 * 0.5 * 0.25 = 2, u = 4, a = SiLU(2) * 4, y_i = w * 16 * 0.5 * a."""
    kw = _one_expert(2, 0x38, 2, 0x40, 1, 0x38, 0.5, 1.0)
    x = torch.full((1, 16), 0.25)
    w = 0.75
    y = experts_nvfp4_golden(x, torch.tensor([[0]]), torch.tensor([[w]]), **kw, w13_input_scale=torch.ones(1),
                             w2_input_scale=torch.ones(1), limit=10.0)["y"]
    a = 2.0 / (1.0 + math.exp(-2.0)) * 4.0
    torch.testing.assert_close(y, torch.full((1, 16), w * 8.0 * a), rtol=2**-22, atol=0)
    # the clamp: g = 16 * 0.5 * 2 = 16 > 10 -> SiLU(10); u = 32 -> 10
    y = experts_nvfp4_golden(torch.full((1, 16), 2.0), torch.tensor([[0]]), torch.tensor([[1.0]]), **kw,
                             w13_input_scale=torch.ones(1), w2_input_scale=torch.ones(1), limit=10.0)["y"]
    torch.testing.assert_close(y, torch.full((1, 16), 8.0 * 10.0 / (1 + math.exp(-10.0)) * 10.0), rtol=2**-22, atol=0)


def test_dropped_slots_contribute_nothing_and_fp64_agrees():
    for c in cases_for("moe.experts_nvfp4"):
        if c.tier != "fast":
            continue
        kw = c.make_inputs()
        y32 = experts_nvfp4_golden(**kw)["y"].double()
        y64 = experts_nvfp4_golden(**dict(kw, x=kw["x"].double(), weights=kw["weights"].double()))["y"]
        B = _bounds(kw)["fp64"]
        assert ((y32 - y64).abs() <= B).all(), c.id
        ids = kw["ids"].clone()
        ids[0] = -1
        y0 = experts_nvfp4_golden(**dict(kw, ids=ids))["y"]
        assert not y0[0].any(), c.id


@pytest.mark.parametrize("kind", ["normal", "wide", "clip"])
def test_act_quantiser_within_its_bound(kind):
    """vLLM's activation qdq against _qdq_bound, elementwise, with normal scales, scales spread into E4M3's
    subnormals and zero (blocks 2^-24 .. 1), and a calibration 4x below the data (scales saturate at 448, clip)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 256, generator=g)
    if kind == "wide":
        x = x * torch.exp2(-24 * torch.rand(64, 16, 1, generator=g)).repeat_interleave(16, -1).reshape(64, 256)
    x = x.to(torch.bfloat16).float()
    amax = float(x.abs().max()) / (4.0 if kind == "clip" else 1.0)
    ge = 6 * 448 / amax
    q = nvfp4_act_qdq(x, ge).double()
    e = _qdq_bound(x.double(), ge) * (1 + 2.0**-7)                # + the bf16 store of the result (2^-8 of |q|)
    assert ((q - x.double()).abs() <= e).all()
    if kind == "wide":
        s = (ge * x.reshape(64, 16, 16).abs().amax(-1) / 6).numpy().astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        assert ((s > 0) & (s < 8)).any() and (s == 0).any()          # the subnormal and zero scales were reached


def test_act_quantiser_is_exact_on_representable_blocks():
    """A block holding +-e2m1 values x 2^k with its amax at 6 x 2^k (a representable scale) comes back unchanged."""
    vals = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6] * 2) * torch.tensor([1.0] * 8 + [-1.0] * 8)
    for ge in (1.0, 2.0**-3, 2.0**4):   # scale bytes 2^k * ge: exact E4M3 powers of two, 2^-9 .. 256 (<= 448)
        x = torch.stack([vals * 2.0**k for k in range(-6, 6) if 2.0**-9 <= ge * 2.0**k <= 256])
        torch.testing.assert_close(nvfp4_act_qdq(x, ge), x, rtol=0, atol=0)


@pytest.mark.parametrize("name,bad,msg", [
    ("w1", lambda t: t.float(), "w1: expected packed e2m1 uint8"),
    ("w2_scale", lambda t: t[..., :-1], "w2_scale: expected E4M3 bytes uint8"),
    ("w3_scale_2", lambda t: t[:-1], "w3_scale_2: expected a float per expert"),
])
def test_malformed_tensor_refused_naming_it(name, bad, msg):
    kw = cases_for("moe.experts_nvfp4")[0].make_inputs()
    kw[name] = bad(kw[name])
    with pytest.raises(ValueError, match=msg):
        experts_nvfp4_golden(**kw)


def test_vllm_single_w13_global_scale_halves_w3_when_w1_and_w3_differ():
    """vLLM 0.32 keeps w13_weight_scale_2[:, 0] (w1's) for both halves (modelopt.py:1024-1032, a warning only). The
    cases give w1 and w3 one global scale; with w3 re-encoded at twice w1's global scale the checkpoint means the
    same weights (the golden is unchanged) but vLLM's reading of w3 (the emulation's weight decode) is exactly half:
    a x0.5 on w3. Shown on the weights: at the output the W4A4 serving bound is too loose to separate it (worst/bound
    0.40 on this case; noted in the report). Not a case row: a known divergence of a subject is declared in
    ci/expected-failures.toml against its failing rows, and at the output this one does not fail."""
    from conformance.cases.moe_nvfp4 import _served_weight
    from references.formats.nvfp4 import dequantize_nvfp4, quantize_nvfp4

    kw = [c for c in cases_for("moe.experts_nvfp4") if "/T7E8k4" in c.id][0].make_inputs()
    for e in range(kw["w3"].shape[0]):
        w3 = dequantize_nvfp4(kw["w3"][e], kw["w3_scale"][e], float(kw["w3_scale_2"][e]))
        g3 = float(kw["w1_scale_2"][e]) * 2
        p, sb, _ = quantize_nvfp4(w3, global_scale=g3)
        assert torch.equal(dequantize_nvfp4(p, sb, g3), w3)                 # the same weights, re-encoded exactly
        served = _served_weight(p, sb, kw["w1_scale_2"][e])                  # vLLM: w1's global scale
        torch.testing.assert_close(served, (w3 / 2).to(torch.bfloat16).float(), rtol=0, atol=0)
