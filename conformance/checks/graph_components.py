"""Capturable reference components for the graph-replay check (issue 8), written from the spec (§3.3, §3.5,
§3.6, §3.8-§3.11); no vLLM code.

Each component is a plain torch function over tensors of the *captured* (padded) batch shape that never
reads a device value on the host and never allocates a tensor whose size depends on tensor *values*.
Metadata that a serving stack builds per step (SWA window slots, ragged index lists with an ``indptr``) is
written into buffers that are pre-allocated at the captured shape (``build_ragged_indices_from_dense_out``),
which is the fix the spec §7 names for the HIP-graph bug (``int(indptr[-1].item())`` + a dynamic
``torch.empty``).

Each component comes with
* ``make_input(seeds)``: CPU tensors of the captured shape drawn from independent per-group seeds
  (``values``, ``metadata``, ``topk``, ``padding``) plus the live batch size ``live``; rows ``>= live`` are
  padding rows filled with in-range garbage (sometimes of huge magnitude, like uninitialised memory).
  Re-drawing one group while keeping the others is how the harness probes for stale inputs and for
  padding-row dependence.
* ``eager(inputs)``: the component on device, fresh allocations, full padded batch.
* a ``StaticWrapper`` subclass: static input buffers of the captured shape, metadata into pre-allocated
  buffers; ``load(inputs)`` (outside the graph) and ``region()`` (the captured body).
* ``golden(inputs, dtype)``: per live row on CPU (float32 and float64), computed with the golden references
  (``references.components``) from the set definitions (no paging tricks, no ragged lists). The device
  components above are separate implementations: the golden never shares code with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from conformance.subjects.graph_api import GraphPiece
from references.components.attention import output_projection, sparse_attention
from references.components.indexer import indexer_scores as ref_indexer_scores
from references.components.moe import expert_ffn as ref_expert_ffn
from references.components.moe import gate_logits as ref_gate_logits
from references.components.moe import route as ref_route
from references.components.norms import rms_norm, unweighted_rms_norm
from references.components.rope import apply_rope as ref_rope
from references.components.rope import rope_inv_freq

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Dims:
    """Tiny DSV4-like sizes (as the TINY preset: H=8, head_dim=512, rope 64, window 128)."""
    B: int = 8            # captured (padded) batch
    H: int = 8            # attention heads
    D: int = 512          # head_dim (shared K=V)
    R: int = 64           # rope dims (trailing)
    W: int = 128          # sliding window
    BS: int = 64          # SWA cache block size (tokens)
    MAXB: int = 16        # blocks per request -> max seq len 1024
    K: int = 64           # compressed top-k capacity per query (index_topk, scaled down)
    RATIO: int = 4        # CSA compress ratio
    CBS: int = 64         # compressed cache block size (entries)
    MAXCB: int = 4        # compressed blocks per request -> 256 entries = 1024 / 4
    HI: int = 8           # indexer heads
    DI: int = 128         # indexer head dim
    DM: int = 256         # hidden size
    QL: int = 128         # q_lora_rank
    G: int = 2            # o_groups
    OL: int = 128         # o_lora_rank
    EPS: float = 1e-6
    THETA: float = 10000.0

    @property
    def max_seq(self) -> int:
        return self.BS * self.MAXB

    @property
    def NB(self) -> int:          # SWA cache blocks; the last one is a dummy block for padded slot writes
        return self.B * self.MAXB + 1

    @property
    def NCB(self) -> int:
        return self.B * self.MAXCB

    @property
    def scale(self) -> float:
        return self.D ** -0.5


DIMS = Dims()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) & 0x7FFFFFFF)


def _seq_lens(g: torch.Generator, n: int, d: Dims, short: bool = False) -> torch.Tensor:
    """Sequence lengths with the edges the window and causal bounds care about. ``short``: the kind of
    dummy batch a server captures with (lengths 1..160)."""
    if short:
        return torch.randint(1, 161, (n,), generator=g).to(torch.int32)
    edges = torch.tensor([1, 2, 3, 4, 5, d.W - 1, d.W, d.W + 1, 4 * d.K, 4 * d.K + 3, d.max_seq - 1,
                          d.max_seq])
    out = torch.randint(1, d.max_seq + 1, (n,), generator=g)
    pick = torch.rand(n, generator=g) < 0.35
    out[pick] = edges[torch.randint(0, len(edges), (int(pick.sum()),), generator=g)]
    return out.to(torch.int32)


def _topk_rows(g: torch.Generator, seq_lens: torch.Tensor, d: Dims) -> torch.Tensor:
    """Local compressed-entry indices, -1 padded, in one of several patterns per row (prefix / scattered /
    fewer than available / none). Entries are causal: i < floor(seq_len / ratio)."""
    n = seq_lens.shape[0]
    out = torch.full((n, d.K), -1, dtype=torch.int32)
    for b in range(n):
        nc = int(seq_lens[b]) // d.RATIO
        pattern = int(torch.randint(0, 4, (1,), generator=g))
        c = min(d.K, nc)
        if pattern == 2 and c > 0:
            c = int(torch.randint(0, c + 1, (1,), generator=g))
        if pattern == 3:
            c = 0
        sel = torch.randperm(max(nc, 1), generator=g)[:c].to(torch.int32)
        if pattern == 1:                      # scattered: -1 interleaved
            slots = torch.randperm(d.K, generator=g)[:c]
            out[b, slots] = sel
        else:
            out[b, :c] = sel
    return out


def _pad_magnitude(seeds: dict, gp: torch.Generator) -> float:
    """Scale of the garbage in padding rows: like uninitialised memory, sometimes huge; a negative padding
    seed gives zero-filled padding values (the benign case the padding probe compares against)."""
    if seeds["padding"] < 0:
        return 0.0
    return 100.0 if float(torch.rand(1, generator=gp)) < 0.5 else 1.0


# --------------------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------------------

def swa_slots(seq_lens: torch.Tensor, block_table: torch.Tensor, d: Dims) -> torch.Tensor:
    """[B, W] global SWA cache slots of the window {t-W+1 .. t} ∩ [0, t], t = seq_len-1; -1 where invalid."""
    pos = seq_lens.long() - 1
    j = torch.arange(d.W, device=seq_lens.device)
    tok = pos[:, None] - (d.W - 1) + j[None, :]
    valid = tok >= 0
    tokc = tok.clamp(min=0)
    blk = torch.gather(block_table.long(), 1, tokc // d.BS)
    slot = blk * d.BS + tokc % d.BS
    return torch.where(valid, slot, torch.full_like(slot, -1))


def comp_slots(topk: torch.Tensor, comp_block_table: torch.Tensor, d: Dims, offset: int) -> torch.Tensor:
    """Local compressed-entry indices -> global slots (+offset, so they live after the SWA slots)."""
    t = topk.long()
    tc = t.clamp(min=0)
    blk = torch.gather(comp_block_table.long(), 1, tc // d.CBS)
    slot = blk * d.CBS + tc % d.CBS + offset
    return torch.where(t >= 0, slot, torch.full_like(slot, -1))


def build_ragged_indices_from_dense_out(dense: torch.Tensor, indptr_out: torch.Tensor,
                                        ragged_out: torch.Tensor) -> None:
    """Dense [B, L] index rows (-1 anywhere) -> ragged list. Writes into pre-allocated buffers:
    ``indptr_out`` [B+1] (``indptr_out[0]`` must be 0, set once) and ``ragged_out`` [B*L + 1] whose last
    element is a dummy sink for the invalid entries. No host read, no data-sized allocation."""
    valid = dense >= 0
    counts = valid.sum(1)
    indptr_out[1:].copy_(torch.cumsum(counts, 0))
    rank = torch.cumsum(valid.long(), 1) - 1
    pos = indptr_out[:-1, None] + rank
    pos = torch.where(valid, pos, torch.full_like(pos, ragged_out.numel() - 1))
    ragged_out.scatter_(0, pos.reshape(-1), dense.reshape(-1).to(ragged_out.dtype))


def ragged_to_dense(indptr: torch.Tensor, ragged: torch.Tensor, L: int, n_ragged: int) -> torch.Tensor:
    """What a ragged attention kernel reads: row r takes ragged[indptr[r] : indptr[r+1]] (at most L), with a
    bounds guard at the buffer's valid length ``n_ragged`` (a shape, like a Triton kernel's n_elements)."""
    j = torch.arange(L, device=ragged.device)
    start = indptr[:-1]
    cnt = indptr[1:] - start
    p = start[:, None] + j[None, :]
    ok = (j[None, :] < cnt[:, None]) & (p < n_ragged)
    idx = ragged[p.clamp(min=0, max=ragged.numel() - 1)]
    return torch.where(ok, idx, torch.full_like(idx, -1))


def attn_core(q: torch.Tensor, idx: torch.Tensor, kv_flat: torch.Tensor, extra_flat: torch.Tensor | None,
              n_main: int, sink: torch.Tensor, scale: float, stabiliser: str = "row") -> torch.Tensor:
    """Sparse attention with a sink (§3.10). q [B,H,D]; idx [B,L] (-1 invalid; >= n_main addresses
    ``extra_flat``). stabiliser="row" is the correct per-(row, head) running max; "batch" (a mutant) takes
    the max over the whole padded batch, so live rows depend on padding rows."""
    valid = idx >= 0
    if extra_flat is not None:
        is_x = idx >= n_main
        i_m = torch.where(valid & ~is_x, idx, torch.zeros_like(idx))
        i_x = torch.where(valid & is_x, idx - n_main, torch.zeros_like(idx))
        kv = torch.where(is_x[..., None], extra_flat[i_x], kv_flat[i_m])
    else:
        kv = kv_flat[torch.where(valid, idx, torch.zeros_like(idx))]
    scores = torch.einsum("bhd,bld->bhl", q, kv) * scale
    scores = scores.masked_fill(~valid[:, None, :], NEG_INF)
    if stabiliser == "row":
        m = torch.maximum(scores.amax(-1), sink[None, :])
    else:
        m = torch.maximum(scores.amax(), sink.amax()).expand(scores.shape[:2])
    p = torch.exp(scores - m[..., None])
    denom = p.sum(-1) + torch.exp(sink[None, :] - m)
    return torch.einsum("bhl,bld->bhd", p, kv) / denom[..., None]


def rope_cos_sin(positions: torch.Tensor, d: Dims) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain RoPE (SWA-only layer: theta 10000, no YaRN, §3.3); fp32 tables."""
    i = torch.arange(d.R // 2, device=positions.device, dtype=torch.float64)
    omega = (d.THETA ** (-2.0 * i / d.R)).to(torch.float32)
    phi = positions.to(torch.float32)[:, None] * omega[None, :]
    return torch.cos(phi), torch.sin(phi)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, d: Dims) -> torch.Tensor:
    """Interleaved (GPT-J) rotation of the trailing R dims; cos/sin broadcast over leading dims."""
    nope, rope = x[..., : d.D - d.R], x[..., d.D - d.R:]
    a, b = rope[..., 0::2], rope[..., 1::2]
    ra = a * cos - b * sin
    rb = a * sin + b * cos
    return torch.cat([nope, torch.stack([ra, rb], -1).flatten(-2)], -1)


