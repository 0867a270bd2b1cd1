"""MoE gate / router (spec 3.12), routed experts (3.13) and the shared expert (3.14).

Everything is computed in the dtype of the floating activations (fp32 golden, fp64 cross-check); weights
are cast to it. Quantisation is simulated only where ``numerics`` asks: ``numerics.linear_act`` is the
block-FP8 ``act_quant`` OFF applies to the input of every FP8 / FP4 linear, ``numerics.act_dtype`` the
bf16 cast OFF does between ops.

Source divergences (spec section 8) are named variants:
  * ``route(variant=)``: "official" (OFF ``Gate``: w / sum(w)) or "hf-vllm" (HF ``DeepseekV4TopKRouter``
    and vLLM's torch router: w / (sum(w) + 1e-20)).
  * ``moe(variant=)``: "official" (OFF ``MoE``/``Expert``: routing weight multiplies the fp32 SwiGLU
    activation *before* W2) or "after-w2" (HF ``DeepseekV4Experts``, vLLM FusedMoE: after W2).
  * ``moe(shared_variant=)``: "official" (current OFF and vLLM since #40950: shared expert clamped with
    ``swiglu_limit``) or "no-clamp" (initial OFF release, HF commit 361455895).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as Fn

from ..formats.blockscale import fake_quant_fp8
from ..numerics import GOLDEN, Numerics
from ._validate import check_float, compute_dtype, round_act

__all__ = ["gate_logits", "sqrt_softplus", "route", "expert_ffn", "shared_expert", "moe", "linear",
           "ROUTE_VARIANTS", "MOE_VARIANTS", "SHARED_VARIANTS"]

ROUTE_VARIANTS = ("official", "hf-vllm")
MOE_VARIANTS = ("official", "after-w2")
SHARED_VARIANTS = ("official", "no-clamp")
# torch's grouped GEMM (fp32 on CPU and CUDA; on the CPU bitwise the per-group torch.mm, tests/references/
# test_moe.py); None on torch versions without it, where the per-segment loop runs instead
_grouped_mm = getattr(Fn, "grouped_mm", None)
RENORM_EPS_HF_VLLM = 1e-20


# -- linear with optional activation quantisation -----------------------------------------------------
def quant_act(x: torch.Tensor, numerics: Numerics) -> torch.Tensor:
    """OFF ``act_quant(x, 128, ue8m0)`` quantise-dequantise of an FP8/FP4-linear input, if simulated.

    The block is (1, 128) along K; a K below 128 (tiny test configs only) uses one block of K.
    """
    spec = numerics.linear_act
    if spec is None:
        return x
    k = x.shape[-1]
    if k < spec.block[1]:
        spec = type(spec)(spec.fmt, spec.fmax, (1, k), spec.scale_fmt, spec.amax_floor)
    flat = x.reshape(-1, k)
    return fake_quant_fp8(flat, spec).to(x.dtype).reshape(x.shape)


def linear(x: torch.Tensor, w: torch.Tensor, numerics: Numerics = GOLDEN) -> torch.Tensor:
    """``x @ w.T`` for an FP8/FP4-stored weight ``w [out, in]`` (already dequantised), in x's dtype."""
    if w.dim() != 2 or w.shape[1] != x.shape[-1]:
        raise ValueError(f"w: expected [out, {x.shape[-1]}], got {tuple(w.shape)}")
    return quant_act(x, numerics) @ w.to(x.dtype).transpose(0, 1)


