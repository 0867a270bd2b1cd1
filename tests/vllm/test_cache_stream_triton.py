"""The streamed paged caches against vLLM's Triton kernels (vllm-triton:<profile>, interpreter): the SWA writer
(quantize_and_insert_k_kernel) and window reader (DequantizeAndGatherKCacheKernel) driven chunk by chunk over the
case's recycled, poisoned pool pass a verify pair and a chunk-boundary row at the serving and emulated levels; the
dedicated indexer-K writer / gather pass the SHUFFLE row; the block-flat rows and the fnuz-240 SWA row are "not
provided" with the reason. (The interpreter reads each query's 128-token window token by token: about 10 s a
row, so only these rows here; `python -m conformance run --subject vllm-triton:gfx942 -- -k kv_stream` runs all.)"""

import importlib.util

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed in this Python (vLLM subjects are exercised by nox -s cpu)",
                allow_module_level=True)

from conformance.cases import cases_for  # noqa: E402
from conformance.checks.numeric import run_numeric  # noqa: E402

pytestmark = pytest.mark.usefixtures("needs_vllm_triton")

ROWS = ["attn.kv_stream/t129/126-3/p1/fnuz224/s410", "attn.kv_stream/t129/126-1x3/p1/fnuz224/s410",
        "indexer.k_stream/t260/257-3/p1/shuffle/s506"]


def _case(cid):
    comp = cid.split("/")[0]
    return next(c for c in cases_for(comp) if c.id == cid)


@pytest.mark.parametrize("profile", ["gfx942", "ocp"])
def test_vllm_triton_streams_pass_and_unprovided_rows_say_why(profile):
    from conformance.subjects.vllm_triton import VllmTritonSubject

    s = VllmTritonSubject(profile)
    for cid in ROWS:
        rows = run_numeric(s, _case(cid))
        assert [r.level for r in rows] == ["serving", "emulated"], cid
        assert all(r.verdict == "pass" for r in rows), [r.message for r in rows]
        assert rows[0].extra["stream"]["poisoned"][0].endswith("<- 0xFF"), cid
    flat = run_numeric(s, _case("indexer.k_stream/t64/61-3/p1/normal/s510"))[0]
    assert flat.verdict == "not-provided" and "SHUFFLE" in flat.message, flat.message
    if profile == "gfx942":
        r = run_numeric(s, _case("attn.kv_stream/t260/129-126-2-3/p1/fnuz240/s402"))[0]
        assert r.verdict == "not-provided" and "fp8 max 224" in r.message, r.message
