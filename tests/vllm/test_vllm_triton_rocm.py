"""vllm-triton[-gpu]: compressor.kv (V4 and V4.1 rows), compressor.kv_stream (V4 rows), attn.output and mhc.head
through vllm:sim's ROCm adapters with the kernel lookup given vLLM's Triton kernels
(conformance.subjects._vllm_triton_rocm).

* the launchers made here equal vLLM's own wrappers: the same adapter under vllm:sim-gfx942 (vLLM's
  _SAVE_PARTIAL_STATES_KERNEL, compress_norm_rope_store[_two_stage]_triton, HCHeadOp.forward_hip) and under
  vllm-triton:gfx942 gives bitwise equal outputs;
* the kernels taken from vLLM's source files (the GPU path) equal the imported ones bitwise under the interpreter
  (with the same RoPE table), and the harness's RoPE table for the source path is within its derived bound of
  vLLM's;
* planted kernels (store with the wrong COMPRESS_RATIO, save-partial-states with the wrong COMPRESS_RATIO, V4.1's
  rope insert with ratio 1 for 2, the inverse RoPE skipping a row, the hc head with a wrong RMSNorm eps) are
  caught, naming the component and the output.

Skipped where vLLM is not installed."""

import importlib.util

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed in this Python (vLLM subjects are exercised by nox -s cpu)",
                allow_module_level=True)

from conformance.subjects import prepare_process  # noqa: E402

prepare_process(["vllm-triton:gfx942", "vllm:sim-gfx942"])

import torch  # noqa: E402

from conformance.cases import CASES  # noqa: E402
from conformance.checks.numeric import run_numeric, worst_verdict  # noqa: E402
from conformance.results import FAILING  # noqa: E402
from conformance.subjects import load_subject  # noqa: E402

ROWS = {"compressor.kv": ["compressor.kv/csa/t30hd128/s1", "compressor.kv/csa/t64hd512/s0",
                          "compressor.kv/hca/t259hd512/s3", "compressor.kv/v41-r2/t129hd512/s45",
                          "compressor.kv/v41-r1/t2hd512/s51"],
        "attn.output": ["attn.output/t9h8g2/theta160000/s1"],
        "mhc.head": ["mhc.head/t9d256/outliers/s1"]}
STREAM = ["compressor.kv_stream/csa/t30hd128/13-17/s301", "compressor.kv_stream/hca/t259hd512/129-130/s323"]


_LOADED = {}


@pytest.fixture
def subjects(needs_vllm_triton):
    if not _LOADED:
        _LOADED["s"] = load_subject("vllm-triton:gfx942"), load_subject("vllm:sim-gfx942")
    return _LOADED["s"]


def _call(subj, comp, case):
    return subj.provides()[comp].fn(**case.make_inputs())


def _explain(rows):
    return "\n".join(f"{r.verdict}: {r.component} [{r.function}] {r.message}" for r in rows)


@pytest.mark.parametrize("cid", [c for v in ROWS.values() for c in v])
def test_triton_adapter_equals_the_sim_adapter_bitwise(subjects, cid):
    """vllm-triton:gfx942's launchers vs vLLM's wrappers (vllm:sim-gfx942), one adapter body."""
    tri, sim = subjects
    comp = cid.split("/")[0]
    case = CASES[cid]
    a, b = _call(tri, comp, case), _call(sim, comp, case)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].float(), b[k].float()), f"{cid}: {k} differs from vLLM's wrapper path"
    rows = run_numeric(tri, case)
    assert worst_verdict(rows) == "pass", _explain(rows)
    assert tri.provides()[comp].backend == "triton-interpreter"


@pytest.mark.parametrize("cid", STREAM)
def test_triton_stream_passes_and_equals_its_one_shot(subjects, cid):
    tri, _ = subjects
    rows = run_numeric(tri, CASES[cid])
    assert worst_verdict(rows) == "pass", _explain(rows)
    assert rows[0].extra["stream_vs_one_shot"]["bit_identical"]["entries"], cid
    assert any("state_cache" in p and "<- NaN" in p for p in rows[0].extra["stream"]["poisoned"])


def test_v41_stream_rows_say_why_not_provided(subjects):
    tri, _ = subjects
    rows = run_numeric(tri, CASES["compressor.kv_stream/v41-r2/t129hd512/64-65/s342"])
    assert {r.verdict for r in rows} == {"not-provided"}, _explain(rows)
    assert "V4.1" in rows[0].message and "no streamed adapter" in rows[0].message


@pytest.mark.parametrize("comp", ["compressor.kv", "attn.output", "mhc.head"])
def test_source_loaded_kernels_equal_imported_bitwise(subjects, comp, monkeypatch):
    """The GPU path's kernels (vLLM's files, no vllm import) under the interpreter: bitwise the imported ones'.
    The RoPE table is vLLM's on both sides here (the source path's own table is checked below)."""
    from conformance import components
    from conformance.subjects import _vllm_source
    from conformance.subjects import _vllm_triton_rocm as vr
    from conformance.subjects._vllm_adapters import vllm_rope
    from conformance.subjects.vllm import FIXED, adapter_key, bind
    from conformance.subjects.vllm_triton import KERNELS, PROFILES

    spec = components.get(comp)
    make = KERNELS[adapter_key(comp, spec)][0]
    p_src = dict(PROFILES["gfx942"], src=_vllm_source.source_root())
    monkeypatch.setattr(vr, "harness_cos_sin", lambda f, r, n: vllm_rope(f, r, 512, torch.arange(n)).cos_sin_cache)
    for cid in ROWS[comp]:
        case = CASES[cid]
        want = _call(subjects[0], comp, case)
        fn, why = bind(spec, make(p_src), fixed=FIXED.get(comp))
        assert fn is not None, why
        got = fn(**case.make_inputs())
        for k in want:
            assert torch.equal(got[k].float(), want[k].float()), f"{cid}: source-loaded {k} != imported"


