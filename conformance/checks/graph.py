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

The cases come from subjects (``Subject.graph_cases()``, public API: ``conformance.subjects.GraphCase``); a worker
finds its case by subject spec + case name. Each case runs in every graph mode it declares (``full``,
``piecewise``, ``decode-only``; the others are "not-run" rows with the case's reason), at every captured batch
size (largest first, one shared pool), for ``case.steps`` decode steps, with a cross-size sharing probe, in N
fresh processes whose failure rate is reported (a failure in some processes only is "intermittent across
processes": never a pass).

``python -m conformance.checks.graph [--subject SPEC ...] --out DIR`` runs every case of the subjects (default:
``reference`` and the built-in mutants) and writes ``DIR/graph-summary.json``, ``DIR/graph-summary.md`` and
``DIR/results/*.jsonl``.
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
from conformance.subjects.graph_api import GRAPH_GROUPS, GRAPH_MODES, GraphCase, GraphPiece  # noqa: F401
from references.precision import golden_mode

GROUPS_ALL = GRAPH_GROUPS
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
CAUSE_SHARED = "static buffers shared across captured sizes"
CAUSE_PROCESS_INTERMITTENT = "intermittent across processes"
CAUSE_MODE_SPECIFIC = "mode-specific"

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
# cases (GraphCase is the public dataclass of conformance.subjects.graph_api)
# --------------------------------------------------------------------------------------------------------

NO_PIECEWISE = ("the case is the attention op itself: piecewise capture runs attention eagerly, so nothing of "
                "it would be captured")
NO_DECODE_ONLY = "the wrapper has no decode-only path (decode-only would capture the same graph as full)"


def sparse_attn_case(name="sparse_attn_decode", wrapper=gc.SparseAttnWrapper, stabiliser="row", **kw):
    kw.setdefault("mode_reasons", {"piecewise": NO_PIECEWISE, "decode-only": NO_DECODE_ONLY})
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
    kw.setdefault("mode_reasons", {"piecewise": "the indexer is one piece (no attention op to split at)",
                                   "decode-only": NO_DECODE_ONLY})
    return GraphCase(
        name=name, component="indexer_topk", make_input=gc.indexer_make_input, eager=gc.indexer_eager,
        wrapper=wrapper, golden=lambda x, dtype: gc.indexer_golden(x, dtype),
        groups=("values", "metadata", "padding"), kind="index-set",
        description=kw.pop("description", "lightning-indexer scores over a paged K cache, causal bound "
                                          "floor((t+1)/4), top-k (-1 where fewer)"),
        **kw)


_WEIGHTS: dict = {}


def _decode_weights():
    if "decode" not in _WEIGHTS:
        _WEIGHTS["decode"] = gc.decode_weights()
    return _WEIGHTS["decode"]


def _moe_weights():
    if "moe" not in _WEIGHTS:
        _WEIGHTS["moe"] = gc.moe_weights()
    return _WEIGHTS["moe"]


def _decode_eager(stabiliser="row", x_quant="none"):
    def eager(x):
        w = {k: v.to(x["x"].device) for k, v in _decode_weights().items()}
        return gc.decode_step(*(x[k] for k in gc.DECODE_KEYS), w, stabiliser=stabiliser, x_quant=x_quant)
    return eager


def _decode_wrapper(wrapper):
    def make_wrapper(example, device, mode="full"):
        return wrapper(example, device, weights=_decode_weights(), mode=mode)
    return make_wrapper


def decode_step_case(name="decode_step", wrapper=gc.DecodeStepWrapper, stabiliser="row", x_quant="none",
                     **kw):
    kw.setdefault("modes", ("full", "piecewise"))
    kw.setdefault("mode_reasons", {"decode-only": NO_DECODE_ONLY})
    return GraphCase(
        name=name, component="decode_step", make_input=gc.decode_make_input,
        eager=_decode_eager(stabiliser, x_quant), wrapper=_decode_wrapper(wrapper),
        golden=lambda x, dtype: gc.decode_golden(x, _decode_weights(), dtype),
        groups=("values", "metadata", "padding"), ragged_size=gc.decode_ragged_size, fp32_rope_phase=True,
        description=kw.pop("description", "whole decode step of a tiny DSV4-like SWA attention block: q/kv "
                                          "proj + norms + RoPE, paged cache write, window-128 attention with "
                                          "sink, inverse RoPE, grouped low-rank o-proj"),
        **kw)


def decode_multistep_case(name="decode_multistep", wrapper=gc.DecodeStepWrapper, steps=4, **kw):
    """The decode step captured at batch sizes 8, 4, 2 (one pool) and run ``steps`` steps per sequence:
    positions advance, the cache in the graph's static buffer grows by the replays' own writes."""
    kw.setdefault("modes", ("full", "piecewise"))
    kw.setdefault("mode_reasons", {"decode-only": NO_DECODE_ONLY})
    kw.setdefault("batch_sizes", (8, 4, 2))
    return GraphCase(
        name=name, component="decode_step",
        make_input=lambda seeds: gc.decode_multistep_make_input(seeds, steps),
        eager=_decode_eager(), wrapper=_decode_wrapper(wrapper),
        golden=lambda x, dtype: gc.decode_golden(x, _decode_weights(), dtype),
        groups=("values", "metadata", "padding"), ragged_size=gc.decode_ragged_size, fp32_rope_phase=True,
        steps=steps, advance=gc.decode_advance, step_keys=gc.DECODE_STEP_KEYS,
        description=kw.pop("description", f"{steps}-step decode (positions advance, cache grows in the graph's "
                                          "own buffer) at captured sizes 8/4/2 sharing one pool"),
        **kw)


def moe_case(name="moe_block", wrapper=gc.MoeWrapper, routing="row", **kw):
    kw.setdefault("mode_reasons", {"piecewise": "the MoE block has no attention op to split at (one piece)",
                                   "decode-only": NO_DECODE_ONLY})
    kw.setdefault("batch_sizes", (8, 4))

    def make_wrapper(example, device):
        return wrapper(example, device, weights=_moe_weights())

    def eager(x):
        w = {k: v.to(x["x"].device) for k, v in _moe_weights().items()}
        return gc.moe_forward(x["x"], w, routing=routing)

    return GraphCase(
        name=name, component="moe", make_input=gc.moe_make_input, eager=eager, wrapper=make_wrapper,
        golden=lambda x, dtype: gc.moe_golden(x, _moe_weights(), dtype), groups=("values", "padding"),
        description=kw.pop("description", "small MoE block: sqrt-softplus router + bias, top-2 of 8, SwiGLU "
                                          "experts with clamp, static-shape dense combine"),
        **kw)


def reference_cases() -> dict[str, Callable[[], GraphCase]]:
    return {"sparse_attn_decode": sparse_attn_case, "indexer_topk": indexer_case,
            "decode_step": decode_step_case, "decode_multistep": decode_multistep_case, "moe_block": moe_case}


def all_cases() -> dict[str, Callable[[], GraphCase]]:
    """The reference cases and the built-in mutants (``conformance.checks.graph_mutants``) by name."""
    from conformance.checks import graph_mutants
    return {**reference_cases(), **graph_mutants.mutant_cases()}


MUTANTS_SPEC = "conformance.checks.graph_mutants:factory"
_SUBJECT_CASES: dict = {}
_SUBJECT_SIM: dict = {}      # spec -> the device arch its simulation stands for ("" for none)


def subject_cases(spec: str, subject=None) -> dict[str, GraphCase]:
    """The capturable cases of the subject ``spec`` (``Subject.graph_cases()``), by name; {} without the hook.
    This is how a worker process finds a case: subject spec + case name. ``subject``: the loaded subject, when
    the caller has it (else it is loaded from ``spec``)."""
    if spec not in _SUBJECT_CASES:
        from conformance.subjects import load_subject, prepare_process

        if subject is None:
            prepare_process([spec])
        subj = subject if subject is not None else load_subject(spec)
        hook = getattr(subj, "graph_cases", None)
        cases = list(hook() or []) if callable(hook) else []
        for c in cases:
            if not isinstance(c, GraphCase):
                raise TypeError(f"subject {spec!r}: graph_cases() returned {type(c).__name__}, not a GraphCase")
        _SUBJECT_CASES[spec] = {c.name: c for c in cases}
        info = getattr(subj, "info", None)
        _SUBJECT_SIM[spec] = (getattr(info(), "simulated", "") or "") if callable(info) else ""
    return _SUBJECT_CASES[spec]


def needs_gpu_note(row, simulated: str = "") -> None:
    """A needs-gpu row says what was not replayed and which functions a device run captures (``simulated``: the
    arch a simulated subject stands for, e.g. vllm:sim-gfx942's rows: no HIP graph was replayed)."""
    if row.verdict == "needs-gpu" and "was replayed" not in row.message:
        what = f"SIMULATED {simulated}: no HIP graph was replayed" if simulated else "no graph was replayed"
        row.message = f"{row.message}; {what}; a device run captures {row.function}"


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
    if case.bound is not None:          # the case states its bound (formats coarser than float32)
        return {"g64": g64, "g32": g64, "bounds": {k: float(v) for k, v in case.bound(cpu_inputs, g64).items()}}
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
# one process: capture every batch size once (shared pool), replay many
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


def _pick_size(sizes, live: int) -> int:
    """The smallest captured batch size that holds ``live`` rows (a server pads up to it)."""
    return min(b for b in sizes if b >= live)


def _random_seeds(rs, batch, sizes=None) -> dict:
    """Seeds of a random input: live rows in 1..max(sizes), replayed on the smallest captured size >= live."""
    sizes = tuple(sizes or (batch,))
    top = max(sizes)
    s = {k: next(rs) for k in GROUPS_ALL}
    r = next(rs) % 4
    s["live"] = top if r == 0 else (1 if r == 1 else 1 + next(rs) % top)
    s["batch"] = _pick_size(sizes, s["live"])
    return s


def _takes_mode(factory) -> bool:
    import inspect
    try:
        ps = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "mode" or p.kind is p.VAR_KEYWORD for p in ps)


def build_wrapper(case: GraphCase, example: dict, device, mode: str):
    """``case.wrapper(example, device[, mode=mode])``; a wrapper that takes no ``mode`` serves every mode the
    case declares with the same code."""
    if _takes_mode(case.wrapper):
        return case.wrapper(example, device, mode=mode)
    return case.wrapper(example, device)


def _pieces(wrapper, mode: str):
    if mode != "piecewise":
        return None
    fn = getattr(wrapper, "pieces", None)
    if not callable(fn):
        raise TypeError("piecewise mode: the wrapper has no pieces()")
    ps = list(fn())
    if not ps:
        raise TypeError("piecewise mode: pieces() returned no piece")
    return ps


def _run_eager_chain(wrapper, pieces, debug=None) -> dict:
    """The region (or its pieces in order) run eagerly; ``debug`` wraps the captured parts (sync probe)."""
    debug = debug or contextlib.nullcontext
    if pieces is None:
        with debug():
            return wrapper.region()
    prev: dict = {}
    for p in pieces:
        with (debug() if p.capture else contextlib.nullcontext()):
            prev = p.fn(prev)
    return prev


class CudaGraphBackend:
    """torch.cuda graphs (CUDA graphs; HIP graphs on ROCm through the same API)."""

    name = "cuda-graph"

    def __init__(self):
        self._keep: list = []              # graphs stay alive as long as the backend

    def synchronize(self):
        torch.cuda.synchronize()

    def new_pool(self):
        return torch.cuda.graph_pool_handle()

    @contextlib.contextmanager
    def sync_debug_error(self):
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)

    def capture(self, wrapper, warm_dev, pool=None, pieces=None):
        """Warm up on a side stream, then capture (into ``pool``). Full: one graph of ``region()``. Piecewise:
        one graph per ``capture=True`` piece; the others run eagerly at replay and their outputs are copied
        into the buffers captured at capture time. Returns (replay(), static outputs)."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                wrapper.load(warm_dev)
                _run_eager_chain(wrapper, pieces)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        wrapper.load(warm_dev)
        if pieces is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                static_out = wrapper.region()
            torch.cuda.synchronize()
            self._keep.append(graph)
            return graph.replay, static_out
        plan, prev = [], {}
        for p in pieces:
            if p.capture:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = p.fn(prev)
                self._keep.append(graph)
                plan.append((graph, None, None, out))
            else:
                out = p.fn(prev)
                plan.append((None, p.fn, prev, out))
            prev = out
        torch.cuda.synchronize()

        def replay():
            for graph, fn, inp, static in plan:
                if graph is not None:
                    graph.replay()
                else:
                    new = fn(inp)
                    for k, v in new.items():
                        if v is not static[k]:
                            static[k].copy_(v)

        return replay, prev


def run_worker(case: GraphCase, n_inputs: int, n_replays: int, seed: int, device="cuda",
               n_probes: int = 2, backend=None, mode: str = "full") -> dict:
    """Capture every batch size of ``case`` once in this process (largest first, one shared pool), replay
    ``n_inputs`` inputs (each ``case.steps`` steps) ``n_replays`` times each, run the stale / padding probes and,
    with several sizes, the cross-size sharing probe. Returns a JSON-able record (what the diagnosis reads).
    ``backend`` defaults to real CUDA/HIP graphs; tests pass a simulated one (never used for reported results).
    The process seed is ``seed`` (``torch.initial_seed()`` inside the case's code)."""
    backend = backend or CudaGraphBackend()
    t0 = time.time()
    torch.manual_seed(seed)
    rs = _seed_stream(seed)
    sizes = case.batch_sizes
    rec: dict = {"seed": seed, "mode": mode, "sizes": list(sizes), "capture": {}, "replays": [], "probes": [],
                 "cross_size": []}
    with golden_mode():
        ctx: dict = {}
        pool = backend.new_pool() if hasattr(backend, "new_pool") else None
        for bi, b in enumerate(sizes):                      # largest first, as a server captures
            # a capture-time dummy batch: every row live, short lengths (smaller than most replayed batches)
            warm_seeds = dict(_random_seeds(rs, b, (b,)), live=b, batch=b, short=True)
            warm = case.make_input(warm_seeds)
            warm_dev = gc.to_device(warm, device)
            try:
                wrapper = build_wrapper(case, warm_dev, device, mode)
                pieces = _pieces(wrapper, mode)
            except Exception as e:  # noqa: BLE001 - a wrapper that cannot be built is a finding
                rec["capture"].update(ok=False, size=b, error=f"{type(e).__name__}: {e}"[:600],
                                      site=_site(traceback.format_exc()), kind=CAUSE_CAPTURE_ERROR)
                rec["wall_s"] = time.time() - t0
                return rec
            warm_ragged = case.ragged_size(warm) if case.ragged_size else None
            if bi == 0:
                rec["capture"]["warm_live"] = warm["live"]
                rec["capture"]["warm_ragged"] = warm_ragged
                # (1a) host-sync probe: one eager run of the region with sync debug mode "error"
                wrapper.load(warm_dev)
                backend.synchronize()
                sync = None
                try:
                    _run_eager_chain(wrapper, pieces, backend.sync_debug_error)
                except RuntimeError as e:
                    sync = {"message": str(e).splitlines()[0][:300], "site": _site(traceback.format_exc())}
                backend.synchronize()
                rec["capture"]["host_sync"] = sync
            # (1b) warm-up on a side stream, then capture
            try:
                if pieces is not None or pool is not None:
                    replay_fn, static_out = backend.capture(wrapper, warm_dev, pool=pool, pieces=pieces)
                else:
                    replay_fn, static_out = backend.capture(wrapper, warm_dev)
            except Exception as e:  # noqa: BLE001 - every capture failure is a finding
                chain, x = [], e             # the first error (e.g. the .item()) is the context of the
                while x is not None and len(chain) < 5:   # "invalidated capture" raised when capture ends
                    chain.append(x)
                    x = x.__cause__ or x.__context__
                root = chain[-1]
                tb = "".join(traceback.format_exception(type(root), root, root.__traceback__))
                msg = " <- ".join(f"{type(c).__name__}: {(str(c).strip().splitlines() or [''])[0]}"
                                  for c in reversed(chain))
                rec["capture"].update(ok=False, size=b, error=msg[:600], site=_site(tb),
                                      kind=CAUSE_CAPTURE_SYNC if (_SYNC_PATTERNS.search(msg)
                                                                  or rec["capture"].get("host_sync"))
                                      else CAUSE_CAPTURE_ERROR)
                rec["wall_s"] = time.time() - t0
                return rec
            ctx[b] = dict(wrapper=wrapper, replay=replay_fn, out=static_out, warm_seeds=warm_seeds,
                          warm_ragged=warm_ragged)
        rec["capture"]["ok"] = True

        def replay(b, inputs_dev, keys=None):
            c = ctx[b]
            c["wrapper"].load(inputs_dev if keys is None else {k: inputs_dev[k] for k in keys})
            c["replay"]()
            backend.synchronize()
            return {k: v.clone() for k, v in c["out"].items()}

        def eager(inputs_dev):
            out = case.eager(inputs_dev)
            backend.synchronize()
            return out

        # (2) many inputs (each case.steps steps), several replays each
        prev = None
        for i in range(n_inputs):
            if i % 4 == 0:        # same metadata / top-k / padding / live as a warm-up batch, new values
                wb = sizes[(i // 4) % len(sizes)]
                seeds = dict(ctx[wb]["warm_seeds"], values=next(rs))
                same_warm = True
            else:
                seeds = _random_seeds(rs, sizes[0], sizes)
                same_warm = False
            b = seeds["batch"]
            x = case.make_input(seeds)
            live = x["live"]
            state = None
            for step in range(case.steps):
                xd = gc.to_device(x, device)
                if step == 0:
                    state = gc.clone_inputs(xd)
                else:
                    state.update({k: xd[k] for k in case.step_keys})
                ref = eager(state if case.steps > 1 else gc.clone_inputs(xd))
                gold = _dense_golden(case, x)
                ragged = case.ragged_size(x) if case.ragged_size else None
                first = None
                for r in range(n_replays):
                    out = replay(b, xd, None if step == 0 else case.step_keys)
                    ok_e, bitwise, md = _eager_compare(case, out, ref, gold, live)
                    ok_g, gm, gb = _golden_compare(case, out, gold, live)
                    consistent = True if first is None else _equal_live(out, first, live)
                    if first is None:
                        first = out
                    stale_prev = None
                    if prev is not None and r == 0 and step == 0:
                        pl = min(live, prev["live"])
                        stale_prev = (_equal_live(out, prev["out"], pl) and not _equal_live(ref, prev["ref"], pl))
                    rec["replays"].append(dict(
                        input=i, step=step, rep=r, live=live, size=b, same_as_warm=same_warm and step == 0,
                        ragged=ragged, warm_ragged=ctx[b]["warm_ragged"], eager_ok=ok_e, bitwise=bitwise,
                        eager_maxdiff=md, golden_ok=ok_g, golden_metric=gm, golden_bound=gb,
                        consistent=consistent, stale_vs_prev=stale_prev))
                if step == 0:
                    prev = {"out": first, "ref": ref, "live": live}
                if step + 1 < case.steps:
                    x = case.advance(x, step + 1, {k: v.detach().to("cpu") for k, v in ref.items()})

        # (3) probes: pairs that differ in one group only
        for group in case.groups:
            for _ in range(2 * n_probes if group == "padding" else n_probes):
                a = _random_seeds(rs, sizes[0], sizes)
                if group == "padding":       # on a size with padding rows: the largest one, live <= size-2
                    a["batch"] = sizes[0]
                    a["live"] = max(1, min(a["live"], sizes[0] - 2))
                pb = a["batch"]
                bsd = dict(a, **{group: next(rs)})
                xa, xb = case.make_input(a), case.make_input(bsd)
                da, db = gc.to_device(xa, device), gc.to_device(xb, device)
                live = xa["live"]
                ra, rb = replay(pb, da), replay(pb, db)
                ea, eb = eager(gc.clone_inputs(da)), eager(gc.clone_inputs(db))
                e_changed = not _equal_live(ea, eb, live)
                r_changed = not _equal_live(ra, rb, live)
                if group == "padding":       # also against zero-filled padding (garbage may saturate both)
                    dz = gc.to_device(case.make_input(dict(a, padding=-1)), device)
                    rz, ez = replay(pb, dz), eager(gc.clone_inputs(dz))
                    e_changed = e_changed or not _equal_live(ea, ez, live)
                    r_changed = r_changed or not _equal_live(ra, rz, live)
                rec["probes"].append(dict(group=group, live=live, size=pb, eager_changed=e_changed,
                                          replay_changed=r_changed))

        # (3b) warm-anchored probes: group g kept at the warm-up batch's value (everything else redrawn) vs g
        # redrawn too. A buffer refreshed only on the first load is right in the first and wrong in the second
        # even when other inputs still change the output (partly stale metadata).
        if case.deterministic:
            for group in [g for g in case.groups if g != "padding"]:
                for _ in range(n_probes + 1):
                    pb = sizes[next(rs) % len(sizes)]
                    w = ctx[pb]["warm_seeds"]
                    same = dict(_random_seeds(rs, pb, (pb,)), live=w["live"], batch=pb, short=w.get("short"),
                                **{group: w[group]})
                    oks = []
                    for sd in (same, dict(same, **{group: next(rs)})):
                        xd = gc.to_device(case.make_input(sd), device)
                        oks.append(_equal_live(replay(pb, xd), eager(gc.clone_inputs(xd)), sd["live"]))
                    rec.setdefault("anchored", []).append(dict(group=group, size=pb, same_ok=oks[0],
                                                               diff_ok=oks[1]))

        # (4) cross-size sharing: load a size's inputs, replay the other sizes (each on its own inputs), then
        # replay it, as a server does with interleaved micro-batches (dual-batch overlap: load both, replay
        # both). Its result must equal eager on the inputs it was loaded with, as it does when replayed right
        # after its load. What a replay leaves in its static outputs is NOT required to survive other sizes'
        # replays: graphs sharing one pool reuse each other's freed intermediates (CUDA/HIP semantics; vLLM
        # consumes a replay's outputs before the next), so survival is no correctness property.
        if len(sizes) > 1:
            for b in sizes:
                sa = dict(_random_seeds(rs, b, (b,)), live=b, batch=b)
                xa = case.make_input(sa)
                da = gc.to_device(xa, device)
                ref = eager(gc.clone_inputs(da))
                gold = _dense_golden(case, xa)
                direct_ok = _eager_compare(case, replay(b, da), ref, gold, b)[0]
                others = [o for o in sizes if o != b]
                ctx[b]["wrapper"].load(da)
                for o in others:
                    so = dict(_random_seeds(rs, o, (o,)), live=o, batch=o)
                    replay(o, gc.to_device(case.make_input(so), device))
                ctx[b]["replay"]()
                backend.synchronize()
                inter = {k: v.clone() for k, v in ctx[b]["out"].items()}
                inter_ok = _eager_compare(case, inter, ref, gold, b)[0]
                rec["cross_size"].append(dict(size=b, others=others, direct_ok=direct_ok, interleaved_ok=inter_ok,
                                         changed=direct_ok and not inter_ok))
    rec["wall_s"] = time.time() - t0
    return rec


# --------------------------------------------------------------------------------------------------------
# diagnosis (pure: unit-tested on CPU with fake records)
# --------------------------------------------------------------------------------------------------------

def _rate(n: int, d: int) -> dict:
    return {"n": n, "of": d, "rate": (n / d) if d else None}


def _process_failed(p: dict) -> bool:
    """Did this one process see anything wrong (crash, capture, replay vs eager / golden, probes)?"""
    if p.get("crashed") or not p.get("capture", {}).get("ok"):
        return True
    if any(not (r["eager_ok"] and r["golden_ok"] and r["consistent"]) for r in p.get("replays", [])):
        return True
    for q in p.get("probes", []):
        if q["group"] == "padding" and q["replay_changed"]:
            return True
        if q["group"] != "padding" and q["eager_changed"] and not q["replay_changed"]:
            return True
    if any(not q["diff_ok"] or not q["same_ok"] for q in p.get("anchored", [])):
        return True
    return any(a["changed"] for a in p.get("cross_size", []))


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
    padding_graph_only = False
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
                padding_graph_only = not also
        else:
            relevant = [q for q in qs if q["eager_changed"]]
            bad = [q for q in relevant if not q["replay_changed"]]
            rates[f"stale_probe_{g}"] = _rate(len(bad), len(relevant))
            if bad:
                stale_groups.append(g)
    anchored = [q for p in alive for q in p.get("anchored", [])]
    for g in sorted({q["group"] for q in anchored}):
        qs = [q for q in anchored if q["group"] == g]
        frozen = all(q["same_ok"] for q in qs) and any(not q["diff_ok"] for q in qs)
        rates[f"frozen_probe_{g}"] = _rate(sum(1 for q in qs if q["same_ok"] and not q["diff_ok"]), len(qs))
        if frozen and g not in stale_groups:
            stale_groups.append(g)
    if stale_groups:
        c = f"{CAUSE_STALE}: {', '.join(stale_groups)}"
        causes.append(c)
        evidence[c] = ("replay output unchanged while eager changed when only " + "/".join(stale_groups) +
                       " changed, or replay right exactly when " + "/".join(stale_groups) +
                       " equal the warm-up batch's (not refreshed between replays)")

    if e_bad:
        with_r = [r for r in reps if r.get("ragged") is not None]
        if padding_graph_only:     # padding explains mismatches of padded batches: judge sizes on full ones
            with_r = [r for r in with_r if r.get("size") is None or r["live"] == r["size"]]
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
                and (nb(with_r) == len(e_bad) or padding_graph_only):
            causes.append(CAUSE_WARMUP_ALLOC)
            evidence[CAUSE_WARMUP_ALLOC] = (
                f"replay differs from eager only when the live ragged size differs from warm-up: "
                f"{nb(same)}/{len(same)} when equal, {nb(bigger)}/{len(bigger)} when larger, "
                f"{nb(smaller)}/{len(smaller)} when smaller")
            explained = True
        if stale_groups or padding_graph_only:
            explained = True
        sizes = sorted({r.get("size") for r in reps if r.get("size") is not None})
        if len(sizes) > 1:
            for b in sizes:
                rb = [r for r in reps if r.get("size") == b]
                rates[f"eager_mismatch_size_{b}"] = _rate(nb(rb), len(rb))
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

    crossed = [a for p in alive for a in p.get("cross_size", [])]
    if crossed:
        bad_x = [a for a in crossed if a["changed"]]
        rates["cross_size_probe"] = _rate(len(bad_x), len(crossed))
        if bad_x:
            causes.append(CAUSE_SHARED)
            a = bad_x[0]
            evidence[CAUSE_SHARED] = (f"the size-{a['size']} graph, loaded and then replayed after the size "
                                      f"{a['others']} graphs replayed, differed from eager on its own inputs; "
                                      f"replayed right after its load it was right ({len(bad_x)}/{len(crossed)} "
                                      "probes): its static inputs or state are written by another size")

    # every fresh process on its own: a failure in some processes but not all is intermittent
    failed = [p for p in procs if _process_failed(p)]
    rates["process_fail"] = _rate(len(failed), len(procs))
    if failed and len(failed) < len(procs):
        causes.append(CAUSE_PROCESS_INTERMITTENT)
        evidence[CAUSE_PROCESS_INTERMITTENT] = (
            f"{len(failed)}/{len(procs)} fresh processes failed (seeds "
            f"{', '.join(str(p.get('seed')) for p in failed)}); the others passed: never a pass")

    graph_causes = [c for c in causes if c not in (CAUSE_GOLDEN,)]
    if crashed or cap_fail or any(c.startswith(CAUSE_STALE) for c in causes) or CAUSE_PADDING in causes \
            or CAUSE_WARMUP_ALLOC in causes or CAUSE_INTERMITTENT in causes or CAUSE_EAGER_MISMATCH in causes \
            or CAUSE_SHARED in causes or CAUSE_PROCESS_INTERMITTENT in causes:
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
    subject: str = "reference"
    mode: str = "full"
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
    twin_of: str | None = None
    expect_cause: str | None = None
    caught: bool | None = None
    message: str = ""
    batch_sizes: list = field(default_factory=list)
    steps: int = 1
    function: str = ""
    description: str = ""
    per_process: list = field(default_factory=list)

    @property
    def case_id(self) -> str:
        return f"graph/{self.case}" if self.mode == "full" else f"graph/{self.case}/{self.mode}"

    def rerun(self) -> str:
        return (f"python -m conformance.checks.graph --subject {self.subject} --cases {self.case} "
                f"--modes {self.mode}")

    def to_rows(self, subject: str | None = None) -> list[CheckResult]:
        rows = []
        ran = self.verdict not in ("needs-gpu", "not-run")
        for level in ("eager", "golden"):
            v = self.verdicts.get(level, self.verdict)
            rows.append(CheckResult(
                subject=subject or self.subject, case_id=self.case_id,
                component=self.component, check="graph", level=level, verdict=v, message=self.message,
                metrics={k: r["rate"] for k, r in self.rates.items() if r.get("rate") is not None},
                bounds={}, derivation={"golden": "8x float32 golden rounding error vs float64 (+64 u32 |g|)",
                                       "eager": "bitwise on live rows (deterministic kernels)"},
                function=self.function or f"{self.subject} graph case {self.case}",
                backend=f"cuda-graph:{self.mode}" if ran else "", device=self.device,
                params={"mode": self.mode, "batch_sizes": self.batch_sizes, "steps": self.steps,
                        "processes": self.processes, "inputs": self.inputs_per_process,
                        "replays_per_input": self.replays_per_input},
                duration_s=self.wall_s, rerun=self.rerun(),
                extra={"causes": self.causes, "evidence": self.evidence, "rates": self.rates,
                       "mutant": self.mutant, "twin_of": self.twin_of,
                       "expect_cause": self.expect_cause, "caught": self.caught, "replays": self.replays,
                       "probes": self.probes, "graph_mode": self.mode}))
        return rows


_WORKER_TAG = "GRAPH_WORKER_JSON "


def _spawn_worker(name: str, seed: int, n_inputs: int, n_replays: int, timeout: float,
                  subject: str = "reference", mode: str = "full",
                  worker_backend: str | None = None, parallel: int = 1) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "conformance.checks.graph", "--worker", name, "--subject", subject,
           "--modes", mode, "--seed", str(seed), "--inputs", str(n_inputs), "--replays", str(n_replays)]
    if worker_backend:
        cmd += ["--worker-backend", worker_backend]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    paths = [root, os.getcwd()] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # parallel workers each run CPU goldens: one share of the cores each, not a full thread pool each
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, parallel))))
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


def resolve_case(case: GraphCase | str, subject: str = "reference") -> tuple[GraphCase, str, bool]:
    """(case, subject spec, the worker processes can find it by name under that spec)."""
    if isinstance(case, GraphCase):
        found = subject_cases(subject).get(case.name) if subject else None
        return case, subject, found is not None
    cases = subject_cases(subject)
    if case not in cases and subject == "reference" and case in subject_cases(MUTANTS_SPEC):
        subject, cases = MUTANTS_SPEC, subject_cases(MUTANTS_SPEC)       # old call style: a built-in mutant
    if case not in cases:
        raise KeyError(f"subject {subject!r} has no graph case {case!r}; it has {sorted(cases)}")
    return cases[case], subject, True


def _plan(case, subject, mode, n_inputs, n_replays, n_processes, device, simulated):
    """(base fields, early report or None): a mode the case does not declare -> not-run; no device ->
    needs-gpu."""
    base = dict(case=case.name, component=case.component, mutant=case.mutant, expect_cause=case.expect_cause,
                processes=n_processes, inputs_per_process=n_inputs, replays_per_input=n_replays,
                subject=subject, mode=mode, twin_of=case.twin_of, batch_sizes=list(case.batch_sizes),
                steps=case.steps, function=getattr(case, "function", "") or "", description=case.description)
    dev = device_name() if device is None else str(device)
    if mode not in case.modes:
        return base, GraphReport(**base, device=dev, verdict="not-run",
                                 verdicts={"eager": "not-run", "golden": "not-run"},
                                 message=case.not_supported_reason(mode))
    dev_ok = simulated or (graph_device_available() and (device is None or str(device).startswith("cuda")))
    if not dev_ok:
        return base, GraphReport(**base, device=dev, verdict="needs-gpu",
                                 verdicts={"eager": "needs-gpu", "golden": "needs-gpu"},
                                 message="needs a GPU: graph capture/replay needs a CUDA or ROCm device; not run")
    return base, None


def _finish(case, base, procs, wall_s, simulated_name: str | None) -> GraphReport:
    d = diagnose(procs, case.deterministic)
    rank = {"pass": 0, "degraded": 1, "fail": 2, "error": 3}
    verdict = max(d["verdicts"].values(), key=lambda v: rank[v])
    caught = _caught(d["causes"], case.expect_cause, verdict)   # None for correct cases
    msg = ("causes: " + "; ".join(d["causes"])) if d["causes"] else "replay matches eager and golden"
    per = [{"seed": p.get("seed"), "crashed": p.get("crashed", False), "failed": _process_failed(p),
            "capture_ok": p.get("capture", {}).get("ok"), "wall_s": p.get("wall_s")} for p in procs]
    dev = device_name() if not simulated_name else f"cpu (SIMULATED capture: {simulated_name}; not a device run)"
    return GraphReport(**base, device=dev, verdict=verdict, verdicts=d["verdicts"],
                       causes=d["causes"],
                       evidence=d["evidence"], rates=d["rates"], replays=d["replays"], probes=d["probes"],
                       wall_s=wall_s, caught=caught, message=msg, per_process=per)


def _seeds(seed: int, n_processes: int) -> list[int]:
    return [seed * 1000 + 17 * i + 1 for i in range(n_processes)]


def run_graph_case(case: GraphCase | str, n_inputs: int = 16, n_replays: int = 3, device=None,
                   n_processes: int = 3, seed: int = 0, parallel: int = 3, in_process: bool = False,
                   timeout: float = 300.0, subject: str = "reference", mode: str = "full",
                   backend=None, worker_backend: str | None = None) -> GraphReport:
    """Capture/replay one case of ``subject`` in graph ``mode`` in ``n_processes`` fresh processes and
    diagnose. A mode the case does not declare -> not-run (with the reason); no device -> needs-gpu.
    ``backend`` (tests only: a simulated capture) runs in this process, ``worker_backend`` ("module:Class",
    tests only) in the fresh worker processes; neither is ever a device result: the rows say SIMULATED."""
    return run_jobs([(case, subject, mode)], n_inputs=n_inputs, n_replays=n_replays, device=device,
                    n_processes=n_processes, seed=seed, parallel=parallel, in_process=in_process, timeout=timeout,
                    backend=backend, worker_backend=worker_backend)[0]


def run_jobs(jobs, n_inputs: int = 16, n_replays: int = 3, device=None, n_processes: int = 3, seed: int = 0,
             parallel: int = 3, in_process: bool = False, timeout: float = 300.0, backend=None,
             worker_backend: str | None = None, budget_s: float | None = None,
             progress: bool = False) -> list[GraphReport]:
    """Run ``jobs`` [(case or name, subject spec, mode)]: every job's fresh processes share one pool of
    ``parallel`` slots (processes of different cases run side by side). Past ``budget_s`` no process is
    started; a job short of its processes is reported not-run (never a pass)."""
    t_start = time.time()
    simulated_name = (getattr(backend, "name", None) or "simulated") if backend is not None else worker_backend
    out: list = [None] * len(jobs)
    todo = []                                   # (job index, case, subject, mode, base, seeds)
    for j, (c, subj, mode) in enumerate(jobs):
        case, subj, findable = resolve_case(c, subj)
        base, early = _plan(case, subj, mode, n_inputs, n_replays, n_processes, device, simulated_name is not None)
        if early is not None:
            out[j] = early
            continue
        todo.append((j, case, subj, mode, base, findable))
    records: dict = {j: [] for j, *_ in todo}
    walls: dict = {}
    queue = []
    for j, case, subj, mode, _base, findable in todo:
        local = backend is not None or ((in_process or not findable) and worker_backend is None)
        for sd in _seeds(seed, n_processes):
            queue.append((j, case, subj, mode, sd, local))
    running: list = []
    over = False
    while queue or running:
        while queue and len(running) < max(1, parallel) and not over:
            if budget_s is not None and time.time() - t_start > budget_s:
                over = True
                break
            j, case, subj, mode, sd, local = queue.pop(0)
            t0 = time.time()
            if local:
                try:
                    rec = run_worker(case, n_inputs, n_replays, sd, device or ("cpu" if backend else "cuda"),
                                     backend=backend, mode=mode)
                except Exception:  # noqa: BLE001
                    rec = {"crashed": True, "error": traceback.format_exc()[-600:]}
                records[j].append({"seed": sd, **rec})
                walls[j] = walls.get(j, 0.0) + time.time() - t0
            else:
                running.append((j, sd, t0, _spawn_worker(case.name, sd, n_inputs, n_replays, timeout, subj, mode,
                                                         worker_backend, parallel)))
        if over and not running:
            break
        if running:
            j, sd, t0, p = running.pop(0)
            rec = {"seed": sd, **_collect(p, timeout)}
            records[j].append(rec)
            walls[j] = max(walls.get(j, 0.0), time.time() - t0)
            if progress:
                what = ("CRASHED " + rec.get("error", "")[-200:]) if rec.get("crashed") else "done"
                print(f"  [{time.time() - t_start:6.1f}s] {jobs[j][1][:28]} {getattr(jobs[j][0], 'name', jobs[j][0])} "
                      f"{jobs[j][2]} seed {sd}: {what} ({time.time() - t0:.1f}s)", file=sys.stderr, flush=True)
    for j, case, _subj, _mode, base, _findable in todo:
        procs = records[j]
        if len(procs) < n_processes:
            out[j] = GraphReport(**base, device=device_name(), verdict="not-run",
                                 verdicts={"eager": "not-run", "golden": "not-run"},
                                 message=f"time budget ({budget_s:.0f} s) exhausted: {len(procs)}/{n_processes} "
                                         f"processes ran; not judged")
        else:
            out[j] = _finish(case, base, procs, walls.get(j, 0.0), simulated_name)
    return out


def mark_mode_specific(reports: list[GraphReport]) -> None:
    """Across the modes of one case: failing in some modes while passing in others is named on the failing
    rows ("mode-specific: fails only in graph mode decode-only")."""
    by_case: dict = {}
    for r in reports:
        by_case.setdefault((r.subject, r.case), []).append(r)
    for reps in by_case.values():
        bad = [r for r in reps if r.verdict in ("fail", "catastrophic", "error")]
        good = [r for r in reps if r.verdict == "pass"]
        if not bad or not good:
            continue
        c = f"{CAUSE_MODE_SPECIFIC}: fails only in graph mode {', '.join(r.mode for r in bad)}"
        for r in bad:
            r.causes.append(c)
            r.evidence[c] = (f"passes in {', '.join(r2.mode for r2 in good)}, fails in "
                             f"{', '.join(r2.mode for r2 in bad)}")
            r.message = "causes: " + "; ".join(r.causes)
            r.caught = _caught(r.causes, r.expect_cause, r.verdict)


def run_subject(subject: str = "reference", names: list[str] | None = None, modes=GRAPH_MODES,
                **kw) -> list[GraphReport]:
    """Every graph case of ``subject`` (or ``names``) in every mode of ``modes``: declared modes run,
    undeclared ones are not-run rows with the reason. A subject without ``graph_cases()`` gives one
    not-provided report."""
    cases = subject_cases(subject)
    if not cases:
        return [GraphReport(case="*", component="graph", device=device_name(), verdict="not-provided",
                            subject=subject, verdicts={"eager": "not-provided", "golden": "not-provided"},
                            message=f"subject {subject} has no graph_cases(): nothing to capture")]
    missing = [n for n in (names or []) if n not in cases]
    if missing:
        raise KeyError(f"subject {subject!r} has no graph case {missing}; it has {sorted(cases)}")
    reports = run_jobs([(cases[n], subject, m) for n in (names or list(cases)) for m in modes], **kw)
    mark_mode_specific(reports)
    return reports


def run_suite(names: list[str] | None = None, **kw) -> list[GraphReport]:
    """The reference cases and the built-in mutants (full mode), by name."""
    out = []
    for n in (names or list(all_cases())):
        out.append(run_graph_case(n, **kw))
    return out


def summary_markdown(reports: list[GraphReport], header: str = "") -> str:
    lines = [header or "# Graph-replay suite", "", f"device: {reports[0].device if reports else '?'}", "",
             "| subject | case | mode | sizes | steps | mutant / twin | verdict (eager / golden) | causes | "
             "expected cause | caught | process fail | capture fail | eager mismatch | golden fail | "
             "padding probe | stale probes | cross-size probe | replays | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def r(rep, k):
        x = rep.rates.get(k)
        return f"{x['n']}/{x['of']}" if x else "-"

    for rep in reports:
        stale = ", ".join(f"{k[12:]} {r(rep, k)}" for k in rep.rates if k.startswith("stale_probe_")) or "-"
        role = "mutant" if rep.mutant else (f"twin of {rep.twin_of}" if rep.twin_of else "-")
        lines.append(
            f"| {rep.subject} | {rep.case} | {rep.mode} | {'/'.join(map(str, rep.batch_sizes))} | {rep.steps} | "
            f"{role} | {rep.verdict} ({rep.verdicts.get('eager')} / {rep.verdicts.get('golden')}) | "
            f"{'; '.join(rep.causes) or ('-' if rep.verdict not in ('not-run', 'not-provided') else rep.message)}"
            f" | {rep.expect_cause or '-'} | "
            f"{'-' if rep.caught is None else ('yes' if rep.caught else 'NO')} | {r(rep, 'process_fail')} | "
            f"{r(rep, 'capture_fail')} | {r(rep, 'eager_mismatch')} | {r(rep, 'golden_fail')} | "
            f"{r(rep, 'padding_probe')} | {stale} | {r(rep, 'cross_size_probe')} | {rep.replays} | {rep.wall_s:.1f} |")
    lines += ["", "## Evidence", ""]
    for rep in reports:
        for c, e in rep.evidence.items():
            lines.append(f"* **{rep.subject} / {rep.case} [{rep.mode}]** — {c}: {e}")
    return "\n".join(lines) + "\n"


def suite_problems(reports: list[GraphReport]) -> list[str]:
    """What makes the suite exit 1: a mutant no mode of which was caught, or a correct case (reference or a
    twin) with a verdict other than pass / needs-gpu / not-run in any mode."""
    bad = []
    by_case: dict = {}
    for r in reports:
        by_case.setdefault((r.subject, r.case), []).append(r)
    for (subj, case), reps in by_case.items():
        ran = [r for r in reps if r.verdict not in ("needs-gpu", "not-run", "not-provided")]
        bad += [f"{subj} / {case} [{r.mode}]: not judged: {r.message}" for r in reps
                if r.verdict == "not-run" and r.message.startswith("time budget")]
        if reps[0].mutant:
            if ran and not any(r.caught for r in ran):
                bad.append(f"{subj} / {case}: mutant not caught ({[r.causes for r in ran]})")
        else:
            for r in ran:
                if r.verdict != "pass":
                    bad.append(f"{subj} / {case} [{r.mode}]: {r.verdict}: {r.message}")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-backend", help=argparse.SUPPRESS)      # tests: "module:Class" simulated capture
    ap.add_argument("--subject", action="append", default=[],
                    help="subject spec whose graph_cases() to run (repeatable; reference | module:factory); "
                         f"default: reference and the built-in mutants ({MUTANTS_SPEC})")
    ap.add_argument("--modes", nargs="*", default=list(GRAPH_MODES), choices=GRAPH_MODES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inputs", type=int, default=16)
    ap.add_argument("--replays", type=int, default=3)
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=3)
    ap.add_argument("--cases", nargs="*")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per worker process")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no worker process after this many seconds; cases short of their processes are "
                         "reported not-run (never pass), so the run ends and writes its summary in time")
    ap.add_argument("--out", default=os.environ.get("OUT") and str(Path(os.environ["OUT"]) / "graph")
                    or "out/graph")
    a = ap.parse_args(argv)
    if a.worker:
        spec = (a.subject or ["reference"])[0]
        case, _, _ = resolve_case(a.worker, spec)
        backend, device = None, "cuda"
        if a.worker_backend:
            import importlib

            mod, _, attr = a.worker_backend.partition(":")
            backend, device = getattr(importlib.import_module(mod), attr)(), "cpu"
        rec = run_worker(case, a.inputs, a.replays, a.seed, device, mode=(a.modes or ["full"])[0],
                         backend=backend)
        print(_WORKER_TAG + json.dumps(rec), flush=True)
        return 0
    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    writer = ResultWriter(out, worker="graph")
    specs = a.subject or ["reference", MUTANTS_SPEC]
    kw = dict(n_inputs=a.inputs, n_replays=a.replays, n_processes=a.processes, parallel=a.parallel, seed=a.seed,
              timeout=a.timeout, budget_s=a.budget_s, progress=True, worker_backend=a.worker_backend)
    jobs, reports = [], []
    for spec in specs:
        cases = subject_cases(spec)
        if not cases:
            reports += run_subject(spec)                  # one not-provided report
            continue
        for n in [n for n in (a.cases or list(cases)) if n in cases]:
            jobs += [(cases[n], spec, m) for m in a.modes]
    reports += run_jobs(jobs, **kw)
    mark_mode_specific(reports)
    for rep in reports:
        for row in rep.to_rows():
            needs_gpu_note(row, _SUBJECT_SIM.get(rep.subject, ""))
            writer.write(row)
        print(f"{rep.subject[:28]:28s} {rep.case:30s} {rep.mode:11s} {rep.verdict:9s} caught={rep.caught} "
              f"causes={rep.causes} wall={rep.wall_s:.1f}s", flush=True)
    total = time.time() - t0
    problems = suite_problems(reports)
    (out / "graph-summary.json").write_text(json.dumps(
        {"device": device_name(), "subjects": specs, "modes": a.modes, "total_wall_s": total,
         "problems": problems, "reports": [asdict(r) for r in reports]}, indent=1, default=str))
    (out / "graph-summary.md").write_text(summary_markdown(reports) + "\n## Problems\n\n"
                                          + ("".join(f"* {p}\n" for p in problems) or "none\n")
                                          + f"\ntotal wall time {total:.1f}s\n")
    for p in problems:
        print("PROBLEM:", p, flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
