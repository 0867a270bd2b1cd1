"""Adapters of the ``vllm:sim-<arch>`` subject for the rows vLLM 0.32.0's ROCm dispatch selects when AITER is
absent or not enabled: the torch fallbacks run as they are, the Triton kernels under the interpreter, every call
made under the simulated platform (so ``current_platform.fp8_dtype()``, ``rocm_aiter_mla_sparse.FP8_DTYPE`` and
the ``_ON_GFX942`` / ``_ON_GFX950`` flags answer as the arch).

Each maker takes the platform profile (``vllm_sim.platform_profile()``) and returns a core function with the
golden's keyword arguments (``vllm.bind`` gives it the golden's signature). The vLLM entry points called here
are the dispatching functions themselves wherever they run on a CPU tensor (``HCHeadOp.forward_hip``,
``rocm_fp8_mqa_logits``, ``rocm_inverse_rope_rows_``, ``rocm_inv_rope_einsum``, the compressor's
``_SAVE_PARTIAL_STATES_KERNEL`` and ``compress_norm_rope_store[_two_stage]_triton``), so the branch they take
under the simulated platform is the one the binding row names, and the witness test sees it run.

Harness code does layout conversion only: bf16 inputs, paged caches and their metadata, decoding the cache
bytes the vLLM writer stored (``references.formats.cache_layouts`` / ``_vllm_adapters.read_584``).
"""

from __future__ import annotations

import torch

BF = torch.bfloat16


def _vllm(name):
    """vLLM callables looked up at call time (tests patch ``OVER`` to plant a broken one)."""
    if name in OVER:
        return OVER[name]
    if name == "HCHeadOp.forward_hip":
        from vllm.model_executor.layers.mhc import HCHeadOp

        return HCHeadOp.forward_hip
    if name == "process_fp8_weight_block_strategy" or name in ("_per_token_group_quant_fp8",
                                                                "w8a8_triton_block_scaled_mm"):
        from vllm.model_executor.layers.quantization.utils import fp8_utils

        return getattr(fp8_utils, name)
    if name in ("fused_save_compress_norm", "rope_quant_insert"):
        from vllm.models.deepseek_v41.common.ops import fused_compress_quant_cache as fcq41

        return getattr(fcq41, name)
    if name == "KMxfp8Static.get_scale_weight_loader":
        from vllm.model_executor.layers.quantization.modelopt import KMxfp8Static

        return KMxfp8Static.get_scale_weight_loader
    if name == "EmulationMxfp8LinearKernel":
        from vllm.model_executor.kernels.linear.mxfp8.emulation import EmulationMxfp8LinearKernel

        return EmulationMxfp8LinearKernel
    if name == "VocabParallelEmbedding.forward":
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        return VocabParallelEmbedding.forward
    if name == "combine_topk_swa_indices":
        from vllm.models.deepseek_v4.amd import rocm

        return rocm.combine_topk_swa_indices
    if name == "build_c128a_topk_metadata":
        from vllm.models.deepseek_v4 import sparse_mla

        return sparse_mla.build_c128a_topk_metadata
    if name == "mhc_post_torch":
        from vllm.model_executor.kernels.mhc.torch import mhc_post_torch

        return mhc_post_torch
    import vllm.v1.attention.ops.rocm_aiter_mla_sparse as rams

    if hasattr(rams, name):
        return getattr(rams, name)
    from vllm.models.deepseek_v4.common.ops import fused_compress_quant_cache as fcq
    from vllm.models.deepseek_v4.common.ops import save_partial_states as sps

    if name == "_SAVE_PARTIAL_STATES_KERNEL":
        return sps._SAVE_PARTIAL_STATES_KERNEL
    return getattr(fcq, name)


OVER: dict = {}


class Ops:
    """What a ROCm adapter below calls, so that one adapter body serves two subjects: ``lookup(name)`` the vLLM
    callable by its ``_vllm`` name, ``dev`` the device the tensors go to, ``rope(inv_freq, rope_dim, head_size,
    positions)`` an object whose ``cos_sin_cache`` is vLLM's [P, rope_dim] table on ``dev``. ``SIM`` (vllm:sim)
    is vLLM's own callables on the CPU; ``vllm-triton[-gpu]`` passes launchers of the same Triton kernels
    (``_vllm_triton_rocm.triton_ops``)."""

    def __init__(self, lookup, dev="cpu", rope=None):
        self.lookup, self.dev = lookup, dev
        if rope is None:
            from ._vllm_adapters import vllm_rope as rope
        self.rope = rope


