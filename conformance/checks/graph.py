"""Graph-replay consistency check (issue 8).

CUDA graphs (HIP graphs on ROCm, through the same ``torch.cuda`` API) record a region once and replay it.
Anything in the region that reads a host value, allocates a tensor whose size depends on the live batch, or
synchronises is frozen at its warm-up value. For each ``GraphCase`` this module

1. warms up and captures the case's static-buffer wrapper with ``torch.cuda.graph``. Before capture one
   eager run of the region goes under ``torch.cuda.set_sync_debug_mode("error")``, which names any host
   synchronisation (``.item()``, ``nonzero``, boolean masking) with its call site. A capture that raises is
   classified from its message and that probe ("capture-time host sync" vs "capture error").
2. replays with many inputs of the captured shape (different values, sequence lengths / positions, top-k
   patterns, live batch smaller than the captured one with garbage in the padding rows), several replays
   per input, and compares each replay with eager (bitwise on the live rows when the case is deterministic,
   else within the golden-derived bound) and with the golden (spec math on CPU in float64; the bound is
   derived from the float32 golden's own rounding, see ``_dense_golden``).
3. probes causes with input pairs that differ in one group only (``values``, ``metadata``, ``topk``,
   ``padding``): "stale" = replay output unchanged while eager changed; "reads padding rows" = live rows of
   the replay change when only the padding rows change. "warm-up-sized allocation" = replays disagree with
   eager only when the live ragged size differs from the warm-up one. "intermittent replay corruption" =
   repeated replays of the same input disagree.

Each repetition runs in a fresh process (``python -m conformance.checks.graph --worker``), so rates are over
replays and over processes. On a machine with no CUDA/ROCm device every case is reported "needs-gpu",
never passed.

``python -m conformance.checks.graph --out DIR`` runs every case and mutant and writes
``DIR/graph-summary.json``, ``DIR/graph-summary.md`` and ``DIR/results/*.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from conformance.checks import graph_components as gc
from conformance.results import CheckResult, ResultWriter
from references.precision import golden_mode

GROUPS_ALL = ("values", "metadata", "topk", "padding")
U32 = 2.0 ** -24

CAUSE_CAPTURE_SYNC = "capture-time host sync"
CAUSE_CAPTURE_ERROR = "capture error"
CAUSE_HOST_SYNC = "host sync in region"
CAUSE_STALE = "stale"
CAUSE_PADDING = "reads padding rows"
CAUSE_WARMUP_ALLOC = "warm-up-sized allocation"
CAUSE_INTERMITTENT = "intermittent replay corruption"
CAUSE_EAGER_MISMATCH = "replay differs from eager (unexplained)"
CAUSE_NONBITWISE = "replay not bitwise equal to eager (deterministic kernels)"
CAUSE_GOLDEN = "outside golden bound"
CAUSE_CRASH = "process crashed"

_SYNC_PATTERNS = re.compile(
    r"operation not permitted when stream is capturing|StreamCapture(Unsupported|Invalidated|Unjoined)|"
    r"called a synchronizing|synchroniz|\.item\(\)|_local_scalar_dense|cudaErrorStreamCapture|"
    r"hipErrorStreamCapture|capturing stream", re.I)


def graph_device_available() -> bool:
    """True where a CUDA or ROCm (HIP) device is usable through torch.cuda."""
    try:
        return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0
    except Exception:
        return False


def device_name() -> str:
    if not graph_device_available():
        return "cpu (no CUDA/ROCm device)"
    name = torch.cuda.get_device_name(0)
    hip = getattr(torch.version, "hip", None)
    rt = f"ROCm {hip}" if hip else f"CUDA {torch.version.cuda}"
    return f"{name} ({rt}, torch {torch.__version__})"


# --------------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------------

@dataclass
class GraphCase:
    """A component and the static-buffer wrapper that makes it capturable.

    make_input(seeds) -> CPU inputs of the captured shape (seeds: values/metadata/topk/padding/live);
    eager(device_inputs) -> dict of output tensors (fresh allocations, full padded batch);
    wrapper(example_device_inputs, device) -> object with load(inputs) and region() -> dict of outputs;
    golden(cpu_inputs, dtype) -> dict of outputs for the live rows;
    ragged_size(cpu_inputs) -> the live ragged size (indptr[-1]) where the case builds a ragged list.
    """
    name: str
    component: str
    make_input: Callable[[dict], dict]
    eager: Callable[[dict], dict]
    wrapper: Callable[..., object]
    golden: Callable[..., dict]
    groups: tuple[str, ...]
    batch: int = gc.DIMS.B
    deterministic: bool = True
    kind: str = "dense"                     # dense | index-set (compared as sorted index sets)
    ragged_size: Callable[[dict], int] | None = None
    expect_cause: str | None = None         # mutants: the cause the check must name
    mutant: bool = False
    description: str = ""
    # the device component evaluates RoPE phases pos * omega in float32, the golden in float64
    fp32_rope_phase: bool = False


def sparse_attn_case(name="sparse_attn_decode", wrapper=gc.SparseAttnWrapper, stabiliser="row", **kw):
    return GraphCase(
        name=name, component="sparse_attn_decode",
        make_input=gc.sparse_make_input,
        eager=lambda x: gc.sparse_eager(x, stabiliser=stabiliser),
        wrapper=wrapper, golden=lambda x, dtype: gc.sparse_golden(x, dtype),
        groups=("values", "metadata", "topk", "padding"), ragged_size=gc.sparse_ragged_size,
        description=kw.pop("description", "SWA window 128 (paged) + compressed top-k (-1 padded) -> ragged "
                                          "list in pre-allocated buffers -> sparse attention with sink"),
        **kw)


def indexer_case(name="indexer_topk", wrapper=gc.IndexerWrapper, **kw):
    return GraphCase(
        name=name, component="indexer_topk", make_input=gc.indexer_make_input, eager=gc.indexer_eager,
        wrapper=wrapper, golden=lambda x, dtype: gc.indexer_golden(x, dtype),
        groups=("values", "metadata", "padding"), kind="index-set",
        description=kw.pop("description", "lightning-indexer scores over a paged K cache, causal bound "
                                          "floor((t+1)/4), top-k (-1 where fewer)"),
        **kw)


_DECODE_W = None


def _decode_weights():
    global _DECODE_W
    if _DECODE_W is None:
        _DECODE_W = gc.decode_weights()
    return _DECODE_W


def decode_step_case(name="decode_step", wrapper=gc.DecodeStepWrapper, stabiliser="row", x_quant="none",
                     **kw):
    def make_wrapper(example, device):
        return wrapper(example, device, weights=_decode_weights())

    def eager(x):
        w = {k: v.to(x["x"].device) for k, v in _decode_weights().items()}
        return gc.decode_step(*(x[k] for k in gc.DECODE_KEYS), w, stabiliser=stabiliser, x_quant=x_quant)

    return GraphCase(
        name=name, component="decode_step", make_input=gc.decode_make_input, eager=eager,
        wrapper=make_wrapper, golden=lambda x, dtype: gc.decode_golden(x, _decode_weights(), dtype),
        groups=("values", "metadata", "padding"), ragged_size=gc.decode_ragged_size, fp32_rope_phase=True,
        description=kw.pop("description", "whole decode step of a tiny DSV4-like SWA attention block: q/kv "
                                          "proj + norms + RoPE, paged cache write, window-128 attention with "
                                          "sink, inverse RoPE, grouped low-rank o-proj"),
        **kw)


def reference_cases() -> dict[str, Callable[[], GraphCase]]:
    return {"sparse_attn_decode": sparse_attn_case, "indexer_topk": indexer_case,
            "decode_step": decode_step_case}


def all_cases() -> dict[str, Callable[[], GraphCase]]:
    from conformance.checks import graph_mutants
    return {**reference_cases(), **graph_mutants.mutant_cases()}


# --------------------------------------------------------------------------------------------------------
# comparison helpers
# --------------------------------------------------------------------------------------------------------

def _live(t: torch.Tensor, live: int) -> torch.Tensor:
    return t[:live].detach().to("cpu")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern view (NaN == NaN when the bits agree; -0 != +0)."""
    if t.is_floating_point():
        return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def _equal_live(a: dict, b: dict, live: int) -> bool:
    return all(torch.equal(_bits(_live(a[k], live)), _bits(_live(b[k], live))) for k in a)