def test_source_path_rope_table_is_within_fp32_rounding_of_vllms(subjects):
    """harness_cos_sin (fp32 t * f, then cos / sin) vs vLLM's DeepseekV4ScalingRotaryEmbedding table. Bound: each
    side rounds the angle t * f once in fp32 (|err| <= |t f| 2^-24 each, the inv_freq tables may differ by an fp32
    ulp of f: another |t f| 2^-24), and cos / sin are each within 1 ulp (2^-24 near 1): 3 |t f|max 2^-24 + 2^-23."""
    from conformance.subjects._vllm_adapters import vllm_rope
    from conformance.subjects._vllm_triton_rocm import harness_cos_sin
    from references.components.rope import rope_inv_freq
    from references.config import RopeScaling

    n = 300
    for y in (RopeScaling(), RopeScaling(factor=16.0, original_max_position_embeddings=65536)):
        f = rope_inv_freq(64, 160000.0, y)
        want = vllm_rope(f, 64, 512, torch.arange(n)).cos_sin_cache[:n].float()
        got = harness_cos_sin(f, 64, n)
        bound = 3 * (n - 1) * float(f.max()) * 2 ** -24 + 2 ** -23
        err = float((got - want).abs().max())
        assert err <= bound, f"harness RoPE table {err:.3g} from vLLM's, bound {bound:.3g}"


class _Planted:
    """``kernel[grid](...)`` with some launch arguments replaced."""

    def __init__(self, real, **planted):
        self.real, self.planted = real, planted

    def __getitem__(self, grid):
        return lambda *a, **kw: self.real[grid](*a, **dict(kw, **self.planted))


def _caught(tri, cid, name, planted):
    from conformance.subjects import vllm_triton as vt

    vt._K.over[name] = planted
    try:
        rows = [r for r in run_numeric(tri, CASES[cid]) if r.verdict in FAILING]
    finally:
        vt._K.over.clear()
    assert rows, f"{cid}: planted {name} went unnoticed"
    return rows


@pytest.mark.parametrize("cid,name,planted", [
    ("compressor.kv/csa/t64hd512/s0", "_fused_kv_compress_norm_rope_insert_sparse_attn", {"COMPRESS_RATIO": 8}),
    ("compressor.kv/csa/t30hd128/s1", "_fused_kv_compress_norm_rope_insert_indexer_attn", {"OVERLAP": False}),
    ("compressor.kv/hca/t259hd512/s3", "save_partial_states_kernel", {"COMPRESS_RATIO": 4}),
    ("compressor.kv/v41-r2/t129hd512/s45", "_rope_quant_insert_kernel", {"COMPRESS_RATIO": 1}),
], ids=["store-ratio8-for-4", "indexer-store-no-overlap", "ape-row-mod-4-for-128", "v41-rope-ratio1-for-2"])
def test_planted_compressor_kernels_are_caught(subjects, cid, name, planted):
    from conformance.subjects import vllm_triton as vt

    tri, _ = subjects
    rows = _caught(tri, cid, name, _Planted(vt._K.get(name), **planted))
    r = rows[0]
    assert r.component == "compressor.kv" and "compressor.kv" in r.message, _explain(rows)
    named = "SavePartialStatesKernel.kernel" if name == "save_partial_states_kernel" else name
    assert "entries" in r.message and named in r.function, _explain(rows)


def test_inverse_rope_skipping_a_row_is_caught(subjects):
    from conformance.subjects import vllm_triton as vt

    tri, _ = subjects
    real = vt._K.get("rocm_inverse_rope_rows_")

    def skip_first(o, positions, cos_sin_cache, rope_head_dim):     # token 0 left unrotated
        return real(o[1:], positions[1:], cos_sin_cache, rope_head_dim)

    rows = _caught(tri, "attn.output/t9h8g2/theta160000/s1", "rocm_inverse_rope_rows_", skip_first)
    r = rows[0]
    assert r.component == "attn.output" and "attn.output" in r.message and "y" in r.message, _explain(rows)
    assert "rocm_inverse_rope_rows_" in r.function


def test_hc_head_with_a_wrong_norm_eps_is_caught(subjects):
    from conformance.subjects import vllm_triton as vt

    tri, _ = subjects
    real = vt._K.get("_hc_head_triton")

    def eps_one(hs, fn, scale, base, out, D, rms_eps, hc_eps, hc):
        return real(hs, fn, scale, base, out, D, 1.0, hc_eps, hc)

    rows = _caught(tri, "mhc.head/t130d256/normal/s2", "_hc_head_triton", eps_one)
    r = rows[0]
    assert r.component == "mhc.head" and "mhc.head" in r.message, _explain(rows)
    assert "_hc_head_triton" in r.function
