"""The ROCm adapters of ``vllm:sim-<arch>`` (``_vllm_rocm_adapters``) re-used by ``vllm-triton[-gpu]:<profile>``
for compressor.kv (V4 and V4.1 rows), compressor.kv_stream (V4 rows), attn.output and mhc.head.

The adapter bodies are written once, in ``_vllm_rocm_adapters``; they call what they need through an ``Ops``
(lookup, device, RoPE table). ``vllm:sim`` passes vLLM's own callables on the CPU; this module passes
``triton_ops(p)``, whose lookup hands out launchers of the same vLLM Triton kernels, fetched through
``vllm_triton._K`` (tests plant broken kernels there), from the installed vLLM (``vllm-triton``, interpreter) or
from vLLM's source files (``vllm-triton-gpu``: no vllm package on the device, kernels compiled by Triton).

Why launchers and not vLLM's wrappers (vLLM 0.32.0, paths relative to site-packages/vllm):

* ``_SAVE_PARTIAL_STATES_KERNEL`` (models/deepseek_v4/common/ops/save_partial_states.py:193) and the indexer
  store ``_FUSED_KV_COMPRESS_NORM_ROPE_INSERT_INDEXER_TRITON_KERNEL`` (fused_compress_quant_cache.py:1309) are
  ``VllmTritonJitKernel`` objects whose ``kernel_launcher`` (model_executor/warmup/jit_warmup.py:36) imports
  vllm.envs: not loadable from source. Their launch specs (save_partial_states.py:159-190,
  fused_compress_quant_cache.py:1253-1306) are made here directly: grid (tokens,), the same keyword arguments.
* ``compress_norm_rope_store_triton`` / ``..._two_stage_triton`` (fused_compress_quant_cache.py:46-143,
  :615-700) read ``_ON_GFX950``, which the file defines under ``if current_platform.is_rocm()`` (:38-41): the
  launches are made here with ``SANITIZE_CACHE_NANS`` = the profile's arch flag (gfx942: False; the OCP
  profile on CUDA / the H100: False as vLLM's file sets it off ROCm; gfx950 would set it True, which only
  replaces NaN results by 0). The two-stage split count follows ``_pick_compress_num_splits`` (:355-371:
  the largest power-of-two divisor of head_dim, at most head_dim // 32 and ceil(#CU / max(1, n // ratio)));
  #CU is the device's on a GPU and the arch flagship's on the CPU (MI300X 304, MI355X 256, as vllm:sim says).
  The split is along head columns with no cross-split reduction, so it cannot change a value.
* ``rocm_inverse_rope_rows_`` / ``rocm_inv_rope_einsum`` (v1/attention/ops/rocm_aiter_mla_sparse.py:1552,
  :1703) are plain functions: vLLM's own, called as they are. On the source path the bf16 wo_a cache slot
  ``_dsv4_wo_a_bf16`` (``_get_cached_wo_a_bf16``, :1647-1700) is filled before the call with the value vLLM
  computes for an unquantised bf16 module (``wo_a.weight.view(G, R, D).to(bf16)``, :1695-1698), because its
  fill path imports vllm's fp8_utils, absent on the device.
* V4.1 compressor: ``fused_save_compress_norm`` (models/deepseek_v41/common/ops/fused_compress_quant_cache.py:22-115)
  is a plain function, vLLM's own, called as it is (``JOIN_ROW_PTRS`` = ``not current_platform.is_rocm()``, :19:
  True on the CPU build and on CUDA; a gfx942 device loads the two rows separately, the same values);
  ``rope_quant_insert`` (:224-278) reads ``_ON_GFX950`` from the same platform branch (:11-14), so its
  ``_rope_quant_insert_kernel`` launch for the 584-byte record is made here (launch_pdl False on CUDA, as vLLM).
* mhc.head: ``HCHeadOp.forward_hip`` without TileLang (model_executor/layers/mhc.py:684-726) allocates a bf16
  [T, D] out and calls ``torch.ops.vllm.hc_head_triton`` = ``_hc_head_triton`` (kernels/mhc/triton.py:302-334);
  the op registration needs vLLM, so the same call is made to ``_hc_head_triton`` itself.
* RoPE table: the installed vLLM's ``DeepseekV4ScalingRotaryEmbedding.cos_sin_cache`` where vLLM is importable;
  on the source path (no vllm package) the harness's fp32 table cos | sin of (t * inv_freq) (tests measure its
  distance to vLLM's: a few fp32 ulps).
"""

