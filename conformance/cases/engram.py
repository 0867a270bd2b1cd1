"""DeepSeek-V4.1 Engram (``references.components.engram``; its docstring has the vLLM 0.32 provenance): two
components, split where vLLM splits the work and where the comparison changes kind.

``engram.hash``: token ids -> n-gram bucket ids, ``NgramHashState.forward`` / ``_hash_ids_kernel``
(``models/deepseek_v41/common/engram.py:279-420``, ``:520-600``). Inputs as the model passes them
(``amd/model.py:601-626``): the flattened batch's ``input_ids``, ``positions``, ``query_start_loc`` (requests
packed back to back), ``dead_mask`` (image-span tokens), the runner's ``lookback_token_ids [R, N-1]`` (ids just
before each request's chunk; -1 unknown) with their dead mask, and the layout tensors (multipliers, primes,
offsets: computed by the case from the config fields with ``references.components.engram``'s layout functions,
which follow ``EngramLayout`` / ``compute_hash_multipliers``) plus ``token_map`` and ``pad_id``. Output
``hashes`` int [T, L, (N-1)*H], compared exactly at every level (integer arithmetic; vLLM returns int32, the
golden int64: equal values pass). A mismatch is diagnosed: the n-gram orders and heads it hits, whether it is
confined to tokens within N-1 of their request's chunk start (history crossing a request boundary / lookback) or
of the sequence start (pad masking), whether the bucket ids leave their (order, head) range [offset,
offset + prime) (a wrong modulus), and a constant got - want (an off-by-one).

``engram.memory``: bucket ids -> the injected hc stream, ``Engram.forward`` (``engram.py:1676-1740``): the
FP8 table lookup (``_engram_lookup_kernel``: OCP e4m3fn codes x UE8M0 per 32 values, bf16 rows), ``wkv``, the
gate and the residual add (``_fused_engram_post_wkv_kernel``). Outputs ``rows`` (the looked-up rows, [T,
n_hash_cols, head_dim]) and ``out`` ([T, hc_mult, D]).

Scope of wkv. vLLM builds wkv as a ``ColumnParallelLinear`` with the model's quant config (``engram.py:1555-1564``),
so on a V4.1 checkpoint with 32x32 UE8M0 blocks it is an MXFP8 linear (``quant_config.py:221-243``:
``ModelOptLinearMethod(QuantSpec(weight=kMxfp8Static, activation=kMxfp8Dynamic), CkptCtx(scale_block_size=(32,
32)))``; in the checkpoint's ignored layers it is ``UnquantizedLinearMethod``, bf16). Both are rows here:
  * bf16 wkv (rows without ``wkv_scale``): ``wkv`` a float weight;
  * MXFP8 wkv (rows ``.../mxfp8-wkv/...``): ``wkv`` uint8 OCP e4m3fn codes [(hc+1) D, K] and ``wkv_scale`` uint8
    UE8M0 bytes [(hc+1) D / 32, K / 32] (one per 32x32 tile), as the checkpoint stores them. The golden
    dequantises the weight exactly (a checkpoint value) and keeps the activations unquantised. Serving: the V4.1
    MXFP8 linear of ``cases.linear._mxfp8_serving`` (module docstring of ``cases.linear``): gfx942
    EmulationMxfp8LinearKernel, a bf16 GEMM on the exactly dequantised weight; native MX (gfx950
    rocm_mxfp8_block32_gemm, SM100 FlashInfer; the ``ocp`` profile) MXFP8 activations in 1x32 K groups, one fp32
    partial product per 32-wide block. On the Engram that activation quantisation is EXACT: wkv's input is the
    looked-up rows, already e4m3fn codes x one UE8M0 scale per 32 values with the 32-blocks aligned to wkv's K
    groups (head_dim a multiple of 32), so 2^ceil(log2(amax / 448)) <= the row block's own scale and every code
    re-scales by a power of two within range; vLLM's DP-sharded batch path stages exactly those table bytes as
    the MXFP8 input (``EngramBatch``, ``engram.py:1355-1390``, ``:1501-1510``). The bound therefore needs no
    activation-rounding term; it uses the dequantised weight (``memory_bound``). A failing ``out`` on these rows
    is tested against two known wkv mistakes (``_wkv_diagnosis``): the 32x32 scale grid read as 128x128 blocks
    and the OCP weight codes read as fnuz.

Serving numerics (``emulate(profile)``; the same kernels on ROCm and CUDA: everything is in ``common/engram.py``):
  * hashes: integer, identical on every platform;
  * rows: the table is float8_e4m3fn on every platform (``ParallelEngramEmbedding._allocate_weights``,
    ``engram.py:1035-1080``; nothing in ``models/deepseek_v41`` converts it to fnuz), so gfx942 decodes the
    checkpoint's OCP bytes as OCP: the lookup kernel loads the table as Triton fp8e4nv and converts to fp32
    (``engram.py:690-721``); gfx942 has no OCP FP8 conversion instructions, so this relies on Triton lowering
    fp8e4nv -> fp32 there (not checked on a device in this project); where it does, code x 2^(byte-127) is exact
    in fp32 and stored bf16 exactly. gfx942 and OCP emulations are therefore the same function. A platform that
    "normalises" the table to its fp8 dtype (reads the bytes as fnuz) halves every row and turns 0x80 (OCP -0)
    into NaN: the ``rows`` comparison names it (x0.5 / NaN at 0x80).
  * kv = bf16(rows_bf16 @ wkv_bf16^T, fp32 accumulation); the gate kernel loads stream and kv to fp32, computes
    in fp32, stores ``out`` in the stream's dtype (bf16).
"""

from __future__ import annotations

import math

import torch

from references.components.engram import (
    GATE_CLAMP,
    engram_gate,
    engram_lookup,
    engram_memory,
    hash_multipliers,
    hash_offsets,
    hash_primes,
    ngram_hash,
    ngram_rolling,
)
from references.config import TINY_V41, V41_FLASH_FACTS
from references.formats.minifloat import get_format

