"""Graph-replay check on a CPU-only machine: rows say "needs-gpu" (never pass); components, the ragged
builder and the diagnosis logic are tested without a device (diagnosis with fake records and with a
simulated capture that re-runs the region's tensor code with the capture flag up)."""

from __future__ import annotations

import json

import pytest
import torch

from conformance.checks import graph as G
from conformance.checks import graph_components as gc
from tests.graph.sim import SimulatedGraphBackend

CASES = G.all_cases()
SEEDS = dict(values=11, metadata=12, topk=13, padding=14)


# ---------------------------------------------------------------- no device -> needs-gpu, never pass

@pytest.mark.parametrize("name", sorted(CASES))
def test_no_device_gives_needs_gpu(name):
    rep = G.run_graph_case(name, device="cpu")
    assert rep.verdict == "needs-gpu"
    rows = rep.to_rows()
    assert rows and all(r.verdict == "needs-gpu" and r.check == "graph" for r in rows)
    assert all("needs a GPU" in r.message for r in rows)
    assert not any(r.verdict == "pass" for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_main_on_cpu_writes_needs_gpu(tmp_path):
    assert G.main(["--out", str(tmp_path), "--cases", "sparse_attn_decode", "mutant_seq_len_item"]) == 0
    summ = json.loads((tmp_path / "graph-summary.json").read_text())
    assert {r["verdict"] for r in summ["reports"]} == {"needs-gpu"}
    rows = [json.loads(x) for p in (tmp_path / "results").glob("*.jsonl") for x in p.read_text().splitlines()]
    assert rows and {r["verdict"] for r in rows} == {"needs-gpu"}
    assert "needs-gpu" in (tmp_path / "graph-summary.md").read_text()


# ---------------------------------------------------------------- components vs golden (CPU, fp32)

def _check_dense(out, gold, live):
    for k, g in gold["g64"].items():
        d = float((out[k][:live].double() - g).abs().max()) if g.numel() else 0.0
        assert d <= gold["bounds"][k], (k, d, gold["bounds"][k])


@pytest.mark.parametrize("live", [8, 5, 1])
def test_sparse_attention_matches_golden(live):
    case = G.sparse_attn_case()
    x = case.make_input(dict(SEEDS, live=live))
    _check_dense(case.eager(x), G._dense_golden(case, x), live)


@pytest.mark.parametrize("live", [8, 3])
def test_decode_step_matches_golden(live):
    case = G.decode_step_case()
    x = case.make_input(dict(SEEDS, live=live))
    _check_dense(case.eager(gc.clone_inputs(x)), G._dense_golden(case, x), live)


@pytest.mark.parametrize("live", [8, 2])
def test_indexer_topk_matches_golden(live):
    case = G.indexer_case()
    x = case.make_input(dict(SEEDS, live=live))
    out = case.eager(x)
    ok, metric, _ = G._golden_compare(case, out, G._dense_golden(case, x), live)
    assert ok, metric
    n = x["seq_lens"][:live].long() // 4
    valid = (out["idx"][:live] >= 0).sum(1)
    assert torch.equal(valid, n.clamp(max=gc.DIMS.K))           # k = min(topk, causal bound)
    assert bool(((out["idx"][:live] < n[:, None]) | (out["idx"][:live] < 0)).all())


def test_empty_selection_gives_zero_output():
    d = gc.DIMS
    q = torch.randn(1, d.H, d.D)
    idx = torch.full((1, 4), -1)
    o = gc.attn_core(q, idx, torch.randn(10, d.D), None, 0, torch.randn(d.H), d.scale)
    assert torch.equal(o, torch.zeros_like(o))


def test_ragged_builder_out_matches_python():
    g = torch.Generator().manual_seed(0)
    dense = torch.randint(-1, 50, (5, 7), generator=g)
    dense[2] = -1
    indptr = torch.zeros(6, dtype=torch.long)
    ragged = torch.full((5 * 7 + 1,), -7, dtype=torch.long)
    gc.build_ragged_indices_from_dense_out(dense, indptr, ragged)
    flat = [v for row in dense.tolist() for v in row if v >= 0]
    counts = [sum(v >= 0 for v in row) for row in dense.tolist()]
    assert indptr.tolist() == [0] + list(torch.tensor(counts).cumsum(0).tolist())
    assert ragged[: len(flat)].tolist() == flat
    back = gc.ragged_to_dense(indptr, ragged, 7, ragged.numel() - 1)
    for r in range(5):
        got = [v for v in back[r].tolist() if v >= 0]
        assert got == [v for v in dense[r].tolist() if v >= 0]


def test_padding_rows_do_not_touch_live_rows_eagerly():
    for case in (G.sparse_attn_case(), G.decode_step_case(), G.indexer_case()):
        a = case.make_input(dict(SEEDS, live=3))
        b = case.make_input(dict(SEEDS, live=3, padding=99))
        oa, ob = case.eager(gc.clone_inputs(a)), case.eager(gc.clone_inputs(b))
        assert G._equal_live(oa, ob, 3), case.name


# ---------------------------------------------------------------- diagnosis with fake records

def _rep(**kw):
    r = dict(input=0, rep=0, live=4, same_as_warm=False, ragged=100, warm_ragged=100, eager_ok=True,
             bitwise=True, eager_maxdiff=0.0, golden_ok=True, golden_metric=0.0, golden_bound=1e-5,
             consistent=True, stale_vs_prev=False)
    r.update(kw)
    return r


def _proc(replays=None, probes=None, capture=None):
    cap = {"ok": True, "host_sync": None, "warm_live": 8, "warm_ragged": 100}
    cap.update(capture or {})
    return {"seed": 1, "capture": cap, "replays": replays or [_rep()],
            "probes": probes or [dict(group="values", live=4, eager_changed=True, replay_changed=True),
                                 dict(group="padding", live=4, eager_changed=False, replay_changed=False)]}


def test_diagnose_clean_passes():
    d = G.diagnose([_proc(), _proc()])
    assert d["verdicts"] == {"eager": "pass", "golden": "pass"} and d["causes"] == []


def test_diagnose_capture_sync():
    bad = {"ok": False, "error": "RuntimeError: CUDA error: operation not permitted when stream is capturing",
           "site": "x.py:1 in region", "kind": G.CAUSE_CAPTURE_SYNC}
    d = G.diagnose([_proc(capture=bad) | {"replays": [], "probes": []}, _proc()])
    assert G.CAUSE_CAPTURE_SYNC in d["causes"] and d["verdicts"]["eager"] == "fail"
    assert d["rates"]["capture_fail"] == {"n": 1, "of": 2, "rate": 0.5}


def test_diagnose_stale():
    probes = [dict(group="metadata", live=4, eager_changed=True, replay_changed=False),
              dict(group="values", live=4, eager_changed=True, replay_changed=True)]
    d = G.diagnose([_proc(replays=[_rep(eager_ok=False, bitwise=False, eager_maxdiff=1.0)], probes=probes)])
    assert any(c == "stale: metadata" for c in d["causes"])
    assert G.CAUSE_EAGER_MISMATCH not in d["causes"] and G.CAUSE_WARMUP_ALLOC not in d["causes"]
    assert d["verdicts"]["eager"] == "fail"


def test_diagnose_padding():
    probes = [dict(group="padding", live=4, eager_changed=False, replay_changed=True),
              dict(group="padding", live=4, eager_changed=False, replay_changed=False)]
    d = G.diagnose([_proc(probes=probes)])
    assert G.CAUSE_PADDING in d["causes"] and d["rates"]["padding_probe"]["rate"] == 0.5
    assert "graph-only" in d["evidence"][G.CAUSE_PADDING]


def test_diagnose_warmup_sized_allocation():
    reps = [_rep(ragged=100), _rep(ragged=80),
            _rep(ragged=150, eager_ok=False, bitwise=False, eager_maxdiff=2.0),
            _rep(ragged=120, eager_ok=False, bitwise=False, eager_maxdiff=1.0), _rep(ragged=130)]
    d = G.diagnose([_proc(replays=reps)])
    assert G.CAUSE_WARMUP_ALLOC in d["causes"]
    assert d["rates"]["eager_mismatch_ragged_larger_than_warmup"]["n"] == 2
    # the same mismatches with a same-size one failing too: not explained by the allocation
    d2 = G.diagnose([_proc(replays=reps + [_rep(ragged=100, eager_ok=False, bitwise=False, eager_maxdiff=1.0,
                                                   golden_ok=False, golden_metric=1.0)])])
    assert G.CAUSE_WARMUP_ALLOC not in d2["causes"] and G.CAUSE_EAGER_MISMATCH in d2["causes"]


def test_diagnose_intermittent_and_crash():
    d = G.diagnose([_proc(replays=[_rep(), _rep(rep=1, consistent=False)]),
                    {"crashed": True, "error": "rc=-6"}])
    assert G.CAUSE_INTERMITTENT in d["causes"] and G.CAUSE_CRASH in d["causes"]
    assert d["rates"]["inconsistent_replay"]["rate"] == 0.5 and d["verdicts"]["eager"] == "fail"


def test_diagnose_nonbitwise_is_degraded():
    d = G.diagnose([_proc(replays=[_rep(eager_ok=False, bitwise=False, eager_maxdiff=1e-7, ragged=None)])])
    assert G.CAUSE_NONBITWISE in d["causes"] and d["verdicts"]["eager"] == "degraded"


def test_caught_needs_failing_verdict_and_cause():
    assert G._caught(["stale: metadata"], G.CAUSE_STALE, "fail")
    assert not G._caught(["stale: metadata"], G.CAUSE_STALE, "pass")
    assert not G._caught([G.CAUSE_GOLDEN], G.CAUSE_PADDING, "fail")


# ---------------------------------------------------------------- whole pipeline on the simulated capture

@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_pipeline_on_simulated_capture(name):
    case = CASES[name]()
    rec = G.run_worker(case, 6, 1, 4, "cpu", n_probes=1, backend=SimulatedGraphBackend())
    d = G.diagnose([rec])
    if case.mutant:
        assert any(c.startswith(case.expect_cause) for c in d["causes"]), d["causes"]
        assert "fail" in d["verdicts"].values()
    else:
        assert d["causes"] == [] and d["verdicts"] == {"eager": "pass", "golden": "pass"}, d["evidence"]
