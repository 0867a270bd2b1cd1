"""CI gate: run (or take) a conformance run, judge it against the committed baseline of its platform.

Exit status (``python -m conformance gate``): **1** exactly when a case fails (fail, catastrophic or error
verdict, not covered by an expected-failure entry), a case regresses against the baseline (worse verdict,
a metric past its ``--threshold``, or, for components named with ``--fail-on-backend-change``, another
function or backend than the baseline's), or the run crashed / produced no results; **0** otherwise; **2** for
a usage problem (no baseline for this arch, bad threshold, bad expected-failures file).

Whatever happens it writes ``junit.xml``, ``report.html`` (the run's report), ``gate.html`` (the gate
verdict and the comparison with the baseline), ``gate.json``, and prints a short summary for the CI log.

Expected failures (``--expected-failures xfail.toml`` or ``.json``): known upstream bugs, each with a reason
and a link::

    [[expected_failure]]
    case = "quant.act_fp8/t7k512/*"     # fnmatch pattern on the case id
    subject = "vllm"                     # optional pattern (default "*")
    level = "emulated"                   # optional pattern (default "*")
    reason = "fnuz rounding of the Triton fallback (upstream bug)"
    link = "https://github.com/vllm-project/vllm/issues/00000"

A failing row an entry matches counts as ``xfail`` (reported, does not fail the gate). An entry whose rows
all pass is reported as ``xpass: remove entry`` (``--strict-xfail`` makes that fail the gate).
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .compare import UNJUDGED, Change, Comparison, compare
from .junit import TestOutcome, validate, write_junit
from .store import Run, StoreError, key_str, load_baseline, load_run, row_key

FAIL_VERDICTS = {"fail", "catastrophic", "error", "crashed"}
SKIP_VERDICTS = {"not-provided", "needs-gpu", "not-run"}


class GateError(Exception):
    """A usage problem (exit 2)."""


@dataclass
class Expected:
    case: str
    reason: str
    link: str
    subject: str = "*"
    level: str = "*"
    matched: list = field(default_factory=list)   # keys of rows it matched
    failing: list = field(default_factory=list)   # keys of those that failed (-> xfail)

    def matches(self, r: dict) -> bool:
        return (fnmatch.fnmatchcase(r["case_id"], self.case) and fnmatch.fnmatchcase(r["subject"], self.subject)
                and fnmatch.fnmatchcase(r["level"], self.level))

    @property
    def status(self) -> str:
        if not self.matched:
            return "unused"
        return "xfail" if self.failing else "xpass"


def load_expected(path: str | Path | None) -> list[Expected]:
    if not path:
        return []
    p = Path(path)
    if not p.exists():
        raise GateError(f"expected-failures file {p} does not exist")
    try:
        if p.suffix == ".toml":
            doc = tomllib.loads(p.read_text())
        else:
            doc = json.loads(p.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise GateError(f"{p}: cannot parse: {e}") from None
    entries = doc if isinstance(doc, list) else (doc.get("expected_failure") or doc.get("expected_failures") or [])
    out = []
    for i, e in enumerate(entries):
        where = f"{p}: entry {i + 1}"
        if not isinstance(e, dict):
            raise GateError(f"{where}: not a table")
        unknown = set(e) - {"case", "subject", "level", "reason", "link"}
        if unknown:
            raise GateError(f"{where}: unknown keys {sorted(unknown)} (known: case, subject, level, reason, link)")
        for k in ("case", "reason", "link"):
            if not str(e.get(k, "")).strip():
                raise GateError(f"{where}: '{k}' is required (an expected failure names the case, why, and the "
                                f"upstream issue)")
        if not str(e["link"]).startswith(("http://", "https://")):
            raise GateError(f"{where}: link {e['link']!r} is not an http(s) URL")
        out.append(Expected(case=e["case"], reason=e["reason"], link=e["link"], subject=e.get("subject", "*"),
                            level=e.get("level", "*")))
    return out


@dataclass
class GateResult:
    run: Run
    baseline: Run | None
    comparison: Comparison | None
    expected: list
    failing: list = field(default_factory=list)        # rows failing, not expected
    xfailed: list = field(default_factory=list)        # (row, Expected)
    regressions: list = field(default_factory=list)    # compare.Change not covered by xfail
    crash: str = ""
    run_rc: int | None = None
    strict_xfail: bool = False

    @property
    def xpassed(self) -> list:
        return [e for e in self.expected if e.status == "xpass"]

    @property
    def passed(self) -> bool:
        return not (self.failing or self.regressions or self.crash or (self.strict_xfail and self.xpassed))

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def summary(self) -> dict:
        verdicts: dict = {}
        for r in self.run.by_key.values():
            verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
        return {"gate": "PASS" if self.passed else "FAIL", "exit": self.exit_code, "arch": self.run.arch,
                "rows": len(self.run.by_key), "verdicts": verdicts, "failing": len(self.failing),
                "regressions": len(self.regressions), "xfail": len(self.xfailed), "xpass": len(self.xpassed),
                "crash": self.crash, "run_rc": self.run_rc,
                "baseline": self.baseline.path if self.baseline else None,
                "compare": self.comparison.counts if self.comparison else None}


def backend_regressions(cmp: Comparison, components: list[str]) -> list:
    """The backend changes of ``cmp`` on the named components (fnmatch patterns on the component name), as
    regressions: a tuned kernel silently replaced by a fallback fails the gate when the component is named."""
    out = []
    for c in cmp.backend_changed:
        comp = (c.b or c.a or {}).get("component", "")
        pats = [p for p in components if fnmatch.fnmatchcase(comp, p)]
        if pats:
            out.append(Change(c.key, c.a, c.b, [f"backend changed: {c.reasons[0]} (--fail-on-backend-change "
                                                f"{pats[0]})"]))
    return out


def judge(run: Run, baseline: Run | None, expected: list[Expected], thresholds=None, *, crash: str = "",
          run_rc: int | None = None, strict_xfail: bool = False,
          fail_on_backend_change: list[str] | None = None) -> GateResult:
    rows = run.by_key
    cmp = compare(baseline, run, thresholds) if baseline is not None else None
    res = GateResult(run, baseline, cmp, expected, crash=crash, run_rc=run_rc, strict_xfail=strict_xfail)
    xfail_keys = set()
    for k, r in rows.items():
        ents = [e for e in expected if e.matches(r)]
        for e in ents:
            e.matched.append(k)
        if r["verdict"] in FAIL_VERDICTS or r["verdict"] == "xpass":
            if ents:
                for e in ents:
                    e.failing.append(k)
                res.xfailed.append((r, ents[0]))
                xfail_keys.add(k)
            else:
                res.failing.append(r)
    if cmp is not None:
        lost = [c for c in cmp.provided_changed if c.b["verdict"] in UNJUDGED]   # judged in the baseline, not now
        res.regressions = [c for c in cmp.worse + lost if c.key not in xfail_keys]
        worse = {c.key for c in res.regressions}
        for c in backend_regressions(cmp, list(fail_on_backend_change or [])):
            if c.key in worse:   # already a regression: add the reason to it
                next(r for r in res.regressions if r.key == c.key).reasons.extend(c.reasons)
            elif c.key not in xfail_keys:
                res.regressions.append(c)
    if not rows and not crash:
        res.crash = "the run produced no result rows"
    return res


def outcomes(res: GateResult) -> list[TestOutcome]:
    out = []
    reg = {c.key: c for c in res.regressions}
    xf = {row_key(r): e for r, e in res.xfailed}
    for k, r in sorted(res.run.by_key.items()):
        name = f"{r['case_id']} [{r['check']}/{r['level']}]"
        cls = f"{r['subject']}.{r.get('component', '')}"
        ran = f"ran {r.get('function', '')} [{r.get('backend', '')}] on {r.get('device', '')}"
        base = dict(suite=r["subject"], classname=cls, name=name, time_s=float(r.get("duration_s") or 0),
                    details=f"{r.get('message', '')}\n{ran}\nrerun: {r.get('rerun', '')}")
        if k in xf:
            e = xf[k]
            out.append(TestOutcome(status="skipped", kind="xfail", message=f"xfail ({r['verdict']}): {e.reason} "
                                   f"<{e.link}>", **base))
        elif r["verdict"] in FAIL_VERDICTS or r["verdict"] == "xpass":
            status = "error" if r["verdict"] in ("error", "crashed") else "failure"
            msg = f"{r['verdict'].upper()}: {r.get('message', '')}".strip()
            if k in reg:
                msg += " | regression vs baseline: " + "; ".join(reg[k].reasons)
            out.append(TestOutcome(status=status, kind=r["verdict"], message=msg, **base))
        elif k in reg:
            out.append(TestOutcome(status="failure", kind="regression",
                                   message="regression vs baseline: " + "; ".join(reg[k].reasons), **base))
        elif r["verdict"] in SKIP_VERDICTS:
            out.append(TestOutcome(status="skipped", kind=r["verdict"], message=f"{r['verdict']}: "
                                   f"{r.get('message', '')}", **base))
        else:
            out.append(TestOutcome(status="passed", kind=r["verdict"], **base))
    for e in res.expected:
        if e.status == "xpass":
            out.append(TestOutcome(suite="gate", classname="gate.expected_failures", name=f"xpass {e.case}",
                                   status="failure" if res.strict_xfail else "passed", kind="xpass",
                                   message=f"XPASS: {e.case} passes now: remove the expected-failure entry "
                                           f"({e.reason} <{e.link}>)",
                                   details=f"XPASS: remove the expected-failure entry for {e.case} ({e.link})"))
    if res.crash:
        out.append(TestOutcome(suite="gate", classname="gate.run", name="conformance run", status="error",
                               kind="crash", message=res.crash[:1000], details=res.crash))
    return out


def format_summary(res: GateResult, paths: dict) -> str:
    s = res.summary()
    vs = "".join(f", {k} {v}" for k, v in sorted(s["verdicts"].items()))
    lines = [f"DSV4 conformance gate: {s['gate']} (arch {s['arch']}, {s['rows']} results{vs})"]
    if res.crash:
        cl = [ln for ln in res.crash.strip().splitlines() if ln.strip()] or ["?"]
        lines.append(f"  CRASH: {cl[0][:300]}")
        if len(cl) > 1:
            lines.append(f"    last output: {cl[-1][:300]}")
    by_case: dict = {}
    for r in res.failing:
        by_case.setdefault((r["subject"], r["case_id"]), []).append(r)
    for (subj, cid), rs in list(by_case.items())[:15]:
        lv = ", ".join(f"{r['level']} {r['verdict']}" for r in rs)
        lines.append(f"  FAIL {subj} {cid} ({lv})  rerun: {rs[0].get('rerun') or '-'} --repeat 5")
    if len(by_case) > 15:
        lines.append(f"  ... {len(by_case) - 15} more failing cases (see gate.html)")
    failing_keys = {row_key(r) for r in res.failing}
    regs = [c for c in res.regressions if c.key not in failing_keys]
    for c in regs[:15]:
        lines.append(f"  REGRESSION {c.subject} {c.case_id} [{c.level}]: {'; '.join(c.reasons)}")
    if len(regs) > 15:
        lines.append(f"  ... {len(regs) - 15} more regressions (see gate.html)")
    if res.regressions and len(regs) < len(res.regressions):
        lines.append(f"  ({len(res.regressions) - len(regs)} of the failing results are also regressions "
                     f"against the baseline)")
    for r, e in res.xfailed[:10]:
        lines.append(f"  xfail: {r['subject']} {r['case_id']} [{r['level']}]: {e.reason} <{e.link}>")
    for e in res.xpassed:
        lines.append(f"  XPASS: {e.case} passes now: remove its expected-failure entry ({e.link})")
    for e in res.expected:
        if e.status == "unused":
            lines.append(f"  note: expected-failure entry {e.case!r} matched no result")
    if res.comparison:
        c = res.comparison.counts
        lines.append(f"  vs baseline {res.baseline.path}: worse {c['worse']}, better {c['better']}, "
                     f"backend changed {c['backend-changed']}, new {c['new']}, missing {c['missing']}")
    else:
        lines.append("  no baseline: only failing cases gate")
    lines.append("  " + "  ".join(f"{k}: {v}" for k, v in paths.items()))
    return "\n".join(lines)


def run_suite(out: Path, run_args: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``python -m conformance run`` in a child process, so a crash (even a segfault) cannot take the
    gate down with it. Returns (rc, crash message or "")."""
    out.mkdir(parents=True, exist_ok=True)
    # nothing of an earlier run may be judged if this one dies before the plugin clears the folder
    for f in [*(out / "results").glob("*.jsonl"), *(out / n for n in ("manifest.json", "report.html", "junit.xml",
                                                                    "gate.html", "gate.json", "subjects.json"))]:
        f.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "conformance", "run", "--out", str(out), *run_args]
    log = out / "gate-run.log"
    with open(log, "w") as f:
        f.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return None, f"the conformance run timed out after {timeout:.0f} s (log: {log})"
    tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:])
    if rc in (0, 1):
        return rc, ""
    meaning = {2: "interrupted", 3: "pytest internal error", 4: "usage error", 5: "no cases collected"}
    what = meaning.get(rc, f"killed by signal {-rc}" if rc < 0 else f"exit {rc}")
    return rc, f"the conformance run crashed ({what}, rc {rc}); log {log}:\n{tail}"


