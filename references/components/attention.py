"""DSV4 attention (spec 3.5, 3.6, 3.9, 3.10, 3.11): query path, shared K=V projection, the attended set,
the sparse attention core with a per-head sink, the output path, and the whole layer for SWA / CSA /
HCA with an incremental-decode state.

Index convention of the attention core: ``kv`` is one [N, d] tensor; ``indices`` [T, K] pick rows of
it, -1 means "no entry". :func:`attention_set` builds such indices over ``cat(token_kv, compressed_kv)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import DSV4Config
from ..numerics import GOLDEN, Numerics
from ._checks import compute_dtype, finite, float_tensor, index_tensor, round_act, shape_is
from .compressor import COMPRESS_VARIANTS, CompressorState, compress
from .indexer import causal_bound, indexer_q, indexer_topk_chunked, indexer_weights
from .norms import RMS_NORM_VARIANTS, rms_norm, unweighted_rms_norm
from .qat import linear, quant_kv_nope
from .rope import ROPE_VARIANTS, apply_rope, layer_inv_freq

LAYER_TYPES = {
    "sliding_attention": "swa",
    "compressed_sparse_attention": "csa",
    "heavily_compressed_attention": "hca",
    "swa": "swa",
    "csa": "csa",
    "hca": "hca",
}


# -- projections -----------------------------------------------------------------------------------
def query_path(
    x: torch.Tensor,
    wq_a: torch.Tensor,
    q_norm: torch.Tensor,
    wq_b: torch.Tensor,
    *,
    n_heads: int,
    eps: float,
    numerics: Numerics = GOLDEN,
    norm_variant: str = "official",
    head_norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``qr = q_norm(wq_a x)`` [T, q_lora] (shared with the indexer) and ``q = headnorm(wq_b qr)``
    [T, H, d]: per-head UNWEIGHTED RMSNorm, not yet roped. wq_a / wq_b are FP8 linears
    (``numerics.linear_act``); ``numerics.act_dtype`` rounds at OFF's bf16 tensor boundaries.

    ``head_norm=False``: DeepSeek-V4.1, ``q = wq_b qr`` with no per-head norm (vLLM
    ``models/deepseek_v41/attention.py:1082`` passes ``apply_q_norm`` False to the fused q / KV op, "qr is normed
    before wq_b", and ``:1109``, ``:1127`` on the bf16 / fp8 caches; ``nvidia/flash_mla_mega_attn.py:356``,
    ``:457`` ``enable_q_norm`` False), where V4 normalises each head (``models/deepseek_v4/attention.py:795-809``)."""
    float_tensor("x", x, ndim=2)
    finite("x", x)
    shape_is("wq_a", wq_a, (wq_a.shape[0], x.shape[1]))
    shape_is("q_norm", q_norm, (wq_a.shape[0],))
    float_tensor("wq_b", wq_b, ndim=2, last=wq_a.shape[0])
    if wq_b.shape[0] % n_heads:
        raise ValueError(f"wq_b: {wq_b.shape[0]} rows do not split into n_heads={n_heads}")
    qr = round_act(
        rms_norm(round_act(linear(x, wq_a, numerics), numerics), q_norm, eps, norm_variant), numerics
    )
    q = round_act(linear(qr, wq_b, numerics), numerics).view(x.shape[0], n_heads, -1)
    return qr, (round_act(unweighted_rms_norm(q, eps), numerics) if head_norm else q)


def kv_projection(
    x: torch.Tensor,
    wkv: torch.Tensor,
    kv_norm: torch.Tensor,
    *,
    eps: float,
    numerics: Numerics = GOLDEN,
    norm_variant: str = "official",
) -> torch.Tensor:
    """``kv = kv_norm(wkv x)`` [T, d], the single shared K=V head, not yet roped or quantised
    (:func:`attention_layer` then ropes the last 64 dims and applies ``numerics.kv_nope``)."""
    float_tensor("x", x, ndim=2)
    finite("x", x)
    shape_is("wkv", wkv, (wkv.shape[0], x.shape[1]))
    shape_is("kv_norm", kv_norm, (wkv.shape[0],))
    return round_act(
        rms_norm(round_act(linear(x, wkv, numerics), numerics), kv_norm, eps, norm_variant), numerics
    )


