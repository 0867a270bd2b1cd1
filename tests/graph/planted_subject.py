"""A plugin subject with planted graph-replay bugs, one per kind, each next to its correct twin.

Load it as any plugin: ``--subject tests.graph.planted_subject:factory``. It lives under tests/ so that nothing
in the product imports it. It uses only the public interface (``conformance.subjects.GraphCase`` /
``GraphPiece`` / ``Subject.graph_cases``) plus the harness's capturable components as building blocks.

Case: planted bug (only in the captured path; the eager path is correct) -> the cause the check must name.

* ``host_read``: ``.item()`` on a device tensor inside the region -> capture-time host sync.
* ``warmup_alloc``: ragged index buffer sized by ``indptr[-1]`` read at warm-up; the harness's warm-up is a
  short dummy batch, so every longer batch overflows it -> warm-up-sized allocation.
* ``stale_metadata``: ``load()`` refreshes the block table only on the first call -> stale: metadata.
* ``padding_read``: MoE router logits centred on the padded batch's mean (padding rows steer the live rows'
  routing) -> reads padding rows.
* ``shared_static``: every captured size reads its tokens from one static input buffer of the largest size (a
  view of its first rows), so another size's load, replayed between this size's load and replay (interleaved
  micro-batches), overwrites them -> static buffers shared across captured sizes.
* ``decode_only``: the decode-only path builds the attention window without the current token ->
  mode-specific (fails only in decode-only).
* ``intermittent``: the region scales its output by (1 + 2^-20) in processes whose seed is 0 mod 5 ->
  intermittent across processes.

Each twin (``<name>_twin``) is the same case without the bug and must pass in every mode it declares.
"""

from __future__ import annotations

import torch

from conformance.checks import graph as G
from conformance.checks import graph_components as gc
from conformance.subjects import GraphCase, Subject, SubjectInfo

D = gc.DIMS


# ----------------------------------------------------------------------------------------------- wrappers

class HostReadWrapper(gc.SparseAttnWrapper):
    """Trims the window to the longest live sequence read on the host: a device->host read in the region."""

    planted = True

    def region(self):
        if self.planted:
            self.window = min(int(self.static["seq_lens"].max().item()), self.d.W)
        return super().region()


class HostReadTwin(HostReadWrapper):
    planted = False


class WarmupAllocWrapper(gc.SparseAttnWrapper):
    """Builds the ragged list into a buffer whose size it read from ``indptr[-1]`` during warm-up (under
    capture the read is illegal, so the warm-up value is kept): entries past it are dropped by the guard."""

    planted = True

    def __init__(self, example, device, dims=D):
        super().__init__(example, device, dims)
        self.n = None

    def region(self):
        if not self.planted:
            return super().region()
        s, d = self.static, self.d
        dense = gc.sparse_dense_indices(s["seq_lens"], s["block_table"], s["topk"], s["comp_block_table"], d)
        valid = dense >= 0
        indptr = torch.zeros(dense.shape[0] + 1, dtype=torch.long, device=dense.device)
        indptr[1:] = torch.cumsum(valid.sum(1), 0)
        if self.n is None and not torch.cuda.is_current_stream_capturing():
            self.n = int(indptr[-1].item())                   # first warm-up call: the dummy batch's size
        ragged = torch.empty(self.n + 1, dtype=torch.long, device=dense.device)
        pos = indptr[:-1, None] + torch.cumsum(valid.long(), 1) - 1
        pos = torch.where(valid & (pos < self.n), pos, torch.full_like(pos, self.n))
        ragged.scatter_(0, pos.reshape(-1), dense.reshape(-1))
        idx = gc.ragged_to_dense(indptr, ragged, d.W + d.K, self.n)
        return {"out": gc.attn_core(s["q"], idx, s["swa_cache"].reshape(-1, d.D), s["comp_cache"].reshape(-1, d.D),
                                    d.NB * d.BS, s["sink"], d.scale)}


class WarmupAllocTwin(WarmupAllocWrapper):
    planted = False


class StaleBlockTableWrapper(gc.DecodeStepWrapper):
    """Copies the block table into its static buffer only on the first load (assumes it never changes)."""

    planted = True

    def load(self, inputs):
        if self.planted and self.loads > 0:
            inputs = {k: v for k, v in inputs.items() if k != "block_table"}
        super().load(inputs)


class StaleBlockTableTwin(StaleBlockTableWrapper):
    planted = False


class PaddingRoutingWrapper(gc.MoeWrapper):
    planted = True

    def region(self):
        return gc.moe_forward(self.static["x"], self.weights, routing="batch-bias" if self.planted else "row")


class PaddingRoutingTwin(PaddingRoutingWrapper):
    planted = False


def _shared_static_wrapper(planted: bool):
    """All captured sizes of one case read ``x`` from one static buffer of the largest size (the bug: a
    workspace sized for the largest batch, each size taking a view of its first rows) or each from its own
    (the twin). Built largest size first, as the harness captures."""
    shared: dict = {}

    class SharedStaticWrapper(gc.MoeWrapper):
        def __init__(self, example, device, dims=D, weights=None):
            super().__init__(example, device, dims, weights)
            b = example["x"].shape[0]
            if planted:
                if "x" not in shared or shared["x"].shape[0] < b:
                    shared["x"] = torch.zeros_like(example["x"], device=device)
                self.static["x"] = shared["x"][:b]

    return SharedStaticWrapper


