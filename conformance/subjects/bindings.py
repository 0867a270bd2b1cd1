"""Platform binding tables: for each platform kind and registered component, the vLLM function the DSV4 path
calls there, the backend, and the dispatch condition that selects it (vLLM 0.32.x, read from its dispatch code:
``model_executor/layers/mhc.py`` (MHC*Op.forward_hip / forward_cuda), ``layers/sparse_attn_indexer.py``
(SparseAttnIndexer.forward_hip -> ``v1/attention/ops/rocm_aiter_mla_sparse.py``), ``models/deepseek_v4/amd``,
``fused_moe/oracle/mxfp4.py``, ``_aiter_ops.py``).

A component has an ordered list of rows per platform kind; the first row whose ``when`` predicate holds for
the dispatch context is what vLLM runs. The context is a dict: ``arch`` (gfx942 | gfx950 | sm90 ...), ``env``
(the environment as the user set it), ``aiter`` (the aiter package is importable and the arch is CDNA3+:
``vllm._aiter_ops.is_aiter_found_and_supported``), ``tilelang`` (TileLang mHC kernels importable).

``adapter`` names a harness adapter that drives the row's function with the golden's inputs (keys of
``conformance.subjects.vllm_sim.ADAPTERS``); None means no adapter exists yet and ``reason`` says why the row
cannot be driven on the CPU (AITER only, a compiled HIP/CUDA kernel, a package not installed).

The table is data: tests check that every registered component has rows on every platform kind, that every
Python function named here resolves in the installed vLLM, and that the sim subject binds what the table says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

PLATFORMS = ("rocm-gfx942", "rocm-gfx950", "cuda")


def _flag(ctx, name, default="0"):
    return str(ctx.get("env", {}).get(name, default)).strip().lower() in ("1", "true", "yes")


def aiter_enabled(ctx) -> bool:
    """rocm_aiter_ops.is_enabled(): VLLM_ROCM_USE_AITER=1 on an arch aiter supports, with aiter installed."""
    return bool(ctx.get("aiter")) and _flag(ctx, "VLLM_ROCM_USE_AITER")


def _always(ctx) -> bool:
    return True


@dataclass(frozen=True)
class Binding:
    function: str                 # qualified name in vLLM (or "torch.ops._C.x", "aiter.x")
    backend: str                  # triton | torch | aiter | compiled | cuda-only
    condition: str                # the dispatch condition in words
    when: Callable = _always      # predicate over the dispatch context
    adapter: str | None = None    # harness adapter that drives it (None: none applies; see reason)
    reason: str = ""              # why the row cannot be driven off the device
    runs: tuple = ()              # vLLM Python functions (code names) the adapter must execute: the witness test


V = "vllm."
MHC = V + "model_executor.layers.mhc."
RAMS = V + "v1.attention.ops.rocm_aiter_mla_sparse."
CU = V + "models.deepseek_v4.common.ops.cache_utils."
FCQ = V + "models.deepseek_v4.common.ops.fused_compress_quant_cache."
AITER_ONLY = "device only: AITER (the aiter package and an AMD GPU)"
HIP_OP = "device only: compiled ROCm kernel (torch.ops._C, HIP build)"
CUDA_ONLY = "CUDA-only kernel"
MOE_OP = "device only: compiled ROCm kernel (torch.ops._moe_C.topk_hash_softplus_sqrt, HIP build)"
ROUTER = V + "model_executor.layers.fused_moe.router.fused_topk_bias_router."


def _rocm(arch: str) -> dict[str, list[Binding]]:
    """The ROCm rows; gfx942 and gfx950 differ only where vLLM's code tests the arch."""
    g950 = arch == "gfx950"
    mhc_aiter = lambda c: bool(c.get("aiter")) and c.get("hidden", 256) % 256 == 0 and c.get("hc", 4) == 4  # noqa: E731
    return {
        "mhc.pre": [
            Binding(MHC + "MHCPreOp.forward_hip -> torch.ops.vllm.mhc_pre_aiter", "aiter",
                    "HAS_AITER_MHC (aiter installed, CDNA3+; no env flag) and hidden % 256 == 0, hc_mult == 4",
                    mhc_aiter, reason=AITER_ONLY),
            Binding(V + "model_executor.kernels.mhc.torch.mhc_pre_torch (MHCPreOp.forward_native)", "torch",
                    "no aiter mHC and no TileLang: MHCPreOp.forward_hip falls back to forward_native",
                    adapter="hc_pre_torch", runs=("mhc_pre_torch",)),
        ],
        "mhc.pre_lagged": [
            Binding(MHC + "MHCPreDelayedOp.forward_hip -> torch.ops.vllm.mhc_pre_delayed_aiter (models.deepseek_v41."
                    "amd.model: self.mhc_pre_delayed)", "aiter",
                    "HAS_AITER_MHC and _aiter_mhc_supported (model_executor/layers/mhc.py:384-479)", mhc_aiter,
                    reason=AITER_ONLY),
            Binding(V + "model_executor.kernels.mhc.torch.mhc_pre_delayed_torch (MHCPreDelayedOp.forward_native)",
                    "torch", "no aiter mHC and no TileLang: MHCPreDelayedOp.forward_hip falls back to forward_native "
                    "(model_executor/layers/mhc.py:480-514)",
                    adapter="hc_pre_delayed_torch", runs=("mhc_pre_delayed_torch",)),
        ],
        "mhc.post": [
            Binding(MHC + "MHCPostOp.forward_hip -> torch.ops.vllm.mhc_post_aiter", "aiter",
                    "HAS_AITER_MHC and hc_mult == 4", mhc_aiter, reason=AITER_ONLY),
            Binding(V + "model_executor.kernels.mhc.torch.mhc_post_torch (MHCPostOp.forward_native)", "torch",
                    "no aiter mHC and no TileLang: forward_native", adapter="hc_post_torch",
                    runs=("mhc_post_torch",)),
        ],
        "mhc.head": [
            Binding(MHC + "HCHeadOp.forward_hip -> _hc_head_triton (model_executor.kernels.mhc.triton: "
                    "_rmsnorm_nw_kernel, _hc_head_reduce_store_kernel)", "triton",
                    "always on ROCm without TileLang (no aiter hc_head)", adapter="hc_head_triton",
                    runs=("forward_hip", "_hc_head_triton", "_rmsnorm_nw_kernel", "_hc_head_reduce_store_kernel")),
        ],
        "norm.rms": [
            Binding(V + "ir.ops.layernorm.rms_norm (aiter provider)", "aiter",
                    "VLLM_ROCM_USE_AITER=1 and VLLM_ROCM_USE_AITER_RMSNORM (default 1) select the aiter IR provider",
                    lambda c: aiter_enabled(c) and _flag(c, "VLLM_ROCM_USE_AITER_RMSNORM", "1"), reason=AITER_ONLY),
            Binding(V + "ir.ops.layernorm.rms_norm (vllm_c provider: torch.ops._C.rms_norm)", "compiled",
                    "ROCm IR priority puts the compiled vllm_c provider before native", reason=HIP_OP),
        ],
        "norm.head": [
            Binding("torch.ops._C.fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert "
                    "(models.deepseek_v4.attention._fused_qnorm_rope_kv_insert, inherited by "
                    "amd.rocm.DeepseekV4ROCMAiterMLAAttention)", "compiled",
                    "uint8 (fp8_ds_mla) SWA cache: 0.32.0 has no ROCm Triton q-norm/RoPE/insert (the bring-up's "
                    "cache_utils.fused_qnorm_rope_quant_insert_k_cache is absent)", reason=HIP_OP),
        ],
        "rope.apply": [
            Binding(V + "model_executor.layers.rotary_embedding.deepseek_scaling_rope."
                    "DeepseekV4ScalingRotaryEmbedding.forward_native", "torch",
                    "CustomOp on HIP dispatches this RoPE to forward_native", adapter="apply_rope",
                    runs=("forward_native",)),
        ],
        "rope.layer": [
            Binding(V + "models.deepseek_v4.common.rope.build_deepseek_v4_rope -> DeepseekV4ScalingRotaryEmbedding."
                    "forward_native", "torch", "the attention layer builds its rope from the config per layer type; "
                    "CustomOp on HIP dispatches it to forward_native", adapter="rope_layer",
                    runs=("build_deepseek_v4_rope", "forward_native")),
        ],
        "attn.sparse": [
            Binding(RAMS + "rocm_sparse_attn_decode -> _sparse_attn_decode_ragged_kernel (+ "
                    + CU + "quantize_and_insert_k_kernel)", "triton",
                    "DeepseekV4ROCMAiterMLASparseImpl decode: the Triton ragged kernel (gfx950 prefill >= 1024 "
                    "queries may take AITER OPUS)", adapter="sparse_attention",
                    runs=("quantize_and_insert_k_kernel", "_sparse_attn_decode_ragged_kernel")),
        ],
        "attn.output": ([
            Binding("aiter.ops.inverse_rope_group_quant + aiter.ops.batched_gemm_op_a8w8.batched_gemm_a8w8_mxscale "
                    "(amd.rocm.DeepseekV4ROCMAiterMLAAttention._o_proj, FP8 wo_a)", "aiter",
                    "gfx950 only: VLLM_ROCM_USE_AITER_FP8BMM (default 1), aiter >= 0.1.20 and a group-128 "
                    "block-FP8 wo_a (_prepare_fp8_wo_a)",
                    lambda c: bool(c.get("aiter")) and _flag(c, "VLLM_ROCM_USE_AITER_FP8BMM", "1")
                    and c.get("fp8_wo_a", True), reason=AITER_ONLY)] if g950 else []) + [
            Binding(RAMS + "rocm_inverse_rope_rows_ -> _inverse_rope_gptj_kernel, then " + RAMS
                    + "rocm_inv_rope_einsum (inverse_rope=False) + wo_b", "triton",
                    "the BF16 wo_a path (gfx942 always: _prepare_fp8_wo_a is gfx950-only): forward_mqa rotates "
                    "the rows back with the Triton kernel (decode rows in the decode reduce), _o_proj einsums "
                    "with the cached bf16 wo_a", adapter="output_projection_rocm",
                    runs=("rocm_inverse_rope_rows_", "_inverse_rope_gptj_kernel", "rocm_inv_rope_einsum")),
        ],
        "compressor.kv": [
            Binding(V + "models.deepseek_v4.common.ops.save_partial_states._SAVE_PARTIAL_STATES_KERNEL + " + FCQ
                    + "compress_norm_rope_store_triton (ratio 4, indexer head 128) | "
                    "compress_norm_rope_store_two_stage_triton (head 512, ratio 128)", "triton",
                    "DeepseekCompressor.forward on ROCm (_prefer_two_stage_compressor: head 512 without overlap "
                    "takes the two-stage split); the kernels write tl.float8e4nv with FP8_MAX 448 on every arch "
                    "(no fnuz branch). V4.1's rows (ratio 1 / 2, no ape) run models.deepseek_v41.common.ops."
                    "fused_compress_quant_cache.fused_save_compress_norm + rope_quant_insert instead (584-byte "
                    "record, tl.float8e4nv at 448 on every arch)", adapter="compress_rocm",
                    runs=("compress_norm_rope_store_triton",)),
        ],
        "indexer.scores": [
            Binding(RAMS + "rocm_fp8_mqa_logits -> " + ("aiter fp8_mqa_logits (prefill)" if g950 else
                    "aiter.ops.flydsl.flydsl_fp8_mqa_logits (prefill)"), "aiter",
                    "VLLM_ROCM_USE_AITER=1 (rocm_aiter_ops.is_enabled()): the prefill logits go to AITER",
                    aiter_enabled, reason=AITER_ONLY),
            Binding(RAMS + "cp_gather_indexer_k_quant_cache_triton + rocm_fp8_mqa_logits -> "
                    "fp8_mqa_logits_torch (prefill chunk)", "torch",
                    "VLLM_ROCM_USE_AITER unset: rocm_fp8_mqa_logits finds no aiter module and returns the torch "
                    "reference (bf16 einsum); C4A decode rows take rocm_fp8_paged_mqa_logits_triton "
                    "(_fp8_paged_mqa_logits_decode_kernel) whatever AITER says, not driven here",
                    adapter="indexer_scores_prefill",
                    runs=("cp_gather_indexer_k_quant_cache_triton", "rocm_fp8_mqa_logits", "fp8_mqa_logits_torch")),
        ],
        "indexer.topk": [
            Binding(V + "_aiter_ops.rocm_aiter_ops (indexer top-k)", "aiter",
                    "rocm_aiter_ops.is_indexer_top_k_supported(...)", aiter_enabled, reason=AITER_ONLY),
            Binding("torch.ops._C.top_k_per_row_prefill / top_k_per_row_decode", "compiled",
                    "rocm_aiter_sparse_attn_indexer otherwise", reason=HIP_OP),
        ],
        "quant.act_fp8": [
            Binding(V + "_aiter_ops.rocm_aiter_ops.group_fp8_quant (QuantFP8.forward_hip)", "aiter",
                    "rocm_aiter_ops.is_linear_fp8_enabled() (VLLM_ROCM_USE_AITER=1, VLLM_ROCM_USE_AITER_LINEAR)",
                    lambda c: aiter_enabled(c) and _flag(c, "VLLM_ROCM_USE_AITER_LINEAR", "1"), reason=AITER_ONLY),
            Binding("torch.ops._C.per_token_group_fp8_quant (QuantFP8.forward_hip -> forward_cuda -> "
                    "fp8_utils.per_token_group_quant_fp8)", "compiled",
                    "per_token_group_quant_fp8 takes the compiled op when current_platform.is_cuda_alike() and x is "
                    "contiguous (ROCm: always for the linear's input); its Triton fallback _per_token_group_quant_fp8 "
                    "runs only for non-contiguous x (the act_quant->gemm dialect probe drives that one)",
                    reason=HIP_OP),
        ],
        "moe.router": [
            Binding(ROUTER + "fused_topk_bias -> vllm_topk_softplus_sqrt -> vllm._custom_ops.topk_hash_softplus_sqrt",
                    "compiled", "sqrtsoftplus on ROCm: dsv4_topk (Triton) is CUDA-only (can_use_dsv4_topk tests "
                    "is_cuda()), and both the aiter-fused-MoE and the plain branch end in the compiled "
                    "torch.ops._moe_C.topk_hash_softplus_sqrt", reason=MOE_OP),
        ],
        "moe.hash_router": [
            Binding(ROUTER + "fused_topk_bias (hash_indices_table) -> vllm._custom_ops.topk_hash_softplus_sqrt",
                    "compiled", "as moe.router: the hash table is passed to the same compiled op",
                    reason=MOE_OP),
        ],
        "moe.experts": [
            Binding(V + "model_executor.layers.fused_moe.experts.gpt_oss_triton_kernels_moe.UnfusedOAITritonExperts",
                    "triton", "mxfp4 oracle: TRITON_UNFUSED first for DSV4 on ROCm",
                    reason="needs the triton_kernels package (not installed on the CPU image)"),
        ],
        "moe.layer": [
            Binding(V + "model_executor.layers.fused_moe.router.fused_topk_bias_router.fused_topk_bias + "
                    "UnfusedOAITritonExperts", "triton", "AMD DeepseekV4MoE routed part",
                    reason="needs the triton_kernels package (not installed on the CPU image)"),
        ],
        "moe.routing_metadata": [
            Binding(V + "model_executor.layers.fused_moe.experts.gpt_oss_triton_kernels_moe."
                    "_patch_make_bitmatrix_metadata -> _make_bitmatrix_metadata_pow2_safe (_stage2_pow2)", "triton",
                    "_patch_make_bitmatrix_metadata (active on ROCm and CUDA) for the Triton MXFP4 MoE",
                    adapter="routing_metadata", runs=("_make_bitmatrix_metadata_pow2_safe", "_stage2_pow2")),
        ],
    } | ({"attn.sparse": [
        Binding(RAMS + "rocm_sparse_attn_prefill -> aiter OPUS sparse prefill", "aiter",
                "gfx950, >= 1024 queries (_can_use_aiter_sparse_prefill_opus)",
                lambda c: bool(c.get("aiter")) and c.get("queries", 0) >= 1024, reason=AITER_ONLY),
        Binding(RAMS + "rocm_sparse_attn_decode -> _sparse_attn_decode_ragged_kernel (+ "
                + CU + "quantize_and_insert_k_kernel)", "triton", "ROCm Triton sparse MLA decode",
                adapter="sparse_attention",
                runs=("quantize_and_insert_k_kernel", "_sparse_attn_decode_ragged_kernel"))]} if g950 else {})


