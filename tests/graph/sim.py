"""A CPU stand-in for graph capture, for testing the harness's plumbing and diagnosis only.

Replay re-runs the region's tensor code with the "capturing" flag up
(``torch.cuda.is_current_stream_capturing`` returns True, ``Tensor.item`` raises as it does inside a real
capture) and writes into the outputs captured first, so host values cached at warm-up stay frozen as they
would in a real graph. Graphs captured into one pool (``new_pool``) are as unsafe as real ones: each replay
scribbles NaN / -1 over the static outputs of every other graph of the pool that live in pool memory (what the
region allocated; buffers the wrapper owns are outside it), as the pool's reuse of freed intermediates may on a
device. It is never used for a reported result: the real suite runs only on a CUDA/ROCm
device and reports "needs-gpu" elsewhere."""

from __future__ import annotations

import contextlib
from unittest import mock

import torch


def _raiser(msg):
    def item(self):
        raise RuntimeError(msg)
    return item


def _owned_storages(obj, seen=None) -> set[int]:
    """Data pointers of every tensor a wrapper holds (its static buffers, weights, caches): outside the pool."""
    seen = set() if seen is None else seen
    out: set[int] = set()
    if isinstance(obj, torch.Tensor):
        return {obj.untyped_storage().data_ptr()}
    if id(obj) in seen:
        return out
    seen.add(id(obj))
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else \
        vars(obj).values() if hasattr(obj, "__dict__") and not isinstance(obj, type) else ()
    for v in items:
        if isinstance(v, (torch.Tensor, dict, list, tuple)) or hasattr(v, "__dict__"):
            out |= _owned_storages(v, seen)
    return out


class SimPool:
    def __init__(self):
        self.graphs: list[list[torch.Tensor]] = []

    def register(self, wrapper, outs: list[dict]) -> int:
        owned = _owned_storages(wrapper)
        self.graphs.append([v for o in outs for v in o.values()
                            if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() not in owned])
        return len(self.graphs) - 1

    def scribble_others(self, gid: int) -> None:
        for i, ts in enumerate(self.graphs):
            if i != gid:
                for v in ts:
                    v.fill_(float("nan") if v.is_floating_point() else -1)


class SimulatedGraphBackend:
    name = "simulated"

    def new_pool(self):
        return SimPool()

    def synchronize(self):
        pass

    @contextlib.contextmanager
    def sync_debug_error(self):
        with mock.patch.object(torch.Tensor, "item", _raiser("called a synchronizing CUDA operation")), \
                mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: False):
            yield

    @contextlib.contextmanager
    def _capturing(self):
        with mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: True), \
                mock.patch.object(torch.Tensor, "item",
                                  _raiser("CUDA error: operation not permitted when stream is capturing")):
            yield

    def capture(self, wrapper, warm, pool=None, pieces=None):
        with mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: False):
            for _ in range(3):
                wrapper.load(warm)
                if pieces is None:
                    wrapper.region()
                else:
                    prev = {}
                    for p in pieces:
                        prev = p.fn(prev)
        wrapper.load(warm)
        if pieces is None:
            with self._capturing():
                static_out = wrapper.region()
            gid = pool.register(wrapper, [static_out]) if pool is not None else None

            def replay():
                with self._capturing():
                    new = wrapper.region()
                for k, v in new.items():
                    static_out[k].copy_(v)
                if pool is not None:
                    pool.scribble_others(gid)

            return replay, static_out
        plan, prev = [], {}
        for p in pieces:                      # captured pieces run with the capture flag up, the rest plain
            with (self._capturing() if p.capture else contextlib.nullcontext()):
                out = p.fn(prev)
            plan.append((p, prev, out))
            prev = out
        gid = pool.register(wrapper, [o for p, _, o in plan if p.capture]) if pool is not None else None

        def replay_pieces():
            for p, inp, static in plan:
                with (self._capturing() if p.capture else contextlib.nullcontext()):
                    new = p.fn(inp)
                for k, v in new.items():
                    if v is not static[k]:
                        static[k].copy_(v)
            if pool is not None:
                pool.scribble_others(gid)

        return replay_pieces, prev
