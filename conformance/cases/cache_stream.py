"""Streamed paged caches (issue #16; docs/stateful-components.md): the SWA KV cache (``attn.kv_stream``) and the
indexer K cache (``indexer.k_stream``) written chunk by chunk through the engine's slot mapping into a poisoned
pool, and read back after every chunk by their readers; chunked prefill must equal one prefill and a k-token
verify chunk k single steps.

Inputs, one row per token of the batch the kernel sees (``splits`` count rows; a chunk's last ``pad`` rows are
padding, as a CUDA-graph batch pads its tail): ``positions``; ``slot_mapping`` (-1 on padding rows: they must be
skipped, not written to slot 0); ``block_table`` [rows, logical blocks], the request's table in force for the
row's chunk (-1: no block); ``read``, the rows whose reads the row checks (the queries). The schedule (which
physical block holds which logical block, per chunk) is the KV cache manager's, built here from the splits:

* SWA (``SlidingWindowMLASpec``, ``v1/attention/backends/mla/sparse_swa.py:116-134``): before a chunk starting at
  position s, every block whose positions all lie below s - 127 (out of every window the chunk's queries read) is
  freed to the back of the free list, then the chunk's new logical blocks take blocks from the front; the pool
  holds just the most blocks live at once, so blocks are recycled (block 0, with slot 0, is the first logical
  block's and comes back round), and a reader that reads past its window, or before the chunk's write, sees
  another token or the poison.
* indexer K (compressed entries, ratio 4: entry j closes at token 4j + 3): one slot per entry, blocks of 64
  entries, allocated when first needed, never freed (the indexer reads every entry); logical block 0 is block 0.

The pool itself is the stream state: ``new_state`` sizes it from the case's ``blocks``, the harness poisons it
(uint8 0xFF: an e4m3 NaN code in OCP; fp32 / fp64 pools: NaN) before the first chunk.

Outputs after each chunk, for every ``read`` row (concatenated over rows, in row order):
* ``attn.kv_stream``: ``window`` [sum of lens, 512], the query's last-128-position window gathered from the cache
  and dequantised (positions max(p - 127, 0) .. p, left-aligned as ``_compute_swa_indices_and_lens_kernel``
  gathers them, ``sparse_swa.py:1042-1124``), and ``lens`` (exact). Golden: attn.kv_insert's golden kv
  (unquantised rope(kv_norm(wkv x))) of those positions, computed by position from the whole prompt; bound:
  attn.kv_insert's ``kv`` bound (``qkv._kv_tol``) relative to its scale (``qkv._kv_scale``) at the entry's token;
  serving subjects also return the window entries' stored bytes, ``codes`` [.., 448] (FP8 nope) and ``scales``
  [.., 8] (UE8M0), compared exactly with the emulation at the emulated level (the tight check: the window's
  dequantised values have attn.kv_insert's loose emulated bound).
* ``indexer.k_stream``: ``k`` [sum of counts, 128], the (p + 1) // 4 entries closed by position p, gathered and
  dequantised (code x pow2 scale), and ``lens``; row t's ``k`` input is the key of the entry it closes (rows that
  close nothing carry other keys, which a writer must not store). Golden: the keys; bound: indexer.k_cache's
  (``_k_tol`` / ``_k_scale``: one e4m3 rounding at the token's power-of-two scale; exact against the emulation).
A failing value comparison says what the bad entry holds (``_diagnose``): NaN (a never-written, poisoned slot),
another position's / entry's value (off by how much), a padding row's value (a slot -1 row was written), or
nothing the prompt wrote (a stale slot of a recycled block).

The subject's one-shot call (the whole input as one chunk) is not compared (``StreamSpec.one_shot`` None): the
rows of different chunks carry different block tables over recycled blocks, so one call with all of them is not
a schedule the engine can produce.
"""

from __future__ import annotations

import torch

from references.components import cache_stream as cs
from references.formats import cache_layouts as cl

