"""The end-to-end per-layer comparison names the layer and component of a deliberately broken vLLM op, and
passes the unbroken run (tiny bf16 checkpoint through vllm.LLM on the CPU, 20-token prompt).

Skipped where vLLM is not installed. vllm is never imported before the Triton stand-in is registered
(conformance.subjects._vllm_common.import_vllm does it), so no pytest.importorskip("vllm").
"""

import pytest
import torch

from ._require import require_vllm_cpu_e2e

require_vllm_cpu_e2e()


@pytest.fixture(scope="module")
def setup(tiny_bf16_ckpt):
    from references.config import TINY

    ckpt, weights = tiny_bf16_ckpt
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(2, TINY.vocab_size, (20,), generator=g).tolist()
    return str(ckpt), weights, TINY, prompt


def _first(setup, mutate=None):
    from conformance.checks import e2e, e2e_vllm

    ckpt, weights, cfg, prompt = setup
    try:
        runs, _ = e2e_vllm.run_prompts(ckpt, [prompt], max_tokens=2, mutate=mutate)
    except RuntimeError as err:
        if "one vLLM engine per process" in str(err):
            pytest.skip("another test of this process started a vLLM engine on another checkpoint")
        raise
    _, first = e2e.layer_rows_data(runs[0].layers, weights, cfg, torch.tensor(prompt))
    return first


def _patch(module, fn):
    """Shadow the module's forward on the instance (hooks still fire); the undo removes the shadow."""
    assert "forward" not in vars(module)
    module.forward = fn
    return lambda: delattr(module, "forward")


def test_correct_run_passes(setup):
    assert _first(setup) is None


def test_rmsnorm_without_weight_is_named(setup):
    def mutate(model):
        norm = model.model.layers[1].attn_norm
        eps = norm.variance_epsilon if hasattr(norm, "variance_epsilon") else 1e-6

        def broken(x, residual=None):      # drops the weight multiply
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return _patch(norm, broken)

    first = _first(setup, mutate)
    assert first is not None and first[:2] == (1, "attn_in"), first


def test_hc_post_without_block_output_is_named(setup):
    def mutate(model):
        op = model.model.layers[2].mhc_post
        real = op.forward

        def broken(x, residual, post, comb):   # drops the post * F term: residual mixing only
            return real(torch.zeros_like(x), residual, post, comb)
        return _patch(op, broken)

    first = _first(setup, mutate)
    assert first is not None and first[:2] == (2, "after_attn"), first