# -- gate / router ------------------------------------------------------------------------------------
def gate_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits ``x . W_g^T`` [..., E] in the compute dtype (OFF upcasts both to fp32; no FP8)."""
    check_float("x", x)
    check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight: expected [E, {x.shape[-1]}], got {tuple(weight.shape)}")
    dt = compute_dtype(x)
    return x.to(dt) @ weight.to(dt).transpose(0, 1)


def sqrt_softplus(logits: torch.Tensor) -> torch.Tensor:
    """``sqrt(log(1 + e^z))`` without underflow or overflow.

    * z > 0: softplus = z + log1p(e^-z) (no overflow of e^z).
    * z <= 0: sqrt(log1p(t)) with t = e^z equals e^{z/2} * sqrt(log1p(t)/t). The naive form underflows
      to sqrt(0) = 0 once e^z < the smallest subnormal (z < -103.3 in fp32) even though the true value
      e^{z/2} (e.g. 3.7e-44 at z = -200) is still representable; the factored form keeps it, so the
      renormalised routing weights of very negative logits stay finite and correct. log1p(t)/t -> 1 as
      t -> 0 (it is exactly 1 once t is subnormal; the t == 0 case is substituted explicitly).
    """
    check_float("logits", logits)
    z = logits
    pos = z > 0
    zp = torch.where(pos, z, torch.zeros_like(z))
    zn = torch.where(pos, torch.zeros_like(z), z)
    sp_pos = zp + torch.log1p(torch.exp(-zp))
    t = torch.exp(zn)
    ratio = torch.where(t > 0, torch.log1p(t) / torch.where(t > 0, t, torch.ones_like(t)), torch.ones_like(t))
    neg = torch.exp(zn * 0.5) * torch.sqrt(ratio)
    return torch.where(pos, torch.sqrt(sp_pos), neg)


def route(logits: torch.Tensor, *, bias: torch.Tensor | None = None, topk: int, route_scale: float,
          hash_ids: torch.Tensor | None = None, variant: str = "official"):
    """Select experts and their weights -> (weights [T, k] float, ids [T, k] int64).

    scores = sqrt_softplus(logits).
    * learned layers: ids = the topk of (scores + bias) (bias = ``ffn.gate.bias`` /
      e_score_correction_bias, fp32 [E]; no group-limited routing). Ties go to the lower expert index
      (stable sort); ids are ordered by descending biased score.
    * hash layers: ``hash_ids`` [T, k] = ``tid2eid[token_ids]`` (the caller gathers); the bias is ignored.
    weights = scores[ids] (the UNBIASED scores), renormalised to sum 1, times ``route_scale``.
    variant "official": w / sum(w) (OFF ``Gate``); "hf-vllm": w / (sum(w) + 1e-20) (HF, vLLM torch).
    """
    if variant not in ROUTE_VARIANTS:
        raise ValueError(f"variant: unknown {variant!r}; known {ROUTE_VARIANTS}")
    check_float("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [T, E], got {tuple(logits.shape)}")
    T, E = logits.shape
    if not isinstance(topk, int) or not 0 < topk <= E:
        raise ValueError(f"topk: need an int in [1, {E}], got {topk!r}")
    scores = sqrt_softplus(logits)
    if hash_ids is not None:
        if hash_ids.dtype.is_floating_point or tuple(hash_ids.shape) != (T, topk):
            raise ValueError(f"hash_ids: expected integer [T={T}, topk={topk}], got "
                             f"{hash_ids.dtype} {tuple(hash_ids.shape)}")
        ids = hash_ids.long()
        if ids.numel() and (ids.min() < 0 or ids.max() >= E):
            raise ValueError(f"hash_ids: expert ids must lie in [0, {E}), got [{ids.min()}, {ids.max()}]")
    else:
        sel = scores
        if bias is not None:
            check_float("bias", bias)
            if tuple(bias.shape) != (E,):
                raise ValueError(f"bias: expected shape ({E},), got {tuple(bias.shape)}")
            sel = scores + bias.to(scores.dtype)
        ids = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :topk]
    w = scores.gather(-1, ids)
    denom = w.sum(dim=-1, keepdim=True)
    if variant == "hf-vllm":
        denom = denom + RENORM_EPS_HF_VLLM
    w = w / denom * route_scale
    return w, ids


# -- experts ------------------------------------------------------------------------------------------
def expert_ffn(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, *,
               limit: float | None, numerics: Numerics = GOLDEN,
               route_weight: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU expert with clamp: ``W2 (SiLU(min(W1 x, L)) * clamp(W3 x, -L, L) [* route_weight])``.

    x [..., D]; w1, w3 [I, D]; w2 [D, I] (dequantised). ``limit`` None = no clamp (the unclamped shared
    expert of the initial release). ``route_weight`` [...] multiplies the activation before W2, in the
    compute dtype (OFF); pass None and scale the output to apply it after W2.
    """
    check_float("x", x)
    dt = compute_dtype(x)
    x = x.to(dt)
    for n, w, shp in (("w1", w1, (None, x.shape[-1])), ("w3", w3, (None, x.shape[-1])),
                      ("w2", w2, (x.shape[-1], None))):
        check_float(n, w)
        if w.dim() != 2 or any(s is not None and s != d for s, d in zip(shp, w.shape, strict=True)):
            raise ValueError(f"{n}: expected shape {tuple('I' if s is None else s for s in shp)}, "
                             f"got {tuple(w.shape)}")
    if w1.shape != w3.shape or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"w1/w3/w2: inconsistent shapes {tuple(w1.shape)}, {tuple(w3.shape)}, "
                         f"{tuple(w2.shape)}")
    xq = quant_act(x, numerics)
    g = xq @ w1.to(dt).transpose(0, 1)
    u = xq @ w3.to(dt).transpose(0, 1)
    if limit is not None:
        g = g.clamp(max=limit)           # gate: max side only
        u = u.clamp(min=-limit, max=limit)  # up: both sides
    a = Fn.silu(g) * u
    if route_weight is not None:
        a = a * route_weight.to(dt).unsqueeze(-1)
    a = round_act(a, numerics)
    return linear(a, w2, numerics)


