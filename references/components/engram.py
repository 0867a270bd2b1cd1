"""DeepSeek-V4.1 Engram: n-gram hash memory gated into the hyper-connection stream.

What the installed vLLM 0.32.0 does (paths relative to ``site-packages/vllm``; this module is written from
the description below, not from the code):

Where. Engram modules sit on the backbone layers ``engram_layer_ids`` only (``models/deepseek_v41/common/
engram.py:7-8``; ``amd/model.py:174-185``, ``nvidia/model.py:305-317``). The hashes of the whole flattened batch
are computed once per forward, before any sequence-parallel sharding (``amd/model.py:582-633``). In the decoder
layer the injection sits between the previous sublayer's mHC post and this layer's attention mHC pre, on the
full ``[T, hc_mult, D]`` stream: ``residual = engram(mhc_post(...), hashes[:, layer_index], mask)``, then the
pre-mix reads the injected stream (``amd/model.py:341-358``, ``nvidia/model.py:531-560``).

Token ids -> compressed ids. Each token id maps through ``token_map`` (``engram.py:135-183``: tokens whose
decoded text normalises alike (NFKC, NFD, strip accents, lowercase, whitespace runs -> one space, strip) share
one compressed id; built from the tokenizer, size ``engram_compressed_vocab_size``, checked at ``:449-461``).
This module takes ``token_map`` as an input (the tokenizer is not part of the numerics). The pad id is
``token_map[engram_pad_token_id]`` (``:462``).

Hash (``_hash_ids_kernel``, ``engram.py:279-420``; layout ``EngramLayout``, ``:208-243``; multipliers
``compute_hash_multipliers``, ``:186-205``). For a token at flat index t of request r, position p, with the
request's chunk starting at position c_r = positions[query_start_loc[r]] (``:330-347``), for shift
s = 0 .. N-1 (N = ``engram_max_ngram_size``):
  * the token at position p - s is read from the chunk (flat index t - s) when p - s >= c_r; else from the
    runner's ``lookback_token_ids[r, c_r - 1 - (p - s)]`` when that column is inside the lookback depth and
    the id is >= 0; else (no V1 slot cache: the V2 runner) it is the pad id (``:352-406``). So an n-gram never
    reads another request's tokens: history before the chunk comes from the request's own lookback row.
  * ``blocked`` becomes and stays True once p - s < 0 (before the sequence start) or the token is dead
    (an image-span token: ``amd/model.py:601-606``, ``common/mm_preprocess.py:50-56``) (``engram.py:407``);
    the value is the pad id while blocked, else the compressed id (``:408``). An unknown history token (pad
    fallback) does not block.
  * rolling ^= value * multiplier[layer, s] (int64; a multiplier is odd and at most 2B - 1 < (2^63-1) / C, B
    below, so no product of a compressed id < C overflows; the XOR of non-negative terms stays non-negative)
    (``:409-410``);
  * for s >= 1 (the (s+1)-gram; orders 2 .. N, no unigram hash), head h = 0 .. H-1 (H = ``engram_n_heads``):
    hash[t, layer, (s-1)*H + h] = rolling mod prime[layer][(s-1)*H + h] + offset[layer][(s-1)*H + h]
    (``:411-420``); output int32 [T, n_layers, (N-1)*H] (``:520-548``).
Multipliers: per layer id, ``numpy.random.default_rng(10007 * layer_id).integers(0, B, size=N, dtype=int64)``
* 2 + 1 with B = max(1, (2^63 - 1) // C // 2), C the compressed vocab size (``engram.py:193-205``). Primes: each
(layer, order, head) owns a prime-sized bucket range; the primes are handed out in order (layer, then order,
then head), each the smallest prime above ``engram_vocab_size - 1`` not yet used (``:227-239``): i.e. the
consecutive primes >= ``engram_vocab_size``. Offsets: within a layer, the exclusive running sum of its primes
(``:240-243``), so the ranges are disjoint in the layer's table.

Table and lookup (``ParallelEngramEmbedding``, ``engram.py:942-1183``; ``_engram_lookup_kernel``,
``:628-721``). One table per layer: ``weight`` float8_e4m3fn [num_embeddings, head_dim] (OCP bytes as the
checkpoint stores them, the same dtype on every platform: ``:1035-1080``; no fnuz conversion anywhere in
``models/deepseek_v41``) and ``weight_scale_inv`` uint8 [num_embeddings, head_dim / 32] UE8M0 bytes (one per
32 values). A row decodes as fp32(code) * 2^(byte - 127) (the scale byte shifted into the fp32 exponent field,
``:714-721``), stored bf16. Rows of the token's n_hash_cols = (N-1)*H hash ids are gathered into
[T, n_hash_cols, head_dim] and flattened (``Engram.embed`` / ``forward``, ``:1654-1688``).

Combination (``Engram``, ``:1513-1740``; ``_fused_engram_post_wkv_kernel``, ``:1185-1275``):
  kv = wkv(rows.flatten)  [T, (hc_mult + 1) * D]   (``ColumnParallelLinear(n_hash_cols*head_dim, D*(hc+1))``)
  for each hc copy h: x = stream[t, h], key = kv[t, h*D:(h+1)*D], value = kv[t, hc*D:(hc+1)*D] (shared),
    dot = sum_d x_d q[h, d] k[h, d] key_d * rsqrt(mean(x^2) + eps) * rsqrt(mean(key^2) + eps) / sqrt(D)
    gate = sigmoid(sign(dot) * sqrt(max(|dot|, 1e-6)))         (sign(0) = +; clamp 1e-6: ``:1545``)
    gate = 0 where token_mask is False (dead tokens pass through untouched)
    out[t, h] = x + gate * value
all in fp32 inside the kernel (inputs loaded .to(fp32)), stored in the stream's dtype (``:1230-1275``).
q_weight, k_weight: bf16 [hc_mult, D] (``:1565-1572``); eps = rms_norm_eps (``:1544``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..formats.minifloat import get_format

__all__ = ["hash_primes", "hash_offsets", "hash_multipliers", "ngram_rolling", "ngram_hash", "engram_lookup",
           "engram_gate", "engram_memory", "GATE_CLAMP", "SCALE_BLOCK"]

GATE_CLAMP = 1e-6      # engram.py:1545 (clamp_value)
SCALE_BLOCK = 32       # one UE8M0 scale per 32 table values (engram.py:958, block_size=32)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def hash_primes(n_layers: int, max_ngram_size: int, n_heads: int, engram_vocab_size: int) -> torch.Tensor:
    """[n_layers, (N-1)*H] int64: the consecutive primes >= engram_vocab_size, in (layer, order, head) order."""
    if max_ngram_size < 2 or n_heads < 1 or n_layers < 1 or engram_vocab_size < 1:
        raise ValueError(f"engram layout: need max_ngram_size >= 2, n_heads >= 1, layers >= 1, vocab >= 1; got "
                         f"{max_ngram_size}, {n_heads}, {n_layers}, {engram_vocab_size}")
    out, p = [], engram_vocab_size - 1
    for _ in range(n_layers * (max_ngram_size - 1) * n_heads):
        p += 1
        while not _is_prime(p):
            p += 1
        out.append(p)
    return torch.tensor(out, dtype=torch.int64).reshape(n_layers, (max_ngram_size - 1) * n_heads)


def hash_offsets(primes: torch.Tensor) -> torch.Tensor:
    """Exclusive running sum of each layer's primes: where each (order, head) bucket range starts."""
    return torch.cumsum(primes, dim=-1) - primes