# -- the attended set ------------------------------------------------------------------------------
def swa_indices(positions: torch.Tensor, window: int) -> torch.Tensor:
    """Sliding window of each query: positions ``t - window + 1 .. t`` (ascending, the query itself
    last), -1 where negative -> [T, window] long. These are token POSITIONS (subtract a buffer's start
    position to index a cache holding only recent tokens)."""
    index_tensor("positions", positions, ndim=1)
    if window <= 0:
        raise ValueError(f"window: must be positive, got {window}")
    idx = positions.long()[:, None] - window + 1 + torch.arange(window)[None, :]
    return torch.where(idx >= 0, idx, torch.full_like(idx, -1))


def attention_set(
    layer_type: str,
    positions: torch.Tensor,
    window: int,
    ratio: int,
    topk_idx: torch.Tensor | None = None,
    *,
    token_offset: int = 0,
    compressed_offset: int | None = None,
) -> torch.Tensor:
    """Indices [T, window (+ K_c)] into ``cat(token_kv, compressed_kv)`` (spec 3.9), -1 = none.

    * swa: the window only.
    * hca: window + every compressed entry i < floor((t+1)/ratio), columns 0..max-1.
    * csa: window + the indexer's ``topk_idx`` [T, k] (entry numbers, -1 allowed); entries at or past
      the causal bound are refused (a leak of future tokens).
    Token rows are ``position - token_offset``; compressed entry i is row ``compressed_offset + i``
    (default: right after the tokens up to the largest position).
    """
    kind = LAYER_TYPES.get(layer_type)
    if kind is None:
        raise ValueError(f"layer_type: {layer_type!r} not in {sorted(LAYER_TYPES)}")
    sw = swa_indices(positions, window)
    if (sw[:, -1] < token_offset).any():
        raise ValueError(f"token_offset: {token_offset} is past a query position")
    sw = torch.where(sw >= token_offset, sw - token_offset, torch.full_like(sw, -1))
    if kind == "swa":
        return sw
    if ratio <= 1:
        raise ValueError(f"ratio: {kind} layers need ratio > 1, got {ratio}")
    if compressed_offset is None:
        compressed_offset = int(positions.max()) + 1 - token_offset
    bound = causal_bound(positions, ratio)  # [T]
    if kind == "hca":
        comp = torch.arange(int(bound.max()))[None, :].expand(positions.shape[0], -1)
        visible = comp < bound[:, None]
    else:
        if topk_idx is None:
            raise ValueError("topk_idx: required for csa layers")
        index_tensor("topk_idx", topk_idx, ndim=2)
        comp = topk_idx.long()
        if comp.shape[0] != positions.shape[0]:
            raise ValueError(f"topk_idx: {comp.shape[0]} rows for {positions.shape[0]} positions")
        visible = comp >= 0
        if (comp < -1).any() or (comp >= bound[:, None]).any():
            t, j = (((comp >= bound[:, None]) | (comp < -1)).nonzero()[0]).tolist()
            raise ValueError(
                f"topk_idx: entry {int(comp[t, j])} at row {t} is outside [-1, {int(bound[t])})"
                " (future or invalid compressed entry)"
            )
    comp = torch.where(visible, comp + compressed_offset, torch.full_like(comp, -1))
    return torch.cat((sw, comp), dim=1)


