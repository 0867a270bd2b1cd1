"""KV compressors (spec 3.7): CSA (ratio 4, overlapping windows) and HCA (ratio 128), for the attention
cache (head_dim 512) and the lightning indexer's keys (head_dim 128).

Per token t: ``C_t = wkv x_t``, ``Z_t = wgate x_t + ape[t mod m]`` (width c*d; c = 2 with overlap).
Entry i pools, separately for every channel k, ``P_k = sum_s softmax_s(Z_{s,k}) C_{s,k}`` over its slots:
  * HCA (no overlap): the m tokens of window i, [m i, m i + m).
  * CSA (overlap, m = 4): 2m slots; slots 0..m-1 are the FIRST half [0, d) of the PREVIOUS window's
    tokens [m(i-1), m i), slots m..2m-1 the SECOND half [d, 2d) of the CURRENT window's tokens. Entry 0 has
    no previous window: those slots get C = 0 and Z = -inf (weight 0).
Then ``RMSNorm(norm) -> RoPE (last rope_dim dims) at position i*m -> QAT`` (numerics).
Entry i exists once token m i + m - 1 has been seen.

DeepSeek-V4.1 (``compress_ratios`` entries 1 and 2; vLLM ``models/deepseek_v41/compressor.py``,
``common/ops/fused_compress_quant_cache.py``): no position bias (the module registers ``fused_wkv_wgate`` and
``norm`` only, ``compressor.py:218-241``: ``ape=None`` here) and no overlap (groups [m i, m i + m),
``fused_compress_quant_cache.py:140-214``). Ratio 2 pools the pair (2i, 2i + 1) with the per-channel softmax
over its two scores, closed at position 2i + 1; ratio 1 has no gate (``has_gate = compress_ratio > 1``,
``compressor.py:218-219``: ``wgate=None``) and the entry is the token's own kv. Then RMSNorm and RoPE at the
group's first position ``position // m * m`` (``fused_compress_quant_cache.py:344``), compress_rope_theta with
YaRN for every compressed layer, ratio 1 included (``common/rope.py:23-38``).
"""

from __future__ import annotations

import torch

from ..numerics import GOLDEN, Numerics
from ._checks import compute_dtype, finite, float_tensor, index_tensor, round_act, shape_is
from .norms import rms_norm
from .qat import quant_indexer, quant_kv_nope
from .rope import apply_rope

# "vllm41": V4.1's kernels store the normed latent in bf16 (_store_latent, fused_compress_quant_cache.py:216-221)
# and rotate that bf16 latent in fp32 with one more bf16 store (_rope_quant_insert_kernel, :340-350)
COMPRESS_VARIANTS = ("official", "vllm", "vllm41")
KINDS = ("attn", "indexer")


def _check(x, wkv, wgate, ape, norm, ratio, head_dim, overlap, kind, variant):
    float_tensor("x", x, ndim=2)
    if ratio < 1:
        raise ValueError(f"ratio: must be >= 1, got {ratio}")
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} not in {KINDS}")
    if variant not in COMPRESS_VARIANTS:
        raise ValueError(f"variant: {variant!r} not in {COMPRESS_VARIANTS}")
    overlap = (ratio == 4) if overlap is None else bool(overlap)
    width = (2 if overlap else 1) * head_dim
    if overlap and ratio < 2:
        raise ValueError(f"overlap: needs ratio >= 2, got {ratio}")
    if wgate is None and ratio != 1:
        raise ValueError(f"wgate: only a ratio-1 compressor (V4.1) has no gate, got ratio {ratio}")
    shape_is("wkv", wkv, (width, x.shape[1]))
    if wgate is not None:
        shape_is("wgate", wgate, (width, x.shape[1]))
    if ape is not None:
        shape_is("ape", ape, (ratio, width))
    shape_is("norm", norm, (head_dim,))
    for name, t in (("wkv", wkv), ("wgate", wgate), ("ape", ape), ("norm", norm)):
        if t is not None:
            finite(name, t)
    return overlap