def _maxdiff_live(a: dict, b: dict, live: int) -> float:
    m = 0.0
    for k in a:
        x, y = _live(a[k], live).double(), _live(b[k], live).double()
        if x.numel():
            d = (x - y).abs()
            d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
            m = max(m, float(d.max()))
    return m


def _dense_golden(case: GraphCase, cpu_inputs: dict) -> dict:
    """Golden in float64 plus a bound per output: 8x the float32 golden's own rounding error (measured
    against float64, the same spec math, a different summation order than the device), floored at
    64 u32 |g|max. Any float32 evaluation order differs from float64 by the same γ_n-type bound, so 8x
    leaves room for a second, independently ordered float32 evaluation. Where the device component takes RoPE
    phases in float32 (``fp32_rope_phase``), |d phi| <= 2 pos u32 radians (one rounding of omega, one of the
    product) moves a rotated value by at most that times its magnitude: 2 max_pos u32 |g|max more."""
    g64 = case.golden(cpu_inputs, torch.float64)
    phase = 2.0 * float(cpu_inputs["positions"].max()) * U32 if case.fp32_rope_phase else 0.0
    g32 = case.golden(cpu_inputs, torch.float32)
    bounds = {}
    for k, v in g64.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.numel() == 0:
            bounds[k] = 0.0
            continue
        err32 = float((g32[k].double() - v).abs().max())
        bounds[k] = 8.0 * err32 + (64.0 * U32 + phase) * float(v.abs().max())
    return {"g64": g64, "g32": g32, "bounds": bounds}


