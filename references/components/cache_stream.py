"""Paged caches written chunk by chunk and read back by their readers: the goldens of ``attn.kv_stream`` (the SWA
window) and ``indexer.k_stream`` (the compressed indexer keys), over an explicit state (issue #16;
docs/stateful-components.md).

The state is the request's slice of a paged pool: ``pool [blocks * block_size, width]`` (one row per slot, slot
``s`` at block ``s // block_size``, offset ``s % block_size``), unquantised here (fp32, fp64 on fp64 inputs). The
engine (vLLM's scheduler and KV cache manager) owns the addressing; the kernels under test get it as inputs:

* ``slot_mapping`` per row: where the row's value is written (-1: a padding row, written nowhere: the writers
  test ``slot < 0`` first, ``models/deepseek_v4/common/ops/fused_compress_quant_cache.py:196-198, 258-260``;
  cache_utils' SWA insert likewise);
* ``block_table`` per row: the request's logical-block -> physical-block table in force for the row's chunk
  (-1: no block: not allocated yet, or freed). The SWA cache is a ``SlidingWindowMLASpec``
  (``v1/attention/backends/mla/sparse_swa.py:116-134``): blocks whose positions have all left the window are freed
  and handed to later logical blocks, so a physical block is reused (a ring of blocks) and what it held before is
  garbage to the new owner.

Readers (written from the math, with vLLM's conventions):

* SWA window (spec 3.6; ``v1/attention/backends/mla/sparse_swa.py:1042-1124``, ``_compute_swa_indices_and_lens_
  kernel``): a query at position ``p`` reads positions ``max(p - window + 1, 0) .. p`` (``swa_len`` of them, in
  position order, left-aligned), each at ``block_table[q // block_size] * block_size + q % block_size``.
* Indexer K (spec 3.8): a query at position ``p`` sees the compressed entries that have closed by ``p``: entry
  ``j`` closes at token ``j * ratio + ratio - 1`` (``fused_compress_quant_cache.py:201-202``: a row is written only
  when ``(position + 1) % ratio == 0``), so ``(p + 1) // ratio`` entries, entry ``j`` at
  ``block_table[j // block_size] * block_size + j % block_size`` (the reader gathers them,
  ``v1/attention/ops/rocm_aiter_mla_sparse.py`` ``cp_gather_indexer_k_quant_cache_triton``).

A step writes before it reads (a chunk's queries see the chunk's own tokens) and reads only slots its writes or an
earlier step's wrote, so the result does not depend on the state's initial contents (the harness fills it with
NaN). The one-shot goldens (``swa_windows``, ``k_entries``) compute the same reads from the whole prompt by
position, with no pool at all.
"""

from __future__ import annotations

import torch

WINDOW = 128        # DSV4 sliding_window (config.json; references.config)
BLOCK = 64          # the SWA / indexer-K cache block size (DeepseekV4SWACache block_size=64, sparse_swa.py:83)


def _int_rows(name: str, t, n: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32) or t.dim() != 1:
        raise ValueError(f"{name}: expected an int64/int32 [rows] tensor, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name}: expected {n} rows, got {t.shape[0]}")
    return t.long()


def _flags(read, n: int) -> torch.Tensor:
    if not isinstance(read, torch.Tensor) or read.dtype != torch.bool or read.shape != (n,):
        raise ValueError(f"read: expected a bool [{n}] tensor, got {getattr(read, 'dtype', type(read).__name__)} "
                         f"{tuple(getattr(read, 'shape', ()))}")
    return read


def _check_rows(values, positions, slot_mapping, read, block_table=None):
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or not values.dtype.is_floating_point:
        raise ValueError(f"values: expected a float [rows, width] tensor, got "
                         f"{tuple(getattr(values, 'shape', ()))}")
    n = values.shape[0]
    pos, slots = _int_rows("positions", positions, n), _int_rows("slot_mapping", slot_mapping, n)
    if (pos < 0).any():
        raise ValueError(f"positions: {int(pos.min())} is negative")
    if (slots < -1).any():
        raise IndexError(f"slot_mapping: {int(slots.min())} is neither a slot nor the padding value -1")
    if block_table is not None and (not isinstance(block_table, torch.Tensor) or block_table.dim() not in (1, 2)):
        raise ValueError("block_table: expected an int [blocks] or [rows, blocks] tensor")
    return pos, slots, _flags(read, n)


