"""Broken vLLM functions planted into the vllm / vllm-triton subjects must be caught, with the component and
the vLLM function named; an uncorrected Triton interpreter must make vllm-triton refuse.

Skipped where vLLM is not installed (CI). Not pytest.importorskip("vllm"): importing vllm before the
Triton stand-in is registered would disable Triton for the whole process, so the import goes through
conformance.subjects._vllm_common.import_vllm.
"""

import importlib.util

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed in this Python (vLLM subjects are exercised by nox -s cpu)",
                allow_module_level=True)

import torch  # noqa: E402

from conformance.cases import cases_for  # noqa: E402
from conformance.checks.numeric import run_numeric  # noqa: E402
from conformance.subjects import SubjectError, load_subject  # noqa: E402


def _fails(rows):
    from conformance.results import FAILING
    return [r for r in rows if r.verdict in FAILING]


def _case(component, pred):
    cs = [c for c in cases_for(component) if pred(c.id)]
    assert cs, f"no {component} case matching"
    return cs[0]


def _explain(rows):
    return "\n".join(f"{r.verdict}: {r.component} [{r.function}] {r.message}" for r in rows)


@pytest.mark.usefixtures("needs_vllm_triton")
def test_fnuz_k_cache_reader_with_wrong_fp8_type_is_caught():
    from conformance.subjects import vllm_triton as vt

    subj = load_subject("vllm-triton:gfx942")
    case = _case("attn.sparse", lambda i: "t33" not in i)
    assert not _fails(run_numeric(subj, case)), "unpatched kernel must pass this case"
    real = vt._K.get("_sparse_attn_decode_ragged_kernel")

    class OcpReader:  # reads the fnuz K-cache bytes as OCP e4m3fn
        def __getitem__(self, grid):
            return lambda *a, **kw: real[grid](*a, **dict(kw, IS_FNUZ_MAIN=False))

    vt._K.over["_sparse_attn_decode_ragged_kernel"] = OcpReader()
    try:
        rows = _fails(run_numeric(subj, case))
    finally:
        vt._K.over.clear()
    assert rows, "the fnuz K-cache reader bit-casting with the OCP type went unnoticed"
    r = rows[0]
    assert r.component == "attn.sparse" and "attn.sparse" in r.message
    assert "_sparse_attn_decode_ragged_kernel" in r.function, _explain(rows)


@pytest.mark.usefixtures("needs_vllm_triton")
@pytest.mark.parametrize("planted,expect", [({"use_fnuz": False}, "codes"), ({"fp8_max": 240.0}, "scales")],
                         ids=["ocp-bytes-in-fnuz-pool", "fmax240-for-224"])
def test_swa_writer_planted_launch_errors_are_caught(planted, expect):
    """attn.kv_insert on vllm-triton:gfx942: vLLM's K-cache writer passes unpatched, on the high-block case too (a
    sparse pool past 2^31 bytes); launched with OCP bytes or fp8 max 240 instead of the wrapper's 224, the bytes
    differ from the emulation's and the row names the output."""
    from conformance.subjects import vllm_triton as vt

    subj = load_subject("vllm-triton:gfx942")
    case = _case("attn.kv_insert", lambda i: "b57400" in i and "fnuz224" in i)
    rows = run_numeric(subj, case)
    assert [r.verdict for r in rows] == ["pass", "pass"], _explain(rows)
    real = vt._K.get("quantize_and_insert_k_kernel")

    class Planted:
        def __getitem__(self, grid):
            return lambda *a, **kw: real[grid](*a, **dict(kw, **planted))

    vt._K.over["quantize_and_insert_k_kernel"] = Planted()
    try:
        rows = _fails(run_numeric(subj, case))
    finally:
        vt._K.over.clear()
    assert rows and rows[0].component == "attn.kv_insert", "the planted writer went unnoticed"
    assert rows[0].worst.get("output") == expect or expect in rows[0].message, _explain(rows)
    assert "quantize_and_insert_k_kernel" in rows[0].function