def _golden_compare(case: GraphCase, out: dict, gold: dict, live: int) -> tuple[bool, float, float]:
    """(ok, metric, bound): dense -> max |replay - g64| over live rows vs the derived bound; index-set ->
    number of index-set differences not explained by a near tie (score gap within the score bound)."""
    if case.kind == "index-set":
        bad = 0
        for b, sc64 in enumerate(gold["g64"]["scores"]):
            got = set(x for x in _live(out["idx"], live)[b].tolist() if x >= 0)
            want = set(x for x in gold["g64"]["idx"][b].tolist() if x >= 0)
            if got == want:
                continue
            if len(got) != len(want) or any(x >= sc64.numel() for x in got):
                bad += 1
                continue
            sc32 = gold["g32"]["scores"][b].double()
            tol = 8.0 * float((sc32 - sc64).abs().max()) + 64.0 * U32 * float(sc64.abs().max())
            kth = float(sc64[list(want)].min())
            if any(abs(float(sc64[x]) - kth) > tol for x in got ^ want):
                bad += 1
        return bad == 0, float(bad), 0.0
    worst, worst_ratio, bound_at = 0.0, 0.0, 0.0
    for k, g in gold["g64"].items():
        if not isinstance(g, torch.Tensor) or not g.is_floating_point() or g.numel() == 0:
            continue
        d = (_live(out[k], live).double() - g).abs()
        m = float(d.max()) if not torch.isnan(d).any() else float("inf")
        ratio = m / max(gold["bounds"][k], 1e-300)
        if ratio >= worst_ratio:
            worst, worst_ratio, bound_at = m, ratio, gold["bounds"][k]
    return worst <= bound_at, worst, bound_at


def _eager_compare(case: GraphCase, out: dict, eager: dict, gold: dict,
                   live: int) -> tuple[bool, bool, float]:
    """(ok, bitwise, maxdiff) on live rows. Deterministic cases must be bitwise equal; otherwise within the
    golden-derived bound (the two device evaluations are each within it of float64)."""
    bitwise = _equal_live(out, eager, live)
    md = _maxdiff_live(out, eager, live)
    if case.deterministic or case.kind == "index-set":
        return bitwise, bitwise, md
    tol = 2.0 * max(gold["bounds"].values(), default=0.0)
    return md <= tol, bitwise, md


# --------------------------------------------------------------------------------------------------------
# one process: capture once, replay many
# --------------------------------------------------------------------------------------------------------

