"""Small bisect probes: run inside one vLLM version's venv, return a verdict row.

A probe is ``def probe() -> dict`` returning at least ``{"verdict": <a results.VERDICTS name>, "message": str}``
(plus optional ``metrics``, ``bounds``, ``function``, ``backend``). ``python -m conformance bisect
--predicate probe:conformance.probes:dsv4_swa_rope`` runs it through ``python -m conformance.probe_runner``
in the version's own interpreter; it must import only torch, numpy and the vLLM under test, because older
vLLM venvs have nothing else.

Probes here:
* ``dsv4_present``: ``vllm.models.deepseek_v4`` imports and the DSV4 scaling rotary embedding class exists.
* ``dsv4_swa_rope``: the rotary embedding vLLM builds for a DSV4 sliding-window (compress_ratio 1) layer
  against the golden plain RoPE (theta = rope_theta, no YaRN; dsv4-spec section 3.3). vLLM releases that
  apply the checkpoint's YaRN scaling (factor 16) to every layer fail; releases that give SWA layers plain
  RoPE pass.
"""

from __future__ import annotations

import math

# DSV4 Flash rope settings (config.json of the release checkpoint, flat "rope_scaling" form).
DSV4_ROPE = dict(rope_type="yarn", factor=16.0, original_max_position_embeddings=65536, beta_fast=32,
                 beta_slow=1)
ROPE_THETA = 10000.0
COMPRESS_ROPE_THETA = 160000.0
HEAD_DIM, ROPE_DIM = 512, 64
MAX_POS = 1048576
# fp32 angle error at position p is ~ p * 2^-24 rad; positions below 2^16 -> 4e-3 worst, use 1e-2
SWA_ROPE_ATOL = 1e-2


def _vllm_version() -> str:
    try:
        import vllm

        return getattr(vllm, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - a probe reports, never raises on import trouble
        return f"import failed: {e}"


def dsv4_present() -> dict:
    try:
        import vllm.models.deepseek_v4  # noqa: F401
        from vllm.model_executor.layers.rotary_embedding.deepseek_scaling_rope import (  # noqa: F401
            DeepseekV4ScalingRotaryEmbedding,
        )
    except Exception as e:  # noqa: BLE001
        # the question is "is DSV4 there": no is its answer (a verdict), not an inability to judge
        return {"verdict": "fail", "message": f"vllm {_vllm_version()}: DSV4 not importable: {e}"}
    return {"verdict": "pass", "message": f"vllm {_vllm_version()}: vllm.models.deepseek_v4 present",
            "function": "vllm.models.deepseek_v4", "backend": "torch"}


def _config_ctx():
    """get_rope needs a current vLLM config in recent releases; keep the context object alive."""
    try:
        from vllm.config import VllmConfig, set_current_vllm_config
    except Exception:  # noqa: BLE001
        return None
    ctx = set_current_vllm_config(VllmConfig())
    ctx.__enter__()
    return ctx


def golden_gptj_rope(x, positions, theta: float, rope_dim: int = ROPE_DIM):
    """Plain RoPE in float64 on the last ``rope_dim`` dims, GPT-J interleaved pairs (dsv4-spec 3.3)."""
    import torch

    x = x.double()
    half = rope_dim // 2
    inv = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / rope_dim)
    ang = positions.double()[:, None] * inv[None, :]
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    nope, rot = x[..., :-rope_dim], x[..., -rope_dim:]
    a, b = rot[..., 0::2], rot[..., 1::2]
    out = torch.empty_like(rot)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return torch.cat([nope, out], dim=-1)


def dsv4_swa_rope() -> dict:
    import types

    import torch

    ver = _vllm_version()
    try:
        from vllm.models.deepseek_v4.common.rope import build_deepseek_v4_rope
    except Exception as e:  # noqa: BLE001
        return {"verdict": "not-provided", "message": f"vllm {ver}: no DSV4 rope builder: {e}"}
    ctx = _config_ctx()  # noqa: F841 - must stay referenced while get_rope runs
    cfg = types.SimpleNamespace(rope_parameters=dict(DSV4_ROPE), rope_theta=ROPE_THETA,
                                compress_rope_theta=COMPRESS_ROPE_THETA, max_position_embeddings=MAX_POS)
    try:
        rope = build_deepseek_v4_rope(cfg, head_dim=HEAD_DIM, rope_head_dim=ROPE_DIM,
                                      max_position_embeddings=MAX_POS, compress_ratio=1)
    except Exception as e:  # noqa: BLE001
        return {"verdict": "error", "message": f"vllm {ver}: build_deepseek_v4_rope raised {type(e).__name__}: {e}"}
    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 7, 100, 1000, 4095, 20000, 65535], dtype=torch.int64)
    q = torch.randn(len(positions), 2, HEAD_DIM, generator=g, dtype=torch.float32)
    got, _ = rope.forward_native(positions, q.clone())
    want = golden_gptj_rope(q, positions, ROPE_THETA)
    err = (got.double() - want).abs()
    worst = float(err.max())
    idx = int(err.flatten().argmax())
    t = idx // (2 * HEAD_DIM)
    verdict = "pass" if worst <= SWA_ROPE_ATOL else ("catastrophic" if not math.isfinite(worst) else "fail")
    return {
        "verdict": verdict,
        "message": (f"vllm {ver}: SWA-layer rope ({type(rope).__name__}, "
                    f"scaling factor {getattr(rope, 'scaling_factor', '?')}) vs golden plain RoPE theta "
                    f"{ROPE_THETA:g}: max |err| {worst:.3g} (allowed {SWA_ROPE_ATOL:g}), worst at position "
                    f"{int(positions[t])}"),
        "metrics": {"max_abs": worst, "worst_over_bound": worst / SWA_ROPE_ATOL},
        "bounds": {"max_abs": SWA_ROPE_ATOL, "worst_over_bound": 1.0},
        "function": "vllm.models.deepseek_v4.common.rope.build_deepseek_v4_rope(compress_ratio=1).forward_native",
        "backend": "torch",
    }