@pytest.mark.usefixtures("needs_vllm_triton")
def test_vllm_cpu_q_path_passes_and_a_planted_zero_position_is_caught(monkeypatch):
    """attn.q_path on vllm (CPU): q_norm by RMSNorm.forward_native, head norm + RoPE by fused_qnorm_rope_kv_insert_cpu
    pass both levels; the op handed position 0 for every token (RoPE skipped) fails, naming the component."""
    from conformance.subjects import _vllm_adapters as va

    subj = load_subject("vllm")
    case = _case("attn.q_path", lambda i: "/t33" in i)
    rows = run_numeric(subj, case)
    assert [r.verdict for r in rows] == ["pass", "pass"], _explain(rows)
    assert "fused_qnorm_rope_kv_insert_cpu" in rows[0].function
    orig = va.OPS

    class Ops:
        def __getattr__(self, name):
            f = getattr(orig, name)
            if name != "fused_qnorm_rope_kv_insert_cpu":
                return f
            return lambda q, kv, pos, *a: f(q, kv, torch.zeros_like(pos), *a)

    monkeypatch.setattr(va, "OPS", Ops())
    rows = _fails(run_numeric(subj, case))
    assert rows and rows[0].component == "attn.q_path" and "attn.q_path" in rows[0].message, _explain(rows)


@pytest.mark.usefixtures("needs_vllm_triton")
def test_vllm_cpu_swa_writer_flushes_subnormal_codes_in_kv_insert():
    """The known CPU finding (conformance.findings: fp8_ds_mla writers flush e4m3 subnormals) seen by attn.kv_insert:
    fused_qnorm_rope_kv_insert_cpu passes the serving bound and the untouched / padding checks, and at the emulated
    level its codes differ only where the emulation writes a subnormal (or rounds up to the smallest normal 2^-6
    from below it): vLLM writes +-0 there. Listed in ci/expected-failures.toml."""
    from conformance.cases.qkv import _emulate_kv_insert

    subj = load_subject("vllm")
    case = _case("attn.kv_insert", lambda i: "t40d256" in i and "/s2" in i)
    rows = {r.level: r for r in run_numeric(subj, case)}
    assert rows["serving"].verdict == "pass", rows["serving"].message
    emu = rows["emulated"]
    assert emu.verdict == "fail" and emu.extra["outputs"] == {"kv": "pass", "untouched": "pass", "codes": "fail",
                                                             "scales": "pass", "rope": "pass"}, emu.extra
    kw = case.make_inputs()
    got = subj.provides()["attn.kv_insert"].fn(**kw)["codes"]
    want = _emulate_kv_insert("ocp")(**kw)["codes"]
    diff = got != want
    assert diff.any()
    assert ((got[diff] & 0x7F) == 0).all(), got[diff]               # written as +0 / -0
    assert ((want[diff] & 0x7F) <= 0x08).all(), want[diff]          # subnormal codes (or 2^-6) in the emulation


