"""bisect.html: one self-contained page per bisect (steps, verdicts per release, what changed, rerun commands).

Written by ``conformance.bisect.run_bisect`` beside ``bisect.json``, also when the bisect was refused (the page
then leads with the refusal). Rows come from each step's ``steps/<version>/verdicts.json``.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from .render import _env


def _rows(out: Path, version: str) -> list[dict]:
    p = out / "steps" / version / "verdicts.json"
    return json.loads(p.read_text()).get("rows", []) if p.exists() else []


def _levels(rows: list[dict]) -> dict[str, str]:
    out = {}
    for r in rows:
        out.update(r.get("levels") or {})
    return out


def _rerun(summary: dict, step: dict) -> str:
    pred = summary["predicate"]
    py = step.get("python") or "python"
    repo = str(Path(__file__).resolve().parents[1])
    if pred.startswith("case:"):
        ids, _, subject = pred[5:].rpartition("@")
        if ids.startswith("e2e/"):
            return (f"PYTHONPATH={shlex.quote(repo)} {shlex.quote(py)} -m conformance run --subject "
                    f"{shlex.quote(subject)} --out out/e2e-{step['version']} -- -k test_e2e")
        return "; ".join(f"PYTHONPATH={shlex.quote(repo)} {shlex.quote(py)} -m conformance rerun {shlex.quote(c)} "
                         f"--subject {shlex.quote(subject)}" for c in ids.split(","))
    if pred.startswith("probe:"):
        return f"PYTHONPATH={shlex.quote(repo)} {shlex.quote(py)} -m conformance.probe_runner {shlex.quote(pred[6:])}"
    return ""


def render_bisect(summary: dict, out: str | Path) -> Path:
    out = Path(out)
    steps = sorted(summary.get("steps", []), key=lambda s: summary["versions"].index(s["version"])
                   if s["version"] in summary.get("versions", []) else 0)
    for s in steps:
        s["rows"] = _rows(out, s["version"])
        s["levels"] = _levels(s["rows"])
        s["rerun"] = _rerun(summary, s)
    changed = []
    lg, fb = summary.get("last_good"), summary.get("first_bad")
    if lg and fb:
        a = next((s["levels"] for s in steps if s["version"] == lg), {})
        b = next((s["levels"] for s in steps if s["version"] == fb), {})
        changed = [(k, a.get(k, "—"), b.get(k, "—")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    html = _env().get_template("bisect.html.j2").render(s=summary, steps=steps, changed=changed)
    path = out / "bisect.html"
    path.write_text(html)
    return path