from __future__ import annotations

import types

import torch

BF = torch.bfloat16
CPU_CUS = {True: 304, False: 256}      # the CPU stands in for MI300X (fnuz) / MI355X (OCP) when sizing grids



def _kernel(name, p):
    from .vllm_triton import _K

    return _K.get(name, p.get("src"))


def _n_cu(p) -> int:
    dev = p.get("dev", "cpu")
    if dev != "cpu":
        return torch.cuda.get_device_properties(0).multi_processor_count
    return CPU_CUS[bool(p["fnuz"])]


def _num_splits(n_cu: int, num_actual: int, ratio: int, head_dim: int) -> int:
    """The column split of the two-stage compressor (rule of fused_compress_quant_cache.py:355-371)."""
    cap = min(-(-n_cu // max(1, num_actual // ratio)), head_dim // 32)
    ns = 1
    while ns * 2 <= cap and head_dim % (ns * 2) == 0:
        ns *= 2
    return ns


def save_partial_states(p):
    def launch(*, kv, score, ape, positions, state_cache, slot_mapping, block_size, state_width, compress_ratio,
               pdl_kwargs=None):
        """SavePartialStatesKernel.__call__'s launch (save_partial_states.py:159-190): grid (slots,)."""
        import triton

        h = kv.shape[-1]
        _kernel("save_partial_states_kernel", p)[(slot_mapping.shape[0],)](
            kv, kv.stride(0), score, score.stride(0), ape, ape.stride(0), positions, state_cache,
            state_cache.stride(0), state_cache.stride(1), slot_mapping, block_size, HEAD_SIZE=h,
            TRITON_BLOCK_SIZE=triton.next_power_of_2(h), STATE_WIDTH=state_width, COMPRESS_RATIO=compress_ratio)
    return launch


def _sanitize(p) -> bool:
    return False       # _ON_GFX950: False on gfx942 and off ROCm (CUDA); see the module docstring


def compress_store(p):
    def launch(*, state_cache, num_actual, token_to_req_indices, positions, slot_mapping, block_table, block_size,
               state_width, cos_sin_cache, kv_cache, k_cache_metadata, pdl_kwargs, head_dim, rope_head_dim,
               compress_ratio, overlap, use_fp4_cache, rms_norm_weight, rms_norm_eps, quant_block, token_stride,
               scale_dim):
        """compress_norm_rope_store_triton's launch: head 512 -> _fused_kv_compress_norm_rope_insert_sparse_attn
        (4 warps, SANITIZE_CACHE_NANS), else the indexer store's launch spec (1 warp); grid (num_actual,)."""
        import triton

        from .base import Unsupported

        if use_fp4_cache:
            raise Unsupported("the MXFP4 indexer store packs with PTX inline asm (NVIDIA only, no interpreter)")
        sparse = head_dim == 512
        k = _kernel("_fused_kv_compress_norm_rope_insert_sparse_attn" if sparse else
                    "_fused_kv_compress_norm_rope_insert_indexer_attn", p)
        extra = dict(num_warps=4, SANITIZE_CACHE_NANS=_sanitize(p)) if sparse else dict(num_warps=1)
        k[(num_actual,)](
            state_cache, state_cache.stride(0), state_cache.stride(1), token_to_req_indices, positions, slot_mapping,
            block_table, block_table.stride(0), block_size, rms_norm_weight, rms_norm_eps, cos_sin_cache,
            cos_sin_cache.stride(0), kv_cache, k_cache_metadata.slot_mapping, kv_cache.shape[1], HEAD_SIZE=head_dim,
            TRITON_BLOCK_SIZE=triton.next_power_of_2(head_dim), STATE_WIDTH=state_width,
            COMPRESS_RATIO=compress_ratio, OVERLAP=overlap, ROPE_HEAD_DIM=rope_head_dim, FP8_MAX=448.0,
            QUANT_BLOCK=quant_block, TOKEN_STRIDE=token_stride, SCALE_DIM=scale_dim,
            KV_BLOCK_STRIDE=kv_cache.stride(0), **extra, **(pdl_kwargs or {}))
    return launch


def compress_store_two_stage(p):
    single = compress_store(p)

    def launch(*, num_decode_tokens, compress_scratch, **a):
        """compress_norm_rope_store_two_stage_triton: the prefill tokens [num_decode_tokens:] through the split
        gather (_compress_gather_split_sparse_attn, grid tokens x splits, fp32 scratch) and
        _finalize_norm_rope_quant_store_sparse_attn (grid tokens); the decode tokens through the single pass."""
        import triton

        n = a["num_actual"]
        nd = min(max(num_decode_tokens, 0), n)
        npf = n - nd
        d, m, kv_cache = a["head_dim"], a["compress_ratio"], a["kv_cache"]
        if npf > 0:
            pos, slots = a["positions"][nd:], a["slot_mapping"][nd:]
            t2r, kslots = a["token_to_req_indices"][nd:], a["k_cache_metadata"].slot_mapping[nd:]
            ns = _num_splits(_n_cu(p), npf, m, d)
            scratch = compress_scratch[:npf]
            st, bt = a["state_cache"], a["block_table"]
            _kernel("_compress_gather_split_sparse_attn", p)[(npf * ns,)](
                st, st.stride(0), st.stride(1), pos, slots, t2r, bt, bt.stride(0), a["block_size"], scratch,
                scratch.stride(0), HEAD_SIZE=d, STATE_WIDTH=a["state_width"], COMPRESS_RATIO=m, NUM_SPLITS=ns,
                HEAD_TILE=d // ns)
            cs = a["cos_sin_cache"]
            _kernel("_finalize_norm_rope_quant_store_sparse_attn", p)[(npf,)](
                scratch, scratch.stride(0), pos, slots, a["rms_norm_weight"], a["rms_norm_eps"], cs, cs.stride(0),
                kv_cache, kslots, kv_cache.shape[1], HEAD_SIZE=d, TRITON_BLOCK_SIZE=triton.next_power_of_2(d),
                COMPRESS_RATIO=m, ROPE_HEAD_DIM=a["rope_head_dim"], FP8_MAX=448.0, QUANT_BLOCK=a["quant_block"],
                TOKEN_STRIDE=a["token_stride"], SCALE_DIM=a["scale_dim"], KV_BLOCK_STRIDE=kv_cache.stride(0),
                SANITIZE_CACHE_NANS=_sanitize(p))
        if nd > 0:
            single(**dict(a, num_actual=nd))
    return launch


def _pdl_off(p) -> dict:
    """vLLM passes launch_pdl=False on CUDA (current_platform.is_cuda()); the interpreter and ROCm get nothing."""
    return {"launch_pdl": False} if p.get("dev", "cpu") != "cpu" and torch.version.hip is None else {}


def rope_quant_insert(p):
    def launch(latent, positions, cos_sin_cache, kv_cache, slot_mapping, compress_ratio, fp8_scale=None):
        """V4.1's rope_quant_insert for the 584-byte fp8_ds_mla record (models/deepseek_v41/common/ops/
        fused_compress_quant_cache.py:224-278): _rope_quant_insert_kernel on grid (slots,), 4 warps,
        SANITIZE_CACHE_NANS = _ON_GFX950 (False here, see the module docstring)."""
        from .base import Unsupported

        if kv_cache.dtype != torch.uint8 or kv_cache.shape[-1] != 584:
            raise Unsupported(f"V4.1 record width {kv_cache.shape[-1]} ({kv_cache.dtype}): only the 584-byte "
                              "fp8_ds_mla record is launched here")
        n = slot_mapping.numel()
        if n == 0:
            return
        _kernel("_rope_quant_insert_kernel", p)[(n,)](
            latent, positions, cos_sin_cache, kv_cache, slot_mapping, COS_STRIDE=cos_sin_cache.stride(0),
            CACHE_STRIDE=kv_cache.stride(0), CACHE_BLOCK=kv_cache.shape[1], COMPRESS_RATIO=compress_ratio,
            SANITIZE_CACHE_NANS=_sanitize(p), num_warps=4, **_pdl_off(p))
    return launch


def hc_head_forward(p):
    def forward(self, hidden_states, hc_fn, hc_scale, hc_base, rms_norm_eps, hc_eps):
        """HCHeadOp.forward_hip's non-TileLang branch (mhc.py:693-726) with _hc_head_triton called directly."""
        hc, D = hidden_states.shape[-2:]
        outer = hidden_states.shape[:-2]
        flat = hidden_states.view(-1, hc, D)
        out = torch.empty(flat.shape[0], D, dtype=BF, device=hidden_states.device)
        _kernel("_hc_head_triton", p)(flat, hc_fn, hc_scale, hc_base, out, D, rms_norm_eps, hc_eps, hc)
        return out.view(*outer, D)
    return forward


def inv_rope_einsum(p):
    fn = _kernel("rocm_inv_rope_einsum", p)
    if p.get("src") is None:
        return fn

    def call(rotary_emb, o, positions, rope_head_dim, G, R, wo_a, inverse_rope=True):
        # the value _get_cached_wo_a_bf16 caches for an unquantised bf16 wo_a (see the module docstring)
        wo_a._dsv4_wo_a_bf16 = wo_a.weight.view(G, R, -1).to(BF)
        return fn(rotary_emb, o, positions, rope_head_dim, G, R, wo_a, inverse_rope=inverse_rope)
    return call


def harness_cos_sin(inv_freq: torch.Tensor, rope_dim: int, n: int) -> torch.Tensor:
    """fp32 [n, rope_dim] cos | sin of t * inv_freq (mscale 1: DSV4's mscale 0 / mscale_all_dim 0)."""
    f = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq[: rope_dim // 2].float())
    return torch.cat([f.cos(), f.sin()], -1).contiguous()


def rope_for(p):
    dev = p.get("dev", "cpu")

    def rope(inv_freq, rope_dim, head_size, positions=None):
        n = int(positions.max()) + 1 if positions is not None and positions.numel() else 1
        if p.get("src") is None:
            from ._vllm_adapters import vllm_rope

            cs = vllm_rope(inv_freq, rope_dim, head_size, positions).cos_sin_cache
        else:
            cs = harness_cos_sin(inv_freq, rope_dim, n)
        return types.SimpleNamespace(cos_sin_cache=cs.float().contiguous().to(dev))
    return rope


LAUNCHERS = {
    "_SAVE_PARTIAL_STATES_KERNEL": save_partial_states,
    "compress_norm_rope_store_triton": compress_store,
    "compress_norm_rope_store_two_stage_triton": compress_store_two_stage,
    "HCHeadOp.forward_hip": hc_head_forward,
    "rocm_inv_rope_einsum": inv_rope_einsum,
    "rocm_inverse_rope_rows_": lambda p: _kernel("rocm_inverse_rope_rows_", p),
    "fused_save_compress_norm": lambda p: _kernel("fused_save_compress_norm", p),
    "rope_quant_insert": rope_quant_insert,
}


def triton_ops(p):
    from ._vllm_rocm_adapters import Ops

    def lookup(name):
        if name not in LAUNCHERS:
            raise KeyError(f"vllm-triton ROCm adapter: no launcher for {name!r}")
        return LAUNCHERS[name](p)
    return Ops(lookup, p.get("dev", "cpu"), rope_for(p))


def make_compress(p):
    from ._vllm_rocm_adapters import make_compress_rocm

    return make_compress_rocm(p, triton_ops(p))


def make_compress_stream(p):
    from ._vllm_rocm_adapters import make_compress_stream_rocm

    return make_compress_stream_rocm(p, triton_ops(p))


def make_output_projection(p):
    from ._vllm_rocm_adapters import make_output_projection_rocm

    return make_output_projection_rocm(p, triton_ops(p))


def make_hc_head(p):
    from ._vllm_rocm_adapters import make_hc_head_triton

    return make_hc_head_triton(p, triton_ops(p))
