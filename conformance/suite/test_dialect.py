"""FP8 dialect map of every subject: each producer -> consumer edge written and read in one dialect."""

from conformance.checks.dialect.dialect_map import dialect_map_for_subject
from conformance.plugin import record
from conformance.results import CheckResult


def test_dialect_map(conformance_subject_only, conformance_run):
    subj = conformance_run.subject(conformance_subject_only)
    info = subj.info()
    rerun = (f"python -m conformance run --subject {conformance_subject_only} -- -k test_dialect_map")
    dmap = dialect_map_for_subject(subj)
    if dmap is None:
        rows = [CheckResult(conformance_subject_only, "dialect/map", "dialect_map", "dialect", "bytes",
                            "not-provided", message=f"subject {conformance_subject_only} exposes no FP8 dialect "
                            "probes (dialect_probes())", device=info.device, dialect=info.dialect,
                            emulated=info.emulated, rerun=rerun)]
    else:
        dmap.subject = conformance_subject_only
        rows = dmap.check_results(info)
        for r in rows:
            r.rerun = rerun
    record(conformance_run, rows)
