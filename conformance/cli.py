"""Command line: ``python -m conformance {run,rerun,report,cases,subjects}``.

run     the conformance suite against subjects (a thin wrapper over pytest with the plugin)
rerun   one case alone (optionally N times, classifying it deterministic or intermittent)
report  re-render the HTML report of a results folder
cases   list case ids (optionally of one component)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUITE = str(Path(__file__).parent / "suite")


def _pytest(args: list[str]) -> int:
    import pytest

    return int(pytest.main(args))


def cmd_run(a) -> int:
    args = [SUITE, "-p", "no:cacheprovider", "-q", "-rs", "--out", a.out]
    for s in a.subject:
        args += ["--subject", s]
    for c in a.component or []:
        args += ["--component", c]
    if a.workers:
        args += ["-n", str(a.workers)]
    if a.junit:
        args += ["--junitxml", a.junit]
    return _pytest(args + a.pytest_args)


def cmd_rerun(a) -> int:
    import json

    from .results import load_rows

    verdicts = []
    for i in range(a.repeat):
        out = f"{a.out}/rerun-{i}"
        rc = _pytest([SUITE, "-p", "no:cacheprovider", "-q", "--out", out, "--subject", a.subject,
                      "--case", a.case_id, "--no-report"])
        rows = load_rows(out)
        verdicts.append(sorted({r["verdict"] for r in rows}) or [f"exit {rc}"])
    flat = [",".join(v) for v in verdicts]
    distinct = sorted(set(flat))
    kind = "deterministic" if len(distinct) == 1 else "intermittent"
    rates = {v: flat.count(v) / len(flat) for v in distinct}
    print(json.dumps({"case": a.case_id, "subject": a.subject, "runs": a.repeat, "classification": kind,
                      "verdict_rates": rates}, indent=1))
    failing = any(any(x in v for x in ("fail", "catastrophic", "error")) for v in flat)
    return 1 if failing else 0


def cmd_report(a) -> int:
    from reports.render import render_report

    print(render_report(a.out))
    return 0


def cmd_cases(a) -> int:
    from .cases import all_cases

    for c in all_cases():
        if not a.component or c.component == a.component:
            print(c.id)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the conformance suite")
    r.add_argument("--subject", action="append", required=True)
    r.add_argument("--component", action="append")
    r.add_argument("--out", default="out/conformance")
    r.add_argument("-n", "--workers", default=None, help="pytest-xdist workers (e.g. 2 or auto)")
    r.add_argument("--junit", default=None, help="write JUnit XML here")
    r.add_argument("pytest_args", nargs="*", help="passed to pytest after --")
    r.set_defaults(fn=cmd_run)
    rr = sub.add_parser("rerun", help="rerun one case alone")
    rr.add_argument("case_id")
    rr.add_argument("--subject", required=True)
    rr.add_argument("--repeat", type=int, default=1)
    rr.add_argument("--out", default="out/rerun")
    rr.set_defaults(fn=cmd_rerun)
    rp = sub.add_parser("report", help="render the HTML report of a results folder")
    rp.add_argument("out", nargs="?", default="out/conformance")
    rp.set_defaults(fn=cmd_report)
    c = sub.add_parser("cases", help="list case ids")
    c.add_argument("--component")
    c.set_defaults(fn=cmd_cases)
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
