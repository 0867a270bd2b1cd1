"""The derived RMS-error (calc_diff / cosine) limit (conformance.rms): rounding noise of the modelled size passes,
errors that hide inside the worst-case elementwise bound but exceed the quadrature model fail with a diagnosis,
small outputs are not judged (and say so); plugin mutants on attn.output and the random MoE experts."""

import dataclasses
import math
import re

import pytest
import torch

from conformance.cases import CASES, cases_for
from conformance.checks.numeric import run_numeric
from conformance.checks.routing import run_routing
from conformance.metrics import compare_float
from conformance.rms import K_RMS, N_MIN_RMS, SAFETY_CORRELATED
from conformance.subjects import load_subject
from conformance.tolerances import Tolerance

from .test_systematic import Scaled

UB = 2.0**-8
RMS_FAIL = re.compile(r"calc_diff \S+ > limit \S+ \(RMS error \S+x the rounding model's")


def _tol(steps: int) -> Tolerance:
    """``steps`` bf16 roundings relative to |want|: worst case steps*ub, quadrature steps*ub^2/3."""
    return Tolerance(0.0, steps * UB, f"{steps} bf16 roundings").with_rms(
        ms_rel=steps * UB**2 / 3, derivation=f"{steps} ub^2/3")


def test_modelled_rounding_noise_passes_and_a_gain_inside_the_bound_fails():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 512, generator=g, dtype=torch.float64)
    rne = w.float().to(torch.bfloat16).double()      # one bf16 rounding: the model's expectation
    c = compare_float(rne, w, _tol(1), output="y", level="serving")
    assert c.verdict == "pass" and 0.5 < c.metrics["rms_vs_model"] < 1.2, c.message
    assert c.bounds["calc_diff"] > c.metrics["calc_diff"]
    # a gain of 4 bf16 units on every element: 0.5x of an 8-step elementwise bound, 4x the 1-step RMS model
    bad = compare_float(w * (1 + 4 * UB), w, _tol(8), output="y", level="serving")
    assert bad.metrics["worst_over_bound"] < 1, bad.message
    assert bad.verdict == "fail" and RMS_FAIL.search(bad.message), bad.message
    # the same data at fp64 (measured, not judged): no calc_diff bound
    assert "calc_diff" not in compare_float(w * (1 + 4 * UB), w, _tol(8), output="y", level="fp64").bounds


def test_the_allowance_is_derived_from_n_and_the_safety_factor():
    w = torch.randn(N_MIN_RMS, dtype=torch.float64)
    c = compare_float(w, w, _tol(1), output="y", level="serving")
    expected = UB**2 / 3 * float((w * w).sum())
    limit = c.bounds["calc_diff"] * 2 * float((w * w).sum())
    assert math.isclose(limit, expected * (1 + K_RMS * math.sqrt(2 / N_MIN_RMS)) * SAFETY_CORRELATED, rel_tol=1e-9)


def test_small_outputs_are_not_judged_and_say_so():
    w = torch.randn(N_MIN_RMS - 1, dtype=torch.float64)
    c = compare_float(w * 1.01, w, _tol(4), output="y", level="serving")
    assert "calc_diff" not in c.bounds
    assert f"RMS limit not judged: n = {N_MIN_RMS - 1} < N_min = {N_MIN_RMS}" in c.message, c.message


def _pow2_trunc(v):
    s = v.abs().amax().item()
    return 2.0 ** math.floor(math.log2(s)) / s


def test_power_of_two_scale_truncation_fails_at_the_serving_level():
    """issue #16: the o-projection's power-of-two scale truncation passed at serving (elementwise 0.32x); the RMS
    limit fails it there, naming calc_diff, the limit and the gain."""
    rows = [r for case in cases_for("attn.output") if case.tier == "fast"
            for r in run_numeric(Scaled("attn.output", _pow2_trunc, "pow2-scale"), case) if r.level == "serving"]
    assert rows
    for r in rows:
        assert r.verdict == "fail" and RMS_FAIL.search(r.message), r.message
        assert r.metrics["y.worst_over_bound"] < 1   # invisible elementwise
    big = [r for r in rows if "t37" in r.case_id]
    assert big and "least-squares gain-1 -0.49" in big[0].message, big[0].message