from ..components import ComponentSpec, OutputSpec, register
from ..metrics import Comparison, compare_exact, compare_float
from ..ratio import ratio_signature
from ..tolerances import Tolerance
from ._case import Case, add, dist_tensor
from ._serving import U32, UB

# Case-local Engram configs (the presets carry no engram fields). TINY: TINY_V41's vocab (1024) and hidden size
# (256), hc_mult 4, two engram layers, head_dim 64 (two UE8M0 blocks per row, so a misaligned scale read
# shows). FLASH: what the installed vLLM states of V4.1-Flash: engram layers 1 and
# 14 (amd/model.py:582-585), lookback depth 3, i.e. max_ngram_size 4 (engram.py:10-12, :22-25), hidden 5120
# (references.config.V41_FLASH_FACTS); n_heads, head_dim and the vocab sizes are not stated there (chosen).
TINY = dict(vocab=TINY_V41.vocab_size, layer_ids=(1, 3), max_ngram_size=3, n_heads=4, head_dim=64,
            engram_vocab_size=1000, compressed_vocab_size=600, pad_token_id=1, d=TINY_V41.hidden_size,
            hc=TINY_V41.hc_mult)
FLASH = dict(vocab=4096, layer_ids=(1, 14), max_ngram_size=4, n_heads=8, head_dim=64, engram_vocab_size=5000,
             compressed_vocab_size=3000, pad_token_id=1, d=V41_FLASH_FACTS["hidden_size"], hc=4)
EPS = TINY_V41.rms_norm_eps            # Engram's eps is rms_norm_eps (engram.py:1544)


def layout(cfg: dict) -> dict:
    """The hash layout tensors of a case config (references.components.engram)."""
    L, N, H = len(cfg["layer_ids"]), cfg["max_ngram_size"], cfg["n_heads"]
    primes = hash_primes(L, N, H, cfg["engram_vocab_size"])
    return {"multipliers": hash_multipliers(cfg["layer_ids"], N, cfg["compressed_vocab_size"]), "primes": primes,
            "offsets": hash_offsets(primes)}


# ------------------------------------------------------------------------------------------------ engram.hash
def engram_hash_golden(input_ids, positions, query_start_loc, token_map, dead_mask, lookback_token_ids,
                       lookback_dead_mask, multipliers, primes, offsets, *, pad_id: int) -> dict:
    """-> {"hashes": int64 [T, L, (N-1)*H]} (``references.components.engram.ngram_hash``)."""
    return {"hashes": ngram_hash(input_ids, positions, query_start_loc, token_map, dead_mask, lookback_token_ids,
                                 lookback_dead_mask, multipliers, primes, offsets, pad_id=pad_id)}


def _emulate_hash(profile: str):
    def engram_hash_serving(*args, **kwargs):
        """Integer hashing: the same values on every platform (one Triton kernel in common/engram.py)."""
        return engram_hash_golden(*args, **kwargs)

    engram_hash_serving.__qualname__ = f"engram_hash_serving[{profile}]"
    return engram_hash_serving


def _token_context(kw: dict):
    """Per flat token: request index, offset from its chunk start, position."""
    qsl = kw["query_start_loc"].long().tolist()
    T = kw["input_ids"].shape[0]
    req = torch.empty(T, dtype=torch.long)
    rel = torch.empty(T, dtype=torch.long)
    for r in range(len(qsl) - 1):
        req[qsl[r]:qsl[r + 1]] = r
        rel[qsl[r]:qsl[r + 1]] = torch.arange(qsl[r + 1] - qsl[r])
    return req, rel, kw["positions"].long()


def _dead_in_window(kw: dict, N: int) -> torch.Tensor:
    """Per flat token: a dead token among the N positions its longest n-gram reads (chunk, then lookback row)."""
    qsl = kw["query_start_loc"].long().tolist()
    dead, lbd, lb = kw["dead_mask"].bool().tolist(), kw["lookback_dead_mask"].bool().tolist(), \
        kw["lookback_token_ids"].tolist()
    out = torch.zeros(len(dead), dtype=torch.bool)
    for r in range(len(qsl) - 1):
        for t in range(qsl[r], qsl[r + 1]):
            k = t - qsl[r]
            hit = any(dead[t - s] for s in range(min(N, k + 1)))
            hit |= any(lbd[r][c] and lb[r][c] >= 0 for c in range(min(N - 1 - k, len(lbd[r]))) if N - 1 - k > 0)
            out[t] = hit
    return out


