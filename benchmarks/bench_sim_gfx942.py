"""Wall time of the SIMULATED gfx942 op tier (vllm:sim-gfx942) on this machine, and the share of it spent in
Triton's interpreter. Not a test: prints one summary (and --json PATH writes it).

    python benchmarks/bench_sim_gfx942.py [--arch gfx942] [--tier fast|full] [--json out/bench_sim.json]

Runs, in this process, every numeric case of the tier (default fast, as ``conformance run``) of every
component the simulation binds (serving and emulated
levels, as the suite does) and the dialect map; the interpreter share is the time inside
``triton.runtime.interpreter.GridExecutor.__call__`` (every interpreted kernel launch)."""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="gfx942")
    ap.add_argument("--tier", choices=("fast", "full"), default="fast")
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    t_all = time.perf_counter()
    from conformance.subjects import prepare_process

    prepare_process([f"vllm:sim-{a.arch}"])
    import torch

    torch.set_num_threads(2)
    import triton.runtime.interpreter as ti

    spent = {"s": 0.0, "n": 0}
    real = ti.GridExecutor.__call__

    def timed(self, *args, **kw):
        t = time.perf_counter()
        try:
            return real(self, *args, **kw)
        finally:
            spent["s"] += time.perf_counter() - t
            spent["n"] += 1

    ti.GridExecutor.__call__ = timed
    from conformance.cases import cases_for
    from conformance.checks.dialect.dialect_map import probe_edge
    from conformance.checks.dialect.interface import DSV4_EDGES
    from conformance.checks.numeric import run_numeric
    from conformance.subjects import load_subject

    t0 = time.perf_counter()
    s = load_subject(f"vllm:sim-{a.arch}")
    load = time.perf_counter() - t0
    per, verdicts = {}, {}
    cache: dict = {}
    for comp in sorted(s.provides()):
        t = time.perf_counter()
        for c in cases_for(comp):
            if a.tier == "fast" and c.tier != "fast":
                continue
            for r in run_numeric(s, c, emulated_cache=cache):
                verdicts[r.verdict] = verdicts.get(r.verdict, 0) + 1
        per[comp] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    prod, cons = s.dialect_probes()
    edges = {n: probe_edge(e, prod.get(n), cons.get(n)).verdict for n, e in DSV4_EDGES.items()}
    per["dialect_map"] = round(time.perf_counter() - t, 2)
    wall = time.perf_counter() - t_all
    out = {"arch": a.arch, "tier": a.tier, "wall_s": round(wall, 1), "subject_load_s": round(load, 1),
           "per_component_s": per,
           "interpreter_s": round(spent["s"], 1), "interpreter_launches": spent["n"],
           "interpreter_share": round(spent["s"] / wall, 3), "verdicts": verdicts, "edges": edges,
           "not_provided": sorted(s.not_provided())}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
