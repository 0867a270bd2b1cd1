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

MXFP4 rows (layouts "mxfp4", "mxfp4-gfx950"; ``indexer_kv_dtype='mxfp4'``, V4.1 only): each key as 4 blocks of 32
E2M1 values (packed two a byte, the even element in the LOW nibble) with one UE8M0 scale byte (exponent + 127) per
block, scale 2^ceil(log2(max(amax, 6 * 2^-126) / 6)), codes e2m1(x / scale) round-to-nearest-even, saturating:
vLLM 0.32's rule in models/deepseek_v41/common/ops/indexer_k_store.py:210-235 (and
models/deepseek_v4/common/ops/fused_indexer_q.py:58-77), the references' ``blockscale.quantize_mxfp4``. 68 bytes
an entry: values of every entry (entry s at s*64), then the 4 scale bytes of every entry (block_size*64 + s*4),
row padded to 576 (``IndexerKLayout(value_format="mxfp4")``): "mxfp4" is that block-flat page (CUDA SM100's writer,
indexer_k_store.py:199-208 without SHUFFLE); "mxfp4-gfx950" is aiter's preshuffled page of the same bytes
(``cache_layouts.Mxfp4ShuffledLayout``, tiles (16, 16, 4) as the references state them; vLLM reads them from aiter's
cache_format at run time, v1/attention/ops/rocm_paged_mxfp4_indexer.py:67-121), which gfx950's writer
(aiter k_norm_rope_mxfp4_cache, models/deepseek_v41/amd/rocm.py:386-415) and logits kernel use. Who serves it:
gfx950 with aiter (CDNA4, VLLM_ROCM_USE_AITER=1) and CUDA SM100 (v1/attention/backends/mla/indexer.py:59-96);
the gfx942 profile has only the FP8 cache (its subjects: not provided, ``GFX942_FP8_ONLY``), the OCP profile's
emulation models both MXFP4 layouts. Bound: ``_k_tol(.., "mxfp4")`` (one E2M1 rounding, 2^-2 max(|x|, amax/3)
per 32-block); at the emulated level the bytes exactly. Failures carry an MXFP4 diagnosis
(``mxfp4_diagnosis``: nibble order, bias-128 scale bytes / x0.5 reads, the other page layout, per-16 scales).
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


LAYOUTS = ("normal", "shuffle", "mxfp4", "mxfp4-gfx950")
FP4_LAYOUTS = ("mxfp4", "mxfp4-gfx950")
TILE = 16      # the SHUFFLE layout's tile: 16 entries x 16 value bytes
# MXFP4 (module docstring, "MXFP4 rows"): E2M1 values, one UE8M0 scale per 32; the pow2 scale's amax floor
MX_BLOCK = 32
MX_FLOOR = 6.0 * 2.0**-126
# why a gfx942 subject provides no MXFP4 row (the FP8 cache is gfx942's only one)
GFX942_FP8_ONLY = ("gfx942 uses the FP8 indexer cache: dsa_indexer_uses_fp4 refuses indexer_kv_dtype='mxfp4' below "
                   "CDNA4 (v1/attention/backends/mla/indexer.py:80-83)")


