"""The subject interface: how an implementation under test plugs into the harness (public API).

A *subject* is anything that implements some DSV4 components. It says what it is (``info()``) and which
components it provides (``provides()``), each as an ``Impl`` whose ``fn`` has exactly the signature and
output structure of the golden reference registered for that component in ``conformance.components``.
Adapters convert layouts inside ``fn``. The harness never guesses: a component missing from
``provides()`` is reported as "not provided by this subject".

Third-party subjects are loaded with ``--subject mypkg.module:factory``; ``factory()`` (or
``factory(profile=...)`` when a profile is given as ``mypkg.module:factory@gfx942``) returns a Subject.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

# public here: the Impl.fn of a streamed component, and the exception an Impl.fn raises for inputs it does not
# support (defined with the registry, below the cases layer, so a case's emulation can raise it too)
from ..components import Streamed, Unsupported  # noqa: F401


class SubjectError(RuntimeError):
    """A subject cannot be used here (unknown name, missing package, wrong version, no device)."""




@dataclass(frozen=True)
class Impl:
    fn: Callable
    function: str                 # what runs, e.g. "torch.ops._C.hc_pre_fused_cpu"
    backend: str                  # compiled | triton | triton-interpreter | torch | aiter | reference
    note: str = ""                # why this function was chosen (dispatch reason, shim in use, ...)


@dataclass(frozen=True)
class SubjectInfo:
    name: str
    implementation: str           # human description: "golden reference in fp64", "vLLM 0.32.0 (cpu)"
    device: str                   # the device that computes, e.g. "cpu", "AMD Instinct MI300X (gfx942)"
    dialect: str                  # FP8 dialect the subject computes in: float8_e4m3fn | float8_e4m3fnuz | none
    emulated: bool                # True when the numerics are an emulation of another device
    profile: str = ""             # serving profile (gfx942, ocp, ...) the subject's numerics model
    versions: dict = field(default_factory=dict)
    shims: tuple = ()             # named, version-gated workarounds in force (listed in the report)
    simulated: str = ""           # the device arch a simulation stands for ("gfx942"); "" for none


    @property
    def banner(self) -> str:
        kind = "EMULATED" if self.emulated else "REAL RUN"
        if self.simulated:
            kind = f"SIMULATED {self.simulated}"
        return f"{self.name}: {self.implementation} on {self.device} [{kind}, dialect {self.dialect}]"


class Subject:
    """Base class; subclasses set ``name`` and implement ``info`` and ``provides``."""

    name: str = "subject"

    def info(self) -> SubjectInfo:
        raise NotImplementedError

    def provides(self) -> dict[str, Impl]:
        raise NotImplementedError

    def graph_cases(self) -> list:
        """Optional: the subject's capturable cases (``conformance.subjects.GraphCase``) for the graph-replay
        check. Default: none (the graph check reports "not-provided")."""
        return []

    # The golden level a subject is also compared against: the emulated serving numerics of this profile
    # (None = only the fp32 golden).
    def emulation_profile(self) -> str | None:
        return self.info().profile or None


def absent_reason(subject, component: str, name: str) -> str:
    """The message of a "not provided" row: the subject's own reason (optional ``not_provided() -> {component:
    reason}``, e.g. the vllm subject's failed capability probe naming the release) or the generic sentence."""
    why = (getattr(subject, "not_provided", dict)() or {}).get(component)
    msg = f"{component} is not provided by subject {name}"
    return f"{msg}: {why}" if why else msg

