"""Render the HTML report from a results folder: one self-contained file, no network, every value escaped.

Sections: a banner per subject (device, dialect, implementation, EMULATED, REAL RUN ON <device>, GOLDEN SELF-CHECK), the
components x checks matrix per subject (worst verdict, worst error against bound), the coverage table
(which components each subject provides, with the function and backend), dialect maps, and per-case
details with an inline error histogram and the command that reruns that case alone.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import jinja2

from conformance.results import FAILING, SEVERITY, SEVERITY_RANK, VERDICT_RANK, load_rows

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
    return max(rows, key=lambda r: (SEVERITY_RANK.get(r["verdict"], 0), _wob(r) or 0.0))


def _num(v):
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _wob(r) -> float | None:
    """The row's worst error as a multiple of its bound (max over outputs), None where it has none."""
    vals = [_num(v) for k, v in (r.get("metrics") or {}).items() if k.endswith("worst_over_bound")]
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return max(vals) if vals else None


def measured_vs_allowed(r) -> str:
    """The metric furthest past (or closest to) its bound: 'name = measured (allowed bound)'."""
    best = None
    for k, b in (r.get("bounds") or {}).items():
        m, bb = _num((r.get("metrics") or {}).get(k)), _num(b)
        if m is None or bb is None:
            continue
        ratio = abs(m) / abs(bb) if bb else (math.inf if m else 0.0)
        if best is None or ratio > best[0]:
            best = (ratio, k, m, bb)
    if best is None:
        w = _wob(r)
        return f"worst_over_bound = {w:.4g}" if w is not None else ""
    return f"{best[1]} = {best[2]:.4g} (allowed {best[3]:.4g})"


_LABEL = re.compile(r"^\[[^\]]*\]\s*")
_NUM = re.compile(r"[-+]?\d+(\.\d+)?([eE][-+]?\d+)?")


def diagnosis(r) -> tuple[str, str]:
    """(diagnosis, where) of a failing row, for grouping: same defect on the same component / edge."""
    extra = r.get("extra") if isinstance(r.get("extra"), dict) else {}
    if r["verdict"] == "crashed":
        c = extra.get("crash") or {}
        kind = {"signal": c.get("signal_name") or "signal", "exit": f"exit {c.get('exit_code')}",
                "timeout": "timeout", "memory": "MemoryError"}.get(c.get("kind"), c.get("kind") or "died")
        return f"crashed ({kind})", r["component"]
    if r["check"] == "dialect":
        e = extra.get("edge") or {}
        if r["component"] == "dialect_map":
            return "dialect map inconsistent", "dialect map"
        f = e.get("factor") or ""
        return (f"dialect {f}" if f else f"dialect {e.get('verdict', r['verdict'])}"), f"edge {r['component']}"
    # the row's "[component | case | subject]" label first (it holds " | " itself), then the first output's part
    first = (r.get("message") or "").strip().splitlines()[0] if (r.get("message") or "").strip() else ""
    msg = _LABEL.sub("", first).split(" | ")[0].strip()
    msg = _VS.sub("", msg)            # "vs emulated:ocp ..." names the level, not the defect
    cls = next((name for pat, name in _CLASSES if re.search(pat, msg)), None)
    if r["verdict"] == "error":
        m = re.search(r"raised (\w+)", msg)
        head = f"raised {m.group(1)}" if m else "error"
    elif cls:
        head = cls
    else:   # no known class: the message's first clause, numbers and paths folded so equal defects group
        head = f"{r['verdict']}: " + _NUM.sub("N", re.sub(r"\S*/\S*", "", msg)).strip()[:70]
    return head, f"component {r['component']}"


_VS = re.compile(r"^vs \S+\s*")
# diagnosis classes of the checks' messages (conformance.metrics / checks.routing wording), most specific first
_CLASSES = ((r"systematic gain", "systematic gain"), (r"systematic offset", "systematic offset"),
            (r"weights beyond the derived bound", "router weights beyond their bound"),
            (r"routed to a different expert set|set mismatch", "routing set mismatch"),
            (r"select a different set|index set", "index set mismatch"),
            (r"\bNaN\b|\bInf\b|non-finite", "NaN / Inf where the golden is finite"))