def _sim_ops(ops):
    return ops if ops is not None else Ops(_vllm)


# ------------------------------------------------------------------------------------------------ mHC
def make_hc_post_torch(p):
    def hc_post_torch(F, X, post, comb, *, variant="official", numerics=None):
        """MHCPostOp.forward_native -> mhc_post_torch (x bf16 [.., D], residual bf16 [.., hc, D], post
        [.., hc, 1], comb [.., hc, hc]): what MHCPostOp.forward_hip falls back to without aiter / TileLang."""
        y = _vllm("mhc_post_torch")(F.to(BF), X.to(BF), post.float().unsqueeze(-1), comb.float())
        return {"y": y.float()}
    return hc_post_torch


def make_hc_head_triton(p, ops=None):
    ops = _sim_ops(ops)

    def hc_head_triton(X, fn, base, scale, *, norm_eps, hc_eps, numerics=None):
        """HCHeadOp.forward_hip (no TileLang) -> torch.ops.vllm.hc_head_triton = _hc_head_triton: the
        weight-free Triton RMSNorm (bf16 out), an fp32 linear with hc_fn, sigmoid, the Triton reduce."""
        lead = X.shape[:-2]
        hc, D = X.shape[-2:]
        dev = ops.dev
        y = ops.lookup("HCHeadOp.forward_hip")(None, X.to(dev, BF).reshape(-1, hc, D).contiguous(),
                                               fn.to(dev).float().contiguous(),
                                               scale.to(dev).float().reshape(1).contiguous(),
                                               base.to(dev).float().contiguous(), norm_eps, hc_eps)
        return {"h": y.reshape(*lead, D).float().cpu()}
    return hc_head_triton


# ------------------------------------------------------------------------------------------------ indexer
def make_indexer_scores_prefill(p):
    def indexer_scores_rocm(q, k, w):
        """The ROCm indexer's prefill chunk (rocm_aiter_sparse_attn_indexer): the C4A indexer-K cache
        (block-flat NORMAL layout, 64 entries per block) gathered by cp_gather_indexer_k_quant_cache_triton
        (cache bytes viewed as FP8_DTYPE = the platform fp8 dtype), then rocm_fp8_mqa_logits, which without
        AITER enabled returns fp8_mqa_logits_torch. Every query sees all N keys (cu_seqlen_ks 0, ke N).

        Inputs prepared by the harness in the dialect the reader decodes (fp8 dtype and max of the platform:
        fnuz / 224 on gfx942): q one FP8 block per (token, head) with a power-of-two scale folded into w (the
        fused_indexer_q rule), K one per entry (the indexer-K writers' rule). That the DSV4 compressor writes
        this cache in OCP on every arch is the dialect map's indexer_k->logits verdict, not this row's."""
        from ._vllm_adapters import _pow2_scale, write_indexer_k

        fp8, fmax = p["fp8"], p["q_fmax"]
        T, H, D = q.shape
        N = k.shape[0]
        qb = q.to(BF).float()
        s = _pow2_scale(qb.abs().amax(-1, keepdim=True), fmax)
        q8 = (qb / s).clamp(-fmax, fmax).to(fp8).contiguous()
        wq = (w.float() * s.squeeze(-1)).contiguous()
        bs = 64
        cache = write_indexer_k(k, bs, fp8=fp8, fmax=fmax)
        nb = cache.shape[0]
        k_fp8 = torch.empty(N, D, dtype=fp8)
        k_scale = torch.empty(N, 4, dtype=torch.uint8)
        _vllm("cp_gather_indexer_k_quant_cache_triton")(
            cache.view(nb, bs, D + 4), k_fp8, k_scale, torch.arange(nb, dtype=torch.int32)[None].contiguous(),
            torch.tensor([0, N], dtype=torch.int32), token_to_seq=torch.zeros(N, dtype=torch.int32),
            cache_layout="NORMAL")
        logits = _vllm("rocm_fp8_mqa_logits")(q8, (k_fp8, k_scale.view(torch.float32)), wq,
                                              torch.zeros(T, dtype=torch.int32), torch.full((T,), N, dtype=torch.int32))
        return {"scores": logits.float()}
    return indexer_scores_rocm


