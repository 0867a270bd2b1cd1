"""Graph-replay consistency (conformance.checks.graph) of every subject's capturable cases.

Each ``--subject`` with a ``graph_cases()`` hook gets one test per case, running every graph mode (``full``,
``piecewise``, ``decode-only``; modes the case does not declare are "not-run" rows with the reason). Rows are
recorded under that subject and name the device the graphs ran on. Without a CUDA/ROCm device every row is
"needs-gpu" (shown in the report, never counted as a pass). A subject without the hook gets one
"not-provided" row.
"""

import pytest

from conformance.checks.graph import needs_gpu_note, run_subject, subject_cases
from conformance.plugin import record


def pytest_generate_tests(metafunc):
    if "graph_target" not in metafunc.fixturenames:
        return
    run = metafunc.config._dsv4_run
    if not run.subject_specs:
        raise pytest.UsageError("the conformance suite needs at least one --subject")
    params, ids = [], []
    for spec in run.subject_specs:
        cases = subject_cases(spec, run.subject(spec))
        for name in (sorted(cases) or [None]):
            params.append((spec, name))
            ids.append(f"{spec}::graph/{name or '*'}")
    metafunc.parametrize("graph_target", params, ids=ids)


def test_graph_replay(graph_target, conformance_run):
    spec, name = graph_target
    info = conformance_run.subject(spec).info()
    rows = [row for rep in run_subject(spec, [name] if name else None) for row in rep.to_rows()]
    for row in rows:                 # the subject's dialect; the device stays the one the graphs ran on
        row.dialect, row.emulated = info.dialect, info.emulated
        needs_gpu_note(row, getattr(info, "simulated", "") or "")
    record(conformance_run, rows)
