"""The platform binding tables (conformance.subjects.bindings) as data: complete, each row either driven by a
named adapter or carrying the reason none applies, and dispatch predicates that follow vLLM's conditions."""

import pytest

from conformance import components
from conformance.subjects import bindings

NAMES = sorted(components.load_all())


@pytest.mark.parametrize("platform", bindings.PLATFORMS)
def test_every_registered_component_has_a_row(platform):
    t = bindings.table(platform)
    missing = [n for n in NAMES if not t.get(n)]
    assert not missing, f"{platform}: no binding row for {missing}"
    extra = sorted(set(t) - set(NAMES))
    assert not extra, f"{platform}: rows for unregistered components {extra}"


@pytest.mark.parametrize("platform", bindings.PLATFORMS)
def test_rows_name_function_backend_and_adapter_or_reason(platform):
    from conformance.subjects.vllm_sim import ADAPTERS

    bad = []
    for name, rows in bindings.table(platform).items():
        for b in rows:
            if b.backend not in ("triton", "torch", "aiter", "compiled", "cuda-only"):
                bad.append((name, "backend", b.backend))
            if not b.function or not b.condition:
                bad.append((name, "function/condition empty"))
            if (b.adapter is None) == (not b.reason):
                bad.append((name, "exactly one of adapter / reason must be set", b.adapter, b.reason))
            if b.adapter is not None and b.adapter not in ADAPTERS:
                bad.append((name, "unknown adapter", b.adapter))
            if b.adapter is not None and not b.runs:
                bad.append((name, "adapter row without a 'runs' witness"))
            if b.backend == "aiter" and b.reason != bindings.AITER_ONLY:
                bad.append((name, "aiter row must say device only: AITER"))
            bad += [(name, "witness not named in function", r) for r in b.runs if r not in b.function]
    assert not bad, bad


def test_dispatch_predicates_follow_the_env_flags():
    base = {"arch": "gfx942", "aiter": True}
    on = dict(base, env={"VLLM_ROCM_USE_AITER": "1"})
    off = dict(base, env={})
    assert bindings.select("rocm-gfx942", "indexer.scores", on).backend == "aiter"
    assert bindings.select("rocm-gfx942", "indexer.scores", off).backend == "torch"
    assert bindings.select("rocm-gfx942", "norm.rms", on).backend == "aiter"
    assert bindings.select("rocm-gfx942", "norm.rms",
                           dict(on, env={"VLLM_ROCM_USE_AITER": "1", "VLLM_ROCM_USE_AITER_RMSNORM": "0"})
                           ).backend == "compiled"
    # mHC: aiter is chosen by the package's presence (HAS_AITER_MHC), not by the env flag
    assert bindings.select("rocm-gfx942", "mhc.pre", off).backend == "aiter"
    assert bindings.select("rocm-gfx942", "mhc.pre", dict(off, aiter=False)).backend == "torch"
    assert bindings.select("rocm-gfx942", "mhc.pre", dict(off, aiter=True, hidden=320)).backend == "torch"
    # gfx950 only: OPUS sparse prefill for >= 1024 queries
    assert bindings.select("rocm-gfx950", "attn.sparse", dict(off, queries=2048)).backend == "aiter"
    assert bindings.select("rocm-gfx942", "attn.sparse", dict(off, queries=2048)).backend == "triton"
    # indexer prefill logits: AITER (flydsl on gfx942) only with the env flag; else the torch reference
    assert bindings.select("rocm-gfx942", "indexer.scores", off).adapter == "indexer_scores_prefill"
    # activation quant: aiter group quant with the flag, the compiled HIP op otherwise (never the Triton fallback)
    assert bindings.select("rocm-gfx942", "quant.act_fp8", on).backend == "aiter"
    assert bindings.select("rocm-gfx942", "quant.act_fp8", off).backend == "compiled"
    # wo_a: gfx950 takes AITER's FP8 BMM (VLLM_ROCM_USE_AITER_FP8BMM defaults on), gfx942 the BF16 path
    assert bindings.select("rocm-gfx950", "attn.output", off).backend == "aiter"
    assert bindings.select("rocm-gfx950", "attn.output", dict(off, env={"VLLM_ROCM_USE_AITER_FP8BMM": "0"})
                           ).adapter == "output_projection_rocm"
    assert bindings.select("rocm-gfx942", "attn.output", off).adapter == "output_projection_rocm"
    # routers: the compiled topk_hash_softplus_sqrt on ROCm whatever the flags
    for c in (on, off, dict(off, aiter=False)):
        assert bindings.select("rocm-gfx942", "moe.router", c).backend == "compiled"
        assert bindings.select("rocm-gfx942", "moe.hash_router", c).backend == "compiled"


def test_coverage_lists_every_component():
    rows = bindings.coverage("rocm-gfx942", {"arch": "gfx942", "env": {}, "aiter": True}, NAMES)
    assert [r[0] for r in rows] == NAMES and all(r[1] != "-" and r[3] for r in rows)
