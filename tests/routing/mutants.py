"""Deliberately broken MoE routing subjects (issue 7 acceptance list), each otherwise the gfx942 emulation."""

from __future__ import annotations

import torch

from conformance.cases import moe as M
from conformance.cases._moe_model import raw_store, routing_metadata_blocked
from conformance.subjects import Impl, Subject, SubjectInfo
from references.components.moe import sqrt_softplus

PROFILE = "gfx942"


class _Mutant(Subject):
    def __init__(self, name, impls: dict):
        self.name, self._impls = name, impls

    def info(self):
        return SubjectInfo(self.name, f"routing mutant {self.name}", "cpu (mutant)", "float8_e4m3fnuz", False,
                           profile=PROFILE)

    def provides(self):
        return {k: Impl(fn, function=f"tests.routing.mutants.{self.name}", backend="torch")
                for k, fn in self._impls.items()}


def _route(z, bias, topk, route_scale, *, hash_ids=None, score=sqrt_softplus, weights_from_biased=False,
           eps=0.0):
    s = score(z)
    if hash_ids is not None:
        ids = hash_ids.long()
        sel = s
    else:
        sel = s if bias is None else s + bias.float()
        ids = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :topk]
    w = (sel if weights_from_biased else s).gather(1, ids)
    return w / (w.sum(-1, keepdim=True) + eps) * route_scale, ids


def _eps(variant):
    return 1e-20 if variant == "hf-vllm" else 0.0


def naive_score(z):
    """softplus as log(1 + exp(z)): underflows to 0 for z < ~-103 (and overflows for z > 88)."""
    return torch.sqrt(torch.log(1 + torch.exp(z)))


def biased_weights():
    """Routing weights taken from the biased scores (s + bias) instead of the unbiased ones."""
    def router(x, weight, bias=None, *, topk, route_scale, variant="official"):
        w, ids = _route(M._emulated_logits(x, weight, PROFILE), bias, topk, route_scale, weights_from_biased=True,
                        eps=_eps(variant))
        return {"ids": ids, "weights": w}
    return _Mutant("biased_weights", {"moe.router": router})


def naive_softplus():
    def router(x, weight, bias=None, *, topk, route_scale, variant="official"):
        w, ids = _route(M._emulated_logits(x, weight, PROFILE), bias, topk, route_scale, score=naive_score,
                        eps=_eps(variant))
        return {"ids": ids, "weights": w}

    def hash_router(x, weight, tid2eid, input_ids, *, topk, route_scale, variant="official"):
        w, ids = _route(M._emulated_logits(x, weight, PROFILE), None, topk, route_scale, score=naive_score,
                        hash_ids=tid2eid[input_ids.long()], eps=_eps(variant))
        return {"ids": ids, "weights": w}
    return _Mutant("naive_softplus", {"moe.router": router, "moe.hash_router": hash_router})


def hash_no_floor():
    """Hash routing renormalised by the plain sum whatever the variant: 0/0 when every score underflows."""
    def hash_router(x, weight, tid2eid, input_ids, *, topk, route_scale, variant="official"):
        w, ids = _route(M._emulated_logits(x, weight, PROFILE), None, topk, route_scale,
                        hash_ids=tid2eid[input_ids.long()], eps=0.0)
        return {"ids": ids, "weights": w}
    return _Mutant("hash_no_floor", {"moe.hash_router": hash_router})


def global_mask_metadata():
    """Block metadata builder whose padded lanes are masked only against the global bound (spec 7)."""
    def meta(topk_ids, *, num_experts, out=None):
        return routing_metadata_blocked(topk_ids, num_experts=num_experts, out=out, lane_mask="global")
    return _Mutant("global_mask_metadata", {"moe.routing_metadata": meta})


_experts = M._emulate_experts(PROFILE)


def mask_expert_map():
    """The expert map replaced by a 0/1 mask (1 = local): every expert id collapses to local expert 0 or 1."""
    def experts(x, ids, weights, w1, w3, w2, *, limit, expert_map=None, variant="official", out=None):
        if expert_map is not None:
            expert_map = (expert_map >= 0).to(torch.int32)
        return _experts(x, ids, weights, w1, w3, w2, limit=limit, expert_map=expert_map, out=out)
    return _Mutant("mask_expert_map", {"moe.experts": experts})


