"""The ``reference`` subject: every golden reference run in fp64 (the harness's sanity check).

Compared against the fp32 golden at the "fp64" level, it shows the golden's own rounding error stays
inside the bound derived for fp32, for every component, on every case.
"""

from __future__ import annotations

import platform

import torch

from .. import components
from .base import Impl, Streamed, Subject, SubjectInfo


def to_fp64(v):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.to(torch.float64)
    if isinstance(v, dict):
        return {k: to_fp64(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(to_fp64(x) for x in v)
    return v


def _fp64(ref):
    def fn(**kw):
        return ref(**to_fp64(kw))
    return fn


def _fp64_stream(st: Streamed) -> Streamed:
    """A streamed golden in fp64: the inputs (and so the state it makes) in fp64."""
    return Streamed(lambda **kw: st.new_state(**to_fp64(kw)),
                    lambda state, *, start, **kw: st.step(state, start=start, **to_fp64(kw)))


class ReferenceSubject(Subject):
    name = "reference"

    def info(self) -> SubjectInfo:
        return SubjectInfo(name=self.name, implementation="golden references in fp64 (self-check)",
                           device=f"cpu ({platform.processor() or platform.machine()})", dialect="none",
                           emulated=False, versions={"torch": torch.__version__})

    def provides(self) -> dict[str, Impl]:
        out = {}
        for name, spec in components.load_all().items():
            if spec.stream is not None:
                st = spec.stream.reference()
                out[name] = Impl(_fp64_stream(st), function=f"{st.step.__module__}.{st.step.__qualname__}",
                                 backend="reference", note="fp64, streamed from a poisoned state")
                continue
            out[name] = Impl(_fp64(spec.reference), function=f"{spec.reference.__module__}."
                             f"{spec.reference.__qualname__}", backend="reference", note="fp64")
        return out

    def comparison_level(self) -> str:
        return "fp64"

    def graph_cases(self) -> list:
        """The capturable reference components (conformance.checks.graph): sparse attention decode, indexer
        top-k, decode step, multi-step decode at sizes 8/4/2, a small MoE block. They run where the graph
        check runs (a CUDA/ROCm device); their rows name that device, not this subject's CPU."""
        from ..checks.graph import reference_cases

        return [f() for f in reference_cases().values()]
