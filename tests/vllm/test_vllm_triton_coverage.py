"""vllm-triton:<profile>'s coverage: every component it has no Triton adapter for says why, from the binding
table's ROCm row (docs/gfx942-coverage.md)."""

import importlib.util

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed in this Python (vLLM subjects are exercised by nox -s cpu)",
                allow_module_level=True)

pytestmark = pytest.mark.usefixtures("needs_vllm_triton")



@pytest.mark.parametrize("profile", ["gfx942", "ocp"])
def test_every_component_vllm_triton_does_not_provide_says_why(profile):
    """vllm-triton:<profile> names, for each component it has no adapter for, what vLLM's ROCm dispatch runs there
    (the binding row) and whether vllm:sim-<arch> drives it: no row falls back to 'it gave no reason'."""
    from conformance import components
    from conformance.subjects import load_subject

    s = load_subject(f"vllm-triton:{profile}")
    provided, why = set(s.provides()), s.not_provided()
    missing = [n for n in components.load_all() if n not in provided and not why.get(n)]
    assert not missing, missing
    arch = "gfx942" if profile == "gfx942" else "gfx950"
    w = why["indexer.scores"]
    assert f"on rocm-{arch} vLLM runs" in w and f"vllm:sim-{arch} drives it" in w
    # adapted through vllm:sim's ROCm adapters with the Triton kernel lookup (_vllm_triton_rocm)
    assert {"compressor.kv", "compressor.kv_stream", "attn.output", "mhc.head"} <= provided
    assert not provided & set(why), provided & set(why)
