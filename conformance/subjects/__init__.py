"""Subject registry: built-in names and ``module:factory`` plugins.

Built in:
  reference            the golden references run in fp64 (the harness's own sanity check)
  emulated:<profile>   a numerics model of the serving path for a platform (gfx942, ocp)
  transformers         Hugging Face transformers' DeepSeek-V4 (components it exposes, whole model)
  vllm                 the installed vLLM's functions for the current platform
  vllm:sim-<arch>      vLLM's ROCm dispatch for gfx942 / gfx950 SIMULATED on the CPU (conformance.subjects.vllm_sim)
  vllm-triton:<profile>  vLLM's Triton kernels under Triton's interpreter on the CPU (gfx942 -> fnuz)
  vllm-triton-gpu:<profile>  the same kernels compiled by Triton for this machine's GPU (no vLLM install needed)
"""

from __future__ import annotations

import importlib
import inspect

from .base import Impl, Streamed, Subject, SubjectError, SubjectInfo, Unsupported
from .graph_api import GRAPH_MODES, GraphCase, GraphPiece

__all__ = ["Impl", "Streamed", "Subject", "SubjectError", "SubjectInfo", "Unsupported", "load_subject",
           "prepare_process", "BUILTIN", "GraphCase", "GraphPiece", "GRAPH_MODES"]

# name -> "module:attribute" of a factory taking an optional profile
BUILTIN = {
    "reference": "conformance.subjects.reference:ReferenceSubject",
    "emulated": "conformance.subjects.emulated:EmulatedSubject",
    "transformers": "conformance.subjects.hf:TransformersSubject",
    "vllm": "conformance.subjects.vllm:VllmSubject",
    "vllm-triton": "conformance.subjects.vllm_triton:VllmTritonSubject",
    "vllm-triton-gpu": "conformance.subjects.vllm_triton:VllmTritonGpuSubject",
}
NEEDS_PROFILE = {"emulated", "vllm-triton", "vllm-triton-gpu"}


def _import_factory(target: str):
    mod_name, _, attr = target.partition(":")
    if not mod_name or not attr:
        raise SubjectError(f"subject {target!r}: expected 'module:factory'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise SubjectError(f"subject {target!r}: cannot import module {mod_name!r} ({e})") from e
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise SubjectError(f"subject {target!r}: module {mod_name!r} has no attribute {attr!r}") from None


def prepare_process(specs: list[str]) -> None:
    """Process-wide set-up that some subjects need before any other subject imports their dependencies:
    the vLLM subjects on a CPU machine need Triton's interpreter installed before triton is first
    imported (transformers, for one, imports it). Call it before loading the first subject."""
    heads = {s.strip().partition(":")[0] for s in specs}
    if heads & {"vllm", "vllm-triton"}:
        import importlib.util

        if importlib.util.find_spec("vllm") is not None:
            from ._vllm_common import prepare_interpreter

            prepare_interpreter()


def load_subject(spec: str) -> Subject:
    """'reference' | 'emulated:gfx942' | 'vllm' | 'vllm-triton:gfx942' | 'pkg.mod:factory[@profile]'."""
    spec = spec.strip()
    head, sep, tail = spec.partition(":")
    if head == "vllm" and tail.startswith("sim-"):
        from .vllm_sim import VllmSimSubject

        subj = VllmSimSubject(tail[len("sim-"):])
    elif head in BUILTIN:
        profile = tail or None
        if head in NEEDS_PROFILE and not profile:
            raise SubjectError(f"subject {head!r} needs a profile, e.g. '{head}:gfx942' or '{head}:ocp'")
        if head not in NEEDS_PROFILE and profile:
            raise SubjectError(f"subject {head!r} takes no profile (got {profile!r})")
        factory = _import_factory(BUILTIN[head])
        subj = factory(profile=profile) if profile else factory()
    elif sep:
        target, _, profile = spec.partition("@")
        factory = _import_factory(target)
        params = inspect.signature(factory).parameters if callable(factory) else {}
        if profile and "profile" not in params:
            raise SubjectError(f"subject {spec!r}: factory takes no 'profile' argument")
        subj = factory(profile=profile) if profile else factory()
    else:
        raise SubjectError(f"unknown subject {spec!r}; built in: {sorted(BUILTIN)} "
                           f"(profiles: emulated:<gfx942|ocp>, vllm-triton[-gpu]:<gfx942|ocp>, "
                           f"vllm:sim-<gfx942|gfx950>), "
                           f"or a plugin as 'module:factory'")
    if not isinstance(subj, Subject):
        raise SubjectError(f"subject {spec!r}: factory returned {type(subj).__name__}, not a Subject")
    return subj