def ep_off_by_one():
    """Expert-parallel map built one expert off: rank r holds [start+1, end+1)."""
    def experts(x, ids, weights, w1, w3, w2, *, limit, expert_map=None, variant="official", out=None):
        if expert_map is not None:
            expert_map = torch.roll(expert_map, 1)
        return _experts(x, ids, weights, w1, w3, w2, limit=limit, expert_map=expert_map, out=out)
    return _Mutant("ep_off_by_one", {"moe.experts": experts})


def oob_writer():
    """Writes its output rows padded to a multiple of 32 tokens (zeros past T): out-of-bounds stores."""
    def experts(x, ids, weights, w1, w3, w2, *, limit, expert_map=None, variant="official", out=None):
        y = _experts(x, ids, weights, w1, w3, w2, limit=limit, expert_map=expert_map)["y"]
        if out is not None:
            T, D = y.shape
            tp = -(-T // 32) * 32
            pad = torch.zeros(tp, D)
            pad[:T] = y
            raw_store(out, torch.arange(tp * D), pad.flatten())
        return {"y": y}
    return _Mutant("oob_writer", {"moe.experts": experts})


def reversed_ties():
    """A correct router that breaks exact ties towards the higher expert index (must not alarm)."""
    def router(x, weight, bias=None, *, topk, route_scale, variant="official"):
        z = M._emulated_logits(x, weight, PROFILE)
        s = sqrt_softplus(z)
        sel = s if bias is None else s + bias.float()
        E = sel.shape[-1]
        ids = (E - 1) - torch.sort(sel.flip(-1), dim=-1, descending=True, stable=True).indices[:, :topk]
        w = s.gather(1, ids)
        return {"ids": ids, "weights": w / (w.sum(-1, keepdim=True) + _eps(variant)) * route_scale}
    return _Mutant("reversed_ties", {"moe.router": router})


def layer_expert_mask():
    """A whole routed layer (single rank, all experts local) whose experts receive the AITER-style 0/1 mask
    instead of the expert map: every routed id becomes local expert 1."""
    router = M._emulate_router(PROFILE)
    hrouter = M._emulate_hash_router(PROFILE)

    def layer(x, gate_weight, w1, w3, w2, gate_bias=None, tid2eid=None, input_ids=None, *, topk, route_scale,
              limit, route_variant="official", variant="official"):
        if tid2eid is not None:
            r = hrouter(x, gate_weight, tid2eid, input_ids, topk=topk, route_scale=route_scale, variant=route_variant)
        else:
            r = router(x, gate_weight, gate_bias, topk=topk, route_scale=route_scale, variant=route_variant)
        mask = torch.ones(w1.shape[0], dtype=torch.int32)   # 1 = local
        return {"y": _experts(x, r["ids"], r["weights"], w1, w3, w2, limit=limit, expert_map=mask)["y"]}
    return _Mutant("layer_expert_mask", {"moe.layer": layer})


# ---------------------------------------------------------------------------------------------------
# less accurate expert backends (issue 16): invisible on fingerprint experts (constant intermediate SiLU(4) * 1,
# one non-zero product per dot, pre-activation 4 < the clamp), caught on the random-weight rows
def _bf(t):
    return t.to(torch.bfloat16).float()


def _fp8_per_tensor(a):
    """The SwiGLU intermediate quantised to float8_e4m3fnuz with one per-tensor scale amax / 240 (instead of the
    bf16 activation of the serving contract; a per-block scale would at least keep small rows off subnormals)."""
    amax = a.abs().max()
    if amax == 0:
        return a
    scale = amax / 240.0
    return (a / scale).to(torch.float8_e4m3fnuz).float() * scale


def _bf16_accum_matmul(a, w):
    """a [T, I] @ w.T [I, D] accumulated in bf16: the running sum is rounded to bf16 after every product."""
    acc = torch.zeros(a.shape[0], w.shape[0])
    for j in range(a.shape[1]):
        acc = _bf(acc + a[:, j:j + 1] * w[:, j][None, :])
    return acc


def _experts_with(ffn):
    """The gfx942 experts emulation with its per-expert FFN replaced by ``ffn(x, w1, w3, w2, limit) -> ye``."""
    def experts(x, ids, weights, w1, w3, w2, *, limit, expert_map=None, variant="official", out=None):
        xb = _bf(x)
        local = M._local_ids(ids, expert_map)
        y = torch.zeros_like(xb)
        for e in torch.unique(local[local >= 0]).tolist():
            tok, slot = torch.nonzero(local == e, as_tuple=True)
            ye = _bf(ffn(xb[tok], w1[e].float(), w3[e].float(), w2[e].float(), limit))
            y.index_add_(0, tok, ye * weights[tok, slot].float().unsqueeze(-1))
        y = _bf(y)
        if out is not None:
            out.copy_(y)
        return {"y": y}
    return experts


def _swiglu(x, w1, w3, limit):
    g, u = _bf(x @ w1.T), _bf(x @ w3.T)
    if limit is not None:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return _bf(torch.nn.functional.silu(g) * u)


def _ffn_fp8_intermediate(x, w1, w3, w2, limit):
    return _fp8_per_tensor(_swiglu(x, w1, w3, limit)) @ w2.T


def _ffn_bf16_accumulate(x, w1, w3, w2, limit):
    return _bf16_accum_matmul(_swiglu(x, w1, w3, limit), w2)


def _ffn_no_clamp(x, w1, w3, w2, limit):
    return _swiglu(x, w1, w3, None) @ w2.T


_LESS_ACCURATE = {"fp8_intermediate_per_tensor": _ffn_fp8_intermediate, "bf16_accumulate": _ffn_bf16_accumulate,
                  "no_swiglu_clamp": _ffn_no_clamp}


def less_accurate_experts(kind):
    """moe.experts and moe.layer (gfx942 router emulation + these experts) with one less accurate expert
    backend: "fp8_intermediate_per_tensor", "bf16_accumulate" (down projection) or "no_swiglu_clamp"."""
    experts = _experts_with(_LESS_ACCURATE[kind])
    router, hrouter = M._emulate_router(PROFILE), M._emulate_hash_router(PROFILE)

    def layer(x, gate_weight, w1, w3, w2, gate_bias=None, tid2eid=None, input_ids=None, *, topk, route_scale,
              limit, route_variant="official", variant="official"):
        if tid2eid is not None:
            r = hrouter(x, gate_weight, tid2eid, input_ids, topk=topk, route_scale=route_scale, variant=route_variant)
        else:
            r = router(x, gate_weight, gate_bias, topk=topk, route_scale=route_scale, variant=route_variant)
        return {"y": experts(x, r["ids"], r["weights"], w1, w3, w2, limit=limit)["y"]}
    return _Mutant(kind, {"moe.experts": experts, "moe.layer": layer})


def mask_ties_by_value():
    """Iterative arg-max top-k that masks the picked *value* instead of the picked index: on an exact tie every
    tied expert is masked at once, and the remaining picks fall on already-masked (-inf) lanes: lane 0 again and
    again. Identical to the correct router wherever the selection scores are distinct."""
    def router(x, weight, bias=None, *, topk, route_scale, variant="official"):
        s = sqrt_softplus(M._emulated_logits(x, weight, PROFILE))
        sel = (s if bias is None else s + bias.float()).clone()
        picks = []
        for _ in range(topk):
            i = sel.argmax(-1)
            picks.append(i)
            v = sel.gather(1, i[:, None])
            sel = torch.where(sel == v, torch.full_like(sel, -torch.inf), sel)
        ids = torch.stack(picks, -1)
        w = s.gather(1, ids)
        return {"ids": ids, "weights": w / (w.sum(-1, keepdim=True) + _eps(variant)) * route_scale}
    return _Mutant("mask_ties_by_value", {"moe.router": router})