def diagnose_hash(got: torch.Tensor, want: torch.Tensor, kw: dict) -> str:
    """What a hash mismatch hits (module docstring): orders, token context, bucket ranges, constant offsets, and
    which hypothesis the wrong ids fit (another order's rolling value, a modulus of prime + k)."""
    g, w = got.long(), want.long()
    bad = g != w
    C = w.shape[2]
    N = kw["multipliers"].shape[1]
    H = C // (N - 1)
    req, rel, pos = _token_context(kw)
    tok = bad.flatten(1).any(1)
    parts = []
    orders = {s + 2: int(bad[:, :, s * H:(s + 1) * H].sum()) for s in range(N - 1)}
    parts.append("mismatches by n-gram order " + ", ".join(f"{n}: {c}" for n, c in orders.items()))
    nt = int(tok.sum())
    near_chunk, near_seq = rel < N - 1, pos < N - 1
    parts.append(f"{nt} / {len(tok)} tokens differ; {int((tok & near_chunk).sum())} of them within {N - 1} of "
                 f"their request's chunk start, {int((tok & near_seq).sum())} within {N - 1} of the sequence start")
    # a confinement is only evidence where tokens outside it exist (and are right)
    dead_near = _dead_in_window(kw, N)
    if bool((tok & dead_near).any()):
        parts.append(f"{int((tok & dead_near).sum())} of them have a dead token in their n-gram window, "
                     f"{int((tok & ~dead_near).sum())} not" + (" (dead / image tokens must block: pad from the dead "
                                                              "token on)" if not bool((tok & ~dead_near).any())
                                                              else ""))
    at_starts = nt and not bool((tok & ~near_chunk).any()) and bool((~near_chunk).any())
    at_seq = nt and not bool((tok & ~near_seq).any()) and bool((~near_seq).any())
    crossing = at_starts and not bool((tok & (req == 0)).any()) and bool((tok & (req > 0)).any())
    seq_msg = ("only near the sequence start: the positions before 0 (pad / blocked history) are not masked as "
               "vLLM masks them (pad id from the first missing token on)")
    cross_msg = ("only near chunk starts, and only of requests packed after another (the batch's first request "
                 "is right): the history crosses the request boundary (an n-gram must read only its own "
                 "request's tokens: the chunk, then lookback_token_ids)")
    if at_seq and crossing:
        parts.append(f"this case cannot tell which: {seq_msg}; or {cross_msg}")
    elif crossing:
        parts.append(cross_msg)
    elif at_seq:
        parts.append(seq_msg)
    elif at_starts:
        parts.append("only near chunk starts: the history read across the request boundary or the lookback ids "
                     "(an n-gram must read only its own request's tokens: the chunk, then lookback_token_ids)")
    off = kw["offsets"].long().unsqueeze(0).expand_as(g)
    prime = kw["primes"].long().unsqueeze(0).expand_as(g)
    outside = int(((g < off) | (g >= off + prime)).sum())
    if outside:
        parts.append(f"{outside} bucket ids outside their (order, head) range [offset, offset + prime): a wrong "
                     f"modulus or offset")
    d = (g - w)[bad]
    if d.numel() and bool((d == d[0]).all()):
        parts.append(f"got - want = {int(d[0]):+d} at every mismatch (an off-by-one in the bucket id)")
    else:
        hk = {k: kw[k] for k in ("input_ids", "positions", "query_start_loc", "token_map", "dead_mask",
                                 "lookback_token_ids", "lookback_dead_mask", "multipliers", "primes", "offsets",
                                 "pad_id")}
        roll = ngram_rolling(**hk)                                    # [T, L, N]
        fits = []
        for s in range(N - 1):               # an order's wrong ids are another n-gram's rolling value there
            cols = slice(s * H, (s + 1) * H)
            b_s = bad[:, :, cols]
            if not bool(b_s.any()):
                continue
            for s2 in range(N):
                if s2 == s + 1:
                    continue
                cand = roll[:, :, s2:s2 + 1] % prime[:, :, cols] + off[:, :, cols]
                if bool((cand[b_s] == g[:, :, cols][b_s]).all()):
                    fits.append(f"order {s + 2}'s columns hold the {s2 + 1}-gram's rolling value")
        for k in (-2, -1, 1, 2):
            cand = roll[:, :, 1:].repeat_interleave(H, dim=2) % (prime + k) + off
            if bool((cand[bad] == g[bad]).all()):
                fits.append(f"rolling mod (prime {k:+d})")
        if fits:
            parts.append("the wrong ids are exactly " + " / ".join(fits) + " (in each column's bucket range)")
    t, layer, col = torch.nonzero(bad)[0].tolist()
    parts.append(f"first at token {t} (request {int(req[t])}, position {int(pos[t])}), layer index {layer}, order "
                 f"{col // H + 2}, head {col % H}")
    return "hash diagnosis: " + "; ".join(parts)


def compare_hash(got: dict, want: dict, params: dict, level: str, label: str, kwargs: dict) -> list[Comparison]:
    if "hashes" not in got:
        return [Comparison("hashes", "fail", message=f"{label} hashes: the subject returned no 'hashes' output "
                                                     f"(returned {sorted(got)})")]
    g = got["hashes"]
    if torch.is_tensor(g) and g.is_floating_point():
        return [Comparison("hashes", "fail", message=f"{label} hashes: expected integer bucket ids, got {g.dtype}")]
    c = compare_exact(g.long() if torch.is_tensor(g) else g, want["hashes"], output="hashes", label=label)
    if c.verdict != "pass" and c.worst:
        c.message += "; " + diagnose_hash(g, want["hashes"], kwargs)
    return [c]


register(ComponentSpec(
    name="engram.hash", family="engram", reference=engram_hash_golden,
    outputs=(OutputSpec("hashes", kind="exact"),),
    description="V4.1 Engram n-gram hashing: compressed ids of the n-grams (orders 2..N) ending at each token, "
                "history from the request's chunk then its lookback ids (never another request), pad from the "
                "sequence start / a dead token on, rolling XOR of id x multiplier, mod a per-(order, head) prime "
                "+ offset",
    spec_section="V4.1 (vLLM models/deepseek_v41/common/engram.py)", emulate=_emulate_hash, compare=compare_hash,
))


def _token_map(g, cfg):
    m = torch.randint(0, cfg["compressed_vocab_size"], (cfg["vocab"],), generator=g)
    m[: cfg["compressed_vocab_size"]] = torch.randperm(cfg["compressed_vocab_size"], generator=g)[:cfg["vocab"]]
    return m[torch.randperm(cfg["vocab"], generator=g)]       # every compressed id used, tokens collide


