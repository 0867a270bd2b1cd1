"""Byte-level codecs of the DSV4 paged KV caches as vLLM lays them out (spec 3.6, 3.7, 4.5).

Written from the layouts in the spec, not from vLLM code. A cache is a uint8 tensor
``[num_blocks, block_stride]``; token ``slot`` lives in block ``slot // block_size`` at position
``s = slot % block_size``.

fp8_ds_mla (SWA cache and compressed attention cache), per block of ``block_size`` tokens::

    [s*576,       s*576 + 448)   448 FP8 e4m3 codes of the nope dims, 7 quant blocks of 64
    [s*576 + 448, s*576 + 576)   64 bf16 rope values, little-endian (low byte first)
    [block_size*576 + s*8, +8)   7 UE8M0 scale bytes (exponent + 127), then one zero pad byte
    block stride = block_size * 584 rounded up to a multiple of ``alignment`` (576)

    nope scale: s_j = 2**ceil(log2(max(amax_j, 1e-4) / fmax)) per 64-block j; code = e4m3(x / s_j),
    saturating; fmax is 448 for the CUDA op, the platform fp8 max (240 on fnuz) for the Triton writers.

Indexer K cache (one 128-dim key per compressed entry)::

    fp8:    [s*128, +128) FP8 codes; [block_size*128 + s*4, +4) one fp32 power-of-two scale, little-endian
    mxfp4:  [s*64, +64) packed e2m1, low nibble = even element; [block_size*64 + s*4, +4) 4 UE8M0 bytes,
            one per 32 values
    block stride = block_size * (value bytes + 4) rounded up to a multiple of ``alignment`` (576)

    mxfp4, gfx950 (aiter's preshuffled page, ``Mxfp4ShuffledLayout``): the same bytes of a page (64 e2m1 bytes + 4
    UE8M0 bytes an entry, the values of every entry first), reordered in runs of ``n_per_tile`` entries: a run's
    values as [chunk of ``d_per_tile`` bytes, entry, byte], its scales as [scale % scale_lanes, entry,
    scale // scale_lanes]. (1, 64, 1) is the block-flat mxfp4 layout above.

Writers skip slot -1 (padding tokens, as vLLM's writers do); readers refuse it. The element and scale
quantisation is ``blockscale`` (round once from float64, round to nearest even, saturating).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .blockscale import BlockFP8, dequantize_mxfp4, quantize_fp8, quantize_mxfp4
from .minifloat import FNUZ, OCP, MiniFloat, get_format
from .scales import e8m0_decode

KV_DIM = 512
NOPE_DIM = 448
ROPE_DIM = 64
NOPE_BLOCK = 64
N_NOPE_BLOCKS = NOPE_DIM // NOPE_BLOCK  # 7
DS_MLA_TOKEN_BYTES = NOPE_DIM + 2 * ROPE_DIM  # 576: fp8 nope + bf16 rope
DS_MLA_SCALE_BYTES = N_NOPE_BLOCKS + 1  # 8: 7 UE8M0 bytes + 1 pad
DS_MLA_HEAD_BYTES = DS_MLA_TOKEN_BYTES + DS_MLA_SCALE_BYTES  # 584
INDEX_DIM = 128
INDEX_SCALE_BYTES = 4
AMAX_FLOOR = 1e-4
DEFAULT_ALIGNMENT = 576


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _positive_int(name: str, v) -> None:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class DsMlaLayout:
    """Byte offsets of one fp8_ds_mla block (offsets are within the block's row of the cache)."""

    block_size: int = 64
    alignment: int = DEFAULT_ALIGNMENT

    def __post_init__(self):
        _positive_int("block_size", self.block_size)
        _positive_int("alignment", self.alignment)

    @property
    def block_stride(self) -> int:
        return _round_up(self.block_size * DS_MLA_HEAD_BYTES, self.alignment)

    @property
    def scale_region(self) -> int:
        """Offset of the first scale byte: all token data of the block comes first."""
        return self.block_size * DS_MLA_TOKEN_BYTES

    def nope_offset(self, s: int) -> int:
        return s * DS_MLA_TOKEN_BYTES

    def rope_offset(self, s: int) -> int:
        return s * DS_MLA_TOKEN_BYTES + NOPE_DIM

    def scale_offset(self, s: int) -> int:
        return self.scale_region + s * DS_MLA_SCALE_BYTES


@dataclass(frozen=True)
class IndexerKLayout:
    """Byte offsets of one indexer-K block; ``value_format`` is "fp8" or "mxfp4"."""

    block_size: int = 64
    alignment: int = DEFAULT_ALIGNMENT
    value_format: str = "fp8"

    def __post_init__(self):
        _positive_int("block_size", self.block_size)
        _positive_int("alignment", self.alignment)
        if self.value_format not in ("fp8", "mxfp4"):
            raise ValueError(f"value_format must be 'fp8' or 'mxfp4', not {self.value_format!r}")

    @property
    def value_bytes(self) -> int:
        return INDEX_DIM if self.value_format == "fp8" else INDEX_DIM // 2

    @property
    def block_stride(self) -> int:
        return _round_up(self.block_size * (self.value_bytes + INDEX_SCALE_BYTES), self.alignment)

    @property
    def scale_region(self) -> int:
        return self.block_size * self.value_bytes

    def value_offset(self, s: int) -> int:
        return s * self.value_bytes

    def scale_offset(self, s: int) -> int:
        return self.scale_region + s * INDEX_SCALE_BYTES


@dataclass(frozen=True)
class DsMlaTokens:
    """Encoded tokens: nope codes uint8 [N, 448], scale bytes uint8 [N, 8] (7 UE8M0 + pad), rope bf16
    [N, 64]."""

    nope: torch.Tensor
    scales: torch.Tensor
    rope: torch.Tensor


@dataclass(frozen=True)
class IndexerKTokens:
    """Encoded keys: values uint8 [N, 128] (fp8) or [N, 64] (packed e2m1); scales uint8 [N, 4]."""

    values: torch.Tensor
    scales: torch.Tensor


# -- argument checks ---------------------------------------------------------------------------------
def _dialect(dialect) -> MiniFloat:
    fmt = dialect if isinstance(dialect, MiniFloat) else get_format(dialect)
    if fmt not in (OCP, FNUZ):
        raise ValueError(f"cache FP8 values are e4m3 (float8_e4m3fn or float8_e4m3fnuz), not {fmt.name}")
    return fmt


def _check_values(x, width: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != width:
        raise ValueError(f"{what} must have shape [N, {width}], got {tuple(x.shape)}")


def _check_cache(cache, stride: int, what: str) -> None:
    if not isinstance(cache, torch.Tensor):
        raise TypeError(f"{what} cache must be a torch.Tensor, got {type(cache).__name__}")
    if cache.dtype != torch.uint8:
        raise TypeError(f"{what} cache must be uint8 bytes, got {cache.dtype}")
    if cache.ndim != 2 or cache.shape[1] != stride:
        raise ValueError(
            f"{what} cache must have shape [num_blocks, {stride}] for this layout, got {tuple(cache.shape)}"
        )


def _check_slots(slots, n: int, num_slots: int, *, allow_padding: bool) -> np.ndarray:
    if isinstance(slots, torch.Tensor):
        if slots.dtype.is_floating_point or slots.dtype == torch.bool:
            raise TypeError(f"slot mapping must hold integers, got {slots.dtype}")
        s = slots.cpu().numpy()
    else:
        s = np.asarray(slots)
        if not np.issubdtype(s.dtype, np.integer):
            raise TypeError(f"slot mapping must hold integers, got {s.dtype}")
    s = s.astype(np.int64)
    if s.ndim != 1 or s.shape[0] != n:
        raise ValueError(f"slot mapping must have shape [{n}], got {tuple(s.shape)}")
    low = -1 if allow_padding else 0
    bad = np.flatnonzero((s < low) | (s >= num_slots))
    if len(bad):
        i = int(bad[0])
        raise IndexError(
            f"slot {int(s[i])} (token {i}) out of range [{low}, {num_slots}) ({len(bad)} bad slot(s))"
        )
    valid = s[s >= 0]
    if len(np.unique(valid)) != len(valid):
        vals, counts = np.unique(valid, return_counts=True)
        raise ValueError(f"slot {int(vals[counts > 1][0])} written more than once in one call")
    return s


def _scatter(cache: torch.Tensor, blocks: np.ndarray, offsets: np.ndarray, data: np.ndarray) -> None:
    cols = offsets[:, None] + np.arange(data.shape[1])
    cache[torch.from_numpy(blocks[:, None]), torch.from_numpy(cols)] = torch.from_numpy(
        np.ascontiguousarray(data)
    )


def _gather(cache: torch.Tensor, blocks: np.ndarray, offsets: np.ndarray, width: int) -> np.ndarray:
    cols = offsets[:, None] + np.arange(width)
    return cache[torch.from_numpy(blocks[:, None]), torch.from_numpy(cols)].cpu().numpy()


def _bf16_to_bytes(x: torch.Tensor) -> np.ndarray:
    """bf16 [N, D] -> uint8 [N, 2D], little-endian whatever the host's byte order."""
    bits = x.contiguous().view(torch.int16).numpy().astype(np.uint16)
    out = np.empty(bits.shape[:-1] + (2 * bits.shape[-1],), np.uint8)
    out[..., 0::2] = bits & 0xFF
    out[..., 1::2] = bits >> 8
    return out


def _bytes_to_bf16(b: np.ndarray) -> torch.Tensor:
    bits = b[..., 0::2].astype(np.uint16) | (b[..., 1::2].astype(np.uint16) << 8)
    return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)


# -- fp8_ds_mla ------------------------------------------------------------------------------------
def encode_ds_mla_tokens(kv: torch.Tensor, dialect="ocp", fmax: float | None = None) -> DsMlaTokens:
    """kv [N, 512] (nope 448 ‖ rope 64, any float dtype) -> the bytes one token slot holds.

    fmax defaults to the dialect's max (448 OCP, 240 fnuz). The rope part is rounded to bf16 (nearest even).
    """
    _check_values(kv, KV_DIM, "kv")
    fmt = _dialect(dialect)
    spec = BlockFP8(fmt, float(fmt.max if fmax is None else fmax), (1, NOPE_BLOCK), "ue8m0", AMAX_FLOOR)
    codes, sb = quantize_fp8(kv[:, :NOPE_DIM], spec)
    scales = torch.cat([sb, torch.zeros(kv.shape[0], 1, dtype=torch.uint8)], dim=1)
    return DsMlaTokens(codes, scales, kv[:, NOPE_DIM:].detach().cpu().to(torch.bfloat16))


def dequantize_ds_mla_tokens(tokens: DsMlaTokens, dialect="ocp") -> torch.Tensor:
    """DsMlaTokens -> float32 [N, 512]: nope = code value x 2**(byte - 127) per 64-block; rope = bf16."""
    fmt = _dialect(dialect)
    vals = fmt.decode(tokens.nope.numpy()).reshape(-1, N_NOPE_BLOCKS, NOPE_BLOCK)
    s = e8m0_decode(tokens.scales.numpy()[:, :N_NOPE_BLOCKS])
    nope = torch.from_numpy((vals * s[..., None]).reshape(-1, NOPE_DIM).astype(np.float32))
    return torch.cat([nope, tokens.rope.to(torch.float32)], dim=1)


def write_ds_mla(
    cache: torch.Tensor,
    slot_mapping,
    kv: torch.Tensor,
    dialect="ocp",
    fmax: float | None = None,
    *,
    layout: DsMlaLayout = DsMlaLayout(),
) -> DsMlaTokens:
    """Quantise ``kv`` [N, 512], write token i to ``slot_mapping[i]`` (-1: skipped); return the encoding."""
    _check_cache(cache, layout.block_stride, "fp8_ds_mla")
    _check_values(kv, KV_DIM, "kv")
    slots = _check_slots(slot_mapping, kv.shape[0], cache.shape[0] * layout.block_size, allow_padding=True)
    tok = encode_ds_mla_tokens(kv, dialect, fmax)
    keep = slots >= 0
    blocks, pos = np.divmod(slots[keep], layout.block_size)
    data = np.concatenate([tok.nope.numpy(), _bf16_to_bytes(tok.rope)], axis=1)[keep]
    _scatter(cache, blocks, pos * DS_MLA_TOKEN_BYTES, data)
    _scatter(cache, blocks, layout.scale_region + pos * DS_MLA_SCALE_BYTES, tok.scales.numpy()[keep])
    return tok


def read_ds_mla_tokens(cache: torch.Tensor, slots, *, layout: DsMlaLayout = DsMlaLayout()) -> DsMlaTokens:
    """The raw bytes of the given slots, split into nope codes, scale bytes and rope bf16."""
    _check_cache(cache, layout.block_stride, "fp8_ds_mla")
    n = len(slots)
    s = _check_slots(slots, n, cache.shape[0] * layout.block_size, allow_padding=False)
    blocks, pos = np.divmod(s, layout.block_size)
    data = _gather(cache, blocks, pos * DS_MLA_TOKEN_BYTES, DS_MLA_TOKEN_BYTES)
    sb = _gather(cache, blocks, layout.scale_region + pos * DS_MLA_SCALE_BYTES, DS_MLA_SCALE_BYTES)
    return DsMlaTokens(
        torch.from_numpy(data[:, :NOPE_DIM].copy()), torch.from_numpy(sb), _bytes_to_bf16(data[:, NOPE_DIM:])
    )


def read_ds_mla(
    cache: torch.Tensor, slots, dialect="ocp", *, layout: DsMlaLayout = DsMlaLayout()
) -> torch.Tensor:
    """Dequantised float32 [N, 512] of the given slots."""
    return dequantize_ds_mla_tokens(read_ds_mla_tokens(cache, slots, layout=layout), dialect)


# -- indexer K ---------------------------------------------------------------------------------------
def encode_indexer_k_tokens(
    k: torch.Tensor, dialect="ocp", fmax: float | None = None, *, value_format: str = "fp8"
) -> IndexerKTokens:
    """k [N, 128] -> value and scale bytes of one indexer-K entry.

    fp8: one block of 128, scale 2**ceil(log2(max(amax, 1e-4) / fmax)) stored as fp32 little-endian.
    mxfp4: blocks of 32, UE8M0 scales (``blockscale.quantize_mxfp4``); dialect and fmax do not apply.
    """
    _check_values(k, INDEX_DIM, "k")
    if value_format == "fp8":
        fmt = _dialect(dialect)
        spec = BlockFP8(fmt, float(fmt.max if fmax is None else fmax), (1, INDEX_DIM), "ue8m0", AMAX_FLOOR)
        codes, sb = quantize_fp8(k, spec)
        scale = e8m0_decode(sb.numpy()[:, 0]).astype("<f4")  # a power of two: exact in fp32
        return IndexerKTokens(
            codes, torch.from_numpy(scale.view(np.uint8).reshape(-1, INDEX_SCALE_BYTES).copy())
        )
    if value_format == "mxfp4":
        packed, sb = quantize_mxfp4(k)
        return IndexerKTokens(packed, sb)
    raise ValueError(f"value_format must be 'fp8' or 'mxfp4', not {value_format!r}")


def dequantize_indexer_k_tokens(
    tokens: IndexerKTokens, dialect="ocp", *, value_format: str = "fp8"
) -> torch.Tensor:
    if value_format == "mxfp4":
        return dequantize_mxfp4(tokens.values, tokens.scales)
    fmt = _dialect(dialect)
    scale = np.ascontiguousarray(tokens.scales.numpy()).view("<f4").astype(np.float64)  # [N, 1]
    return torch.from_numpy((fmt.decode(tokens.values.numpy()) * scale).astype(np.float32))


def write_indexer_k(
    cache: torch.Tensor,
    slot_mapping,
    k: torch.Tensor,
    dialect="ocp",
    fmax: float | None = None,
    *,
    layout: IndexerKLayout = IndexerKLayout(),
) -> IndexerKTokens:
    """Quantise ``k`` [N, 128] and write key i to ``slot_mapping[i]`` (-1: skipped). Returns the encoding."""
    what = f"indexer K ({layout.value_format})"
    _check_cache(cache, layout.block_stride, what)
    _check_values(k, INDEX_DIM, "k")
    slots = _check_slots(slot_mapping, k.shape[0], cache.shape[0] * layout.block_size, allow_padding=True)
    tok = encode_indexer_k_tokens(k, dialect, fmax, value_format=layout.value_format)
    keep = slots >= 0
    blocks, pos = np.divmod(slots[keep], layout.block_size)
    _scatter(cache, blocks, pos * layout.value_bytes, tok.values.numpy()[keep])
    _scatter(cache, blocks, layout.scale_region + pos * INDEX_SCALE_BYTES, tok.scales.numpy()[keep])
    return tok


def read_indexer_k_tokens(
    cache: torch.Tensor, slots, *, layout: IndexerKLayout = IndexerKLayout()
) -> IndexerKTokens:
    _check_cache(cache, layout.block_stride, f"indexer K ({layout.value_format})")
    s = _check_slots(slots, len(slots), cache.shape[0] * layout.block_size, allow_padding=False)
    blocks, pos = np.divmod(s, layout.block_size)
    vals = _gather(cache, blocks, pos * layout.value_bytes, layout.value_bytes)
    sb = _gather(cache, blocks, layout.scale_region + pos * INDEX_SCALE_BYTES, INDEX_SCALE_BYTES)
    return IndexerKTokens(torch.from_numpy(vals), torch.from_numpy(sb))


def read_indexer_k(
    cache: torch.Tensor, slots, dialect="ocp", *, layout: IndexerKLayout = IndexerKLayout()
) -> torch.Tensor:
    """Dequantised float32 [N, 128] of the given slots."""
    return dequantize_indexer_k_tokens(
        read_indexer_k_tokens(cache, slots, layout=layout), dialect, value_format=layout.value_format
    )



# -- indexer K, MXFP4, gfx950 preshuffled page --------------------------------------------------------------
@dataclass(frozen=True)
class Mxfp4ShuffledLayout:
    """The gfx950 MXFP4 indexer-K page as aiter's paged MQA-logits kernel reads it and its K-cache op writes it
    (vLLM 0.32: ``v1/attention/ops/rocm_paged_mxfp4_indexer.py:67-79``, ``RocmPagedMxfp4CacheLayout``: "a page is
    cut into runs of n_per_tile tokens. Inside a run, each token's packed values are split into d_per_tile-byte
    chunks along the head dimension, and the run stores chunk 0 of every token, then chunk 1 ...: [chunk, token,
    byte]. Its e8m0 scales are stored as [scale % scale_lanes, token, scale // scale_lanes]"; the page holds
    ``head_dim / 2 + head_dim / 32`` = 68 bytes an entry, ``_kv_view`` at :171-180). vLLM takes the three tile
    parameters from ``aiter.ops.triton.attention.pa_mqa_logits_mxfp4.cache_format`` at run time (:90-121; aiter is
    not installed here), and refuses the ones its writer cannot express; this layout takes them as arguments and
    refuses the same ones. Reading of the docstring (stated, not checked against aiter): the value region of the
    page comes first (entries x 64 bytes, run after run), then the scale region (entries x 4 bytes, run after run),
    as in the block-flat layout, which is the special case (1, 64, 1).

    Byte of entry s (run r = s // n, t = s % n), value byte j (chunk c = j // d, b = j % d):
        r * n * 64 + c * n * d + t * d + b
    scale k (lane = k % L, q = k // L): block_size * 64 + r * n * 4 + (lane * n + t) * (4 / L) + q
    """

    block_size: int = 64
    n_per_tile: int = 16
    d_per_tile: int = 16
    scale_lanes: int = 4
    alignment: int = DEFAULT_ALIGNMENT

    def __post_init__(self):
        for n in ("block_size", "n_per_tile", "d_per_tile", "scale_lanes", "alignment"):
            _positive_int(n, getattr(self, n))
        vb = INDEX_DIM // 2
        if self.block_size % self.n_per_tile or vb % self.d_per_tile or INDEX_SCALE_BYTES % self.scale_lanes:
            raise ValueError(f"Mxfp4ShuffledLayout: n_per_tile {self.n_per_tile} must divide block_size "
                             f"{self.block_size}, d_per_tile {self.d_per_tile} the {vb} value bytes and scale_lanes "
                             f"{self.scale_lanes} the {INDEX_SCALE_BYTES} scales of an entry")

    value_bytes = INDEX_DIM // 2

    @property
    def _flat(self) -> IndexerKLayout:
        """The block-flat MXFP4 page of the same size: the shuffle permutes bytes inside its two regions only."""
        return IndexerKLayout(self.block_size, self.alignment, "mxfp4")

    @property
    def block_stride(self) -> int:
        return self._flat.block_stride

    @property
    def scale_region(self) -> int:
        return self._flat.scale_region

    def value_cols(self, s: int) -> np.ndarray:
        """The 64 byte offsets of entry s's packed values (value byte j at [j])."""
        n, d = self.n_per_tile, self.d_per_tile
        r, t = divmod(int(s), n)
        j = np.arange(self.value_bytes)
        c, b = np.divmod(j, d)
        return r * n * self.value_bytes + c * n * d + t * d + b

    def scale_cols(self, s: int) -> np.ndarray:
        """The 4 byte offsets of entry s's UE8M0 scales (scale k, for values 32k .. 32k + 31, at [k])."""
        n, L = self.n_per_tile, self.scale_lanes
        r, t = divmod(int(s), n)
        k = np.arange(INDEX_SCALE_BYTES)
        lane, q = k % L, k // L
        return self.scale_region + r * n * INDEX_SCALE_BYTES + (lane * n + t) * (INDEX_SCALE_BYTES // L) + q


def write_indexer_k_mxfp4_shuffled(cache: torch.Tensor, slot_mapping, k: torch.Tensor, *,
                                   layout: Mxfp4ShuffledLayout = Mxfp4ShuffledLayout()) -> IndexerKTokens:
    """MXFP4-quantise ``k`` [N, 128] (``blockscale.quantize_mxfp4``) and write key i to ``slot_mapping[i]`` in the
    gfx950 page order (-1: skipped). Returns the encoding."""
    _check_cache(cache, layout.block_stride, "indexer K (mxfp4, gfx950 shuffled)")
    _check_values(k, INDEX_DIM, "k")
    slots = _check_slots(slot_mapping, k.shape[0], cache.shape[0] * layout.block_size, allow_padding=True)
    tok = encode_indexer_k_tokens(k, value_format="mxfp4")
    v, sc = tok.values.numpy(), tok.scales.numpy()
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        b, s = divmod(slot, layout.block_size)
        cache[b, torch.from_numpy(layout.value_cols(s))] = torch.from_numpy(np.ascontiguousarray(v[i]))
        cache[b, torch.from_numpy(layout.scale_cols(s))] = torch.from_numpy(np.ascontiguousarray(sc[i]))
    return tok


def read_indexer_k_mxfp4_shuffled_tokens(cache: torch.Tensor, slots, *,
                                         layout: Mxfp4ShuffledLayout = Mxfp4ShuffledLayout()) -> IndexerKTokens:
    _check_cache(cache, layout.block_stride, "indexer K (mxfp4, gfx950 shuffled)")
    s = _check_slots(slots, len(slots), cache.shape[0] * layout.block_size, allow_padding=False)
    vals = np.empty((len(s), layout.value_bytes), dtype=np.uint8)
    sb = np.empty((len(s), INDEX_SCALE_BYTES), dtype=np.uint8)
    c = cache.cpu().numpy()
    for i, slot in enumerate(s.tolist()):
        b, p = divmod(slot, layout.block_size)
        vals[i] = c[b, layout.value_cols(p)]
        sb[i] = c[b, layout.scale_cols(p)]
    return IndexerKTokens(torch.from_numpy(vals), torch.from_numpy(sb))


def read_indexer_k_mxfp4_shuffled(cache: torch.Tensor, slots, *,
                                  layout: Mxfp4ShuffledLayout = Mxfp4ShuffledLayout()) -> torch.Tensor:
    """Dequantised float32 [N, 128] of the given slots."""
    return dequantize_indexer_k_tokens(read_indexer_k_mxfp4_shuffled_tokens(cache, slots, layout=layout),
                                       value_format="mxfp4")
