"""Planted graph-replay bugs (mutants) the graph check must catch, each with the cause it must name.

* ``mutant_seq_len_item``: the sparse-attention wrapper reads a sequence length on the host with ``.item()``
  inside the captured region -> "capture-time host sync".
* ``mutant_ragged_warmup_alloc``: the metadata builder of the pre-fix shape (spec §7,
  ``build_ragged_indices_from_dense``): ``int(indptr[-1].item())`` then ``torch.empty`` of that size. To get
  through capture it keeps the size it read at warm-up (the usual "works in eager, captures fine" workaround),
  so the ragged buffer is sized from the warm-up batch -> "warm-up-sized allocation".
* ``mutant_stale_decode_metadata``: the decode-step wrapper copies positions / block table / slot mapping
  only on its first load, so the graph replays the warm-up metadata -> "stale: metadata".
* ``mutant_batch_softmax_padding``: the captured sparse-attention softmax takes its max over the whole padded
  batch (not per row): live rows depend on padding rows -> "reads padding rows". Graph-specific: the case's
  eager path is the correct per-row softmax (before issue 20 the eager path shared the defect, so the mutant
  was not a graph bug).
* ``mutant_decode_per_tensor_quant``: the captured decode step quantises its input with one dynamic FP8 scale
  (amax/448) over the whole padded batch -> "reads padding rows". Graph-specific: the eager path takes the
  same scale over the live rows only (``slot_mapping >= 0``), as an eager server with no padding does.

``factory()`` is a subject ("graph-mutants") whose ``graph_cases()`` are these mutants, so worker processes
load them like any plugin subject's cases (``--subject conformance.checks.graph_mutants:factory``).
"""

from __future__ import annotations

import torch

from conformance.checks import graph as G
from conformance.checks import graph_components as gc
from conformance.subjects.base import Subject, SubjectInfo


class SeqLenItemWrapper(gc.SparseAttnWrapper):
    """Reads the longest sequence length on the host to trim the window (a host read in the region)."""

    def region(self):
        max_len = int(self.static["seq_lens"].max().item())        # host sync: frozen / illegal in capture
        self.window = min(max_len, self.d.W)
        return super().region()


def build_ragged_indices_from_dense_warmup(dense: torch.Tensor, state: dict):
    """Pre-fix builder: allocates the ragged list with the size read from ``indptr[-1]``. Under capture the
    read is illegal, so it reuses the size read during warm-up (frozen at the warm-up batch)."""
    B = dense.shape[0]
    valid = dense >= 0
    indptr = torch.zeros(B + 1, dtype=torch.long, device=dense.device)
    indptr[1:] = torch.cumsum(valid.sum(1), 0)
    if not torch.cuda.is_current_stream_capturing():
        state["n"] = int(indptr[-1].item())                        # the host read (§7)
    n = state["n"]
    ragged = torch.empty(n + 1, dtype=torch.long, device=dense.device)    # sized from the warm-up batch
    pos = indptr[:-1, None] + torch.cumsum(valid.long(), 1) - 1
    pos = torch.where(valid & (pos < n), pos, torch.full_like(pos, n))    # bounds guard at the buffer size
    ragged.scatter_(0, pos.reshape(-1), dense.reshape(-1))
    return indptr, ragged, n


class RaggedWarmupAllocWrapper(gc.SparseAttnWrapper):
    def __init__(self, example, device, dims=gc.DIMS):
        super().__init__(example, device, dims)
        self.state = {}

    def region(self):
        s, d = self.static, self.d
        dense = gc.sparse_dense_indices(s["seq_lens"], s["block_table"], s["topk"], s["comp_block_table"], d)
        indptr, ragged, n = build_ragged_indices_from_dense_warmup(dense, self.state)
        idx = gc.ragged_to_dense(indptr, ragged, d.W + d.K, n)
        swa, comp = s["swa_cache"].reshape(-1, d.D), s["comp_cache"].reshape(-1, d.D)
        return {"out": gc.attn_core(s["q"], idx, swa, comp, d.NB * d.BS, s["sink"], d.scale)}


class StaleDecodeMetadataWrapper(gc.DecodeStepWrapper):
    """Refreshes x and the cache every step but positions / block table / slot mapping only once."""

    def load(self, inputs):
        for k in self.input_keys:
            if k in gc.DECODE_METADATA and self.loads > 0:
                continue
            self.static[k].copy_(inputs[k])
        self.loads += 1


class BatchSoftmaxWrapper(gc.SparseAttnWrapper):
    stabiliser = "batch"


class DecodePerTensorQuantWrapper(gc.DecodeStepWrapper):
    def region(self):
        s = self.static
        return gc.decode_step(*(s[k] for k in gc.DECODE_KEYS), self.weights, x_quant="per-tensor", d=self.d)


def mutant_cases():
    return {
        "mutant_seq_len_item": lambda: G.sparse_attn_case(
            "mutant_seq_len_item", wrapper=SeqLenItemWrapper, mutant=True, expect_cause=G.CAUSE_CAPTURE_SYNC,
            description="wrapper reads seq len with .item() inside the region"),
        "mutant_ragged_warmup_alloc": lambda: G.sparse_attn_case(
            "mutant_ragged_warmup_alloc", wrapper=RaggedWarmupAllocWrapper, mutant=True,
            expect_cause=G.CAUSE_WARMUP_ALLOC,
            description="ragged index tensor allocated with int(indptr[-1].item()) from the warm-up batch"),
        "mutant_stale_decode_metadata": lambda: G.decode_step_case(
            "mutant_stale_decode_metadata", wrapper=StaleDecodeMetadataWrapper, mutant=True,
            expect_cause=G.CAUSE_STALE, description="positions / block table / slot mapping not refreshed"),
        "mutant_batch_softmax_padding": lambda: G.sparse_attn_case(
            "mutant_batch_softmax_padding", wrapper=BatchSoftmaxWrapper, stabiliser="row", mutant=True,
            expect_cause=G.CAUSE_PADDING,
            description="captured softmax max over the whole padded batch (eager: per row, correct)"),
        "mutant_decode_per_tensor_quant": lambda: G.decode_step_case(
            "mutant_decode_per_tensor_quant", wrapper=DecodePerTensorQuantWrapper, x_quant="per-tensor-live",
            mutant=True, expect_cause=G.CAUSE_PADDING, modes=("full",),
            description="captured decode step with a dynamic per-tensor FP8 activation scale over the padded "
                        "batch (eager: the scale over the live rows, correct)"),
    }


class GraphMutantsSubject(Subject):
    """The built-in graph mutants as a subject (graph cases only; it provides no numeric component)."""

    name = "graph-mutants"

    def info(self) -> SubjectInfo:
        return SubjectInfo(name=self.name, implementation="built-in graph-replay mutants (planted bugs)",
                           device="the graph device", dialect="none", emulated=False)

    def provides(self) -> dict:
        return {}

    def graph_cases(self) -> list:
        return [f() for f in mutant_cases().values()]


def factory():
    return GraphMutantsSubject()