def _cuda() -> dict[str, list[Binding]]:
    fm = V + "model_executor.layers.fused_moe."
    cu = lambda f, why: [Binding(f, "cuda-only", why, reason=CUDA_ONLY)]  # noqa: E731
    return {
        "mhc.pre": cu("torch.ops.vllm.mhc_pre_tilelang (MHCPreOp.forward_cuda)", "TileLang mHC on CUDA"),
        "mhc.pre_lagged": cu("torch.ops.vllm.mhc_pre_delayed_tilelang (MHCPreDelayedOp.forward_cuda; "
                             "models.deepseek_v41.nvidia.model: mhc_pre_delayed_tilelang / mhc_shifted_post_pre)",
                             "TileLang mHC on CUDA"),
        "mhc.post": cu("torch.ops.vllm.mhc_post_tilelang (MHCPostOp.forward_cuda)", "TileLang mHC on CUDA"),
        "mhc.head": cu("torch.ops.vllm.hc_head_fused_kernel_tilelang (HCHeadOp.forward_cuda)", "TileLang"),
        "norm.rms": cu(V + "ir.ops.layernorm.rms_norm (vllm_c provider)", "compiled CUDA rms_norm"),
        "norm.head": cu("torch.ops._C.fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert", "fused CUDA kernel"),
        "rope.apply": cu("vllm._custom_ops.rotary_embedding (DeepseekV4ScalingRotaryEmbedding.forward_cuda)",
                         "CUDA rotary op"),
        "rope.layer": cu(V + "models.deepseek_v4.common.rope.build_deepseek_v4_rope -> vllm._custom_ops."
                         "rotary_embedding (forward_cuda)", "CUDA rotary op"),
        "attn.sparse": cu(V + "v1.attention.ops.flashmla.flash_mla_with_kvcache_fp8", "FlashMLA sparse"),
        "attn.output": cu(V + "models.deepseek_v4.common.ops.fused_inv_rope_fp8_quant + DeepGEMM fp8_einsum",
                          "DeepGEMM"),
        "compressor.kv": [Binding(FCQ + "compress_norm_rope_store_triton", "triton", "Triton compressor on CUDA",
                                  reason="sim of CUDA not provided (run `nox -s cuda` on NVIDIA)")],
        "indexer.scores": cu("DeepGEMM fp8_fp4_paged_mqa_logits", "DeepGEMM"),
        "indexer.topk": cu("torch.ops._C.persistent_topk / top_k_per_row_*", "CUDA top-k"),
        "quant.act_fp8": cu("torch.ops._C.per_token_group_fp8_quant", "compiled CUDA quant"),
        "moe.router": cu("vllm._custom_ops.topk_hash_softplus_sqrt (fused_topk_bias)", "CUDA router op"),
        "moe.hash_router": cu("vllm._custom_ops.topk_hash_softplus_sqrt (hash table)", "CUDA router op"),
        "moe.experts": [Binding(fm + "experts.gpt_oss_triton_kernels_moe.OAITritonExperts", "triton",
                                "mxfp4 oracle on CUDA (FlashInfer / Marlin / Triton by capability)",
                                reason="needs triton_kernels and a CUDA device")],
        "moe.layer": [Binding(V + "models.deepseek_v4.nvidia.model.DeepseekV4MoE (experts from "
                                "model_executor.layers.fused_moe.FusedMoEFactory)", "cuda-only",
                              "the NVIDIA DeepseekV4MoE block", reason=CUDA_ONLY)],
        "moe.routing_metadata": [Binding(fm + "experts.gpt_oss_triton_kernels_moe._patch_make_bitmatrix_metadata -> "
                                         "_make_bitmatrix_metadata_pow2_safe",
                                         "triton", "_patch_make_bitmatrix_metadata (both platforms)",
                                         adapter="routing_metadata",
                                         runs=("_make_bitmatrix_metadata_pow2_safe",))],
    }