def hash_multipliers(layer_ids, max_ngram_size: int, compressed_vocab_size: int) -> torch.Tensor:
    """[n_layers, N] int64 odd multipliers from the per-layer generator numpy default_rng(10007 * layer_id)."""
    if compressed_vocab_size < 1:
        raise ValueError(f"compressed_vocab_size: expected >= 1, got {compressed_vocab_size}")
    bound = max(1, (np.iinfo(np.int64).max // compressed_vocab_size) // 2)
    rows = [np.random.default_rng(10007 * int(lid)).integers(0, bound, size=max_ngram_size, dtype=np.int64)
            for lid in layer_ids]
    return torch.from_numpy(np.stack(rows) * 2 + 1)


def _check_hash_inputs(input_ids, positions, query_start_loc, token_map, dead_mask, lookback_token_ids,
                       lookback_dead_mask, multipliers, primes, offsets):
    T = input_ids.shape[0]
    if input_ids.dim() != 1 or positions.shape != input_ids.shape or dead_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids / positions / dead_mask: expected [T] each, got {tuple(input_ids.shape)}, "
                         f"{tuple(positions.shape)}, {tuple(dead_mask.shape)}")
    qsl = query_start_loc.long()
    if qsl.dim() != 1 or len(qsl) < 2 or int(qsl[0]) != 0 or int(qsl[-1]) != T or bool((qsl[1:] < qsl[:-1]).any()):
        raise ValueError(f"query_start_loc: expected non-decreasing [R+1] from 0 to T={T}, got {qsl.tolist()}")
    R = len(qsl) - 1
    if lookback_token_ids.dim() != 2 or lookback_token_ids.shape[0] != R:
        raise ValueError(f"lookback_token_ids: expected [R={R}, depth], got {tuple(lookback_token_ids.shape)}")
    if lookback_dead_mask.shape != lookback_token_ids.shape:
        raise ValueError(f"lookback_dead_mask: expected {tuple(lookback_token_ids.shape)}, got "
                         f"{tuple(lookback_dead_mask.shape)}")
    V = token_map.shape[0]
    for n, ids in (("input_ids", input_ids), ("lookback_token_ids", lookback_token_ids[lookback_token_ids >= 0])):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise IndexError(f"{n}: ids must lie in [0, {V}) (the token map's size), got [{int(ids.min())}, "
                             f"{int(ids.max())}]")
    if multipliers.dim() != 2 or primes.shape != offsets.shape or primes.shape[0] != multipliers.shape[0]:
        raise ValueError(f"multipliers [L, N] / primes, offsets [L, (N-1)*H]: got {tuple(multipliers.shape)}, "
                         f"{tuple(primes.shape)}, {tuple(offsets.shape)}")
    if primes.shape[1] % (multipliers.shape[1] - 1):
        raise ValueError(f"primes: {primes.shape[1]} columns is not (N-1) * H for N = {multipliers.shape[1]}")
    return qsl


def ngram_rolling(input_ids: torch.Tensor, positions: torch.Tensor, query_start_loc: torch.Tensor,
                  token_map: torch.Tensor, dead_mask: torch.Tensor, lookback_token_ids: torch.Tensor,
                  lookback_dead_mask: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor,
                  offsets: torch.Tensor, *, pad_id: int) -> torch.Tensor:
    """-> int64 [T, L, N]: the rolling XOR after shift s (column s), before any modulus (module docstring).

    Python integers throughout (exact; every value is below 2^63, see the module docstring)."""
    qsl = _check_hash_inputs(input_ids, positions, query_start_loc, token_map, dead_mask, lookback_token_ids,
                             lookback_dead_mask, multipliers, primes, offsets)
    T = input_ids.shape[0]
    L, N = multipliers.shape
    ids, pos, dead = input_ids.tolist(), positions.tolist(), dead_mask.bool().tolist()
    tmap = token_map.tolist()
    lb, lbd = lookback_token_ids.tolist(), lookback_dead_mask.bool().tolist()
    mult = multipliers.tolist()
    out = torch.empty(T, L, N, dtype=torch.int64)
    bounds = qsl.tolist()
    for r in range(len(bounds) - 1):
        lo, hi = bounds[r], bounds[r + 1]
        if lo == hi:
            continue
        c = pos[lo]                       # the chunk's first position
        for t in range(lo, hi):
            p = pos[t]
            values = []
            blocked = False
            for s in range(N):
                q = p - s
                if q >= c:                                  # in this request's chunk
                    src, is_dead = tmap[ids[t - s]], dead[t - s]
                else:
                    col = c - 1 - q
                    if 0 <= col < len(lb[r]) and lb[r][col] >= 0:
                        src, is_dead = tmap[lb[r][col]], lbd[r][col]
                    else:                                   # unknown history: the pad id (does not block)
                        src, is_dead = pad_id, False
                blocked = blocked or q < 0 or is_dead
                values.append(pad_id if blocked else src)
            for layer in range(L):
                rolling = 0
                for s in range(N):
                    rolling ^= values[s] * mult[layer][s]
                    out[t, layer, s] = rolling
    return out


def ngram_hash(input_ids: torch.Tensor, positions: torch.Tensor, query_start_loc: torch.Tensor,
               token_map: torch.Tensor, dead_mask: torch.Tensor, lookback_token_ids: torch.Tensor,
               lookback_dead_mask: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor,
               offsets: torch.Tensor, *, pad_id: int) -> torch.Tensor:
    """-> int64 [T, L, (N-1)*H] bucket ids: the (s+1)-gram's rolling value mod its (order, head) prime, plus the
    range's offset, for s = 1 .. N-1 (module docstring)."""
    rolling = ngram_rolling(input_ids, positions, query_start_loc, token_map, dead_mask, lookback_token_ids,
                            lookback_dead_mask, multipliers, primes, offsets, pad_id=pad_id)
    N = multipliers.shape[1]
    H = primes.shape[1] // (N - 1)
    per_col = rolling[:, :, 1:].repeat_interleave(H, dim=2)     # column (s-1)*H + h holds shift s
    return per_col % primes.unsqueeze(0) + offsets.unsqueeze(0)


def engram_lookup(hash_ids: torch.Tensor, table: torch.Tensor, table_scale: torch.Tensor, *,
                  dialect: str = "float8_e4m3fn") -> torch.Tensor:
    """Gather and dequantise: fp32 [T, n_hash_cols, head_dim], row i = decode(table[i]) * 2^(scale byte - 127)
    (exact in fp32 and in bf16: a 4-bit significand times a power of two). ``dialect``: how the bytes are read
    (the checkpoint's, and vLLM's on every platform, is float8_e4m3fn)."""
    if table.dtype != torch.uint8 or table_scale.dtype != torch.uint8:
        raise TypeError(f"table / table_scale: expected uint8 FP8 codes and UE8M0 bytes, got {table.dtype} / "
                        f"{table_scale.dtype}")
    if table.dim() != 2 or table.shape[1] % SCALE_BLOCK:
        raise ValueError(f"table: expected [rows, head_dim] with head_dim a multiple of {SCALE_BLOCK}, got "
                         f"{tuple(table.shape)}")
    rows, hd = table.shape
    if tuple(table_scale.shape) != (rows, hd // SCALE_BLOCK):
        raise ValueError(f"table_scale: expected [{rows}, {hd // SCALE_BLOCK}], got {tuple(table_scale.shape)}")
    if hash_ids.dim() != 2:
        raise ValueError(f"hash_ids: expected [T, n_hash_cols], got {tuple(hash_ids.shape)}")
    h = hash_ids.long()
    if h.numel() and (int(h.min()) < 0 or int(h.max()) >= rows):
        raise IndexError(f"hash_ids: bucket ids must lie in [0, {rows}) (the table's rows), got "
                         f"[{int(h.min())}, {int(h.max())}]")
    vals = torch.from_numpy(get_format(dialect).decode(table.numpy()))
    scale = torch.exp2(table_scale.double() - 127.0).repeat_interleave(SCALE_BLOCK, dim=1)
    return (vals * scale)[h].float()


def engram_gate(stream: torch.Tensor, kv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                token_mask: torch.Tensor | None, *, eps: float) -> torch.Tensor:
    """out[t, h] = x + gate * value (module docstring), in the promoted dtype of stream (>= fp32)."""
    T, hc, D = stream.shape
    if tuple(kv.shape) != (T, (hc + 1) * D):
        raise ValueError(f"kv: expected [{T}, {(hc + 1) * D}] ((hc_mult + 1) * D), got {tuple(kv.shape)}")
    dt = torch.promote_types(stream.dtype, torch.float32)
    x, kv = stream.to(dt), kv.to(dt)
    key = kv[:, :hc * D].reshape(T, hc, D)
    value = kv[:, hc * D:].unsqueeze(1)
    rx = torch.rsqrt(x.square().mean(-1) + eps)
    rk = torch.rsqrt(key.square().mean(-1) + eps)
    dot = (x * q_weight.to(dt) * k_weight.to(dt) * key).sum(-1) * rx * rk / math.sqrt(D)
    g_in = torch.sqrt(dot.abs().clamp_min(GATE_CLAMP))
    gate = torch.sigmoid(torch.where(dot < 0, -g_in, g_in))
    if token_mask is not None:
        gate = torch.where(token_mask.bool().unsqueeze(-1), gate, torch.zeros_like(gate))
    return x + gate.unsqueeze(-1) * value


def engram_memory(stream: torch.Tensor, hash_ids: torch.Tensor, table: torch.Tensor, table_scale: torch.Tensor,
                  wkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                  token_mask: torch.Tensor | None, *, eps: float, dialect: str = "float8_e4m3fn") -> dict:
    """-> {"rows": looked-up rows [T, n_hash_cols, head_dim], "out": the injected stream [T, hc, D]}."""
    if stream.dim() != 3:
        raise ValueError(f"stream: expected [T, hc_mult, D], got {tuple(stream.shape)}")
    if hash_ids.shape[0] != stream.shape[0]:
        raise ValueError(f"hash_ids: expected {stream.shape[0]} rows (one per token), got {hash_ids.shape[0]}")
    dt = torch.promote_types(stream.dtype, torch.float32)
    rows = engram_lookup(hash_ids, table, table_scale, dialect=dialect).to(dt)
    T, hc, D = stream.shape
    if tuple(wkv.shape) != ((hc + 1) * D, rows.shape[1] * rows.shape[2]):
        raise ValueError(f"wkv: expected [{(hc + 1) * D}, {rows.shape[1] * rows.shape[2]}], got {tuple(wkv.shape)}")
    kv = rows.reshape(T, -1) @ wkv.to(dt).T
    return {"rows": rows, "out": engram_gate(stream, kv, q_weight, k_weight, token_mask, eps=eps)}