def new_pool(blocks: int, width: int, *, block_size: int = BLOCK, dtype=torch.float32) -> dict:
    """A pool of ``blocks`` blocks of ``block_size`` slots, ``width`` values each: {"pool": [slots, width]}.
    The contents are unspecified (zeros here); a correct step never reads a slot it has not written."""
    if not isinstance(blocks, int) or blocks <= 0:
        raise ValueError(f"blocks: expected a positive int, got {blocks!r}")
    return {"pool": torch.zeros(blocks * block_size, width, dtype=dtype)}


def slot_of(block_table_row: torch.Tensor, q: int, block_size: int, what: str) -> int:
    """The slot of logical index ``q`` through one block-table row; a missing block is a one-line error (the
    engine keeps every block a reader needs: a hole means the schedule, not the kernel, is wrong)."""
    j = q // block_size
    if j >= block_table_row.shape[0] or int(block_table_row[j]) < 0:
        raise IndexError(f"{what}: logical block {j} (index {q}) has no physical block in the block table")
    return int(block_table_row[j]) * block_size + q % block_size


def _table_row(block_table: torch.Tensor, r: int) -> torch.Tensor:
    return block_table[r] if block_table.dim() == 2 else block_table


def write(state: dict, values: torch.Tensor, slot_mapping: torch.Tensor, keep: torch.Tensor | None = None) -> None:
    """pool[slot] = value for every row with slot >= 0 (and ``keep``): the writer."""
    pool = state["pool"]
    rows = slot_mapping >= 0 if keep is None else (slot_mapping >= 0) & keep
    s = slot_mapping[rows]
    if len(s) and int(s.max()) >= pool.shape[0]:
        raise IndexError(f"slot_mapping: slot {int(s.max())} is outside the pool's {pool.shape[0]} slots")
    pool[s] = values[rows].to(pool.dtype)


def window(p: int, size: int = WINDOW) -> range:
    """The positions a query at ``p`` reads in the sliding window (sparse_swa.py:1096-1101, no image)."""
    return range(max(p - size + 1, 0), p + 1)


def swa_step(state: dict, kv: torch.Tensor, *, positions, slot_mapping, block_table, read,
             window_size: int = WINDOW, block_size: int = BLOCK) -> tuple[dict, dict]:
    """Write the chunk's rows ``kv [n, width]`` at their slots (-1 skipped), then read, for every row with
    ``read``, its window from the pool through the row's block table -> ({"window": [sum of lens, width] in row
    order, each query's entries in position order; "lens": [reads] int64}, state)."""
    pos, slots, rd = _check_rows(kv, positions, slot_mapping, read, block_table)
    write(state, kv, slots)
    pool, out, lens = state["pool"], [], []
    for r in torch.nonzero(rd).flatten().tolist():
        if int(slots[r]) < 0:
            raise ValueError(f"read[{r}]: a padding row (slot -1) is not a query")
        row = _table_row(block_table, r)
        ss = [slot_of(row, q, block_size, f"SWA read of row {r} (position {int(pos[r])})")
              for q in window(int(pos[r]), window_size)]
        out.append(pool[torch.tensor(ss, dtype=torch.long)])
        lens.append(len(ss))
    width = kv.shape[1]
    return ({"window": torch.cat(out) if out else pool.new_zeros(0, width),
             "lens": torch.tensor(lens, dtype=torch.long)}, state)