NO_ADAPTER = "no adapter yet (component added with its golden and cases; the vLLM row is not driven)"
MTP_IN = V + "models.deepseek_v4.common.ops.fused_mtp_input_rmsnorm._FUSED_MTP_INPUT_RMSNORM_KERNEL"


def _no_adapter_yet(platform: str) -> dict[str, list[Binding]]:
    """Rows for components registered before any vLLM adapter exists for them: the function the spec's module
    map names (spec 5, 3.14) and NO_ADAPTER; their dispatch conditions have not been read from vLLM's code."""
    L = V + "model_executor.layers."
    unread = "dispatch condition not yet read from vLLM 0.32's code"
    if platform == "cuda":
        cu = lambda f: [Binding(f, "cuda-only", unread, reason=CUDA_ONLY)]  # noqa: E731
        return {
            "moe.shared_expert": cu(V + "models.deepseek_v4.nvidia.model.DeepseekV4MLP (torch.ops._C."
                                    "silu_and_mul_with_clamp, DeepGEMM FP8 linears)"),
            "head.lm": cu(L + "mhc.HCHeadOp (hc_head_fused_kernel_tilelang) + RMSNorm + ParallelLMHead"),
            "linear.fp8_block": cu(L + "quantization.utils.fp8_utils.per_token_group_quant_fp8 + DeepGEMM / "
                                   "CUTLASS block FP8 GEMM"),
            "attn.index_set": cu(V + "models.deepseek_v4.common.ops.cache_utils.combine_topk_swa_indices "
                                 "(+ compute_global_topk_indices_and_lens, sparse_mla.build_c128a_topk_metadata)"),
            "embed": [Binding(L + "vocab_parallel_embedding.VocabParallelEmbedding", "torch", unread,
                              reason=NO_ADAPTER)],
            "indexer.k_cache": [Binding(FCQ + "compress_norm_rope_store_triton (writer: the compressor's indexer "
                                        "store) + vllm._custom_ops.cp_gather_indexer_k_quant_cache (reader)", "triton",
                                        "DSV4's indexer op skips the K insert (skip_k_cache_insert=True): the "
                                        "compressor stores the indexer K; prefill gathers it with the CUDA op, decode "
                                        "reads the paged cache in DeepGEMM",
                                        reason="sim of CUDA not provided (run `nox -s cuda` on NVIDIA); the reader is "
                                               "a CUDA op")],
            "moe.experts_nvfp4": cu(V + "model_executor.layers.fused_moe.oracle.nvfp4.select_nvfp4_moe_backend "
                                    "(FlashInfer TRT-LLM / CuteDSL / CUTLASS, vLLM CUTLASS, Marlin W4A16, then "
                                    "EMULATION)"),
            "mtp.head": cu(MTP_IN + " (nvidia.mtp.DeepSeekV4MultiTokenPredictorLayer.forward) + e_proj / h_proj "
                           "ReplicatedLinear (Fp8LinearMethod, DeepGEMM) + HCHeadOp (TileLang) + "
                           "_MTP_SHARED_HEAD_RMSNORM_KERNEL + SharedHead.head"),
        }
    fp8_aiter = lambda c: aiter_enabled(c) and _flag(c, "VLLM_ROCM_USE_AITER_LINEAR", "1")  # noqa: E731
    QU = L + "quantization.utils.fp8_utils."
    KL = V + "model_executor.kernels.linear.scaled_mm."
    return {
        "moe.shared_expert": [Binding(L + "activation.SiluAndMulWithClamp.forward_hip -> forward_cuda -> "
                                      "torch.ops._C.silu_and_mul_with_clamp (models.deepseek_v4.amd.model."
                                      "DeepseekV4MLP, between the FP8 gate_up_proj and down_proj)", "compiled",
                                      "SiluAndMulWithClamp.forward_hip takes the compiled op for alpha 1, "
                                      "beta 0 (DSV4's swiglu_limit clamp; spec 3.14's 'native on ROCm' is not what "
                                      "0.32 runs); the linears as linear.fp8_block",
                                      reason=HIP_OP + " (silu_and_mul_with_clamp)")],
        "head.lm": [Binding(V + "models.deepseek_v4.amd.model.DeepseekV4Model.forward (HCHeadOp.forward_hip "
                            "(hc_head_triton) -> self.norm (RMSNorm) -> DeepseekV4ForCausalLM.compute_logits "
                            "(ParallelLMHead, UnquantizedLinearMethod -> rocm_unquantized_gemm))", "compiled",
                            "the final RMSNorm dispatches as norm.rms (aiter IR provider or the compiled "
                            "torch.ops._C.rms_norm); the LM-head GEMM takes ROCm's unquantized GEMM dispatch (skinny "
                            "wvSplitK kernels for small batches)",
                            reason=HIP_OP + " (the final rms_norm; the hc_head part is mhc.head's Triton row)")],
        "linear.fp8_block": [
            Binding(KL + "aiter.AiterFp8BlockScaledMMKernel (rocm_aiter_ops.gemm_a8w8_blockscale, "
                    "rocm_aiter_ops.group_fp8_quant)", "aiter",
                    "_POSSIBLE_FP8_BLOCK_KERNELS[ROCM] tries AITER first: is_supported needs "
                    "rocm_aiter_ops.is_linear_enabled() (VLLM_ROCM_USE_AITER=1, VLLM_ROCM_USE_AITER_LINEAR)",
                    fp8_aiter, reason=AITER_ONLY),
            Binding(KL + "triton.TritonFp8BlockScaledMMKernel (" + QU + "process_fp8_weight_block_strategy (load) + "
                    "QuantFP8 -> per_token_group_quant_fp8 + " + QU + "w8a8_triton_block_scaled_mm -> "
                    "_w8a8_triton_block_scaled_mm)", "triton",
                    "the aiter linear off: the next ROCm block kernel; its weights are normalised to fnuz at load "
                    "on gfx942 (0x80 -> 0, e8m0 exponent + 1); the activation quant is the compiled "
                    "torch.ops._C.per_token_group_fp8_quant on the device (x contiguous). V4.1's 32x32-scaled "
                    "rows (wb32) take ModelOptLinearMethod MXFP8 instead (models/deepseek_v41/quant_config.py:"
                    "221-243): KMxfp8Static's scale loader, then kernels.linear.mxfp8.emulation."
                    "EmulationMxfp8LinearKernel (a bf16 GEMM; RocmDotScaledMxfp8LinearKernel needs gfx95x)",
                    adapter="fp8_block_linear_rocm",
                    runs=("process_fp8_weight_block_strategy", "w8a8_triton_block_scaled_mm",
                          "_w8a8_triton_block_scaled_mm")),
        ],
        "attn.index_set": [
            Binding(V + "models.deepseek_v4.amd.rocm.DeepseekV4ROCMAiterMLAAttention._forward_prefill_aiter "
                    "(prefill_swa_ragged_indices + compute_global_topk_ragged_indices_and_indptr)", "aiter",
                    "_aiter_sparse_mla_enabled: rocm_aiter_ops.is_triton_sparse_mla_enabled() "
                    "(VLLM_ROCM_USE_AITER=1, VLLM_ROCM_USE_AITER_TRITON_SPARSE_MLA, gfx950 only)",
                    lambda c: c.get("arch") == "gfx950" and aiter_enabled(c)
                    and _flag(c, "VLLM_ROCM_USE_AITER_TRITON_SPARSE_MLA", "0"), reason=AITER_ONLY),
            Binding(V + "models.deepseek_v4.amd.rocm.combine_topk_swa_indices -> _combine_topk_swa_indices_kernel "
                    "(+ " + V + "models.deepseek_v4."
                    "sparse_mla.build_c128a_topk_metadata for HCA)", "triton",
                    "DeepseekV4ROCMAiterMLAAttention._forward_prefill without AITER sparse MLA (gfx942 always): per "
                    "prefill chunk the indexer top-k "
                    "(C4A) or the C128A prefill-local list (HCA) merged with the SWA window into the gathered "
                    "buffer; decode tokens read the SWA / top-k lists separately in the ragged decode kernel "
                    "(not driven here: the case's decode rows run as one-token prefill chunks)",
                    adapter="index_set_rocm",
                    runs=("combine_topk_swa_indices", "_combine_topk_swa_indices_kernel")),
        ],
        "embed": [Binding(L + "vocab_parallel_embedding.VocabParallelEmbedding.forward -> "
                          "UnquantizedEmbeddingMethod.embedding", "torch",
                          "tensor-parallel size 1: F.embedding on the bf16 table (the same on every platform)",
                          adapter="embedding_rocm", runs=("forward", "embedding"))],
        "indexer.k_cache": [Binding(FCQ + "compress_norm_rope_store_triton (writer: "
                                    "_fused_kv_compress_norm_rope_insert_indexer_attn, float8e4nv, FP8_MAX 448) + "
                                    + RAMS + "cp_gather_indexer_k_quant_cache_triton (reader, cache_layout NORMAL)",
                                    "triton", "DSV4's indexer op runs with skip_k_cache_insert=True: the compressor "
                                    "stores the C4A indexer K (OCP bytes on every arch), the prefill chunk of "
                                    "rocm_aiter_sparse_attn_indexer gathers them block-flat (NORMAL for compress "
                                    "ratio 4) as FP8_DTYPE (fnuz on gfx942); vLLM's dedicated writer "
                                    "indexer_k_quant_and_cache_triton (IS_FNUZ: 224; SHUFFLE at block_size > 1) is "
                                    "not on this path",
                                    reason="no adapter: the writer is fused into the compressor (pooling, RMSNorm, "
                                           "RoPE, quant, insert) and takes no key to write, so the case's keys cannot "
                                           "be written through it exactly (the dialect map drives it through a "
                                           "constant window: edge indexer_k->logits); vllm-triton:<profile> binds the "
                                           "dedicated writer/gather pair on the SHUFFLE rows")],
        "mtp.head": [Binding(MTP_IN + " (amd.mtp.DeepSeekV4MultiTokenPredictorLayer.forward: position-0 zeroing, "
                             "enorm, hnorm) + e_proj / h_proj ReplicatedLinear (Fp8LinearMethod block [128, 128]) + "
                             "HCHeadOp.forward_hip + _MTP_SHARED_HEAD_RMSNORM_KERNEL + SharedHead.head "
                             "(DeepSeekV4MultiTokenPredictor.compute_logits)", "triton",
                             "the AMD DeepSeekV4MTP draft model (speculative decoding): amd.mtp forward runs the "
                             "Triton input RMSNorm, h_proj(h) + e_proj(e) as linear.fp8_block's rows, hc_head in "
                             "DeepSeekV4MultiTokenPredictor.forward, the Triton shared-head RMSNorm, then the "
                             "LM-head GEMM (rocm_unquantized_gemm)",
                             reason="no adapter: it would compose rows already driven one by one (linear.fp8_block, "
                             "mhc.head) with the Triton input / shared-head RMSNorm kernels, and the draft layer "
                             "module needs a speculative VllmConfig; the LM-head GEMM is rocm_unquantized_gemm "
                             "(compiled wvSplitK skinny kernels at small batch); vllm-triton:<profile> drives the "
                             "same Triton kernels (fused input RMSNorm, block-FP8 GEMM, _hc_head_triton, shared-head "
                             "RMSNorm) with a bf16 torch LM-head GEMM")],
        "moe.experts_nvfp4": [Binding(V + "model_executor.layers.fused_moe.experts.nvfp4_emulation_moe."
                                      "Nvfp4QuantizationEmulationTritonExperts.apply (fused_moe_nvfp4_emulation_"
                                      "kernel + nvfp4_emulation_utils._nvfp4_quant_dequant_kernel via "
                                      "_triton_nvfp4_quant_dequant; moe_align_block_size; swiglu_limit_func -> "
                                      "_swiglu_limit_torch), after oracle.nvfp4.select_nvfp4_moe_backend -> EMULATION, "
                                      "convert_to_nvfp4_moe_kernel_format, make_nvfp4_moe_quant_config", "triton",
                                      "select_nvfp4_moe_backend: every backend before EMULATION needs CUDA (Marlin "
                                      "/ Humming is_cuda, FlashInfer / CUTLASS NVIDIA kernels), so ROCm serves "
                                      "ModelOpt / Quark NVFP4 experts as W4A4 emulation in bf16 Triton "
                                      "(oracle/nvfp4.py:191-223, 480-505); scale bytes bitcast as float8e4nv "
                                      "(OCP) on every arch. Read again for the adapter: with the simulated ROCm "
                                      "platform select_nvfp4_moe_backend answers EMULATION on gfx942 and gfx950 "
                                      "(TritonExperts._supports_current_device: is_cuda_alike, experts/triton_moe.py:"
                                      "118-119); the scale bytes keep the checkpoint's float8_e4m3fn, read as "
                                      "float8e4nv (nvfp4_emulation_moe.py:223), so gfx942's fnuz FP8 dtype never "
                                      "meets them",
                                      adapter="experts_nvfp4_emulation",
                                      runs=("select_nvfp4_moe_backend", "convert_to_nvfp4_moe_kernel_format",
                                            "make_nvfp4_moe_quant_config", "moe_align_block_size",
                                            "_triton_nvfp4_quant_dequant", "_nvfp4_quant_dequant_kernel",
                                            "fused_moe_nvfp4_emulation_kernel", "_swiglu_limit_torch"))],
    }


