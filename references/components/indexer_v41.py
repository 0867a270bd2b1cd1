"""DeepSeek-V4.1 changes to the lightning indexer (spec 3.8 as amended by V4.1): index keys from the main
compressor's latent, and the two-level (candidate-block) top-k.

Provenance: the installed vLLM 0.32.0 (paths relative to ``site-packages/vllm``); no DeepSeek V4.1 reference
code was available to read. Nothing here is copied; the math is restated from what those files compute.

**Index keys from the latent** (``models/deepseek_v41/attention.py:1255-1263``, ``:1343-1354``,
``:1405-1437``; ``models/deepseek_v41/common/ops/indexer_k_store.py:1-13``, ``:158-190``, ``:237-253``). V4 (spec 3.8
step 4) gave the indexer its own compressor over the hidden state. In V4.1 an indexer that lives on a kv-source
layer (``owns_k``) derives its
key from the main compressor's latent instead: the latent is the compressor's pooled, RMS-normalised, pre-RoPE
512-dim row (``compressor.py:250-295``: "the BF16 latent"; ``common/ops/fused_compress_quant_cache.py:216-221``),
emitted at group-boundary tokens ``(t + 1) % m == 0`` (m = compress ratio, 1 or 2). Then

    k = RoPE_(last 64 dims)( k_norm( wk latent ) )  at position (t // m) * m   (the group's first token)

``wk`` [128, 512] is a plain bf16 linear (no FP8 scales, ``attention.py:1343-1353``), ``k_norm`` an RMSNorm of
the 128 dims with the model's ``rms_norm_eps``, RoPE interleaved (GPT-J pairs) on the trailing 64 dims with the
layer's table. Serving (``_indexer_k_norm_rope_quant_store_kernel``) rounds to bf16 after the GEMM, after k_norm and
after RoPE, then stores one FP8 block of 128 with a power-of-two fp32 scale (or MXFP4); the golden has no
rounding.

**Two-level top-k** (``attention.py:460-482``, ``:1265-1268``; ``nvidia/model.py:711-723``;
``model_executor/layers/sparse_attn_indexer.py:687-720``, ``:837-866``;
``model_executor/kernels/attention/dsa/candidate_blocks.py``). The indexer of ``candidate_source_layer_id``
(an index source) scores densely and publishes, per query row, ``candidate_topk_blocks`` blocks of
``candidate_block_size`` compressed entries; every later index source masks its own scores to those blocks before
its row top-k. Per query at position t with n = floor((t + 1) / m) visible entries, blocks b = s // B:

* block score = max of the source layer's scores over the visible entries of the block; the block holding the
  newest visible entry (n - 1) // B is pinned (+inf); blocks with no visible entry are never chosen;
* candidates = the top min(K_b, ceil(n / B)) blocks by block score (-1 padded to K_b). Order: descending block
  score, ties to the lower block id (vLLM uses torch.topk, whose tie order is unspecified: ties compare as
  interchangeable);
* the consumer keeps its score on visible entries of candidate blocks and -inf on the other visible entries, then
  takes its causal top-k.

What "top-k" returns when fewer than ``topk`` candidate entries are visible is a named variant (``variant``):

* ``"dense"`` (default; vLLM's default path: the dense logits masked in place by ``apply_candidate_mask`` and
  ranked by ``top_k_per_row_prefill`` / ``_decode`` (csrc/sampler.cu ``topKPerRowJob``): a row with n <= topk
  returns every visible entry, candidates or not (the kernel's ``rowLen <= topK`` shortcut; also
  ``DeepseekV4Indexer.forward``'s short-context bypass ``_fill_short_context_topk_indices``,
  ``attention.py:1481-1506``); a longer row returns topk entries by masked score, so with M < topk visible
  candidate entries the other topk - M are visible non-candidates at -inf (any of them: equal keys). Selected: the
  top min(topk, n) visible entries by masked score.
* ``"candidates_only"`` (vLLM's opt-in ``attention_config.indexer_sparse_logits`` path, ``SparseMQAIndexer`` /
  ``model_executor/kernels/attention/dsa/sparse_mqa_logits.py:1-20``: only candidate entries are scored, so only
  they can be selected): the top min(topk, M) visible candidate entries, -1 padded.

(``csrc/sampler.cu`` is vLLM's C++ source, compiled into the wheel and not installed with it: read in the upstream
repository, vllm-project/vllm at 00e831b, ``topKPerRowJob``'s ``rowLen <= topK`` shortcut; the radix selection ranks
-inf like any value.)

Order of the returned indices: descending key, ties to the lower entry index; -1 padding at the tail.
"""

from __future__ import annotations

import torch

from ..numerics import GOLDEN, Numerics
from ._checks import compute_dtype, finite, float_tensor, index_tensor, round_act
from .indexer import causal_bound
from .norms import rms_norm
from .qat import quant_indexer
from .rope import apply_rope

