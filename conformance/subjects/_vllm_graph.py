"""vLLM's DSV4 Triton kernels as graph cases (``Subject.graph_cases()`` of ``vllm-triton-gpu:<profile>``).

Each case captures vLLM's own kernels, launched as vLLM launches them (``vllm_triton.launch_*``), on static
buffers of every captured batch size, so the graph check replays vLLM's code, not the harness's:

* ``vllm_sparse_decode``: ``cache_utils.quantize_and_insert_k_kernel`` (K rows quantised into the paged FP8
  cache) then ``rocm_aiter_mla_sparse._sparse_attn_decode_ragged_kernel`` over a ragged list of selected slots
  (``indptr``/indices as the decode metadata builder leaves them; padded rows have zero length). Golden: the
  serving-numerics emulation of attn.sparse (our reference with the FP8 cache quantised by our own codec, bf16
  inputs and output), bounded by attn.sparse's emulated-level tolerance.
* ``vllm_routing_metadata``: ``gpt_oss_triton_kernels_moe._make_bitmatrix_metadata_pow2_safe`` with its nested
  ``_stage2_pow2`` kernel on static top-k ids (padded rows hold dropped ids, -1), as the MXFP4 Triton MoE builds
  its gather / scatter metadata inside a captured decode. Golden: the routing-metadata semantics, exact.

Nothing here needs vLLM installed: kernels come from ``_vllm_source`` (or the installed package).
"""

from __future__ import annotations

import torch

from .graph_api import GraphCase

H, D, N, K, BS = 16, 512, 256, 64, 64     # heads, head dim, cache rows, max selected per row, cache block size
SCALE = D ** -0.5
E, TOPK = 64, 6                              # experts, routed per token (DSV4: top-6; not a power of two)
NO_SPLIT = "a single kernel sequence with no attention boundary inside to split at (one piece)"
NO_DECODE_ONLY = "the case has no separate decode-only code path"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) & 0x7FFFFFFF)


# ------------------------------------------------------------------------------------- sparse decode attention

def sparse_make_input(seeds: dict) -> dict:
    B, live = int(seeds["batch"]), int(seeds["live"])
    gv, gm, gt, gp = (_gen(seeds[k]) for k in ("values", "metadata", "topk", "padding"))
    q = torch.randn(B, H, D, generator=gv)
    kv = torch.randn(N, D, generator=gv)
    sink = torch.randn(H, generator=gv)
    hi = 8 if seeds.get("short") else K
    lens = torch.randint(1, hi + 1, (B,), generator=gm)
    lens[live:] = 0                                        # padded rows: no selected slots, as vLLM pads
    sel = torch.stack([torch.randperm(N, generator=gt)[:K] for _ in range(B)])
    idx = torch.where(torch.arange(K)[None, :] < lens[:, None], sel, -1)
    ptr = torch.zeros(B + 1, dtype=torch.int32)
    ptr[1:] = torch.cumsum(lens, 0).to(torch.int32)
    # the ragged buffer holds every row's slots back to back; its tail past ptr[-1] holds in-range garbage
    ind = torch.randint(0, N, (B * K,), generator=gp, dtype=torch.int32)
    ind[: int(ptr[-1])] = torch.cat([r[r >= 0] for r in idx]).to(torch.int32)
    if live < B:                                           # garbage in the padded rows' queries
        pad = 0.0 if int(seeds["padding"]) < 0 else 1e3
        q[live:] = torch.randn(B - live, H, D, generator=gp) * pad
    return {"q": q, "kv": kv, "sink": sink, "ind": ind, "ptr": ptr, "idx": idx, "live": live}