QKV_OP = "torch.ops._C.fused_deepseek_v4_qnorm_rope_kv_rope_quant_insert"
AMD_ATTN = V + "models.deepseek_v4.amd.rocm.DeepseekV4ROCMAiterMLAAttention."


def _qkv(platform: str) -> dict[str, list[Binding]]:
    """attn.q_path and attn.kv_insert (spec 3.5, 3.6): read from vLLM 0.32.0's models/deepseek_v4/attention.py
    (_split_qkv_and_norm, _fused_qnorm_rope_kv_insert) and amd/rocm.py. On every GPU platform the q head norm + RoPE
    and the kv RoPE + quant + insert run in one compiled op (the uint8 fp8_ds_mla SWA cache); 0.32.0 has no ROCm
    Triton replacement (the bring-up's cache_utils.fused_qnorm_rope_quant_insert_k_cache is absent)."""
    tail = f" -> wq_b FP8 linear -> {QKV_OP} (models.deepseek_v4.attention._fused_qnorm_rope_kv_insert)"
    kv = (V + "models.deepseek_v4.attention.DeepseekV4Attention (fused_wqa_wkv FP8 linear, _split_qkv_and_norm: "
          f"kv_norm) -> {QKV_OP} (kv side: GPT-J RoPE, UE8M0 FP8 nope, bf16 rope, paged insert by slot_mapping)")
    if platform == "cuda":
        return {"attn.q_path": [Binding(V + "models.deepseek_v4.attention.DeepseekV4Attention (fused_wqa_wkv FP8 "
                                        "linear, common.ops.fused_q_kv_rmsnorm)" + tail, "cuda-only",
                                        "uint8 (fp8_ds_mla) SWA cache: the fused CUDA op normalises and ropes q",
                                        reason=CUDA_ONLY)],
                "attn.kv_insert": [Binding(kv, "cuda-only", "uint8 (fp8_ds_mla) SWA cache (cache_dtype == uint8 in "
                                           "_fused_qnorm_rope_kv_insert); FP8_MAX 448 hard-coded in the op",
                                           reason=CUDA_ONLY)]}
    return {"attn.kv_insert": [
        Binding(kv, "compiled", "uint8 (fp8_ds_mla) SWA cache: the HIP build of the same op (inherited by "
                "DeepseekV4ROCMAiterMLAAttention; kv_norm by aiter fused_qk_rmsnorm_group_quant when the aiter linear "
                "path is on, else fused_q_kv_rmsnorm); 0.32.0 has no ROCm Triton insert for this cache "
                "(cache_utils.quantize_and_insert_k_cache is called only by the XPU path; the vllm-triton subject "
                "drives its kernel)", reason=HIP_OP),
    ], "attn.q_path": [
        Binding(AMD_ATTN + "_split_qkv_and_norm -> aiter fused_qk_rmsnorm_group_quant (FP8 qr for the aiter "
                "block-scaled wq_b)" + tail, "aiter",
                "rocm_aiter_ops.is_linear_fp8_enabled() (VLLM_ROCM_USE_AITER=1, VLLM_ROCM_USE_AITER_LINEAR) and both "
                "wq_b take Fp8BlockScaledMMLinearKernel, q_lora % 128 == 0 (_wq_b_uses_aiter_block_scaled)",
                lambda c: aiter_enabled(c) and _flag(c, "VLLM_ROCM_USE_AITER_LINEAR", "1"), reason=AITER_ONLY),
        Binding(V + "models.deepseek_v4.attention.DeepseekV4Attention._split_qkv_and_norm -> common.ops."
                "fused_q_kv_rmsnorm (Triton)" + tail, "compiled",
                "aiter linear off: the shared Triton q/kv RMSNorm, then the compiled HIP q-norm/RoPE/insert op "
                "(uint8 fp8_ds_mla SWA cache; V4.1's rows: the same op with apply_q_norm False, models/deepseek_v41/"
                "attention.py:1072-1086)", reason=HIP_OP),
    ]}


