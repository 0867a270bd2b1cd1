"""The planted plugin subject (tests/graph/planted_subject.py) through the public graph interface.

On this CPU machine: every row of every case says needs-gpu (or not-run for a mode the case does not
declare), never pass. The whole pipeline, fresh processes included, also runs on the SIMULATED capture of
tests/graph/sim.py (re-runs the region with the capture flag up; rows say SIMULATED): each planted bug is
caught with its cause and each twin passes. That shows the detectors fire and stay quiet; it is not a device
result (tests/graph/test_graph_gpu.py is)."""

from __future__ import annotations

import json

import pytest
import torch

from conformance.checks import graph as G
from conformance.subjects import GraphCase, load_subject
from tests.graph.sim import SimulatedGraphBackend

SPEC = "tests.graph.planted_subject:factory"
SIM = "tests.graph.sim:SimulatedGraphBackend"
CASES = G.subject_cases(SPEC)
MUTANTS = sorted(n for n, c in CASES.items() if c.mutant)


def test_planted_subject_is_a_plugin_with_a_twin_per_mutant():
    subj = load_subject(SPEC)
    cases = subj.graph_cases()
    assert all(isinstance(c, GraphCase) for c in cases)
    assert len(MUTANTS) == 7
    causes = {CASES[m].expect_cause for m in MUTANTS}
    assert causes == {G.CAUSE_CAPTURE_SYNC, G.CAUSE_WARMUP_ALLOC, G.CAUSE_STALE, G.CAUSE_PADDING, G.CAUSE_SHARED,
                      G.CAUSE_MODE_SPECIFIC, G.CAUSE_PROCESS_INTERMITTENT}
    for m in MUTANTS:
        twin = CASES[f"{m}_twin"]
        assert not twin.mutant and twin.twin_of == m and twin.expect_cause is None


def test_reference_subject_has_graph_cases_and_others_none():
    assert set(G.subject_cases("reference")) >= {"sparse_attn_decode", "decode_step", "decode_multistep",
                                                 "moe_block", "indexer_topk"}
    assert load_subject("emulated:gfx942").graph_cases() == []
    reps = G.run_subject("emulated:gfx942")
    assert [r.verdict for r in reps] == ["not-provided"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cpu_rows_say_needs_gpu_never_pass():
    reps = G.run_subject(SPEC)
    assert len(reps) == 3 * len(CASES)
    rows = [row for r in reps for row in r.to_rows()]
    assert rows and not any(r.verdict == "pass" for r in rows)
    assert {r.verdict for r in rows} == {"needs-gpu", "not-run"}
    assert all(r.subject == SPEC and r.check == "graph" for r in rows)
    for r in rows:
        if r.verdict == "not-run":
            assert "not supported by case" in r.message and r.params["mode"] in r.message
        else:
            assert "needs a GPU" in r.message and r.device.startswith("cpu")
    modes = {(r.case_id, r.params["mode"]) for r in rows if r.verdict == "needs-gpu"}
    assert ("graph/decode_only/decode-only", "decode-only") in modes


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_main_with_plugin_subject_writes_summary(tmp_path):
    rc = G.main(["--subject", SPEC, "--subject", "reference", "--out", str(tmp_path), "--cases", "shared_static",
                 "moe_block"])
    assert rc == 0
    summ = json.loads((tmp_path / "graph-summary.json").read_text())
    assert {(r["subject"], r["case"]) for r in summ["reports"]} == {(SPEC, "shared_static"), ("reference", "moe_block")}
    assert {r["verdict"] for r in summ["reports"]} == {"needs-gpu", "not-run"}
    md = (tmp_path / "graph-summary.md").read_text()
    assert SPEC in md and "needs-gpu" in md


# ---------------------------------------------------------------- simulated capture (plumbing and detectors)

def _sim(name, **kw):
    kw.setdefault("n_inputs", 4)
    kw.setdefault("n_replays", 1)
    kw.setdefault("n_processes", 5 if name.startswith("intermittent") else 1)
    reps = G.run_subject(SPEC, [name], backend=SimulatedGraphBackend(), **kw)
    return [r for r in reps if r.verdict != "not-run"]


@pytest.mark.slow
@pytest.mark.parametrize("name", MUTANTS)
def test_simulated_mutant_caught_with_cause_and_twin_passes(name):
    reps = _sim(name)
    assert any(r.caught for r in reps), [(r.mode, r.causes, r.evidence) for r in reps]
    assert all(r.device.startswith("cpu (SIMULATED") for r in reps)
    if name == "decode_only":        # only wrong when captured in decode-only mode
        assert {r.mode: r.verdict for r in reps} == {"full": "pass", "piecewise": "pass", "decode-only": "fail"}
    twin = _sim(f"{name}_twin")
    assert twin and all(r.verdict == "pass" and r.causes == [] for r in twin), \
        [(r.mode, r.causes, r.evidence) for r in twin]


@pytest.mark.slow
def test_fresh_worker_processes_load_plugin_cases_by_spec():
    """Five fresh processes (python -m conformance.checks.graph --worker CASE --subject SPEC), each finding the
    plugin's case by subject spec + name; the one-in-five corruption shows as 1/5 processes."""
    rep = G.run_graph_case("intermittent", subject=SPEC, n_inputs=2, n_replays=1, n_processes=5, parallel=2,
                           worker_backend=SIM)
    assert rep.caught, (rep.causes, rep.evidence, rep.per_process)
    assert rep.rates["process_fail"] == {"n": 1, "of": 5, "rate": 0.2}
    assert len({p["seed"] for p in rep.per_process}) == 5 and rep.device.startswith("cpu (SIMULATED")
    twin = G.run_graph_case("intermittent_twin", subject=SPEC, n_inputs=2, n_replays=1, n_processes=5,
                            parallel=2, worker_backend=SIM)
    assert twin.verdict == "pass" and twin.rates["process_fail"]["n"] == 0, twin.evidence


def test_pool_reuse_is_modelled_and_the_cross_size_probe_ignores_it():
    """Graphs sharing a pool may overwrite each other's static outputs (the simulated pool scribbles them, as a
    device pool's reuse of freed intermediates may): a correct case's outputs do not survive another size's
    replay, and the cross-size probe must not call that a bug (it did, as an output-survival probe, on an
    H100). The planted case, whose sizes share one static input buffer, is caught by the same probe."""
    from conformance.checks import graph_components as gc

    backend = SimulatedGraphBackend()
    twin, planted = CASES["shared_static_twin"], CASES["shared_static"]
    pool = backend.new_pool()
    outs = {}
    for b in (8, 4):
        ex = gc.to_device(twin.make_input(dict(values=b, metadata=b, topk=b, padding=b, live=b, batch=b)), "cpu")
        w = twin.wrapper(ex, "cpu")
        replay, outs[b] = backend.capture(w, ex, pool=pool)
        replay()
    assert torch.isnan(outs[8]["out"]).all()          # the size-4 replay scribbled over size 8's outputs
    rec = G.run_worker(twin, 2, 1, 3, "cpu", n_probes=1, backend=backend)
    assert rec["cross_size"] and not any(a["changed"] for a in rec["cross_size"]), rec["cross_size"]
    bad = G.run_worker(planted, 2, 1, 3, "cpu", n_probes=1, backend=backend)
    assert all(r["eager_ok"] for r in bad["replays"])   # replayed right after its load: right
    assert any(a["changed"] for a in bad["cross_size"])
    assert G.CAUSE_SHARED in G.diagnose([bad])["causes"]
