"""Streamed KV compressor (``compressor.kv_stream``): chunked prefill == one prefill, and a k-token verify chunk
== k single decode steps, each from a poisoned (NaN-filled) carry state (issue #16; docs/stateful-components.md).

The golden is the one-shot ``compressor.kv`` over the whole prompt (same inputs, same outputs, same derived bound:
the streamed entries must meet it as the one-shot ones do). A subject provides the component as a
``conformance.subjects.Streamed``: ``new_state(**case inputs)`` and ``step(state, *, start, x=<chunk>, ...)`` ->
(entries closed by the chunk, state). The harness fills the fresh state with NaN, then feeds the row's
``splits``. The reference subject runs ``references.components.compressor_stream`` (an incremental golden over an
explicit ring of the last ``coff * m`` projected kv / score rows, the state vLLM keeps in its compressor state
cache, ``models/deepseek_v4/compressor.py:139-175``), in fp64; emulated:<profile> the same stream in the serving
numerics of ``compressor.kv``'s emulation (bf16 inputs and weights, the cache's FP8 quantisation).

Rows: splits that put a chunk boundary at every residue of the ratio-4 window (0..3), at the ratio-128 boundaries
127 / 128 / 129 / 257, V4.1's ratios 1 and 2, single-token steps, and the verify pairs: the same prompt (same
seed) streamed as prefill + one k-token chunk (k = 2, 3, 4) and as prefill + k single steps, with a window
closing inside the verify chunk after an earlier token of the same window. Case ids name the splits:
``61-3`` = a 61-token prefill then one 3-token chunk, ``61-1x3`` = then three single steps.
"""

from __future__ import annotations

import dataclasses

import torch

from references.components.compressor_stream import new_state, step
from references.components.rope import rope_inv_freq
from references.config import RopeScaling
from references.numerics import GOLDEN, serving

from ..components import ComponentSpec, OutputSpec, Streamed, StreamSpec, register
from ._case import Case, add
from .compressor import TOL, V41_KV_NOPE, _emulate, _make, compressor_kv


def _streamed(numerics=GOLDEN, variant="official", v41_numerics=None, bf16=False, step_fn=step) -> Streamed:
    """The incremental golden as a Streamed over compressor.kv's inputs (theta 160000 + YaRN, as compressor_kv).
    ``step_fn``: a step with the signature of ``compressor_stream.step`` (tests pass broken ones)."""
    inv = rope_inv_freq(64, 160000.0, RopeScaling())

    def rnd(v):
        return None if v is None or not bf16 else v.to(torch.bfloat16).float()

    def new(x, wkv, wgate, ape, norm, *, ratio, head_dim, eps):
        dt = torch.promote_types(x.dtype, torch.float32)
        return new_state(wkv, ratio=ratio, head_dim=head_dim, dtype=dt)

    def stp(state, *, start, x, wkv, wgate, ape, norm, ratio, head_dim, eps):
        if bf16:
            x, wkv, wgate, norm = rnd(x), rnd(wkv), rnd(wgate), rnd(norm)
        num, var = (v41_numerics, "vllm41") if (ape is None and v41_numerics is not None) else (numerics, variant)
        return step_fn(x, state, start=start, wkv=wkv, wgate=wgate, ape=ape, norm=norm, ratio=ratio,
                    head_dim=head_dim, eps=eps, inv_freq=inv, numerics=num, variant=var,
                    kind="indexer" if head_dim == 128 else "attn")

    return Streamed(new, stp)


def golden_stream() -> Streamed:
    return _streamed()


def emulated_stream(profile: str, step_fn=step) -> Streamed:
    """compressor.kv's serving emulation, streamed: bf16 x / wkv / wgate / norm, the "vllm" rounding points and
    the profile's cache quantisation; V4.1 (ape None): the bf16 latent and e4m3fn at 448 (compressor.py)."""
    numerics = serving(profile)
    return _streamed(numerics, "vllm", dataclasses.replace(numerics, kv_nope=V41_KV_NOPE), bf16=True,
                     step_fn=step_fn)


register(ComponentSpec(
    name="compressor.kv_stream", family="compressor", reference=compressor_kv,
    outputs=(OutputSpec("entries", tol=TOL, scale=lambda kw, want: want.abs().amax(dim=-1, keepdim=True)
                        .expand_as(want)),),
    description="compressor.kv fed chunk by chunk from a NaN-poisoned carry state (the last coff*m projected "
                "kv / score rows); compared with the one-shot golden under compressor.kv's bound",
    spec_section="3.7", emulate=_emulate,
    stream=StreamSpec(one_shot="compressor.kv", chunked=("x",), reference=golden_stream, emulate=emulated_stream),
))