class SparseDecodeWrapper:
    input_keys = ("q", "kv", "sink", "ind", "ptr")

    def __init__(self, example: dict, device, p: dict, kernels: dict):
        from .vllm_triton import BF, CACHE_ROW_BYTES

        self.p, self.k = p, kernels
        B = example["q"].shape[0]
        self.static = {"q": torch.zeros(B, H, D, dtype=BF, device=device),
                       "kv": torch.zeros(N, D, dtype=BF, device=device),
                       "sink": torch.zeros(H, device=device),
                       "ind": torch.zeros(B * K, dtype=torch.int32, device=device),
                       "ptr": torch.zeros(B + 1, dtype=torch.int32, device=device)}
        self.slots = torch.arange(N, dtype=torch.int64, device=device)
        self.cache = torch.zeros(N // BS, BS * CACHE_ROW_BYTES, dtype=torch.uint8, device=device)
        self.out = torch.zeros(B, H, D, dtype=BF, device=device)

    def load(self, inputs: dict) -> None:
        for k in self.input_keys:
            if k in inputs:
                self.static[k].copy_(inputs[k])

    def region(self) -> dict:
        return sparse_run(self.p, self.k, self.static, self.slots, self.cache, self.out)


def sparse_run(p, kernels, s, slots, cache, out) -> dict:
    from .vllm_triton import CACHE_ROW_BYTES, launch_insert_k, launch_sparse_decode

    launch_insert_k(kernels["insert"], s["kv"], slots, cache, BS, p)
    main = cache.view(cache.shape[0], BS, CACHE_ROW_BYTES)
    launch_sparse_decode(kernels["decode"], s["q"], main, s["ind"], s["ptr"], s["sink"], out, SCALE, p)
    return {"o": out.float()}


def sparse_case(p: dict, kernels: dict, profile: str, function: str) -> GraphCase:
    from ..cases.attention import ATTN_TOL
    from ..components import load_all

    emulate = load_all()["attn.sparse"].emulate(profile)
    tol = ATTN_TOL({}, "emulated")

    def eager(x: dict) -> dict:
        from .vllm_triton import BF, CACHE_ROW_BYTES

        dev = x["q"].device
        B = x["q"].shape[0]
        s = {"q": x["q"].to(BF), "kv": x["kv"].to(BF).contiguous(), "sink": x["sink"].float(), "ind": x["ind"],
             "ptr": x["ptr"]}
        cache = torch.zeros(N // BS, BS * CACHE_ROW_BYTES, dtype=torch.uint8, device=dev)
        out = torch.zeros(B, H, D, dtype=BF, device=dev)
        return sparse_run(p, kernels, s, torch.arange(N, dtype=torch.int64, device=dev), cache, out)

    def golden(x: dict, dtype) -> dict:
        live = x["live"]
        o = emulate(q=x["q"][:live], kv=x["kv"], indices=x["idx"][:live], sink=x["sink"], scale=SCALE)["o"]
        return {"o": o.double()}

    def bound(x: dict, g64: dict) -> dict:
        # attn.sparse's element bound is atol + rtol * (the row's largest selected |kv|): o is a convex
        # combination of those rows. The graph check takes one number per output, so the largest row magnitude
        # over the live rows is used (never tighter than the per-row bound; same rtol, nothing added)
        live = x["live"]
        idx = x["idx"][:live].long()
        mag = x["kv"].double().abs().amax(-1)[idx.clamp(min=0)].masked_fill(idx < 0, 0).amax()
        return {"o": tol.atol + tol.rtol * float(mag)}

    return GraphCase(
        name="vllm_sparse_decode", component="attn.sparse", make_input=sparse_make_input, eager=eager,
        wrapper=lambda ex, dev: SparseDecodeWrapper(ex, dev, p, kernels), golden=golden,
        batch_sizes=(8, 4, 2), modes=("full",), mode_reasons={"piecewise": NO_SPLIT, "decode-only": NO_DECODE_ONLY},
        deterministic=True, bound=bound,
        bound_reason=f"attn.sparse emulated level, relative to the largest selected |kv|: {tol.derivation}",
        function=function,
        description=f"vLLM's K-cache writer then its ragged sparse-MLA decode kernel ({profile} FP8 cache), "
                    f"H={H}, {N} cache rows, up to {K} selected per row, sizes 8/4/2 in one pool")


# -------------------------------------------------------------------------------------- MoE routing metadata

def routing_make_input(seeds: dict) -> dict:
    B, live = int(seeds["batch"]), int(seeds["live"])
    gv, gm = _gen(seeds["values"]), _gen(seeds["metadata"])
    hot = int(torch.randint(0, 3, (1,), generator=gm))        # 0 uniform, 1 a hot expert, 2 drops
    ids = torch.stack([torch.randperm(E, generator=gv)[:TOPK] for _ in range(B)]).to(torch.int32)
    if hot == 1:                                                # expert 3 in every row (first slot)
        for r in ids:
            j = (r == 3).nonzero()
            if len(j):
                r[int(j[0])] = r[0].clone()
            r[0] = 3
    if hot == 2:
        ids[torch.rand(B, TOPK, generator=gm) < 0.2] = -1
    ids[live:] = -1                                             # padded rows route nowhere (dropped lanes)
    return {"ids": ids, "live": live}


def _routing_outputs(md, B: int) -> dict:
    """Outputs with the batch first (the graph check reads rows < live): each pair's position in the
    expert-sorted order [B, k], and the per-expert counts repeated on every row [B, E]; together they fix the
    whole metadata (gather_idx is the inverse of scatter_idx, offsets the prefix sum of the counts)."""
    counts = md.col_sum.to(torch.float32)
    return {"scatter": md.row_sorted_indx.view(B, TOPK).to(torch.float32),
            "counts": counts[None, :].expand(B, E).contiguous()}


class RoutingWrapper:
    input_keys = ("ids",)

    def __init__(self, example: dict, device, builder):
        self.builder = builder
        self.static = {"ids": torch.zeros_like(example["ids"], device=device)}

    def load(self, inputs: dict) -> None:
        if "ids" in inputs:
            self.static["ids"].copy_(inputs["ids"])

    def region(self) -> dict:
        from ._triton_kernels_standin import Bitmatrix

        ids = self.static["ids"]
        return _routing_outputs(self.builder(ids, Bitmatrix(ids, E)), ids.shape[0])


def routing_case(builder, function: str) -> GraphCase:
    def eager(x: dict) -> dict:
        from ._triton_kernels_standin import Bitmatrix

        ids = x["ids"].contiguous()
        return _routing_outputs(builder(ids, Bitmatrix(ids, E)), ids.shape[0])

    def golden(x: dict, dtype) -> dict:
        from ..cases._moe_model import routing_metadata_reference

        ids = x["ids"]
        r = routing_metadata_reference(ids, num_experts=E)
        live = x["live"]
        return {"scatter": r["scatter_idx"].view(-1, TOPK)[:live].double(),
                "counts": r["expert_counts"].double()[None, :].expand(live, E)}

    return GraphCase(
        name="vllm_routing_metadata", component="moe.routing_metadata", make_input=routing_make_input,
        eager=eager, wrapper=lambda ex, dev: RoutingWrapper(ex, dev, builder), golden=golden,
        groups=("values", "metadata"), batch_sizes=(64, 32, 8), modes=("full",),
        mode_reasons={"piecewise": NO_SPLIT, "decode-only": NO_DECODE_ONLY}, deterministic=True,
        bound=lambda x, g: {"scatter": 0.0, "counts": 0.0},
        bound_reason="integer metadata: exact (positions and counts are integers held exactly in float32)",
        function=function,
        description=f"vLLM's non-power-of-two top-k routing metadata builder, top-{TOPK} of {E} experts, padded "
                    "rows dropped, sizes 64/32/8 in one pool")


# the kernel each case captures, as a platform's binding table names it (conformance.subjects.bindings)
TABLE_KERNEL = {"attn.sparse": "_sparse_attn_decode_ragged_kernel",
                "moe.routing_metadata": "_make_bitmatrix_metadata_pow2_safe"}


def table_graph_cases(rows: dict, p: dict, profile: str) -> list[GraphCase]:
    """The graph cases of the functions a platform's binding table selects, for a device run of the ``vllm``
    subject and for its simulation alike. ``rows``: component -> ``Binding`` (``bindings.select`` on the platform
    and dispatch context). vllm_sparse_decode where attn.sparse is bound to vLLM's ragged Triton decode,
    vllm_routing_metadata where moe.routing_metadata is bound to its bitmatrix builder; each case's ``function``
    is the row's, so the rows say what was (or, without a GPU, would be) captured. A component bound elsewhere
    (AITER, a compiled op) gives no case: those kernels are not in this set."""
    import dataclasses

    out = []
    for c in vllm_graph_cases(p, profile):
        row = rows.get(c.component)
        if row is not None and TABLE_KERNEL[c.component] in (row.function or ""):
            out.append(dataclasses.replace(c, function=f"{row.function} [{row.backend}]"))
    return out


def vllm_graph_cases(p: dict, profile: str) -> list[GraphCase]:
    """The graph cases of vLLM's kernels for ``p`` (a ``vllm_triton.PROFILES`` entry plus dev and src)."""
    from .vllm_triton import _K

    src = p.get("src")
    kernels = {"insert": _K.get("quantize_and_insert_k_kernel", src),
               "decode": _K.get("_sparse_attn_decode_ragged_kernel", src)}

    def where(key):
        mod, name = _K.SOURCE[key]
        return src.provenance(mod, name) if src is not None else f"{mod}.{name}"

    attn_fn = f"{where('quantize_and_insert_k_kernel')} + {where('_sparse_attn_decode_ragged_kernel')}"
    route_fn = ("vllm.model_executor.layers.fused_moe.experts.gpt_oss_triton_kernels_moe."
                "_make_bitmatrix_metadata_pow2_safe / _stage2_pow2 (triton_kernels stage 1 and "
                "sum_bitmatrix_rows: harness stand-ins)")
    return [sparse_case(p, kernels, profile, attn_fn),
            routing_case(_K.get("bitmatrix_metadata", src), route_fn)]
