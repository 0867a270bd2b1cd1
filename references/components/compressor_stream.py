"""Streamed (chunk-by-chunk) KV compressor over an explicit carry state: the golden of ``compressor.kv_stream``.

The state is what vLLM keeps per request in its compressor state cache: the last ``coff * m`` tokens' projected
kv rows and score rows (score with the position bias already added), fp32, ``coff = 2`` with CSA overlap
(ratio 4) else 1 (``models/deepseek_v4/compressor.py:139-175``: ``CompressorStateCache``, fp32,
``sliding_window = coff * compress_ratio``, last dim ``2 * coff * head_dim`` = [kv_state, score_state];
``common/ops/save_partial_states.py:37-90``: ``_SAVE_PARTIAL_STATES_KERNEL`` writes kv and score + ape per token
at its slot). Here the two halves are two tensors and the ring slot of position ``t`` is ``t mod (coff * m)``.

Written from the math of spec 3.7, not from :func:`references.components.compressor.compress` (which pools all
windows of a whole prompt at once): a step projects its chunk's tokens, writes each token's kv / score row into
its ring slot, and whenever a token closes a window (``(t + 1) mod m == 0``) pools that window from the ring:
  * no overlap: the m slots of positions ``t + 1 - m .. t`` (all channels);
  * overlap: the first half [0, d) of the previous window's slots (positions ``t + 1 - 2m .. t - m``) and the
    second half [d, 2d) of the current window's; entry 0 has no previous window: those m slots are left out of
    the softmax (they are never read: a fresh state is garbage, the harness fills it with NaN).
Per channel: ``softmax`` over the slots, weighted sum of kv; then the shared per-entry tail (RMSNorm, RoPE at the
entry's first position ``i * m``, the cache's quantisation: ``compressor._finish``), which is stateless.
A step reads a ring slot only after the same or an earlier step wrote it, so the result does not depend on the
initial contents of the state.
"""

from __future__ import annotations

import torch

from ..numerics import GOLDEN, Numerics
from ._checks import compute_dtype, finite, float_tensor
from .compressor import _check, _finish


def carry_rows(ratio: int, overlap: bool) -> int:
    """Ring length: the last ``coff * ratio`` tokens."""
    return (2 if overlap else 1) * ratio


def new_state(wkv: torch.Tensor, *, ratio: int, head_dim: int, overlap: bool | None = None,
              dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A state for one request: ``kv`` and ``score`` [coff * ratio, coff * head_dim] in ``dtype``. The contents
    are unspecified (zeros here); a correct step never reads a slot it has not written."""
    ov = (ratio == 4) if overlap is None else bool(overlap)
    width = (2 if ov else 1) * head_dim
    if wkv.shape[0] != width:
        raise ValueError(f"wkv: {wkv.shape[0]} rows, expected {width} (coff * head_dim)")
    rows = carry_rows(ratio, ov)
    return {"kv": torch.zeros(rows, width, dtype=dtype), "score": torch.zeros(rows, width, dtype=dtype)}


def step(x: torch.Tensor, state: dict, *, start: int, wkv, wgate, ape, norm, ratio: int, head_dim: int,
         eps: float, inv_freq, rope_dim: int = 64, numerics: Numerics = GOLDEN, kind: str = "attn",
         variant: str = "official", overlap: bool | None = None) -> tuple[torch.Tensor, dict]:
    """Feed the tokens ``x`` [n, D] at positions ``start .. start + n - 1`` -> (the entries these tokens close,
    [k, head_dim], in entry order; the updated state). ``state`` is updated in place and returned."""
    ov = _check(x, wkv, wgate, ape, norm, ratio, head_dim, overlap, kind, variant)
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"start: must be a non-negative int, got {start!r}")
    m, d, n = ratio, head_dim, x.shape[0]
    R = carry_rows(m, ov)
    width = wkv.shape[0]
    for key in ("kv", "score"):
        float_tensor(f"state[{key!r}]", state.get(key), ndim=2)
        if tuple(state[key].shape) != (R, width):
            raise ValueError(f"state[{key!r}]: shape {tuple(state[key].shape)}, expected {(R, width)}")
    dt = compute_dtype(x)
    xs = finite("x", x.to(dt))
    # the chunk's projections, one row per token (spec 3.7: C_t = wkv x_t, Z_t = wgate x_t + ape[t mod m])
    kv_rows = xs @ wkv.to(dt).T
    sc_rows = torch.zeros_like(kv_rows) if wgate is None else xs @ wgate.to(dt).T
    kv_state, sc_state = state["kv"], state["score"]
    pooled, ids = [], []
    for j in range(n):
        t = start + j
        s = t % R
        kv_state[s] = kv_rows[j].to(kv_state.dtype)
        sc_state[s] = (sc_rows[j] + (ape[t % m].to(dt) if ape is not None else 0)).to(sc_state.dtype)
        if (t + 1) % m:
            continue
        i = (t + 1) // m - 1
        cur = [p % R for p in range(t + 1 - m, t + 1)]
        if ov:
            c_kv, c_sc = kv_state[cur][:, d:], sc_state[cur][:, d:]
            if i > 0:
                prev = [p % R for p in range(t + 1 - 2 * m, t + 1 - m)]
                c_kv = torch.cat((kv_state[prev][:, :d], c_kv), dim=0)
                c_sc = torch.cat((sc_state[prev][:, :d], c_sc), dim=0)
        else:
            c_kv, c_sc = kv_state[cur], sc_state[cur]
        c_kv, c_sc = c_kv.to(dt), c_sc.to(dt)
        w = torch.exp(c_sc - c_sc.amax(dim=0, keepdim=True))
        pooled.append((w * c_kv).sum(dim=0) / w.sum(dim=0))
        ids.append(i)
    if not pooled:
        return x.new_zeros(0, d, dtype=dt), state
    out = _finish(torch.stack(pooled), torch.tensor(ids, dtype=torch.long), norm, ratio=m, eps=eps,
                  inv_freq=inv_freq, rope_dim=rope_dim, numerics=numerics, kind=kind, variant=variant)
    return out, state