@pytest.mark.usefixtures("needs_vllm_triton")
def test_indexer_q_fmax_448_under_gfx942_is_caught():
    from conformance.metrics import compare_float
    from conformance.subjects import vllm_triton as vt
    from conformance.subjects.vllm import Candidate  # noqa: F401  (import check)
    from conformance.tolerances import Tolerance
    from references.components.indexer import indexer_q
    from references.components.rope import rope_inv_freq
    from references.config import RopeScaling

    p = vt.PROFILES["gfx942"]
    g = torch.Generator().manual_seed(0)
    T, H, hd = 3, 4, 128
    qr = torch.randn(T, 64, generator=g)
    wq_b = torch.randn(H * hd, 64, generator=g) / 8
    pos = torch.tensor([1, 50, 700])
    inv = rope_inv_freq(64, 160000.0, RopeScaling())
    want = indexer_q(qr, wq_b, pos, inv, n_heads=H, head_dim=hd)
    # FP8 budget: 2^-4 of the (token, head) amax (scale power-of-two rounding up, then e4m3 half-ulp) + bf16
    tol = Tolerance(0.0, 2.0 ** -4 + 2.0 ** -7, "e4m3 half-ulp at the row's power-of-two scale + bf16 input")
    scale = want.abs().amax(-1, keepdim=True).expand_as(want)
    fn = vt.make_indexer_q(p)
    ok = compare_float(fn(qr, wq_b, pos, inv, n_heads=H, head_dim=hd)["q"], want, tol, output="q",
                       scale=scale, label="indexer.q FusedIndexerQRopeQuantTritonKernel")
    assert ok.verdict != "fail", ok.message
    real = vt._K.get("indexer_q")
    vt._K.over["indexer_q"] = lambda *a, fp8_max, use_fnuz: real(*a, fp8_max=448.0, use_fnuz=use_fnuz)
    try:
        bad = compare_float(fn(qr, wq_b, pos, inv, n_heads=H, head_dim=hd)["q"], want, tol, output="q",
                            scale=scale, label="indexer.q FusedIndexerQRopeQuantTritonKernel")
    finally:
        vt._K.over.clear()
    assert bad.verdict in ("fail", "catastrophic"), "indexer q quantised with fmax 448 in fnuz went unnoticed"
    assert "indexer.q" in bad.message and "FusedIndexerQRopeQuantTritonKernel" in bad.message


def test_compressor_pairing_current_window_first_half_is_caught():
    from conformance.subjects import _vllm_adapters as ad

    subj = load_subject("vllm")
    case = _case("compressor.kv", lambda i: "/csa/" in i and "hd512" in i)
    base = run_numeric(subj, case)[:1]  # level 1: against the fp32 golden
    assert base and not _fails(base), _explain(base)
    real = ad.c_op("compress_norm_rope_store_cpu")

    def current_first_half(state, gather, positions, kv_slot, w, eps, cs, cache, bs, m):
        if m == 4:  # entry i pools the *current* window's first half twice instead of the previous one's
            gather = torch.cat([gather[:, m:], gather[:, m:]], 1).contiguous()
        return real(state, gather, positions, kv_slot, w, eps, cs, cache, bs, m)

    ad.OPS.patch("compress_norm_rope_store_cpu", current_first_half)
    try:
        rows = _fails(run_numeric(subj, case))
    finally:
        ad.OPS.unpatch("compress_norm_rope_store_cpu")
    assert rows, "the compressor pairing the current window's first half went unnoticed"
    assert rows[0].component == "compressor.kv" and "compressor.kv" in rows[0].message
    assert "compress_norm_rope_store_cpu" in rows[0].function, _explain(rows)


@pytest.mark.usefixtures("needs_vllm_triton")
def test_interpreter_without_fixes_makes_vllm_triton_refuse():
    from conformance import triton_interp
    from conformance.subjects.vllm_triton import VllmTritonSubject

    triton_interp.set_fixes(False)
    try:
        with pytest.raises(SubjectError, match="rounds wrongly"):
            VllmTritonSubject("gfx942")
    finally:
        triton_interp.set_fixes(True)
    assert not any(triton_interp.self_check().values())