class DecodeOnlyWrapper(gc.DecodeStepWrapper):
    """In decode-only mode it takes a 'decode fast path' whose window is built from ``positions`` instead of
    ``positions + 1`` (the token just written is left out). Full and piecewise modes are correct."""

    planted = True

    def region(self):
        if self.mode != "decode-only":
            return super().region()
        s, w, d = self.static, self.weights, self.d
        p = gc.decode_pre(s["x"], s["positions"], s["slot_mapping"], s["swa_cache"], w, d=d)
        lens = s["positions"] if self.planted else s["positions"] + 1
        idx = gc.swa_slots(lens, s["block_table"], d)
        o = gc.attn_core(p["q"], idx, s["swa_cache"].view(-1, d.D), None, 0, w["attn.attn_sink"], d.scale)
        return gc.decode_post(o, p["cos"], p["sin"], s["slot_mapping"], s["swa_cache"], w, d)


class DecodeOnlyTwin(DecodeOnlyWrapper):
    planted = False


class IntermittentWrapper(gc.MoeWrapper):
    """Corrupts its output (x (1 + 2^-20)) in one process of five: the ones whose seed is 0 mod 5."""

    planted = True

    def __init__(self, example, device, dims=D, weights=None):
        super().__init__(example, device, dims, weights)
        self.corrupt = self.planted and torch.initial_seed() % 5 == 0

    def region(self):
        o = gc.moe_forward(self.static["x"], self.weights)
        if self.corrupt:
            o["out"] = o["out"] * (1.0 + 2.0 ** -20)
        return o


class IntermittentTwin(IntermittentWrapper):
    planted = False


# ----------------------------------------------------------------------------------------------- cases

def _decode_wrapper(cls):
    def make(example, device, mode="full"):
        return cls(example, device, weights=G._decode_weights(), mode=mode)
    return make


def _moe_wrapper(cls):
    def make(example, device):
        return cls(example, device, weights=G._moe_weights())
    return make


def _pair(name, build, cause, description):
    """(mutant, twin): build(planted: bool, name) -> GraphCase."""
    m = build(True, name)
    m.mutant, m.expect_cause, m.description = True, cause, description
    t = build(False, f"{name}_twin")
    t.twin_of, t.description = name, f"correct twin of {name}"
    return [m, t]


def planted_cases() -> list[GraphCase]:
    cases: list[GraphCase] = []
    cases += _pair("host_read", lambda p, n: G.sparse_attn_case(n, wrapper=HostReadWrapper if p else HostReadTwin),
                   G.CAUSE_CAPTURE_SYNC, "seq_lens.max().item() inside the captured region")
    cases += _pair("warmup_alloc",
                   lambda p, n: G.sparse_attn_case(n, wrapper=WarmupAllocWrapper if p else WarmupAllocTwin),
                   G.CAUSE_WARMUP_ALLOC, "ragged buffer sized from indptr[-1] of the warm-up dummy batch")
    full_only = {"piecewise": "planted case: full mode only", "decode-only": "planted case: full mode only"}
    cases += _pair("stale_metadata", lambda p, n: _with_wrapper(
        G.decode_step_case(n, modes=("full",), mode_reasons=full_only),
        _decode_wrapper(StaleBlockTableWrapper if p else StaleBlockTableTwin)),
        G.CAUSE_STALE, "block table copied into the static buffer on the first load only")
    cases += _pair("padding_read", lambda p, n: _with_wrapper(
        G.moe_case(n), _moe_wrapper(PaddingRoutingWrapper if p else PaddingRoutingTwin)),
        G.CAUSE_PADDING, "captured router centres logits on the padded batch's mean (eager: per token)")
    cases += _pair("shared_static", lambda p, n: _with_wrapper(
        G.moe_case(n, batch_sizes=(8, 4, 2)), _moe_wrapper(_shared_static_wrapper(p))),
        G.CAUSE_SHARED, "every captured size reads its tokens from one static buffer of the largest size")
    cases += _pair("decode_only", lambda p, n: _with_wrapper(
        G.decode_step_case(n, modes=("full", "piecewise", "decode-only"), mode_reasons={}),
        _decode_wrapper(DecodeOnlyWrapper if p else DecodeOnlyTwin)),
        G.CAUSE_MODE_SPECIFIC, "the decode-only path leaves the current token out of the window")
    cases += _pair("intermittent", lambda p, n: _with_wrapper(
        G.moe_case(n), _moe_wrapper(IntermittentWrapper if p else IntermittentTwin)),
        G.CAUSE_PROCESS_INTERMITTENT, "output x (1 + 2^-20) in processes whose seed is 0 mod 5")
    for c in cases:
        c.function = f"tests.graph.planted_subject:{c.name}"
    return cases


def _with_wrapper(case: GraphCase, wrapper) -> GraphCase:
    case.wrapper = wrapper
    return case


class PlantedGraphSubject(Subject):
    name = "planted-graph"

    def info(self) -> SubjectInfo:
        return SubjectInfo(name=self.name, implementation="planted graph-replay bugs and their twins (tests)",
                           device=G.device_name(), dialect="none", emulated=False)

    def provides(self) -> dict:
        return {}

    def graph_cases(self) -> list[GraphCase]:
        return planted_cases()


def factory():
    return PlantedGraphSubject()
