"""RMS (calc_diff) models of the components that had only the one-step fallback (conformance.rms MODELS,
docs/rms-limits.md "Models of the former fallback components"): a mutant with a small systematic error stays
inside the elementwise bound on most rows but fails the derived RMS limit, with a message naming the component,
the calc_diff, the limit and the RMS ratio; the correct implementations stay within it."""

import math
import re

import pytest
import torch

from conformance.cases import cases_for
from conformance.cases.linear import W_SPECS
from conformance.checks.numeric import run_numeric
from conformance.subjects import Impl, SubjectInfo, load_subject
from conformance.subjects.base import Subject
from references.formats.blockscale import dequantize_fp8, quantize_fp8
from references.numerics import serving

RMS_FAIL = re.compile(r"calc_diff (\S+) > limit (\S+) \(RMS error (\S+)x the rounding model's, allowed (\S+)x")


def _pow2_truncated_act(x: torch.Tensor) -> torch.Tensor:
    """gfx942's 1x128 FP8 activation quantisation at the exact fp32 scale s = amax/224, dequantised with the scale
    truncated to a power of two (2^floor(log2 s): an e8m0 store that floors instead of keeping the fp32 scale):
    each group's values shrink by a gain in (0.5, 1]."""
    act = serving("gfx942").linear_act
    codes, s = quantize_fp8(x.to(torch.bfloat16).float(), act)
    return dequantize_fp8(codes, torch.exp2(torch.floor(torch.log2(s))), act)


def linear_act_scale_pow2_truncated(x, weight, weight_scale, *, weight_block=128):
    w = dequantize_fp8(weight, weight_scale, W_SPECS[weight_block])
    return {"y": (_pow2_truncated_act(x) @ w.T).to(torch.bfloat16).float()}


class Wrapped(Subject):
    """emulated:gfx942 for ``component`` with ``change(kwargs, out) -> out`` applied (a deliberately broken
    implementation, kept in tests/)."""

    def __init__(self, component, fn, name):
        self.component, self.fn, self.name = component, fn, f"mutant:{name}"

    def info(self):
        return SubjectInfo(self.name, "deliberately broken", "cpu", "float8_e4m3fnuz", False, profile="gfx942")

    def provides(self):
        return {self.component: Impl(self.fn, function=f"mutant.{self.name}", backend="torch")}


def _base(component):
    return load_subject("emulated:gfx942").provides()[component].fn


def head_logit_gain(*a, **kw):
    """The logits 2^-6 small on every element (a final-norm weight folded into the bf16 head weight with a
    gain error of 1.6%: a plain systematic gain, invisible elementwise)."""
    out = _base("head.lm")(*a, **kw)
    return {"logits": (out["logits"] * (1 - 2.0**-6)).to(torch.bfloat16).float()}


def shared_down_act_scale_pow2_truncated(x, w1, w3, w2, *, limit):
    """The shared expert as served on gfx942, but the down projection's activation a dequantised with its 1x128
    FP8 scale truncated to a power of two (gain in (0.5, 1] per group of 128 channels)."""
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    act = serving("gfx942").linear_act
    xq = dequantize_fp8(*quantize_fp8(bf(x), act), act)
    g, u = bf(xq @ w1.float().T), bf(xq @ w3.float().T)
    a = bf(torch.nn.functional.silu(g.clamp(max=limit)) * u.clamp(-limit, limit))
    return {"y": bf(_pow2_truncated_act(a) @ w2.float().T)}


def engram_fp8_key(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, token_mask, *, eps,
                   wkv_scale=None):
    """engram.memory as served on gfx942, but the key half of kv quantised to MXFP8 (e4m3fn, 1x32 groups,
    power-of-two scale) before the gate's dot where bf16 is served: an FP8 intermediate; the value stays bf16."""
    from conformance.cases.engram import engram_gate, engram_lookup, wkv_weight
    from conformance.cases.linear import MX_ACT, _mxfp8_serving

    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    rows = bf(engram_lookup(hash_ids, table, table_scale, dialect="float8_e4m3fn"))
    T, hc, D = stream.shape
    if wkv_scale is not None:
        kv = _mxfp8_serving("gfx942", rows.reshape(T, -1), wkv, wkv_scale)["y"]
    else:
        kv = bf(rows.reshape(T, -1) @ bf(wkv_weight(wkv, None)).T)
    kv = torch.cat((dequantize_fp8(*quantize_fp8(kv[:, :hc * D], MX_ACT), MX_ACT), kv[:, hc * D:]), 1)
    out = engram_gate(bf(stream), kv, bf(q_weight), bf(k_weight), token_mask, eps=eps)
    return {"rows": rows, "out": bf(out)}


