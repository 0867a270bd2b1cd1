"""Component registry: name -> ComponentSpec (golden reference, outputs and their tolerances).

A component is registered once, next to its case rows, in ``conformance/cases/<family>.py``. Its
reference is the golden function from ``references``; each subject provides an ``Impl`` with exactly the
same call signature. Output tolerances are functions of the case parameters and the comparison level:

  "fp64"     the fp32 golden against the fp64 run of the same reference (reference subject)
  "fp32"     an independent fp32 implementation (transformers) against the fp32 golden
  "serving"  a serving-precision subject (bf16 activations, FP8 / FP4 formats) against the fp32 golden
  "emulated" a serving subject against the emulated serving numerics of its profile (tight)

A *streamed* component (``ComponentSpec.stream``, docs/stateful-components.md) is a stateful form of a one-shot
component: its ``reference`` / ``emulate`` are the one-shot golden / emulation (the whole prompt at once), and a
subject provides it as an ``Impl`` whose ``fn`` is a ``conformance.subjects.base.Streamed`` (``new_state`` +
``step``); the harness poisons the fresh state and feeds the case's ``splits`` chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .tolerances import EXACT, Tolerance


class Unsupported(Exception):
    """Raised by an ``Impl.fn`` (or a case's emulation) for inputs the implementation does not support (e.g. a
    top-k the kernel has no variant for). The case is reported "not provided" with this reason, never as a pass
    or an error. Public as ``conformance.subjects.Unsupported``."""

LEVELS = ("fp64", "fp32", "serving", "emulated")


@dataclass(frozen=True)
class OutputSpec:
    name: str
    kind: str = "float"                      # float | exact | index-set | fp8-codes
    tol: Callable[[dict, str], Tolerance] | None = None   # (params, level) -> Tolerance
    scale: Callable[[dict, object], object] | None = None  # (kwargs, want) -> magnitude for rtol
    fp8_format: Callable[[str], str] | None = None  # (subject dialect) -> format of the codes

    def tolerance(self, params: dict, level: str) -> Tolerance:
        if self.kind != "float":
            return EXACT
        if self.tol is None:
            raise ValueError(f"output {self.name!r} is a float output without a tolerance")
        return self.tol(params, level)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    family: str
    reference: Callable
    outputs: tuple[OutputSpec, ...]
    description: str = ""
    # emulate(profile) -> callable with the reference's signature computing the serving numerics
    emulate: Callable[[str], Callable] | None = None
    spec_section: str = ""
    divergences: tuple[str, ...] = field(default_factory=tuple)
    # A joint comparison that replaces the per-output elementwise one, for components whose outputs must be
    # compared together (routing: expert ids as sets with near-ties, weights aligned by expert id with a
    # per-token derived bound). Either the name of a comparison the checks layer provides
    # (``conformance.checks.numeric.JOINT_COMPARES``: "routing"), so case modules need not import checks, or
    # a callable compare(got, want, params, level, label, kwargs) -> list[metrics.Comparison].
    compare: str | Callable | None = None
    # a streamed (stateful) form of a one-shot component: driven chunk by chunk from a poisoned state
    stream: StreamSpec | None = None


@dataclass(frozen=True)
class Streamed:
    """The ``Impl.fn`` of a streamed (stateful) component (``ComponentSpec.stream``; docs/stateful-components.md).

    new_state(**kwargs) -> dict[str, torch.Tensor]
        A fresh state for one request, given the case's whole keyword inputs (the one-shot golden's). Its
        contents are unspecified: the harness overwrites every floating tensor with NaN, every integer tensor
        with -1 (uint8 bytes 0xFF, an e4m3 NaN code) and every bool tensor with True before the first step, so
        a step must write a slot before it reads it.
    step(state, *, start, **kwargs) -> (outputs, state)
        Feed one chunk: ``kwargs`` are the inputs with the spec's ``chunked`` inputs sliced to this chunk,
        ``start`` is the absolute position of the chunk's first token. ``outputs`` has the one-shot
        component's output structure, holding what this chunk produces; the harness concatenates the chunks'
        outputs along dim 0. The returned state (the same object or a new one) is passed to the next step.

    Calling a Streamed like a one-shot fn runs the whole input as one chunk from a fresh state."""
    new_state: Callable
    step: Callable

    def __call__(self, **kwargs):
        out, _ = self.step(self.new_state(**kwargs), start=0, **kwargs)
        return out


@dataclass(frozen=True)
class StreamSpec:
    """How a streamed component is driven (conformance.checks.stream).

    one_shot: the one-shot component of the same math; a subject providing both is also compared streamed vs
      its own one-shot output (reported bit-identical or not, judged at the tight level). None: no one-shot
      component takes the same inputs (the cache streams: rows of different chunks carry different block tables
      over recycled blocks, so one call with all of them is no schedule an engine produces); no second check.
    chunked: the keyword inputs sliced along dim 0 at the case's ``splits`` (one row per token); every other
      input is passed whole to every step.
    reference: () -> Streamed, the incremental golden (fp32, fp64 when given fp64 inputs; the reference subject).
    emulate: (profile) -> Streamed, the serving numerics streamed (the emulated:<profile> subject).
    """
    one_shot: str | None
    chunked: tuple[str, ...]
    reference: Callable
    emulate: Callable | None = None


REGISTRY: dict[str, ComponentSpec] = {}


def register(spec: ComponentSpec) -> ComponentSpec:
    if spec.name in REGISTRY and REGISTRY[spec.name] is not spec:
        raise ValueError(f"component {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> ComponentSpec:
    load_all()
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown component {name!r}; known: {sorted(REGISTRY)}") from None


def load_all() -> dict[str, ComponentSpec]:
    from . import cases  # noqa: F401  (registers every family)

    return REGISTRY