def swa_windows(kv: torch.Tensor, *, positions, slot_mapping, read, window_size: int = WINDOW) -> dict:
    """One-shot golden of the reads: ``kv [rows, width]`` of the whole prompt (padding rows: slot -1, ignored);
    every flagged row's window taken by position from the real rows -> {"window", "lens"} as ``swa_step``'s."""
    pos, slots, rd = _check_rows(kv, positions, slot_mapping, read)
    real = torch.nonzero(slots >= 0).flatten().tolist()
    by_pos = {int(pos[r]): r for r in real}
    if len(by_pos) != len(real):
        raise ValueError("positions: two real rows share a position")
    out, lens = [], []
    for r in torch.nonzero(rd).flatten().tolist():
        if int(slots[r]) < 0:
            raise ValueError(f"read[{r}]: a padding row (slot -1) is not a query")
        w = list(window(int(pos[r]), window_size))
        missing = [q for q in w if q not in by_pos]
        if missing:
            raise ValueError(f"read[{r}]: position {missing[0]} of its window is no row of the prompt")
        out.append(kv[torch.tensor([by_pos[q] for q in w], dtype=torch.long)])
        lens.append(len(w))
    return {"window": torch.cat(out) if out else kv.new_zeros(0, kv.shape[1]),
            "lens": torch.tensor(lens, dtype=torch.long)}


def closes(positions: torch.Tensor, ratio: int) -> torch.Tensor:
    """Rows whose token closes a compressed entry: (position + 1) % ratio == 0 (fused_compress_quant_cache.py:
    201-202)."""
    return (positions.long() + 1) % ratio == 0


def k_step(state: dict, k: torch.Tensor, *, positions, slot_mapping, block_table, read, ratio: int,
           block_size: int = BLOCK) -> tuple[dict, dict]:
    """Write the entries the chunk closes (rows with ``closes`` and slot >= 0; row t's ``k`` is the key of the
    entry it closes, ``slot_mapping[t]`` that entry's slot), then read, for every row with ``read`` at position p,
    entries ``0 .. (p + 1) // ratio - 1`` through the block table -> ({"k": [sum of counts, 128], "lens"},
    state)."""
    pos, slots, rd = _check_rows(k, positions, slot_mapping, read, block_table)
    if not isinstance(ratio, int) or ratio <= 0:
        raise ValueError(f"ratio: expected a positive int, got {ratio!r}")
    write(state, k, slots, closes(pos, ratio))
    pool, out, lens = state["pool"], [], []
    for r in torch.nonzero(rd).flatten().tolist():
        if int(slots[r]) < 0:
            raise ValueError(f"read[{r}]: a padding row (slot -1) is not a query")
        row = _table_row(block_table, r)
        n = (int(pos[r]) + 1) // ratio
        ss = [slot_of(row, j, block_size, f"indexer-K read of row {r} (position {int(pos[r])})") for j in range(n)]
        out.append(pool[torch.tensor(ss, dtype=torch.long)])
        lens.append(n)
    return ({"k": torch.cat(out) if out else pool.new_zeros(0, k.shape[1]),
             "lens": torch.tensor(lens, dtype=torch.long)}, state)


def k_entries(k: torch.Tensor, *, positions, slot_mapping, read, ratio: int) -> dict:
    """One-shot golden: entry j is the ``k`` row of the real row at position j * ratio + ratio - 1; each flagged
    row at position p reads entries 0 .. (p + 1) // ratio - 1 -> {"k", "lens"} as ``k_step``'s."""
    pos, slots, rd = _check_rows(k, positions, slot_mapping, read)
    real = (slots >= 0) & closes(pos, ratio)
    by_entry = {int(pos[r]) // ratio: r for r in torch.nonzero(real).flatten().tolist()}
    out, lens = [], []
    for r in torch.nonzero(rd).flatten().tolist():
        if int(slots[r]) < 0:
            raise ValueError(f"read[{r}]: a padding row (slot -1) is not a query")
        n = (int(pos[r]) + 1) // ratio
        missing = [j for j in range(n) if j not in by_entry]
        if missing:
            raise ValueError(f"read[{r}]: entry {missing[0]} is closed by no row of the prompt")
        out.append(k[torch.tensor([by_entry[j] for j in range(n)], dtype=torch.long)])
        lens.append(n)
    return {"k": torch.cat(out) if out else k.new_zeros(0, k.shape[1]), "lens": torch.tensor(lens, dtype=torch.long)}