def value_format(layout: str) -> str:
    return "mxfp4" if layout in FP4_LAYOUTS else "fp8"


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
        if layout in ("shuffle", "mxfp4-gfx950") and block_size % TILE:
            raise ValueError(f"layout {layout!r} needs block_size a multiple of {TILE}, got {block_size}")
        self.value_format = value_format(layout)
        self.flat = cl.IndexerKLayout(block_size=block_size, value_format=self.value_format)
        # gfx950: aiter's preshuffled page with the tile parameters the references state (16, 16, 4)
        self.shuf = cl.Mxfp4ShuffledLayout(block_size=block_size) if layout == "mxfp4-gfx950" else None
        self.block_size, self.layout = block_size, layout
        self.block_stride, self.scale_region = self.flat.block_stride, self.flat.scale_region
        self.value_bytes = self.flat.value_bytes

    def value_cols(self, s: int) -> torch.Tensor:
        if self.shuf is not None:
            return torch.from_numpy(self.shuf.value_cols(s))
        d = torch.arange(self.value_bytes)
        if self.layout != "shuffle":
            return s * self.value_bytes + d
        return (s // TILE) * TILE * DIM + (d // TILE) * TILE * TILE + (s % TILE) * TILE + d % TILE

    def scale_cols(self, s: int) -> torch.Tensor:
        if self.shuf is not None:
            return torch.from_numpy(self.shuf.scale_cols(s))
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
            return cl.IndexerKTokens(torch.empty(0, self.value_bytes, dtype=torch.uint8),
                                     torch.empty(0, 4, dtype=torch.uint8))
        return cl.IndexerKTokens(torch.stack(vals), torch.stack(scs))

    def read(self, pool: torch.Tensor, slots, dialect) -> torch.Tensor:
        return cl.dequantize_indexer_k_tokens(self.read_tokens(pool, slots), dialect, value_format=self.value_format)


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


def relative(slot_mapping: torch.Tensor, block_table: torch.Tensor, block_base: int, block_size: int,
             rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot mapping, block table) relative to a pool whose row r holds block id ``block_base + r`` (the high-block
    rows: slots and block ids are global, the blocks below ``block_base`` are not materialised); -1 kept. A slot or
    block outside [block_base, block_base + rows) is refused in one line."""
    if not isinstance(block_base, int) or block_base < 0:
        raise ValueError(f"block_base: expected a non-negative int, got {block_base!r}")
    if not block_base:
        return slot_mapping, block_table
    s, bt = slot_mapping.long(), block_table.long()
    rel = torch.where(s >= 0, s - block_base * block_size, s)
    bad = (s >= 0) & ((rel < 0) | (rel >= rows * block_size))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise IndexError(f"slot_mapping[{i}] = {int(s[i])}: block {int(s[i]) // block_size} is outside the pool's "
                         f"blocks [{block_base}, {block_base + rows})")
    rbt = torch.where(bt >= 0, bt - block_base, bt)
    return rel, rbt.to(block_table.dtype)


def _check(k, slot_mapping, cache, block_table, seq_lens, block_size, layout="normal"):
    lay = _layout(block_size, layout)
    cl._check_values(k, DIM, "k")
    cl._check_cache(cache, lay.block_stride, f"indexer K ({lay.layout} layout)")
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
                           layout: str = "normal", block_base: int = 0) -> dict:
    """-> {"k": the written key of every gathered slot [sum(seq_lens), 128], "cache": the pool as given}
    (golden: unquantised; the module docstring gives the layout and what each output is compared with).
    layout: one of ``LAYOUTS`` (``KCacheLayout``); block_base: the block id of the pool's row 0 (``relative``)."""
    slot_mapping, block_table = relative(slot_mapping, block_table, block_base, block_size, cache.shape[0])
    _, _, _, rows = _check(k, slot_mapping, cache, block_table, seq_lens, block_size, layout)
    dt = torch.promote_types(k.dtype, torch.float32)
    return {"k": k.to(dt)[rows], "cache": cache.clone()}


def _emulate(profile: str):
    dialect = "float8_e4m3fn" if profile == "ocp" else "float8_e4m3fnuz"
    fmax = K_FMAX[profile]

    def indexer_k_cache_serving(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64, layout="normal",
                                block_base=0):
        """The writer (per-token pow2 scale, the profile's dialect and fmax; -1 rows skipped) and the reader
        (the case's layout, code x fp32 scale) of the module docstring. MXFP4 layouts: the OCP profile's (gfx950's
        and CUDA's) MXFP4 writer (E2M1, one UE8M0 scale per 32, ``blockscale.quantize_mxfp4``); the gfx942 profile
        has no MXFP4 cache (``GFX942_FP8_ONLY``). Offsets from the pool's row 0 (block ``block_base``): Python
        integers, no wrap."""
        slot_mapping, block_table = relative(slot_mapping, block_table, block_base, block_size, cache.shape[0])
        lay, _, read, _ = _check(k, slot_mapping, cache, block_table, seq_lens, block_size, layout)
        if lay.value_format == "mxfp4" and profile == "gfx942":
            from ..components import Unsupported

            raise Unsupported(GFX942_FP8_ONLY)
        pool = cache.clone()
        kb = k.to(torch.bfloat16).float()
        tok = (cl.encode_indexer_k_tokens(kb, value_format="mxfp4") if lay.value_format == "mxfp4" else
               cl.encode_indexer_k_tokens(kb, dialect, fmax))
        lay.write(pool, slot_mapping, tok)
        return {"k": lay.read(pool, read, dialect), "cache": pool}

    indexer_k_cache_serving.__qualname__ = f"indexer_k_cache_serving[{profile}]"
    return indexer_k_cache_serving


def _k_tol(level: str, fmt: str = "fp8") -> Tolerance:
    """The elementwise bound below; at serving with its RMS (calc_diff) model (conformance.rms): the key is ONE
    rounding (e4m3 or E2M1 at a power-of-two scale; the keys are bf16-exact), at most rtol x scale and uniform over
    +-half a cell for round-to-nearest, so E[e^2] <= rtol^2/3 scale^2: the one-uniform-step form is the exact
    model of a single rounding. Elsewhere the bound is exact (0) and the elementwise comparison decides."""
    t = _k_elementwise(level, fmt)
    if level == "serving":
        t = t.with_rms(ms_scale=t.rtol**2 / 3, derivation=f"indexer K: one {'E2M1' if fmt == 'mxfp4' else 'e4m3'} "
                       f"rounding at a power-of-two scale, uniform in +-half a cell: {t.rtol:g}^2/3 scale^2")
    return t


def _k_elementwise(level: str, fmt: str = "fp8") -> Tolerance:
    if level != "serving":
        return Tolerance(0.0, 0.0, "indexer K: the golden is the key itself (fp32 and fp64 alike); against the "
                         "emulation the same bytes and scale decode to the same value (code x 2^e, exact in fp32)")
    if fmt == "mxfp4":
        # One E2M1 rounding of y = x / s, s = 2^ceil(log2(a / 6)) for the 32-block's amax a (the division exact:
        # s a power of two), so a/6 <= s < a/3 and |y| <= 6 (no saturation). E2M1's grid {0, .5, 1, 1.5, 2, 3, 4,
        # 6} has spacing 0.5 on [0, 2], 1 on [2, 4], 2 on [4, 6]: round-to-nearest errs by at most 0.25, 0.5, 1
        # there, i.e. <= 2^-2 max(|y|, 1) everywhere (0.5 <= |y|/4 on [2, 4], 1 <= |y|/4 on [4, 6]). Times s:
        # |err| <= 2^-2 max(|x|, s) < 2^-2 max(|x|, a / 3). Tight: y = 5 errs by 1 = 0.2 |y|, y = 0.25 by 0.25.
        # The keys are bf16-exact (no input rounding). The pow2 choice at a tie a = 6 * 2^j (a kernel's fp32
        # log2(a * (1/6)) may round up) gives s = 2^(j+1) = a / 3: still <= a / 3, so the bound holds for either
        # choice; the emulated level checks the bytes (exact ceil: s = 2^j).
        return Tolerance(0.0, 2.0**-2, "indexer K (MXFP4): one E2M1 rounding (<= 2^-2 max(|y|, 1) on E2M1's grid) "
                         "at the 32-block's power-of-two scale s < amax/3, relative to max(|x|, block amax / 3)")
    # One e4m3 rounding of x / s (s a power of two, the division exact): half an ulp, 2^-4 |x|, for normal results.
    # Results in the subnormal range have absolute error <= half the smallest subnormal x s (2^-10 s fn, 2^-11 s
    # fnuz) with s <= 2 max(amax, 1e-4) / fmax (power-of-two rounding up): 2^-10 * 2 / 448 and 2^-11 * 2 / 224
    # are both 2^-16.8 of the row's max(amax, 1e-4) = 2^-4 * 2^-12.8 < 2^-4 * SUB_FLOOR. The keys are bf16-exact
    # (no input rounding); saturation cannot occur (|x| / s <= fmax by the scale rule).
    return Tolerance(0.0, 2.0**-4, "indexer K: one e4m3 rounding (half ulp 2^-4) at the token's power-of-two "
                     "scale, relative to max(|x|, 2^-13 max(row amax, 1e-4)) (the floor covers subnormal results: "
                     "2^-10 * 2/448 = 2^-11 * 2/224 = 2^-16.8 of the row amax)")


def _k_scale(x: torch.Tensor, fmt: str = "fp8") -> torch.Tensor:
    a = x.double().abs()
    if fmt == "mxfp4":
        blk = a.reshape(*a.shape[:-1], -1, MX_BLOCK)
        amax = blk.amax(-1, keepdim=True).clamp(min=MX_FLOOR)
        return torch.maximum(blk, amax / 3).reshape(a.shape)
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


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all()) if a.is_floating_point() \
        else a.shape == b.shape and bool((a == b).all())


