"""Root conftest: loads the harness's pytest plugin for both the conformance suite and tests/."""

pytest_plugins = ["conformance.plugin"]


def pytest_configure(config):
    """tests/vllm load the vLLM subjects, which need Triton's interpreter installed before anything in the
    process imports triton; any earlier test (transformers, torch) may import it, so every pytest process
    (xdist workers included) installs it first, where vLLM is installed (conformance.subjects.prepare_process
    does the same for `python -m conformance run`)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        from conformance.subjects._vllm_common import prepare_interpreter

        prepare_interpreter()