def shared_expert(x, w: Mapping[str, torch.Tensor], *, limit, variant="official", numerics=GOLDEN):
    """Shared expert (spec 3.14): the routed expert math with routing weight 1.

    variant "official": clamped with ``limit`` (current OFF, vLLM #40950); "no-clamp": unclamped
    (initial OFF release, HF commit 361455895).
    """
    if variant not in SHARED_VARIANTS:
        raise ValueError(f"shared_variant: unknown {variant!r}; known {SHARED_VARIANTS}")
    return expert_ffn(x, _get(w, "w1", "shared"), _get(w, "w3", "shared"), _get(w, "w2", "shared"),
                      limit=limit if variant == "official" else None, numerics=numerics)


def _get(w, key, what):
    try:
        return w[key]
    except KeyError:
        raise KeyError(f"{what}: missing weight {key!r} (have {sorted(w)})") from None


def _expert_weight(experts, stacked, e: int, name: str):
    """Weight ``name`` ("w1" | "w3" | "w2") of expert ``e``. Experts as {e: {"w1","w3","w2"}} (any Mapping
    or a callable e -> mapping) or stacked (``stacked``: what :func:`_stacked` returned for them, else None);
    only the one tensor is looked up (lazy sources decode it then)."""
    if stacked is not None:
        if name != "w2" and "w13" in stacked:
            I = stacked["w13"].shape[1] // 2
            return stacked["w13"][e, :I] if name == "w1" else stacked["w13"][e, I:]
        return stacked[name][e]
    if callable(experts) and not isinstance(experts, Mapping):
        return _get(experts(e), name, f"experts({e})")
    try:
        w = experts[e]
    except KeyError:
        raise KeyError(f"experts: no weights for expert {e}") from None
    return _get(w, name, f"experts[{e}]")


