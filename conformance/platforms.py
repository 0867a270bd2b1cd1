"""Which device platform this machine is, and refusals for device sessions that cannot run here.

Device sessions (gfx942, gfx950, cuda) never fall back to emulation: on the wrong machine they stop with
one sentence naming what is missing.
"""

from __future__ import annotations

import importlib.util

PLATFORMS = {
    "gfx942": "AMD Instinct MI300X/MI325X (ROCm, FP8 e4m3fnuz)",
    "gfx950": "AMD Instinct MI350/MI355 (ROCm, OCP FP8, native MXFP4)",
    "cuda": "NVIDIA GPU (CUDA, OCP FP8)",
}


class PlatformError(RuntimeError):
    pass


def detect() -> dict:
    """{'torch': bool, 'kind': 'rocm'|'cuda'|'cpu', 'arch': str, 'name': str}"""
    if importlib.util.find_spec("torch") is None:
        return {"torch": False, "kind": "none", "arch": "", "name": ""}
    import torch

    if not torch.cuda.is_available():
        kind = "rocm-no-device" if getattr(torch.version, "hip", None) else (
            "cuda-no-device" if torch.version.cuda else "cpu")
        return {"torch": True, "kind": kind, "arch": "", "name": ""}
    props = torch.cuda.get_device_properties(0)
    if getattr(torch.version, "hip", None):
        return {"torch": True, "kind": "rocm", "arch": getattr(props, "gcnArchName", ""), "name": props.name}
    return {"torch": True, "kind": "cuda", "arch": f"sm_{props.major}{props.minor}", "name": props.name}


def require(platform: str, *, need_vllm: bool = True) -> dict:
    if platform not in PLATFORMS:
        raise PlatformError(f"unknown platform {platform!r}; known: {sorted(PLATFORMS)}")
    d = detect()
    want = PLATFORMS[platform]
    if not d["torch"]:
        raise PlatformError(f"{platform} needs {want}, but this Python has no torch installed.")
    if platform in ("gfx942", "gfx950"):
        if d["kind"] != "rocm":
            raise PlatformError(f"{platform} needs {want}, but this machine has no ROCm device "
                                f"(torch sees: {d['kind']}{' ' + d['name'] if d['name'] else ''}).")
        if platform not in d["arch"]:
            raise PlatformError(f"{platform} needs {want}, but the ROCm device is {d['name']} ({d['arch']}).")
    elif platform == "cuda" and d["kind"] != "cuda":
        raise PlatformError(f"cuda needs {want}, but torch sees no CUDA device (it sees: {d['kind']}).")
    if need_vllm:
        if importlib.util.find_spec("vllm") is None:
            raise PlatformError(f"{platform}: vLLM is not importable in this Python; install the platform's "
                                f"vLLM build first.")
    return d


def main(argv=None) -> int:
    import sys

    args = list(argv if argv is not None else sys.argv[1:])
    try:
        d = require(args[0])
    except PlatformError as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    print(f"ok: {d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
