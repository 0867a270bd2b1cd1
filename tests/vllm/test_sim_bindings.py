"""vllm:sim-gfx942 / sim-gfx950 (conformance.subjects.vllm_sim): the simulation binds exactly what the binding
table says the arch calls, each bound row really executes the vLLM functions it names (witness), every
function the table names resolves in the installed vLLM, and mutants are caught: a table row naming the
wrong function, an adapter that drives the wrong function, a simulated platform that answers OCP on gfx942.

Skipped where vLLM is not installed (CI); the interpreter stand-in is registered before vLLM is imported."""

import importlib
import importlib.util

import pytest
import torch

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed in this Python (the sim subjects run with nox -s gfx942-sim)",
                allow_module_level=True)

from conformance.subjects import prepare_process  # noqa: E402

prepare_process(["vllm:sim-gfx942"])

from conformance import components  # noqa: E402
from conformance.cases import cases_for  # noqa: E402
from conformance.subjects import SubjectError, bindings, load_subject  # noqa: E402
from conformance.subjects import vllm_sim as vs  # noqa: E402

NAMES = sorted(components.load_all())


def _small_case(component):
    cs = cases_for(component)
    assert cs, component
    return min(cs, key=lambda c: len(c.id))


@pytest.fixture(scope="module", params=["gfx942", "gfx950"])
def sim(request):
    try:
        return load_subject(f"vllm:sim-{request.param}")
    except SubjectError as e:
        pytest.skip(f"sim subject unavailable in this process: {e}")


def _resolve(qualified: str):
    parts = qualified.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for a in parts[i:]:
            obj = getattr(obj, a)
        return obj
    raise ImportError(qualified)


@pytest.mark.parametrize("platform", bindings.PLATFORMS)
def test_every_vllm_function_named_resolves(platform, sim):
    bad = []
    for name, rows in bindings.table(platform).items():
        for b in rows:
            head = b.function.split(" ")[0]
            if not head.startswith("vllm."):
                continue        # torch.ops._C.* / aiter / DeepGEMM: not importable on this CPU build
            try:
                _resolve(head)
            except Exception as e:
                bad.append(f"{name}: {head}: {type(e).__name__}: {e}")
    assert not bad, "\n".join(bad)


def test_sim_binds_exactly_what_the_table_selects(sim):
    rows = bindings.table(sim.platform_kind)
    provided, missing = sim.provides(), sim.not_provided()
    assert sorted(set(provided) | set(missing)) == NAMES and not set(provided) & set(missing)
    for name in NAMES:
        b = bindings.select(sim.platform_kind, name, sim.ctx)
        assert b is not None and (b.function, b.backend) in [(r.function, r.backend) for r in rows[name]]
        if b.adapter:
            assert name in provided, f"{name}: table row has adapter {b.adapter} but the sim does not bind it"
            assert provided[name].function == b.function
            assert provided[name].note.startswith(f"SIMULATED {sim.arch}")
        else:
            assert name in missing and b.reason in missing[name] and b.function in missing[name]
    # AITER rows: never provided, always 'device only: AITER'
    for name, why in missing.items():
        if bindings.select(sim.platform_kind, name, sim.ctx).backend == "aiter":
            assert bindings.AITER_ONLY in why
    i = sim.info()
    assert i.emulated and i.simulated == sim.arch and f"SIMULATED {sim.arch}" in i.device
    assert f"SIMULATED {sim.arch}" in i.banner and "REAL RUN" not in i.banner


def test_without_aiter_mhc_pre_binds_the_torch_fallback():
    s = vs.VllmSimSubject("gfx942", env={"DSV4_SIM_AITER": "0"})
    p = s.provides()
    assert p["mhc.pre"].function.startswith("vllm.model_executor.kernels.mhc.torch.mhc_pre_torch")
    assert "mhc.pre" not in s.not_provided()


def _witness(sim, name):
    case = _small_case(name)
    impl = sim.provides()[name]
    kw = case.make_inputs()
    _, seen = vs.executed_vllm_functions(impl.fn, **kw)
    return seen


