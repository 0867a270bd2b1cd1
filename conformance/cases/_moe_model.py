"""MoE case inputs and the routing-metadata models that the MoE case rows and the routing check share.

* Expert fingerprints: stacked expert weights whose outputs encode which experts a token reached (every entry
  exact in bf16, FP8 and e2m1), used as case inputs by ``conformance.cases.moe`` and decoded by
  ``conformance.checks.routing``.
* Routing metadata: the golden builder (``routing_metadata_reference``) and an emulation of a block-structured
  builder (``routing_metadata_blocked``), which writes through raw stores into guarded (canary) buffers so a
  store outside the view is observable.

This module sits below both ``cases`` and ``checks`` (it imports neither), so the case rows do not import the
checks layer.
"""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------------------------------
# expert fingerprinting
FP_G0 = 4.0     # gate pre-activation (below the clamp limit 10; e2m1- and FP8-exact)
FP_U0 = 1.0     # up pre-activation
FP_INTER = 32   # intermediate size (kernels pad to 32); only row 0 is active
FP_FLOOR = 2.0**-120   # lanes below this are not observable (bf16 outputs flush below ~2^-133)


def fingerprint_amplitude() -> float:
    g = torch.tensor(FP_G0, dtype=torch.float64)
    return float(torch.nn.functional.silu(g) * FP_U0)


def fingerprint_experts(num_experts: int, dim: int, inter: int = FP_INTER) -> dict:
    """Stacked expert weights {w1, w3: [E, I, D], w2: [E, D, I]} whose outputs are A * one-hot(lane e)
    for any input whose lane 0 is 1 (every entry is 0, 1, G0 or U0: exact in bf16, FP8 and e2m1)."""
    if dim < num_experts:
        raise ValueError(f"fingerprinting needs dim >= num_experts (one output lane per expert), got "
                         f"dim {dim} < {num_experts}")
    w1 = torch.zeros(num_experts, inter, dim)
    w3 = torch.zeros(num_experts, inter, dim)
    w2 = torch.zeros(num_experts, dim, inter)
    w1[:, 0, 0] = FP_G0
    w3[:, 0, 0] = FP_U0
    w2[torch.arange(num_experts), torch.arange(num_experts), 0] = 1.0
    return {"w1": w1, "w3": w3, "w2": w2}


# ---------------------------------------------------------------------------------------------------
# raw stores and guard bands (canaries)
CANARY_I32 = 0x5A5AA5A5
CANARY_F32_BITS = 0x7FA5A5A5   # a NaN payload no arithmetic produces
GUARD = 256                    # elements on each side


