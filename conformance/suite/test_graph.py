"""Graph-replay consistency of the capturable reference components (conformance.checks.graph).

Runs with the ``reference`` subject. Without a CUDA/ROCm device every case is recorded as "needs-gpu"
(shown in the report, never counted as a pass).
"""

import pytest

from conformance.checks.graph import reference_cases, run_graph_case
from conformance.plugin import record


@pytest.mark.parametrize("graph_case", sorted(reference_cases()))
def test_graph_replay(graph_case, conformance_run):
    if "reference" not in conformance_run.subject_specs:
        pytest.skip("graph-replay cases run with --subject reference")
    rows = run_graph_case(graph_case).to_rows("reference")
    record(conformance_run, rows)
