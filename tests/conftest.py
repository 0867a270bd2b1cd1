"""tests/: where vLLM is installed, install Triton's interpreter (conformance.subjects.prepare_process) before any
test module can import triton (transformers does): otherwise an xdist worker that ran a transformers test first
cannot host the vllm-triton subject or vLLM's Triton helpers, and tests/vllm fail depending on the schedule."""

import importlib.util


def pytest_configure(config):
    if importlib.util.find_spec("vllm") is not None:
        from conformance.subjects import prepare_process

        prepare_process(["vllm"])
