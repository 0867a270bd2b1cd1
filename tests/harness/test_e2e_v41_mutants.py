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


def test_engram_out_may_be_left_out_on_layers_without_engram_but_not_on_the_engram_layer(ckdir):
    """The hook's contract before Engram was in the checkpoint (no engram_out key) still serves and passes; dropping
    the key on the Engram layer is one failing serve row naming it."""
    subj = E.golden_v41_server()
    eng = set(V.e2e_config().engram_layer_ids)

    def serve(drop_on_engram):
        def f(ck, prompts, *, max_tokens):
            out = subj.e2e_serve_v41(ck, prompts, max_tokens=max_tokens)
            for i, d in enumerate(out[0].layers):
                if (i in eng) == drop_on_engram:
                    d.pop("engram_out")
            return out
        return f
    ok = {r.case_id: r for r in V.run_e2e_v41(subj.name, serve(False), subj.info(), out_dir=ckdir, max_tokens=2)}
    assert {r.verdict for r in ok.values()} == {"pass"}, {k: r.message for k, r in ok.items()}
    bad = {r.case_id: r for r in V.run_e2e_v41(subj.name, serve(True), subj.info(), out_dir=ckdir, max_tokens=2)}
    assert set(bad) == {"e2e-v41/p150/serve"} and "missing ['engram_out']" in bad["e2e-v41/p150/serve"].message


@pytest.mark.parametrize("subject,why", [("vllm", "cannot serve deepseek_v41 on the CPU"),
                                         ("vllm:sim-gfx942", "tilelang"),
                                         ("transformers", "transformers 5.19.0 has no deepseek_v41")])
def test_engine_rows_say_why_they_are_not_provided(subject, why):
    assert why in V.not_provided_reason(subject)
    assert V.builtin_server(subject) is None


@pytest.mark.parametrize("server", [E.fnuz_engram_table_v41_server, E.no_engram_table_scale_v41_server])
def test_engram_table_read_wrong_is_caught_at_the_engram_layer(ckdir, server):
    """The written checkpoint's Engram table (layer 1) read in the gfx942 dialect (every value halved) or without
    its UE8M0 scales: the teacher-forced replay names layer 1's engram_out (the first key of an Engram layer), with
    every earlier layer still within its bound; the logits row fails too."""
    cfg = V.e2e_config()
    assert cfg.engram_layer_ids == (1,)
    rows = _rows(server(), ckdir)
    lay = rows["e2e-v41/p150/layers"]
    assert lay.verdict == "fail" and rows["e2e-v41/p150/logits"].verdict == "fail", lay.message
    assert lay.worst["layer"] == 1 and lay.worst["component"] == "engram_out", lay.message
    assert "first divergence at layer 1, component engram_out" in lay.message
    assert all(lay.metrics[k] <= lay.bounds[k] for k in lay.metrics if k.startswith("L0.")), lay.metrics


def test_engram_layer_is_replayed_and_judged(ckdir):
    """The golden server's traces carry engram_out on the Engram layer (None elsewhere), the injection really moves
    the stream, and the layers row judges L1.engram_out against its derived bound."""
    subj = E.golden_v41_server()
    cfg, ck = V.write_tiny_v41(ckdir)
    r = subj.e2e_serve_v41(str(ck), list(V.prompts_v41(cfg).values()), max_tokens=1)[0]
    assert r.layers[0]["engram_out"] is None and r.layers[1]["engram_out"] is not None
    moved = (r.layers[1]["engram_out"] - r.layers[1]["X"]).norm() / r.layers[1]["X"].norm()
    assert moved > 0.1, float(moved)
    rows = _rows(subj, ckdir)
    lay = rows["e2e-v41/p150/layers"]
    assert "L1.engram_out" in lay.metrics and "L0.engram_out" not in lay.metrics
    ce = V.engram_chain(cfg)
    assert ce == 2 * 64 + 256 + 4 and lay.bounds["L1.engram_out"] == 2 * ce * V.U32
    assert lay.bounds["L1.attn_pre"] == V.TOL["attn_pre"][0] + 2 * ce * V.U32


# --- emulated:<profile>: V4.1 serving numerics (references.numerics.serving_v41), judged at the emulated level ------
def _emu_rows(subj, ckdir):
    return {r.case_id: r for r in V.run_e2e_v41(subj.name, subj.e2e_serve_v41, subj.info(), out_dir=ckdir,
                                                max_tokens=3, profile=subj.e2e_v41_profile)}