def test_each_bound_row_executes_what_it_names(sim):
    for name in sim.provides():
        b = bindings.select(sim.platform_kind, name, sim.ctx)
        seen = _witness(sim, name)
        lost = [r for r in b.runs if r not in seen]
        assert not lost, f"{name}: row names {b.runs} but {lost} did not run (ran: {sorted(seen)[:30]})"


def test_mutant_table_row_naming_the_wrong_function_is_caught(monkeypatch):
    s = vs.VllmSimSubject("gfx942")
    real = bindings.table

    def wrong(platform):
        t = real(platform)
        r = t["attn.sparse"][0]
        # a binding that says gfx942 runs the prefill kernel, while the adapter drives the decode kernel
        t["attn.sparse"] = [bindings.Binding(r.function.replace("decode_ragged", "prefill_ragged"), r.backend,
                                             r.condition, r.when, r.adapter,
                                             runs=("_sparse_attn_prefill_ragged_kernel",))]
        return t

    monkeypatch.setattr(bindings, "table", wrong)
    b = bindings.select(s.platform_kind, "attn.sparse", s.ctx)
    seen = _witness(s, "attn.sparse")
    assert [r for r in b.runs if r not in seen], "a row naming a kernel that never ran went unnoticed"


def test_mutant_adapter_driving_the_wrong_function_is_caught(monkeypatch):
    def cpu_attention(p):   # the CPU build's sparse attention (flash_mla_with_kvcache_cpu), not gfx942's kernel
        from conformance.subjects import _vllm_adapters as ad

        return ad.sparse_attention

    monkeypatch.setitem(vs.ADAPTERS, "sparse_attention", (cpu_attention, "wrong: CPU op"))
    s = vs.VllmSimSubject("gfx942")
    b = bindings.select(s.platform_kind, "attn.sparse", s.ctx)
    seen = _witness(s, "attn.sparse")
    assert [r for r in b.runs if r not in seen], "an adapter that runs the CPU op passed as gfx942's Triton kernel"


class _OcpPlatform(vs.SimPlatform):
    """Mutant: says ROCm gfx942 but answers OCP (what a non-fnuz platform would)."""

    def __init__(self, arch):
        super().__init__(arch)
        self.fnuz = False


def test_mutant_sim_platform_answering_ocp_is_refused(monkeypatch):
    monkeypatch.setattr(vs.VllmSimSubject, "platform_cls", _OcpPlatform)
    with pytest.raises(SubjectError, match="wrong dialect"):
        vs.VllmSimSubject("gfx942")


def _swa_edge(s):
    from conformance.checks.dialect.dialect_map import probe_edge
    from conformance.checks.dialect.interface import DSV4_EDGES

    prod, cons = s.dialect_probes()
    edge = DSV4_EDGES["swa_cache->sparse_attn"]
    return probe_edge(edge, prod[edge.name], cons[edge.name])


def test_mutant_sim_platform_answering_ocp_writes_ocp_bytes_on_gfx942():
    s = vs.VllmSimSubject("gfx942")
    row = _swa_edge(s)
    assert row.verdict == "consistent" and "fnuz" in row.producer_dialect, (row.verdict, row.producer_dialect)
    # bypass the refusal: adapters built from the OCP answers, calls made under the OCP platform
    s.platform_cls = _OcpPlatform
    with _OcpPlatform("gfx942"):
        s.profile = vs.platform_profile()
    bad = _swa_edge(s)
    assert "fnuz" not in bad.producer_dialect, ("a gfx942 simulation writing OCP K-cache bytes went unnoticed",
                                                 bad.producer_dialect, bad.message)


def test_platform_is_restored_after_each_call(sim):
    from vllm.platforms import current_platform as cp

    before = (cp.is_rocm(), cp.fp8_dtype())
    with sim.platform_cls(sim.arch):
        assert cp.is_rocm()
    assert (cp.is_rocm(), cp.fp8_dtype()) == before