V41 = V + "models.deepseek_v41."
DSA = V + "model_executor.kernels.attention.dsa.candidate_blocks."
K_STORE = V41 + "common.ops.indexer_k_store.indexer_k_norm_rope_store -> _indexer_k_norm_rope_quant_store_kernel"
CAND = (DSA + "select_candidate_blocks (_block_scores_kernel, torch.topk, _store_candidates_kernel) on the candidate "
        "source / " + DSA + "apply_candidate_mask (_candidate_flags_kernel, _mask_candidates_kernel) on later indexers")


def _mxfp4_indexer(ctx) -> bool:
    """attention_config.indexer_kv_dtype == 'mxfp4' (dsa_indexer_uses_fp4, v1/attention/backends/mla/indexer.py:59;
    the default 'auto' resolves to 'fp8'): a config field, not an env flag; the dispatch context may carry it."""
    return ctx.get("indexer_kv_dtype", "fp8") == "mxfp4"


def _v41_indexer(platform: str) -> dict[str, list[Binding]]:
    """indexer.k_latent and indexer.topk_two_level (DeepSeek-V4.1): read from vLLM 0.32.0's
    models/deepseek_v41/attention.py (DeepseekV4Indexer._produce_k :1405-1437, forward :1470-1518),
    amd/rocm.py (DeepseekV41RocmMxfp4Indexer :445-499), model_executor/layers/sparse_attn_indexer.py:687-720 /
    :837-866 (CUDA) and v1/attention/ops/rocm_aiter_mla_sparse.py:1252-1300 / :1342-1372 (ROCm)."""
    produce = (V41 + "attention.DeepseekV4Indexer._produce_k (wk: bf16 ReplicatedLinear, unquantised) -> " + K_STORE)
    if platform == "cuda":
        return {
            "indexer.k_latent": [Binding(produce, "triton", "the FP8 indexer cache (default) or MXFP4 "
                                         "(indexer_kv_dtype='mxfp4', USE_FP4 branch): the same Triton kernel, "
                                         "row-major pages on CUDA",
                                         reason="sim of CUDA not provided (run `nox -s cuda` on NVIDIA); "
                                                "vllm-triton:ocp drives this kernel under the interpreter")],
            "indexer.topk_two_level": [
                Binding(V + "model_executor.layers.sparse_mqa_indexer.SparseMQAIndexer (DeepGEMM "
                        "fp8_fp4_sparse_mqa_logits + DeepSelect top-k on bf16 logits)", "cuda-only",
                        "attention_config.indexer_sparse_logits on a candidate consumer (MXFP4 cache required, "
                        "SM100): candidates only are scored (variant 'candidates_only')",
                        lambda c: bool(c.get("indexer_sparse_logits")), reason=CUDA_ONLY),
                Binding(V + "model_executor.layers.sparse_attn_indexer.sparse_attn_indexer -> " + CAND + ", then "
                        "torch.ops._C.top_k_per_row_prefill / top_k_per_row_decode (persistent_topk for k in "
                        "{512, 1024, 2048})", "triton",
                        "the dense path (default): DeepGEMM fp8_fp4_mqa_logits, the candidate kernels in place, the "
                        "compiled row top-k", reason="sim of CUDA not provided (run `nox -s cuda` on NVIDIA); the row "
                        "top-k is a compiled CUDA op; vllm-triton:ocp drives the candidate kernels"),
            ],
        }
    rams = V + "v1.attention.ops.rocm_aiter_mla_sparse."
    gfx950 = platform == "rocm-gfx950"
    return {
        "indexer.k_latent": ([
            Binding(V41 + "amd.rocm.DeepseekV41RocmMxfp4Indexer._produce_k -> rocm_mxfp4_indexer_k_store -> aiter "
                    "k_norm_rope_mxfp4_cache", "aiter",
                    "indexer_kv_dtype='mxfp4' (DeepseekV4IndexerCache.rocm_mxfp4 -> DeepseekV41ROCMAiterMLAAttention."
                    "_indexer_cls); dsa_indexer_uses_fp4 allows it on ROCm only on CDNA4 with VLLM_ROCM_USE_AITER=1",
                    lambda c: _mxfp4_indexer(c) and aiter_enabled(c), reason=AITER_ONLY)] if gfx950 else []) + [
            Binding(produce, "triton",
                    "the FP8 indexer cache (default; on gfx942 the only one: dsa_indexer_uses_fp4 refuses mxfp4 below "
                    "CDNA4, v1/attention/backends/mla/indexer.py:80-84): the kernel casts to tl.float8e4nv with "
                    "FP8_MAX 448 (no fnuz branch; Triton has no fp8e4nv on gfx942) and writes the 16x16 SHUFFLE "
                    "layout (block_size > 1 on ROCm); the readers (cp_gather_indexer_k_quant_cache_triton, paged "
                    "logits) decode FP8_DTYPE (fnuz on gfx942)", adapter="k_latent",
                    runs=("indexer_k_norm_rope_store", "_indexer_k_norm_rope_quant_store_kernel")),
        ],
        "indexer.topk_two_level": ([
            Binding(V + "v1.attention.ops.rocm_paged_mxfp4_indexer (RocmSparseAttnIndexer / RocmSparseMQAIndexer: "
                    "aiter paged MXFP4 logits, block scores and top-k)", "aiter",
                    "indexer_kv_dtype='mxfp4' (CDNA4, VLLM_ROCM_USE_AITER=1)",
                    lambda c: _mxfp4_indexer(c) and aiter_enabled(c), reason=AITER_ONLY)] if gfx950 else []) + [
            Binding(rams + "rocm_aiter_sparse_attn_indexer -> " + CAND + " (prefill; decode rows: "
                    + rams + "_apply_candidate_mask_strided), then aiter's top-k "
                    "(rocm_aiter_ops.is_indexer_top_k_supported) or torch.ops._C.top_k_per_row_prefill / _decode",
                    "triton", "the FP8 indexer cache (default): prefill chunks mask the dense logits in place with "
                    "the shared Triton kernels, then the row top-k", adapter="topk_two_level",
                    runs=("_block_scores_kernel", "_store_candidates_kernel", "_candidate_flags_kernel",
                          "_mask_candidates_kernel")),
        ],
    }

