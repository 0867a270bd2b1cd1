"""Render the HTML report from a results folder: one self-contained file, no network, every value escaped.

Sections: a banner per subject (device, dialect, implementation, EMULATED, REAL RUN ON <device>, GOLDEN SELF-CHECK), the
components x checks matrix per subject (worst verdict, worst error against bound), the coverage table
(which components each subject provides, with the function and backend), dialect maps, and per-case
details with an inline error histogram and the command that reruns that case alone.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import jinja2

from conformance.results import VERDICT_RANK, load_rows

TEMPLATES = Path(__file__).parent / "templates"


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
                             undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = _fmt
    env.filters["histogram_svg"] = histogram_svg
    return env


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return v


def histogram_svg(hist) -> str:
    """Inline SVG bars of log10(|err| / bound); the red line marks the bound (x = 0)."""
    if not hist:
        return ""
    w, h, n = 260, 60, len(hist)
    top = max(c for _, c in hist) or 1
    bw = w / n
    bars = []
    for i, (edge, c) in enumerate(hist):
        bh = (h - 12) * c / top
        color = "#c0392b" if edge >= 0 else "#2e86c1"
        bars.append(f'<rect x="{i * bw:.1f}" y="{h - 12 - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}" '
                    f'fill="{color}"><title>log10(err/bound) in [{edge:g}, {edge + 0.5:g}): {c}</title></rect>')
    zero = next((i for i, (e, _) in enumerate(hist) if e >= 0), n) * bw
    axis = (f'<line x1="{zero:.1f}" y1="0" x2="{zero:.1f}" y2="{h - 12}" stroke="#c0392b" stroke-dasharray="2"/>'
            f'<text x="0" y="{h - 1}" font-size="9">1e{hist[0][0]:g}</text>'
            f'<text x="{zero - 12:.1f}" y="{h - 1}" font-size="9">bound</text>')
    return f'<svg width="{w}" height="{h}" role="img">{"".join(bars)}{axis}</svg>'


def _worst(rows):
    return max(rows, key=lambda r: VERDICT_RANK.get(r["verdict"], 0))


def build_context(out: Path) -> dict:
    rows = load_rows(out)
    subjects = json.loads((out / "subjects.json").read_text()) if (out / "subjects.json").exists() else {}
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    command = (out / "command.txt").read_text().strip() if (out / "command.txt").exists() else ""
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    unfinished = bool(manifest) and manifest.get("finished") is None
    by_subject = defaultdict(list)
    for r in rows:
        by_subject[r["subject"]].append(r)
    for s in subjects:
        by_subject.setdefault(s, [])
    components = sorted({r["component"] for r in rows} | {c for s in subjects.values() for c in s.get("provides", {})})
    columns = sorted({(r["check"], r["level"]) for r in rows if r["level"] != "-"})
    matrix = {}
    for s, srows in by_subject.items():
        grid = defaultdict(list)
        for r in srows:
            grid[(r["component"], r["check"], r["level"])].append(r)
            if r["level"] == "-":  # not-provided / error before any level: show in every column
                for c in columns:
                    grid[(r["component"], c[0], c[1])].append(r)
        cells = {}
        for comp in components:
            for chk, lvl in columns:
                rs = grid.get((comp, chk, lvl))
                if rs:
                    w = _worst(rs)
                    wob = [v for k, v in w.get("metrics", {}).items() if k.endswith("worst_over_bound")]
                    cells[(comp, chk, lvl)] = {"verdict": w["verdict"], "n": len(rs),
                                               "worst_over_bound": max(wob) if wob else None,
                                               "anchor": _anchor(s, w["case_id"], w["level"])}
        matrix[s] = cells
    counts = defaultdict(lambda: defaultdict(int))
    for r in rows:
        counts[r["subject"]][r["verdict"]] += 1
    dialect_maps = [(r["subject"], r["case_id"], r["extra"]["dialect_map"]) for r in rows
                    if isinstance(r.get("extra"), dict) and r["extra"].get("dialect_map")]
    for r in rows:
        r["anchor"] = _anchor(r["subject"], r["case_id"], r["level"])
    details = sorted(rows, key=lambda r: (r["subject"], -VERDICT_RANK.get(r["verdict"], 0), r["case_id"]))
    coverage = {s: dict(subjects.get(s, {}).get("provides", {})) for s in by_subject}
    for r in rows:   # whole-model rows (e2e) are not in provides(): the rows name what ran
        cov = coverage.setdefault(r["subject"], {})
        if r["component"] not in cov and r.get("function"):
            cov[r["component"]] = {"function": r["function"], "backend": r.get("backend") or "?",
                                   "note": f"(as the {r['check']} rows record it)"}
    any_emulated = any(v.get("emulated") for v in subjects.values())
    return dict(rows=rows, subjects=subjects, env=env, command=command, components=components,
                columns=columns, matrix=matrix, counts={k: dict(v) for k, v in counts.items()},
                details=details, coverage=coverage, dialect_maps=dialect_maps, any_emulated=any_emulated,
                subject_order=list(by_subject), manifest=manifest, unfinished=unfinished)


def _anchor(subject, case_id, level) -> str:
    return "c-" + "".join(ch if ch.isalnum() else "-" for ch in f"{subject}-{case_id}-{level}")


def render_report(out: str | Path, path: str | Path | None = None) -> Path:
    out = Path(out)
    ctx = build_context(out)
    html = _env().get_template("report.html.j2").render(**ctx)
    dest = Path(path) if path else out / "report.html"
    dest.write_text(html)
    return dest


def _verdict_of(r):
    return r["verdict"] if r else "—"


def compare_context(cmp, gate=None) -> dict:
    """Context for compare.html.j2: the comparison (may be None in a gate without baseline) and the gate."""
    sections = []
    if cmp is not None:
        for title, key, items in (("Worse", "worse", cmp.worse), ("Better", "better", cmp.better),
                                  ("Backend changed", "backend-changed", cmp.backend_changed),
                                  ("Provided changed", "provided-changed", cmp.provided_changed),
                                  ("New", "new", cmp.new), ("Missing", "missing", cmp.missing)):
            rows = []
            for c in items:
                a, b = c.a or {}, c.b or {}
                metrics = sorted(set(a.get("metrics") or {}) | set(b.get("metrics") or {}))
                rows.append({"subject": c.key[0], "case_id": c.key[1], "check": c.key[2], "level": c.key[3],
                             "component": b.get("component") or a.get("component", ""),
                             "va": _verdict_of(c.a), "vb": _verdict_of(c.b), "reasons": c.reasons,
                             "ran_a": f"{a.get('function', '')} [{a.get('backend', '')}]" if c.a else "—",
                             "ran_b": f"{b.get('function', '')} [{b.get('backend', '')}]" if c.b else "—",
                             "metrics": [(m, (a.get("metrics") or {}).get(m, "—"), (b.get("metrics") or {}).get(m, "—"))
                                         for m in metrics],
                             "message": b.get("message") or a.get("message", ""), "rerun": b.get("rerun", "")})
            sections.append({"title": title, "key": key, "rows": rows})
    ctx = {"cmp": cmp, "sections": sections, "gate": None,
           "label_a": cmp.a.label() if cmp else "", "label_b": cmp.b.label() if cmp else "",
           "counts": cmp.counts if cmp else {}, "thresholds": [t.spec for t in cmp.thresholds] if cmp else [],
           "env_a": (cmp.a.manifest.get("env") or {}) if cmp else {},
           "env_b": (cmp.b.manifest.get("env") or {}) if cmp else {}}
    if gate is not None:
        ctx["gate"] = {
            "passed": gate.passed, "summary": gate.summary(), "crash": gate.crash,
            "run_label": gate.run.label(),
            "failing": [{"subject": r["subject"], "case_id": r["case_id"], "level": r["level"],
                         "verdict": r["verdict"], "message": r.get("message", ""), "rerun": r.get("rerun", "")}
                        for r in gate.failing],
            "xfailed": [{"subject": r["subject"], "case_id": r["case_id"], "level": r["level"],
                         "verdict": r["verdict"], "reason": e.reason, "link": e.link} for r, e in gate.xfailed],
            "expected": [{"case": e.case, "subject": e.subject, "level": e.level, "status": e.status,
                          "reason": e.reason, "link": e.link, "n": len(e.matched)} for e in gate.expected],
        }
    return ctx


def render_compare(cmp, path: str | Path, gate=None) -> Path:
    html = _env().get_template("compare.html.j2").render(**compare_context(cmp, gate))
    dest = Path(path)
    dest.write_text(html)
    return dest


def render_gate(gate, path: str | Path) -> Path:
    return render_compare(gate.comparison, path, gate=gate)