def _swap_nibbles(v: torch.Tensor) -> torch.Tensor:
    return ((v & 0x0F) << 4) | (v >> 4)


def _other_layout(lay: KCacheLayout) -> KCacheLayout:
    return _layout(lay.block_size, "mxfp4" if lay.layout == "mxfp4-gfx950" else "mxfp4-gfx950")


def _mx16_codes(k: torch.Tensor) -> torch.Tensor:
    """The packed E2M1 bytes of ``k`` at one pow2 scale per 16 values (the same rule, the wrong block)."""
    from references.formats.blockscale import quantize_mxfp4

    halves = k.double().reshape(k.shape[0], -1, 16)
    pad = torch.zeros(k.shape[0], halves.shape[1], 16, dtype=halves.dtype)
    # each 16-run quantised as a 32-block whose other half is zero: its amax, hence its scale, is the 16-run's
    packed, _ = quantize_mxfp4(torch.cat((halves, pad), -1).reshape(k.shape[0], -1))
    return packed.reshape(k.shape[0], -1, 16)[:, :, :8].reshape(k.shape[0], -1)


def mxfp4_diagnosis(*, got_k=None, got_pool=None, pool_in=None, emu: dict, lay: KCacheLayout, read, slots,
                    keys) -> str | None:
    """What an MXFP4 failure looks like, tested against the emulation's bytes (``emu``: its "k" and "cache"):
    the gathered keys (``got_k``) or the subject's pool (``got_pool``) explained by one known mistake, or None.
    ``slots``/``keys``: the written slots and the keys written there (row order)."""
    ek, ep = emu["k"], emu["cache"]
    if got_k is not None:
        if _same(got_k, _other_layout(lay).read(ep, read, None)):
            what = ("gfx950 shuffled pool read block-flat" if lay.shuf is not None else
                    "block-flat pool read as the gfx950 shuffled page")
            return f"the keys are the {lay.layout} pool's bytes read in the {_other_layout(lay).layout} layout ({what})"
        nz = (ek != 0) & torch.isfinite(ek) & torch.isfinite(got_k)
        if nz.any():
            r = torch.unique(got_k[nz] / ek[nz])
            if len(r) == 1 and float(r[0]) in (0.5, 2.0):
                return (f"every value x{float(r[0]):g} of the emulation's: the UE8M0 scale byte decoded with bias "
                        f"{128 if float(r[0]) == 0.5 else 126} instead of 127")
        tok = lay.read_tokens(ep, read)
        sw = cl.dequantize_indexer_k_tokens(cl.IndexerKTokens(_swap_nibbles(tok.values), tok.scales),
                                            value_format="mxfp4")
        if _same(got_k, sw):
            return "the E2M1 nibbles of each byte swapped (the even element read from the high nibble)"
        return None
    ts = lay.read_tokens(got_pool, slots)
    es = lay.read_tokens(ep, slots)
    if _same(_swap_nibbles(ts.values), es.values):
        return ("E2M1 nibble order swapped: the even element in the high nibble (spec and vLLM: low nibble first, "
                "models/deepseek_v41/common/ops/indexer_k_store.py:210-235)")
    if _same(ts.values, es.values) and _same(ts.scales.int() - es.scales.int(), torch.ones_like(ts.scales.int())):
        return "every UE8M0 scale byte one above the emulation's: the exponent stored with bias 128 instead of 127"
    if _same(_other_layout(lay).read_tokens(got_pool, slots).values, es.values):
        return f"the values written in the {_other_layout(lay).layout} layout on a {lay.layout} pool"
    if len(slots) and _same(ts.values, _mx16_codes(keys.float())):
        return ("the values are E2M1 codes at one scale per 16 values (spec and vLLM: one UE8M0 scale per 32, "
                "SCALE_DIM = HEAD_SIZE // 32, indexer_k_store.py:66-69)")
    return None


