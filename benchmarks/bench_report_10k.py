"""Render the HTML report of a synthetic run with 10,000 rows: size of report.html, render time, and (where a
headless Chromium is found) the time until the page has loaded and its script has run.

    python benchmarks/bench_report_10k.py [--rows 10000] [--out out/bench-report]

The rows look like a real run's: numeric rows at two levels with metrics, bounds, derivations, worst element,
histograms; dialect edges; a few failing, crashed and not-provided rows.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conformance.results import CheckResult, ResultWriter  # noqa: E402

COMPONENTS = ["norm.rms", "quant.act_fp8", "attn.sparse", "rope.apply", "moe.router", "moe.experts", "mhc.pre",
              "indexer.logits", "compressor.kv", "gemm.fp8_block"]
SUBJECTS = ["reference", "emulated:gfx942", "emulated:ocp", "vllm", "vllm-triton:gfx942", "vllm-triton:ocp"]
EDGES = [("weights", "gemm"), ("act_quant", "gemm"), ("swa_cache", "sparse_attn"), ("compressed_cache", "sparse_attn"),
         ("indexer_k", "logits"), ("indexer_q", "logits")]


def make_rows(n: int, seed: int = 0) -> list[CheckResult]:
    rnd = random.Random(seed)
    rows = []
    for s in SUBJECTS:
        for p, c in EDGES:
            v = "fail" if (s, p) == ("vllm-triton:gfx942", "indexer_k") else "pass"
            rows.append(CheckResult(s, f"dialect/{p}->{c}", f"{p}->{c}", "dialect", "bytes", v,
                                    message=f"edge {p}->{c}: " + ("MISMATCH x0.5" if v == "fail" else "consistent"),
                                    metrics={"read_exact_fraction": 1.0 if v == "pass" else 0.0},
                                    extra={"edge": {"edge": f"{p}->{c}", "producer": p, "consumer": c,
                                                    "verdict": "MISMATCH" if v == "fail" else "consistent",
                                                    "factor": "x0.5" if v == "fail" else ""}}))
    i = 0
    while len(rows) < n:
        s, comp = SUBJECTS[i % len(SUBJECTS)], COMPONENTS[(i // len(SUBJECTS)) % len(COMPONENTS)]
        case = f"{comp}/t{rnd.randint(1, 4096)}d{rnd.choice([256, 512, 1024])}/normal/s{i}"
        for level in ("serving", "emulated"):
            wob = rnd.lognormvariate(-2, 1)
            v = "pass" if wob < 1 else ("degraded" if wob < 2 else "fail")
            if i % 997 == 5:
                v = "crashed"
            metrics = {"out.max_abs": wob * 1e-2, "out.calc_diff": wob * 1e-5, "out.worst_over_bound": wob,
                       "out.gain": 1 + rnd.gauss(0, 1e-4), "out.offset": rnd.gauss(0, 1e-5), "out.ulp_p99": wob * 2}
            rows.append(CheckResult(
                s, case, comp, "numeric", level, v,
                message=f"[{comp} | {case} | {s}] out: worst |err| / bound {wob:.3g}" + (" <b>" if i == 1 else ""),
                metrics=metrics, bounds={"out.max_abs": 1e-2, "out.worst_over_bound": 1.0, "out.calc_diff": 1e-5},
                derivation={"out": "bf16 unit roundoff x sqrt(K) x |w| (cases/_serving.py)"},
                worst={"index": [rnd.randint(0, 100), rnd.randint(0, 255)], "got": 0.123, "want": 0.124,
                       "output": "out"},
                function=f"vllm.ops.{comp.replace('.', '_')}", backend="torch", device="cpu", dialect="float8_e4m3fn",
                params={"tokens": 7, "d": 256, "profile": "ocp", "dialect": "float8_e4m3fn", "fmax": 448.0},
                seed=i, duration_s=0.01, rerun=f"python -m conformance rerun {case} --subject {s}",
                extra={"histogram": {"out": [[e / 2, rnd.randint(0, 500)] for e in range(-12, 2)]},
                       "outputs": {"out": v}, "tags": []}))
            if len(rows) >= n:
                break
        i += 1
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--out", default="out/bench-report")
    a = ap.parse_args()
    out = Path(a.out)
    for f in (out / "results").glob("*.jsonl") if (out / "results").exists() else []:
        f.unlink()
    w = ResultWriter(out, worker="bench")
    rows = make_rows(a.rows)
    for r in rows:
        w.write(r)
    (out / "subjects.json").write_text(json.dumps({s: {"name": s, "device": "cpu", "dialect": "float8_e4m3fn",
                                                       "emulated": s.startswith("emulated"), "provides": {}}
                                                   for s in SUBJECTS}))
    from reports.render import render_report

    t0 = time.perf_counter()
    path = render_report(out)
    dt = time.perf_counter() - t0
    size = path.stat().st_size
    res = {"rows": len(rows), "render_s": round(dt, 2), "bytes": size, "MB": round(size / 1e6, 2)}
    from tests.browser import chromium_path, load_time

    exe = chromium_path()
    if exe:
        res["chromium"] = exe
        res.update(load_time(exe, path))
    else:
        res["load_s"] = "not measured: no headless Chromium found (see tests/browser.py)"
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
