"""Driving a streamed (stateful) component: a fresh state, poisoned, fed chunk by chunk at a case's splits.

The case row's ``params["splits"]`` are the chunk lengths (they sum to the prompt length); the spec's
``stream.chunked`` inputs are sliced along dim 0 at them, every other input goes whole to every step. The
state the subject's ``new_state`` returns is poisoned before the first step: every floating tensor filled with
NaN, every integer tensor with -1 (vLLM's PAD slot; uint8 byte buffers 0xFF, an e4m3 NaN code), booleans with
True, so a step that reads a carry slot it has not written propagates NaN (or an invalid slot) into its output
instead of a benign zero. The chunks'
outputs are concatenated along dim 0 and compared with the one-shot golden under the component's bound.
"""

from __future__ import annotations

import torch


def poison_state(state, path: str = "state") -> list[str]:
    """Fill every tensor of ``state`` (a dict / list / tuple of tensors, nested) in place; returns what was
    poisoned ("state['kv'] [8, 1024] float32 <- NaN")."""
    done = []
    if isinstance(state, torch.Tensor):
        if state.is_floating_point():
            state.fill_(float("nan"))
            what = "NaN"
        elif state.dtype == torch.bool:
            state.fill_(True)
            what = "True"
        else:
            state.fill_(-1)
            what = "0xFF" if state.dtype == torch.uint8 else "-1"   # uint8 byte buffers: 0xFF, an e4m3 NaN code
        done.append(f"{path} {list(state.shape)} {str(state.dtype).removeprefix('torch.')} <- {what}")
    elif isinstance(state, dict):
        for k, v in state.items():
            done += poison_state(v, f"{path}[{k!r}]")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            done += poison_state(v, f"{path}[{i}]")
    elif state is not None and not isinstance(state, (int, float, str, bool)):
        raise TypeError(f"{path}: a stream state holds tensors (dict / list / tuple of them), got "
                        f"{type(state).__name__}")
    return done


def check_splits(splits, tokens: int, case_id: str) -> tuple[int, ...]:
    s = tuple(int(v) for v in splits)
    if not s or any(v <= 0 for v in s):
        raise ValueError(f"case {case_id}: splits must be positive chunk lengths, got {list(splits)}")
    if sum(s) != tokens:
        raise ValueError(f"case {case_id}: splits sum to {sum(s)}, the prompt has {tokens} tokens")
    return s


def _outputs(out, names) -> dict:
    if isinstance(out, dict):
        return out
    if isinstance(out, (tuple, list)):
        return dict(zip(names, out))
    return {names[0]: out}


def run_stream(streamed, spec, kwargs: dict, splits, *, case_id: str, poison: bool = True):
    """Run ``streamed`` (a ``Streamed``) over ``kwargs`` at ``splits`` -> (outputs dict, info dict)."""
    names = [o.name for o in spec.outputs]
    chunked = spec.stream.chunked
    tokens = kwargs[chunked[0]].shape[0]
    for k in chunked:
        if kwargs[k].shape[0] != tokens:
            raise ValueError(f"case {case_id}: chunked input {k!r} has {kwargs[k].shape[0]} rows, "
                             f"{chunked[0]!r} has {tokens}")
    splits = check_splits(splits, tokens, case_id)
    state = streamed.new_state(**kwargs)
    poisoned = poison_state(state) if poison else []
    parts: dict[str, list] = {}
    start = 0
    for n in splits:
        kw = dict(kwargs, **{k: kwargs[k][start:start + n] for k in chunked})
        out, state = streamed.step(state, start=start, **kw)
        for k, v in _outputs(out, names).items():
            parts.setdefault(k, []).append(v)
        start += n
    got = {k: torch.cat([v.reshape(-1, *v.shape[1:]) for v in vs], dim=0) for k, vs in parts.items()}
    return got, {"splits": list(splits), "chunks": len(splits), "poisoned": poisoned}


def bit_identical(a: dict, b: dict) -> dict:
    """Per output: whether the streamed and one-shot outputs of the same subject are bit-identical (NaN = NaN)."""
    res = {}
    for k in a:
        if k not in b or not isinstance(a[k], torch.Tensor) or tuple(a[k].shape) != tuple(b[k].shape):
            res[k] = False
            continue
        x, y = a[k].detach().cpu(), b[k].detach().cpu().to(a[k].dtype)
        res[k] = bool(torch.equal(x, y) or (x.is_floating_point() and torch.equal(x.isnan(), y.isnan())
                                              and torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0))))
    return res