def _diag_mx(c: Comparison, **kw) -> Comparison:
    if c.verdict == "pass":
        return c
    d = mxfp4_diagnosis(**kw)
    if d:
        c.message += f"; MXFP4 diagnosis: {d}"
        c.worst = dict(c.worst, mxfp4_diagnosis=d)
    return c


def _codes_at(cache: torch.Tensor, slots, lay: KCacheLayout) -> torch.Tensor:
    return lay.read_tokens(cache, slots).values


def _lost_writes(c: Comparison, got_pool, pool_in, slots, lay: KCacheLayout, block_base: int) -> Comparison:
    """Append, to a failing cache comparison, which written slots still hold the pool's bytes as given (a write
    that never landed), and whether they are exactly the slots past 2^31 bytes (an int32 block offset)."""
    if c.verdict == "pass" or not slots:
        return c
    def untouched(s):
        b, o = divmod(s, lay.block_size)
        return all(torch.equal(got_pool[b, cols], pool_in[b, cols]) for cols in (lay.value_cols(o), lay.scale_cols(o)))
    lost = [s for s in slots if untouched(s)]
    if lost:
        high = [s for s in slots if (s // lay.block_size + block_base) * lay.block_stride >= 2**31]
        c.message += (f"; {len(lost)} of {len(slots)} written slots still hold the pool's bytes as given (the writes "
                      f"never landed)" + (": exactly the slots whose byte offset block_id * block_stride passes 2^31 "
                                          "(an int32 offset wraps)" if lost == high else ""))
        c.worst = dict(c.worst, lost_writes=len(lost))
    return c


def compare_k_cache(got: dict, want: dict, params: dict, level: str, label: str, kwargs: dict) -> list[Comparison]:
    lay = _layout(kwargs.get("block_size", 64), kwargs.get("layout", "normal"))
    fmt, mx = lay.value_format, lay.value_format == "mxfp4"
    pool = kwargs["cache"]
    rel_sm, rel_bt = relative(kwargs["slot_mapping"], kwargs["block_table"], kwargs.get("block_base", 0),
                              lay.block_size, pool.shape[0])
    out = []
    for name in ("k", "cache"):
        if name not in got:
            return [Comparison(name, "fail", message=f"{label} {name}: the subject returned no {name!r} output "
                                                     f"(returned {sorted(got)})")]
    gk, gc = got["k"], got["cache"]
    ulp = "float32" if level in ("fp64", "fp32") else "bfloat16"
    c = compare_float(gk.float() if gk.dtype == torch.bfloat16 else gk, want["k"], _k_tol(level, fmt), output="k",
                      scale=_k_scale(want["k"], fmt) if level == "serving" else None, label=label, ulp_dtype=ulp,
                      level=level)
    read = gather_slots(rel_bt, kwargs["seq_lens"], lay.block_size)
    emu = {}

    def served():   # the emulated serving values of this profile: the diagnosis' reference (computed on failure)
        if not emu:
            ref = want if level == "emulated" else _emulate("ocp" if mx else params.get("profile", "ocp"))(
                **{k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
            emu.update(ref)
        return emu

    ok_shape = gc.dtype == torch.uint8 and tuple(gc.shape) == tuple(pool.shape)
    vals, scs, slots = _written(rel_sm, pool, lay)
    rows = [i for i, s in enumerate(rel_sm.tolist()) if s >= 0]
    wk = kwargs["k"].float()[rows]
    mxkw = dict(emu=None, lay=lay, read=read, slots=slots, keys=wk)
    if c.verdict != "pass" and level in ("serving", "emulated"):
        c = (_diag_mx(c, got_k=gk.float(), **dict(mxkw, emu=served())) if mx else
             _diagnose(c, gk, served()["k"], _codes_at(gc, read, lay) if ok_shape else None))
    out.append(c)
    if not ok_shape:
        out.append(Comparison("cache", "fail", message=f"{label} cache: expected the pool back as uint8 "
                              f"{tuple(pool.shape)}, got {gc.dtype} {tuple(gc.shape)}"))
        return out
    keep = ~(vals | scs)
    u = compare_exact(gc[keep], pool[keep], output="cache.untouched", label=label)
    if u.verdict != "pass":
        i = int(torch.nonzero(gc[keep] != pool[keep])[0])
        b, col = (int(v) for v in torch.nonzero(keep)[i])
        vb, b = lay.value_bytes, b + kwargs.get("block_base", 0)     # global block id and slots
        where = (f"value bytes ({lay.layout} layout: slot {b * lay.block_size + col // vb} if block-flat)"
                 if col < lay.scale_region else
                 f"scale bytes of slot {b * lay.block_size + (col - lay.scale_region) // 4}"
                 if col < lay.scale_region + 4 * lay.block_size else "the block's alignment tail")
        u.message += f" (bytes no written slot owns: block {b}, byte {col}, {where})"
        if mx and level in ("serving", "emulated"):
            u = _diag_mx(u, got_pool=gc, **dict(mxkw, emu=served()))
    out.append(u)
    if level == "emulated":
        cv = compare_exact(gc[vals], want["cache"][vals], output="cache.values", label=label,
                           fp8_format=None if mx else params.get("dialect"))
        cs = compare_exact(gc[scs], want["cache"][scs], output="cache.scales", label=label)
        if mx:
            cv, cs = (_diag_mx(x, got_pool=gc, **dict(mxkw, emu=want)) for x in (cv, cs))
        out += [_lost_writes(cv, gc, pool, slots, lay, kwargs.get("block_base", 0)), cs]
    elif level == "serving":
        # the written slots decoded by the spec layout in the subject's dialect, against the keys written there
        tok = lay.read_tokens(gc, slots)
        dec = cl.dequantize_indexer_k_tokens(tok, params.get("dialect", "float8_e4m3fn"), value_format=fmt)
        c = compare_float(dec, wk, _k_tol(level, fmt), output="cache.values", scale=_k_scale(wk, fmt), label=label,
                          ulp_dtype=ulp, level=level)
        if c.verdict != "pass":
            if mx:
                c = _diag_mx(c, got_pool=gc, **dict(mxkw, emu=served()))
            else:
                sp = served()["cache"]
                c = _diagnose(c, dec, lay.read(sp, slots, params.get("dialect", "float8_e4m3fn")), codes=tok.values)
        out.append(_lost_writes(c, gc, pool, slots, lay, kwargs.get("block_base", 0)))
    return out


register(ComponentSpec(
    name="indexer.k_cache", family="indexer", reference=indexer_k_cache_golden,
    outputs=(OutputSpec("k", tol=lambda p, lvl: _k_tol(lvl, value_format(p.get("layout", "normal")))),
             OutputSpec("cache", kind="exact")),
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
    if lay.value_format == "mxfp4":
        sc[nan] = 0xFF                                                      # the UE8M0 NaN byte
    else:
        sc[nan] = torch.tensor([0x00, 0x00, 0xC0, 0x7F], dtype=torch.uint8)     # fp32 quiet NaN, little-endian
    return pool


def _make(g, p):
    bs, lens, nblocks, pad = p["block_size"], p["seq_lens"], p["blocks"], p["padding"]
    lay = _layout(bs, p.get("layout", "normal"))
    W = max(-(-n // bs) for n in lens)
    base = p.get("block_base", 0)   # the pool's row r is block base + r (``relative``)
    perm = torch.randperm(nblocks, generator=g) + base      # each request's blocks scattered over the pool
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
    if p.get("e2m1_ties"):
        # every 32-block: amax exactly 6 * 2^j (the pow2 scale's tie: exact ceil gives 2^j), the other values on
        # E2M1's midpoints {0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5} x 2^j with random signs (round-to-nearest-even
        # ties: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4)
        mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
        nb = DIM // MX_BLOCK
        j = torch.randint(-20, 10, (N, nb, 1), generator=g).float()
        v = mids[torch.randint(0, len(mids), (N, nb, MX_BLOCK), generator=g)]
        v[..., 0] = 6.0
        sign = torch.where(torch.rand(N, nb, MX_BLOCK, generator=g) < 0.5, -1.0, 1.0)
        k = (v * sign * torch.exp2(j)).reshape(N, DIM)
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
            "layout": p.get("layout", "normal"), **({"block_base": base} if base else {})}


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
# MXFP4 pools (indexer_kv_dtype='mxfp4'; module docstring, "MXFP4 rows"): block-flat (CUDA's and the references'
# layout) and gfx950's preshuffled page (aiter's k_norm_rope_mxfp4_cache). gfx942 subjects: not provided.
for tag, lens, blocks, pad, dist, layout, extra, seed in [
        ("decode", (1, 1, 1, 1), 6, 4, "normal", "mxfp4", {}, 30),
        ("prefill", (70, 33), 5, 3, "normal", "mxfp4", {}, 31),
        ("prefill", (64, 5, 17), 6, 2, "wide", "mxfp4", {}, 32),
        ("prefill", (40, 9), 3, 2, "normal", "mxfp4", {"e2m1_ties": True}, 33),
        ("decode", (1, 1, 1), 4, 5, "normal", "mxfp4-gfx950", {}, 40),
        ("prefill", (70, 20), 4, 3, "normal", "mxfp4-gfx950", {}, 41),
        ("prefill", (30, 3), 3, 2, "wide", "mxfp4-gfx950", {}, 42),
        ("prefill", (40, 9), 3, 2, "normal", "mxfp4-gfx950", {"e2m1_ties": True}, 43)]:
    name = f"{layout}-{'ties' if extra else dist}"
    add(Case(f"indexer.k_cache/{tag}/b{len(lens)}n{sum(lens)}p{pad}/{name}/s{seed}", "indexer.k_cache", _make,
             dict({"seq_lens": lens, "blocks": blocks, "padding": pad, "block_size": 64, "layout": layout},
                  **extra), seed, dist, (tag, "paged", "mxfp4") + (("gfx950",) if layout == "mxfp4-gfx950" else ())))
# Pools past 2^31 bytes: block ids from HIGH_BLOCK = 466,100 (the blocks below not materialised, ``relative``), so
# block_id * block_stride is in [2^31, 2^32) for both strides: FP8 466,100 x 8,640 = 4,027,104,000; MXFP4 466,100 x
# 4,608 = 2,147,788,800 (2^31 = 2,147,483,648). An int32 offset wraps negative there (the writes are lost); vLLM's
# Triton writer and gather cast the block id to int64 first (rocm_aiter_mla_sparse.py:143-145, :346-348).
HIGH_BLOCK = 466_100
for tag, lens, blocks, pad, layout, seed in [("decode", (1, 1, 1), 4, 3, "normal", 50),
                                             ("prefill", (70, 9), 3, 2, "shuffle", 51),
                                             ("prefill", (70, 9), 3, 2, "mxfp4", 52),
                                             ("prefill", (40, 17), 3, 2, "mxfp4-gfx950", 53)]:
    add(Case(f"indexer.k_cache/{tag}/b{len(lens)}n{sum(lens)}p{pad}/{layout}-high-block/s{seed}", "indexer.k_cache",
             _make, {"seq_lens": lens, "blocks": blocks, "padding": pad, "block_size": 64, "layout": layout,
                     "block_base": HIGH_BLOCK}, seed, "normal",
             (tag, "paged", "high-block") + (("mxfp4",) if layout in FP4_LAYOUTS else ())
             + (("gfx950",) if layout == "mxfp4-gfx950" else ()) + (("shuffle",) if layout == "shuffle" else ())))
add(Case("indexer.k_cache/prefill/b3n1500p8/normal/s10", "indexer.k_cache", _make,
         {"seq_lens": (1000, 300, 200), "blocks": 30, "padding": 8, "block_size": 64}, 10, "normal",
         ("prefill", "paged", "long-context"), tier="full"))

