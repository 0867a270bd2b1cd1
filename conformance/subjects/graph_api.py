"""The graph-capture interface of a subject (public API; README "Subjects", DESIGN "Subject contract").

A subject that can run a component under CUDA graphs (HIP graphs on ROCm, through ``torch.cuda``) returns its
capturable cases from an optional ``Subject.graph_cases() -> list[GraphCase]``. The graph check
(``conformance.checks.graph``) takes each case as it is: it warms the subject's static wrapper up, captures its
region with ``torch.cuda.graph`` at every captured batch size (largest first, one memory pool shared by all
sizes, as a server captures them), replays it on inputs that differ from the warm-up one (values, positions,
lengths, block tables, live batch size with garbage in the padding rows) and compares every replay with the
subject's eager function and with the case's golden. Nothing here imports torch.cuda or the checks.

The wrapper contract (``GraphCase.wrapper(example_device_inputs, device[, mode=...])`` returns it):

* ``load(inputs)``: copy the tensors of ``inputs`` into the wrapper's static buffers (outside the graph). Only the
  keys present are copied: in a multi-step case (``steps > 1``) the harness loads the whole input at step 0 and
  only ``step_keys`` afterwards, so the other buffers (a KV cache) keep what the replays wrote into them.
* ``region() -> dict[str, Tensor]``: the captured body. It must read only static buffers and never a device
  value on the host. The tensors it returns are the graph's static outputs; the harness reads them right after
  the graph replays. They need not survive another size's replay (graphs sharing a pool reuse each other's
  freed memory, as on a device), but a size's static inputs and state must: the harness loads one size,
  replays the others, then replays it, and expects the result of its own inputs.
* optional ``pieces() -> list[GraphPiece]`` for ``piecewise`` mode: the region split where a server splits it
  (around attention). Pieces run in order, each taking the dict the previous one returned (``{}`` first) and
  returning a dict; ``capture=True`` pieces are captured (each as its own graph, same pool), the others run
  eagerly at every replay (the harness copies their outputs into buffers the next graph reads). The last
  piece's dict is the output.
* a wrapper whose constructor takes ``mode`` is built once per graph mode (``full``, ``piecewise``,
  ``decode-only``) so it can take the code path it takes in that mode; ``decode-only`` means: full graphs of
  uniform decode batches only, as a server's FULL_DECODE_ONLY capture.

``make_input(seeds)`` builds CPU inputs of the captured shape from ``seeds``: ``values``, ``metadata``,
``topk``, ``padding`` (independent ints; a negative ``padding`` asks for zero-filled padding rows), ``live``
(the live rows; rows ``>= live`` are padding with garbage), ``batch`` (the captured batch size) and, when the
harness builds a capture-time dummy batch, ``short=True``. It must be deterministic in ``seeds``. The returned
dict holds ``live`` (int) next to the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

GRAPH_MODES = ("full", "piecewise", "decode-only")
GRAPH_GROUPS = ("values", "metadata", "topk", "padding")


@dataclass(frozen=True)
class GraphPiece:
    """One piece of a piecewise region: ``fn(prev: dict) -> dict``; captured when ``capture`` is True."""
    name: str
    fn: Callable[[dict], dict]
    capture: bool = True


@dataclass
class GraphCase:
    """A capturable case of a subject's component.

    make_input(seeds) -> CPU inputs of the captured shape (see the module docstring);
    eager(device_inputs) -> dict of output tensors: the subject's eager path on the full padded batch (fresh
        allocations; it may write into the tensors it is given, e.g. a cache);
    wrapper(example_device_inputs, device[, mode=...]) -> the static wrapper (``load``/``region``[/``pieces``]);
    golden(cpu_inputs, dtype) -> dict of outputs for the live rows (float64 and float32 are asked for; the bound
        is derived from the float32 golden's own rounding);
    groups: the seed groups the inputs depend on (the stale / padding probes redraw one at a time);
    batch_sizes: the captured batch sizes (default ``(batch,)``); the harness captures them largest first into
        one shared pool and replays each live batch on the smallest captured size that holds it;
    modes: the graph modes this case supports (subset of ``GRAPH_MODES``); ``mode_reasons`` says why the others
        are not supported (shown in their "not-run" rows);
    steps, advance, step_keys: a multi-step decode. ``advance(cpu_inputs, step, eager_out) -> cpu_inputs`` of
        the next step (positions + 1, slots, ...; ``eager_out`` is the eager output of the step just run, on
        the CPU, e.g. to write the new KV rows into the golden's cache); only ``step_keys`` are loaded after
        step 0;
    ragged_size(cpu_inputs) -> the live ragged size (``indptr[-1]``) where the case builds a ragged list;
    deterministic: replays must equal eager bitwise on the live rows (else within the golden-derived bound);
    kind: "dense" | "index-set" (an ``idx`` output compared as index sets, near ties allowed by ``scores``);
    bound / bound_reason: the golden bound per output where the component's formats are coarser than float32
        (default: derived from the float32 golden's own rounding);
    function: what runs, named in the rows;
    expect_cause / mutant: planted bugs (the cause the check must name); a mutant's correct twin has
        ``mutant=False`` and ``twin_of`` naming the mutant.
    """
    name: str
    component: str
    make_input: Callable[[dict], dict]
    eager: Callable[[dict], dict]
    wrapper: Callable[..., object]
    golden: Callable[..., dict]
    groups: tuple[str, ...] = GRAPH_GROUPS
    batch: int = 8
    batch_sizes: tuple[int, ...] = ()
    modes: tuple[str, ...] = ("full",)
    mode_reasons: dict = field(default_factory=dict)
    steps: int = 1
    advance: Callable[..., dict] | None = None
    step_keys: tuple[str, ...] = ()
    deterministic: bool = True
    kind: str = "dense"
    ragged_size: Callable[[dict], int] | None = None
    expect_cause: str | None = None
    mutant: bool = False
    twin_of: str | None = None
    description: str = ""
    function: str = ""                      # what runs, for the rows (e.g. "myfork.graphs:DecodeStep")
    # the device component evaluates RoPE phases pos * omega in float32, the golden in float64
    fp32_rope_phase: bool = False
    # (cpu_inputs, golden float64 outputs) -> {output: absolute bound on the live rows}: for a component whose
    # formats are coarser than float32 (an FP8 cache, bf16 outputs) the case states its bound, replacing the
    # one derived from the float32 golden; ``bound_reason`` gives the derivation shown beside it
    bound: Callable[[dict, dict], dict] | None = None
    bound_reason: str = ""

    def __post_init__(self):
        bad = [m for m in self.modes if m not in GRAPH_MODES]
        if bad or not self.modes:
            raise ValueError(f"graph case {self.name!r}: modes {self.modes!r}; known {GRAPH_MODES}")
        if not self.batch_sizes:
            self.batch_sizes = (self.batch,)
        self.batch_sizes = tuple(sorted({int(b) for b in self.batch_sizes}, reverse=True))
        self.batch = self.batch_sizes[0]
        if self.steps > 1 and self.advance is None:
            raise ValueError(f"graph case {self.name!r}: steps={self.steps} needs advance()")

    def not_supported_reason(self, mode: str) -> str:
        why = self.mode_reasons.get(mode) or f"the case declares modes {', '.join(self.modes)}"
        return f"graph mode {mode} not supported by case {self.name}: {why}"
