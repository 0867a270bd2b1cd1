"""Findings: one page per distinct defect of a run, grouped from its failing rows (``python -m conformance findings``).

A finding groups the failing rows of one subject that share the component (or dialect edge) and the function that
ran, or that match one known finding (``KNOWN``); its diagnoses (dialect defect kind, routing set mismatch, weights
beyond bound, systematic gain, NaN, ...) are listed.
Each page says:

* what kind of finding it is, and why:
  - **defect in the implementation**: a row failed against a bound derived for it (fail / catastrophic / xpass);
  - **difference between sources**: a declared spec-8 divergence (the e2e ``finding`` rows, xfail with provenance);
  - **harness limitation**: the implementation raised under the harness's adapter (verdict ``error``): the
    adapter or the binding may be at fault, the traceback is in the row;
* the subject, its implementation and release, device and FP8 dialect (from the run's manifest), the functions
  that ran, and the source lines blamed where the finding is a known one (``KNOWN``);
* the cases with their verdicts and worst measured-vs-allowed metrics, and the one-command reproduction of each;
* the effect: the diagnosis messages, and whether the run's whole-model (e2e) rows of that subject passed.

Pages go to ``<out>/<slug>.md`` with an ``index.md``; ``findings(rows, manifest)`` returns the same as data.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

FAILING = {"fail", "catastrophic", "error", "xpass"}

# Findings known from reading vLLM's source: what to blame beyond the function names the rows record.
# (subject pattern, component pattern, function pattern) -> title, source lines, note.
KNOWN = [
    {"match": ("vllm*", "moe.*", "*biased_topk_cpu*|*hash_topk_cpu*"),
     "title": "sqrt-softplus router weights at underflowing logits (vLLM CPU router)",
     "source": ["vllm/model_executor/layers/fused_moe/router/cpu_router.py: _sqrtsoftplus_bias_topk",
                "csrc/cpu (torch.ops._C.biased_topk_cpu / hash_topk_cpu)"],
     "note": "weights of experts whose softplus underflows are returned as 0 (or NaN after renormalisation) where "
             "the golden's are tiny but finite; the selected expert sets can change"},
    {"match": ("vllm*", "*cache->sparse_attn", "*_cpu*"),
     "title": "fp8_ds_mla cache writers / readers flush or misdecode e4m3 subnormals (vLLM CPU ops)",
     "source": ["torch.ops._C.fused_qnorm_rope_kv_insert_cpu (SWA cache writer)",
                "torch.ops._C.compress_norm_rope_store_cpu (compressed cache writer)",
                "torch.ops._C.flash_mla_with_kvcache_cpu (reader)"],
     "note": "values whose e4m3 code is subnormal are written as 0 or read back wrongly; normal codes are exact"},
    {"match": ("*gfx942*", "indexer_k->logits", "*fused_compress_quant_cache*"),
     "title": "gfx942: indexer K cache written in OCP e4m3, read as fnuz (x0.5 on indexer_k -> logits)",
     "source": ["vllm/models/deepseek_v4/common/ops/fused_compress_quant_cache.py: the indexer compressor kernel "
                "converts with tl.float8e4nv and FP8_MAX=448 (OCP)",
                "vllm/v1/attention/ops/rocm_aiter_mla_sparse.py: fp8_paged_mqa_logits_torch views the cache as "
                "current_platform.fp8_dtype() (fnuz on gfx942)"],
     "note": "a uniform x0.5 keeps the top-k ranking; but an OCP byte 0x80 (-0, from a tiny negative) reads as "
             "NaN in fnuz, and NaN reaches the logits: under vllm:sim-gfx942 one block with 16 tiny negatives "
             "gave 16 bytes 0x80 and made every probe logit of that key NaN (conformance.checks.dialect.negzero; "
             "pytest tests/vllm/test_sim_bindings.py -k negative_zero)"},
]


# Findings carried by a row's message whatever its verdict (a probe's note: the edge itself passed):
# (subject pattern, component pattern, message regex) -> as KNOWN, plus the kind and why it is that kind.
NOTED = [
    {"match": ("vllm*", "weights->gemm", r"e8m0 (weight )?scales.*NotImplementedError"),
     "title": "normalize_e4m3fn_to_e4m3fnuz with e8m0 weight scales (gfx942 weight loading): raises on this torch",
     "kind": "harness-limitation",
     "why": "the error comes from torch, not from vLLM: normalize_e4m3fn_to_e4m3fnuz doubles the scale with "
            "`weight_scale * 2.0` in the scale's own dtype, and this torch's CPU kernel has no multiply for "
            "float8_e8m0fnu (\"mul_cpu_reduced_float\" not implemented). vLLM has no e8m0-aware path (exponent byte "
            "+ 1), so the outcome on a ROCm device depends on ROCm torch's e8m0 multiply: not determined here",
     "source": ["vllm/model_executor/layers/quantization/utils/w8a8_utils.py: normalize_e4m3fn_to_e4m3fnuz "
                "(weight_scale = weight_scale * 2.0)",
                "callers: quantization/fp8.py (MoE w13/w2), fbgemm_fp8.py, compressed_tensors_moe_w8a8_fp8.py, "
                "quark_moe.py"],
     "note": "a loud failure where it raises (a load error, not a silent wrong value); the edge's fp32-scale "
             "conversion is judged separately and passes (0x80 cleared, scale x2)"},
]


@dataclass
class Finding:
    slug: str
    title: str
    kind: str                     # defect | source-difference | harness-limitation
    why: str
    subject: str
    component: str
    diagnosis: str
    functions: list
    rows: list = field(default_factory=list)
    source: list = field(default_factory=list)
    note: str = ""


def diagnosis(r: dict) -> str:
    """A short class of what went wrong in one row (the grouping key besides component and function)."""
    msg = r.get("message", "")
    edge = (r.get("extra") or {}).get("edge") or {}
    kinds = sorted({d.get("kind", "") for d in edge.get("defects", []) if d.get("kind")})
    if kinds:
        return "dialect: " + ", ".join(kinds)
    if r.get("check") == "dialect":
        m = re.search(r"(x0\.5|x2|448-vs-240|NaN at 0x80)", msg)
        return f"dialect: {m.group(1)}" if m else "dialect"
    if r["verdict"] == "error":
        m = re.search(r"raised (\w+)", msg)
        return f"raised {m.group(1)}" if m else "error"
    for pat, name in ((r"systematic gain", "systematic gain"), (r"systematic offset", "systematic offset"),
                      (r"NaN|Inf", "NaN/Inf"), (r"routed to a different expert set", "routing set mismatch"),
                      (r"weights beyond the derived bound", "weights beyond bound"),
                      (r"select a different set", "index set mismatch")):
        if re.search(pat, msg):
            return name
    return f"{r.get('check', '')} {r['verdict']}"


def _kind(rows: list[dict]) -> tuple[str, str]:
    if all(r["verdict"] == "xfail" for r in rows):
        return "source-difference", ("declared divergence between the sources (spec section 8) with its provenance; "
                                     "measured, not a defect of the implementation")
    if all(r["verdict"] == "error" for r in rows):
        return "harness-limitation", ("the implementation raised under the harness's adapter: the adapter, the "
                                      "binding or the implementation may be at fault (traceback in the row)")
    return "defect", "rows failed against bounds derived for them (see each case's bound and derivation)"


def _known(subject: str, component: str, functions: list) -> dict | None:
    for k in KNOWN:
        s, c, f = k["match"]
        if fnmatch.fnmatchcase(subject, s) and fnmatch.fnmatchcase(component, c) and any(
                fnmatch.fnmatchcase(fn, p) for fn in functions for p in f.split("|")):
            return k
    return None


def _slug(*parts: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")[:80]


def findings(rows: list[dict]) -> list[Finding]:
    groups: dict[tuple, list] = {}
    for r in rows:
        finding_row = r["verdict"] == "xfail" and r.get("case_id", "").startswith("e2e/finding/")
        if r["verdict"] not in FAILING and not finding_row:
            continue
        if r.get("case_id") == "dialect/map" or r.get("component") == "dialect_map":
            continue   # the map row summarises the edge rows, which are grouped themselves
        key = (r["subject"], r["component"] if not finding_row else r["case_id"], r.get("function", ""))
        groups.setdefault(key, []).append(r)
    merged: dict[tuple, tuple] = {}   # groups that match one known finding of one subject are one defect
    for (subject, component, function), rs in sorted(groups.items()):
        functions = sorted({r.get("function", "") for r in rs if r.get("function")})
        known = _known(subject, component, functions)
        diag = ", ".join(sorted({diagnosis(r) for r in rs}))
        key = (subject, known["title"]) if known else (subject, component, function)
        if key in merged:
            merged[key][1].extend(rs)
            merged[key][2].add(diag)
            merged[key][3].add(component)
        else:
            merged[key] = (known, list(rs), {diag}, {component})
    for r in rows:                   # findings a passing row's message carries (NOTED)
        for k in NOTED:
            sp, cp, rx = k["match"]
            if (fnmatch.fnmatchcase(r["subject"], sp) and fnmatch.fnmatchcase(r.get("component", ""), cp)
                    and re.search(rx, r.get("message", ""))):
                key = (r["subject"], k["title"])
                if key not in merged:
                    merged[key] = (k, [], set(), {r["component"]})
                merged[key][1].append(r)
                merged[key][2].add("raised NotImplementedError" if "NotImplementedError" in r["message"]
                                   else "noted")
    out = []
    for key, (known, rs, diags, comps) in merged.items():
        subject = key[0]
        functions = sorted({r.get("function", "") for r in rs if r.get("function")})
        kind, why = (known["kind"], known["why"]) if known and "kind" in known else _kind(rs)
        component, diag = ", ".join(sorted(comps)), ", ".join(sorted(diags))
        if known:
            title = known["title"]
        elif kind == "source-difference":
            title = f"{component}: " + (rs[0].get("message", "").split(";")[0].split(". ")[0][:110] or diag)
        else:
            title = f"{component}: {diag} ({subject})"
        out.append(Finding(_slug(subject, known["title"] if known else component + "-" + diag), title, kind, why,
                           subject, component, diag, functions, rs, list(known["source"]) if known else [],
                           known["note"] if known else ""))
    seen: dict[str, int] = {}
    for f in out:   # slugs unique
        n = seen.get(f.slug, 0)
        seen[f.slug] = n + 1
        if n:
            f.slug = f"{f.slug}-{n + 1}"
    return out


def _worst_metrics(r: dict) -> str:
    m, b = r.get("metrics") or {}, r.get("bounds") or {}
    parts = [f"{k} {m[k]:.4g} (allowed {b[k]:.4g})" for k in sorted(set(m) & set(b))
             if isinstance(m[k], (int, float)) and isinstance(b[k], (int, float)) and m[k] > b[k]]
    return "; ".join(parts[:4]) or "-"


def page(f: Finding, manifest: dict, rows: list[dict]) -> str:
    subj = (manifest.get("subjects") or {}).get(f.subject, {})
    e2e = [r for r in rows if r["subject"] == f.subject and r.get("check") == "e2e"
           and re.match(r"e2e/[^/]+/(logits|greedy)$", r.get("case_id", ""))]
    lines = [f"# {f.title}", "",
             f"- **Kind**: {f.kind}: {f.why}",
             f"- **Subject**: `{f.subject}`: {subj.get('implementation', '?')} on {subj.get('device', '?')}, "
             f"FP8 dialect {subj.get('dialect', '?')}",
             f"- **Versions**: {json.dumps(subj.get('versions', {}))}",
             f"- **Component / edge**: `{f.component}`; diagnosis: {f.diagnosis}",
             "- **Functions that ran**: " + (", ".join(f"`{x}`" for x in f.functions) or "-")]
    if f.source:
        lines.append("- **Source blamed**: " + "; ".join(f.source))
    else:
        lines.append("- **Source blamed**: not determined beyond the functions above (no known finding matches)")
    if f.note:
        lines.append(f"- **Note**: {f.note}")
    lines += ["", f"## Cases ({len(f.rows)} rows)", "", "| case | level | verdict | beyond bound |",
              "|---|---|---|---|"]
    for r in f.rows[:40]:
        lines.append(f"| `{r['case_id']}` | {r.get('level', '')} | {r['verdict']} | {_worst_metrics(r)} |")
    lines += ["", "## Reproduce (one command each, on a clean checkout with the same subject installed)", ""]
    reruns = list(dict.fromkeys(r.get("rerun", "") for r in f.rows if r.get("rerun")))
    lines += [f"    {c}" for c in reruns[:10]] or ["    (the rows carry no rerun command)"]
    lines += ["", "## Effect", ""]
    for msg in list(dict.fromkeys(r.get("message", "") for r in f.rows))[:5]:
        lines.append(f"- {msg[:600]}")
    if e2e:
        ok = all(r["verdict"] in ("pass", "xfail") for r in e2e)
        lines.append(f"- Whole model (this run's e2e rows of `{f.subject}`): "
                     + ", ".join(f"{r['case_id']} {r['verdict']}" for r in e2e)
                     + (": the model's logits and greedy tokens stayed within their bounds" if ok else ""))
    else:
        lines.append(f"- Whole model: not measured in this run (no e2e logits/greedy rows for `{f.subject}`)")
    return "\n".join(lines) + "\n"


def write(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    from .store import load_run

    run = load_run(run_dir)
    rows = run.rows
    fs = findings(rows)
    out = Path(out) if out else Path(run_dir) / "findings"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    index = [f"# Findings of {run_dir} ({len(fs)})", "", "| finding | kind | subject | rows |", "|---|---|---|---|"]
    for f in fs:
        p = out / f"{f.slug}.md"
        p.write_text(page(f, run.manifest, rows))
        paths.append(p)
        index.append(f"| [{f.title}]({p.name}) | {f.kind} | `{f.subject}` | {len(f.rows)} |")
    (out / "index.md").write_text("\n".join(index) + "\n")
    return [out / "index.md", *paths]


def diff(rows_a: list[dict], rows_b: list[dict]) -> dict[str, list[str]]:
    """Findings that appear in B, disappear from A, or stay, by (subject, title): what ``compare`` prints."""
    ta = {(f.subject, f.title): f for f in findings(rows_a)}
    tb = {(f.subject, f.title): f for f in findings(rows_b)}
    name = lambda k, f: f"{f.title} [{k[0]}; {f.kind}; {len(f.rows)} rows]"  # noqa: E731
    return {"appeared": [name(k, tb[k]) for k in sorted(set(tb) - set(ta))],
            "disappeared": [name(k, ta[k]) for k in sorted(set(ta) - set(tb))],
            "still": [name(k, tb[k]) for k in sorted(set(ta) & set(tb))]}


def format_diff(d: dict[str, list[str]]) -> str:
    lines = [f"FINDINGS: appeared {len(d['appeared'])}, disappeared {len(d['disappeared'])}, still {len(d['still'])}"]
    lines += [f"  APPEARED    {x}" for x in d["appeared"]] + [f"  DISAPPEARED {x}" for x in d["disappeared"]]
    return "\n".join(lines)
