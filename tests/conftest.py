"""The harness's own tests: one torch thread per test process (pytest-xdist gives one process per core;
tiny tensors are many times slower when two OpenMP pools fight over two cores)."""

import importlib.util

import pytest
import torch

# Where vLLM is installed, tests/vllm need Triton's interpreter, which can only be installed before anything
# imports triton (transformers does, in other test modules of the same worker): do it at collection start.
if importlib.util.find_spec("vllm") is not None:
    from conformance.subjects import prepare_process

    prepare_process(["vllm"])


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