def _site(tb: str) -> str:
    """The innermost frame of the project's own code in a traceback (where the sync / error came from)."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', tb)
    own = [f for f in frames if ("conformance" in f[0] or "tests" in f[0]) and not f[0].endswith("sim.py")]
    f = (own or frames or [("?", "?", "?")])[-1]
    return f"{Path(f[0]).name}:{f[1]} in {f[2]}"


def _seed_stream(seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g))


def _random_seeds(rs, batch: int) -> dict:
    s = {k: next(rs) for k in GROUPS_ALL}
    r = next(rs) % 4
    s["live"] = batch if r == 0 else (1 if r == 1 else 1 + next(rs) % batch)
    return s


class CudaGraphBackend:
    """torch.cuda graphs (CUDA graphs; HIP graphs on ROCm through the same API)."""

    name = "cuda-graph"

    def synchronize(self):
        torch.cuda.synchronize()

    @contextlib.contextmanager
    def sync_debug_error(self):
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)

    def capture(self, wrapper, warm_dev):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                wrapper.load(warm_dev)
                wrapper.region()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        wrapper.load(warm_dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = wrapper.region()
        torch.cuda.synchronize()
        self._graph = graph                # keep it alive
        return graph.replay, static_out


def run_worker(case: GraphCase, n_inputs: int, n_replays: int, seed: int, device="cuda",
               n_probes: int = 2, backend=None) -> dict:
    """Capture once in this process, replay ``n_inputs`` inputs ``n_replays`` times each, run the probes.
    Returns a JSON-able record (what the diagnosis reads). ``backend`` defaults to real CUDA/HIP graphs;
    tests pass a simulated one (never used for reported results)."""
    backend = backend or CudaGraphBackend()
    t0 = time.time()
    torch.manual_seed(seed)
    rs = _seed_stream(seed)
    rec: dict = {"seed": seed, "capture": {}, "replays": [], "probes": []}
    with golden_mode():
        warm_seeds = dict(_random_seeds(rs, case.batch), short=True)    # a capture-time dummy batch
        warm = case.make_input(warm_seeds)
        warm_dev = gc.to_device(warm, device)
        wrapper = case.wrapper(warm_dev, device)
        warm_ragged = case.ragged_size(warm) if case.ragged_size else None
        rec["capture"]["warm_live"] = warm["live"]
        rec["capture"]["warm_ragged"] = warm_ragged

        # (1a) host-sync probe: one eager run of the region with sync debug mode "error"
        wrapper.load(warm_dev)
        backend.synchronize()
        sync = None
        try:
            with backend.sync_debug_error():
                wrapper.region()
        except RuntimeError as e:
            sync = {"message": str(e).splitlines()[0][:300], "site": _site(traceback.format_exc())}
        backend.synchronize()
        rec["capture"]["host_sync"] = sync

        # (1b) warm-up on a side stream, then capture
        try:
            replay_fn, static_out = backend.capture(wrapper, warm_dev)
            rec["capture"]["ok"] = True
        except Exception as e:  # noqa: BLE001 - every capture failure is a finding
            chain, x = [], e             # the first error (e.g. the .item()) is the context of the
            while x is not None and len(chain) < 5:   # "invalidated capture" raised when capture ends
                chain.append(x)
                x = x.__cause__ or x.__context__
            root = chain[-1]
            tb = "".join(traceback.format_exception(type(root), root, root.__traceback__))
            msg = " <- ".join(f"{type(c).__name__}: {(str(c).strip().splitlines() or [''])[0]}"
                              for c in reversed(chain))
            rec["capture"].update(ok=False, error=msg[:600], site=_site(tb),
                                  kind=CAUSE_CAPTURE_SYNC if (_SYNC_PATTERNS.search(msg) or sync)
                                  else CAUSE_CAPTURE_ERROR)
            rec["wall_s"] = time.time() - t0
            return rec

        def replay(inputs_dev):
            wrapper.load(inputs_dev)
            replay_fn()
            backend.synchronize()
            return {k: v.clone() for k, v in static_out.items()}

        def eager(inputs_dev):
            out = case.eager(gc.clone_inputs(inputs_dev))
            backend.synchronize()
            return out

        # (2) many inputs, several replays each
        prev = None
        for i in range(n_inputs):
            if i % 4 == 0:        # same metadata / top-k / padding / live as warm-up, new values
                seeds = dict(warm_seeds, values=next(rs))
            else:
                seeds = _random_seeds(rs, case.batch)
            x = case.make_input(seeds)
            xd = gc.to_device(x, device)
            live = x["live"]
            ref = eager(xd)
            gold = _dense_golden(case, x)
            ragged = case.ragged_size(x) if case.ragged_size else None
            first = None
            for r in range(n_replays):
                out = replay(xd)
                ok_e, bitwise, md = _eager_compare(case, out, ref, gold, live)
                ok_g, gm, gb = _golden_compare(case, out, gold, live)
                consistent = True if first is None else _equal_live(out, first, live)
                if first is None:
                    first = out
                stale_prev = None
                if prev is not None and r == 0:
                    pl = min(live, prev["live"])
                    stale_prev = (_equal_live(out, prev["out"], pl) and not _equal_live(ref, prev["ref"], pl))
                rec["replays"].append(dict(
                    input=i, rep=r, live=live, same_as_warm=(seeds == warm_seeds) or (i % 4 == 0),
                    ragged=ragged, warm_ragged=warm_ragged, eager_ok=ok_e, bitwise=bitwise, eager_maxdiff=md,
                    golden_ok=ok_g, golden_metric=gm, golden_bound=gb, consistent=consistent,
                    stale_vs_prev=stale_prev))
            prev = {"out": first, "ref": ref, "live": live}

        # (3) probes: pairs that differ in one group only
        for group in case.groups:
            for _ in range(2 * n_probes if group == "padding" else n_probes):
                a = _random_seeds(rs, case.batch)
                if group == "padding":
                    a["live"] = max(1, min(a["live"], case.batch - 2))
                b = dict(a, **{group: next(rs)})
                xa, xb = case.make_input(a), case.make_input(b)
                da, db = gc.to_device(xa, device), gc.to_device(xb, device)
                live = xa["live"]
                ra, rb = replay(da), replay(db)
                ea, eb = eager(da), eager(db)
                e_changed = not _equal_live(ea, eb, live)
                r_changed = not _equal_live(ra, rb, live)
                if group == "padding":       # also against zero-filled padding (garbage may saturate both)
                    dz = gc.to_device(case.make_input(dict(a, padding=-1)), device)
                    rz, ez = replay(dz), eager(dz)
                    e_changed = e_changed or not _equal_live(ea, ez, live)
                    r_changed = r_changed or not _equal_live(ra, rz, live)
                rec["probes"].append(dict(group=group, live=live, eager_changed=e_changed,
                                          replay_changed=r_changed))
    rec["wall_s"] = time.time() - t0
    return rec


# --------------------------------------------------------------------------------------------------------
# diagnosis (pure: unit-tested on CPU with fake records)
# --------------------------------------------------------------------------------------------------------

def _rate(n: int, d: int) -> dict:
    return {"n": n, "of": d, "rate": (n / d) if d else None}


def diagnose(procs: list[dict], deterministic: bool = True) -> dict:
    """Reads the per-process records; returns verdicts per level, the named causes with evidence and rates."""
    causes: list[str] = []
    evidence: dict[str, str] = {}
    rates: dict[str, dict] = {}
    crashed = [p for p in procs if p.get("crashed")]
    alive = [p for p in procs if not p.get("crashed")]
    caps = [p["capture"] for p in alive]
    cap_fail = [c for c in caps if not c.get("ok")]
    rates["process_crash"] = _rate(len(crashed), len(procs))
    rates["capture_fail"] = _rate(len(cap_fail), len(procs))
    if crashed:
        causes.append(CAUSE_CRASH)
        evidence[CAUSE_CRASH] = crashed[0].get("error", "")[-300:]
    if cap_fail:
        kinds = sorted({c["kind"] for c in cap_fail})
        for k in kinds:
            causes.append(k)
            c = next(c for c in cap_fail if c["kind"] == k)
            evidence[k] = f"capture raised at {c.get('site')}: {c.get('error', '')[:200]}"
    syncs = [c["host_sync"] for c in caps if c.get("host_sync")]
    rates["host_sync_probe"] = _rate(len(syncs), len(caps))
    if syncs:
        causes.append(CAUSE_HOST_SYNC)
        evidence[CAUSE_HOST_SYNC] = f"sync debug mode flagged {syncs[0]['site']}: {syncs[0]['message'][:160]}"

    reps = [r for p in alive for r in p.get("replays", [])]
    probes = [q for p in alive for q in p.get("probes", [])]
    n = len(reps)
    e_bad = [r for r in reps if not r["eager_ok"]]
    g_bad = [r for r in reps if not r["golden_ok"]]
    incons = [r for r in reps if not r["consistent"]]
    rates["eager_mismatch"] = _rate(len(e_bad), n)
    rates["golden_fail"] = _rate(len(g_bad), n)
    rates["inconsistent_replay"] = _rate(len(incons), n)
    rates["not_bitwise"] = _rate(sum(1 for r in reps if not r["bitwise"]), n)
    stale_prev = [r for r in reps if r.get("stale_vs_prev")]
    rates["stale_vs_previous_input"] = _rate(len(stale_prev), sum(1 for r in reps if r.get("stale_vs_prev")
                                                                  is not None))

    stale_groups = []
    for g in sorted({q["group"] for q in probes}):
        qs = [q for q in probes if q["group"] == g]
        if g == "padding":
            bad = [q for q in qs if q["replay_changed"]]
            rates["padding_probe"] = _rate(len(bad), len(qs))
            if bad:
                causes.append(CAUSE_PADDING)
                also = sum(q["eager_changed"] for q in bad)
                evidence[CAUSE_PADDING] = (f"live rows of the replay changed when only padding rows changed "
                                           f"in {len(bad)}/{len(qs)} probes"
                                           + (f" (eager too in {also}: the op itself is not row-independent)"
                                              if also else " (eager did not: graph-only)"))
        else:
            relevant = [q for q in qs if q["eager_changed"]]
            bad = [q for q in relevant if not q["replay_changed"]]
            rates[f"stale_probe_{g}"] = _rate(len(bad), len(relevant))
            if bad:
                stale_groups.append(g)
    if stale_groups:
        c = f"{CAUSE_STALE}: {', '.join(stale_groups)}"
        causes.append(c)
        evidence[c] = ("replay output unchanged while eager changed when only " + "/".join(stale_groups) +
                       " changed (not refreshed between replays)")

    if e_bad:
        with_r = [r for r in reps if r.get("ragged") is not None]
        same = [r for r in with_r if r["ragged"] == r["warm_ragged"]]
        diff = [r for r in with_r if r["ragged"] != r["warm_ragged"]]
        bigger = [r for r in diff if r["ragged"] > r["warm_ragged"]]
        smaller = [r for r in diff if r["ragged"] < r["warm_ragged"]]
        nb = lambda rs: sum(1 for r in rs if not r["eager_ok"])  # noqa: E731
        rates["eager_mismatch_ragged_same_as_warmup"] = _rate(nb(same), len(same))
        rates["eager_mismatch_ragged_larger_than_warmup"] = _rate(nb(bigger), len(bigger))
        rates["eager_mismatch_ragged_smaller_than_warmup"] = _rate(nb(smaller), len(smaller))
        explained = False
        if with_r and same and nb(same) == 0 and nb(diff) > 0 and not stale_groups \
                and nb(with_r) == len(e_bad):
            causes.append(CAUSE_WARMUP_ALLOC)
            evidence[CAUSE_WARMUP_ALLOC] = (
                f"replay differs from eager only when the live ragged size differs from warm-up: "
                f"{nb(same)}/{len(same)} when equal, {nb(bigger)}/{len(bigger)} when larger, "
                f"{nb(smaller)}/{len(smaller)} when smaller")
            explained = True
        if stale_groups:
            explained = True
        if not explained:
            c = CAUSE_EAGER_MISMATCH
            if deterministic and all(r["golden_ok"] for r in e_bad):   # still within the golden bound
                c = CAUSE_NONBITWISE
            causes.append(c)
            worst = max(r["eager_maxdiff"] for r in e_bad)
            evidence[c] = f"{len(e_bad)}/{n} replays; worst |replay-eager| {worst:.3g}"
    if incons:
        causes.append(CAUSE_INTERMITTENT)
        evidence[CAUSE_INTERMITTENT] = f"{len(incons)}/{n} repeated replays of the same input differed"
    if g_bad:
        causes.append(CAUSE_GOLDEN)
        w = max(g_bad, key=lambda r: r["golden_metric"] / max(r["golden_bound"], 1e-300))
        evidence[CAUSE_GOLDEN] = (f"{len(g_bad)}/{n} replays; worst metric {w['golden_metric']:.3g} vs bound "
                                  f"{w['golden_bound']:.3g}")

    graph_causes = [c for c in causes if c not in (CAUSE_GOLDEN,)]
    if crashed or cap_fail or any(c.startswith(CAUSE_STALE) for c in causes) or CAUSE_PADDING in causes \
            or CAUSE_WARMUP_ALLOC in causes or CAUSE_INTERMITTENT in causes or CAUSE_EAGER_MISMATCH in causes:
        eager_verdict = "fail"
    elif CAUSE_NONBITWISE in causes or CAUSE_HOST_SYNC in causes:
        eager_verdict = "degraded"
    elif n == 0:
        eager_verdict = "error"
    else:
        eager_verdict = "pass"
    if crashed or cap_fail:
        golden_verdict = "fail" if n == 0 else ("fail" if g_bad else "degraded")
    elif n == 0:
        golden_verdict = "error"
    else:
        golden_verdict = "fail" if g_bad else "pass"
    return {"causes": causes, "graph_causes": graph_causes, "evidence": evidence, "rates": rates,
            "verdicts": {"eager": eager_verdict, "golden": golden_verdict}, "replays": n,
            "probes": len(probes)}


# --------------------------------------------------------------------------------------------------------
# orchestration: fresh processes, report, CheckResult rows
# --------------------------------------------------------------------------------------------------------

@dataclass
class GraphReport:
    case: str
    component: str
    device: str
    verdict: str
    verdicts: dict = field(default_factory=dict)
    causes: list = field(default_factory=list)
    evidence: dict = field(default_factory=dict)
    rates: dict = field(default_factory=dict)
    processes: int = 0
    inputs_per_process: int = 0
    replays_per_input: int = 0
    replays: int = 0
    probes: int = 0
    wall_s: float = 0.0
    mutant: bool = False
    expect_cause: str | None = None
    caught: bool | None = None
    message: str = ""
    per_process: list = field(default_factory=list)

    def to_rows(self, subject: str = "reference") -> list[CheckResult]:
        rows = []
        for level in ("eager", "golden"):
            v = self.verdicts.get(level, self.verdict)
            rows.append(CheckResult(
                subject=subject if not self.mutant else f"mutant:{self.case}", case_id=f"graph/{self.case}",
                component=self.component, check="graph", level=level, verdict=v, message=self.message,
                metrics={k: r["rate"] for k, r in self.rates.items() if r.get("rate") is not None},
                bounds={}, derivation={"golden": "8x float32 golden rounding error vs float64 (+64 u32 |g|)",
                                       "eager": "bitwise on live rows (deterministic kernels)"},
                function=f"conformance.checks.graph_components:{self.component}",
                backend="cuda-graph" if self.verdict != "needs-gpu" else "", device=self.device,
                params={"processes": self.processes, "inputs": self.inputs_per_process,
                        "replays_per_input": self.replays_per_input},
                duration_s=self.wall_s, rerun=f"python -m conformance.checks.graph --cases {self.case}",
                extra={"causes": self.causes, "evidence": self.evidence, "rates": self.rates,
                       "expect_cause": self.expect_cause, "caught": self.caught, "replays": self.replays,
                       "probes": self.probes}))
        return rows


_WORKER_TAG = "GRAPH_WORKER_JSON "


def _spawn_worker(name: str, seed: int, n_inputs: int, n_replays: int, timeout: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "conformance.checks.graph", "--worker", name, "--seed", str(seed),
           "--inputs", str(n_inputs), "--replays", str(n_replays)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _collect(p: subprocess.Popen, timeout: float) -> dict:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        return {"crashed": True, "error": f"timeout after {timeout}s; {err[-400:]}"}
    for line in out.splitlines()[::-1]:
        if line.startswith(_WORKER_TAG):
            return json.loads(line[len(_WORKER_TAG):])
    return {"crashed": True, "error": f"rc={p.returncode}; {err[-600:]}"}


def _caught(causes: list[str], expect: str | None, verdict: str) -> bool | None:
    if expect is None:
        return None
    return verdict in ("fail", "catastrophic", "error") and any(c.startswith(expect) for c in causes)


def run_graph_case(case: GraphCase | str, n_inputs: int = 16, n_replays: int = 3, device=None,
                   n_processes: int = 3, seed: int = 0, parallel: int = 3, in_process: bool = False,
                   timeout: float = 300.0) -> GraphReport:
    """Capture/replay one case in ``n_processes`` fresh processes and diagnose. No device -> needs-gpu."""
    if isinstance(case, str):
        case = all_cases()[case]()
    dev_ok = graph_device_available() and (device is None or str(device).startswith("cuda"))
    base = dict(case=case.name, component=case.component, mutant=case.mutant, expect_cause=case.expect_cause,
                processes=n_processes, inputs_per_process=n_inputs, replays_per_input=n_replays)
    if not dev_ok:
        return GraphReport(**base, device=device_name() if device is None else str(device),
                           verdict="needs-gpu",
                           verdicts={"eager": "needs-gpu", "golden": "needs-gpu"},
                           message="needs a GPU: graph capture/replay needs a CUDA or ROCm device; not run")
    t0 = time.time()
    seeds = [seed * 1000 + 17 * i + 1 for i in range(n_processes)]
    procs: list[dict] = []
    if in_process or case.name not in all_cases():
        for s in seeds:
            try:
                procs.append(run_worker(case, n_inputs, n_replays, s, "cuda"))
            except Exception:  # noqa: BLE001
                procs.append({"crashed": True, "error": traceback.format_exc()[-600:]})
    else:
        pending = list(seeds)
        running: list[subprocess.Popen] = []
        while pending or running:
            while pending and len(running) < max(1, parallel):
                running.append(_spawn_worker(case.name, pending.pop(0), n_inputs, n_replays, timeout))
            procs.append(_collect(running.pop(0), timeout))
    d = diagnose(procs, case.deterministic)
    verdict = max(d["verdicts"].values(), key=lambda v: {"pass": 0, "degraded": 1, "fail": 2, "error": 3}[v])
    caught = _caught(d["causes"], case.expect_cause, verdict)   # None for reference cases
    msg = ("causes: " + "; ".join(d["causes"])) if d["causes"] else "replay matches eager and golden"
    per = [{"seed": p.get("seed"), "crashed": p.get("crashed", False),
            "capture_ok": p.get("capture", {}).get("ok"), "wall_s": p.get("wall_s")} for p in procs]
    return GraphReport(**base, device=device_name(), verdict=verdict, verdicts=d["verdicts"],
                       causes=d["causes"],
                       evidence=d["evidence"], rates=d["rates"], replays=d["replays"], probes=d["probes"],
                       wall_s=time.time() - t0, caught=caught, message=msg, per_process=per)


def run_suite(names: list[str] | None = None, **kw) -> list[GraphReport]:
    cases = all_cases()
    return [run_graph_case(cases[n](), **kw) for n in (names or list(cases))]


def summary_markdown(reports: list[GraphReport], header: str = "") -> str:
    lines = [header or "# Graph-replay suite", "", f"device: {reports[0].device if reports else '?'}", "",
             "| case | mutant | verdict (eager / golden) | causes | expected cause | caught | capture fail | "
             "eager mismatch | golden fail | padding probe | stale probes | replays | processes | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def r(rep, k):
        x = rep.rates.get(k)
        return f"{x['n']}/{x['of']}" if x else "-"

    for rep in reports:
        stale = ", ".join(f"{k[12:]} {r(rep, k)}" for k in rep.rates if k.startswith("stale_probe_")) or "-"
        lines.append(
            f"| {rep.case} | {'yes' if rep.mutant else 'no'} | {rep.verdict} ({rep.verdicts.get('eager')} / "
            f"{rep.verdicts.get('golden')}) | {'; '.join(rep.causes) or '-'} | {rep.expect_cause or '-'} | "
            f"{'-' if rep.caught is None else ('yes' if rep.caught else 'NO')} | {r(rep, 'capture_fail')} | "
            f"{r(rep, 'eager_mismatch')} | {r(rep, 'golden_fail')} | {r(rep, 'padding_probe')} | {stale} | "
            f"{rep.replays} | {rep.processes} | {rep.wall_s:.1f} |")
    lines += ["", "## Evidence", ""]
    for rep in reports:
        for c, e in rep.evidence.items():
            lines.append(f"* **{rep.case}** — {c}: {e}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inputs", type=int, default=16)
    ap.add_argument("--replays", type=int, default=3)
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=3)
    ap.add_argument("--cases", nargs="*")
    ap.add_argument("--out", default="out/graph")
    a = ap.parse_args(argv)
    if a.worker:
        rec = run_worker(all_cases()[a.worker](), a.inputs, a.replays, a.seed, "cuda")
        print(_WORKER_TAG + json.dumps(rec), flush=True)
        return 0
    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    writer = ResultWriter(out, worker="graph")
    reports = []
    for name in (a.cases or list(all_cases())):
        rep = run_graph_case(name, n_inputs=a.inputs, n_replays=a.replays, n_processes=a.processes,
                             parallel=a.parallel, seed=a.seed)
        reports.append(rep)
        for row in rep.to_rows():
            writer.write(row)
        print(f"{rep.case:32s} {rep.verdict:9s} caught={rep.caught} causes={rep.causes} "
              f"wall={rep.wall_s:.1f}s", flush=True)
    total = time.time() - t0
    (out / "graph-summary.json").write_text(json.dumps(
        {"device": device_name(), "total_wall_s": total, "reports": [asdict(r) for r in reports]}, indent=1,
        default=str))
    (out / "graph-summary.md").write_text(summary_markdown(reports) + f"\ntotal wall time {total:.1f}s\n")
    bad = [r for r in reports
           if (r.mutant and r.caught is False) or (not r.mutant and r.verdict not in ("pass", "needs-gpu"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