TWO_LEVEL_VARIANTS = ("dense", "candidates_only")


# --------------------------------------------------------------------------- index keys from the latent
def group_positions(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """The RoPE position of each group-boundary token's key: the group's first token, (t // m) * m."""
    return torch.div(positions.long(), ratio, rounding_mode="floor") * ratio


def _check_boundaries(positions: torch.Tensor, ratio: int) -> None:
    index_tensor("positions", positions, ndim=1)
    if ratio <= 0:
        raise ValueError(f"ratio: must be positive, got {ratio}")
    if (positions < 0).any():
        raise ValueError(f"positions: negative position {int(positions.min())}")
    bad = ((positions.long() + 1) % ratio != 0).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"positions[{i}] = {int(positions[i])} is not a group boundary ((t + 1) % {ratio} != 0): "
                         "only group-boundary tokens carry a latent")


def indexer_k_latent(latent: torch.Tensor, wk: torch.Tensor, k_norm: torch.Tensor, positions: torch.Tensor,
                     inv_freq: torch.Tensor, *, ratio: int, eps: float = 1e-6, rope_dim: int = 64,
                     numerics: Numerics = GOLDEN) -> torch.Tensor:
    """V4.1 index keys [N, hd] from the compressor latents ``latent`` [N, Dl] of group-boundary tokens
    ``positions`` [N]: ``RoPE(k_norm(wk latent))`` at (t // ratio) * ratio (module docstring).

    numerics: ``act_dtype`` rounds after the GEMM, after k_norm and after RoPE, then ``indexer_k`` is the store
    (``indexer_k_store.py:158-190``, ``:237-253``: bf16 k_pre, bf16 normed, bf16 rotated, one FP8 block of 128);
    GOLDEN rounds nothing."""
    float_tensor("latent", latent, ndim=2)
    float_tensor("wk", wk, ndim=2, last=latent.shape[1])
    float_tensor("k_norm", k_norm, ndim=1, last=wk.shape[0])
    _check_boundaries(positions, ratio)
    if positions.shape[0] != latent.shape[0]:
        raise ValueError(f"positions: length {positions.shape[0]} != latent rows {latent.shape[0]}")
    if wk.shape[0] < rope_dim:
        raise ValueError(f"wk: {wk.shape[0]} output dims, fewer than rope_dim {rope_dim}")
    dt = compute_dtype(latent)
    k = round_act(finite("latent", latent).to(dt) @ finite("wk", wk).to(dt).T, numerics)
    k = round_act(rms_norm(k, k_norm, eps), numerics)
    k = round_act(apply_rope(k, group_positions(positions, ratio), inv_freq, rope_dim), numerics)
    return quant_indexer(k, numerics.indexer_k, False) if numerics.indexer_k is not None else k


# --------------------------------------------------------------------------- two-level candidate top-k
def _visible(scores: torch.Tensor, positions: torch.Tensor, ratio: int):
    float_tensor("scores", scores, ndim=2)
    index_tensor("positions", positions, ndim=1)
    if positions.shape[0] != scores.shape[0]:
        raise ValueError(f"positions: length {positions.shape[0]} != scores rows {scores.shape[0]}")
    if ratio <= 0:
        raise ValueError(f"ratio: must be positive, got {ratio}")
    n = causal_bound(positions, ratio).clamp(min=0, max=scores.shape[1])
    vis = torch.arange(scores.shape[1])[None, :] < n[:, None]
    if not torch.isfinite(scores[vis]).all():
        raise ValueError("scores: NaN / Inf among the visible (causal) entries")
    return n, vis