def test_device_run_binds_the_same_rows_as_the_simulation(monkeypatch):
    """The `vllm` subject on a ROCm machine binds from the same table (checked here without a GPU: the platform
    kind and arch are forced, the adapters are wrapped for the CPU instead of the GPU)."""
    import functools

    from conformance.subjects import vllm as vsub

    monkeypatch.setattr(vsub, "_on_device", functools.partial(vsub._on_device, device="cpu"))
    dev = vsub.VllmSubject()
    dev.kind = "rocm"
    monkeypatch.setattr(dev, "table_platform", lambda: "rocm-gfx942")
    sim = vs.VllmSimSubject("gfx942")
    monkeypatch.setattr(dev, "dispatch_context", lambda: dict(sim.ctx))
    got = {k: v.function for k, v in dev.provides().items()}
    assert got == {k: v.function for k, v in sim.provides().items()}
    assert set(dev.not_provided()) == set(sim.not_provided())
    prod, cons = dev.dialect_probes()
    assert set(prod) == set(cons) == set(sim.dialect_probes()[0])


# ------------------------------------------------------------------ the ROCm fallbacks bound in the sim-cover pass
# (issue #15): every component gfx942 runs through a vLLM Python / Triton function off AITER is bound; the rest stay
# "not provided" with the row's reason (AITER, a compiled HIP op, triton_kernels), never a pass.
NEW_ROWS = {"mhc.head": "hc_head_triton", "attn.output": "output_projection_rocm",
            "indexer.scores": "indexer_scores_prefill", "compressor.kv": "compress_rocm",
            "linear.fp8_block": "fp8_block_linear_rocm", "attn.index_set": "index_set_rocm",
            "embed": "embedding_rocm"}
DEVICE_ONLY = {"quant.act_fp8": bindings.HIP_OP, "moe.router": bindings.MOE_OP, "moe.hash_router": bindings.MOE_OP,
               "norm.rms": bindings.HIP_OP, "norm.head": bindings.HIP_OP, "indexer.topk": bindings.HIP_OP,
               "moe.shared_expert": bindings.HIP_OP, "head.lm": bindings.HIP_OP, "attn.kv_insert": bindings.HIP_OP,
               "attn.q_path": bindings.HIP_OP}


@pytest.fixture(scope="module")
def sim_noaiter():
    try:
        return vs.VllmSimSubject("gfx942", env={"DSV4_SIM_AITER": "0"})
    except SubjectError as e:
        pytest.skip(f"sim subject unavailable in this process: {e}")


def test_sim_cover_binds_the_rocm_fallbacks(sim):
    p, miss = sim.provides(), sim.not_provided()
    for name, adapter in NEW_ROWS.items():
        if sim.arch == "gfx950" and name == "attn.output":   # gfx950: AITER's FP8 wo_a BMM (FP8BMM default on)
            assert bindings.AITER_ONLY in miss[name]
            continue
        b = bindings.select(sim.platform_kind, name, sim.ctx)
        assert name in p and b.adapter == adapter, (name, miss.get(name))
    for name, why in DEVICE_ONLY.items():
        assert name in miss and why in miss[name], (name, miss.get(name))
    for name in ("moe.experts", "moe.layer"):
        assert "triton_kernels" in miss[name]
    # aiter installed (the default): mHC goes to AITER, never bound
    assert bindings.AITER_ONLY in miss["mhc.pre"] and bindings.AITER_ONLY in miss["mhc.post"]


def test_sim_cover_env_flag_moves_rows_to_aiter():
    s = vs.VllmSimSubject("gfx942", env={"DSV4_SIM_AITER": "1", "VLLM_ROCM_USE_AITER": "1"})
    miss = s.not_provided()
    for name in ("indexer.scores", "quant.act_fp8", "linear.fp8_block", "attn.q_path"):
        assert bindings.AITER_ONLY in miss[name], miss[name]
    assert "attn.output" in s.provides() and "compressor.kv" in s.provides()   # no AITER row on gfx942


def test_without_aiter_mhc_post_binds_the_torch_fallback_and_runs_it(sim_noaiter):
    p = sim_noaiter.provides()
    assert p["mhc.post"].function.startswith("vllm.model_executor.kernels.mhc.torch.mhc_post_torch")
    seen = _witness(sim_noaiter, "mhc.post")
    assert "mhc_post_torch" in seen and "mhc_post_cpu" not in seen