def _bf16_truncated(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by dropping the low 16 bits (round toward zero) instead of round-to-nearest-even."""
    return (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


def engram_out_truncated_to_bf16(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, token_mask, *,
                                 eps, wkv_scale=None):
    """engram.memory as served on gfx942 (bf16 rows, bf16 wkv GEMM or the MXFP8 linear, fp32 gate), but out
    converted to bf16 by truncation (round toward zero): an error in [0, 1 ulp) toward zero on every element,
    twice the RMS of round-to-nearest, inside the per-element bound where the gate and value terms add to it."""
    from conformance.cases.engram import engram_gate, engram_lookup, wkv_weight
    from conformance.cases.linear import _mxfp8_serving

    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    rows = bf(engram_lookup(hash_ids, table, table_scale, dialect="float8_e4m3fn"))
    T = stream.shape[0]
    if wkv_scale is not None:
        kv = _mxfp8_serving("gfx942", rows.reshape(T, -1), wkv, wkv_scale)["y"]
    else:
        kv = bf(rows.reshape(T, -1) @ bf(wkv_weight(wkv, None)).T)
    out = engram_gate(bf(stream), kv, bf(q_weight), bf(k_weight), token_mask, eps=eps)
    return {"rows": rows, "out": _bf16_truncated(out)}


def engram_value_gain(*a, **kw):
    """out = stream + gate * value with the gated value 2^-6 small on every element (a constant folded in with a
    gain error)."""
    out = _base("engram.memory")(*a, **kw)
    x = kw["stream"].float()
    return {"rows": out["rows"], "out": (x + (out["out"] - x) * (1 - 2.0**-6)).to(torch.bfloat16).float()}


MUTANTS = [("linear.fp8_block", linear_act_scale_pow2_truncated),
           ("head.lm", head_logit_gain),
           ("moe.shared_expert", shared_down_act_scale_pow2_truncated),
           ]


def _rows(subject, component, level="serving"):
    return [r for case in cases_for(component) if case.tier == "fast"
            for r in run_numeric(subject, case) if r.level == level]


@pytest.mark.parametrize("component,fn", MUTANTS, ids=[f"{c}:{f.__name__}" for c, f in MUTANTS])
def test_small_systematic_mutant_fails_the_rms_limit_inside_the_elementwise_bound(component, fn):
    rows = _rows(Wrapped(component, fn, fn.__name__), component)
    assert rows
    caught_only_by_rms = []
    for r in rows:
        m = RMS_FAIL.search(r.message)
        wob = max(v for k, v in r.metrics.items() if k.endswith("worst_over_bound"))
        print(r.case_id, r.verdict, f"elementwise {wob:.3g}x", m.groups() if m else "-")
        if m and wob < 1:
            assert r.verdict == "fail" and component in r.message and r.case_id in r.message, r.message
            assert float(m.group(3)) > float(m.group(4)), r.message
            caught_only_by_rms.append(r.case_id)
    assert caught_only_by_rms, f"{fn.__name__}: no row where only the RMS limit catches it"


def test_engram_value_gain_fires_the_rms_limit_with_its_diagnosis():
    """engram.memory's elementwise bound is a per-element propagation of ub-sized terms (tight), so a small
    systematic error that stays inside it stays inside the RMS limit too (the truncated-bf16 out and the MXFP8 key
    mutants above: docs/rms-limits.md); a 2^-6 gain on the gated value fires the RMS limit beside the
    elementwise bound, with the message naming component, calc_diff, limit and ratio."""
    rows = _rows(Wrapped("engram.memory", engram_value_gain, "engram_value_gain"), "engram.memory")
    fired = [r for r in rows if RMS_FAIL.search(r.message)]
    assert fired, [r.message for r in rows]
    for r in fired:
        m = RMS_FAIL.search(r.message)
        assert r.verdict == "fail" and "engram.memory" in r.message and float(m.group(3)) > float(m.group(4))


@pytest.mark.parametrize("name", ["reference", "emulated:gfx942", "emulated:ocp"])
def test_correct_subjects_stay_within_the_new_rms_limits(name):
    s = load_subject(name)
    for component in ("linear.fp8_block", "head.lm", "moe.shared_expert", "engram.memory"):
        for case in cases_for(component):
            if case.tier != "fast":
                continue
            for r in run_numeric(s, case):
                assert r.verdict == "pass", r.message
                for k, lim in r.bounds.items():
                    if k.endswith("calc_diff"):
                        assert r.metrics[k] <= lim, (r.case_id, r.level, r.metrics[k], lim)


def test_the_excess_term_models_the_random_sum_part_of_the_scale():
    """``Tolerance.ms_excess``: E = ms_excess * sum (s - |want|)^2. Errors uniform in +-u Q on a scale Q + |y| sit at
    RMS ~1x the model u^2/3 Q^2 and pass; twice that RMS fails, inside an elementwise bound of 6 u (Q + |y|)."""
    from conformance.metrics import compare_float
    from conformance.tolerances import Tolerance

    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 256, generator=g, dtype=torch.float64)
    Q = 0.5 + torch.rand(64, 256, generator=g, dtype=torch.float64)
    u = 2.0**-4
    d = (2 * torch.rand(64, 256, generator=g, dtype=torch.float64) - 1) * u * Q
    tol = Tolerance(0.0, 6 * u, "6 u (Q + |y|)").with_rms(ms_excess=u * u / 3, derivation="u^2/3 Q^2")
    ok = compare_float(w + d, w, tol, output="y", scale=Q + w.abs(), level="serving")
    assert ok.verdict == "pass" and 0.9 < ok.metrics["rms_vs_model"] < 1.1, ok.message
    bad = compare_float(w + 2 * d, w, tol, output="y", scale=Q + w.abs(), level="serving")
    assert bad.metrics["worst_over_bound"] < 1 and bad.verdict == "fail", bad.message
    m = RMS_FAIL.search(bad.message)
    assert m and 1.9 < float(m.group(3)) < 2.1, bad.message
    # E is exactly u^2/3 sum (s - |y|)^2 = u^2/3 sum Q^2
    assert math.isclose(ok.metrics["rms_vs_model"] ** 2 * (u * u / 3) * float(Q.square().sum()),
                        float(d.square().sum()), rel_tol=1e-9)