def hash_inputs(g, cfg, lens, starts, *, lookback="full", dead_share=0.0, pad_share=0.0, high_ids=False):
    """Packed requests: request r holds positions starts[r] .. starts[r] + lens[r] - 1; its lookback row holds
    the ids of positions starts[r] - 1, starts[r] - 2, ... ("full"), some unknown (-1, "partial"), or none."""
    V, N = cfg["vocab"], cfg["max_ngram_size"]
    ids, pos, lb = [], [], []
    for n, s in zip(lens, starts):
        seq = torch.randint(0, V, (s + n,), generator=g)
        if high_ids:          # ids at the vocab bound: a map read off its end shows
            seq[torch.rand(s + n, generator=g) < 0.3] = V - 1
            seq[torch.rand(s + n, generator=g) < 0.2] = V - 2
        if pad_share:         # the pad token itself inside the text
            seq[torch.rand(s + n, generator=g) < pad_share] = cfg["pad_token_id"]
        ids.append(seq[s:])
        pos.append(torch.arange(s, s + n))
        row = torch.full((N - 1,), -1, dtype=torch.long)
        for j in range(min(N - 1, s)):
            row[j] = seq[s - 1 - j]
        if lookback == "partial":
            row[torch.rand(N - 1, generator=g) < 0.5] = -1
        elif lookback == "none":
            row[:] = -1
        lb.append(row)
    input_ids = torch.cat(ids)
    qsl = torch.zeros(len(lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(lens), 0).to(torch.int32)
    dead = torch.rand(input_ids.shape, generator=g) < dead_share
    lbt = torch.stack(lb)
    lbd = (torch.rand(lbt.shape, generator=g) < dead_share) & (lbt >= 0)
    tmap = _token_map(g, cfg)
    return dict({"input_ids": input_ids, "positions": torch.cat(pos), "query_start_loc": qsl, "token_map": tmap,
                 "dead_mask": dead, "lookback_token_ids": lbt, "lookback_dead_mask": lbd}, **layout(cfg),
                pad_id=int(tmap[cfg["pad_token_id"]]))


def _make_hash(g, p):
    cfg = FLASH if p["cfg"] == "flash" else TINY
    return hash_inputs(g, cfg, p["lens"], p["starts"], lookback=p.get("lookback", "full"),
                       dead_share=p.get("dead", 0.0), pad_share=p.get("pad", 0.0), high_ids=p.get("high", False))


# (tag, cfg, lens, starts, extra, seed, tier)
HASH_ROWS = [
    # decode: one token per request at positions 0 / 1 / 2 / 50 (shorter than the order at the first three),
    # history only from the lookback rows
    ("decode", "tiny", (1, 1, 1, 1), (0, 1, 2, 50), {}, 0, "fast"),
    # a packed prefill from position 0: prompts of 1, 2 and 9 tokens back to back (boundary crossings show)
    ("prefill", "tiny", (1, 2, 9), (0, 0, 0), {}, 1, "fast"),
    # chunked prefill: chunks starting mid-sequence with half the lookback ids unknown (-1: the pad id)
    ("chunked", "tiny", (6, 4, 5), (7, 1, 30), {"lookback": "partial"}, 2, "fast"),
    # the pad token in the text, dead (image) tokens in the chunk and in the lookback, ids at the vocab bound
    ("prefill", "tiny", (12, 3, 8), (0, 5, 2), {"pad": 0.15, "dead": 0.12, "high": True}, 3, "fast"),
    # V4.1-Flash layout (layers 1 and 14, orders 2..4), a decode batch and a packed prefill
    ("decode", "flash", (1, 1, 1), (0, 2, 900), {}, 4, "fast"),
    ("prefill", "flash", (3, 17, 2), (0, 0, 40), {"dead": 0.15, "high": True}, 5, "fast"),
    # long prompts (full tier)
    ("prefill", "flash", (2048, 700), (0, 100), {"dead": 0.01, "pad": 0.01, "high": True}, 6, "full"),
]
for tag, cfg, lens, starts, extra, seed, tier in HASH_ROWS:
    name = "-".join(k for k in ("lookback", "pad", "dead", "high") if k in extra) or "plain"
    add(Case(f"engram.hash/{tag}/{cfg}/r{len(lens)}t{sum(lens)}/{name}/s{seed}", "engram.hash", _make_hash,
             dict({"cfg": cfg, "lens": lens, "starts": starts}, **extra), seed, "tokens",
             (tag, "engram") + tuple(k for k in ("pad", "dead") if k in extra) + (("long",) if tier == "full" else ()),
             tier=tier))


# ------------------------------------------------------------------------------------------------ engram.memory
def wkv_weight(wkv: torch.Tensor, wkv_scale: torch.Tensor | None, *, scale_block: int = 32,
               dialect: str = "float8_e4m3fn") -> torch.Tensor:
    """The wkv weight as a float tensor: ``wkv`` itself (bf16 wkv), or the MXFP8 checkpoint's codes x
    2^(byte - 127) of their 32x32 tile (exact). ``scale_block`` / ``dialect`` exist for the diagnosis only."""
    if wkv_scale is None:
        return wkv
    from references.formats.blockscale import dequantize_fp8

    if wkv.dtype != torch.uint8 or wkv_scale.dtype != torch.uint8:
        raise TypeError(f"wkv / wkv_scale: expected uint8 OCP e4m3fn codes and UE8M0 bytes, got {wkv.dtype} / "
                        f"{wkv_scale.dtype}")
    n, k = wkv.shape
    if tuple(wkv_scale.shape) != (n // 32, k // 32) or n % 32 or k % 32:
        raise ValueError(f"wkv_scale: expected [{n // 32}, {k // 32}] (one byte per 32x32 tile of wkv {n}x{k}), got "
                         f"{tuple(wkv_scale.shape)}")
    sc = wkv_scale
    if scale_block != 32:   # the grid read as scale_block tiles: tile (i // b, j // b) of the 32-grid
        r = scale_block // 32
        sc = wkv_scale[::r, ::r].repeat_interleave(r, 0).repeat_interleave(r, 1)[: n // 32, : k // 32]
    from references.formats.blockscale import BlockFP8

    return dequantize_fp8(wkv, sc, BlockFP8.of(dialect, (32, 32)))


def engram_memory_golden(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, token_mask, *,
                         eps: float, wkv_scale=None) -> dict:
    """-> {"rows": [T, n_hash_cols, head_dim], "out": [T, hc, D]} (``references.components.engram
    .engram_memory``; table: OCP e4m3fn codes, table_scale: UE8M0 bytes per 32 values; wkv unquantised, or
    MXFP8 codes with ``wkv_scale`` dequantised exactly: ``wkv_weight``)."""
    w = wkv_weight(wkv, wkv_scale)
    return engram_memory(stream, hash_ids, table, table_scale, w, q_weight, k_weight, token_mask, eps=eps)


def _bf16(t):
    return t.to(torch.bfloat16).float()


def _emulate_memory(profile: str):
    def engram_memory_serving(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, token_mask, *, eps,
                              wkv_scale=None):
        """Lookup (OCP decode on every platform, bf16 rows), bf16 wkv GEMM with fp32 accumulation and bf16 kv
        (MXFP8 wkv: the profile's V4.1 MXFP8 linear, ``cases.linear._mxfp8_serving``), the fp32 gate kernel, out
        stored bf16 (module docstring)."""
        rows = _bf16(engram_lookup(hash_ids, table, table_scale, dialect="float8_e4m3fn"))
        T = stream.shape[0]
        if wkv_scale is not None:
            from .linear import _mxfp8_serving

            wkv_weight(wkv, wkv_scale)          # the input checks
            kv = _mxfp8_serving(profile, rows.reshape(T, -1), wkv, wkv_scale)["y"]
        else:
            kv = _bf16(rows.reshape(T, -1) @ _bf16(wkv).T)
        out = engram_gate(_bf16(stream), kv, _bf16(q_weight), _bf16(k_weight), token_mask, eps=eps)
        return {"rows": rows, "out": _bf16(out)}

    engram_memory_serving.__qualname__ = f"engram_memory_serving[{profile}]"
    return engram_memory_serving


# Per level: (u_kv, a_kv, u_out, red): kv's relative output rounding, kv's accumulation error per unit of
# S = |rows| |wkv|^T (with K the reduction length), out's output rounding, and the gate's fp32 D-long
# reductions (per unit of their magnitude). fp64: the fp32 golden against fp64 (kv not rounded, fp32
# accumulation gamma_K ~ (K+1) u32, fp32 out). fp32: two fp32 evaluations. serving: + bf16 kv (ub) and bf16 out
# (ub). emulated: both sides round kv and out to bf16 from fp32 sums in their own order: one bf16 ulp (2 ub)
# either way, and twice the fp32 terms.
def _levels(level: str, K: int, D: int):
    acc, red = (K + 1) * U32, (D + 6) * U32
    return {"fp64": (0.0, acc, U32, red), "fp32": (0.0, 2 * acc, 2 * U32, 2 * red),
            "serving": (UB, acc, UB, red), "emulated": (2 * UB, 2 * acc, 2 * UB, 2 * red)}[level]


def memory_bound(kw: dict, level: str) -> torch.Tensor:
    """Per-element bound on |out - golden| [T, hc, D] (fp64), propagated through the gate:
      kv:   delta_kv = u_kv |kv| + a_kv S;  key / value are kv's slices (delta_key, delta_val)
      rms:  mean(key^2) moves by at most 2 rho, rho = (sum |key| delta + sum delta^2 / 2) / (sum key^2 + D eps),
            so rsqrt moves by eps_r <= 2 rho / (1 - 2 rho) (relative)
      dot:  |d dot| <= P (1 + eps_r) + |dot| eps_r + red (A + P), A = sum |x q k key| rx rk / sqrt(D),
            P = sum |x q k| delta_key rx rk / sqrt(D)
      gate: g_in = sign(dot) sqrt(max(|dot|, 1e-6)): where d dot <= |dot| / 2 and |dot| / 2 >= 1e-6 its change is
            at most d dot / (2 sqrt(|dot| / 2)) (sqrt' at the interval's low end); else (a sign change or the
            clamp) sqrt(2 d dot) + 2e-3 (|sqrt a - sqrt b| <= sqrt|a - b|, the clamp's +-1e-3 jump); sigmoid'
            <= 1/4; + 4 u32 for the fp32 sqrt / sigmoid; at most 1; 0 on masked tokens
      out:  u_out |out| + gate delta_val + |val| d gate + delta_val d gate + 2 u32 (|x| + gate |val|)."""
    x = kw["stream"].double()
    T, hc, D = x.shape
    rows = engram_lookup(kw["hash_ids"], kw["table"], kw["table_scale"]).double().reshape(T, -1)
    w = wkv_weight(kw["wkv"], kw.get("wkv_scale")).double()
    K = rows.shape[1]
    u_kv, a_kv, u_out, red = _levels(level, K, D)
    kv = rows @ w.T
    S = rows.abs() @ w.abs().T
    dkv = u_kv * kv.abs() + a_kv * S
    key, dkey = kv[:, :hc * D].reshape(T, hc, D), dkv[:, :hc * D].reshape(T, hc, D)
    val, dval = kv[:, hc * D:].unsqueeze(1), dkv[:, hc * D:].unsqueeze(1)
    eps = kw["eps"]
    rx = torch.rsqrt(x.square().mean(-1) + eps)
    rk = torch.rsqrt(key.square().mean(-1) + eps)
    qk = kw["q_weight"].double() * kw["k_weight"].double()
    rho = ((key.abs() * dkey).sum(-1) + dkey.square().sum(-1) / 2) / (key.square().sum(-1) + D * eps)
    eps_r = torch.where(rho < 0.25, 2 * rho / (1 - 2 * rho), torch.full_like(rho, math.inf))
    f = rx * rk / math.sqrt(D)
    dot = (x * qk * key).sum(-1) * f
    A = (x * qk * key).abs().sum(-1) * f
    P = (x * qk).abs().mul(dkey).sum(-1) * f
    ddot = P * (1 + eps_r) + dot.abs() * eps_r + red * (A + P)
    smooth = (ddot <= dot.abs() / 2) & (dot.abs() / 2 >= GATE_CLAMP)
    dg_in = torch.where(smooth, ddot / (2 * torch.sqrt((dot.abs() / 2).clamp_min(GATE_CLAMP))),
                        torch.sqrt(2 * ddot) + 2 * math.sqrt(GATE_CLAMP))
    dgate = (dg_in / 4 + 4 * U32).clamp(max=1.0)
    g_in = torch.sqrt(dot.abs().clamp_min(GATE_CLAMP))
    gate = torch.sigmoid(torch.where(dot < 0, -g_in, g_in))
    mask = kw.get("token_mask")
    if mask is not None:
        keep = mask.bool().unsqueeze(-1)
        gate, dgate = torch.where(keep, gate, 0.0), torch.where(keep, dgate, 0.0)
    gate, dgate = gate.unsqueeze(-1), dgate.unsqueeze(-1)
    out = x + gate * val
    return (u_out * out.abs() + gate * dval + val.abs() * dgate + dval * dgate
            + 2 * U32 * (x.abs() + gate * val.abs()))


def memory_rms_variance(kw: dict, level: str) -> tuple[torch.Tensor, str]:
    """Per-element expected squared error E[e^2] of out [T, hc, D] (fp64): the quadrature (RMS) model of the
    sources ``memory_bound`` sums worst case (``conformance.rms``: a round-to-nearest step of unit roundoff u has
    variance <= u^2/3 of its value; independent sources add; docs/rms-limits.md).
      kv     serving: bf16 kv ub^2/3 kv^2 + the fp32 K-long accumulation, K + 1 roundings of partial sums <= S:
             (K+1) u32^2/3 S^2;
             emulated: one intermediate bf16 rounding placed differently + flips under the fp32 order
             r = sqrt(2 (K+1)/3) u32 of S: ub^2 kv^2 + 2 ub r |kv| S + r^2 S^2 (as ``cases._serving``)
      dot    linearised: d dot = sum_d c_d dkey_d, c_d = f x_d qk_d - dot key_d / (sum key^2 + D eps) (the key's
             own rsqrt moves with it), var = sum_d c_d^2 var(key_d) + (D+6) u32^2/3 A^2 (fp32 reductions)
      gate   g'(dot) = sigmoid'(g_in) / (2 sqrt|dot|) where the linearisation holds (6 sd(dot) <= |dot| / 2 and
             |dot| / 2 >= the 1e-6 clamp); elsewhere (a sign change or the clamp within reach) the element's whole
             elementwise bound as one uniform step, bound^2/3 (the fallback, per element); 0 on masked tokens
      out    gate^2 var(val) + val^2 var(gate) + the out rounding (serving ub^2/3 out^2; emulated (ub^2 + 2 ub r_o
             + r_o^2) out^2, r_o = sqrt(2 (D+6)/3) u32) + (2 u32 (|x| + gate |val|))^2/3."""
    x = kw["stream"].double()
    T, hc, D = x.shape
    rows = engram_lookup(kw["hash_ids"], kw["table"], kw["table_scale"]).double().reshape(T, -1)
    w = wkv_weight(kw["wkv"], kw.get("wkv_scale")).double()
    K = rows.shape[1]
    # the fp32 reductions in quadrature: K + 1 (D + 6) roundings, each of a partial sum <= the magnitude sum S
    # (A), variance u32^2/3 each: (K + 1) u32^2/3 S^2 in place of the worst-case ((K + 1) u32 S)^2 (twice at fp32)
    f32 = 1 if level == "fp64" else 2
    a2_kv, red2 = f32 * (K + 1) * U32**2, f32 * (D + 6) * U32**2
    kv = rows @ w.T
    S = rows.abs() @ w.abs().T
    if level == "emulated":
        r = math.sqrt(2 * (K + 1) / 3) * U32
        vkv = UB**2 * kv.square() + 2 * UB * r * kv.abs() * S + (r * S).square()
        ro = math.sqrt(2 * (D + 6) / 3) * U32
        u_out2 = UB**2 + 2 * UB * ro + ro * ro
    elif level == "serving":
        vkv = UB**2 / 3 * kv.square() + a2_kv * S.square() / 3
        u_out2 = UB**2 / 3
    else:
        vkv = a2_kv * S.square() / 3
        u_out2 = (U32 if level == "fp64" else 2 * U32) ** 2 / 3
    key, vkey = kv[:, :hc * D].reshape(T, hc, D), vkv[:, :hc * D].reshape(T, hc, D)
    val, vval = kv[:, hc * D:].unsqueeze(1), vkv[:, hc * D:].unsqueeze(1)
    eps = kw["eps"]
    rx = torch.rsqrt(x.square().mean(-1) + eps)
    rk = torch.rsqrt(key.square().mean(-1) + eps)
    qk = kw["q_weight"].double() * kw["k_weight"].double()
    f = rx * rk / math.sqrt(D)
    dot = (x * qk * key).sum(-1) * f
    A = (x * qk * key).abs().sum(-1) * f
    c = f.unsqueeze(-1) * x * qk - (dot / (key.square().sum(-1) + D * eps)).unsqueeze(-1) * key
    vdot = (c.square() * vkey).sum(-1) + red2 * A.square() / 3
    g_in = torch.sqrt(dot.abs().clamp_min(GATE_CLAMP))
    gate = torch.sigmoid(torch.where(dot < 0, -g_in, g_in))
    gprime = gate * (1 - gate) / (2 * g_in)
    smooth = (6 * vdot.sqrt() <= dot.abs() / 2) & (dot.abs() / 2 >= GATE_CLAMP)
    vgate = gprime.square() * vdot + (4 * U32) ** 2 / 3
    mask = kw.get("token_mask")
    if mask is not None:
        keep = mask.bool().unsqueeze(-1)
        gate, vgate = torch.where(keep, gate, 0.0), torch.where(keep, vgate, 0.0)
        smooth = smooth | ~keep
    gate, vgate = gate.unsqueeze(-1), vgate.unsqueeze(-1)
    out = x + gate * val
    v = (gate.square() * vval + val.square() * vgate + u_out2 * out.square()
         + (2 * U32 * (x.abs() + gate * val.abs())).square() / 3)
    rough = ~smooth.unsqueeze(-1).expand_as(v)
    if bool(rough.any()):
        v = torch.where(rough, memory_bound(kw, level).square() / 3, v)
    how = (f"engram.memory out: quadrature model propagated through the gate (memory_rms_variance; {level}); "
           f"{int(rough.sum())} of {v.numel()} elements near a gate sign change / clamp at bound^2/3")
    return v, how


MEM_TOL = ("engram.memory out: per-element bound propagated from kv's rounding (u_kv |kv| + (K+1) u32 S) and "
           "the gate's fp32 reductions through the rsqrt, the dot, the signed sqrt (clamp 1e-6) and the "
           "sigmoid, plus out's rounding (conformance.cases.engram.memory_bound; u_kv / u_out: fp64 0 / u32, "
           "serving 2^-8 / 2^-8, emulated 2^-7 / 2^-7 and twice the fp32 terms)")
ROWS_TOL = Tolerance(0.0, 0.0, "engram.memory rows: code x 2^(byte-127) is exact in fp32 and bf16 (a 4-bit "
                     "significand times a power of two), so every level compares exactly")


def _rows_diagnosis(got_rows: torch.Tensor, want_rows: torch.Tensor, kw: dict) -> str:
    codes = kw["table"][kw["hash_ids"].long()]
    sig = ratio_signature(got_rows, want_rows, codes=codes, edge="engram table (FP8 rows) -> wkv")
    return sig.summary() if sig.flagged else ""


def compare_memory(got: dict, want: dict, params: dict, level: str, label: str, kwargs: dict) -> list[Comparison]:
    for name in ("rows", "out"):
        if name not in got:
            return [Comparison(name, "fail", message=f"{label} {name}: the subject returned no {name!r} output "
                                                     f"(returned {sorted(got)})")]
    out = []
    c = compare_float(got["rows"].float(), want["rows"], ROWS_TOL, output="rows", label=label, level=level)
    if c.verdict != "pass" and tuple(got["rows"].shape) == tuple(want["rows"].shape):
        d = _rows_diagnosis(got["rows"], want["rows"], kwargs)
        if d:
            c.message += f"; dialect diagnosis: {d}"
    out.append(c)
    bound = memory_bound(kwargs, level)
    # RMS (calc_diff) limit: E = sum of the per-element quadrature variance, passed as the magnitude m with
    # ms_rel = 1 (conformance.rms: E = ms_rel * sum m^2)
    var, how = memory_rms_variance(kwargs, level)
    tol = Tolerance(0.0, 1.0, MEM_TOL).with_rms(ms_rel=1.0, derivation=how)
    c = compare_float(got["out"].float(), want["out"], tol, output="out", scale=bound,
                      label=label, ulp_dtype="float32" if level in ("fp64", "fp32") else "bfloat16", level=level,
                      rms_magnitude=var.sqrt())
    if c.verdict != "pass" and "rows" in got and c.worst.get("index"):
        t, h, _ = c.worst["index"]
        m = kwargs.get("token_mask")
        dead = m is not None and not bool(m[t])
        x = kwargs["stream"][t, h].double()
        moved_got = float((got["out"][t, h].double() - x).abs().max())
        moved_want = float((want["out"][t, h].double() - x).abs().max())
        c.message += (f"; token {t} copy {h}" + (" is masked (gate must be 0: out = stream)" if dead else "")
                      + f"; max |out - stream| there: got {moved_got:.4g}, want {moved_want:.4g} (the gated "
                      "value's size: a missing or wrong gate shows here)")
        if kwargs.get("wkv_scale") is not None:
            d = _wkv_diagnosis(got["out"], kwargs, level)
            if d:
                c.message += f"; wkv diagnosis: {d}"
                c.worst = dict(c.worst, wkv_diagnosis=d)
    out.append(c)
    return out


WKV_MISTAKES = (
    (dict(scale_block=128), "the wkv 32x32 UE8M0 grid read as 128x128 blocks (scale[i // 128, j // 128]; V4's "
                            "block, not V4.1's 32x32: quant_config.py:221-243)"),
    (dict(dialect="float8_e4m3fnuz"), "the OCP e4m3fn wkv codes read as e4m3fnuz (x0.5, 0x80 NaN): vLLM's MXFP8 "
                                      "path never converts them to fnuz"),
)


def _wkv_diagnosis(got_out: torch.Tensor, kw: dict, level: str) -> str:
    """The first known wkv mistake whose golden ``out`` the subject's lies within that golden's own bound of
    (``memory_bound`` with the mistaken weight), or ''."""
    for change, what in WKV_MISTAKES:
        w = wkv_weight(kw["wkv"], kw["wkv_scale"], **change)
        bound = memory_bound(dict(kw, wkv=w, wkv_scale=None), level)
        alt = engram_memory(kw["stream"], kw["hash_ids"], kw["table"], kw["table_scale"], w, kw["q_weight"],
                            kw["k_weight"], kw.get("token_mask"), eps=kw["eps"])["out"].double()
        g = got_out.double()
        ok = ((g - alt).abs() <= bound) | (torch.isnan(g) & torch.isnan(alt))
        if bool(ok.all()):
            return f"out matches the golden of {what}"
    return ""


register(ComponentSpec(
    name="engram.memory", family="engram", reference=engram_memory_golden,
    outputs=(OutputSpec("rows", tol=lambda p, lvl: ROWS_TOL), OutputSpec("out", tol=lambda p, lvl: Tolerance(
        0.0, 1.0, MEM_TOL))),
    description="V4.1 Engram memory: FP8 table rows (OCP e4m3fn x UE8M0 per 32) at the hash ids, wkv to one key "
                "per hc copy + a shared value, gate sigmoid(signed sqrt(normalised q.k-weighted dot)), "
                "out = stream + gate * value (masked tokens untouched)",
    spec_section="V4.1 (vLLM models/deepseek_v41/common/engram.py)", emulate=_emulate_memory,
    compare=compare_memory,
    divergences=("vLLM's wkv is an MXFP8 linear on V4.1 checkpoints (quant_config.py:221-243): rows "
                 ".../mxfp8-wkv/... give it as 32x32-scaled codes (``wkv_scale``), the others as bf16 (wkv in the "
                 "ignored layers)",),
))


def table_bytes(g, rows: int, hd: int, *, negzero: float = 0.02):
    """A table as the checkpoint stores it: N(0, 1) values times 2^k per 32-block (k uniform in [-4, 4], so the
    UE8M0 bytes 123..131 differ block to block and a misaligned scale read changes values), quantised once to
    OCP e4m3fn codes at that scale; then 2% of the codes set to 0x80 (OCP -0: NaN if read as fnuz)."""
    k = torch.randint(-4, 5, (rows, hd // 32), generator=g)
    x = torch.randn(rows, hd, generator=g, dtype=torch.float64)
    codes = torch.from_numpy(get_format("float8_e4m3fn").encode(x.numpy())).to(torch.uint8)
    codes[torch.rand(rows, hd, generator=g) < negzero] = 0x80
    return codes, (127 + k).to(torch.uint8)


def _make_memory(g, p):
    cfg = FLASH if p["cfg"] == "flash" else TINY
    hk = hash_inputs(g, cfg, p["lens"], p["starts"], dead_share=p.get("dead", 0.0), high_ids=True)
    hashes = engram_hash_golden(**hk)["hashes"][:, p.get("layer", 0)]
    hd, D, hc = cfg["head_dim"], cfg["d"], cfg["hc"]
    rows = int(hk["primes"][p.get("layer", 0)].sum()) + 3          # num_embeddings >= sum of the layer's primes
    if p.get("last_rows"):   # bucket ids at the table's end: the last bucket range's top row
        hashes[0, -1] = rows - 4
    table, table_scale = table_bytes(g, rows, hd)
    T, K = hashes.shape[0], hashes.shape[1] * hd
    dead = hk["dead_mask"]
    # kv's key and value are O(1) (rows ~ 2^±4 codes of O(1) times wkv ~ K^-1/2 / row rms), the stream O(1):
    # the gated value moves out by O(0.5), far above the bf16 budget, so a lost gate shows
    mx = {}
    if p.get("mxfp8_wkv"):
        # the checkpoint's MXFP8 wkv: OCP codes, one UE8M0 byte per 32x32 tile, tiles scaled 2^U{-2..2} apart (a
        # 128x128 read of the grid changes most tiles' values)
        from .linear import fp8_block_weight

        codes, scales, _ = fp8_block_weight(g, (hc + 1) * D, K, std=K ** -0.5 / 8, spread=2, block=32)
        wkv, mx = codes, {"wkv_scale": scales}
    else:
        wkv = _bf16(torch.randn((hc + 1) * D, K, generator=g) * (K ** -0.5) / 8)
    return {"stream": _bf16(dist_tensor(g, (T, hc, D), p["dist"])), "hash_ids": hashes.to(torch.int32),
            "table": table, "table_scale": table_scale, "wkv": wkv,
            "q_weight": _bf16(1 + 0.5 * torch.randn(hc, D, generator=g)),
            "k_weight": _bf16(1 + 0.5 * torch.randn(hc, D, generator=g)), "token_mask": ~dead, "eps": EPS, **mx}


# (tag, cfg, lens, starts, extra, dist, seed, tier)
MEM_ROWS = [
    ("decode", "tiny", (1, 1, 1, 1), (0, 3, 9, 40), {}, "normal", 10, "fast"),
    ("prefill", "tiny", (2, 9, 5), (0, 0, 4), {"dead": 0.2, "last_rows": True}, "normal", 11, "fast"),
    ("prefill", "tiny", (7, 6), (0, 20), {"layer": 1}, "outliers", 12, "fast"),
    ("prefill", "flash", (5, 3), (0, 11), {"dead": 0.1}, "normal", 13, "full"),
    ("prefill", "tiny", (600, 300), (0, 50), {"dead": 0.02, "last_rows": True}, "normal", 14, "full"),
    # MXFP8 wkv (V4.1 checkpoints: 32x32 UE8M0 tiles)
    ("decode", "tiny", (1, 1, 1, 1), (0, 3, 9, 40), {"mxfp8_wkv": True}, "normal", 20, "fast"),
    ("prefill", "tiny", (2, 9, 5), (0, 0, 4), {"dead": 0.2, "mxfp8_wkv": True}, "normal", 21, "fast"),
    ("prefill", "tiny", (7, 6), (0, 20), {"layer": 1, "mxfp8_wkv": True}, "outliers", 22, "fast"),
    ("prefill", "flash", (5, 3), (0, 11), {"dead": 0.1, "mxfp8_wkv": True}, "normal", 23, "full"),
]
for tag, cfg, lens, starts, extra, dist, seed, tier in MEM_ROWS:
    name = "-".join(k for k in ("dead", "last_rows", "layer") if k in extra) or "plain"
    mxw = ("mxfp8-wkv/" if extra.get("mxfp8_wkv") else "")
    add(Case(f"engram.memory/{tag}/{cfg}/r{len(lens)}t{sum(lens)}/{mxw}{name}/{dist}/s{seed}", "engram.memory",
             _make_memory, dict({"cfg": cfg, "lens": lens, "starts": starts}, **extra), seed, dist,
             (tag, "engram", "fp8-table") + (("mxfp8-wkv",) if mxw else ())
             + (("long",) if tier == "full" else ()), tier=tier))