def candidate_block_scores(src_scores: torch.Tensor, positions: torch.Tensor, *, ratio: int,
                           block_size: int) -> torch.Tensor:
    """[T, ceil(N / B)]: max of ``src_scores`` over each block's visible entries; +inf on the block of the newest
    visible entry; -inf on blocks with no visible entry."""
    if block_size <= 0:
        raise ValueError(f"block_size: must be positive, got {block_size}")
    n, vis = _visible(src_scores, positions, ratio)
    T, N = src_scores.shape
    nb = -(-N // block_size)
    key = torch.full((T, nb * block_size), float("-inf"), dtype=compute_dtype(src_scores))
    key[:, :N] = torch.where(vis, src_scores.to(key.dtype), torch.full_like(key[:, :N], float("-inf")))
    bs = key.view(T, nb, block_size).amax(-1)
    rows = (n > 0).nonzero().flatten()
    bs[rows, (n[rows] - 1) // block_size] = float("inf")
    return bs


def _top_rows(key: torch.Tensor, selectable: torch.Tensor, count: torch.Tensor, width: int) -> torch.Tensor:
    """Per row the first ``count`` selectable columns by descending ``key`` (ties to the lower column), -1 padded
    to ``width``. Two stable sorts: by key, then by selectable (so unselectable columns sort last)."""
    T, N = key.shape
    k = torch.where(selectable, key, torch.full_like(key, float("-inf")))
    o1 = torch.sort(k, dim=1, descending=True, stable=True).indices
    o2 = torch.sort(selectable.gather(1, o1).to(torch.int8), dim=1, descending=True, stable=True).indices
    order = o1.gather(1, o2)
    out = torch.full((T, width), -1, dtype=torch.long)
    m = min(width, N)
    keep = torch.arange(m)[None, :] < count[:, None].clamp(max=m)
    out[:, :m] = torch.where(keep, order[:, :m], torch.full_like(order[:, :m], -1))
    return out


def candidate_blocks(src_scores: torch.Tensor, positions: torch.Tensor, *, ratio: int, topk_blocks: int,
                     block_size: int) -> torch.Tensor:
    """The candidate source's blocks [T, topk_blocks] long, -1 padded (module docstring)."""
    if topk_blocks <= 0:
        raise ValueError(f"topk_blocks: must be positive, got {topk_blocks}")
    bs = candidate_block_scores(src_scores, positions, ratio=ratio, block_size=block_size)
    sel = bs > float("-inf")
    return _top_rows(bs, sel, sel.sum(1), topk_blocks)


def candidate_mask(candidates: torch.Tensor, n_entries: int, block_size: int) -> torch.Tensor:
    """[T, N] bool: entry s lies in one of the row's candidate blocks (-1 entries ignored)."""
    index_tensor("candidates", candidates, ndim=2)
    nb = -(-n_entries // block_size)
    c = candidates.long()
    if ((c < -1) | (c >= nb)).any():
        bad = c[(c < -1) | (c >= nb)][0]
        raise ValueError(f"candidates: block id {int(bad)} outside [-1, {nb}) for {n_entries} entries of {block_size}")
    flags = torch.zeros(c.shape[0], nb + 1, dtype=torch.bool)
    flags.scatter_(1, torch.where(c < 0, torch.full_like(c, nb), c), True)   # -1 -> a spare column
    return flags[:, :nb].repeat_interleave(block_size, dim=1)[:, :n_entries]


def topk_in_candidates(scores: torch.Tensor, positions: torch.Tensor, candidates: torch.Tensor, *, ratio: int,
                       topk: int, block_size: int, variant: str = "dense") -> torch.Tensor:
    """A consumer layer's causal top-k [T, topk] under the candidate blocks ``candidates`` [T, K_b]."""
    if variant not in TWO_LEVEL_VARIANTS:
        raise ValueError(f"variant: {variant!r} not in {TWO_LEVEL_VARIANTS}")
    if topk <= 0 or block_size <= 0:
        raise ValueError(f"topk / block_size: must be positive, got {topk} / {block_size}")
    n, vis = _visible(scores, positions, ratio)
    if candidates.shape[0] != scores.shape[0]:
        raise ValueError(f"candidates: {candidates.shape[0]} rows != scores rows {scores.shape[0]}")
    inc = candidate_mask(candidates, scores.shape[1], block_size) & vis
    key = torch.where(inc, scores.to(compute_dtype(scores)), torch.full_like(scores, float("-inf"),
                                                                             dtype=compute_dtype(scores)))
    if variant == "dense":
        return _top_rows(key, vis, n, topk)
    return _top_rows(key, inc, inc.sum(1), topk)


def selection_keys(scores: torch.Tensor, positions: torch.Tensor, candidates: torch.Tensor, *, ratio: int,
                   block_size: int, variant: str = "dense"):
    """(key [T, N], selectable [T, N]) the consumer ranks by: its score on visible candidate entries, -inf on the
    other visible entries (selectable only in the "dense" variant)."""
    n, vis = _visible(scores, positions, ratio)
    inc = candidate_mask(candidates, scores.shape[1], block_size) & vis
    key = torch.where(inc, scores.double(), torch.full_like(scores, float("-inf"), dtype=torch.float64))
    return key, (vis if variant == "dense" else inc)


def indexer_topk_two_level(src_scores: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor, *, ratio: int,
                           topk: int, topk_blocks: int, block_size: int, variant: str = "dense") -> dict:
    """-> {"candidates": the source layer's blocks [T, topk_blocks], "idx": the consumer's top-k [T, topk]} for the
    candidate source's scores ``src_scores`` and a later index source's ``scores`` (both [T, N], one request,
    queries at ``positions``)."""
    if tuple(src_scores.shape) != tuple(scores.shape):
        raise ValueError(f"src_scores: shape {tuple(src_scores.shape)} != scores shape {tuple(scores.shape)}")
    cand = candidate_blocks(src_scores, positions, ratio=ratio, topk_blocks=topk_blocks, block_size=block_size)
    idx = topk_in_candidates(scores, positions, cand, ratio=ratio, topk=topk, block_size=block_size, variant=variant)
    return {"candidates": cand, "idx": idx}