def rmsnorm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * w if w is not None else y


def to_device(inputs: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def clone_inputs(inputs: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


class StaticWrapper:
    """Makes a component capturable: every tensor input is copied into a static buffer of the captured shape
    (``load``, outside the graph); ``region`` reads only those buffers and pre-allocated metadata buffers."""

    input_keys: tuple[str, ...] = ()

    def __init__(self, example: dict, device, dims: Dims = DIMS):
        self.d = dims
        self.device = device
        self.static = {k: torch.zeros_like(example[k], device=device) for k in self.input_keys}
        self.loads = 0

    def load(self, inputs: dict) -> None:
        """Copies the keys present (a multi-step case loads only its per-step keys after step 0)."""
        for k in self.input_keys:
            if k in inputs:
                self.static[k].copy_(inputs[k])
        self.loads += 1

    def region(self) -> dict:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------------
# 1. sparse attention decode: SWA window (paged) + compressed top-k (-1 padded), ragged list, attention sink
# --------------------------------------------------------------------------------------------------------

SPARSE_KEYS = ("q", "swa_cache", "comp_cache", "block_table", "comp_block_table", "seq_lens", "topk", "sink")


def sparse_make_input(seeds: dict, d: Dims = DIMS) -> dict:
    B, live = int(seeds.get("batch", d.B)), int(seeds["live"])
    gv, gm, gt, gp = (_gen(seeds[k]) for k in ("values", "metadata", "topk", "padding"))
    q = torch.randn(B, d.H, d.D, generator=gv) * 1.5
    swa_cache = torch.randn(d.NB, d.BS, d.D, generator=gv)
    comp_cache = torch.randn(d.NCB, d.CBS, d.D, generator=gv)
    sink = torch.randn(d.H, generator=gv)
    seq = _seq_lens(gm, B, d, bool(seeds.get("short")))
    bt = torch.randperm(d.NB - 1, generator=gm)[: B * d.MAXB].view(B, d.MAXB).to(torch.int32)
    cbt = torch.randperm(d.NCB, generator=gm)[: B * d.MAXCB].view(B, d.MAXCB).to(torch.int32)
    topk = _topk_rows(gt, seq, d)
    npad = B - live
    if npad:                                  # padding rows: in-range garbage, sometimes huge values
        mag = _pad_magnitude(seeds, gp)
        q[live:] = torch.randn(npad, d.H, d.D, generator=gp) * mag
        seq[live:] = torch.randint(0, d.max_seq + 1, (npad,), generator=gp).to(torch.int32)
        bt[live:] = torch.randint(0, d.NB, (npad, d.MAXB), generator=gp).to(torch.int32)
        cbt[live:] = torch.randint(0, d.NCB, (npad, d.MAXCB), generator=gp).to(torch.int32)
        topk[live:] = torch.randint(-1, d.MAXCB * d.CBS, (npad, d.K), generator=gp).to(torch.int32)
    return dict(q=q, swa_cache=swa_cache, comp_cache=comp_cache, block_table=bt, comp_block_table=cbt,
                seq_lens=seq, topk=topk, sink=sink, live=live)


def sparse_dense_indices(seq_lens, block_table, topk, comp_block_table, d: Dims = DIMS) -> torch.Tensor:
    n_swa = d.NB * d.BS
    return torch.cat([swa_slots(seq_lens, block_table, d),
                      comp_slots(topk, comp_block_table, d, offset=n_swa)], 1)


def sparse_attn_decode(q, swa_cache, comp_cache, block_table, comp_block_table, seq_lens, topk, sink, *,
                       indptr_out=None, ragged_out=None, stabiliser="row", d: Dims = DIMS) -> torch.Tensor:
    """The component: dense (SWA ‖ compressed) indices -> ragged list -> ragged sparse attention with sink.
    With no buffers given (eager), it allocates them at the captured shape (a shape, not a value)."""
    B = q.shape[0]
    L = d.W + d.K
    dense = sparse_dense_indices(seq_lens, block_table, topk, comp_block_table, d)
    if indptr_out is None:
        indptr_out = torch.zeros(B + 1, dtype=torch.long, device=q.device)
        ragged_out = torch.empty(B * L + 1, dtype=torch.long, device=q.device)
    build_ragged_indices_from_dense_out(dense, indptr_out, ragged_out)
    idx = ragged_to_dense(indptr_out, ragged_out, L, ragged_out.numel() - 1)
    return attn_core(q, idx, swa_cache.reshape(-1, d.D), comp_cache.reshape(-1, d.D), d.NB * d.BS, sink,
                     d.scale, stabiliser)


def sparse_eager(inputs: dict, d: Dims = DIMS, stabiliser: str = "row") -> dict:
    return {"out": sparse_attn_decode(*(inputs[k] for k in SPARSE_KEYS), stabiliser=stabiliser, d=d)}


class SparseAttnWrapper(StaticWrapper):
    input_keys = SPARSE_KEYS
    stabiliser = "row"

    def __init__(self, example, device, dims: Dims = DIMS):
        super().__init__(example, device, dims)
        B, L = example["q"].shape[0], dims.W + dims.K
        self.indptr = torch.zeros(B + 1, dtype=torch.long, device=device)       # indptr[0] = 0 once
        self.ragged = torch.empty(B * L + 1, dtype=torch.long, device=device)

    def region(self) -> dict:
        s = self.static
        return {"out": sparse_attn_decode(*(s[k] for k in SPARSE_KEYS), indptr_out=self.indptr,
                                          ragged_out=self.ragged, stabiliser=self.stabiliser, d=self.d)}


def sparse_selected_rows(inputs: dict, b: int, d: Dims = DIMS) -> torch.Tensor:
    """The set S of kv rows query b attends to, straight from §3.9 (window ∪ top-k), as [|S|, D]."""
    t = int(inputs["seq_lens"][b]) - 1
    toks = torch.arange(max(0, t - d.W + 1), t + 1)
    parts = [inputs["swa_cache"][inputs["block_table"][b, toks // d.BS].long(), toks % d.BS]]
    ents = inputs["topk"][b].long()
    ents = ents[ents >= 0]
    parts.append(inputs["comp_cache"][inputs["comp_block_table"][b, ents // d.CBS].long(), ents % d.CBS])
    return torch.cat(parts)


def attn_golden_row(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """The golden sparse attention (references.components.attention, spec §3.10) of one query's heads
    [H, d] over its selected rows kv [|S|, d]."""
    idx = torch.arange(kv.shape[0])[None, :]
    if kv.shape[0] == 0:
        kv, idx = q.new_zeros(1, q.shape[-1]), torch.full((1, 1), -1)
    return sparse_attention(q[None], kv, idx, sink, scale=scale)[0]


def sparse_golden(inputs: dict, dtype=torch.float64, d: Dims = DIMS) -> dict:
    x = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
         for k, v in inputs.items()}
    out = torch.zeros(inputs["live"], d.H, d.D, dtype=dtype)
    for b in range(inputs["live"]):
        out[b] = attn_golden_row(x["q"][b], sparse_selected_rows(x, b, d), x["sink"], d.scale)
    return {"out": out}


def sparse_ragged_size(inputs: dict, d: Dims = DIMS) -> int:
    """Live ragged size of the whole padded batch (what ``indptr[-1]`` holds)."""
    dense = sparse_dense_indices(inputs["seq_lens"], inputs["block_table"], inputs["topk"],
                                 inputs["comp_block_table"], d)
    return int((dense >= 0).sum())


# --------------------------------------------------------------------------------------------------------
# 2. indexer top-k over the causal bound (§3.8): I[s] = Σ_h w_h ReLU(q_h·K_s), s < floor((t+1)/4)
# --------------------------------------------------------------------------------------------------------

INDEXER_KEYS = ("q", "w", "k_cache", "comp_block_table", "seq_lens")


def indexer_make_input(seeds: dict, d: Dims = DIMS) -> dict:
    B, live = int(seeds.get("batch", d.B)), int(seeds["live"])
    gv, gm, gp = (_gen(seeds[k]) for k in ("values", "metadata", "padding"))
    q = torch.randn(B, d.HI, d.DI, generator=gv)
    w = torch.randn(B, d.HI, generator=gv) * (d.DI ** -0.5) * (d.HI ** -0.5)
    k_cache = torch.randn(d.NCB, d.CBS, d.DI, generator=gv)
    seq = _seq_lens(gm, B, d, bool(seeds.get("short")))
    cbt = torch.randperm(d.NCB, generator=gm)[: B * d.MAXCB].view(B, d.MAXCB).to(torch.int32)
    npad = B - live
    if npad:
        mag = _pad_magnitude(seeds, gp)
        q[live:] = torch.randn(npad, d.HI, d.DI, generator=gp) * mag
        w[live:] = torch.randn(npad, d.HI, generator=gp) * mag
        seq[live:] = torch.randint(0, d.max_seq + 1, (npad,), generator=gp).to(torch.int32)
        cbt[live:] = torch.randint(0, d.NCB, (npad, d.MAXCB), generator=gp).to(torch.int32)
    return dict(q=q, w=w, k_cache=k_cache, comp_block_table=cbt, seq_lens=seq, live=live)


def indexer_scores(q, w, k_cache, comp_block_table, seq_lens, d: Dims = DIMS) -> torch.Tensor:
    B = q.shape[0]
    S = d.MAXCB * d.CBS
    s = torch.arange(S, device=q.device)
    slot = torch.gather(comp_block_table.long(), 1, (s // d.CBS)[None, :].expand(B, S)) * d.CBS + s % d.CBS
    k = k_cache.reshape(-1, d.DI)[slot]                                 # [B, S, DI]
    logits = torch.relu(torch.einsum("bhd,bsd->bhs", q, k))
    score = torch.einsum("bh,bhs->bs", w, logits)
    n = seq_lens.long() // d.RATIO                                      # floor((t+1)/4), t = seq_len-1
    return score.masked_fill(s[None, :] >= n[:, None], NEG_INF)


def indexer_topk(q, w, k_cache, comp_block_table, seq_lens, *, k: int | None = None,
                 d: Dims = DIMS) -> torch.Tensor:
    """Top-k entry indices per row (k = the captured capacity; fewer valid -> -1), sorted ascending."""
    score = indexer_scores(q, w, k_cache, comp_block_table, seq_lens, d)
    vals, idx = score.topk(k or d.K, dim=-1)
    idx = torch.where(vals == NEG_INF, torch.full_like(idx, -1), idx)
    return idx.sort(-1).values


def indexer_eager(inputs: dict, d: Dims = DIMS) -> dict:
    return {"idx": indexer_topk(*(inputs[k] for k in INDEXER_KEYS), d=d)}


class IndexerWrapper(StaticWrapper):
    input_keys = INDEXER_KEYS

    def region(self) -> dict:
        s = self.static
        return {"idx": indexer_topk(*(s[k] for k in INDEXER_KEYS), d=self.d)}


def indexer_golden_scores(inputs: dict, dtype, d: Dims = DIMS) -> list[torch.Tensor]:
    """Per live row: the scores of the causally visible entries 0..n-1 (spec math, unpaged)."""
    out = []
    for b in range(inputs["live"]):
        n = int(inputs["seq_lens"][b]) // d.RATIO
        q = inputs["q"][b].to(dtype)
        w = inputs["w"][b].to(dtype)
        ks = []
        for s in range(n):
            blk = int(inputs["comp_block_table"][b, s // d.CBS])
            ks.append(inputs["k_cache"][blk, s % d.CBS].to(dtype))
        if not ks:
            out.append(torch.zeros(0, dtype=dtype))
            continue
        out.append(ref_indexer_scores(q[None], torch.stack(ks), w[None])[0])
    return out


def indexer_golden(inputs: dict, dtype=torch.float64, d: Dims = DIMS) -> dict:
    scores = indexer_golden_scores(inputs, dtype, d)
    idx = torch.full((inputs["live"], d.K), -1, dtype=torch.long)
    for b, sc in enumerate(scores):
        c = min(d.K, sc.numel())
        if c:
            sel = torch.sort(torch.topk(sc, c).indices).values
            idx[b, d.K - c:] = sel
    return {"idx": idx, "scores": scores}


# --------------------------------------------------------------------------------------------------------
# 3. a whole decode step of a small DSV4-like SWA attention block (§3.5, §3.6, §3.10, §3.11)
# --------------------------------------------------------------------------------------------------------

DECODE_KEYS = ("x", "positions", "block_table", "slot_mapping", "swa_cache")
DECODE_METADATA = ("positions", "block_table", "slot_mapping")


def decode_weights(seed: int = 1234, d: Dims = DIMS) -> dict:
    g = _gen(seed)

    def lin(o, i):
        return torch.randn(o, i, generator=g) * i ** -0.5

    return {
        "attn.wq_a": lin(d.QL, d.DM), "attn.q_norm": 1 + 0.1 * torch.randn(d.QL, generator=g),
        "attn.wq_b": lin(d.H * d.D, d.QL), "attn.wkv": lin(d.D, d.DM),
        "attn.kv_norm": 1 + 0.1 * torch.randn(d.D, generator=g),
        "attn.attn_sink": torch.randn(d.H, generator=g),
        "attn.wo_a": lin(d.G * d.OL, d.H * d.D // d.G), "attn.wo_b": lin(d.DM, d.G * d.OL),
    }


def decode_make_input(seeds: dict, d: Dims = DIMS) -> dict:
    B, live = int(seeds.get("batch", d.B)), int(seeds["live"])
    gv, gm, gp = (_gen(seeds[k]) for k in ("values", "metadata", "padding"))
    x = torch.randn(B, d.DM, generator=gv)
    swa_cache = torch.randn(d.NB, d.BS, d.D, generator=gv)
    pos = (_seq_lens(gm, B, d, bool(seeds.get("short"))) - 1).long()
    bt = torch.randperm(d.NB - 1, generator=gm)[: B * d.MAXB].view(B, d.MAXB).to(torch.int32)
    slot = torch.gather(bt.long(), 1, (pos // d.BS)[:, None])[:, 0] * d.BS + pos % d.BS
    npad = B - live
    if npad:
        mag = _pad_magnitude(seeds, gp)
        x[live:] = torch.randn(npad, d.DM, generator=gp) * mag
        pos[live:] = torch.randint(0, d.max_seq, (npad,), generator=gp)
        bt[live:] = torch.randint(0, d.NB, (npad, d.MAXB), generator=gp).to(torch.int32)
        slot[live:] = -1                                          # padded slots are not written
    return dict(x=x, positions=pos, block_table=bt, slot_mapping=slot, swa_cache=swa_cache, live=live)


def per_tensor_fp8(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic per-tensor FP8 e4m3 quantize-dequantize (scale = amax/448 over the whole tensor, or over the
    rows where ``rows`` is True)."""
    a = x.abs() if rows is None else torch.where(rows[:, None], x.abs(), torch.zeros_like(x))
    s = a.amax().clamp(min=1e-12) / 448.0
    return (x / s).to(torch.float8_e4m3fn).to(x.dtype) * s


def decode_pre(x, positions, slot_mapping, swa_cache, weights: dict, *, x_quant: str = "none",
               d: Dims = DIMS) -> dict:
    """Decode step, first piece: q / kv projections, norms, RoPE, paged cache write (in place; padded slots go
    to the dummy block). Returns q and the RoPE tables the later pieces use."""
    W = weights
    B = x.shape[0]
    if x_quant == "per-tensor":              # mutant: the scale spans the padded batch
        x = per_tensor_fp8(x)
    elif x_quant == "per-tensor-live":       # the same quantisation, scale over the live rows (slot >= 0)
        x = per_tensor_fp8(x, rows=slot_mapping >= 0)
    qr = rmsnorm(x @ W["attn.wq_a"].T, W["attn.q_norm"], d.EPS)
    q = (qr @ W["attn.wq_b"].T).view(B, d.H, d.D)
    q = rmsnorm(q, None, d.EPS)
    kv = rmsnorm(x @ W["attn.wkv"].T, W["attn.kv_norm"], d.EPS)
    cos, sin = rope_cos_sin(positions, d)
    q = apply_rope(q, cos[:, None, :], sin[:, None, :], d)
    kv = apply_rope(kv, cos, sin, d)
    flat = swa_cache.view(-1, d.D)
    flat.index_copy_(0, decode_slots(slot_mapping, d), kv)
    return {"q": q, "cos": cos, "sin": sin}


def decode_slots(slot_mapping, d: Dims = DIMS):
    dummy = (d.NB - 1) * d.BS
    return torch.where(slot_mapping >= 0, slot_mapping, torch.full_like(slot_mapping, dummy))


def decode_attn(q, positions, block_table, swa_cache, weights: dict, *, stabiliser="row",
                d: Dims = DIMS) -> torch.Tensor:
    """Decode step, attention piece: window-128 attention with sink over the paged cache."""
    idx = swa_slots(positions + 1, block_table, d)
    return attn_core(q, idx, swa_cache.view(-1, d.D), None, 0, weights["attn.attn_sink"], d.scale, stabiliser)


def decode_post(o, cos, sin, slot_mapping, swa_cache, weights: dict, d: Dims = DIMS) -> dict:
    """Decode step, last piece: inverse RoPE, grouped low-rank output projection; also the written kv rows."""
    W = weights
    B = o.shape[0]
    o = apply_rope(o, cos[:, None, :], -sin[:, None, :], d)                    # inverse RoPE
    z = torch.einsum("bgk,grk->bgr", o.reshape(B, d.G, -1), W["attn.wo_a"].view(d.G, d.OL, -1))
    y = z.reshape(B, d.G * d.OL) @ W["attn.wo_b"].T
    return {"out": y, "kv": swa_cache.view(-1, d.D)[decode_slots(slot_mapping, d)]}


def decode_step(x, positions, block_table, slot_mapping, swa_cache, weights: dict, *, stabiliser="row",
                x_quant: str = "none", d: Dims = DIMS) -> dict:
    """One decode step of an SWA attention block (sink, window 128). Writes the new kv into ``swa_cache``
    (in place, padded slots go to the dummy block) and returns the block output and the written kv rows.
    The three pieces (``decode_pre``, ``decode_attn``, ``decode_post``) are where piecewise capture splits."""
    p = decode_pre(x, positions, slot_mapping, swa_cache, weights, x_quant=x_quant, d=d)
    o = decode_attn(p["q"], positions, block_table, swa_cache, weights, stabiliser=stabiliser, d=d)
    return decode_post(o, p["cos"], p["sin"], slot_mapping, swa_cache, weights, d)


class DecodeStepWrapper(StaticWrapper):
    input_keys = DECODE_KEYS

    def __init__(self, example, device, dims: Dims = DIMS, weights: dict | None = None, mode: str = "full"):
        super().__init__(example, device, dims)
        self.weights = {k: v.to(device) for k, v in weights.items()}
        self.mode = mode

    def region(self) -> dict:
        s = self.static
        return decode_step(*(s[k] for k in DECODE_KEYS), self.weights, d=self.d)

    def pieces(self) -> list:
        """Piecewise capture: projections + cache write (graph), attention (eager), output projection
        (graph); the same functions as ``decode_step``, so replays stay bitwise equal to eager."""
        s, w, d = self.static, self.weights, self.d
        return [
            GraphPiece("qkv+rope+cache-write", lambda prev: decode_pre(s["x"], s["positions"], s["slot_mapping"],
                                                                       s["swa_cache"], w, d=d)),
            GraphPiece("attention", lambda prev: dict(prev, o=decode_attn(prev["q"], s["positions"],
                                                                          s["block_table"], s["swa_cache"], w,
                                                                          d=d)), capture=False),
            GraphPiece("o-proj", lambda prev: decode_post(prev["o"], prev["cos"], prev["sin"], s["slot_mapping"],
                                                          s["swa_cache"], w, d)),
        ]


def decode_golden(inputs: dict, weights: dict, dtype=torch.float64, d: Dims = DIMS) -> dict:
    """The golden decode step per live row, from the references (norms, RoPE, sparse attention, output
    projection; spec §3.5, §3.6, §3.10, §3.11), over the window read back from the cache by token index."""
    W = {k: v.to(dtype) for k, v in weights.items()}
    live = inputs["live"]
    outs, kvs = [], []
    inv_freq = rope_inv_freq(d.R, d.THETA, None)          # SWA-only layer: plain RoPE, no YaRN
    for b in range(live):
        x = inputs["x"][b].to(dtype)
        t = inputs["positions"][b:b + 1]
        qr = rms_norm(W["attn.wq_a"] @ x, W["attn.q_norm"], d.EPS)
        q = unweighted_rms_norm((W["attn.wq_b"] @ qr).view(d.H, d.D), d.EPS)
        kv = rms_norm(W["attn.wkv"] @ x, W["attn.kv_norm"], d.EPS)
        q = ref_rope(q[None], t, inv_freq, d.R)[0]
        kv = ref_rope(kv[None], t, inv_freq, d.R)[0]
        pos = int(t)
        toks = torch.arange(max(0, pos - d.W + 1), pos)
        old = inputs["swa_cache"][inputs["block_table"][b, toks // d.BS].long(), toks % d.BS].to(dtype)
        rows = torch.cat([old, kv[None]])                      # the window: earlier tokens + this one
        o = attn_golden_row(q, rows, W["attn.attn_sink"], d.scale)
        outs.append(output_projection(o[None], t, inv_freq, W["attn.wo_a"], W["attn.wo_b"], o_groups=d.G,
                                      rope_dim=d.R)[0])
        kvs.append(kv)
    z = torch.zeros(0, dtype=dtype)
    return {"out": torch.stack(outs) if outs else z, "kv": torch.stack(kvs) if kvs else z}


def decode_ragged_size(inputs: dict, d: Dims = DIMS) -> int:
    idx = swa_slots(inputs["positions"] + 1, inputs["block_table"], d)
    return int((idx >= 0).sum())


# --------------------------------------------------------------------------------------------------------
# 4. multi-step decode: the decode step run for several steps, positions advancing, the cache growing
# --------------------------------------------------------------------------------------------------------

DECODE_STEP_KEYS = ("x", "positions", "block_table", "slot_mapping")     # reloaded every step; the cache is not


def decode_multistep_make_input(seeds: dict, steps: int, d: Dims = DIMS) -> dict:
    """Step-0 inputs of a ``steps``-step decode: live positions leave room for the later steps."""
    x = decode_make_input(seeds, d)
    live = x["live"]
    pos = x["positions"]
    pos[:live] = pos[:live].clamp(max=d.max_seq - steps)
    bt = x["block_table"]
    x["slot_mapping"][:live] = (torch.gather(bt[:live].long(), 1, (pos[:live] // d.BS)[:, None])[:, 0] * d.BS
                                + pos[:live] % d.BS)
    x["step_seed"] = int(seeds["values"]) ^ 0x5DEECE
    return x


def decode_advance(x: dict, step: int, eager_out: dict, d: Dims = DIMS) -> dict:
    """The next step's inputs: the kv rows the step wrote go into the (CPU) cache the golden reads, live
    positions advance by one (crossing block boundaries through the block table), new hidden states, fresh
    garbage in the padding rows."""
    live, B = x["live"], x["x"].shape[0]
    g = _gen(x["step_seed"] * 31 + step)
    new = dict(x)
    cache = x["swa_cache"].clone()
    flat = cache.view(-1, d.D)
    flat[x["slot_mapping"][:live]] = eager_out["kv"][:live].to(flat.dtype)
    new["swa_cache"] = cache
    pos = x["positions"].clone()
    pos[:live] += 1
    slot = x["slot_mapping"].clone()
    bt = x["block_table"]
    slot[:live] = torch.gather(bt[:live].long(), 1, (pos[:live] // d.BS)[:, None])[:, 0] * d.BS + pos[:live] % d.BS
    xx = torch.randn(B, d.DM, generator=g)
    if B > live:
        xx[live:] = torch.randn(B - live, d.DM, generator=g) * 100.0
        pos[live:] = torch.randint(0, d.max_seq, (B - live,), generator=g)
        slot[live:] = -1
    new.update(x=xx, positions=pos, slot_mapping=slot)
    return new


# --------------------------------------------------------------------------------------------------------
# 5. a small MoE block: router (sqrt-softplus scores + bias, top-k, renormalised) + SwiGLU experts
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MoeDims:
    D: int = 64           # hidden
    E: int = 8            # routed experts
    K: int = 2            # experts per token
    I: int = 32           # expert intermediate size  # noqa: E741
    SCALE: float = 1.5    # route scale
    LIMIT: float = 7.0    # SwiGLU clamp


MOE = MoeDims()
MOE_KEYS = ("x",)


def moe_weights(seed: int = 4321, m: MoeDims = MOE) -> dict:
    g = _gen(seed)
    return {"gate": torch.randn(m.E, m.D, generator=g) * m.D ** -0.5,
            "bias": 0.1 * torch.randn(m.E, generator=g),
            "w1": torch.randn(m.E, m.I, m.D, generator=g) * m.D ** -0.5,
            "w3": torch.randn(m.E, m.I, m.D, generator=g) * m.D ** -0.5,
            "w2": torch.randn(m.E, m.D, m.I, generator=g) * m.I ** -0.5}


def moe_make_input(seeds: dict, m: MoeDims = MOE) -> dict:
    B, live = int(seeds.get("batch", DIMS.B)), int(seeds["live"])
    gv, gp = _gen(seeds["values"]), _gen(seeds["padding"])
    x = torch.randn(B, m.D, generator=gv)
    if B > live:
        x[live:] = torch.randn(B - live, m.D, generator=gp) * _pad_magnitude(seeds, gp)
    return dict(x=x, live=live)


def moe_forward(x: torch.Tensor, weights: dict, *, routing: str = "row", m: MoeDims = MOE) -> dict:
    """Static-shape MoE: every expert on every token, combined through a dense [B, E] routing-weight matrix
    (zero for unselected experts), so nothing depends on data-sized allocations. ``routing="batch-bias"``
    (a mutant) centres the router logits on the padded batch's mean, so live rows depend on padding rows."""
    W = weights
    logits = x @ W["gate"].T
    if routing == "batch-bias":
        logits = logits - logits.mean(0, keepdim=True)
    scores = torch.sqrt(torch.nn.functional.softplus(logits))
    ids = torch.topk(scores + W["bias"], m.K, dim=-1).indices
    w = scores.gather(-1, ids)
    w = w / w.sum(-1, keepdim=True) * m.SCALE
    dense_w = torch.zeros_like(scores).scatter(1, ids, w)
    h = torch.einsum("bd,eid->bei", x, W["w1"]).clamp(max=m.LIMIT)
    u = torch.einsum("bd,eid->bei", x, W["w3"]).clamp(min=-m.LIMIT, max=m.LIMIT)
    a = torch.nn.functional.silu(h) * u * dense_w[..., None]
    return {"out": torch.einsum("bei,edi->bd", a, W["w2"]), "ids": ids.sort(-1).values}


class MoeWrapper(StaticWrapper):
    input_keys = MOE_KEYS

    def __init__(self, example, device, dims: Dims = DIMS, weights: dict | None = None):
        super().__init__(example, device, dims)
        self.weights = {k: v.to(device) for k, v in weights.items()}

    def region(self) -> dict:
        return moe_forward(self.static["x"], self.weights)


def moe_golden(inputs: dict, weights: dict, dtype=torch.float64, m: MoeDims = MOE) -> dict:
    """Per live token from the references (§3.13: gate logits, sqrt-softplus routing with bias, SwiGLU
    experts with the clamp, route weight applied before W2), experts summed in selection order."""
    W = {k: v.to(dtype) for k, v in weights.items()}
    live = inputs["live"]
    x = inputs["x"][:live].to(dtype)
    if live == 0:
        return {"out": torch.zeros(0, dtype=dtype)}
    wts, ids = ref_route(ref_gate_logits(x, W["gate"]), bias=W["bias"], topk=m.K, route_scale=m.SCALE)
    out = torch.zeros(live, m.D, dtype=dtype)
    for t in range(live):
        for j in range(m.K):
            e = int(ids[t, j])
            out[t] += ref_expert_ffn(x[t], W["w1"][e], W["w3"][e], W["w2"][e], limit=m.LIMIT,
                                     route_weight=wts[t, j])
    return {"out": out}
