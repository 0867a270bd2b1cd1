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
