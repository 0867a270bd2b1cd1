"""dspark.markov against the installed vLLM: vllm:sim-gfx942 binds DSparkSpeculator._sample_sequential over
vLLM's own DSparkMarkovHead / DSparkConfidenceHead / LogitsProcessor (conformance.subjects._vllm_dspark_adapters),
it passes every fast case (tokens exactly, logits and confidence within the emulated bound), and a planted vLLM
Markov head that embeds the token after the previous one is caught on the logits. Skipped where vLLM is not
installed (CI)."""

import importlib.util

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed in this Python (the sim subjects run with nox -s gfx942-sim)",
                allow_module_level=True)

from conformance.subjects import prepare_process  # noqa: E402

prepare_process(["vllm:sim-gfx942"])

from conformance.cases import cases_for  # noqa: E402
from conformance.checks.numeric import run_numeric, worst_verdict  # noqa: E402
from conformance.subjects import SubjectError, load_subject  # noqa: E402


@pytest.fixture(scope="module")
def sim():
    try:
        return load_subject("vllm:sim-gfx942")
    except SubjectError as e:
        pytest.skip(f"sim subject unavailable in this process: {e}")


FAST = [c for c in cases_for("dspark.markov") if c.tier == "fast"]


def test_sim_binds_the_speculator_and_passes_every_fast_case(sim):
    impl = sim.provides()["dspark.markov"]
    assert "DSparkSpeculator._sample_sequential" in impl.function
    for case in FAST:
        rows = run_numeric(sim, case)
        assert worst_verdict(rows) == "pass", (case.id, [r.message for r in rows if r.verdict != "pass"])


def test_planted_markov_embedding_off_by_one_is_caught(sim, monkeypatch):
    from vllm.model_executor.models.qwen3_dspark import DSparkMarkovHead

    real = DSparkMarkovHead.embed

    def embed_next(self, token_ids):
        return real(self, (token_ids + 1) % self.markov_w1.weight.shape[0])

    monkeypatch.setattr(DSparkMarkovHead, "embed", embed_next)
    caught = False
    for case in FAST:
        rows = run_numeric(sim, case)
        if worst_verdict(rows) in ("fail", "catastrophic"):
            caught = True
            bad = [r for r in rows if r.verdict in ("fail", "catastrophic")]
            assert any("logits:" in r.message and case.id in r.message for r in bad), [r.message for r in bad]
    assert caught


@pytest.fixture(scope="module")
def triton_subject():
    try:
        return load_subject("vllm-triton:gfx942")
    except SubjectError as e:
        pytest.skip(f"vllm-triton subject unavailable in this process: {e}")


FAST_INPUT = [c for c in cases_for("dspark.input") if c.tier == "fast"]


def test_vllm_triton_block_kernel_passes_every_fast_case(triton_subject):
    impl = triton_subject.provides()["dspark.input"]
    assert "_prepare_dflash_inputs_kernel" in impl.function
    for case in FAST_INPUT:
        rows = run_numeric(triton_subject, case)
        assert worst_verdict(rows) == "pass", (case.id, [r.message for r in rows if r.verdict != "pass"])
    assert "dspark.markov" in triton_subject.not_provided()


def test_block_kernel_launched_with_the_wrong_fill_token_is_caught(triton_subject, monkeypatch):
    from conformance.subjects import _vllm_dspark_adapters as da

    real = da.launch_prepare_dflash_inputs

    def wrong(kernel, *a, noise_token_id, **kw):   # e.g. mask_token_id resolved before dspark_noise_token_id
        return real(kernel, *a, noise_token_id=noise_token_id - 1, **kw)

    monkeypatch.setattr(da, "launch_prepare_dflash_inputs", wrong)
    caught = [c.id for c in FAST_INPUT if worst_verdict(run_numeric(triton_subject, c)) in ("fail", "catastrophic")]
    assert caught == [c.id for c in FAST_INPUT if c.params["block"] > 1]