def _builtin_rows(subject, ckdir):
    serve, judged, why = V.builtin_server(subject)
    assert judged and serve.e2e_v41_profile == subject.split(":")[1]
    return {r.case_id: r for r in V.run_e2e_v41(subject, serve, E.golden_v41_server().info(), out_dir=ckdir,
                                                max_tokens=3, judged=judged, why_not_judged=why,
                                                profile=serve.e2e_v41_profile)}


@pytest.mark.parametrize("subject", ["emulated:gfx942", pytest.param("emulated:ocp", marks=pytest.mark.slow)])
def test_emulated_builtin_layers_pass_at_the_emulated_level(subject, ckdir):
    rows = _builtin_rows(subject, ckdir)
    lay = rows["e2e-v41/p150/layers"]
    assert lay.verdict == "pass", lay.message
    assert lay.params["replay_numerics"] == f"serving-v41:{subject.split(':')[1]}"
    # the shared entries are compared at their source layers (kv sources 1 and 2 of TINY_V41)
    assert {"L1.compressed_kv", "L1.index_k", "L2.compressed_kv"} <= set(lay.metrics), sorted(lay.metrics)
    assert all(lay.metrics[k] <= lay.bounds[k] for k in lay.metrics)
    # logits / greedy: measured against the unquantised golden, not judged, and they say why
    for k in ("e2e-v41/p150/logits", "e2e-v41/p150/greedy"):
        assert rows[k].verdict == "not-run" and "NOT JUDGED: the serving-level logit" in rows[k].message
    # the serving numerics really moved the model away from the golden (the rounding points are live)
    assert rows["e2e-v41/p150/logits"].metrics["max_abs_logit_err"] > 1e-3


def test_latent_stored_fp8_is_caught_at_the_first_index_key_owner(ckdir):
    lay = _emu_rows(E.latent_fp8_v41_server(), ckdir)["e2e-v41/p150/layers"]
    assert lay.verdict == "fail", lay.message
    assert (lay.worst["layer"], lay.worst["component"]) == (1, "index_k"), lay.message
    assert "first divergence at layer 1, component index_k" in lay.message and "serving-v41:gfx942" in lay.message


def test_index_keys_ocp_bytes_read_as_fnuz_are_caught(ckdir):
    lay = _emu_rows(E.keys_ocp_as_fnuz_v41_server(), ckdir)["e2e-v41/p150/layers"]
    assert lay.verdict == "fail", lay.message
    assert (lay.worst["layer"], lay.worst["component"]) == (1, "index_k"), lay.message
    assert abs(lay.worst["rel"] - 0.5) < 1e-6, lay.message      # every key read at half its value


@pytest.mark.slow
def test_v4_block_fp8_in_place_of_mxfp8_is_caught_at_layer_0(ckdir):
    lay = _emu_rows(E.v4_block_fp8_v41_server(), ckdir)["e2e-v41/p150/layers"]
    assert lay.verdict == "fail", lay.message
    assert (lay.worst["layer"], lay.worst["component"]) == (0, "attn_out"), lay.message


@pytest.mark.slow
def test_mxfp8_in_1x128_groups_is_caught_where_the_engram_stream_feeds_attention(ckdir):
    # E8M0 scales: only elements about 2^-14 below their group's amax round differently (docs/v41-serving-numerics.md)
    # -- on layer 0 that stays within the bound; on layer 1 (Engram's injected stream, a wider range per group) not
    lay = _emu_rows(E.mxfp8_1x128_v41_server(), ckdir)["e2e-v41/p150/layers"]
    assert lay.verdict == "fail", lay.message
    assert (lay.worst["layer"], lay.worst["component"]) == (1, "attn_out"), lay.message
    assert all(lay.metrics[k] <= lay.bounds[k] for k in lay.metrics if k.startswith("L0.")), lay.message


def test_the_emulated_replay_does_not_excuse_a_v41_rule_mutant(ckdir):
    # a V4.1 dataflow mutant served in the correct serving numerics still fails where the fp32 mutant fails
    subj = E.V41Server("own-topk-gfx942", E.OwnTopkModel, profile="gfx942")
    lay = _emu_rows(subj, ckdir)["e2e-v41/p150/layers"]
    assert lay.verdict == "fail" and (lay.worst["layer"], lay.worst["component"]) == (3, "attn_out"), lay.message
