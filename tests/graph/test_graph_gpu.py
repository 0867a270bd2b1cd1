"""The graph-replay suite on a real CUDA / ROCm device: reference components pass bitwise, mutants are caught
with the cause named. Skipped (with the reason) where no device exists; CPU runs report needs-gpu instead."""

from __future__ import annotations

import pytest

from conformance.checks import graph as G

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not G.graph_device_available(),
                                                  reason="needs a CUDA or ROCm device (graph capture)")]


@pytest.mark.parametrize("name", sorted(G.reference_cases()))
def test_reference_component_replays_bitwise(name):
    rep = G.run_graph_case(name, n_inputs=12, n_replays=3, n_processes=2)
    assert rep.verdict == "pass", (rep.causes, rep.evidence)
    assert rep.rates["not_bitwise"]["n"] == 0 and rep.rates["capture_fail"]["n"] == 0


@pytest.mark.parametrize("name", sorted(set(G.all_cases()) - set(G.reference_cases())))
def test_mutant_is_caught_with_cause(name):
    rep = G.run_graph_case(name, n_inputs=12, n_replays=2, n_processes=2)
    assert rep.caught, (rep.expect_cause, rep.causes, rep.evidence)
