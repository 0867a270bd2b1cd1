"""Lightning indexer of CSA layers (spec 3.8): scores over compressed keys and causal top-k.

``I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . K[s])`` with ``w = (weights_proj x) * hd^-0.5 * Hi^-0.5``.
Entry s is visible to a query at position t only if ``s < floor((t + 1) / m)`` (entry s is complete once
token m s + m - 1 has been seen).

Top-k convention (documented because kernels differ): the selected indices are returned in descending
score order; equal scores are broken by the LOWER entry index (a stable descending sort); fewer than
``topk`` visible entries leave the tail padded with -1. Masked (future) entries are never returned,
whatever their score.
"""

from __future__ import annotations

import torch

from ..numerics import GOLDEN, Numerics
from ._checks import compute_dtype, finite, float_tensor, index_tensor, round_act
from .qat import linear, quant_indexer
from .rope import apply_rope


def indexer_q(
    qr: torch.Tensor,
    wq_b: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    n_heads: int,
    head_dim: int,
    numerics: Numerics = GOLDEN,
    rope_dim: int = 64,
) -> torch.Tensor:
    """``q = wq_b qr`` -> [T, Hi, hd] -> RoPE on the last ``rope_dim`` dims at t -> QAT.

    QAT per ``numerics.indexer_q``: OFF Hadamard + MXFP4 (result in the rotated basis, like its keys);
    vLLM one FP8 block per (token, head) with a power-of-two scale (vLLM folds that scale into the head
    weight instead; identical since ReLU(s a) = s ReLU(a) for s > 0). ``wq_b`` is an FP8 linear, so
    ``numerics.linear_act`` applies to ``qr``.
    """
    float_tensor("qr", qr, ndim=2)
    float_tensor("wq_b", wq_b, ndim=2)
    if tuple(wq_b.shape) != (n_heads * head_dim, qr.shape[1]):
        raise ValueError(f"wq_b: expected shape {(n_heads * head_dim, qr.shape[1])}, got {tuple(wq_b.shape)}")
    q = linear(finite("qr", qr), wq_b, numerics).view(qr.shape[0], n_heads, head_dim)
    q = round_act(apply_rope(round_act(q, numerics), positions, inv_freq, rope_dim), numerics)
    return quant_indexer(q, numerics.indexer_q, numerics.indexer_hadamard)


def indexer_weights(
    x: torch.Tensor, weights_proj: torch.Tensor, *, n_heads: int, head_dim: int
) -> torch.Tensor:
    """Per-(token, head) weights ``(weights_proj x) * head_dim^-0.5 * n_heads^-0.5`` -> [T, Hi].
    OFF folds the softmax scale and n_heads^-0.5 into w; weights_proj is a plain bf16 linear."""
    float_tensor("x", x, ndim=2)
    if tuple(weights_proj.shape) != (n_heads, x.shape[1]):
        raise ValueError(
            f"weights_proj: expected shape {(n_heads, x.shape[1])}, got {tuple(weights_proj.shape)}"
        )
    dt = compute_dtype(x)
    return (x.to(dt) @ weights_proj.to(dt).T) * (head_dim**-0.5 * n_heads**-0.5)


def _check_qkw(q, k, w):
    float_tensor("q", q, ndim=3)
    float_tensor("k", k, ndim=2, last=q.shape[2])
    float_tensor("w", w, ndim=2)
    if tuple(w.shape) != tuple(q.shape[:2]):
        raise ValueError(f"w: expected shape {tuple(q.shape[:2])}, got {tuple(w.shape)}")