# a row naming a function the adapter does not run (the decode kernel, the two-stage compressor, TileLang, the
# gfx950 MXFP8 epilogue, the CPU op): the witness must see it missing
WRONG_RUNS = {"indexer.scores": ("rocm_fp8_paged_mqa_logits_triton", "_fp8_paged_mqa_logits_decode_kernel"),
              "compressor.kv": ("_launch_two_stage_sparse_attn_compressor",),
              "mhc.head": ("hc_head_fused_kernel_tilelang",),
              "attn.output": ("rocm_inverse_rope_mxfp8_rows", "_inverse_rope_mxfp8_quant_kernel"),
              "mhc.post": ("mhc_post_cpu",),
              # the Triton twin of the compiled activation quant (one ulp off at ties) must not be what runs
              "linear.fp8_block": ("_per_token_group_quant_fp8",),
              # the AITER ragged prefill's index builder; the shared (NVIDIA / XPU) combine kernel
              "attn.index_set": ("compute_global_topk_ragged_indices_and_indptr", "CombineTopkSwaIndicesKernel"),
              "embed": ("get_masked_input_and_mask",)}


@pytest.mark.parametrize("name", sorted(WRONG_RUNS))
def test_mutant_sim_cover_row_naming_the_wrong_function_is_caught(name, sim_noaiter):
    seen = _witness(sim_noaiter, name)
    assert not [r for r in WRONG_RUNS[name] if r in seen], f"{name}: the adapter ran {WRONG_RUNS[name]}?"
    b = bindings.select(sim_noaiter.platform_kind, name, sim_noaiter.ctx)
    assert not [r for r in b.runs if r not in seen]


def test_mutant_adapter_bypassing_the_dispatcher_is_caught(monkeypatch, sim_noaiter):
    """An indexer adapter that calls the torch leaf directly (skipping rocm_fp8_mqa_logits, i.e. not what the
    dispatch picks) loses the dispatcher from the witness."""
    import vllm.v1.attention.ops.rocm_aiter_mla_sparse as rams

    from conformance.subjects import _vllm_rocm_adapters as ra

    monkeypatch.setitem(ra.OVER, "rocm_fp8_mqa_logits", rams.fp8_mqa_logits_torch)
    s = vs.VllmSimSubject("gfx942", env={"DSV4_SIM_AITER": "0"})
    b = bindings.select(s.platform_kind, "indexer.scores", s.ctx)
    seen = _witness(s, "indexer.scores")
    assert "rocm_fp8_mqa_logits" in b.runs and "rocm_fp8_mqa_logits" not in seen


def test_sim_platform_sets_the_import_time_fp8_dtype():
    import torch
    import vllm.v1.attention.ops.rocm_aiter_mla_sparse as rams

    before = rams.FP8_DTYPE
    with vs.SimPlatform("gfx942"):
        assert rams.FP8_DTYPE == torch.float8_e4m3fnuz
    with vs.SimPlatform("gfx950"):
        assert rams.FP8_DTYPE == torch.float8_e4m3fn
    assert rams.FP8_DTYPE == before


def test_interpreter_int_mask_fix():
    """A scalar i1 mask broadcast to a block (vLLM's _cp_gather_indexer_quant_cache_kernel stores with one):
    the interpreter's C++ store rejects it as int32 unless the int-mask fix casts it to bool."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def k(x, o, n):
        t = tl.program_id(0)
        ok = (t < n) & (t >= 0)
        off = tl.arange(0, 8)
        tl.store(o + t * 8 + off, tl.load(x + off), mask=ok)

    x, o = torch.arange(8.0), torch.zeros(16)
    k[(2,)](x, o, 1)
    assert o[:8].tolist() == x.tolist() and not o[8:].any()


def test_negative_zero_reaches_gfx942_indexer_logits_as_nan():
    """Issue 21: the gfx942 indexer K cache is written in OCP (tiny negatives -> 0x80, -0) and read as fnuz
    (0x80 = NaN): under vllm:sim-gfx942 every probe logit of the key is NaN. Quiet where writer and reader agree:
    gfx950 (OCP both) reads -0 as zero; gfx942's fnuz writers emit no 0x80."""
    from conformance.checks.dialect.negzero import negative_zero_probe
    from conformance.subjects import load_subject

    p942, c942 = load_subject("vllm:sim-gfx942").dialect_probes()
    bad = negative_zero_probe(p942["indexer_k->logits"], c942["indexer_k->logits"])
    assert bad["verdict"] == "NaN reaches the reader" and bad["codes_0x80"] == bad["tiny_negatives"], bad
    assert bad["nan_read"] == 128                           # every one-hot query's logit of that key
    ok_fnuz = negative_zero_probe(p942["swa_cache->sparse_attn"], c942["swa_cache->sparse_attn"])
    assert ok_fnuz["codes_0x80"] == 0 and ok_fnuz["nan_read"] == 0
    p950, c950 = load_subject("vllm:sim-gfx950").dialect_probes()
    ok = negative_zero_probe(p950["indexer_k->logits"], c950["indexer_k->logits"])
    assert ok["verdict"] == "-0 read as zero" and ok["codes_0x80"] > 0, ok