def gate(*, baseline: str | None, out: str | Path, run_dir: str | None = None, run_args: list[str] | None = None,
         expected_failures: str | None = None, thresholds=None, junit: str | None = None,
         strict_xfail: bool = False, allow_arch_mismatch: bool = False, allow_missing_baseline: bool = False,
         timeout: float = 3600, printer=print, fail_on_backend_change: list[str] | None = None) -> GateResult:
    expected = load_expected(expected_failures)
    out = Path(run_dir or out)
    crash, rc = "", None
    t0 = time.perf_counter()
    if run_dir is None:
        rc, crash = run_suite(out, list(run_args or []), timeout)
    if crash or run_dir is not None:
        from .isolate import adopt_orphans

        adopt_orphans(out)    # a case whose process died (no isolation) is a crashed row
    elif not out.is_dir():
        raise GateError(f"--run {out}: no such run folder")
    try:
        run = load_run(out)
    except StoreError as e:
        if run_dir is not None and not (out / "results").exists():
            raise GateError(str(e)) from None
        run = Run(str(out), {"arch": "cpu", "note": f"unreadable: {e}"}, [])
        crash = crash or str(e)
    base = None
    if baseline:
        try:
            base = load_baseline(baseline, run.arch)
        except StoreError as e:
            if not (allow_missing_baseline and "no baseline" in str(e)):
                raise GateError(str(e)) from None
            printer(f"note: {e}; gating on failing cases only (--allow-missing-baseline)")
        if base.arch != run.arch and not allow_arch_mismatch:
            raise GateError(f"baseline {base.path} is for arch {base.arch}, this run is {run.arch} "
                            f"(--allow-arch-mismatch to compare anyway)")
    if fail_on_backend_change and base is None:
        raise GateError("--fail-on-backend-change needs a baseline to compare backends with")
    res = judge(run, base, expected, thresholds, crash=crash, run_rc=rc, strict_xfail=strict_xfail,
                fail_on_backend_change=fail_on_backend_change)
    paths = write_outputs(res, out, junit)
    s = res.summary() | {"wall_s": round(time.perf_counter() - t0, 1), "paths": {k: str(v) for k, v in paths.items()}}
    s["expected_failures"] = [{"case": e.case, "subject": e.subject, "level": e.level, "status": e.status,
                               "reason": e.reason, "link": e.link, "matched": [key_str(k) for k in e.matched]}
                              for e in expected]
    s["failing_rows"] = [key_str(row_key(r)) for r in res.failing]
    s["regression_rows"] = [c.to_json() for c in res.regressions]
    (out / "gate.json").write_text(json.dumps(s, indent=1, default=str))
    text = format_summary(res, paths)
    (out / "gate-summary.txt").write_text(text + "\n")
    printer(text)
    return res


def write_outputs(res: GateResult, out: Path, junit: str | None) -> dict:
    from reports.render import render_gate, render_report

    paths = {}
    try:
        paths["report"] = render_report(out)
    except Exception as e:  # noqa: BLE001 - the gate page and JUnit must still come out
        res.crash = res.crash or f"report rendering failed: {type(e).__name__}: {e}"
    jp = Path(junit) if junit else out / "junit.xml"
    write_junit(outcomes(res), jp, properties={"arch": res.run.arch, "baseline": res.baseline.path if res.baseline
                                               else "", "gate": "PASS" if res.passed else "FAIL"})
    validate(jp)
    paths["junit"] = jp
    paths["gate"] = render_gate(res, out / "gate.html")
    return paths