@pytest.mark.parametrize("name", ["reference", "emulated:gfx942", "emulated:ocp"])
@pytest.mark.parametrize("component", ["attn.output", "norm.rms", "indexer.scores"])
def test_correct_subjects_stay_within_the_rms_limit(name, component):
    s = load_subject(name)
    for case in cases_for(component):
        if case.tier != "fast":
            continue
        for r in run_numeric(s, case):
            assert r.verdict == "pass", r.message
            for k, lim in r.bounds.items():
                if k.endswith("calc_diff"):
                    assert r.metrics[k] <= lim, (r.case_id, r.level, r.metrics[k], lim)


def test_fp8_intermediate_experts_are_caught_by_the_rms_limit_inside_the_elementwise_bound():
    """The FP8 (per-tensor) intermediate of a less accurate MoE backend sits below the random-expert elementwise
    bound on the rows without a token-magnitude spread; its RMS error (2^-4 against 2^-8 rounding) is not."""
    from tests.routing import mutants as Mu

    s = Mu.less_accurate_experts("fp8_intermediate_per_tensor")
    row = "moe.experts/T1E16k6D64I32/random-gain1.5-uniform/s450"
    by = {r.level: r for r in run_routing(s, CASES[row])}
    assert by["serving"].metrics["y.worst_over_bound"] < 1, by["serving"].message
    assert by["serving"].verdict == "fail" and RMS_FAIL.search(by["serving"].message), by["serving"].message
    good = {r.level: r for r in run_routing(load_subject("emulated:gfx942"), CASES[row])}
    assert good["serving"].verdict == "pass", good["serving"].message


def _scores_q_fp32_scale(q, k, w):
    """An indexer whose q quantiser takes the scale amax / fmax in fp32 (per-token-group quantisation without
    ue8m0) where the fused indexer-q kernel rounds it up to a power of two (fused_indexer_q.py:163): every q code is
    still one e4m3 rounding of the bf16 value, on a different grid than the serving path's. (A power-of-two scale
    of another block size would not do: it shifts the exponent and keeps every normal code.)"""
    from conformance.cases.indexer import idx_scores
    from references.components.qat import quant_indexer
    from references.numerics import serving

    n = serving("ocp")
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    q8 = quant_indexer(bf(q), dataclasses.replace(n.indexer_q, scale_fmt="fp32"), False)
    return idx_scores(q8, quant_indexer(bf(k), n.indexer_k, False), bf(w))


def test_indexer_scores_fp8_codes_off_the_serving_grid_fail_at_the_emulated_level_only():
    """issue #16 triage: the scores' emulation now holds q and K in FP8 as the serving path does
    (cases/indexer.py _emulate_scores). A q quantised with an fp32 scale is as accurate (serving: pass, inside the
    e4m3 terms of the model), but its codes are not the serving path's: the emulated RMS limit fails it while the
    elementwise bound does not."""
    from .test_component_mutants import Mutant

    for case in cases_for("indexer.scores"):
        if case.tier != "fast":
            continue
        by = {r.level: r for r in run_numeric(Mutant("indexer.scores", _scores_q_fp32_scale), case)}
        assert by["serving"].verdict == "pass", by["serving"].message
        bad = by["emulated"]
        assert bad.verdict == "fail" and RMS_FAIL.search(bad.message), bad.message
        assert bad.metrics["scores.worst_over_bound"] < 1, bad.message


def test_the_report_names_the_calc_diff_limit_of_a_failing_row():
    from reports.render import measured_vs_allowed

    w = torch.randn(64, 512, dtype=torch.float64)
    c = compare_float(w * (1 + 4 * UB), w, _tol(8), output="y", level="serving")
    row = {"metrics": {f"y.{k}": v for k, v in c.metrics.items()}, "bounds": {f"y.{k}": v for k, v in c.bounds.items()}}
    assert measured_vs_allowed(row).startswith("y.calc_diff = "), measured_vs_allowed(row)