ENG = V + "models.deepseek_v41.common.engram."
ENGRAM_WHY = ("the vllm:sim subject simulates the DSV4 (V4) model's ROCm dispatch; the V4.1 Engram is one Triton "
              "path for every platform (common/engram.py, imported by amd/model.py:70 and nvidia/model.py:101), "
              "which vllm-triton:<profile> runs under the interpreter")


def _engram(platform: str) -> dict[str, list[Binding]]:
    """DeepSeek-V4.1 Engram (conformance.cases.engram): the same Triton kernels on ROCm and CUDA (common/)."""
    where = ("DeepSeek-V4.1 with engram_layer_ids: hashes once per forward before the decoder layers "
             "(amd/model.py:582-633, nvidia/model.py; V2 runner: stateless with lookback_token_ids), on every "
             "platform")
    hash_row = Binding(ENG + "NgramHashState.forward (_hash_ids_kernel, engram.py:279-420, :520-600)", "triton",
                       where, reason="no sim adapter: " + ENGRAM_WHY)
    mem_row = Binding(ENG + "Engram.forward (ParallelEngramEmbedding.lookup -> _engram_lookup_kernel, "
                      "engram.py:628-721; wkv ColumnParallelLinear; _fused_engram_post_wkv_kernel, :1185-1275)",
                      "triton", "the engram layers (engram_layer_ids), between the previous sublayer's mHC post "
                      "and the attention mHC pre (amd/model.py:341-358, nvidia/model.py:531-560); on CUDA with "
                      "DP-sharded tables EngramBatch stages MXFP8 wkv inputs instead (engram.py:1391-1510)",
                      reason="no sim adapter: " + ENGRAM_WHY + "; its wkv (an MXFP8 linear on V4.1 checkpoints, "
                             "rows .../mxfp8-wkv/...) runs there as the harness's MXFP8 emulation")
    return {"engram.hash": [hash_row], "engram.memory": [mem_row]}


