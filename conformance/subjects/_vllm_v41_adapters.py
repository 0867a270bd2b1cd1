"""Adapters that drive vLLM 0.32.0's DeepSeek-V4.1 indexer code (``vllm.models.deepseek_v41``, the two-level
candidate kernels) with the goldens' inputs, on the CPU under Triton's interpreter. Used by ``vllm-triton:<profile>``
(``vllm_triton.KERNELS``) and ``vllm:sim-<arch>`` (``vllm_sim.ADAPTERS``).

``p`` is the profile dict (``fnuz``, ``fp8``): the dialect the platform's *reader* decodes the indexer-K bytes in.
vLLM's V4.1 writer has no dialect parameter (``tl.float8e4nv``, ``FP8_MAX=448.0``), so what the profile changes
here is only how the bytes are read back, as the platform's logits read them (``FP8_DTYPE``: fnuz on gfx942).
"""

from __future__ import annotations

import torch

from .base import Unsupported

BF = torch.bfloat16
CANDIDATES = "vllm.model_executor.kernels.attention.dsa.candidate_blocks"
K_BLOCK = 64        # indexer-K cache block size (tokens per block), as the tiny checkpoint's block_size
K_STORE = "vllm.models.deepseek_v41.common.ops.indexer_k_store"


def make_k_latent(p: dict):
    dialect = "float8_e4m3fnuz" if p.get("fnuz") else "float8_e4m3fn"

    def k_latent(latent, wk, k_norm, positions, inv_freq, *, ratio, eps=1e-6):
        """DeepseekV4Indexer._produce_k (models/deepseek_v41/attention.py:1405-1437): ``wk`` as a bf16
        ReplicatedLinear (unquantised: F.linear in bf16), then ``indexer_k_norm_rope_store`` called as is (k_norm,
        GPT-J RoPE from vLLM's cos_sin_cache at (t // m) m, FP8 quant, paged store; the SHUFFLE layout when the
        platform answers ROCm, as the wrapper decides); the bytes read back block-flat or SHUFFLE and decoded in
        the platform reader's dialect (code x fp32 scale). On vllm-triton-gpu (``p["src"]``: no vllm package) the
        same launcher comes from vLLM's source file and the table is the harness's fp32 cos | sin
        (``harness_cos_sin``); the wk GEMM, the pool and the launch run on ``p["dev"]``."""
        from references.formats import cache_layouts as cl

        from ..cases.indexer_cache import KCacheLayout

        if p.get("src") is not None:
            # vllm-triton-gpu (no vllm package): vLLM's launcher from its source file (_vllm_source; its
            # current_platform questions answered by SourcePlatform from the torch build), and the harness's fp32
            # cos | sin table (_vllm_triton_rocm.harness_cos_sin, bounded against vLLM's table in
            # tests/vllm/test_vllm_triton_rocm.py): vLLM's get_rope needs the package
            from ._vllm_source import SourcePlatform
            from ._vllm_triton_rocm import harness_cos_sin

            store = p["src"].get(K_STORE, "indexer_k_norm_rope_store")
            rocm = SourcePlatform().is_rocm()

            def table(f, n):
                return harness_cos_sin(f, 64, n)
        else:
            from vllm.models.deepseek_v41.common.ops.indexer_k_store import indexer_k_norm_rope_store as store
            from vllm.platforms import current_platform

            from ._vllm_adapters import cos_sin

            rocm = current_platform.is_rocm()

            def table(f, n):
                return cos_sin(f, 64, 512, positions)
        dev = p.get("dev", "cpu")
        N, hd = latent.shape[0], wk.shape[0]
        if hd != 128:
            raise Unsupported(f"indexer_k_norm_rope_store asserts a 128-dim key, got {hd}")
        if ratio not in (1, 2):
            raise Unsupported(f"indexer_k_norm_rope_store asserts compress_ratio in (1, 2), got {ratio}")
        k_pre = torch.nn.functional.linear(latent.to(BF).to(dev), wk.to(BF).to(dev)).contiguous()
        nb = -(-N // K_BLOCK)
        lay = KCacheLayout(K_BLOCK, "shuffle" if rocm else "normal")
        # the paged pool as vLLM binds it: [blocks, block_size, 132] over rows padded to the page alignment (576)
        pool = torch.zeros(nb, lay.block_stride, dtype=torch.uint8, device=dev)
        cache = pool.as_strided((nb, K_BLOCK, 132), (lay.block_stride, 132, 1))
        slots = torch.arange(N, dtype=torch.int64, device=dev)
        n = int(positions.max()) + 1 if positions.numel() else 1
        cs = table(inv_freq, n).float().contiguous().to(dev)
        store(k_pre, positions.long().contiguous().to(dev), cs, k_norm.to(BF).contiguous().to(dev), eps,
              cache, slots, ratio, False)
        tok = lay.read_tokens(pool.cpu(), range(N))
        return {"k": cl.dequantize_indexer_k_tokens(tok, dialect)}
    return k_latent


def row_topk_standin(logits: torch.Tensor, ends: torch.Tensor, topk: int) -> torch.Tensor:
    """Harness stand-in for the compiled row top-k (``torch.ops._C.top_k_per_row_prefill``: upstream csrc/sampler.cu
    ``topKPerRowJob``), by its contract: a row of length <= topK returns every column 0..len-1 in order, -1
    padded; a longer row the topK largest of its columns (equal values in any order)."""
    out = torch.full((logits.shape[0], topk), -1, dtype=torch.long)
    for r, e in enumerate(ends.tolist()):
        if e <= topk:
            out[r, :e] = torch.arange(e)
        else:
            out[r] = torch.topk(logits[r, :e], topk).indices
    return out


def make_topk_two_level(p: dict):
    def topk_two_level(src_scores, scores, positions, *, ratio, topk, topk_blocks, block_size, variant="dense"):
        """The dense two-level selection of ``sparse_attn_indexer`` / ``rocm_aiter_sparse_attn_indexer``'s prefill
        chunk (one request, row bounds [0, floor((t + 1) / m))): on the candidate source's logits
        ``select_candidate_blocks``' kernels (_block_scores_kernel, torch.topk, _store_candidates_kernel), on the
        consumer's ``apply_candidate_mask``'s (_candidate_flags_kernel, _mask_candidates_kernel), launched with the
        wrappers' arguments (the wrappers assert CUDA tensors); then the row top-k by ``row_topk_standin``."""
        import triton

        if p.get("src") is not None:     # vllm-triton-gpu: the kernels from vLLM's source files
            from .vllm_triton import _SourceModule

            cb = _SourceModule(p["src"], CANDIDATES)
        else:
            from vllm.model_executor.kernels.attention.dsa import candidate_blocks as cb
        dev = p.get("dev", "cpu")
        if variant != "dense":
            raise Unsupported(f"variant {variant!r} is the opt-in sparse-logits path (SparseMQAIndexer: DeepGEMM "
                              "fp8_fp4_sparse_mqa_logits + DeepSelect, SM100 only); this drives the dense path")
        T, N = scores.shape
        ke = torch.div(positions.long() + 1, ratio, rounding_mode="floor").clamp(0, N).to(dev, torch.int32)
        ks = torch.zeros(T, dtype=torch.int32, device=dev)
        nblocks = triton.cdiv(N, block_size)
        src = src_scores.float().contiguous().to(dev).clone()
        bs = src.new_empty((T, nblocks))
        cb._block_scores_kernel[(T, triton.cdiv(nblocks, 128))](
            src, ks, ke, bs, *src.stride(), ks.stride(0), ke.stride(0), N, nblocks, block_size, True, 1, 128)
        top = bs.topk(min(topk_blocks, nblocks), dim=-1)
        cand = torch.empty(T, topk_blocks, dtype=torch.int32, device=dev)
        cb._store_candidates_kernel[(T, triton.cdiv(topk_blocks, 256))](
            top.values.contiguous(), top.indices.contiguous(), cand, *cand.stride(), top.values.shape[1],
            topk_blocks, 256)
        logits = scores.float().contiguous().to(dev).clone()
        flags = torch.empty((T, nblocks + 1), dtype=torch.uint8, device=dev)
        cb._candidate_flags_kernel[(T,)](cand, ks, flags, *cand.stride(), ks.stride(0), N, nblocks, block_size,
                                        cand.shape[1], True, 1)
        cb._mask_candidates_kernel[(T, triton.cdiv(N, 1024))](
            logits, ks, ke, flags, *logits.stride(), ks.stride(0), ke.stride(0), N, nblocks, block_size, True, 1,
            1024)
        return {"candidates": cand.long().cpu(), "idx": row_topk_standin(logits.cpu(), ke.cpu(), topk)}
    return topk_two_level
