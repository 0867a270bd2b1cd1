"""The graph-replay suite on a real CUDA / ROCm device: reference cases pass bitwise in every mode they declare,
built-in mutants and the planted plugin subject's bugs are caught with the cause named, each planted bug's twin
passes. Skipped (with the reason) where no device exists; CPU runs report needs-gpu instead.

``DSV4_GRAPH_SUMMARY=<dir>/graph-summary.json``: judge the reports of a suite run just made on this device
(``python -m conformance.checks.graph --subject ... --out <dir>``) instead of capturing again; the file must
name a CUDA/ROCm device and hold every case asked about."""

from __future__ import annotations

import json
import os

import pytest

from conformance.checks import graph as G

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not G.graph_device_available(),
                                                  reason="needs a CUDA or ROCm device (graph capture)")]

PLANTED = "tests.graph.planted_subject:factory"
_SUMMARY: dict = {}


def _reports(subject: str, name: str, **kw) -> list[G.GraphReport]:
    path = os.environ.get("DSV4_GRAPH_SUMMARY")
    if path:
        if not _SUMMARY:
            data = json.loads(open(path).read())
            assert not data["device"].startswith("cpu"), f"{path} was not written on a device: {data['device']}"
            _SUMMARY["reports"] = [G.GraphReport(**r) for r in data["reports"]]
        reps = [r for r in _SUMMARY["reports"] if r.subject == subject and r.case == name]
        assert reps, f"{path} has no report for {subject} / {name}"
        return reps
    kw = {"n_inputs": 8, "n_replays": 2, "n_processes": 2, "parallel": 2, **kw}
    return G.run_subject(subject, [name], **kw)


def _ran(reps):
    return [r for r in reps if r.verdict != "not-run"]


@pytest.mark.parametrize("name", sorted(G.reference_cases()))
def test_reference_case_replays_bitwise(name):
    reps = _ran(_reports("reference", name))
    assert reps
    for rep in reps:
        assert rep.verdict == "pass", (rep.mode, rep.causes, rep.evidence)
        assert rep.rates["not_bitwise"]["n"] == 0 and rep.rates["capture_fail"]["n"] == 0
        assert not rep.device.startswith("cpu")


@pytest.mark.parametrize("name", sorted(G.subject_cases(G.MUTANTS_SPEC)))
def test_builtin_mutant_is_caught_with_cause(name):
    reps = _ran(_reports(G.MUTANTS_SPEC, name))
    assert any(r.caught for r in reps), [(r.mode, r.expect_cause, r.causes, r.evidence) for r in reps]


PLANTED_MUTANTS = sorted(n for n, c in G.subject_cases(PLANTED).items() if c.mutant)


@pytest.mark.parametrize("name", PLANTED_MUTANTS)
def test_planted_mutant_caught_and_twin_passes(name):
    extra = {"n_processes": 5, "parallel": 5} if name == "intermittent" else {}
    reps = _ran(_reports(PLANTED, name, **extra))
    assert any(r.caught for r in reps), [(r.mode, r.expect_cause, r.causes, r.evidence) for r in reps]
    if name == "decode_only":
        assert {r.mode: r.verdict for r in reps} == {"full": "pass", "piecewise": "pass", "decode-only": "fail"}
    if name == "intermittent":
        assert reps[0].rates["process_fail"]["n"] >= 1 and reps[0].rates["process_fail"]["of"] >= 5
    twin = _ran(_reports(PLANTED, f"{name}_twin", **extra))
    assert twin and all(r.verdict == "pass" for r in twin), [(r.mode, r.causes, r.evidence) for r in twin]
    assert all(not r.device.startswith("cpu") for r in reps + twin)


VLLM = "vllm-triton-gpu:ocp"
VLLM_PLANTED = "tests.graph.vllm_planted:factory"


@pytest.fixture
def vllm_source():
    from conformance.subjects._vllm_source import SourceError, source_root

    try:
        return source_root()
    except SourceError as e:
        pytest.skip(f"vLLM's kernels need vLLM's source: {e}")


@pytest.mark.parametrize("name", ["vllm_sparse_decode", "vllm_routing_metadata"])
def test_vllm_kernels_captured_replay_bitwise_within_golden(vllm_source, name):
    reps = _ran(_reports(VLLM, name))
    assert reps
    for rep in reps:
        assert rep.verdict == "pass", (rep.mode, rep.causes, rep.evidence)
        assert rep.rates["not_bitwise"]["n"] == 0 and rep.rates["golden_fail"]["n"] == 0
        assert not rep.device.startswith("cpu")


@pytest.mark.parametrize("name", ["vllm_stale_ragged", "vllm_shared_ids"])
def test_planted_bug_around_vllm_kernels_caught_twin_passes(vllm_source, name):
    reps = _ran(_reports(VLLM_PLANTED, name))
    assert any(r.caught for r in reps), [(r.mode, r.expect_cause, r.causes, r.evidence) for r in reps]
    twin = _ran(_reports(VLLM_PLANTED, f"{name}_twin"))
    assert twin and all(r.verdict == "pass" for r in twin), [(r.mode, r.causes, r.evidence) for r in twin]