def _project(x, wkv, wgate, ape, positions, ratio):
    """C = wkv x, Z = wgate x + ape[t mod m], in the compute dtype (OFF: fp32; not an FP8 linear). V4.1: no ape
    (None: no bias); ratio 1 no gate (None: Z = 0, the one-slot softmax is 1 whatever Z is)."""
    dt = compute_dtype(x)
    x = finite("x", x.to(dt))
    kv = x @ wkv.to(dt).T
    score = torch.zeros_like(kv) if wgate is None else x @ wgate.to(dt).T
    if ape is not None:
        score = score + ape.to(dt)[positions % ratio]
    return kv, score


def _finish(pooled, entry_ids, norm, *, ratio, eps, inv_freq, rope_dim, numerics, kind, variant):
    """RMSNorm -> RoPE at i*m -> QAT. ``variant`` only moves the act_dtype (bf16) rounding points:
    "official" (OFF): pooled rounded to bf16 before the norm, norm and RoPE outputs bf16;
    "vllm": norm and RoPE in fp32, one bf16 rounding before the quantiser (spec section 8.8)."""
    off = variant == "official"
    h = round_act(pooled, numerics) if off else pooled
    h = rms_norm(h, norm, eps)
    h = round_act(h, numerics) if variant in ("official", "vllm41") else h
    h = apply_rope(h, entry_ids * ratio, inv_freq, rope_dim)
    h = round_act(h, numerics)
    if kind == "attn":
        return quant_kv_nope(h, h.shape[-1] - rope_dim, numerics)
    return quant_indexer(h, numerics.indexer_k, numerics.indexer_hadamard)


def compress(
    x: torch.Tensor,
    wkv: torch.Tensor,
    wgate: torch.Tensor,
    ape: torch.Tensor,
    norm: torch.Tensor,
    *,
    ratio: int,
    head_dim: int,
    eps: float,
    inv_freq: torch.Tensor,
    rope_dim: int = 64,
    numerics: Numerics = GOLDEN,
    kind: str = "attn",
    variant: str = "official",
    overlap: bool | None = None,
) -> torch.Tensor:
    """All compressed entries of a sequence whose tokens 0..T-1 are ``x`` [T, D] -> [T // ratio, head_dim].

    overlap: None means "overlap iff ratio == 4" (CSA); HCA (128) never overlaps.
    kind: "attn" (QAT: FP8 nope dims, ``numerics.kv_nope``) or "indexer" (``numerics.indexer_k``, with
    Hadamard when ``numerics.indexer_hadamard``; the entries are then in the rotated basis).
    variant: "official" / "vllm", where bf16 rounding happens when ``numerics.act_dtype`` is set.
    A trailing partial window produces no entry (it is still in the compressor state); T < ratio gives an
    empty [0, head_dim] result.
    """
    overlap = _check(x, wkv, wgate, ape, norm, ratio, head_dim, overlap, kind, variant)
    T, m, d = x.shape[0], ratio, head_dim
    n = T // m
    if n == 0:  # T < ratio: no complete window yet (the partial one lives in a CompressorState)
        return x.new_zeros(0, d, dtype=compute_dtype(x))
    kv, score = _project(x[: n * m], wkv, wgate, ape, torch.arange(n * m), m)
    kv, score = kv.reshape(n, m, kv.shape[-1]), score.reshape(n, m, score.shape[-1])
    if overlap:
        # previous window's first half (entry 0: empty, weight 0) ++ current window's second half
        prev_kv = torch.cat((kv.new_zeros(1, m, d), kv[:-1, :, :d]), dim=0)
        prev_sc = torch.cat((score.new_full((1, m, d), float("-inf")), score[:-1, :, :d]), dim=0)
        kv = torch.cat((prev_kv, kv[:, :, d:]), dim=1)
        score = torch.cat((prev_sc, score[:, :, d:]), dim=1)
    # softmax over the SLOT (window) axis, separately for every channel
    pooled = (torch.softmax(score, dim=1) * kv).sum(dim=1)
    return _finish(
        pooled,
        torch.arange(n),
        norm,
        ratio=m,
        eps=eps,
        inv_freq=inv_freq,
        rope_dim=rope_dim,
        numerics=numerics,
        kind=kind,
        variant=variant,
    )


