"""compressor.kv_stream on vllm:sim-gfx942: vLLM's stateful compressor kernels (_SAVE_PARTIAL_STATES_KERNEL +
compress_norm_rope_store_triton / _two_stage_triton, Triton-interpreted) called chunk by chunk on one state cache the
harness poisoned pass the chunked-prefill and verify rows, bit-identical to the same kernels' one-shot run; a runner
that hands every chunk a fresh (poisoned) state block instead of the request's is caught as NaN in the entries the
lost carry feeds. Skipped where vLLM is not installed."""

import importlib.util

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed in this Python (the sim subjects run with nox -s gfx942-sim)",
                allow_module_level=True)

from conformance.subjects import prepare_process  # noqa: E402

prepare_process(["vllm:sim-gfx942"])

from conformance.cases import CASES  # noqa: E402
from conformance.checks.numeric import run_numeric, worst_verdict  # noqa: E402
from conformance.checks.stream import poison_state  # noqa: E402
from conformance.subjects import Impl, Streamed, Subject, load_subject  # noqa: E402

COMP = "compressor.kv_stream"
ROWS = ["compressor.kv_stream/csa/t64hd512/61-3/s310", "compressor.kv_stream/csa/t64hd512/61-1x3/s310",
        "compressor.kv_stream/hca/t259hd512/129-130/s323"]


@pytest.fixture(scope="module")
def sim():
    return load_subject("vllm:sim-gfx942")


def test_vllm_stream_from_a_poisoned_state_passes_and_equals_its_one_shot(sim):
    impl = sim.provides()[COMP]
    assert isinstance(impl.fn, Streamed) and impl.backend == "triton-interpreter"
    for cid in ROWS:
        rows = run_numeric(sim, CASES[cid])
        assert worst_verdict(rows) == "pass", rows[0].message
        assert rows[0].extra["stream_vs_one_shot"]["bit_identical"]["entries"], cid
        assert any("state_cache" in p and "<- NaN" in p for p in rows[0].extra["stream"]["poisoned"])


class FreshStatePerChunk(Subject):
    """The same vLLM kernels, but each chunk gets a new (poisoned) state: the request's carry is lost."""

    name = "mutant:vllm-fresh-state-per-chunk"

    def __init__(self, sim):
        self.sim = sim

    def info(self):
        return self.sim.info()

    def provides(self):
        st = self.sim.provides()[COMP].fn
        box = {}

        def new_state(**kw):
            box["kw"] = kw
            return st.new_state(**kw)

        def step(state, *, start, **kw):
            fresh = st.new_state(**box["kw"])
            poison_state(fresh)
            return st.step(fresh, start=start, **kw)

        return {COMP: Impl(Streamed(new_state, step), function="mutant", backend="triton-interpreter")}


def test_a_runner_that_loses_the_carry_is_caught_as_nan(sim):
    rows = run_numeric(FreshStatePerChunk(sim), CASES["compressor.kv_stream/csa/t64hd512/61-3/s310"])
    assert worst_verdict(rows) in ("fail", "catastrophic"), rows[0].message
    assert "nan" in rows[0].message.lower() and "entries" in rows[0].message