# ------------------------------------------------------------------------------------------------ attention
def make_output_projection_rocm(p, ops=None):
    ops = _sim_ops(ops)

    def output_projection_rocm(o, positions, inv_freq, wo_a, wo_b, *, o_groups, rope_dim=64, numerics=None):
        """DeepseekV4ROCMAiterMLAAttention on the BF16 wo_a path (gfx942 always; gfx950 without the AITER
        FP8 BMM): rocm_inverse_rope_rows_ (Triton _inverse_rope_gptj_kernel, in place on the bf16 attention
        output: the rows no decode reduce rotated), then _o_proj's rocm_inv_rope_einsum(inverse_rope=False)
        (bf16 einsum against the module's bf16 wo_a), then wo_b as a bf16 linear (unquantised checkpoint)."""
        T, H, D = o.shape
        G = o_groups
        R = wo_a.shape[0] // G
        dev = ops.dev
        rope = ops.rope(inv_freq, rope_dim, D, positions)
        pos = positions.long().to(dev)
        ob = o.to(dev, BF).contiguous().clone()
        ops.lookup("rocm_inverse_rope_rows_")(ob, pos, rope.cos_sin_cache, rope_dim)
        mod = torch.nn.Module()
        mod.weight = torch.nn.Parameter(wo_a.to(dev, BF), requires_grad=False)
        z = ops.lookup("rocm_inv_rope_einsum")(rope, ob, pos, rope_dim, G, R, mod, inverse_rope=False)
        y = z.flatten(1) @ wo_b.to(dev, BF).t()
        return {"y": y.float().cpu()}
    return output_projection_rocm