@pytest.mark.usefixtures("needs_vllm_triton")
def test_indexer_k_writer_writing_ocp_into_the_fnuz_pool_is_caught_x0_5():
    """vLLM's dedicated indexer-K pair passes the SHUFFLE rows on gfx942 (bytes equal to the emulation's, fmax
    224); the writer planted with the OCP dtype (IS_FNUZ False, fmax 448) while the gather reads fnuz is caught on
    the values with the x0.5 diagnosis."""
    import vllm.v1.attention.ops.rocm_aiter_mla_sparse as rams

    from conformance.subjects import vllm_triton as vt

    subj = load_subject("vllm-triton:gfx942")
    case = _case("indexer.k_cache", lambda i: "/shuffle-fmax-band/" in i)
    assert not _fails(run_numeric(subj, case)), "unpatched kernels must pass this case"
    real = vt._K.get("indexer_k_quant_and_cache_triton")

    def ocp_writer(*a, **kw):
        old = rams.FP8_DTYPE
        rams.FP8_DTYPE = torch.float8_e4m3fn
        try:
            return real(*a, **kw)
        finally:
            rams.FP8_DTYPE = old

    vt._K.over["indexer_k_quant_and_cache_triton"] = ocp_writer
    try:
        rows = _fails(run_numeric(subj, case))
    finally:
        vt._K.over.clear()
    assert rows and all("ratio signature: x0.5" in r.message for r in rows), _explain(rows)
    assert all(r.component == "indexer.k_cache" and "indexer_k_quant_and_cache_triton" in r.function for r in rows)


def test_gpu_subject_does_not_provide_the_indexer_k_pair_it_cannot_load():
    """vllm-triton-gpu loads kernels from vLLM's source files, not the vllm package: the indexer-K writer/gather
    wrappers (package imports) are "not provided" with that reason, never an error row (seen on the H100)."""
    from conformance.cases import cases_for
    from conformance.subjects.base import Unsupported
    from conformance.subjects.vllm_triton import PROFILES, make_indexer_k_cache

    case = next(c for c in cases_for("indexer.k_cache") if "shuffle" in c.id)
    fn = make_indexer_k_cache(dict(PROFILES["ocp"], dev="cuda", src=object()))
    with pytest.raises(Unsupported, match="source bundle"):
        fn(**case.make_inputs())


def _numeric_verdicts(subject, component, fast=True):
    from conformance.cases import cases_for
    from conformance.checks.numeric import run_numeric

    return {c.id: [r.verdict for r in run_numeric(subject, c)] for c in cases_for(component)
            if not fast or c.tier == "fast"}


def test_rocm_index_merge_passes_and_a_window_one_short_is_caught():
    """vllm-triton binds amd.rocm.combine_topk_swa_indices; every fast case passes, and the same function called
    with window_size - 1 (the window loses its oldest row) fails the SWA and CSA cases."""
    from conformance.subjects import load_subject
    from conformance.subjects import vllm_triton as vt

    s = load_subject("vllm-triton:gfx942")
    ok = _numeric_verdicts(s, "attn.index_set")
    assert ok and all(set(v) == {"pass"} for v in ok.values()), ok
    real = vt._K.get("combine_topk_swa_indices")
    vt._K.over["combine_topk_swa_indices"] = lambda top, qsl, seq, gat, window, *a: real(top, qsl, seq, gat,
                                                                                          window - 1, *a)
    try:
        bad = _numeric_verdicts(s, "attn.index_set")
    finally:
        vt._K.over.clear()
    caught = {cid for cid, v in bad.items() if "fail" in v}
    # a window of 127 differs from 128 once the query is past position 126
    assert caught and all(("/swa/" in c or "/csa/" in c or "/hca/" in c) for c in caught)
    assert "attn.index_set/swa/p0-128/r4_0-r128_0/s6" in caught
    assert "attn.index_set/swa/p0-5/r4_1-r128_5/s3" not in caught