def _stateful(platform: str) -> dict[str, list[Binding]]:
    """Streamed (stateful) components (docs/stateful-components.md): the same vLLM kernels as their one-shot rows,
    driven chunk by chunk over a persistent, poisoned state cache."""
    fn = (V + "models.deepseek_v4.common.ops.save_partial_states._SAVE_PARTIAL_STATES_KERNEL + " + FCQ
          + "compress_norm_rope_store_triton (ratio 4) | compress_norm_rope_store_two_stage_triton (head 512, ratio "
          "128) over CompressorStateCache (models/deepseek_v4/compressor.py:139-175, "
          ":350-420)")
    cond = ("DeepseekCompressor.forward on every chunk of a request (chunked prefill, decode, spec-decode verify): "
            "the save kernel writes the chunk's kv / score + ape rows into the request's fp32 state cache (sliding "
            "window coff * ratio), the store kernel pools every window the chunk closes from it")
    if platform == "cuda":
        return {"compressor.kv_stream": [Binding(fn, "triton", cond,
                                                 reason="sim of CUDA not provided (run `nox -s cuda` on NVIDIA)")]
                } | _cache_streams(platform)
    return {"compressor.kv_stream": [Binding(fn, "triton", cond, adapter="compress_stream_rocm",
                                             runs=("compress_norm_rope_store_triton",))]} | _cache_streams(platform)