# ------------------------------------------------------------------ graph capture wiring (issue #20, item 4)
def test_sim_graph_cases_are_the_functions_the_table_binds(sim):
    """The simulated arch exposes the graph cases a ROCm device run captures, named by the rows it binds."""
    rows = sim.bound_rows()
    cases = {c.name: c for c in sim.graph_cases()}
    assert set(cases) == {"vllm_sparse_decode", "vllm_routing_metadata"}
    for c in cases.values():
        assert c.function == f"{rows[c.component].function} [{rows[c.component].backend}]"
    assert "_sparse_attn_decode_ragged_kernel" in cases["vllm_sparse_decode"].function
    assert "quantize_and_insert_k_kernel" in cases["vllm_sparse_decode"].function


def test_sim_graph_cases_follow_a_changed_table_row(monkeypatch):
    """Mutant: the table binds attn.sparse to an AITER kernel -> no sparse-decode graph case is offered (the cases
    come from the rows, not from a fixed list)."""
    sim = vs.VllmSimSubject("gfx942")
    real = sim.bound_rows()
    row = real["attn.sparse"]
    import dataclasses

    aiter = dataclasses.replace(row, function="aiter.mla.mla_decode_fwd", backend="aiter")
    monkeypatch.setattr(sim, "bound_rows", lambda: dict(real, **{"attn.sparse": aiter}))
    assert [c.name for c in sim.graph_cases()] == ["vllm_routing_metadata"]


def test_sim_graph_rows_need_a_gpu_and_say_no_hip_graph_was_replayed(sim, monkeypatch):
    from conformance.checks import graph

    monkeypatch.setattr(graph, "graph_device_available", lambda: False)
    spec = sim.name
    monkeypatch.setitem(graph._SUBJECT_CASES, spec, {c.name: c for c in sim.graph_cases()})
    reps = graph.run_subject(spec)
    rows = [r for rep in reps for r in rep.to_rows()]
    full = [r for r in rows if r.params.get("mode") == "full"]
    assert full and all(r.verdict == "needs-gpu" for r in full)
    for r in rows:
        graph.needs_gpu_note(r, sim.arch)
    for r in full:
        assert f"SIMULATED {sim.arch}: no HIP graph was replayed" in r.message, r.message
        assert "_sparse_attn_decode_ragged_kernel" in r.message or "_make_bitmatrix_metadata_pow2_safe" in r.message
    assert not any(r.verdict == "pass" for r in rows)


def test_device_run_offers_the_same_graph_cases_as_the_simulation(monkeypatch):
    """`vllm` on a ROCm GPU (forced here without one) offers the same graph cases, with the same functions."""
    import torch

    from conformance.subjects import vllm as vsub

    dev = vsub.VllmSubject()
    assert dev.graph_cases() == [] or dev.kind != "cpu"       # vLLM's CPU build: nothing to capture
    sim = vs.VllmSimSubject("gfx942")
    dev.kind = "rocm"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dev, "table_platform", lambda: "rocm-gfx942")
    monkeypatch.setattr(dev, "dispatch_context", lambda: dict(sim.ctx))
    with vs.SimPlatform("gfx942"):
        got = {c.name: c.function for c in dev.graph_cases()}
    assert got == {c.name: c.function for c in sim.graph_cases()}