def test_block_fp8_gemm_reading_the_next_tokens_activation_scales_is_caught():
    """vLLM's _w8a8_triton_block_scaled_mm launched with the activation scales of the next token (As rolled by
    one row, an off-by-one scale pointer): every multi-token case fails, the one-token case (its own scales)
    passes, and the real launch passes everywhere."""
    import torch

    from conformance.subjects import load_subject
    from conformance.subjects import vllm_triton as vt

    s = load_subject("vllm-triton:ocp")
    ok = _numeric_verdicts(s, "linear.fp8_block")
    # V4.1's 32x32 rows are not this kernel's (MXFP8 in vLLM): reported not provided, never passed
    v41 = {cid: ok.pop(cid) for cid in list(ok) if "/wb32/" in cid}
    assert v41 and all(set(v) == {"not-provided"} for v in v41.values()), v41
    assert ok and all(set(v) == {"pass"} for v in ok.values()), ok
    real = vt._K.get("_w8a8_triton_block_scaled_mm")

    class NextTokensScales:
        def __getitem__(self, grid):
            def launch(A, B, C, As, *a, **kw):
                return real[grid](A, B, C, torch.roll(As, 1, 0).contiguous(), *a, **kw)
            return launch

    vt._K.over["_w8a8_triton_block_scaled_mm"] = NextTokensScales()
    try:
        bad = _numeric_verdicts(s, "linear.fp8_block")
    finally:
        vt._K.over.clear()
    for cid, v in bad.items():
        if "/wb32/" in cid:
            continue
        one_token = "/t1n" in cid
        assert (set(v) == {"pass"}) == one_token, (cid, v)


def test_mtp_head_kernels_pass_and_planted_norm_errors_are_caught():
    """vllm-triton binds vLLM's MTP layer kernels around the block (fused enorm/hnorm, block-FP8 GEMMs, the Triton
    HC head, the shared-head RMSNorm): the fast rows pass, the 'official' rows with a position-0 token are not
    provided (vLLM zeroes that embedding, spec 3.15); the fused input norm launched with enorm and hnorm swapped
    fails every provided row in X, and the shared-head norm launched with a unit weight fails them in the logits."""
    import torch

    from conformance.subjects import load_subject
    from conformance.subjects import vllm_triton as vt

    s = load_subject("vllm-triton:gfx942")
    assert "FusedMTPInputRMSNormKernel" in s.provides()["mtp.head"].function
    cases = [c for c in cases_for("mtp.head") if c.tier == "fast"]
    rows = {c.id: run_numeric(s, c) for c in cases}
    off0 = {cid for cid in rows if "/official/" in cid and "p0d" in cid}
    assert off0 and all({r.verdict for r in rows[cid]} == {"not-provided"} for cid in off0)
    assert all("position-0" in r.message for cid in off0 for r in rows[cid])
    ok = {cid: {r.verdict for r in rs} for cid, rs in rows.items() if cid not in off0}
    assert ok and all(v == {"pass"} for v in ok.values()), ok

    real_in, real_head = vt._K.get("mtp_input_rmsnorm_kernel"), vt._K.get("mtp_shared_head_rmsnorm_kernel")

    class Swapped:
        def __getitem__(self, grid):
            def launch(e, pos, x, enorm, hnorm, *a, **kw):
                return real_in[grid](e, pos, x, hnorm, enorm, *a, **kw)
            return launch

    class UnitWeight:
        def __getitem__(self, grid):
            def launch(h, w, *a, **kw):
                return real_head[grid](h, torch.ones_like(w), *a, **kw)
            return launch

    for key, planted, output in (("mtp_input_rmsnorm_kernel", Swapped(), "X"),
                                 ("mtp_shared_head_rmsnorm_kernel", UnitWeight(), "logits")):
        vt._K.over[key] = planted
        try:
            bad = {c.id: run_numeric(s, c) for c in cases if c.id in ok}
        finally:
            vt._K.over.clear()
        for cid, rs in bad.items():
            fails = _fails(rs)
            assert fails, (key, cid, _explain(rs))
            assert any(r.worst.get("output") == output for r in fails), (key, cid, _explain(fails))


@pytest.mark.usefixtures("needs_vllm_triton")
@pytest.mark.parametrize("planted", [{"use_fnuz": False}, {"quant_block": 32}],
                         ids=["reader-decodes-ocp-on-fnuz", "reader-scale-per-32"])