def _cache_streams(platform: str) -> dict[str, list[Binding]]:
    """attn.kv_stream / indexer.k_stream (conformance.cases.cache_stream): attn.kv_insert's and indexer.k_cache's
    writers and readers over a persistent, recycled, poisoned pool; unbound on the sim for their one-shot rows'
    reasons."""
    swa = (V + "models.deepseek_v4.attention.DeepseekV4Attention._fused_qnorm_rope_kv_insert -> " + QKV_OP
           + " (writer, slot_mapping of DeepseekSparseSWAMetadata) + " + V + "v1.attention.backends.mla.sparse_swa."
           "_compute_swa_indices_and_lens_kernel (the window's slots through the block table) + the sparse MLA "
           "reader")
    swa_cond = ("every chunk of a request (chunked prefill, decode, spec-decode verify) on the uint8 fp8_ds_mla SWA "
                "cache (SlidingWindowMLASpec: out-of-window blocks freed and reused)")
    k = (FCQ + "compress_norm_rope_store_triton (writer: the compressor's indexer store at closing tokens, "
         "k_cache_metadata.slot_mapping) + " + RAMS + "cp_gather_indexer_k_quant_cache_triton (reader)")
    k_cond = ("every chunk of a request: the compressor stores each indexer entry when its 4th token arrives, the "
              "indexer's prefill gathers the closed entries (skip_k_cache_insert=True)")
    if platform == "cuda":
        return {"attn.kv_stream": [Binding(swa, "cuda-only", swa_cond, reason=CUDA_ONLY)],
                "indexer.k_stream": [Binding(k, "triton", k_cond, reason="sim of CUDA not provided (run `nox -s "
                                             "cuda` on NVIDIA); the reader is a CUDA op")]}
    return {"attn.kv_stream": [Binding(swa, "compiled", swa_cond, reason=HIP_OP + "; the writer is attn.kv_insert's "
                                       "(no ROCm Triton insert for this cache in vLLM 0.32.0)")],
            "indexer.k_stream": [Binding(k, "triton", k_cond, reason="no adapter: the writer is fused into the "
                                         "compressor and takes no key to write (indexer.k_cache's reason); "
                                         "compressor.kv_stream drives the same store kernel chunk by chunk")]}

DSP = V + "models.deepseek_v41."
DSPEC = V + "v1.worker.gpu.spec_decode."
_DSP_SPEC_WHY = ("the DSpark draft model needs a speculative VllmConfig (DSparkDeepseekV4Model.__init__ asserts "
                 "vllm_config.speculative_config, nvidia/dspark.py:75) and its layers a forward context")


def _dspark(platform: str) -> dict[str, list[Binding]]:
    """The DSpark draft head (conformance.cases.dspark; docs/dspark.md): vLLM 0.32.0's V4.1 draft model
    (models/deepseek_v41/{amd,nvidia}/dspark.py) and the V2 runner's DSpark speculator
    (v1/worker/gpu/spec_decode/dspark/speculator.py over dflash/speculator.py)."""
    amd = platform != "cuda"
    model = DSP + ("amd" if amd else "nvidia") + ".dspark.DSparkDeepseekV4Model"
    taps = (DSP + ("amd.model.DeepseekV4Model.forward (mhc_post + mean(dim=1) at idx + 1 in aux_hidden_state_layers, "
                   "amd/model.py:667-673)" if amd else
                   "nvidia.model (mhc_shifted_post_pre capture_aux, nvidia/model.py:565-591, 1103-1157)"))
    gemm = ("rocm_unquantized_gemm (compiled wvSplitK skinny GEMMs at small batch)" if amd else
            "a cuBLAS bf16 GEMM")
    return {
        "dspark.input": [Binding(
            taps + " -> " + model + ".combine_hidden_states (main_proj ReplicatedLinear, main_norm RMSNorm) + "
            + DSPEC + "dflash.speculator._prepare_dflash_inputs_kernel (SAMPLE_FROM_ANCHOR=True) + embed_tokens",
            "triton",
            "speculative_config method 'dspark' on a DeepSeek-V4.1 target: every draft step (DSparkSpeculator."
            "propose -> prepare_dflash_inputs; main_proj as linear.fp8_block's V4.1 rows: MXFP8, on gfx942 "
            "EmulationMxfp8LinearKernel)",
            reason="no adapter: the taps are computed inside the target model's forward and main_x inside "
                   "combine_hidden_states of the draft model, and " + _DSP_SPEC_WHY + "; the block "
                   "construction is the Triton _prepare_dflash_inputs_kernel (vllm-triton:<profile> drives it, with "
                   "main_x by the harness); main_proj and main_norm are driven one by one by linear.fp8_block and "
                   "norm.rms")],
        "dspark.markov": [Binding(
            DSPEC + "dspark.speculator.DSparkSpeculator._sample_sequential / _sample_logits -> " + model.replace(
                "DSparkDeepseekV4Model", "DSparkDeepseekV4ForCausalLM") + ".markov_embed / markov_bias / "
            "compute_confidence (" + V + "model_executor.models.qwen3_dspark.DSparkMarkovHead.embed / .bias, "
            "LogitsProcessor -> " + gemm + ", DSparkConfidenceHead.forward)", "torch",
            "every DSpark draft step without dspark_draft_topk (the V4 / V4.1 draft models have no "
            "apply_markov_bias_gathered, so the top-k path is Qwen3 only); greedy when the request needs no "
            "draft probabilities (draft_logits None: argmax), else gumbel_sample",
            **(dict(adapter="dspark_markov",
                    runs=("_sample_sequential", "_sample_logits", "markov_embed", "markov_bias", "compute_confidence",
                          "rocm_unquantized_gemm")) if amd else
               dict(reason="sim of CUDA not provided (run `nox -s cuda` on NVIDIA); vllm:sim-<arch> drives the same "
                           "torch code (the speculator and heads are platform-independent but for the bias GEMM)")))],
    }


def table(platform: str) -> dict[str, list[Binding]]:
    if platform == "rocm-gfx942":
        return _rocm("gfx942") | _no_adapter_yet(platform) | _qkv(platform) | _v41_indexer(platform) | \
            _engram(platform) | _stateful(platform) | _dspark(platform)
    if platform == "rocm-gfx950":
        return _rocm("gfx950") | _no_adapter_yet(platform) | _qkv(platform) | _v41_indexer(platform) | \
            _engram(platform) | _stateful(platform) | _dspark(platform)
    if platform == "cuda":
        return _cuda() | _no_adapter_yet(platform) | _qkv(platform) | _v41_indexer(platform) | _engram(platform) | \
            _stateful(platform) | _dspark(platform)
    raise KeyError(f"no binding table for platform {platform!r}; known: {PLATFORMS}")


def select(platform: str, component: str, ctx: dict) -> Binding | None:
    """The row vLLM's dispatch picks for ``component`` on ``platform`` in context ``ctx`` (None: no row)."""
    for b in table(platform).get(component, []):
        if b.when(ctx):
            return b
    return None


def coverage(platform: str, ctx: dict, components) -> list[tuple[str, str, str, str]]:
    """(component, function, backend, adapter-or-reason) for every registered component."""
    out = []
    for name in sorted(components):
        b = select(platform, name, ctx)
        if b is None:
            out.append((name, "-", "-", "no binding row for this platform"))
        else:
            out.append((name, b.function, b.backend, b.adapter or b.reason))
    return out