def failure_groups(rows: list[dict], subjects: dict) -> list[dict]:
    groups: dict = {}
    for r in rows:
        if r["verdict"] not in FAILING or r.get("component") == "dialect_map":
            continue
        groups.setdefault(diagnosis(r), []).append(r)
    out = []
    for (diag, where), rs in groups.items():
        w = _worst(rs)
        info = subjects.get(w["subject"], {})
        label = info.get("banner") or (f"{w['subject']} on {w.get('device') or info.get('device', '?')}"
                                       + (" [EMULATED]" if w.get("emulated") else ""))
        crash = ((w.get("extra") or {}).get("crash") or {}) if isinstance(w.get("extra"), dict) else {}
        out.append({"diagnosis": diag, "where": where, "n": len(rs), "worst": w, "verdict": w["verdict"],
                    "subjects": sorted({r["subject"] for r in rs}), "cases": len({r["case_id"] for r in rs}),
                    "measured": measured_vs_allowed(w), "device_label": label,
                    "rerun": w.get("rerun", ""), "run_command": crash.get("run_command", ""),
                    "component": w["component"], "check": w["check"]})
    out.sort(key=lambda g: (-SEVERITY_RANK.get(g["verdict"], 0), -g["n"], g["where"]))
    return out


def component_matrix(rows: list[dict], components: list[str], subjects: list[str]) -> dict:
    """(component, subject) -> worst verdict, worst error/bound, and the per-(check, level) detail."""
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["component"], r["subject"]), []).append(r)
    out = {}
    for (comp, subj), rs in cells.items():
        w = _worst(rs)
        wobs = [x for x in map(_wob, rs) if x is not None]
        levels: dict = {}
        for r in rs:
            levels.setdefault(f"{r['check']}/{r['level']}", []).append(r)
        detail = []
        for lv, lrs in sorted(levels.items()):
            lw = _worst(lrs)
            lwobs = [x for x in map(_wob, lrs) if x is not None]
            detail.append({"level": lv, "verdict": lw["verdict"], "n": len(lrs),
                           "wob": max(lwobs) if lwobs else None, "anchor": _anchor(subj, lw["case_id"], lw["level"])})
        out[(comp, subj)] = {"verdict": w["verdict"], "wob": max(wobs) if wobs else None, "n": len(rs),
                             "checks": sorted({r["check"] for r in rs}), "detail": detail}
    return out


VCOLOR = {"pass": "#27ae60", "xfail": "#8e44ad", "degraded": "#f1c40f", "xpass": "#e67e22", "fail": "#e74c3c",
          "catastrophic": "#922b21", "error": "#c0392b", "crashed": "#4a0e0e", "not-provided": "#aaaaaa",
          "needs-gpu": "#aaaaaa", "not-run": "#aaaaaa"}


