"""The lightning indexer's K cache (spec 3.8, 4.5): each indexer key quantised to FP8 with one power-of-two scale
per token (the whole 128-dim head), inserted into the paged indexer-K pool at its slot, then gathered back per
request and dequantised by the reader: the writer and reader a plugin's cache code must get right, tested
directly (the dialect map's indexer_k->logits edge and its negative-zero probe test one block through the whole
edge; this component tests the paging, the padding rows, the bytes around the written slots, and the values).

Layout (``references.formats.cache_layouts.IndexerKLayout``, vLLM's ``DeepseekV4IndexerCache``, 132 bytes per
entry): per block of ``block_size`` (64) entries, the FP8 values of every entry first (entry s at s*128), then the
fp32 scales (entry s at block_size*128 + s*4, little-endian); the block's row padded to a multiple of 576. This is
the C4A "block-flat" (NORMAL) layout the ROCm reader gathers (``cp_gather_indexer_k_quant_cache_triton``,
``cache_layout="NORMAL"`` for compress ratio 4). Rows tagged ``shuffle`` use vLLM's 16x16-tiled value region
instead (``KCacheLayout``), the layout of its dedicated writer / gather pair, which ``vllm-triton:<profile>`` binds.

Inputs: keys ``k [N, 128]`` (bf16-exact: the compressor rounds them to bf16 before the store, so a writer that
takes bf16 loses nothing), ``slot_mapping [N]`` (-1: a padding row, written nowhere), the pool ``cache`` (uint8
[num_blocks, block_stride], pre-filled with garbage: random bytes, NaN codes of both dialects in the value
regions, NaN fp32 patterns in the scale regions), and the reader's ``block_table [B, W]`` / ``seq_lens [B]``:
request b's entry i is at slot block_table[b, i // block_size] * block_size + i % block_size. Every gathered entry
is written in the same call (so its golden is known).

Outputs: ``k`` [sum(seq_lens), 128], the gathered keys dequantised (code x scale), requests in order; ``cache``,
the pool after the writes.

Golden (from the spec's math, no quantisation): the key written to each gathered slot, and the pool as given
(what the writes must not touch). Comparison (the ``compare`` hook, every case):
  * ``k`` against the golden: one e4m3 rounding at the token's power-of-two scale (bound below); exact against
    the emulation (same bytes, same scale: code x 2^e is exact in fp32);
  * ``cache.untouched``: every byte outside the written slots' value and scale bytes equals the pre-filled pool,
    exactly (padding rows, other slots, other blocks, the alignment tail);
  * ``cache.values``: the written slots decoded by the spec layout in the subject's dialect against the golden
    (serving bound; catches a writer and reader that agree with each other on a wrong layout), and at the emulated
    level the value and scale bytes exactly (``cache.scales``).
A failing value check carries the dialect diagnosis (``conformance.ratio.ratio_signature``: x0.5 for OCP bytes
read as fnuz, NaN at 0x80 for an OCP -0 read as fnuz NaN).

Serving emulation (``emulate(profile)``): scale = 2^ceil(log2(max(amax, 1e-4) / fmax)), codes = e4m3(k / scale),
saturating, round to nearest even, in the profile's dialect; fmax 448 (OCP) or 224 on gfx942: vLLM 0.32's
dedicated indexer-K writer ``rocm_aiter_mla_sparse._indexer_k_quant_and_cache_kernel`` divides by 224.0 when
IS_FNUZ (the other ROCm Triton cache writers use finfo(fnuz).max = 240). On fnuz there is no -0: a tiny negative
that rounds to zero is byte 0x00 (0x80 is NaN).
"""

from __future__ import annotations

import torch

from references.formats import cache_layouts as cl

from ..components import ComponentSpec, OutputSpec, register
from ..metrics import Comparison, compare_exact, compare_float
from ..ratio import ratio_signature
from ..tolerances import Tolerance
from ._case import Case, add, dist_tensor