# ------------------------------------------------------------------------------------------------ compressor
def _save_and_store(kv, score, ape, positions, state_cache, cache, *, m, d, ov, norm, eps, inv_freq, rope_dim,
                    ops=None):
    """DeepseekCompressor.forward's two ROCm kernels for one request whose tokens ``positions`` are all a prefill
    chunk: _SAVE_PARTIAL_STATES_KERNEL (kv, score + ape into the fp32 state cache, paged by position with an
    identity block table, block size 4 at ratio 4 / 8 otherwise), then the store the module picks
    (compress_norm_rope_store_two_stage_triton for head 512 without overlap, compress_norm_rope_store_triton
    otherwise), which pools every window the chunk closes into ``cache`` (blocks of 4 entries, 584 / 132 bytes
    per entry). Returns the compressed-cache slot per token (-1 where the token closes no window). ``ops``: the
    callables and device (``Ops``; None: vLLM's own on the CPU); every tensor argument is on ``ops.dev``."""
    from types import SimpleNamespace

    ops = _sim_ops(ops)
    dev = ops.dev
    n, coff = positions.shape[0], 2 if ov else 1
    sbs, per_tok = 4 if m == 4 else 8, 584 if d == 512 else 132
    slot = positions.clone()
    ops.lookup("_SAVE_PARTIAL_STATES_KERNEL")(kv=kv, score=score, ape=ape.float().contiguous(), positions=positions,
                                              state_cache=state_cache, slot_mapping=slot, block_size=sbs,
                                              state_width=coff * d, compress_ratio=m, pdl_kwargs={})
    fire = (positions + 1) % m == 0
    kv_slot = torch.where(fire, (positions + 1) // m - 1, torch.full_like(positions, -1))
    ncb = cache.shape[0]
    kv_cache = cache.as_strided((ncb, 4, per_tok), (4 * per_tok, per_tok, 1))
    rope = ops.rope(inv_freq, rope_dim, 512, torch.arange(int(positions[-1]) + 1))
    qb, ts, sd = (64, 448 + 2 * 64, 448 // 64 + 1) if d == 512 else (128, 128, 4)
    args = dict(state_cache=state_cache, num_actual=n,
                token_to_req_indices=torch.zeros(n, dtype=torch.int32, device=dev),
                positions=positions, slot_mapping=slot,
                block_table=torch.arange(state_cache.shape[0], dtype=torch.int32, device=dev)[None],
                block_size=sbs,
                state_width=coff * d, cos_sin_cache=rope.cos_sin_cache, kv_cache=kv_cache,
                k_cache_metadata=SimpleNamespace(slot_mapping=kv_slot), pdl_kwargs={}, head_dim=d,
                rope_head_dim=rope_dim, compress_ratio=m, overlap=ov, use_fp4_cache=False,
                rms_norm_weight=norm.to(dev).float().contiguous(), rms_norm_eps=eps, quant_block=qb, token_stride=ts,
                scale_dim=sd)
    if d == 512 and not ov:
        ops.lookup("compress_norm_rope_store_two_stage_triton")(
            **args, num_decode_tokens=0, compress_scratch=torch.empty(n, d, dtype=torch.float32, device=dev))
    else:
        ops.lookup("compress_norm_rope_store_triton")(**args)
    return kv_slot


def make_compress_rocm(p, ops=None):
    ops = _sim_ops(ops)

    def compress_rocm(x, wkv, wgate, ape, norm, *, ratio, head_dim, eps, inv_freq, rope_dim=64, numerics=None,
                      kind="attn", variant="official", overlap=None):
        """DeepseekCompressor.forward on ROCm: bf16 fused_wkv_wgate projection (torch), then
        _SAVE_PARTIAL_STATES_KERNEL (Triton: kv, score + ape into the paged fp32 state cache), then the store
        the module picks on ROCm: compress_norm_rope_store_two_stage_triton for head 512 without overlap (ratio
        128, _prefer_two_stage_compressor), compress_norm_rope_store_triton otherwise (ratio 4 attention, the
        indexer's head 128). One request, all tokens a prefill; the entries are the cache bytes decoded as
        float8_e4m3fn, the dtype those kernels write (tl.float8e4nv, FP8_MAX 448, no fnuz branch)."""
        if ape is None:
            return compress_v41(x, wkv, wgate, norm, ratio=ratio, head_dim=head_dim, eps=eps, inv_freq=inv_freq,
                                rope_dim=rope_dim, kind=kind, ops=ops)

        from ._vllm_adapters import read_584, read_indexer_k

        T, m, d = x.shape[0], ratio, head_dim
        dev = ops.dev
        ov = (m == 4) if overlap is None else overlap
        coff = 2 if ov else 1
        xb = x.to(dev, BF)
        kv_score = xb @ torch.cat([wkv, wgate], 0).to(dev, BF).t()      # MergedColumnParallelLinear, bf16 out
        kv, score = kv_score.split([coff * d, coff * d], dim=-1)
        positions = torch.arange(T, dtype=torch.int64, device=dev)
        sbs = 4 if m == 4 else 8
        state = torch.zeros((T + sbs - 1) // sbs, sbs, 2 * coff * d, device=dev)
        n, cbs = T // m, 4
        cache = torch.zeros((n + cbs - 1) // cbs + 1, cbs * (584 if d == 512 else 132), dtype=torch.uint8,
                            device=dev)
        _save_and_store(kv, score, ape.to(dev), positions, state, cache, m=m, d=d, ov=ov, norm=norm, eps=eps,
                        inv_freq=inv_freq, rope_dim=rope_dim, ops=ops)
        cache = cache.cpu()
        if d == 512:
            return {"entries": read_584(cache, range(n), cbs)}
        return {"entries": read_indexer_k(cache, range(n), cbs)}
    return compress_rocm


def make_compress_stream_rocm(p, ops=None):
    """compressor.kv_stream on ROCm: DeepseekCompressor.forward's kernels (compress_rocm) called once per chunk on
    ONE persistent state: the fp32 state cache (paged by position, block size 4 / 8, identity block table) and the
    compressed kv cache are the Streamed state, so the harness poisons both (NaN state rows, 0xFF cache bytes: an
    e4m3fn NaN code). Each step runs _SAVE_PARTIAL_STATES_KERNEL on the chunk's positions, then the store kernel
    with num_actual = the chunk (every chunk as a prefill: num_decode_tokens 0), which pools every window the chunk
    closes from the state cache, then reads back the entries the chunk closed. V4.1 rows (ape None): Unsupported."""

    from references.components.rope import rope_inv_freq
    from references.config import RopeScaling

    from ..components import Streamed
    from .base import Unsupported

    ops = _sim_ops(ops)
    dev = ops.dev
    inv_freq, rope_dim = rope_inv_freq(64, 160000.0, RopeScaling()), 64

    def _geom(ratio, head_dim):
        coff = 2 if ratio == 4 else 1
        return coff, (4 if ratio == 4 else 8), (584 if head_dim == 512 else 132)

    def new_state(x, wkv, wgate, ape, norm, *, ratio, head_dim, eps):
        if ape is None:
            raise Unsupported("the streamed adapter drives the V4 compressor kernels only (V4.1's fused_save_"
                              "compress_norm + rope_quant_insert have no streamed adapter)")
        T = x.shape[0]
        coff, sbs, per_tok = _geom(ratio, head_dim)
        ncb = (T // ratio + 3) // 4 + 1
        return {"state_cache": torch.zeros((T + sbs - 1) // sbs, sbs, 2 * coff * head_dim, device=dev),
                "kv_cache": torch.zeros(ncb, 4 * per_tok, dtype=torch.uint8, device=dev)}

    def step(state, *, start, x, wkv, wgate, ape, norm, ratio, head_dim, eps):
        from ._vllm_adapters import read_584, read_indexer_k

        n, m, d = x.shape[0], ratio, head_dim
        coff = _geom(m, d)[0]
        ov = coff == 2
        st, cache = state["state_cache"], state["kv_cache"]
        kv_score = x.to(dev, BF) @ torch.cat([wkv, wgate], 0).to(dev, BF).t()
        kv, score = kv_score.split([coff * d, coff * d], dim=-1)
        positions = torch.arange(start, start + n, dtype=torch.int64, device=dev)
        kv_slot = _save_and_store(kv, score, ape.to(dev), positions, st, cache, m=m, d=d, ov=ov, norm=norm, eps=eps,
                                  inv_freq=inv_freq, rope_dim=rope_dim, ops=ops)
        ids = kv_slot[kv_slot >= 0].tolist()
        if not ids:
            return {"entries": torch.zeros(0, d)}, state
        read = read_584 if d == 512 else read_indexer_k
        return {"entries": read(cache.cpu(), ids, 4)}, state

    return Streamed(new_state, step)


def compress_v41(x, wkv, wgate, norm, *, ratio, head_dim, eps, inv_freq, rope_dim, kind, ops=None):
    """DeepSeek-V4.1's compressor (compressor.kv's v41 rows) as models/deepseek_v41 runs it on every platform: the
    fp32 kv_score GEMM from bf16 operands (attention.py:954-959, torch.mm out_dtype fp32: harness code), then
    vLLM's Triton kernels interpreted: fused_save_compress_norm (ratio 2: the open pair's rows in a one-request
    ring of capacity 8, the pair pooled by its per-channel softmax, RMSNorm, bf16 latent; ratio 1: no ring, one
    program per token) and rope_quant_insert into a 584-byte fp8_ds_mla record (_rope_quant_insert_kernel: GPT-J
    RoPE at position // ratio * ratio, e4m3fn nope blocks of 64, UE8M0 scales). One request, all tokens a prefill;
    the entries are the cache bytes decoded. ``ops``: as ``_save_and_store``'s."""
    from ._vllm_adapters import read_584
    from .base import Unsupported

    ops = _sim_ops(ops)
    dev = ops.dev

    if head_dim != 512 or kind != "attn" or rope_dim != 64:
        raise Unsupported("V4.1's compressor writes the attention cache (head 512, rope 64); its indexer K comes "
                          "from the latent (indexer_k_norm_rope_store), not this store")
    T, m = x.shape[0], ratio
    W = wkv if wgate is None else torch.cat([wkv, wgate], 0)      # fused_wkv_wgate: [wkv; wgate]
    kv_score = (x.to(dev, BF).float() @ W.to(dev, BF).float().t()).contiguous()
    positions = torch.arange(T, dtype=torch.int64, device=dev)
    if m == 1:
        state = qsl = t2r = None
        slot = positions.clone()                                  # ratio 1: slot_mapping marks valid tokens
    else:
        cap = 8                                                   # CompressorStateCache: max(8, pow2(specs + 2))
        state = torch.zeros(1, cap, 1024, device=dev)
        slot = positions % cap                                    # block 0 of the ring: block * cap + p % cap
        qsl = torch.tensor([0, T], dtype=torch.int32, device=dev)
        t2r = torch.zeros(T, dtype=torch.int32, device=dev)
    latent = torch.zeros(T, 512, dtype=BF, device=dev)
    ops.lookup("fused_save_compress_norm")(kv_score, positions, state, slot, qsl, t2r,
                                           norm.to(dev, BF).contiguous(), eps, m, latent)
    n = T // m
    fire = (positions + 1) % m == 0
    kslot = torch.where(fire, (positions + 1) // m - 1, torch.full_like(positions, -1))
    cbs = 4
    ncb = (n + cbs - 1) // cbs + 1
    cache = torch.zeros(ncb, cbs * 584, dtype=torch.uint8, device=dev)
    kv_cache = cache.as_strided((ncb, cbs, 584), (cbs * 584, 584, 1))
    rope = ops.rope(inv_freq, rope_dim, 512, positions)
    ops.lookup("rope_quant_insert")(latent, positions, rope.cos_sin_cache, kv_cache, kslot, m)
    return {"entries": read_584(cache.cpu(), range(n), cbs)}


# ------------------------------------------------------------------------------------------------ linear
def make_fp8_block_linear_rocm(p):
    def fp8_block_linear_rocm(x, weight, weight_scale, weight_block=128):
        """TritonFp8BlockScaledMMKernel (ROCm without the aiter linear): process_weights_after_loading's
        process_fp8_weight_block_strategy on the checkpoint's OCP e4m3fn bytes and e8m0 scales (on an fnuz
        platform: 0x80 -> 0, bytes reinterpreted as e4m3fnuz, e8m0 exponent + 1; the ROCm FP8 padding of the row
        stride), then apply_weights: QuantFP8 on the bf16 activations (1 x 128 groups, use_ue8m0 False) and
        w8a8_triton_block_scaled_mm (bf16 out).

        The activation quant on the device is QuantFP8.forward_hip -> per_token_group_quant_fp8 -> the compiled
        torch.ops._C.per_token_group_fp8_quant (HIP; x contiguous), absent from the CPU build. The harness
        quantises as that op does (csrc per_token_group_quant.cu: y_s = amax / max_8bit, q = x / y_s clamped,
        rounded to nearest even) with the bounds vLLM passes it (get_fp8_min_max on the simulated platform: +-224
        on fnuz). vLLM's Triton twin _per_token_group_quant_fp8 is not used: it computes y_s = amax * (1 / fmax),
        one ulp off, which moves values sitting exactly on an FP8 rounding tie (finding in docs/gfx942-coverage.md)."""
        from vllm.model_executor.layers.quantization.utils.quant_utils import get_fp8_min_max

        from ._vllm_adapters import act_quant_as_compiled

        if weight_block == 32:
            return mxfp8_linear_rocm(x, weight, weight_scale, p)
        w, ws = _vllm("process_fp8_weight_block_strategy")(weight.clone().view(torch.float8_e4m3fn),
                                                            weight_scale.clone().view(torch.float8_e8m0fnu))
        q, s = act_quant_as_compiled(x, p["fp8"], get_fp8_min_max()[1])
        y = _vllm("w8a8_triton_block_scaled_mm")(q, w, s, ws, [128, 128], BF)
        return {"y": y.float()}
    return fp8_block_linear_rocm


def mxfp8_linear_rocm(x, weight, weight_scale, p):
    """V4.1's 32x32-scaled dense linear (rows ``linear.fp8_block/wb32/...``) as vLLM's ROCm dispatch serves it
    (``DeepseekV4FP8Config.get_quant_method`` -> ``ModelOptLinearMethod`` MXFP8, ``models/deepseek_v41/
    quant_config.py:221-243``): the checkpoint's [N/32, K/32] e8m0 grid goes through vLLM's own loader
    (``KMxfp8Static.get_scale_weight_loader``, ``modelopt.py:2278-2291``: a row-wise repeat to [N, K/32]), then
    the kernel ``init_mxfp8_linear_kernel`` picks on the arch (``kernels/linear/__init__.py:552-567``):
    ``RocmDotScaledMxfp8LinearKernel`` only where ``supports_mx()`` (gfx95x), else ``EmulationMxfp8LinearKernel``
    (``process_weights_after_loading`` dequantises to bf16, ``apply_weights`` a bf16 F.linear). On gfx950 the
    native kernel's ``rocm_mxfp8_block32_gemm`` is Triton with ``tl.dot_scaled``, which the interpreter has no
    MX path for: Unsupported there."""
    from vllm.model_executor.kernels.linear.mxfp8.Mxfp8LinearKernel import Mxfp8LinearLayerConfig
    from vllm.model_executor.layers.quantization.modelopt import CkptCtx

    from .base import Unsupported

    if not p["fnuz"]:
        raise Unsupported("gfx950 serves 32x32 rows with RocmDotScaledMxfp8LinearKernel (rocm_mxfp8_block32_gemm, "
                          "tl.dot_scaled), which the Triton interpreter cannot run")
    n, k = weight.shape
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight.clone().view(torch.float8_e4m3fn), requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(torch.empty(n, k // 32, dtype=torch.uint8), requires_grad=False)

    def copy_loader(param, loaded, *args, **kwargs):
        param.data.copy_(loaded)

    _vllm("KMxfp8Static.get_scale_weight_loader")(copy_loader, CkptCtx(scale_block_size=(32, 32)))(
        layer.weight_scale, weight_scale.clone())
    kernel = _vllm("EmulationMxfp8LinearKernel")(Mxfp8LinearLayerConfig(weight_shape=(n, k)))
    kernel.process_weights_after_loading(layer)
    return {"y": kernel.apply_weights(layer, x.to(BF)).float()}


# ------------------------------------------------------------------------------------------------ embedding
def make_embedding_rocm(p):
    def embedding_rocm(ids, table, *, hc_mult):
        """VocabParallelEmbedding.forward at tensor-parallel size 1 (quant_method.embedding ->
        UnquantizedEmbeddingMethod.embedding: F.embedding on the bf16 table); the hc_mult copies are
        DeepseekV4Model.forward's inline unsqueeze(-2).repeat (layout)."""
        from types import SimpleNamespace

        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        layer = SimpleNamespace(tp_size=1, quant_method=UnquantizedEmbeddingMethod(), weight=table.to(BF))
        h = _vllm("VocabParallelEmbedding.forward")(layer, ids)
        return {"X": h.unsqueeze(-2).repeat(1, hc_mult, 1).float()}
    return embedding_rocm


# ------------------------------------------------------------------------------------------------ index set
def make_index_set_rocm(p):
    def index_set_rocm(positions, topk_idx=None, *, layer_type, ratio, window=128):
        """The ROCm Triton sparse prefill's index set (DeepseekV4ROCMAiterMLAAttention._forward_prefill without
        AITER sparse MLA): one request whose query is ``positions`` (a prefill chunk ending at seq_len =
        max(positions) + 1), gather_len = query_len + min(prefix, window - 1) as the SWA metadata plans it,
        the compressed region N = ceil(seq_len / ratio) wide. The compressed candidates are the indexer top-k
        (csa: the case's ``topk_idx``), build_c128a_topk_metadata's prefill-local list (hca: every visible entry,
        active width as the C128A builder sizes it) or none (swa: top_k 0, compress ratio 1); then amd.rocm's
        combine_topk_swa_indices. Its indices into the per-request gathered buffer [N compressed | gathered SWA
        rows] are mapped back to the golden's numbering (compressed entry i -> max(positions) + 1 + i, gathered
        row j -> position gather_start + j): layout only."""
        from ._vllm_adapters import index_set_request, index_set_unmap

        def c128a_prefill_list(pos, r, width):
            T = pos.shape[0]
            bufs = [torch.zeros(T, width, dtype=torch.int32) for _ in range(3)]
            _, _, top = _vllm("build_c128a_topk_metadata")(
                pos.to(torch.int64), r, 0, torch.zeros(T, dtype=torch.int32), torch.zeros(0, 1, dtype=torch.int32),
                1, torch.zeros(T, dtype=torch.int64), bufs[0], bufs[1][:, 0].contiguous(), bufs[2],
                max_compressed_tokens=width)
            return top

        top, top_k, r, n_c, seq_len, gather = index_set_request(positions, topk_idx, layer_type, ratio, window,
                                                                c128a_prefill_list)
        idx, lens = _vllm("combine_topk_swa_indices")(
            top, torch.tensor([0, top.shape[0]], dtype=torch.int32), torch.tensor([seq_len], dtype=torch.int32),
            torch.tensor([gather], dtype=torch.int32), window, r, top_k, n_c + gather, n_c)
        return index_set_unmap(idx, lens, n_c, seq_len, gather)
    return index_set_rocm