# -- attention core --------------------------------------------------------------------------------
def sparse_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    indices: torch.Tensor,
    sink: torch.Tensor,
    *,
    scale: float,
    numerics: Numerics = GOLDEN,
    chunk: int | None = None,
) -> torch.Tensor:
    """MQA sparse attention with a per-head sink (spec 3.10) -> o [T, H, d].

    ``l_j = scale q_h . kv_j`` over the valid indices j of the row; ``M = max(max_j l_j, sink_h)``;
    ``o_h = sum_j e^{l_j - M} kv_j / (sum_j e^{l_j - M} + e^{sink_h - M})``. The sink adds to the
    denominator only (it has no value); an empty row gives 0. ``kv`` is both key and value.
    ``numerics.attn_probs_dtype`` (official: bf16) rounds the unnormalised probabilities e^{l-M} before
    the P.V product; the denominator uses the unrounded fp32 values, as OFF's kernel does. (OFF uses a
    running max per kv block; we use the row max, which changes only which exponent the rounding sees.)
    Evaluation: queries are processed in blocks of at most ``chunk``; slot columns that are -1 for the
    whole block are dropped (they add exact zeros). A block referencing U distinct kv rows through K slot
    columns is evaluated in one of two equivalent forms (same terms, other order of the additions):
      * U <= 4 K (a gather is a costly copy on the CPU): q . kv against the U distinct rows, one [t H, d] x
        [d, U] product, with a count matrix ``c[t, u]`` (how often row u occurs among query t's valid
        slots; 0 = not attended) masking and weighting the logits (duplicates count twice);
      * otherwise (scattered top-k sets: the union grows past the per-query sets) the per-slot form: a
        [t, K, d] gather of the indexed rows.
    A block is halved while its [t, H, U] logits would exceed the ``chunk K d`` elements of a gather.
    chunk None: 256 on the CPU. On CUDA every block uses the per-slot form (the distinct-row form's
    bookkeeping costs host syncs that outweigh its savings there), all-padding columns are kept (their
    probabilities are exact zeros) and the block holds as many queries as keep the [t, K, d] gather within
    2^28 elements (1 GiB fp32), between 64 and 1024.
    """
    float_tensor("q", q, ndim=3)
    float_tensor("kv", kv, ndim=2, last=q.shape[2])
    index_tensor("indices", indices, ndim=2)
    if indices.shape[0] != q.shape[0]:
        raise ValueError(f"indices: {indices.shape[0]} rows for {q.shape[0]} queries")
    shape_is("sink", sink, (q.shape[1],))
    if torch.isnan(sink).any() or (sink == float("inf")).any():
        raise ValueError("sink: NaN or +inf (a -inf sink, as for padded heads, is allowed)")
    finite("q", q)
    finite("kv", kv)
    N = kv.shape[0]
    if ((indices < -1) | (indices >= N)).any():
        bad = indices[(indices < -1) | (indices >= N)][0].item()
        raise ValueError(f"indices: {bad} outside [-1, {N})")
    dt = compute_dtype(q)
    q, kv, sink = q.to(dt), kv.to(dt), sink.to(dt)
    T, H, d = q.shape
    out = torch.empty_like(q)
    K = max(indices.shape[1], 1)
    if q.is_cuda:
        return _per_slot_blocks(q, kv, indices, sink, scale, numerics,
                                chunk or max(64, min(1024, 2**28 // (K * d))))
    chunk = chunk or 256
    budget = chunk * K * d
    for a, b, rows in _query_blocks(indices, chunk, H, budget):
        idx = indices[a:b].long()
        idx = idx[:, (idx >= 0).any(0)]  # drop all-padding slot columns
        if rows.numel() <= 4 * idx.shape[1]:
            out[a:b] = _attend_block(q[a:b], kv, idx, rows, sink, scale, numerics)
        else:
            out[a:b] = _attend_gathered(q[a:b], kv, idx, sink, scale, numerics)
    return out


def _per_slot_blocks(q, kv, indices, sink, scale, numerics, chunk):
    """The per-slot form on every block of ``chunk`` queries, padding columns kept (the CUDA evaluation:
    no data-dependent shapes, so no host syncs)."""
    out = torch.empty_like(q)
    for a in range(0, q.shape[0], chunk):
        b = min(a + chunk, q.shape[0])
        out[a:b] = _attend_gathered(q[a:b], kv, indices[a:b].long(), sink, scale, numerics)
    return out


def _query_blocks(indices: torch.Tensor, chunk: int, heads: int, budget: int):
    """Yield (a, b, rows): query blocks [a, b) of at most ``chunk`` rows, each with the sorted distinct kv
    rows its valid indices reference, halved while ``(b - a) * heads * len(rows) > budget``."""
    a, T = 0, indices.shape[0]
    while a < T:
        b = min(a + chunk, T)
        while True:
            idx = indices[a:b]
            rows = torch.unique(idx[idx >= 0].long())  # sorted
            if b - a == 1 or (b - a) * heads * rows.numel() <= budget:
                break
            b = a + (b - a) // 2
        yield a, b, rows
        a = b


def _softmax_with_sink(logits, sink):
    """e^{l - M} and the denominator sum + e^{sink - M}, M = max(max l, sink) (0 for an all -inf row)."""
    m = torch.maximum(logits.amax(dim=-1), sink[None, :]) if logits.shape[-1] else sink[None, :].expand(
        logits.shape[:2])
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # empty row with a -inf sink
    return torch.exp(logits - m[..., None]), torch.exp(sink[None, :] - m)


def _attend_gathered(q, kv, idx, sink, scale, numerics):
    """Per-slot form: gather kv[idx] [t, K, d] and reduce over the K slots."""
    valid = idx >= 0
    kvs = kv[idx.clamp(min=0)]  # [t, K, d]
    logits = torch.einsum("thd,tkd->thk", q, kvs) * scale
    p, e_sink = _softmax_with_sink(logits.masked_fill(~valid[:, None, :], float("-inf")), sink)
    den = p.sum(dim=-1) + e_sink
    if numerics.attn_probs_dtype is not None:
        p = p.to(numerics.attn_probs_dtype).to(q.dtype)
    o = torch.einsum("thk,tkd->thd", p, kvs)
    return torch.where(den[..., None] > 0, o / den[..., None], torch.zeros_like(o))


def _attend_block(q, kv, idx, rows, sink, scale, numerics):
    """Distinct-row form: one query block q [t, H, d] over ``kv[rows]`` with slot counts from ``idx``."""
    t, H, d = q.shape
    U = rows.numel()
    valid = idx >= 0
    col = torch.where(valid, torch.searchsorted(rows, idx.clamp(min=0)), torch.full_like(idx, U))
    count = q.new_zeros(t, U + 1).scatter_add_(1, col, valid.to(q.dtype))[:, None, :U]  # [t, 1, U]
    kvu = kv[rows]  # [U, d]
    logits = (q.reshape(t * H, d) @ kvu.T).view(t, H, U) * scale
    p, e_sink = _softmax_with_sink(logits.masked_fill(count == 0, float("-inf")), sink)
    den = (p * count).sum(dim=-1) + e_sink
    if numerics.attn_probs_dtype is not None:
        p = p.to(numerics.attn_probs_dtype).to(q.dtype)
    o = ((p * count).view(t * H, U) @ kvu).view(t, H, d)
    return torch.where(den[..., None] > 0, o / den[..., None], torch.zeros_like(o))


def sparse_attention_gather(q, kv, indices, sink, *, scale, numerics=GOLDEN, chunk=256):
    """``sparse_attention`` in its most literal form, kept as the oracle of the faster evaluation: per query
    block, gather a [t, K, d] copy of the indexed rows and reduce over the K slots in slot order (no input
    checks: call :func:`sparse_attention`)."""
    dt = q.dtype
    out = torch.empty_like(q)
    for a in range(0, q.shape[0], chunk):
        b = min(a + chunk, q.shape[0])
        idx = indices[a:b].long()
        valid = idx >= 0
        kvs = kv[idx.clamp(min=0)]
        logits = torch.einsum("thd,tkd->thk", q[a:b], kvs) * scale
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        m = torch.maximum(logits.amax(dim=-1), sink[None, :])
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(logits - m[..., None])
        den = p.sum(dim=-1) + torch.exp(sink[None, :] - m)
        if numerics.attn_probs_dtype is not None:
            p = p.to(numerics.attn_probs_dtype).to(dt)
        o = torch.einsum("thk,tkd->thd", p, kvs)
        out[a:b] = torch.where(den[..., None] > 0, o / den[..., None], torch.zeros_like(o))
    return out


# -- output path -----------------------------------------------------------------------------------
def output_projection(
    o: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    wo_a: torch.Tensor,
    wo_b: torch.Tensor,
    *,
    o_groups: int,
    rope_dim: int = 64,
    numerics: Numerics = GOLDEN,
) -> torch.Tensor:
    """Inverse RoPE (-phi at the query position) on o's last ``rope_dim`` dims, then the grouped low-rank
    projection (spec 3.11): ``z_g = wo_a[g] o_g`` with ``wo_a`` viewed [g, r, (H/g) d], then
    ``y = wo_b concat_g(z_g)`` -> [T, D]. wo_a is a bf16 linear (no FP8 activation quant in OFF); wo_b
    is an FP8 linear (``numerics.linear_act`` on z)."""
    float_tensor("o", o, ndim=3)
    T, H, d = o.shape
    if H % o_groups:
        raise ValueError(f"o_groups: {o_groups} does not divide H={H}")
    width = H // o_groups * d
    float_tensor("wo_a", wo_a, ndim=2, last=width)
    if wo_a.shape[0] % o_groups:
        raise ValueError(f"wo_a: {wo_a.shape[0]} rows do not split into o_groups={o_groups}")
    shape_is("wo_b", wo_b, (wo_b.shape[0], wo_a.shape[0]))
    dt = compute_dtype(o)
    o = apply_rope(o, positions, inv_freq, rope_dim, inverse=True).reshape(T, o_groups, width)
    z = torch.einsum("tgk,grk->tgr", o, wo_a.to(dt).view(o_groups, -1, width)).reshape(T, -1)
    return linear(round_act(z, numerics), wo_b, numerics)


# -- decode state ----------------------------------------------------------------------------------
@dataclass
class AttentionState:
    """Per-layer, per-sequence decode state for :func:`attention_layer`; create it empty
    (``AttentionState()``) and pass it to every call for that sequence and layer.

    swa_kv        : the last ``window`` tokens' kv (roped, QAT-applied), rows = positions
                    ``next_pos - len .. next_pos - 1``
    compressed_kv : every compressed attention entry so far [n_c, d] (CSA / HCA)
    index_k       : every compressed indexer key so far [n_c, hd_i] (CSA)
    compressor / indexer_compressor : the fp32 pooling states (:class:`CompressorState`)
    """

    next_pos: int = 0
    swa_kv: torch.Tensor | None = None
    compressed_kv: torch.Tensor | None = None
    index_k: torch.Tensor | None = None
    compressor: CompressorState | None = None
    indexer_compressor: CompressorState | None = None
    bound_to: tuple | None = field(default=None, repr=False)


def _w(w: dict, key: str) -> torch.Tensor:
    try:
        return w[key]
    except KeyError:
        raise KeyError(f"w: missing weight {key!r}") from None


def attention_layer(
    x: torch.Tensor,
    w: dict,
    cfg: DSV4Config,
    layer: int,
    positions: torch.Tensor,
    *,
    numerics: Numerics = GOLDEN,
    variant: str = "official",
    compressor_variant: str = "official",
    norm_variant: str = "official",
    state: AttentionState | None = None,
) -> torch.Tensor:
    """One DSV4 attention block (input = the attn_norm output [T, D]) -> [T, D].

    SWA: window only; CSA (ratio 4): window + indexer top-k of the CSA compressed cache; HCA (ratio 128):
    window + all visible compressed entries. ``w`` holds the official weight names relative to the layer
    (``attn.wq_a`` ...), dequantised to float.

    state=None: ``x`` is a whole sequence and ``positions`` must be 0..T-1. With an
    :class:`AttentionState`, ``positions`` must continue at ``state.next_pos``; the state is updated, so
    prefill followed by token-by-token decode (or chunked prefill) reproduces the single prefill.

    Variants (spec section 8; defaults follow current OFF):
      * variant: RoPE table, "official" or "vllm-yarn-on-swa" (vLLM a970fb5a1 YaRN on SWA layers).
      * compressor_variant: "official" (pooled rounded to bf16 before the norm) or "vllm" (fp32 norm);
        only differs when ``numerics.act_dtype`` is set.
      * norm_variant: q_norm / kv_norm, "official" or "hf" (only differs with bf16 norm weights).
    Simulation points (numerics): FP8 linear inputs of wq_a, wq_b, wkv, wo_b, indexer.wq_b; kv nope FP8
    (SWA and compressed); indexer q / K; probabilities before P.V; act_dtype at OFF's bf16 boundaries.
    """
    if variant not in ROPE_VARIANTS:
        raise ValueError(f"variant: {variant!r} not in {ROPE_VARIANTS}")
    if compressor_variant not in COMPRESS_VARIANTS:
        raise ValueError(f"compressor_variant: {compressor_variant!r} not in {COMPRESS_VARIANTS}")
    if norm_variant not in RMS_NORM_VARIANTS:
        raise ValueError(f"norm_variant: {norm_variant!r} not in {RMS_NORM_VARIANTS}")
    float_tensor("x", x, ndim=2, last=cfg.hidden_size)
    index_tensor("positions", positions, ndim=1)
    T = x.shape[0]
    p0 = 0 if state is None else state.next_pos
    if positions.shape[0] != T or not torch.equal(positions.long(), torch.arange(p0, p0 + T)):
        hint = (
            ""
            if state is not None
            else " (without a state x must be a whole sequence; pass state=AttentionState())"
        )
        raise ValueError(f"positions: must be {p0}..{p0 + T - 1}{hint}")
    eps, d, r = cfg.rms_norm_eps, cfg.head_dim, cfg.qk_rope_head_dim
    ratio, kind = cfg.compress_ratio(layer), LAYER_TYPES[cfg.layer_type(layer)]
    inv_freq = layer_inv_freq(cfg, layer, variant)

    qr, q = query_path(
        x,
        _w(w, "attn.wq_a"),
        _w(w, "attn.q_norm"),
        _w(w, "attn.wq_b"),
        n_heads=cfg.num_attention_heads,
        eps=eps,
        numerics=numerics,
        norm_variant=norm_variant,
    )
    if q.shape[-1] != d:
        raise ValueError(f"w: attn.wq_b gives head dim {q.shape[-1]}, config head_dim {d}")
    q = round_act(apply_rope(q, positions, inv_freq, r), numerics)
    kv = kv_projection(
        x, _w(w, "attn.wkv"), _w(w, "attn.kv_norm"), eps=eps, numerics=numerics, norm_variant=norm_variant
    )
    kv = quant_kv_nope(round_act(apply_rope(kv, positions, inv_freq, r), numerics), d - r, numerics)

    comp_kw = dict(eps=eps, inv_freq=inv_freq, rope_dim=r, numerics=numerics, variant=compressor_variant)
    cw = ["attn.compressor." + k for k in ("wkv", "wgate", "ape", "norm")]
    iw_ = ["attn.indexer.compressor." + k for k in ("wkv", "wgate", "ape", "norm")]
    comp = index_k = None
    if state is None:
        kv_tokens, token_offset = kv, 0
        if ratio:
            comp = compress(x, *(_w(w, k) for k in cw), ratio=ratio, head_dim=d, kind="attn", **comp_kw)
        if kind == "csa":
            index_k = compress(
                x,
                *(_w(w, k) for k in iw_),
                ratio=ratio,
                head_dim=cfg.index_head_dim,
                kind="indexer",
                **comp_kw,
            )
    else:
        key = (cfg.name, layer, numerics, variant, compressor_variant, norm_variant)
        if state.bound_to is None:
            state.bound_to = key
            if ratio:
                state.compressor = CompressorState(
                    *(_w(w, k) for k in cw), ratio=ratio, head_dim=d, kind="attn", **comp_kw
                )
            if kind == "csa":
                state.indexer_compressor = CompressorState(
                    *(_w(w, k) for k in iw_),
                    ratio=ratio,
                    head_dim=cfg.index_head_dim,
                    kind="indexer",
                    **comp_kw,
                )
        elif state.bound_to != key:
            raise ValueError(f"state: bound to {state.bound_to}, called with {key}")
        prev = state.swa_kv if state.swa_kv is not None else kv.new_zeros(0, d)
        kv_tokens, token_offset = torch.cat((prev, kv)), p0 - prev.shape[0]
        if ratio:
            new, _ = state.compressor.update(x, positions)
            state.compressed_kv = (
                new if state.compressed_kv is None else torch.cat((state.compressed_kv, new))
            )
            comp = state.compressed_kv
        if kind == "csa":
            new, _ = state.indexer_compressor.update(x, positions)
            state.index_k = new if state.index_k is None else torch.cat((state.index_k, new))
            index_k = state.index_k

    topk = None
    if kind == "csa":
        iq = indexer_q(
            qr,
            _w(w, "attn.indexer.wq_b"),
            positions,
            inv_freq,
            n_heads=cfg.index_n_heads,
            head_dim=cfg.index_head_dim,
            numerics=numerics,
            rope_dim=r,
        )
        iwt = indexer_weights(
            x, _w(w, "attn.indexer.weights_proj"), n_heads=cfg.index_n_heads, head_dim=cfg.index_head_dim
        )
        topk = indexer_topk_chunked(iq, index_k, iwt, positions, ratio=ratio, topk=cfg.index_topk)
    idx = attention_set(
        kind,
        positions,
        cfg.sliding_window,
        ratio,
        topk,
        token_offset=token_offset,
        compressed_offset=kv_tokens.shape[0],
    )
    kv_all = kv_tokens if comp is None else torch.cat((kv_tokens, comp.to(kv_tokens.dtype)))
    o = sparse_attention(q, kv_all, idx, _w(w, "attn.attn_sink"), scale=d**-0.5, numerics=numerics)
    y = output_projection(
        round_act(o, numerics),
        positions,
        inv_freq,
        _w(w, "attn.wo_a"),
        _w(w, "attn.wo_b"),
        o_groups=cfg.o_groups,
        rope_dim=r,
        numerics=numerics,
    )
    if state is not None:
        state.swa_kv = kv_tokens[-cfg.sliding_window :]
        state.next_pos = p0 + T
    return y


def random_attention_weights(cfg: DSV4Config, layer: int, *, seed: int = 0, dtype=torch.float32) -> dict:
    """Seeded random weights for one attention block with the spec section 1 shapes (case makers and
    tests). Linears are N(0, 1/fan_in) so activations stay O(1); norms ~1; sinks ~N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    D, H, d, ql = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    Hi, hi = cfg.index_n_heads, cfg.index_head_dim
    ratio = cfg.compress_ratio(layer)

    def lin(o, i):
        return torch.randn(o, i, generator=g, dtype=torch.float64).mul(i**-0.5).to(dtype)

    def nrm(n):
        return (1 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)

    w = {
        "attn.wq_a": lin(ql, D),
        "attn.q_norm": nrm(ql),
        "attn.wq_b": lin(H * d, ql),
        "attn.wkv": lin(d, D),
        "attn.kv_norm": nrm(d),
        "attn.wo_a": lin(cfg.o_groups * cfg.o_lora_rank, H // cfg.o_groups * d),
        "attn.wo_b": lin(D, cfg.o_groups * cfg.o_lora_rank),
        "attn.attn_sink": torch.randn(H, generator=g, dtype=torch.float64).to(dtype),
    }
    if ratio:
        c = 2 if ratio == 4 else 1
        w.update(
            {
                "attn.compressor.wkv": lin(c * d, D),
                "attn.compressor.wgate": lin(c * d, D),
                "attn.compressor.ape": (0.5 * torch.randn(ratio, c * d, generator=g, dtype=torch.float64)).to(
                    dtype
                ),
                "attn.compressor.norm": nrm(d),
            }
        )
    if ratio == 4:
        w.update(
            {
                "attn.indexer.wq_b": lin(Hi * hi, ql),
                "attn.indexer.weights_proj": lin(Hi, D),
                "attn.indexer.compressor.wkv": lin(2 * hi, D),
                "attn.indexer.compressor.wgate": lin(2 * hi, D),
                "attn.indexer.compressor.ape": (
                    0.5 * torch.randn(4, 2 * hi, generator=g, dtype=torch.float64)
                ).to(dtype),
                "attn.indexer.compressor.norm": nrm(hi),
            }
        )
    return w