def _esc(s) -> str:
    return (str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;"))


def dialect_svg(edges: list[dict]) -> str:
    """Producer -> consumer edges of one subject's FP8 dialect map, each line coloured by its verdict."""
    prods = sorted({e["producer"] for e in edges})
    cons = sorted({e["consumer"] for e in edges})
    if not prods:
        return ""
    h = 26 * max(len(prods), len(cons)) + 20
    w = 520
    py = {p: 20 + 26 * i for i, p in enumerate(prods)}
    cy = {c: 20 + 26 * i for i, c in enumerate(cons)}
    parts = []
    for e in edges:
        col = VCOLOR.get(e["verdict"], "#999")
        y1, y2 = py[e["producer"]], cy[e["consumer"]]
        label = f"{e['edge']}: {e['verdict']}" + (f" {e['factor']}" if e.get("factor") else "")
        parts.append(f'<line x1="170" y1="{y1}" x2="350" y2="{y2}" stroke="{col}" stroke-width="3">'
                     f'<title>{_esc(label)}</title></line>')
        if e.get("factor"):
            parts.append(f'<text x="{(170 + 350) / 2:.0f}" y="{(y1 + y2) / 2 - 3:.0f}" font-size="11" fill="{col}" '
                         f'text-anchor="middle">{_esc(e["factor"])}</text>')
    for p, y in py.items():
        parts.append(f'<text x="165" y="{y + 4}" font-size="12" text-anchor="end">{_esc(p)}</text>'
                     f'<circle cx="170" cy="{y}" r="4" fill="#333"/>')
    for c, y in cy.items():
        parts.append(f'<circle cx="350" cy="{y}" r="4" fill="#333"/><text x="356" y="{y + 4}" font-size="12">'
                     f'{_esc(c)}</text>')
    return f'<svg class="dmap" width="{w}" height="{h}" role="img">{"".join(parts)}</svg>'


def wob_svg(matrix: dict, components: list[str], subjects: list[str]) -> str:
    """Worst error / bound per component (rows) for every subject (one coloured mark each), log axis; the red
    line is the bound."""
    comps = [c for c in components if any((matrix.get((c, s)) or {}).get("wob") is not None for s in subjects)]
    if not comps:
        return ""
    lo, hi = -4.0, 2.0
    x0, x1, rh = 170, 620, 18
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf"]
    col = {s: palette[i % len(palette)] for i, s in enumerate(subjects)}

    def x(v):
        lv = math.log10(max(v, 10 ** lo)) if v > 0 else lo
        return x0 + (min(max(lv, lo), hi) - lo) / (hi - lo) * (x1 - x0)
    parts = []
    for i, c in enumerate(comps):
        y = 24 + rh * i
        parts.append(f'<text x="{x0 - 6}" y="{y + 4}" font-size="11" text-anchor="end">{_esc(c)}</text>'
                     f'<line x1="{x0}" y1="{y}" x2="{x1}" y2="{y}" stroke="#eee"/>')
        for s in subjects:
            cell = matrix.get((c, s)) or {}
            v = cell.get("wob")
            if v is None:
                continue
            parts.append(f'<circle cx="{x(v):.1f}" cy="{y}" r="4" fill="{col[s]}" fill-opacity=".8">'
                         f'<title>{_esc(s)} {_esc(c)}: worst {v:.3g} x bound ({_esc(cell["verdict"])})</title>'
                         f'</circle>')
    h = 24 + rh * len(comps) + 30
    for e in range(int(lo), int(hi) + 1):
        parts.append(f'<text x="{x(10 ** e):.0f}" y="{h - 16}" font-size="10" text-anchor="middle">1e{e}</text>')
    parts.append(f'<line x1="{x(1):.1f}" y1="10" x2="{x(1):.1f}" y2="{h - 28}" stroke="#c0392b" '
                 f'stroke-dasharray="3"/>')
    legend = "".join(f'<tspan fill="{col[s]}">&#9679; {_esc(s)}  </tspan>' for s in subjects)
    parts.append(f'<text x="{x0}" y="{h - 2}" font-size="11">{legend}</text>')
    return f'<svg class="wob" width="{x1 + 20}" height="{h}" role="img">{"".join(parts)}</svg>'


def dialect_edges(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        e = (r.get("extra") or {}).get("edge") if isinstance(r.get("extra"), dict) else None
        if r["check"] == "dialect" and e and e.get("producer"):
            out.setdefault(r["subject"], []).append({"edge": r["component"], "producer": e["producer"],
                                                     "consumer": e.get("consumer", "?"), "verdict": r["verdict"],
                                                     "factor": e.get("factor") or ""})
    return out


def subject_row_devices(subjects: dict, by_subject: dict) -> dict:
    """subject -> {device: sorted checks} for rows that computed on another device than the subject's banner
    names (the graph rows of ``reference`` ran on the GPU, its numeric rows on the CPU). Rows that did not
    run (needs-gpu, not-run, not-provided) name no device."""
    out: dict = {}
    for s, srows in by_subject.items():
        own = subjects.get(s, {}).get("device")
        devs: dict = {}
        for r in srows:
            d = r.get("device")
            if d and d != own and r["verdict"] not in ("needs-gpu", "not-run", "not-provided"):
                devs.setdefault(d, set()).add(r["check"])
        if devs:
            out[s] = {d: sorted(c) for d, c in devs.items()}
    return out


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
    order = list(by_subject)
    cmatrix = component_matrix(rows, components, order)
    totals = defaultdict(int)
    for r in rows:
        totals[r["verdict"]] += 1
    edges = dialect_edges(rows)
    failing = [r for r in details if r["verdict"] in FAILING]
    for r in rows:
        r["wob"] = _wob(r)
        r["mva"] = measured_vs_allowed(r)
    other_devices = subject_row_devices(subjects, by_subject)
    return dict(other_devices=other_devices, rows=rows, subjects=subjects, env=env, command=command,
                components=components,
                columns=columns, matrix=matrix, counts={k: dict(v) for k, v in counts.items()},
                details=details, coverage=coverage, dialect_maps=dialect_maps, any_emulated=any_emulated,
                subject_order=order, manifest=manifest, unfinished=unfinished,
                totals=sorted(totals.items(), key=lambda kv: -SEVERITY_RANK.get(kv[0], 0)),
                groups=failure_groups(rows, subjects), cmatrix=cmatrix, failing=failing,
                dialect_svgs=[(s, dialect_svg(e)) for s, e in edges.items()],
                wob_svg=wob_svg(cmatrix, components, order), checks=sorted({r["check"] for r in rows}),
                verdicts=[v for v in reversed(SEVERITY) if totals.get(v)])


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