def test_mutant_index_set_adapter_calling_the_shared_combine_is_caught(monkeypatch, sim_noaiter):
    """gfx942's prefill calls amd.rocm's own combine_topk_swa_indices (its kernel clamps the SWA run to the
    gathered rows); an adapter driving the shared common.ops.cache_utils one loses the AMD kernel from the
    witness."""
    from vllm.models.deepseek_v4.common.ops import cache_utils

    from conformance.subjects import _vllm_rocm_adapters as ra

    def shared(top, qsl, seq, gat, window, ratio, top_k, M, N):
        return cache_utils.combine_topk_swa_indices(top, qsl, seq, gat, window, ratio, top_k, M, N)

    monkeypatch.setitem(ra.OVER, "combine_topk_swa_indices", shared)
    b = bindings.select(sim_noaiter.platform_kind, "attn.index_set", sim_noaiter.ctx)
    seen = _witness(vs.VllmSimSubject("gfx942", env={"DSV4_SIM_AITER": "0"}), "attn.index_set")
    assert "_combine_topk_swa_indices_kernel" in b.runs and "_combine_topk_swa_indices_kernel" not in seen


def test_fp8_linear_without_the_fnuz_weight_normalisation_is_caught(monkeypatch):
    """gfx942 loads the OCP checkpoint through process_fp8_weight_block_strategy (bytes reinterpreted, e8m0
    exponent + 1). A load that reinterprets the bytes but keeps the scales reads every weight at half its value:
    the numeric check fails it against the golden and the gfx942 emulation; the real load passes."""
    import torch

    from conformance.checks.numeric import run_numeric
    from conformance.subjects import _vllm_rocm_adapters as ra

    case = _small_case("linear.fp8_block")
    s = vs.VllmSimSubject("gfx942", env={"DSV4_SIM_AITER": "0"})
    assert {r.verdict for r in run_numeric(s, case)} == {"pass"}
    monkeypatch.setitem(ra.OVER, "process_fp8_weight_block_strategy",
                        lambda w, ws: (w.view(torch.uint8).view(torch.float8_e4m3fnuz), ws))
    s = vs.VllmSimSubject("gfx942", env={"DSV4_SIM_AITER": "0"})
    rows = run_numeric(s, case)
    assert rows and all(r.verdict in ("fail", "catastrophic") for r in rows), [(r.level, r.verdict) for r in rows]


def test_coverage_command_prints_each_selected_row(capsys):
    """python -m conformance coverage --subject vllm:sim-gfx942: one well-formed markdown row per component
    (pipes inside a function name escaped), with the selected row's function and backend."""
    import re

    from conformance.cli import main

    assert main(["coverage", "--subject", "vllm:sim-gfx942"]) == 0
    out = capsys.readouterr().out
    s = vs.VllmSimSubject("gfx942")
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| component")]
    assert len(rows) == len(NAMES)
    for ln in rows:
        cells = re.split(r"(?<!\\)\|", ln)[1:-1]
        assert len(cells) == 4, ln
        name = cells[0].strip()
        b = bindings.select(s.platform_kind, name, s.ctx)
        assert cells[1].strip().strip("`").replace("\\|", "|") == b.function, ln
        backend = "triton-interpreter" if (b.backend == "triton" and name in s.provides()) else b.backend
        assert cells[2].strip() == backend, ln


def test_v41_32x32_linear_rows_run_vllms_mxfp8_emulation_kernel_on_gfx942(sim):
    """linear.fp8_block's V4.1 rows (wb32): on gfx942 vLLM's own KMxfp8Static scale loader (the row-wise repeat of
    the 32x32 grid) and EmulationMxfp8LinearKernel run, not the block-FP8 Triton GEMM; on gfx950 the native
    tl.dot_scaled kernel is not interpretable: Unsupported with the reason."""
    from conformance.subjects.base import Unsupported

    case = min((c for c in cases_for("linear.fp8_block") if "/wb32/" in c.id), key=lambda c: len(c.id))
    impl = sim.provides()["linear.fp8_block"]
    kw = case.make_inputs()
    if sim.arch == "gfx950":
        with pytest.raises(Unsupported, match="RocmDotScaledMxfp8LinearKernel"):
            impl.fn(**kw)
        return
    out, seen = vs.executed_vllm_functions(impl.fn, **kw)
    assert {"scaled_loader", "process_weights_after_loading", "apply_weights", "dequant_mxfp8_to_bf16"} <= seen, \
        sorted(seen)
    assert "_w8a8_triton_block_scaled_mm" not in seen and "process_fp8_weight_block_strategy" not in seen
    want = fp8_linear_golden_bf16(kw)
    assert torch.equal(out["y"], want)


