"""The tiny-v41 e2e rows (conformance.checks.e2e_v41) catch V4.1 mutants served through the ``e2e_serve_v41`` plugin
hook, with the right first divergence; the golden server passes; vLLM / transformers rows say why they are absent."""

import pytest

from conformance.checks import e2e_v41 as V
from tests.harness import e2e_subjects_v41 as E


@pytest.fixture(scope="module")
def ckdir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e-v41")


def _rows(subj, ckdir, **kw):
    return {r.case_id: r for r in V.run_e2e_v41(subj.name, subj.e2e_serve_v41, subj.info(), out_dir=ckdir,
                                                max_tokens=3, **kw)}


def test_golden_v41_server_passes_every_row(ckdir):
    rows = _rows(E.golden_v41_server(), ckdir)
    assert set(rows) == {"e2e-v41/p150/logits", "e2e-v41/p150/greedy", "e2e-v41/p150/layers"}
    assert {r.verdict for r in rows.values()} == {"pass"}, {k: r.message for k, r in rows.items()}


def test_own_topk_at_a_reader_layer_is_caught_at_that_layer_in_attention(ckdir):
    rows = _rows(E.own_topk_v41_server(), ckdir)
    lay = rows["e2e-v41/p150/layers"]
    assert lay.verdict == "fail", lay.message
    assert lay.worst["layer"] == 3 and lay.worst["component"] == "attn_out", lay.message
    assert "first divergence at layer 3, component attn_out" in lay.message


def test_per_sublayer_hc_pre_is_caught_at_layer_0(ckdir):
    rows = _rows(E.per_sublayer_hc_v41_server(), ckdir)
    lay = rows["e2e-v41/p150/layers"]
    assert lay.verdict == "fail" and rows["e2e-v41/p150/logits"].verdict == "fail", lay.message
    assert lay.worst["layer"] == 0 and lay.worst["component"] == "attn_pre", lay.message


def test_malformed_return_is_one_failing_row(ckdir):
    subj = E.golden_v41_server()

    def serve(ck, prompts, *, max_tokens):
        out = subj.e2e_serve_v41(ck, prompts, max_tokens=max_tokens)
        out[0].layers = out[0].layers[:-1]
        return out
    rows = {r.case_id: r for r in V.run_e2e_v41(subj.name, serve, subj.info(), out_dir=ckdir, max_tokens=2)}
    assert set(rows) == {"e2e-v41/p150/serve"} and rows["e2e-v41/p150/serve"].verdict == "fail"
    assert "layers: expected 5 traces, got 4" in rows["e2e-v41/p150/serve"].message


@pytest.mark.parametrize("subject,why", [("vllm", "cannot serve deepseek_v41 on the CPU"),
                                         ("vllm:sim-gfx942", "tilelang"),
                                         ("transformers", "transformers 5.19.0 has no deepseek_v41")])
def test_engine_rows_say_why_they_are_not_provided(subject, why):
    assert why in V.not_provided_reason(subject)
    assert V.builtin_server(subject) is None