def split_tag(splits) -> str:
    """[61, 1, 1, 1] -> "61-1x3"; [13, 17] -> "13-17"."""
    out, i = [], 0
    while i < len(splits):
        j = i
        while j < len(splits) and splits[j] == splits[i]:
            j += 1
        out.append(f"{splits[i]}x{j - i}" if j - i > 1 else str(splits[i]))
        i = j
    return "-".join(out)


def _add(kind, tokens, head_dim, ratio, splits, seed, tags=(), tier="fast", version=None):
    p = {"tokens": tokens, "d": 256, "ratio": ratio, "head_dim": head_dim, "splits": tuple(splits)}
    if version:
        p["version"] = version
    add(Case(f"compressor.kv_stream/{kind}/t{tokens}hd{head_dim}/{split_tag(splits)}/s{seed}",
             "compressor.kv_stream", _make, p, seed, "normal", ("stream", kind) + tuple(tags), tier=tier))


# CSA (ratio 4, overlap): single steps; chunk boundaries at residues 1, 3, 2 (5, 11, 18) and all at 0 (16, 48)
_add("csa", 30, 128, 4, [1] * 30, 300, ("decode",))
_add("csa", 30, 128, 4, [13, 17], 301, ("chunked-prefill",))
_add("csa", 64, 512, 4, [5, 6, 7, 46], 302, ("chunked-prefill",))
_add("csa", 64, 512, 4, [16, 48], 303, ("chunked-prefill", "aligned"))
# verify pairs: prefill p, then one k-token chunk vs k single steps (a window closes inside the chunk after an
# earlier token of it: 63 after 61, 62; 63 after 62; 59 after 58; 63 after 60 .. 62)
for t, p, k, seed in [(64, 61, 3, 310), (64, 62, 2, 311), (62, 58, 4, 312), (64, 60, 4, 313)]:
    _add("csa", t, 512, 4, [p, k], seed, ("verify", f"k{k}"))
    _add("csa", t, 512, 4, [p] + [1] * k, seed, ("verify", f"k{k}", "single-steps"))
# HCA (ratio 128): the prefill ends at 17, 127, 128, 129, 257 (window boundaries at 127 / 255)
_add("hca", 259, 512, 128, [17, 240, 2], 320, ("chunked-prefill",))
_add("hca", 259, 512, 128, [127, 132], 321, ("chunked-prefill",))
_add("hca", 259, 512, 128, [128, 131], 322, ("chunked-prefill", "aligned"))
_add("hca", 259, 512, 128, [129, 130], 323, ("chunked-prefill",))
_add("hca", 259, 512, 128, [257, 1, 1], 324, ("chunked-prefill", "decode"))
_add("hca", 259, 512, 128, [253, 3, 3], 325, ("verify", "k3"))
_add("hca", 259, 512, 128, [253, 1, 1, 1, 3], 325, ("verify", "k3", "single-steps"))
# V4.1 ratio 2 (no overlap, no ape) and ratio 1 (no gate: no carry at all)
_add("v41-r2", 129, 512, 2, [1] * 129, 340, ("decode",), version="v4.1")
_add("v41-r2", 129, 512, 2, [3, 1, 125], 341, ("chunked-prefill",), version="v4.1")
_add("v41-r2", 129, 512, 2, [64, 65], 342, ("chunked-prefill", "aligned"), version="v4.1")
_add("v41-r2", 129, 512, 2, [126, 3], 343, ("verify", "k3"), version="v4.1")
_add("v41-r2", 129, 512, 2, [126, 1, 1, 1], 343, ("verify", "k3", "single-steps"), version="v4.1")
_add("v41-r1", 17, 512, 1, [1] * 17, 350, ("decode",), version="v4.1")
_add("v41-r1", 17, 512, 1, [5, 12], 351, ("chunked-prefill",), version="v4.1")
# full tier: 8k tokens, boundaries at residues 1, 3, 3, 1 of ratio 4, then four single steps
_add("csa", 8192, 512, 4, [1021, 2047, 4099, 1021, 1, 1, 1, 1], 360, ("chunked-prefill", "long"), tier="full")
_add("hca", 8192, 512, 128, [4095, 4093, 3, 1], 361, ("chunked-prefill", "long"), tier="full")
