"""moe.experts_nvfp4's derived RMS (calc_diff) model (``conformance.cases.moe_nvfp4.rms_variance``,
docs/rms-limits.md "moe.experts_nvfp4"): the correct implementations stay within the new limit, and a served
W4A4 path with a small systematic error in the activation quantiser, invisible to the elementwise bound, fails it
with a message naming calc_diff, the limit and the RMS ratio; the existing misreading mutants are still caught."""

import re

import numpy as np
import torch

from conformance.cases import cases_for
from conformance.cases import moe_nvfp4 as nv
from conformance.checks.numeric import run_numeric
from conformance.subjects import Impl, SubjectInfo, load_subject
from conformance.subjects.base import Subject
from references.formats.minifloat import FLOAT4_E2M1FN

COMPONENT = "moe.experts_nvfp4"
RMS_FAIL = re.compile(r"calc_diff (\S+) > limit (\S+) \(RMS error (\S+)x the rounding model's, allowed (\S+)x")


def _bf(t):
    return t.to(torch.bfloat16).float()


def _act_qdq_scale_truncated(x, g_enc):
    """vLLM's NVFP4 activation quantise-dequantise, but the E4M3 block scale rounded toward zero (the mantissa
    truncated: a float -> e4m3 conversion that chops instead of rounding to nearest even): every block's scale
    is low by up to one E4M3 ulp (2^-3 relative), mean ~2^-4.5, so the block's amax clips past 6 and the grid
    shrinks: a small systematic error per block."""
    M, K = x.shape
    g = torch.tensor(g_enc, dtype=torch.float32)
    b = x.float().reshape(M, K // 16, 16)
    s_star = (g * (b.abs().amax(-1) * torch.tensor(1.0 / 6.0))).clamp(-448.0, 448.0)
    s_rne = s_star.to(torch.float8_e4m3fn).float()
    down = s_rne > s_star            # RNE went up: step one e4m3 value down (toward zero)
    s_tr = torch.where(down, (s_rne.to(torch.float8_e4m3fn).view(torch.uint8) - 1).view(torch.float8_e4m3fn).float(),
                       s_rne)
    s_tr = torch.where(s_rne == 0, s_rne, s_tr)
    osc = torch.where(s_tr == 0, torch.zeros_like(s_tr), g / s_tr)[..., None]
    v = (b * osc).clamp(-6.0, 6.0)
    q = torch.from_numpy(FLOAT4_E2M1FN.decode(FLOAT4_E2M1FN.encode(v.double().numpy())).astype(np.float32))
    return _bf((q * (s_tr / g)[..., None]).reshape(M, K))


def _served(act_qdq):
    """vLLM 0.32's EMULATION experts (as ``moe_nvfp4._emulate``) with ``act_qdq`` in place of the activation
    quantiser, for both GEMMs."""
    def experts_nvfp4(x, ids, weights, w1, w1_scale, w1_scale_2, w3, w3_scale, w3_scale_2, w2, w2_scale, w2_scale_2,
                      w13_input_scale, w2_input_scale, *, limit, out=None):
        g1 = 1.0 / float(w13_input_scale.float().max())
        g2 = 1.0 / float(w2_input_scale.float().max())
        xq = act_qdq(_bf(x), g1)
        local = nv._local_ids(ids, None)
        T, k = ids.shape
        contrib = torch.zeros(T, k, x.shape[1])
        for e in torch.unique(local[local >= 0]).tolist():
            tok, slot = torch.nonzero(local == e, as_tuple=True)
            W1 = nv._served_weight(w1[e], w1_scale[e], w1_scale_2[e])
            W3 = nv._served_weight(w3[e], w3_scale[e], w1_scale_2[e])
            W2 = nv._served_weight(w2[e], w2_scale[e], w2_scale_2[e])
            xe = xq[tok]
            g, u = _bf(xe @ W1.T), _bf(xe @ W3.T)
            a = _bf(torch.nn.functional.silu(g.clamp(max=limit)) * u.clamp(-limit, limit))
            contrib[tok, slot] = _bf((act_qdq(a, g2) @ W2.T) * weights[tok, slot].float()[:, None])
        return {"y": _bf(contrib.sum(1))}
    return experts_nvfp4


nvfp4_act_scale_truncated = _served(_act_qdq_scale_truncated)
nvfp4_act_scale_truncated.__name__ = "nvfp4_act_scale_truncated"


class Wrapped(Subject):
    def __init__(self, fn):
        self.fn, self.name = fn, f"mutant:{fn.__name__}"

    def info(self):
        return SubjectInfo(self.name, "deliberately broken", "cpu", "float8_e4m3fnuz", False, profile="gfx942")

    def provides(self):
        return {COMPONENT: Impl(self.fn, function=f"mutant.{self.name}", backend="torch")}


def _rows(subject, tier="fast"):
    return {c.id: run_numeric(subject, c) for c in cases_for(COMPONENT) if c.tier == tier}


def _act_qdq_per32(x, g_enc):
    """vLLM's NVFP4 activation quantise-dequantise with one scale per 32 values (the amax of two neighbouring
    16-blocks): a coarser grid for the smaller block of each pair."""
    M, K = x.shape
    b = x.float().reshape(M, K // 32, 32)
    amax = b.abs().amax(-1, keepdim=True).expand(M, K // 32, 32).reshape(M, K)
    # the block of 16 quantised at its pair's amax: scale the pair's amax into the block (quantiser sees amax)
    xb = x.float().reshape(M, K // 16, 16)
    s_in = amax.reshape(M, K // 16, 16)[..., :1]
    lead = torch.cat([xb, s_in], -1)   # 17 values; the 17th only sets the amax
    return _qdq_with_amax(x, lead, g_enc)


def _qdq_with_amax(x, lead, g_enc):
    M, K = x.shape
    g = torch.tensor(g_enc, dtype=torch.float32)
    amax = lead.abs().amax(-1)
    s = (g * (amax * torch.tensor(1.0 / 6.0))).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
    osc = torch.where(s == 0, torch.zeros_like(s), g / s)[..., None]
    v = (x.float().reshape(M, K // 16, 16) * osc).clamp(-6.0, 6.0)
    q = torch.from_numpy(FLOAT4_E2M1FN.decode(FLOAT4_E2M1FN.encode(v.double().numpy())).astype(np.float32))
    return _bf((q * (s / g)[..., None]).reshape(M, K))


nvfp4_act_scale_per_32 = _served(_act_qdq_per32)
nvfp4_act_scale_per_32.__name__ = "nvfp4_act_scale_per_32"


def _rms(r):
    m = RMS_FAIL.search(r.message)
    return None if m is None else tuple(float(v) for v in m.groups())


def test_correct_subjects_stay_within_the_nvfp4_rms_limit():
    """reference, emulated:gfx942 and emulated:ocp pass every fast row, and the serving level is judged by the
    derived model (a calc_diff limit below 1: the one-step fallback's was ~9, vacuous)."""
    for name in ("reference", "emulated:gfx942", "emulated:ocp"):
        for cid, rows in _rows(load_subject(name)).items():
            for r in rows:
                assert r.verdict == "pass", (name, cid, r.message)
                if r.level == "serving":
                    assert "rms_variance" in r.derivation["y"], r.derivation
                    assert r.bounds["y.calc_diff"] < 0.5, (name, cid, r.bounds)
                    assert r.metrics["y.rms_vs_model"] < 1.0, (name, cid, r.metrics)


def test_activation_scale_per_32_caught_by_the_rms_limit_only():
    """The activation quantiser with one scale per 32 values (the served weights and everything else correct):
    as accurate at serving (RMS 0.72x - 0.95x the model, pass), but off the serving grid: at the emulated level
    the T33 row (elementwise 0.90x) fails on calc_diff 0.0187 > limit 0.0134 (RMS 3.68x); the blocks-wide row fails
    elementwise; the rows with few flip events stay within the flip-count allowance (RMS 1.8x - 3.5x)."""
    rows = _rows(Wrapped(nvfp4_act_scale_per_32))
    hit = [cid for cid, rr in rows.items() for r in rr if r.level == "emulated" and _rms(r)
           and r.metrics["y.worst_over_bound"] < 1]
    assert any("T33E8k4D128I64/normal" in c for c in hit), {c: [r.message for r in rr] for c, rr in rows.items()}
    for cid in hit:
        r = next(r for r in rows[cid] if r.level == "emulated")
        cd, lim, ratio, allowed = _rms(r)
        assert cd > lim and ratio > allowed > 1, r.message
        assert f"{COMPONENT} | {cid}" in r.message and "on y" in r.message, r.message
    for cid, rr in rows.items():
        assert next(r for r in rr if r.level == "serving").verdict == "pass", cid   # as accurate: not a serving bug


def test_weight_scale_per_32_caught_at_serving_by_the_rms_limit():
    """The existing misreading mutant (weight scale bytes read as 32-value groups) on the one-token decode row:
    elementwise pass at serving and only degraded at emulated, but the derived serving RMS limit fails it (calc_diff
    0.088 > 0.0546, RMS 2.35x, allowed 1.85x) with the diagnosis naming the misreading."""
    from tests.harness.test_new_component_mutants import nvfp4_scale_per_32

    case = next(c for c in cases_for(COMPONENT) if c.id.startswith(f"{COMPONENT}/T1E8k2D64I64/normal"))
    rows = run_numeric(Wrapped(nvfp4_scale_per_32), case)
    serving = next(r for r in rows if r.level == "serving")
    assert serving.verdict == "fail" and serving.metrics["y.worst_over_bound"] < 1, serving.message
    cd, lim, ratio, allowed = _rms(serving)
    assert cd > lim and ratio > allowed, serving.message
    assert "diagnosis: matches one scale per 32 values" in serving.message, serving.message


def test_qdq_moments_hand_computed_block():
    """One block of 16 at g = 1 with amax 6: s* = 1 (its E4M3 cell 2^-3: E[s^2] = 1 + 2^-6/12), each value's
    variance that factor x cell^2/12 with the e2m1 cell it lands in (0.5 below 2, 1 below 4, 2 up to 6); a block
    whose s* is below 2^-10 encodes as zeros (variance v^2); a block clamped at 448 clips beyond 6 sigma."""
    vals = [6.0, 1.2, 2.5, 5.0, 0.2] + [0.0] * 11
    cells = [2.0, 0.5, 1.0, 2.0, 0.5] + [0.5] * 11
    f = 1 + 2.0**-6 / 12
    var, cell, sig = nv._qdq_moments(torch.tensor([vals], dtype=torch.float64), 1.0)
    assert torch.allclose(var[0], torch.tensor([f * c * c / 12 for c in cells], dtype=torch.float64))
    assert cell[0].tolist() == cells and torch.allclose(sig[0], torch.full((16,), f**0.5, dtype=torch.float64))
    tiny = torch.tensor([[3e-4] + [1e-4] * 15], dtype=torch.float64)     # s* = 5e-5 < 2^-10
    assert torch.equal(nv._qdq_moments(tiny, 1.0)[0], tiny.square())
    big = torch.tensor([[5376.0] + [0.0] * 15], dtype=torch.float64)    # s* = min(896, 448) = 448, exact
    v = nv._qdq_moments(big, 1.0)[0][0]
    assert float(v[0]) == (5376.0 - 6 * 448.0) ** 2 + 448.0**2 * 4 / 12
    assert float(v[1]) == 448.0**2 * 0.25 / 12


def test_qdq_moments_bound_the_measured_quantisation_error():
    """The per-code model against vLLM's quantiser (``nvfp4_act_qdq``) on 4096 x 256 seeded values: the measured
    sum of squared errors is at most the model's and not far below it (normal 0.77, uniform 0.89: the block's own
    amax lands on 6 exactly, with no error, and the top cell's density falls), and equal where every block clips."""
    g = torch.Generator().manual_seed(0)
    for x, lo in ((torch.randn(4096, 256, generator=g), 0.7), (torch.rand(4096, 256, generator=g) * 2 - 1, 0.8)):
        x = x.to(torch.bfloat16).float()
        for g_enc, lo_c in ((448 * 6 / float(x.abs().max()), lo), (448 * 6e4 / float(x.abs().max()), 0.999)):
            sse = float((nv.nvfp4_act_qdq(x, g_enc).double() - x.double()).square().sum())
            model = float(nv._qdq_moments(x.double(), g_enc)[0].sum())
            assert lo_c * model <= sse <= 1.001 * model, (g_enc, sse / model)


def test_fnuz_scale_reading_now_fails_the_serving_rms_limit():
    """The checkpoint's OCP scale bytes read as fnuz (x0.5 per weight scale: y x 0.25) sat inside the loose W4A4
    elementwise bound at serving (0.53x - 0.82x) and was caught there only through the catastrophic rule; the
    derived RMS limit now fails it on every fast row (RMS 2.8x - 4.6x the model, allowed 1.5x - 1.85x)."""
    from tests.harness.test_new_component_mutants import nvfp4_scales_read_as_fnuz

    for cid, rows in _rows(Wrapped(nvfp4_scales_read_as_fnuz)).items():
        serving = next(r for r in rows if r.level == "serving")
        assert serving.metrics["y.worst_over_bound"] < 1, (cid, serving.message)
        cd, lim, ratio, allowed = _rms(serving)
        assert cd > lim and ratio > allowed, serving.message
