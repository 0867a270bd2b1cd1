"""MoE routing conformance (issue 7) of every routed moe.* case, for every --subject (see conformance.plugin).

Per-token router comparison (exact id sets, near-ties reported), expert fingerprinting of the routed layer,
routing metadata with guard bands, -1 dropped ids and expert-parallel rank sums. A subject that does not
provide a component gets a "not-provided" row (never a pass).
"""

from conformance.checks.routing import ROUTED_COMPONENTS, run_routing
from conformance.plugin import record


def select(case) -> bool:
    # the routed components (their outputs are judged jointly by the routing compare hook); moe.shared_expert
    # has no routing (weight 1) and moe.experts_nvfp4 its own compare hook: both judged by the numeric suite alone
    return case.component in ROUTED_COMPONENTS


def test_routing(conformance_subject, conformance_case, conformance_run):
    subj = conformance_run.subject(conformance_subject)
    rows = run_routing(subj, conformance_case, subject_name=conformance_subject,
                       rerun=conformance_run.rerun_command(conformance_subject, conformance_case.id),
                       emulated_cache=conformance_run.emulated_cache)
    record(conformance_run, rows)