from ..components import ComponentSpec, OutputSpec, Streamed, StreamSpec, register
from ..metrics import Comparison, compare_exact, compare_float
from ._case import Case, add, dist_tensor
from .compressor_stream import split_tag
from .indexer_cache import DIM, K_FMAX, KCacheLayout, _k_scale, _k_tol
from .linear import fp8_block_weight
from .qkv import HEAD_DIM, _kv_roped, _kv_scale, _kv_tol

W, BS = cs.WINDOW, cs.BLOCK


# ------------------------------------------------------------------------------------------------ schedules
def schedule(token_splits, *, pad: int, kind: str, ratio: int = 4, g: torch.Generator | None = None) -> dict:
    """Rows for ``token_splits`` (real tokens per chunk) with ``pad`` padding rows closing every chunk after the
    first: positions, slot_mapping, block_table [rows, L] (the table in force for the row's chunk), the row
    splits, and the pool's block count (module docstring: SWA recycles blocks, the indexer never frees)."""
    T = sum(token_splits)
    index = (lambda p: p) if kind == "swa" else (lambda p: p // ratio)   # the cache index of position p
    L = index(T - 1) // BS + 1
    # dry run: the most blocks live at once (SWA) / all of them (indexer): a pool that tight reuses a freed block
    # at the next allocation
    live_max, s = 0, 0
    for n in token_splits:
        lo = max(s - W + 1, 0) if kind == "swa" else 0
        live_max = max(live_max, index(s + n - 1) // BS - index(lo) // BS + 1)
        s += n
    blocks = live_max
    order = [0] + (torch.randperm(blocks - 1, generator=g) + 1).tolist()
    free, table = list(order), [-1] * L
    pos, slots, bts, row_splits, s = [], [], [], [], 0
    for c, n in enumerate(token_splits):
        if kind == "swa":
            lo = max(s - W + 1, 0)
            for j in range(L):
                if table[j] >= 0 and (j + 1) * BS <= lo:
                    free.append(table[j])
                    table[j] = -1
        for j in range(index(s) // BS, index(s + n - 1) // BS + 1):
            if table[j] < 0:
                table[j] = free.pop(0)
        npad = pad if c else 0
        for p in range(s, s + n):
            pos.append(p)
            slots.append(table[index(p) // BS] * BS + index(p) % BS)
        # padding rows: stale positions (the runner's buffer past num_tokens is not cleared); closing ones for
        # the indexer, so only the slot -1 test keeps them out
        for i in range(npad):
            pos.append((s + i) // ratio * ratio + ratio - 1 if kind == "k" else s + i)
            slots.append(-1)
        bts += [list(table)] * (n + npad)
        row_splits.append(n + npad)
        s += n
    return {"positions": torch.tensor(pos, dtype=torch.long), "slot_mapping": torch.tensor(slots, dtype=torch.long),
            "block_table": torch.tensor(bts, dtype=torch.int32), "row_splits": tuple(row_splits), "blocks": blocks}


def read_rows(token_splits, pad: int, long: bool) -> torch.Tensor:
    """The rows whose reads are checked: every real row of a chunk of <= 8 tokens; else the chunk's first two and
    last two, and positions next to a block / window boundary (p % 64 in {0, 63}; every 1024th pair when long)."""
    flags, s = [], 0
    m = 1024 if long else 64
    for c, n in enumerate(token_splits):
        for p in range(s, s + n):
            flags.append(n <= 8 or p - s < 2 or s + n - p <= 2 or p % m in (0, m - 1))
        flags += [False] * (pad if c else 0)
        s += n
    return torch.tensor(flags)


# ------------------------------------------------------------------------------------------------ diagnosis
def _entry_meta(kw: dict, kind: str, ratio: int = 4) -> tuple[list[int], list[int]]:
    """Per output entry (row order of the reads): (the query's position, the expected position / entry)."""
    qp, ep = [], []
    for r in torch.nonzero(kw["read"]).flatten().tolist():
        p = int(kw["positions"][r])
        want = list(cs.window(p)) if kind == "swa" else list(range((p + 1) // ratio))
        qp += [p] * len(want)
        ep += want
    return qp, ep


def _diagnose(c: Comparison, got, want, kw: dict, kind: str, cand: torch.Tensor, bound: torch.Tensor):
    """Append what the first few out-of-bound entries hold: NaN (poisoned slot), another position's value, a
    padding row's value, or nothing the prompt wrote. ``cand``: the golden value of every row of the prompt."""
    if c.verdict == "pass" or got.shape != want.shape or not got.numel():
        return c
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    err = (g - w).abs()
    bad = torch.nonzero((torch.isnan(err) | (err > bound)).any(-1)).flatten()
    if not len(bad):
        return c
    qp, ep = _entry_meta(kw, kind)
    pos, slots = kw["positions"], kw["slot_mapping"]
    what = "position" if kind == "swa" else "entry"
    cd = cand.double()
    notes = []
    for i in bad[:3].tolist():
        head = f"query at position {qp[i]}, {what} {ep[i]}"
        if torch.isnan(g[i]).any():
            notes.append(f"{head}: NaN (a never-written slot of the poisoned pool was read)")
            continue
        d = (cd - g[i]).norm(dim=-1) / cd.norm(dim=-1).clamp_min(1e-30)
        r = int(torch.argmin(d))
        if float(d[r]) > 0.25:
            notes.append(f"{head}: holds no value the prompt wrote (a stale slot of a recycled block)")
        elif int(slots[r]) < 0:
            notes.append(f"{head}: holds padding row {r}'s value (a slot -1 row was written)")
        else:
            got_at = int(pos[r]) if kind == "swa" else int(pos[r]) // 4
            closes = kind == "swa" or (int(pos[r]) + 1) % 4 == 0
            notes.append(f"{head}: holds {what} {got_at}'s value (off by {got_at - ep[i]:+d})" if closes else
                         f"{head}: holds the key of row {r} (position {int(pos[r])}, which closes no entry)")
    c.message += f"; {len(bad)} of {len(ep)} entries out of bound; " + "; ".join(notes)
    c.worst = dict(c.worst, stream_diagnosis=notes)
    return c


def _compare(kind: str):
    name = "window" if kind == "swa" else "k"

    def compare(got, want, params, level, label, kwargs):
        for n in (name, "lens"):
            if n not in got:
                return [Comparison(n, "fail", message=f"{label} {n}: the subject returned no {n!r} output "
                                                      f"(returned {sorted(got)})")]
        gv = got[name].float() if got[name].dtype == torch.bfloat16 else got[name]
        if kind == "swa":
            tol = _kv_tol(params, level)
            scale = _window_scale(kwargs, want[name])
        else:
            tol = _k_tol(level)
            scale = _k_scale(want[name]) if level == "serving" else None
        c = compare_float(gv, want[name], tol, output=name, scale=scale, label=label,
                          ulp_dtype="float32" if level in ("fp64", "fp32") else "bfloat16", level=level)
        if c.verdict != "pass":
            s = (scale if scale is not None else want[name]).detach().cpu().double().abs()
            c = _diagnose(c, gv, want[name], kwargs, kind, _candidates(kwargs, kind), tol.bound(s))
        out = [c, compare_exact(got["lens"], want["lens"], output="lens", label=label)]
        for n in ("codes", "scales"):   # SWA, against the emulation: the window's stored bytes exactly
            if n in want and level == "emulated":
                out.append(compare_exact(got[n], want[n], output=n, label=label,
                                         fp8_format=params.get("dialect") if n == "codes" else None) if n in got
                           else Comparison(n, "fail", message=f"{label} {n}: the subject returned no {n!r} output "
                                                             f"(returned {sorted(got)})"))
        return out
    return compare


# ------------------------------------------------------------------------------------------------ attn.kv_stream
def _kv_rows(kw: dict, dtype=None) -> torch.Tensor:
    x = kw["x"] if dtype is None else kw["x"].to(dtype)
    return _kv_roped(x, kw["wkv"], kw["wkv_scale"], kw["kv_norm"], kw["positions"], eps=kw["eps"],
                     theta=kw["theta"], yarn=kw["yarn"])


def _window_scale(kw: dict, want: torch.Tensor) -> torch.Tensor:
    """attn.kv_insert's per-token scale S (``qkv._kv_scale``, at the golden kv of every real row) of each window
    entry's token."""
    real = kw["slot_mapping"] >= 0
    kv = _kv_rows(kw, torch.float64)[real]
    S = _kv_scale(kw, kv)
    row_of = {int(p): i for i, p in enumerate(kw["positions"][real].tolist())}
    _, ep = _entry_meta(kw, "swa")
    return S[torch.tensor([row_of[p] for p in ep], dtype=torch.long)] if ep else S.new_zeros(0, HEAD_DIM)


def _candidates(kw: dict, kind: str) -> torch.Tensor:
    return _kv_rows(kw, torch.float64) if kind == "swa" else kw["k"].double()


def kv_stream_golden(x, wkv, wkv_scale, kv_norm, positions, slot_mapping, block_table, read, *, blocks, eps, theta,
                     yarn, fnuz_fmax=240.0) -> dict:
    """-> {"window", "lens"}: every read row's window of golden kv (attn.kv_insert's golden, unquantised), by
    position from the whole prompt (``cache_stream.swa_windows``); the pool and block table play no part."""
    kv = _kv_roped(x, wkv, wkv_scale, kv_norm, positions, eps=eps, theta=theta, yarn=yarn)
    return cs.swa_windows(kv, positions=positions, slot_mapping=slot_mapping, read=read)


def _serving_kv(profile: str):
    """attn.kv_insert's serving chain up to the store (qkv._emulate_kv_insert: wkv FP8 linear, kv_norm in fp32 with
    a bf16 store, RoPE in fp32 on the bf16 kv), the GEMM row by row: a CPU fp32 matmul rounds differently with the
    number of rows (measured: 6 window entries' codes of attn.kv_stream/t260/127-1x2-131 flipped between the
    chunked and the whole-prompt GEMM), and the emulation must not depend on the chunking, so that the streamed
    window's bytes can be compared exactly with the one-shot emulation's."""
    from references.components.norms import rms_norm
    from references.components.rope import apply_rope

    from .linear import _emulate as linear_emulate
    from .qkv import ROPE_DIM, _bf, _inv_freq

    lin = linear_emulate(profile)

    def kv(x, wkv, wkv_scale, kv_norm, positions, *, eps, theta, yarn):
        y = torch.cat([lin(x[i:i + 1], wkv, wkv_scale)["y"] for i in range(x.shape[0])]) if x.shape[0] else \
            lin(x, wkv, wkv_scale)["y"]
        return apply_rope(_bf(rms_norm(y, _bf(kv_norm), eps)), positions, _inv_freq(theta, yarn), ROPE_DIM)
    return kv


def _dialect(profile: str) -> tuple[str, float | None]:
    from references.numerics import PROFILES

    return PROFILES[profile]["dialect"], None


def _ds_mla():
    from .qkv import _layout

    return _layout()


def _kv_stream(profile: str | None) -> Streamed:
    """attn.kv_stream as a Streamed: ``profile`` None = the golden (fp32; fp64 on fp64 x) over an unquantised
    pool; a profile = its serving chain and the fp8_ds_mla pool in its dialect (fnuz_fmax on fnuz)."""
    chain = None if profile is None else _serving_kv(profile)

    def new(x, wkv, wkv_scale, kv_norm, positions, slot_mapping, block_table, read, *, blocks, eps, theta, yarn,
            fnuz_fmax=240.0):
        if profile is None:
            return cs.new_pool(blocks, HEAD_DIM, dtype=torch.promote_types(x.dtype, torch.float32))
        return {"cache": torch.zeros(blocks, _ds_mla().block_stride, dtype=torch.uint8)}

    def stp(state, *, start, x, wkv, wkv_scale, kv_norm, positions, slot_mapping, block_table, read, blocks, eps,
            theta, yarn, fnuz_fmax=240.0):
        args = (x, wkv, wkv_scale, kv_norm, positions)
        kv = (_kv_roped if chain is None else chain)(*args, eps=eps, theta=theta, yarn=yarn)
        if profile is None:
            return cs.swa_step(state, kv, positions=positions, slot_mapping=slot_mapping, block_table=block_table,
                               read=read)
        dialect, _ = _dialect(profile)
        fmax = fnuz_fmax if dialect == "float8_e4m3fnuz" else None
        pool = state["cache"]
        cl.write_ds_mla(pool, slot_mapping, kv, dialect, fmax, layout=_ds_mla())
        out, lens = [], []
        for r in torch.nonzero(read).flatten().tolist():
            p = int(positions[r])
            ss = [cs.slot_of(block_table[r], q, BS, f"SWA read of row {r}") for q in cs.window(p)]
            tok = cl.read_ds_mla_tokens(pool, ss, layout=_ds_mla())
            out.append((cl.dequantize_ds_mla_tokens(tok, dialect), tok.nope, tok.scales))
            lens.append(len(ss))
        return ({"window": torch.cat([o[0] for o in out]) if out else torch.zeros(0, HEAD_DIM),
                 "lens": torch.tensor(lens, dtype=torch.long),
                 "codes": torch.cat([o[1] for o in out]) if out else torch.zeros(0, 448, dtype=torch.uint8),
                 "scales": torch.cat([o[2] for o in out]) if out else torch.zeros(0, 8, dtype=torch.uint8)}, state)

    return Streamed(new, stp)


def window_rows(positions, slot_mapping, read) -> torch.Tensor:
    """The row of every window entry's token (entry order of ``swa_windows``)."""
    by_pos = {int(p): r for r, (p, s) in enumerate(zip(positions.tolist(), slot_mapping.tolist())) if s >= 0}
    return torch.tensor([by_pos[q] for r in torch.nonzero(read).flatten().tolist()
                         for q in cs.window(int(positions[r]))], dtype=torch.long)


def _emulate_kv_stream(profile: str):
    chain = _serving_kv(profile)

    def kv_stream_serving(x, wkv, wkv_scale, kv_norm, positions, slot_mapping, block_table, read, *, blocks, eps,
                          theta, yarn, fnuz_fmax=240.0):
        """One-shot serving numerics: every real row's kv through the serving chain, FP8-stored in the profile's
        fp8_ds_mla encoding and decoded (attn.kv_insert's emulation), windows taken by position."""
        dialect, _ = _dialect(profile)
        kv = chain(x, wkv, wkv_scale, kv_norm, positions, eps=eps, theta=theta, yarn=yarn)
        fmax = fnuz_fmax if dialect == "float8_e4m3fnuz" else None
        tok = cl.encode_ds_mla_tokens(kv, dialect, fmax)
        rows = window_rows(positions, slot_mapping, read)
        return dict(cs.swa_windows(cl.dequantize_ds_mla_tokens(tok, dialect), positions=positions,
                                   slot_mapping=slot_mapping, read=read),
                    codes=tok.nope[rows], scales=tok.scales[rows])

    kv_stream_serving.__qualname__ = f"kv_stream_serving[{profile}]"
    return kv_stream_serving


register(ComponentSpec(
    name="attn.kv_stream", family="attention", reference=kv_stream_golden,
    outputs=(OutputSpec("window", tol=_kv_tol, scale=_window_scale), OutputSpec("lens", "exact"),
             OutputSpec("codes", "fp8-codes"), OutputSpec("scales", "exact")),
    description="attn.kv_insert fed chunk by chunk into the recycled paged fp8_ds_mla SWA pool (poisoned, slot -1 "
                "padding rows), each query's 128-token window read back after its chunk; against the one-shot "
                "golden under attn.kv_insert's bound",
    spec_section="3.6, 4.5", emulate=_emulate_kv_stream, compare=_compare("swa"),
    stream=StreamSpec(one_shot=None, chunked=("x", "positions", "slot_mapping", "block_table", "read"),
                      reference=lambda: _kv_stream(None), emulate=lambda prof: _kv_stream(prof)),
))


def _assemble(real: torch.Tensor, pad: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    out = torch.empty(len(positions), *real.shape[1:], dtype=real.dtype)
    m = slots >= 0
    out[m] = real[positions[m]]
    out[~m] = pad[:int((~m).sum())]
    return out


def _make_kv(g, p):
    T, D = p["tokens"], p["d"]
    w, w_s, _ = fp8_block_weight(g, HEAD_DIM, D, std=D**-0.5, spread=2)
    norm = torch.exp(0.5 * torch.randn(HEAD_DIM, generator=g))
    x_real = dist_tensor(g, (T, D), p["dist"])
    x_pad = dist_tensor(g, (p["pad"] * (len(p["token_splits"]) - 1), D), p["dist"])
    sch = schedule(p["token_splits"], pad=p["pad"], kind="swa", g=g)
    return {"x": _assemble(x_real, x_pad, sch["positions"], sch["slot_mapping"]), "wkv": w, "wkv_scale": w_s,
            "kv_norm": norm, "positions": sch["positions"],
            "slot_mapping": sch["slot_mapping"], "block_table": sch["block_table"],
            "read": read_rows(p["token_splits"], p["pad"], p["tokens"] > 1024), "blocks": sch["blocks"],
            "eps": 1e-6, "theta": 160000.0, "yarn": True, "fnuz_fmax": p["fnuz_fmax"]}


def _rows(token_splits, pad):
    return tuple(n + (pad if i else 0) for i, n in enumerate(token_splits))


def _add_kv(token_splits, seed, tags=(), pad=1, fnuz_fmax=224.0, tier="fast", dist="normal"):
    T = sum(token_splits)
    p = {"tokens": T, "d": 256, "token_splits": tuple(token_splits), "pad": pad,
         "splits": _rows(token_splits, pad), "fnuz_fmax": fnuz_fmax, "max_pos": T}
    add(Case(f"attn.kv_stream/t{T}/{split_tag(token_splits)}/p{pad}/fnuz{int(fnuz_fmax)}/s{seed}", "attn.kv_stream",
             _make_kv, p, seed, dist, ("stream",) + tuple(tags), tier=tier))


# chunk boundaries at 127 / 128 / 129 / 255 / 256 / 257 (the window's and the blocks' edges)
_add_kv([127, 1, 1, 131], 400, ("chunked-prefill", "decode"))
_add_kv([128, 129, 3], 401, ("chunked-prefill",), pad=2)
_add_kv([129, 126, 2, 3], 402, ("chunked-prefill",), fnuz_fmax=240.0)
_add_kv([255, 1, 1, 1, 2], 403, ("chunked-prefill", "decode"))
_add_kv([256, 4], 404, ("chunked-prefill", "aligned"), pad=0)
_add_kv([125] + [1] * 15, 405, ("decode",))        # single steps across the wrap (positions 125 .. 139)
# verify pairs: the same prompt (same seed) as prefill + one k-token chunk and as prefill + k single steps
for _t, pre, k, seed in [(129, 126, 3, 410), (129, 125, 4, 411), (256, 254, 2, 412), (193, 190, 3, 413)]:
    _add_kv([pre, k], seed, ("verify", f"k{k}"))
    _add_kv([pre] + [1] * k, seed, ("verify", f"k{k}", "single-steps"))
# full tier: an 8k prompt, boundaries at 1021 / 3068 / 7167, then four single steps
_add_kv([1021, 2047, 4099, 1021, 1, 1, 1, 1], 420, ("chunked-prefill", "long"), tier="full")


# ------------------------------------------------------------------------------------------------ indexer.k_stream
RATIO = 4


def k_stream_golden(k, positions, slot_mapping, block_table, read, *, blocks, layout="normal") -> dict:
    """-> {"k", "lens"}: every read row's closed entries (the keys, unquantised), by position from the whole
    prompt (``cache_stream.k_entries``)."""
    if not isinstance(k, torch.Tensor) or k.dim() != 2 or k.shape[1] != DIM:
        raise ValueError(f"k: expected [rows, {DIM}], got {tuple(getattr(k, 'shape', ()))}")
    return cs.k_entries(k.to(torch.promote_types(k.dtype, torch.float32)), positions=positions,
                        slot_mapping=slot_mapping, read=read, ratio=RATIO)


def _k_stream(profile: str | None) -> Streamed:
    """indexer.k_stream as a Streamed: the golden over an unquantised pool (``profile`` None), or the profile's
    writer / reader (indexer.k_cache's emulation: per-token pow2 scale, fmax 224 fnuz / 448 OCP) over the uint8
    indexer-K pool (``KCacheLayout``, 132 bytes an entry)."""
    dialect = None if profile is None else ("float8_e4m3fn" if profile == "ocp" else "float8_e4m3fnuz")

    def new(k, positions, slot_mapping, block_table, read, *, blocks, layout="normal"):
        if profile is None:
            return cs.new_pool(blocks, DIM, dtype=torch.promote_types(k.dtype, torch.float32))
        return {"cache": torch.zeros(blocks, KCacheLayout(BS, layout).block_stride, dtype=torch.uint8)}

    def stp(state, *, start, k, positions, slot_mapping, block_table, read, blocks, layout="normal"):
        if profile is None:
            return cs.k_step(state, k, positions=positions, slot_mapping=slot_mapping, block_table=block_table,
                             read=read, ratio=RATIO)
        lay, pool = KCacheLayout(BS, layout), state["cache"]
        rows = (slot_mapping >= 0) & cs.closes(positions, RATIO)
        if rows.any():
            lay.write(pool, slot_mapping[rows], cl.encode_indexer_k_tokens(k[rows].to(torch.bfloat16).float(),
                                                                            dialect, K_FMAX[profile]))
        out, lens = [], []
        for r in torch.nonzero(read).flatten().tolist():
            n = (int(positions[r]) + 1) // RATIO
            ss = [cs.slot_of(block_table[r], j, BS, f"indexer-K read of row {r}") for j in range(n)]
            out.append(lay.read(pool, ss, dialect) if ss else torch.zeros(0, DIM))
            lens.append(n)
        return ({"k": torch.cat(out) if out else torch.zeros(0, DIM), "lens": torch.tensor(lens, dtype=torch.long)},
                state)

    return Streamed(new, stp)


def _emulate_k_stream(profile: str):
    dialect = "float8_e4m3fn" if profile == "ocp" else "float8_e4m3fnuz"

    def k_stream_serving(k, positions, slot_mapping, block_table, read, *, blocks, layout="normal"):
        """One-shot serving numerics: every key encoded as indexer.k_cache's writer does (per-token pow2 scale,
        the profile's dialect and fmax) and decoded, the entries taken by position."""
        dec = cl.dequantize_indexer_k_tokens(cl.encode_indexer_k_tokens(k.to(torch.bfloat16).float(), dialect,
                                                                        K_FMAX[profile]), dialect)
        return cs.k_entries(dec, positions=positions, slot_mapping=slot_mapping, read=read, ratio=RATIO)

    k_stream_serving.__qualname__ = f"k_stream_serving[{profile}]"
    return k_stream_serving


register(ComponentSpec(
    name="indexer.k_stream", family="indexer", reference=k_stream_golden,
    outputs=(OutputSpec("k", tol=lambda p, lvl: _k_tol(lvl)), OutputSpec("lens", "exact")),
    description="indexer.k_cache fed chunk by chunk: the compressed keys (one every 4 tokens) FP8-written through "
                "the per-token slot mapping into the poisoned indexer-K pool (slot -1 padding rows), the closed "
                "entries gathered after every chunk; against the keys under indexer.k_cache's bound",
    spec_section="3.8, 4.5", emulate=_emulate_k_stream, compare=_compare("k"),
    stream=StreamSpec(one_shot=None, chunked=("k", "positions", "slot_mapping", "block_table", "read"),
                      reference=lambda: _k_stream(None), emulate=lambda prof: _k_stream(prof)),
))


def _make_k(g, p):
    # per-row magnitudes 2^U(-8, 8) (the scales differ entry by entry); bf16-exact, as the compressor stores them;
    # the real rows by position first (a verify pair sees the same keys), then the padding rows
    def keys(n):
        return (dist_tensor(g, (n, DIM), p["dist"]) * torch.exp2(torch.rand(n, 1, generator=g) * 16 - 8)).to(
            torch.bfloat16).float()

    k_real, k_pad = keys(p["tokens"]), keys(p["pad"] * (len(p["token_splits"]) - 1))
    sch = schedule(p["token_splits"], pad=p["pad"], kind="k", ratio=RATIO, g=g)
    k = _assemble(k_real, k_pad, sch["positions"], sch["slot_mapping"])
    return {"k": k, "positions": sch["positions"], "slot_mapping": sch["slot_mapping"],
            "block_table": sch["block_table"], "read": read_rows(p["token_splits"], p["pad"], p["tokens"] > 1024),
            "blocks": sch["blocks"], "layout": p.get("layout", "normal")}


def _add_k(token_splits, seed, tags=(), pad=1, layout="normal", tier="fast", dist="normal"):
    T = sum(token_splits)
    p = {"tokens": T, "token_splits": tuple(token_splits), "pad": pad, "splits": _rows(token_splits, pad),
         "layout": layout}
    add(Case(f"indexer.k_stream/t{T}/{split_tag(token_splits)}/p{pad}/{layout}/s{seed}", "indexer.k_stream",
             _make_k, p, seed, dist, ("stream",) + tuple(tags) + ((layout,) if layout != "normal" else ()),
             tier=tier))


_add_k([1] * 30, 500, ("decode",))                             # single steps: an entry closes every 4th
_add_k([5, 6, 7, 46], 501, ("chunked-prefill",))               # boundaries at residues 1, 3, 2 of ratio 4
_add_k([16, 48], 502, ("chunked-prefill", "aligned"), pad=2)
_add_k([127, 1, 1, 131], 503, ("chunked-prefill", "decode"))   # 127 / 128 / 129; entry 64 (block 1) at 259
_add_k([128, 129, 3], 504, ("chunked-prefill",))
_add_k([255, 1, 1, 1, 2], 505, ("chunked-prefill", "decode"))
_add_k([257, 3], 506, ("chunked-prefill",), layout="shuffle")
for _t, pre, k, seed in [(64, 61, 3, 510), (64, 62, 2, 511), (64, 60, 4, 512), (260, 256, 4, 513)]:
    _add_k([pre, k], seed, ("verify", f"k{k}"))
    _add_k([pre] + [1] * k, seed, ("verify", f"k{k}", "single-steps"))
_add_k([1021, 2047, 4099, 1021, 1, 1, 1, 1], 520, ("chunked-prefill", "long"), tier="full")