def indexer_scores(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``I[t, s] = sum_h w[t, h] ReLU(q[t, h] . k[s])`` for q [T, Hi, hd], k [N, hd], w [T, Hi] -> [T, N].
    No causal mask here (see :func:`indexer_topk`). Memory T*Hi*N; use the chunked form for long N."""
    _check_qkw(q, k, w)
    dt = compute_dtype(q)
    logits = torch.einsum("thd,nd->thn", q.to(dt), k.to(dt))
    return torch.einsum("thn,th->tn", torch.relu(logits), w.to(dt))


def causal_bound(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Number of compressed entries visible at each position: floor((t + 1) / m)."""
    return torch.div(positions.long() + 1, ratio, rounding_mode="floor")


def indexer_topk(scores: torch.Tensor, positions: torch.Tensor, *, ratio: int, topk: int) -> torch.Tensor:
    """Causal top-k of ``scores`` [T, N] -> [T, topk] long, -1 where fewer than ``topk`` are visible.

    Entries ``s >= floor((t + 1) / ratio)`` (and ``s >= N``) are masked. Order: descending score, ties to
    the lower index. NaN / Inf among the visible scores is refused (no meaningful ranking).
    """
    float_tensor("scores", scores, ndim=2)
    index_tensor("positions", positions, ndim=1)
    if positions.shape[0] != scores.shape[0]:
        raise ValueError(f"positions: length {positions.shape[0]} != scores rows {scores.shape[0]}")
    if topk <= 0 or ratio <= 0:
        raise ValueError(f"topk / ratio: must be positive, got {topk} / {ratio}")
    T, N = scores.shape
    bound = causal_bound(positions, ratio).clamp(max=N)  # [T]
    visible = torch.arange(N)[None, :] < bound[:, None]  # [T, N]
    if not torch.isfinite(scores[visible]).all():
        raise ValueError("scores: NaN / Inf among the visible (causal) entries")
    # masked entries become -inf and sort after every (finite) visible one
    key = torch.where(visible, scores, torch.full_like(scores, float("-inf")))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices  # stable: ties -> lower index
    k_eff = min(topk, N)
    out = torch.full((T, topk), -1, dtype=torch.long)
    sel = order[:, :k_eff]
    keep = torch.arange(k_eff)[None, :] < bound[:, None].clamp(max=k_eff)
    out[:, :k_eff] = torch.where(keep, sel, torch.full_like(sel, -1))
    return out


def indexer_topk_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    positions: torch.Tensor,
    *,
    ratio: int,
    topk: int,
    chunk: int | None = None,
    key_chunk: int = 4096,
) -> torch.Tensor:
    """Scores + causal top-k in bounded memory: queries in blocks of ``chunk``, keys in blocks of
    ``key_chunk``, and only keys below the block's largest causal bound are scored.

    Peak extra memory ~ chunk * (Hi * key_chunk + N) elements, independent of T. Selection equals
    ``indexer_topk(indexer_scores(q, k, w), ...)`` (same per-element arithmetic, same tie-break).
    chunk None: 128 query rows on the CPU (cache-sized blocks); on CUDA as many rows as keep the
    [chunk, Hi, key block] logits within 2^27 elements (512 MiB fp32), between 128 and 2048 (fewer, larger
    launches). The block shape changes which GEMM kernel runs, so on a GPU a near-tie can fall either side
    with another chunk (the fp32 scores differ in the last ulp); on the CPU the scores do not depend on it.
    """
    _check_qkw(q, k, w)
    index_tensor("positions", positions, ndim=1)
    if positions.shape[0] != q.shape[0]:
        raise ValueError(f"positions: length {positions.shape[0]} != q rows {q.shape[0]}")
    T, N = q.shape[0], k.shape[0]
    if chunk is None:
        chunk = 128 if not q.is_cuda else max(128, min(2048, 2**27 // max(1, q.shape[1] * min(N, key_chunk))))
    if chunk <= 0 or key_chunk <= 0:
        raise ValueError(f"chunk / key_chunk: must be positive, got {chunk} / {key_chunk}")
    dt = compute_dtype(q)
    out = torch.empty(T, topk, dtype=torch.long)
    bound = causal_bound(positions, ratio).clamp(max=N)
    bound_host = bound.cpu()   # one host copy; the per-block key ranges are read from it
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        n_vis = int(bound_host[a:b].max()) if b > a else 0
        scores = torch.full((b - a, N), float("-inf"), dtype=dt)
        for s0 in range(0, n_vis, key_chunk):
            s1 = min(s0 + key_chunk, n_vis)
            scores[:, s0:s1] = indexer_scores(q[a:b], k[s0:s1], w[a:b])
        out[a:b] = indexer_topk(scores, positions[a:b], ratio=ratio, topk=topk)
    return out
