"""Numeric conformance of every registered component, for every --subject (see conformance.plugin)."""

from conformance.checks.numeric import run_numeric
from conformance.plugin import record


def test_numeric(conformance_subject, conformance_case, conformance_run):
    subj = conformance_run.subject(conformance_subject)
    rows = run_numeric(subj, conformance_case, subject_name=conformance_subject,
                       rerun=conformance_run.rerun_command(conformance_subject, conformance_case.id),
                       emulated_cache=conformance_run.emulated_cache)
    record(conformance_run, rows)