def fp8_linear_golden_bf16(kw):
    """What EmulationMxfp8LinearKernel computes, by the harness: golden weights (exact in bf16), bf16 GEMM."""
    from conformance.cases.linear import W_SPECS
    from references.formats.blockscale import dequantize_fp8

    w = dequantize_fp8(kw["weight"], kw["weight_scale"], W_SPECS[32]).to(torch.bfloat16)
    return torch.nn.functional.linear(kw["x"].to(torch.bfloat16), w).float()


def test_v41_lagged_mhc_pre_binds_mhc_pre_delayed_torch_without_aiter_and_runs_it(sim_noaiter):
    """mhc.pre_lagged on gfx942 without aiter: MHCPreDelayedOp.forward_hip's fallback, mhc_pre_delayed_torch."""
    b = bindings.select(sim_noaiter.platform_kind, "mhc.pre_lagged", sim_noaiter.ctx)
    assert b.adapter == "hc_pre_delayed_torch"
    seen = _witness(sim_noaiter, "mhc.pre_lagged")
    assert "mhc_pre_delayed_torch" in seen and "mhc_pre_torch" not in seen, sorted(seen)


def test_v41_compressor_rows_run_vllms_v41_kernels(sim_noaiter):
    """compressor.kv's V4.1 rows on the sim: models/deepseek_v41's fused_save_compress_norm (its Triton kernel
    interpreted) and rope_quant_insert run, not the V4 compressor's kernels; the entries match the emulation."""
    from conformance.checks.numeric import run_numeric

    case = next(c for c in cases_for("compressor.kv") if "/v41-r2/t3hd" in c.id)
    impl = sim_noaiter.provides()["compressor.kv"]
    _, seen = vs.executed_vllm_functions(impl.fn, **case.make_inputs())
    assert {"fused_save_compress_norm", "_fused_save_compress_norm_kernel", "rope_quant_insert",
            "_rope_quant_insert_kernel"} <= seen, sorted(seen)
    assert "compress_norm_rope_store_triton" not in seen and "_save_partial_states_kernel" not in seen
    rows = run_numeric(sim_noaiter, case)
    assert {r.level for r in rows} == {"serving", "emulated"} and all(r.verdict == "pass" for r in rows)


def test_mutant_v41_rope_insert_told_ratio_1_on_a_ratio2_row_is_caught(sim_noaiter, monkeypatch):
    """vLLM's rope_quant_insert launched with COMPRESS_RATIO 1 on a ratio-2 row: the boundary token's RoPE lands at
    its own position 2i + 1 instead of the pair's first, 2i (the slots still pick the right tokens): the rows fail
    against the emulation and the golden; the real launch passed above."""
    from conformance.checks.numeric import run_numeric
    from conformance.subjects import _vllm_rocm_adapters as ra

    real = ra._vllm("rope_quant_insert")
    monkeypatch.setitem(ra.OVER, "rope_quant_insert",
                        lambda latent, pos, cs, cache, slots, ratio, **kw: real(latent, pos, cs, cache, slots, 1, **kw))
    case = next(c for c in cases_for("compressor.kv") if "/v41-r2/t3hd" in c.id)
    rows = run_numeric(sim_noaiter, case)
    bad = [r for r in rows if r.verdict in ("fail", "catastrophic")]
    assert {r.level for r in bad} == {"serving", "emulated"}, [r.message for r in rows]
    assert all("entries" in r.message and r.worst.get("index") is not None for r in bad)