def raw_view(view: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The whole allocation behind ``view`` as a flat tensor, and the view's offset into it (a pointer)."""
    st = view.untyped_storage()
    base = torch.empty(0, dtype=view.dtype, device=view.device)
    base.set_(st, 0, (st.nbytes() // view.element_size(),), (1,))
    return base, view.storage_offset()


def raw_store(view: torch.Tensor, pos: torch.Tensor, vals: torch.Tensor) -> int:
    """Store ``vals`` at element offsets ``pos`` from the start of ``view`` like a kernel's pointer store:
    no bounds check against the view (stores beyond the whole allocation are dropped and counted). Later
    entries win over earlier ones at the same position (block order). Returns the dropped count."""
    base, off = raw_view(view)
    a = pos.long() + off
    inside = (a >= 0) & (a < base.numel())
    a, v = a[inside], vals.to(view.dtype)[inside]
    if a.numel():
        order = torch.arange(a.numel())
        last = torch.full((base.numel(),), -1, dtype=torch.long).scatter_reduce_(0, a, order, "amax")
        keep = last[a] == order
        base[a[keep]] = v[keep]
    return int((~inside).sum())


def guarded(shape, dtype, guard: int = GUARD) -> tuple[torch.Tensor, torch.Tensor]:
    """(backing buffer, view): ``view`` has ``shape`` with ``guard`` canary elements on both sides."""
    n = math.prod(shape)
    if dtype == torch.float32:
        base = torch.full((n + 2 * guard,), CANARY_F32_BITS, dtype=torch.int32).view(torch.float32)
    elif dtype == torch.int32:
        base = torch.full((n + 2 * guard,), CANARY_I32, dtype=torch.int32)
    else:
        raise ValueError(f"guarded buffers are int32 or float32, got {dtype}")
    return base, base[guard:guard + n].view(shape)


def touched_guards(base: torch.Tensor, n: int, guard: int = GUARD) -> dict:
    bits = base.view(torch.int32)
    canary = CANARY_F32_BITS if base.dtype == torch.float32 else CANARY_I32
    before = torch.nonzero(bits[:guard] != canary).flatten() - guard
    after = torch.nonzero(bits[guard + n:] != canary).flatten()
    return {"before": before.tolist(), "after": after.tolist()}


# ---------------------------------------------------------------------------------------------------
# routing metadata
META_OUTPUTS = ("expert_counts", "expert_offsets", "gather_idx", "scatter_idx")


def meta_shapes(topk_ids: torch.Tensor, num_experts: int) -> dict:
    n = topk_ids.numel()
    return {"expert_counts": (num_experts,), "expert_offsets": (num_experts + 1,), "gather_idx": (n,),
            "scatter_idx": (n,)}


def _check_ids(topk_ids, num_experts):
    if topk_ids.dtype.is_floating_point or topk_ids.dim() != 2:
        raise ValueError(f"topk_ids: expected an integer [T, k] tensor, got {topk_ids.dtype} "
                         f"{tuple(topk_ids.shape)}")
    if topk_ids.numel() and (int(topk_ids.max()) >= num_experts or int(topk_ids.min()) < -1):
        raise ValueError(f"topk_ids: ids must lie in [-1, {num_experts}), got [{int(topk_ids.min())}, "
                         f"{int(topk_ids.max())}]")


def _counts_offsets(flat: torch.Tensor, num_experts: int):
    valid = flat >= 0
    counts = torch.bincount(flat[valid], minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(counts, 0)
    return counts, offsets


def routing_metadata_reference(topk_ids: torch.Tensor, *, num_experts: int, out: dict | None = None) -> dict:
    """Golden routing metadata from the semantics (every output int32):

    expert_counts [E]     (token, slot) pairs routed to each expert (-1 = dropped, not counted)
    expert_offsets [E+1]  exclusive prefix sum of the counts
    gather_idx [T*k]      flattened pair indices t*k + slot sorted by expert, ties by pair index; -1 tail
    scatter_idx [T*k]     each pair's position in that order; -1 for dropped pairs
    ``out`` (optional): preallocated int32 buffers of these shapes to write into (returned).
    """
    _check_ids(topk_ids, num_experts)
    flat = topk_ids.flatten().long()
    n = flat.numel()
    counts, offsets = _counts_offsets(flat, num_experts)
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))
    order = torch.sort(key, stable=True).indices
    nv = int((flat >= 0).sum())
    gather = torch.full((n,), -1, dtype=torch.long)
    gather[:nv] = order[:nv]
    scatter = torch.full((n,), -1, dtype=torch.long)
    scatter[order[:nv]] = torch.arange(nv)
    res = {"expert_counts": counts, "expert_offsets": offsets, "gather_idx": gather, "scatter_idx": scatter}
    res = {k: v.to(torch.int32) for k, v in res.items()}
    if out is not None:
        for k, v in res.items():
            out[k].copy_(v)
        return out
    return res


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def routing_metadata_blocked(topk_ids: torch.Tensor, *, num_experts: int, out: dict | None = None,
                             lane_mask: str = "block") -> dict:
    """Emulation of a block-structured metadata builder, written from the semantics of spec 7 (not from
    any kernel source): pairs are processed in blocks of BLOCK = 32 * top_k lanes, padded to the next power
    of two P for the lane range. Stage 1 histograms each block's lanes per expert, stage 2 scatters each
    lane to offsets[e] + (earlier blocks' count of e) + (rank among the block's lanes of e), with pointer
    stores (``raw_store``). ``lane_mask="block"`` masks lanes with l < BLOCK and the global bound (correct);
    ``"global"`` only with the global bound (the bring-up bug: lanes BLOCK..P-1 read the next block's pairs,
    so every later block's positions shift, duplicates appear and stores run past the buffers)."""
    _check_ids(topk_ids, num_experts)
    if lane_mask not in ("block", "global"):
        raise ValueError(f"lane_mask: 'block' or 'global', got {lane_mask!r}")
    T, k = topk_ids.shape
    E = num_experts
    flat = topk_ids.flatten().long()
    n = flat.numel()
    counts, offsets = _counts_offsets(flat, E)
    if out is None:
        out = {name: torch.empty(shp, dtype=torch.int32) for name, shp in meta_shapes(topk_ids, E).items()}
    out["expert_counts"].copy_(counts.to(torch.int32))
    out["expert_offsets"].copy_(offsets.to(torch.int32))
    out["gather_idx"].fill_(-1)        # memset
    out["scatter_idx"].fill_(-1)
    if n == 0:
        return out
    block = 32 * k
    p = next_pow2(block)
    nb = -(-n // block)
    lane = torch.arange(p)
    g = torch.arange(nb).unsqueeze(1) * block + lane              # [nb, P] global pair index of each lane
    m = g < n
    if lane_mask == "block":
        m &= lane < block
    e = torch.where(m, flat[g.clamp(max=n - 1)], torch.full_like(g, -1))
    live = m & (e >= 0)
    bidx = torch.arange(nb).unsqueeze(1).expand_as(g)
    # stage 1: per-block histogram
    hist = torch.zeros(nb * E, dtype=torch.long)
    hist.scatter_add_(0, (bidx * E + e)[live], torch.ones(int(live.sum()), dtype=torch.long))
    hist = hist.view(nb, E)
    prefix = torch.cumsum(hist, 0) - hist
    # stage 2: rank of each live lane among the block's lanes of the same expert (lane order)
    gl, bl, el, ll = g[live], bidx[live], e[live], lane.expand_as(g)[live]
    key = (bl * E + el) * p + ll
    order = torch.argsort(key)
    grp = (bl * E + el)[order]
    start = torch.ones_like(grp, dtype=torch.bool)
    start[1:] = grp[1:] != grp[:-1]
    first = torch.cummax(torch.where(start, torch.arange(grp.numel()), torch.zeros_like(grp)), 0).values
    rank = torch.empty_like(order)
    rank[order] = torch.arange(grp.numel()) - first
    pos = offsets[el] + prefix[bl, el] + rank
    # stores in block order (later blocks overwrite earlier ones at the same address)
    wo = torch.argsort(bl, stable=True)
    raw_store(out["gather_idx"], pos[wo], gl[wo])
    raw_store(out["scatter_idx"], gl[wo], pos[wo])
    return out
