"""A plugin subject that serves a whole model through ``e2e_serve`` gets the built-in e2e rows: logits and greedy
continuation against the fp32 golden, and the teacher-forced per-layer rows with the first divergence (layer and
component). The correct server passes; a wrong weight load is localised to its layer and component; a malformed
return is one failing row naming the field."""

import pytest

from conformance.checks.e2e import run_e2e_served
from tests.harness import e2e_subjects as E

# 20 tokens: the systematic detector needs >= 16 clusters (tokens)
PROMPTS = {"short20": [5, 17, 99, 3, 250, 41, 8, 77, 130, 2, 61, 19, 200, 33, 7, 145, 88, 12, 240, 56]}


def _rows(subj, tmp_path):
    return {r.case_id: r for r in run_e2e_served(subj.name, subj, subj.info(), out_dir=tmp_path, max_tokens=3,
                                                 prompt_set=PROMPTS, platform="cpu")}


@pytest.fixture(scope="module")
def ckdir(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e")


def test_golden_server_passes_every_row(ckdir):
    rows = _rows(E.golden_server(), ckdir)
    assert set(rows) == {"e2e/short20/logits", "e2e/short20/greedy", "e2e/short20/layers"}
    assert {r.verdict for r in rows.values()} == {"pass"}, {k: r.message for k, r in rows.items()}
    assert "every component of every layer within tolerance" in rows["e2e/short20/layers"].message


def test_wrong_weight_load_is_localised_to_its_layer_and_component(ckdir):
    rows = _rows(E.wrong_wo_b_server(), ckdir)
    lay = rows["e2e/short20/layers"]
    assert lay.verdict == "fail", lay.message
    assert lay.worst["layer"] == 1 and lay.worst["component"] == "attn_out", lay.message
    assert "first divergence at layer 1, component attn_out" in lay.message


@pytest.mark.parametrize("factory,why", [
    (E.short_trace_server, "layers: expected 3 traces, got 2"),
    (E.nan_logits_server, "logits: NaN or Inf"),
    (E.truncated_logits_server, "logits: expected [22, "),
    (E.other_prompt_server, "prompt: the hook served"),
])
def test_malformed_return_is_one_failing_row_naming_the_field(ckdir, factory, why):
    rows = _rows(factory(), ckdir)
    assert list(rows) == ["e2e/short20/serve"]
    r = rows["e2e/short20/serve"]
    assert r.verdict == "fail" and why in r.message, r.message


def test_small_systematic_gain_inside_the_bound_is_caught_as_systematic(ckdir):
    rows = _rows(E.small_gain_wo_b_server(), ckdir)
    lay = rows["e2e/short20/layers"]
    assert lay.verdict == "fail", lay.message
    assert lay.worst["layer"] == 1 and lay.worst["component"] == "attn_out", lay.message
    assert lay.worst["rel"] <= lay.worst["bound"] and "systematic gain" in lay.message, lay.message