class CompressorState:
    """Incremental (decode) form of :func:`compress`, the OFF / vLLM state-buffer formulation.

    The state holds, in the compute dtype (fp32 golden, as OFF and vLLM keep it), the current window's
    per-token kv and score (score already includes ape) and, with overlap, the previous window's. When
    token t with (t + 1) mod m == 0 arrives the window is pooled into entry (t + 1) / m - 1 and, with
    overlap, the current window moves to the previous slot. Feeding tokens 0..T-1 in any chunking gives
    the entries of ``compress`` over the same tokens.
    """

    def __init__(
        self,
        wkv,
        wgate,
        ape,
        norm,
        *,
        ratio: int,
        head_dim: int,
        eps: float,
        inv_freq,
        rope_dim: int = 64,
        numerics: Numerics = GOLDEN,
        kind: str = "attn",
        variant: str = "official",
        overlap: bool | None = None,
    ):
        float_tensor("wkv", wkv, ndim=2)
        self.overlap = _check(
            torch.zeros(1, wkv.shape[1], dtype=wkv.dtype),
            wkv,
            wgate,
            ape,
            norm,
            ratio,
            head_dim,
            overlap,
            kind,
            variant,
        )
        self.w = (wkv, wgate, ape, norm)
        self.ratio, self.head_dim, self.eps, self.inv_freq, self.rope_dim = (
            ratio,
            head_dim,
            eps,
            inv_freq,
            rope_dim,
        )
        self.numerics, self.kind, self.variant = numerics, kind, variant
        self.next_pos = 0
        self.n_entries = 0
        self._kv_cur = self._sc_cur = self._kv_prev = self._sc_prev = None

    def _init_buffers(self, dt):
        m, width = self.ratio, self.w[0].shape[0]
        self._kv_cur = torch.zeros(m, width, dtype=dt)
        self._sc_cur = torch.full((m, width), float("-inf"), dtype=dt)
        self._kv_prev = torch.zeros(m, width, dtype=dt)
        self._sc_prev = torch.full((m, width), float("-inf"), dtype=dt)

    def update(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed tokens ``x`` [T, D] at ``positions`` (must continue at ``next_pos``). Returns the entries
        completed by these tokens, [k, head_dim], and their entry indices [k] (long)."""
        float_tensor("x", x, ndim=2, last=self.w[0].shape[1])
        index_tensor("positions", positions, ndim=1)
        T = x.shape[0]
        if positions.shape[0] != T or not torch.equal(
            positions.long(), torch.arange(self.next_pos, self.next_pos + T)
        ):
            raise ValueError(
                f"positions: must be {self.next_pos}..{self.next_pos + T - 1} (contiguous continuation)"
            )
        dt = compute_dtype(x)
        if self._kv_cur is None:
            self._init_buffers(dt)
        elif self._kv_cur.dtype != dt:
            raise ValueError(f"x: dtype {x.dtype} differs from the state's {self._kv_cur.dtype}")
        m, d = self.ratio, self.head_dim
        kv, score = _project(x, *self.w[:3], positions.long(), m)
        pooled, ids = [], []
        for j in range(T):
            t = int(positions[j])
            self._kv_cur[t % m] = kv[j]
            self._sc_cur[t % m] = score[j]
            if (t + 1) % m:
                continue
            if self.overlap:
                slot_kv = torch.cat((self._kv_prev[:, :d], self._kv_cur[:, d:]), dim=0)
                slot_sc = torch.cat((self._sc_prev[:, :d], self._sc_cur[:, d:]), dim=0)
            else:
                slot_kv, slot_sc = self._kv_cur, self._sc_cur
            pooled.append((torch.softmax(slot_sc, dim=0) * slot_kv).sum(dim=0))
            ids.append((t + 1) // m - 1)
            if self.overlap:
                self._kv_prev, self._sc_prev = self._kv_cur.clone(), self._sc_cur.clone()
        self.next_pos += T
        if not pooled:
            return torch.zeros(0, d, dtype=dt), torch.zeros(0, dtype=torch.long)
        ids_t = torch.tensor(ids, dtype=torch.long)
        self.n_entries += len(ids)
        out = _finish(
            torch.stack(pooled),
            ids_t,
            self.w[3],
            ratio=m,
            eps=self.eps,
            inv_freq=self.inv_freq,
            rope_dim=self.rope_dim,
            numerics=self.numerics,
            kind=self.kind,
            variant=self.variant,
        )
        return out, ids_t
