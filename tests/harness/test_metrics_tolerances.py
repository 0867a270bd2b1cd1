"""Metrics and verdict tiers: each tier reachable, bounds derived, messages diagnose."""

import math

import pytest
import torch

from conformance.metrics import calc_diff, compare_exact, compare_float, compare_index_sets
from conformance.tolerances import Tolerance, dot_tolerance, elementwise_tolerance, gamma, unit_roundoff

TOL = Tolerance(0.0, 1e-3, "test bound 1e-3 relative")


def _want():
    return torch.linspace(1, 2, 1000).reshape(10, 100)


def test_pass_when_within_bound():
    w = _want()
    c = compare_float(w * (1 + 5e-4), w, TOL, output="y", label="[comp | case]")
    assert c.verdict == "pass", c.message
    assert c.metrics["worst_over_bound"] == pytest.approx(0.5, rel=1e-3)


def test_degraded_few_small_violations():
    w = _want()
    g = w.clone()
    g[3, 7] *= 1 + 2e-3  # one element at 2x the bound
    c = compare_float(g, w, TOL, output="y", label="[comp | case]")
    assert c.verdict == "degraded", c.message
    assert c.worst["index"] == [3, 7]


def test_fail_names_worst_element_and_bound():
    w = _want()
    g = w * (1 + 5e-3)
    g[9, 99] = w[9, 99] * 1.2
    c = compare_float(g, w, TOL, output="y", label="[rms_norm | case-7]")
    assert c.verdict == "fail"
    assert c.worst["index"] == [9, 99]
    for part in ("[rms_norm | case-7]", "1000 / 1000", "[9, 99]", "allowed", "test bound 1e-3"):
        assert part in c.message, (part, c.message)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_catastrophic_on_nonfinite(bad):
    w = _want()
    g = w.clone()
    g[0, 0] = bad
    c = compare_float(g, w, TOL, output="y")
    assert c.verdict == "catastrophic" and "NaN/Inf" in c.message


def test_catastrophic_on_error_above_half_reference_magnitude():
    w = _want()
    c = compare_float(w * 2.5, w, TOL, output="y")
    assert c.verdict == "catastrophic"


def test_shape_mismatch_is_structure_failure():
    c = compare_float(torch.zeros(3, 4), torch.zeros(4, 3), TOL, output="y")
    assert c.verdict == "fail" and "shape" in c.message


def test_exact_fp8_message_decodes_both_dialects():
    w = torch.tensor([0x38, 0x40], dtype=torch.uint8)
    g = torch.tensor([0x38, 0x38], dtype=torch.uint8)
    c = compare_exact(g, w, output="codes", fp8_format="float8_e4m3fnuz")
    assert c.verdict == "fail"
    assert "0x38 s=0 e=0111 m=000" in c.message and "float8_e4m3fn)" in c.message, c.message


def test_index_sets_ignore_order_and_flag_difference():
    w = torch.tensor([[1, 2, 3], [4, 5, -1]])
    assert compare_index_sets(torch.tensor([[3, 2, 1], [5, 4, -1]]), w, output="idx").verdict == "pass"
    c = compare_index_sets(torch.tensor([[3, 2, 1], [5, 6, -1]]), w, output="idx")
    assert c.verdict == "fail" and "row 1" in c.message


def test_index_sets_near_ties_reported_not_failed():
    scores = torch.tensor([[5.0, 4.0, 3.0, 3.0 - 1e-7]])
    w = torch.tensor([[0, 1, 2]])
    c = compare_index_sets(torch.tensor([[0, 1, 3]]), w, output="idx", scores=scores, tie_window=1e-6)
    assert c.verdict == "pass" and c.metrics["near_tie_rows"] == 1


def test_calc_diff_properties():
    x = torch.randn(1000, dtype=torch.float64)
    assert calc_diff(x, x) == pytest.approx(0.0, abs=1e-15)
    assert calc_diff(x, -x) == pytest.approx(2.0)
    assert 0 < calc_diff(x, x * 1.01) < 1e-4


def test_tolerance_derivations_and_join():
    assert unit_roundoff(torch.bfloat16) == 2.0**-8
    assert gamma(10, 2.0**-24) == pytest.approx(10 * 2.0**-24, rel=1e-6)
    t = dot_tolerance(4096, "float32", "bfloat16")
    assert t.rtol == pytest.approx(6 * math.sqrt(4096) * 2.0**-24 + 2.0**-8)
    assert "4096" in t.derivation and "bfloat16" in t.derivation
    e = elementwise_tolerance(3)
    j = e.join(Tolerance(0.0, 0.0, "explicit zero"), "override")
    assert j.rtol == e.rtol  # a join never lowers a bound silently, and an explicit 0 stays 0 on its own
    assert Tolerance(0.0, 0.0, "x").rtol == 0.0