DIM = cl.INDEX_DIM
# vLLM 0.32.0 _indexer_k_quant_and_cache_kernel: scale = max(1e-4, amax) / (224.0 if IS_FNUZ else 448.0)
K_FMAX = {"gfx942": 224.0, "ocp": 448.0}
# subnormal floor of the bound, relative to the row's amax (see _k_tol)
SUB_FLOOR = 2.0**-13


LAYOUTS = ("normal", "shuffle")
TILE = 16      # the SHUFFLE layout's tile: 16 entries x 16 value bytes


class KCacheLayout:
    """Byte positions of the indexer-K pool: ``cache_layouts.IndexerKLayout`` (block stride, scale region), with
    the value region either block-flat ("normal": entry s at s*128, DSV4's C4A layout) or "shuffle": vLLM 0.32's
    16x16-tiled layout of the same region (``rocm_aiter_mla_sparse``: "Ratio 1 and 2 are 16x16 SHUFFLE"; the
    layout its dedicated writer picks for block_size > 1): entries in groups of 16, each group's 16 x 128 values
    stored as 8 tiles of (16 entries x 16 bytes): dim d of entry s at (s // 16) * 16 * 128 + (d // 16) * 256 +
    (s % 16) * 16 + d % 16. The scales are per entry in both (block_size * 128 + s * 4)."""

    def __init__(self, block_size: int = 64, layout: str = "normal"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
        if layout == "shuffle" and block_size % TILE:
            raise ValueError(f"layout 'shuffle' needs block_size a multiple of {TILE}, got {block_size}")
        self.flat = cl.IndexerKLayout(block_size=block_size)
        self.block_size, self.layout = block_size, layout
        self.block_stride, self.scale_region = self.flat.block_stride, self.flat.scale_region

    def value_cols(self, s: int) -> torch.Tensor:
        d = torch.arange(DIM)
        if self.layout == "normal":
            return s * DIM + d
        return (s // TILE) * TILE * DIM + (d // TILE) * TILE * TILE + (s % TILE) * TILE + d % TILE

    def scale_cols(self, s: int) -> torch.Tensor:
        return self.flat.scale_offset(s) + torch.arange(cl.INDEX_SCALE_BYTES)

    def write(self, pool: torch.Tensor, slot_mapping, tok: cl.IndexerKTokens) -> None:
        for i, s in enumerate(slot_mapping.tolist()):
            if s >= 0:
                b, o = divmod(s, self.block_size)
                pool[b, self.value_cols(o)] = tok.values[i]
                pool[b, self.scale_cols(o)] = tok.scales[i]

    def read_tokens(self, pool: torch.Tensor, slots) -> cl.IndexerKTokens:
        vals, scs = [], []
        for s in [int(x) for x in slots]:
            b, o = divmod(s, self.block_size)
            vals.append(pool[b, self.value_cols(o)])
            scs.append(pool[b, self.scale_cols(o)])
        if not vals:
            return cl.IndexerKTokens(torch.empty(0, DIM, dtype=torch.uint8), torch.empty(0, 4, dtype=torch.uint8))
        return cl.IndexerKTokens(torch.stack(vals), torch.stack(scs))

    def read(self, pool: torch.Tensor, slots, dialect) -> torch.Tensor:
        return cl.dequantize_indexer_k_tokens(self.read_tokens(pool, slots), dialect)


def _layout(block_size: int, layout: str = "normal") -> KCacheLayout:
    return KCacheLayout(block_size, layout)


def gather_slots(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """The slots the reader gathers, requests in order: request b's entry i at
    block_table[b, i // block_size] * block_size + i % block_size."""
    if block_table.dim() != 2:
        raise ValueError(f"block_table: expected [B, W], got {tuple(block_table.shape)}")
    if seq_lens.shape != block_table.shape[:1]:
        raise ValueError(f"seq_lens: expected ({block_table.shape[0]},), got {tuple(seq_lens.shape)}")
    out = []
    for b, n in enumerate(seq_lens.tolist()):
        if n < 0 or n > block_table.shape[1] * block_size:
            raise ValueError(f"seq_lens[{b}] = {n}: outside [0, {block_table.shape[1] * block_size}] for the "
                             f"block table's {block_table.shape[1]} blocks of {block_size}")
        i = torch.arange(n)
        out.append(block_table[b].long()[i // block_size] * block_size + i % block_size)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def _check(k, slot_mapping, cache, block_table, seq_lens, block_size, layout="normal"):
    lay = _layout(block_size, layout)
    cl._check_values(k, DIM, "k")
    cl._check_cache(cache, lay.block_stride, "indexer K (fp8)")
    slots = cl._check_slots(slot_mapping, k.shape[0], cache.shape[0] * block_size, allow_padding=True)
    read = gather_slots(block_table, seq_lens, block_size)
    if len(read) and (read.min() < 0 or read.max() >= cache.shape[0] * block_size):
        raise IndexError(f"block_table names a block outside the pool's {cache.shape[0]} blocks")
    row = {int(s): i for i, s in enumerate(slots) if s >= 0}
    missing = [int(s) for s in read if int(s) not in row]
    if missing:
        raise ValueError(f"gathered slot {missing[0]} is not written in this call ({len(missing)} such slot(s))")
    return lay, slots, read, torch.tensor([row[int(s)] for s in read], dtype=torch.long)


def indexer_k_cache_golden(k: torch.Tensor, slot_mapping: torch.Tensor, cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, *, block_size: int = 64,
                           layout: str = "normal") -> dict:
    """-> {"k": the written key of every gathered slot [sum(seq_lens), 128], "cache": the pool as given}
    (golden: unquantised; the module docstring gives the layout and what each output is compared with).
    layout: "normal" (DSV4's C4A block-flat pool) or "shuffle" (``KCacheLayout``)."""
    _, _, _, rows = _check(k, slot_mapping, cache, block_table, seq_lens, block_size, layout)
    dt = torch.promote_types(k.dtype, torch.float32)
    return {"k": k.to(dt)[rows], "cache": cache.clone()}


def _emulate(profile: str):
    dialect = "float8_e4m3fn" if profile == "ocp" else "float8_e4m3fnuz"
    fmax = K_FMAX[profile]

    def indexer_k_cache_serving(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64, layout="normal"):
        """The writer (per-token pow2 scale, the profile's dialect and fmax; -1 rows skipped) and the reader
        (the case's layout, code x fp32 scale) of the module docstring."""
        lay, _, read, _ = _check(k, slot_mapping, cache, block_table, seq_lens, block_size, layout)
        pool = cache.clone()
        lay.write(pool, slot_mapping, cl.encode_indexer_k_tokens(k.to(torch.bfloat16).float(), dialect, fmax))
        return {"k": lay.read(pool, read, dialect), "cache": pool}

    indexer_k_cache_serving.__qualname__ = f"indexer_k_cache_serving[{profile}]"
    return indexer_k_cache_serving


def _k_tol(level: str) -> Tolerance:
    if level != "serving":
        return Tolerance(0.0, 0.0, "indexer K: the golden is the key itself (fp32 and fp64 alike); against the "
                         "emulation the same bytes and scale decode to the same value (code x 2^e, exact in fp32)")
    # One e4m3 rounding of x / s (s a power of two, the division exact): half an ulp, 2^-4 |x|, for normal results.
    # Results in the subnormal range have absolute error <= half the smallest subnormal x s (2^-10 s fn, 2^-11 s
    # fnuz) with s <= 2 max(amax, 1e-4) / fmax (power-of-two rounding up): 2^-10 * 2 / 448 and 2^-11 * 2 / 224
    # are both 2^-16.8 of the row's max(amax, 1e-4) = 2^-4 * 2^-12.8 < 2^-4 * SUB_FLOOR. The keys are bf16-exact
    # (no input rounding); saturation cannot occur (|x| / s <= fmax by the scale rule).
    return Tolerance(0.0, 2.0**-4, "indexer K: one e4m3 rounding (half ulp 2^-4) at the token's power-of-two "
                     "scale, relative to max(|x|, 2^-13 max(row amax, 1e-4)) (the floor covers subnormal results: "
                     "2^-10 * 2/448 = 2^-11 * 2/224 = 2^-16.8 of the row amax)")


def _k_scale(x: torch.Tensor) -> torch.Tensor:
    a = x.double().abs()
    return torch.maximum(a, SUB_FLOOR * a.amax(-1, keepdim=True).clamp(min=1e-4))


def _written(slot_mapping: torch.Tensor, cache: torch.Tensor, lay: KCacheLayout):
    """Byte masks (value bytes, scale bytes) of the written slots, and the written slots in row order."""
    vals = torch.zeros(cache.shape, dtype=torch.bool)
    scs = torch.zeros(cache.shape, dtype=torch.bool)
    slots = [int(s) for s in slot_mapping.tolist() if s >= 0]
    for s in slots:
        b, o = divmod(s, lay.block_size)
        vals[b, lay.value_cols(o)] = True
        scs[b, lay.scale_cols(o)] = True
    return vals, scs, slots


def _diagnose(c: Comparison, got, ref, codes=None) -> Comparison:
    """Append the dialect diagnosis (ratio signature against ``ref``, the emulated serving values: same
    quantisation, so a rounding is not mistaken for a factor) to a failing value comparison."""
    if c.verdict == "pass":
        return c
    sig = ratio_signature(got, ref, codes=codes, ignore_below=_k_scale(ref) * 2.0**-3, edge="indexer_k->logits")
    if sig.flagged:
        c.message += f"; dialect diagnosis: {sig.summary()}"
        c.worst = dict(c.worst, ratio_signature=sig.signature, factor=sig.factor)
    return c


def _codes_at(cache: torch.Tensor, slots, lay: KCacheLayout) -> torch.Tensor:
    return lay.read_tokens(cache, slots).values


def compare_k_cache(got: dict, want: dict, params: dict, level: str, label: str, kwargs: dict) -> list[Comparison]:
    lay = _layout(kwargs.get("block_size", 64), kwargs.get("layout", "normal"))
    pool = kwargs["cache"]
    out = []
    for name in ("k", "cache"):
        if name not in got:
            return [Comparison(name, "fail", message=f"{label} {name}: the subject returned no {name!r} output "
                                                     f"(returned {sorted(got)})")]
    gk, gc = got["k"], got["cache"]
    ulp = "float32" if level in ("fp64", "fp32") else "bfloat16"
    c = compare_float(gk.float() if gk.dtype == torch.bfloat16 else gk, want["k"], _k_tol(level), output="k",
                      scale=_k_scale(want["k"]) if level == "serving" else None, label=label, ulp_dtype=ulp,
                      level=level)
    read = gather_slots(kwargs["block_table"], kwargs["seq_lens"], lay.block_size)
    emu = {}

    def served():   # the emulated serving values of this profile: the diagnosis' reference (computed on failure)
        if not emu:
            ref = want if level == "emulated" else _emulate(params.get("profile", "ocp"))(
                **{k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
            emu.update(ref)
        return emu

    ok_shape = gc.dtype == torch.uint8 and tuple(gc.shape) == tuple(pool.shape)
    if c.verdict != "pass" and level in ("serving", "emulated"):
        c = _diagnose(c, gk, served()["k"], _codes_at(gc, read, lay) if ok_shape else None)
    out.append(c)
    if not ok_shape:
        out.append(Comparison("cache", "fail", message=f"{label} cache: expected the pool back as uint8 "
                              f"{tuple(pool.shape)}, got {gc.dtype} {tuple(gc.shape)}"))
        return out
    vals, scs, slots = _written(kwargs["slot_mapping"], pool, lay)
    keep = ~(vals | scs)
    u = compare_exact(gc[keep], pool[keep], output="cache.untouched", label=label)
    if u.verdict != "pass":
        i = int(torch.nonzero(gc[keep] != pool[keep])[0])
        b, col = (int(v) for v in torch.nonzero(keep)[i])
        where = (f"value bytes ({lay.layout} layout: slot {b * lay.block_size + col // DIM} if block-flat)"
                 if col < lay.scale_region else
                 f"scale bytes of slot {b * lay.block_size + (col - lay.scale_region) // 4}"
                 if col < lay.scale_region + 4 * lay.block_size else "the block's alignment tail")
        u.message += f" (bytes no written slot owns: block {b}, byte {col}, {where})"
    out.append(u)
    if level == "emulated":
        out.append(compare_exact(gc[vals], want["cache"][vals], output="cache.values", label=label,
                                 fp8_format=params.get("dialect")))
        out.append(compare_exact(gc[scs], want["cache"][scs], output="cache.scales", label=label))
    elif level == "serving":
        # the written slots decoded by the spec layout in the subject's dialect, against the keys written there
        tok = lay.read_tokens(gc, slots)
        dec = cl.dequantize_indexer_k_tokens(tok, params.get("dialect", "float8_e4m3fn"))
        rows = [i for i, s in enumerate(kwargs["slot_mapping"].tolist()) if s >= 0]
        wk = kwargs["k"].float()[rows]
        c = compare_float(dec, wk, _k_tol(level), output="cache.values", scale=_k_scale(wk), label=label,
                          ulp_dtype=ulp, level=level)
        if c.verdict != "pass":
            sp = served()["cache"]
            c = _diagnose(c, dec, lay.read(sp, slots, params.get("dialect", "float8_e4m3fn")), codes=tok.values)
        out.append(c)
    return out


register(ComponentSpec(
    name="indexer.k_cache", family="indexer", reference=indexer_k_cache_golden,
    outputs=(OutputSpec("k", tol=lambda p, lvl: _k_tol(lvl)), OutputSpec("cache", kind="exact")),
    description="indexer K: per-token FP8 quantisation (pow2 scale), insert into the paged indexer-K pool by slot "
                "(-1 skipped), gather per request and dequantise",
    spec_section="3.8, 4.5", emulate=_emulate, compare=compare_k_cache,
    divergences=("spec 4.5: vLLM 0.32's DSV4 indexer-K writer is the compressor's fused store "
                 "(compress_norm_rope_store_triton: float8e4nv, FP8_MAX 448 on every arch); its dedicated "
                 "indexer_k_quant_and_cache_triton (fnuz: 224) is not on DSV4's path (skip_k_cache_insert=True)",),
))


# ------------------------------------------------------------------------------------------------ cases
def _garbage_pool(g: torch.Generator, blocks: int, lay: KCacheLayout) -> torch.Tensor:
    """Random bytes; NaN codes of both dialects (0x80 fnuz, 0x7F / 0xFF OCP) in the value regions, NaN fp32
    patterns in the scale regions: a reader that reads an unwritten slot, or a writer that leaves one, shows."""
    pool = torch.randint(0, 256, (blocks, lay.block_stride), generator=g, dtype=torch.int32).to(torch.uint8)
    vals = pool[:, :lay.scale_region]
    m = torch.rand(vals.shape, generator=g)
    vals[m < 0.05] = 0x80
    vals[(m >= 0.05) & (m < 0.08)] = 0x7F
    vals[(m >= 0.08) & (m < 0.10)] = 0xFF
    sc = pool[:, lay.scale_region:lay.scale_region + 4 * lay.block_size].reshape(blocks, lay.block_size, 4)
    nan = torch.rand(blocks, lay.block_size, generator=g) < 0.3
    sc[nan] = torch.tensor([0x00, 0x00, 0xC0, 0x7F], dtype=torch.uint8)     # fp32 quiet NaN, little-endian
    return pool


def _make(g, p):
    bs, lens, nblocks, pad = p["block_size"], p["seq_lens"], p["blocks"], p["padding"]
    lay = _layout(bs, p.get("layout", "normal"))
    W = max(-(-n // bs) for n in lens)
    perm = torch.randperm(nblocks, generator=g)      # each request's blocks scattered over the pool
    bt = torch.full((len(lens), W), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        nb = -(-n // bs)
        bt[b, :nb] = perm[used:used + nb].int()
        used += nb
    if used > nblocks:
        raise ValueError(f"case needs {used} blocks, pool has {nblocks}")
    seq = torch.tensor(lens, dtype=torch.int32)
    slots = gather_slots(bt, seq, bs)
    N = len(slots)
    # per-row magnitudes 2^U(-8, 8): the scales differ token by token (a per-block scale shows)
    mag = torch.exp2(torch.rand(N, 1, generator=g) * 16 - 8)
    k = dist_tensor(g, (N, DIM), p["dist"]) * mag
    if p.get("fmax_band"):
        # row amax in (224, 240] x 2^j: the power-of-two scale differs between fmax 224 (vLLM's fnuz writer) and
        # 240 (finfo(fnuz).max), so only the right fmax gives the emulation's bytes
        j = torch.randint(-6, 6, (N, 1), generator=g).float()
        k = k / k.abs().amax(-1, keepdim=True) * (230.0 * torch.exp2(j))
    if p.get("negzero"):
        # tiny negatives in rows with a large amax: they round to zero (-0 in OCP, 0x80; +0 in fnuz, 0x00)
        k[:, 0] = 100.0
        k[:, 1:17] = -1e-7
    k = k.to(torch.bfloat16).float()
    # write order shuffled, padding rows (-1) interleaved, as a padded batch presents them
    order = torch.randperm(N, generator=g)
    rows_k = torch.cat([k[order], dist_tensor(g, (pad, DIM), "normal")])
    rows_s = torch.cat([slots[order], torch.full((pad,), -1, dtype=torch.long)])
    mix = torch.randperm(N + pad, generator=g)
    return {"k": rows_k[mix].contiguous(), "slot_mapping": rows_s[mix].contiguous(),
            "cache": _garbage_pool(g, nblocks, lay), "block_table": bt, "seq_lens": seq, "block_size": bs,
            "layout": p.get("layout", "normal")}


for tag, lens, blocks, pad, dist, extra, seed in [
        ("decode", (1, 1, 1, 1), 6, 4, "normal", {}, 0),            # one entry per request, cuda-graph padding
        ("prefill", (70, 33), 5, 3, "normal", {}, 1),               # a request across two blocks, a partial block
        ("prefill", (64, 5, 17), 6, 2, "wide", {}, 2),              # a full block; subnormal results
        ("prefill", (40,), 3, 2, "normal", {"negzero": True}, 3),   # values rounding to -0
        ("prefill", (48, 9), 4, 1, "normal", {"fmax_band": True}, 4)]:  # fmax 224 vs 240
    name = "negzero" if extra.get("negzero") else "fmax-band" if extra.get("fmax_band") else dist
    add(Case(f"indexer.k_cache/{tag}/b{len(lens)}n{sum(lens)}p{pad}/{name}/s{seed}", "indexer.k_cache", _make,
             dict({"seq_lens": lens, "blocks": blocks, "padding": pad, "block_size": 64}, **extra), seed, dist,
             (tag, "paged") + (("negzero",) if extra.get("negzero") else ())))
# vLLM's 16x16 SHUFFLE pool (its dedicated writer / gather pair at block_size 64): partly written tiles
for tag, lens, blocks, pad, extra, seed in [("decode", (1, 1, 1), 4, 5, {}, 20), ("prefill", (70, 20), 4, 3, {}, 21),
                                            ("prefill", (30, 3), 3, 2, {"fmax_band": True}, 22)]:
    name = "shuffle-fmax-band" if extra else "shuffle"
    add(Case(f"indexer.k_cache/{tag}/b{len(lens)}n{sum(lens)}p{pad}/{name}/s{seed}", "indexer.k_cache", _make,
             dict({"seq_lens": lens, "blocks": blocks, "padding": pad, "block_size": 64, "layout": "shuffle"},
                  **extra), seed, "normal", (tag, "paged", "shuffle")))
add(Case("indexer.k_cache/prefill/b3n1500p8/normal/s10", "indexer.k_cache", _make,
         {"seq_lens": (1000, 300, 200), "blocks": 30, "padding": 8, "block_size": 64}, 10, "normal",
         ("prefill", "paged", "long-context"), tier="full"))