def test_swa_reader_planted_launch_errors_are_caught_in_kv(planted):
    """attn.kv_insert's kv on vllm-triton:gfx942 is what vLLM's SWA cache reader (DequantizeAndGatherKCacheKernel)
    decodes from the written bytes: unpatched it passes, on the high-block case too; the reader launched with
    use_fnuz=False (the compressed cache's OCP flag on the fnuz SWA cache: values x2) or with 32-value quant blocks
    (a scale per 32 instead of 64) fails in kv while the written bytes still pass."""
    from conformance.subjects import vllm_triton as vt

    subj = load_subject("vllm-triton:gfx942")
    case = _case("attn.kv_insert", lambda i: "b57400" in i and "fnuz224" in i)
    assert "DequantizeAndGatherKCacheKernel" in subj.provides()["attn.kv_insert"].function
    rows = run_numeric(subj, case)
    assert [r.verdict for r in rows] == ["pass", "pass"], _explain(rows)
    real = vt._K.get("dequantize_and_gather_k_kernel")

    class Planted:
        def __getitem__(self, grid):
            return lambda *a, **kw: real[grid](*a, **dict(kw, **planted))

    vt._K.over["dequantize_and_gather_k_kernel"] = Planted()
    try:
        rows = _fails(run_numeric(subj, case))
    finally:
        vt._K.over.clear()
    assert rows and all(r.worst.get("output") == "kv" for r in rows), _explain(rows)


@pytest.mark.usefixtures("needs_vllm_triton")
def test_v41_key_writer_passes_on_ocp_and_its_ocp_bytes_read_x0_5_on_gfx942():
    """indexer.k_latent: vLLM's V4.1 key writer (indexer_k_norm_rope_store) passes both levels under the OCP profile;
    under gfx942 its bytes (tl.float8e4nv, FP8_MAX 448: no fnuz branch) read by the fnuz reader are x0.5, and the row
    says so (the finding, pinned)."""
    case = _case("indexer.k_latent", lambda i: "l2r2/n16" in i)
    rows = run_numeric(load_subject("vllm-triton:ocp"), case)
    assert [r.verdict for r in rows] == ["pass", "pass"], _explain(rows)
    rows = _fails(run_numeric(load_subject("vllm-triton:gfx942"), case))
    assert rows and all("indexer_k_norm_rope_store" in r.function for r in rows), _explain(rows)
    assert all("x0.5: OCP bytes read as fnuz" in r.message for r in rows), _explain(rows)


@pytest.mark.usefixtures("needs_vllm_triton")
def test_v41_candidate_mask_planted_with_blocks_one_entry_long_is_caught(monkeypatch):
    """indexer.topk_two_level: vLLM's candidate kernels pass both levels; _mask_candidates_kernel launched with
    BLOCK_SIZE + 1 (the consumer's blocks no longer the source's) fails on idx, naming the kernel."""
    from vllm.model_executor.kernels.attention.dsa import candidate_blocks as cb

    subj = load_subject("vllm-triton:ocp")
    case = _case("indexer.topk_two_level", lambda i: "synthetic-k40b16/t9n1100" in i)
    rows = run_numeric(subj, case)
    assert [r.verdict for r in rows] == ["pass", "pass"], _explain(rows)
    real = cb._mask_candidates_kernel

    class Planted:   # positional launch: (..., width, nblocks, BLOCK_SIZE, HAS_STARTS, ROW_REPEAT, TILE)
        def __getitem__(self, grid):
            return lambda *a: real[grid](*a[:-4], a[-4] + 1, *a[-3:])

    monkeypatch.setattr(cb, "_mask_candidates_kernel", Planted())
    rows = _fails(run_numeric(subj, case))
    assert rows and all(r.component == "indexer.topk_two_level" for r in rows), _explain(rows)
    assert all("idx" in r.message and "_mask_candidates_kernel" in r.function for r in rows), _explain(rows)