def _stacked(experts):
    """The stacked form's tensors, or None for per-expert sources: {"w1": [E, I, D], "w3": [E, I, D],
    "w2": [E, D, I]} or {"w13": [E, 2I, D], "w2": [E, D, I]} (gate rows then up rows of each expert, the
    layout of transformers' ``gate_up_proj``; one product gives both, the same dot products)."""
    if not isinstance(experts, Mapping) or not isinstance(experts.get("w2"), torch.Tensor):
        return None
    keys = ("w13", "w2") if "w13" in experts else ("w1", "w3", "w2")
    st = {k: _get(experts, k, "experts (stacked)") for k in keys}
    for k, t in st.items():
        check_float(f"experts {k}", t)
        if t.dim() != 3:
            raise ValueError(f"experts {k}: expected a stacked [E, out, in] tensor, got {tuple(t.shape)}")
    E, D, I = st["w2"].shape
    want = {"w13": (E, 2 * I, D), "w1": (E, I, D), "w3": (E, I, D), "w2": (E, D, I)}
    for k, t in st.items():
        if tuple(t.shape) != want[k]:
            raise ValueError(f"experts {k}: expected {want[k]} (w2 is {tuple(st['w2'].shape)}), got {tuple(t.shape)}")
    return st


def moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts, shared, *, limit: float,
        variant: str = "official", shared_variant: str = "official",
        numerics: Numerics = GOLDEN) -> torch.Tensor:
    """Routed experts + shared expert: ``y = sum_k w_k E_{ids_k}(x) + S(x)`` -> [T, D].

    x [T, D] (after ffn_norm); ids / weights [T, k] from ``route``; experts per expert or stacked, as in
    ``_expert_weight`` / ``_stacked``;
    shared = {"w1","w3","w2"} or None. Accumulation follows OFF: experts in increasing index order into one
    accumulator of the compute dtype, then the shared expert.
    variant: "official" (weight before W2) | "after-w2" (HF, vLLM). shared_variant: see ``shared_expert``.

    Evaluation: every routed expert computes exactly :func:`expert_ffn` on its tokens. The (token, slot)
    pairs are grouped by expert once (a stable sort: expert ascending, then row-major (token, slot), the
    order ``nonzero(ids == e)`` gives), so each expert's rows are one contiguous segment of a single
    gathered [P, D] matrix: the three products are one GEMM per expert and segment (:func:`_segment_mm`;
    for fp32 stacked experts, torch's grouped GEMM over all segments, one call instead of one per expert,
    the same per-segment products), and the row-wise parts (activation quantisation, clamp, SiLU, routing
    weight, bf16 rounding) run once over all P rows, which gives the same values as running them per expert.
    With ``w13`` (gate and up stacked) the gate and up products are one GEMM: the same dot products.
    Each token's routed outputs are added into the accumulator in expert-ascending order (deterministic on
    every device).
    """
    if variant not in MOE_VARIANTS:
        raise ValueError(f"variant: unknown {variant!r}; known {MOE_VARIANTS}")
    check_float("x", x)
    check_float("weights", weights)
    if x.dim() != 2:
        raise ValueError(f"x: expected [T, D], got {tuple(x.shape)}")
    if ids.dtype.is_floating_point or ids.shape != weights.shape or ids.shape[0] != x.shape[0]:
        raise ValueError(f"ids/weights: expected integer ids and float weights of one shape [T={x.shape[0]}, k],"
                         f" got {ids.dtype} {tuple(ids.shape)} / {tuple(weights.shape)}")
    if ids.numel() and int(ids.min()) < 0:
        t, j = (ids < 0).nonzero()[0].tolist()
        raise ValueError(f"ids: negative expert id {int(ids[t, j])} at token {t}, slot {j} (padding ids are not "
                         "routing decisions)")
    dt = compute_dtype(x)
    x = x.to(dt)
    y = torch.zeros_like(x)
    k = ids.shape[1]
    if ids.numel():
        flat_e, order = torch.sort(ids.reshape(-1), stable=True)
        tok, slot = order // k, order % k
        w_pair = weights[tok, slot].to(dt).unsqueeze(-1)  # [P, 1]
        D = x.shape[-1]
        xs = quant_act(x, numerics)[tok]                                    # [P, D]
        st = _stacked(experts)
        if st is not None:
            E = st["w2"].shape[0]
            if st["w2"].shape[1] != D:
                raise ValueError(f"experts w2: expected [E, {D}, I] for x [T, {D}], got {tuple(st['w2'].shape)}")
            top = int(flat_e[-1])
            if top >= E:
                raise ValueError(f"ids: expert id {top}, but the stacked experts hold {E}")
        if st is not None and _grouped_mm is not None and all(t.dtype == dt == torch.float32 for t in st.values()):
            # one grouped GEMM call per product over all experts' segments
            offs = torch.cumsum(torch.bincount(flat_e, minlength=E), 0).to(torch.int32)

            def product(inp, name, rows=None):   # shapes were checked by _stacked
                return _grouped_mm(inp, st[name].transpose(1, 2), offs=offs)
            if "w13" in st:
                h = product(xs, "w13")
                g, u = h.split(h.shape[1] // 2, dim=1)
            else:
                g, u = product(xs, "w1"), product(xs, "w3")
        else:
            experts_hit, counts = torch.unique_consecutive(flat_e, return_counts=True)
            ends = torch.cumsum(counts, 0)
            segs = [(e, a, b) for e, a, b in zip(experts_hit.tolist(), (ends - counts).tolist(), ends.tolist(),
                                                 strict=True)]  # the one host sync

            def weight(name, shape):   # one expert's tensor, fetched when its product runs (lazy sources)
                def of(e):
                    w = _expert_weight(experts, st, e, name)
                    check_float(f"expert {e} {name}", w)
                    if w.dim() != 2 or any(s is not None and s != d for s, d in zip(shape, w.shape, strict=True)):
                        raise ValueError(f"expert {e} {name}: expected shape "
                                         f"{tuple('I' if s is None else s for s in shape)}, got {tuple(w.shape)}")
                    return w
                return of

            def product(inp, name, rows=None):   # weight [rows (None: any), inp's width]
                return _segment_mm(inp, segs, weight(name, (rows, inp.shape[1])), dt)
            g = product(xs, "w1")
            u = product(xs, "w3", g.shape[1])
        if limit is not None:
            g = g.clamp(max=limit)              # gate: max side only
            u = u.clamp(min=-limit, max=limit)  # up: both sides
        a = Fn.silu(g) * u
        del g, u
        if variant == "official":
            a = a * w_pair
        a = quant_act(round_act(a, numerics), numerics)
        ye = product(a, "w2", D)                                            # [P, D]
        if variant == "after-w2":
            ye = ye * w_pair
        # accumulate each token's k contributions in expert-ascending order, left to right, without atomics
        # (CUDA's index_add_ adds in a run-dependent order): contribution r of a token is its r-th expert
        rank = torch.empty_like(ids)
        rank.scatter_(1, torch.sort(ids, dim=1, stable=True).indices,
                      torch.arange(k, device=ids.device).expand_as(ids).contiguous())
        per_rank = x.new_zeros(x.shape[0], k, x.shape[1])
        per_rank[tok, rank[tok, slot]] = ye      # every (token, rank) written once
        del ye
        for r in range(k):
            y = y + per_rank[:, r]
    if shared is not None:
        y = y + shared_expert(x, shared, limit=limit, variant=shared_variant, numerics=numerics)
    return round_act(y, numerics)


def _segment_mm(xs: torch.Tensor, segs, weight_of, dt) -> torch.Tensor:
    """``out[a:b] = xs[a:b] @ weight_of(e).T`` for every segment (e, a, b) -> [P, N] (a grouped GEMM).

    Each segment is one ordinary matrix product, the same one ``expert_ffn`` does for that expert, written
    in place into its rows of ``out``. (Issuing the products on several CUDA streams was tried on an H100:
    8 streams gained 5% on one host and lost 30% on another, where launching, not the GPU, is the limit;
    so one stream.)"""
    out = None
    for e, a, b in segs:
        w = weight_of(e).to(dt)
        if out is None:
            out = xs.new_empty(xs.shape[0], w.shape[0])
        torch.mm(xs[a:b], w.transpose(0, 1), out=out[a:b])
    return out
