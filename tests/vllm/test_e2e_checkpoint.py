"""``--checkpoint PATH`` on vLLM's CPU build: the written tiny bf16 checkpoint served from its folder, the golden
streamed from it one layer at a time, gives the rows of the in-memory run (same engine, same prompt); the
golden streaming the FP8/MXFP4 official-layout variant of the same seed gives them too. 20-token prompt
(the 2,100-token one costs minutes and exercises no other code of the checkpoint mode).

Skipped where vLLM is not installed (as tests/vllm/test_e2e.py).
"""

import shlex

import pytest

from ._require import require_vllm_cpu_e2e

require_vllm_cpu_e2e()


@pytest.fixture(scope="module")
def runs(tiny_bf16_ckpt, tmp_path_factory):
    from conformance.checks.e2e import prompts, run_e2e
    from conformance.subjects import load_subject
    from references.checkpoints.writer import write_checkpoint
    from references.config import TINY

    ckpt, _ = tiny_bf16_ckpt
    fp8 = tmp_path_factory.mktemp("fp8") / "ckpt-tiny-fp8-seed0"
    write_checkpoint(fp8, TINY, seed=0)          # default dtype: FP8 linears, MXFP4 experts, e8m0 scales
    info = load_subject("vllm").info()
    ps = {"short20": prompts(TINY)["short20"]}
    try:
        # in-memory mode writes its folder under out_dir: the same path, so the same engine
        mem = run_e2e("vllm", info, out_dir=ckpt.parent, prompt_set=ps)
    except RuntimeError as err:
        if "one vLLM engine per process" in str(err):
            pytest.skip("another test of this process started a vLLM engine on another checkpoint")
        raise
    ck = run_e2e("vllm", info, prompt_set=ps, checkpoint=ckpt)
    gq = run_e2e("vllm", info, prompt_set=ps, checkpoint=ckpt, golden_checkpoint=fp8)
    return ckpt, fp8, mem, ck, gq


def _by_id(rows):
    return {r.case_id: r for r in rows}


def _assert_same_rows(a, b):
    a, b = _by_id(a), _by_id(b)
    assert set(a) == set(b)
    for cid in a:
        ra, rb = a[cid], b[cid]
        assert ra.verdict == rb.verdict, (cid, ra.verdict, rb.verdict, rb.message)
        assert set(ra.metrics) == set(rb.metrics), cid
        for k, v in ra.metrics.items():
            w = rb.metrics[k]
            if isinstance(v, float):   # bitwise equal expected; at most an fp32 ulp of slack
                assert abs(v - w) <= 2.0 ** -23 * max(abs(v), abs(w)), (cid, k, v, w)
            else:
                assert v == w, (cid, k, v, w)
        assert ra.bounds == rb.bounds, cid


def test_checkpoint_rows_equal_in_memory_rows(runs):
    _, _, mem, ck, _ = runs
    _assert_same_rows(mem, ck)
    assert not [r for r in ck if r.verdict not in ("pass", "xfail")], [(r.case_id, r.verdict) for r in ck]


def test_rows_name_the_checkpoint_and_rerun_with_it(runs):
    ckpt, _, _, ck, _ = runs
    for r in ck:
        assert r.params["checkpoint"] == str(ckpt) and r.params["quantized"] is False, r.case_id
        assert r.params["config"].startswith("tiny-shaped"), r.params
        assert f"--checkpoint {shlex.quote(str(ckpt))}" in r.rerun, r.rerun
        assert f"[checkpoint {ckpt}" in r.message and "streamed" in r.message, r.message
        assert r.params["bounds_derived"] is True and r.params["replay_numerics"] == "serving:cpu-bf16"


def test_golden_streaming_the_fp8_variant_gives_the_same_rows(runs):
    _, fp8, _, ck, gq = runs
    _assert_same_rows(ck, gq)
    for r in gq:
        assert r.params["golden_checkpoint"] == str(fp8) and r.params["golden_quantized"] is True
        assert "--golden-checkpoint" in r.rerun
