"""A CPU stand-in for graph capture, for testing the harness's plumbing and diagnosis only.

Replay re-runs the region's tensor code with the "capturing" flag up
(``torch.cuda.is_current_stream_capturing`` returns True, ``Tensor.item`` raises as it does inside a real
capture) and writes into the outputs captured first, so host values cached at warm-up stay frozen as they
would in a real graph. It is never used for a reported result: the real suite runs only on a CUDA/ROCm
device and reports "needs-gpu" elsewhere."""

from __future__ import annotations

import contextlib
from unittest import mock

import torch


def _raiser(msg):
    def item(self):
        raise RuntimeError(msg)
    return item


class SimulatedGraphBackend:
    name = "simulated"

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

            def replay():
                with self._capturing():
                    new = wrapper.region()
                for k, v in new.items():
                    static_out[k].copy_(v)

            return replay, static_out
        plan, prev = [], {}
        for p in pieces:                      # captured pieces run with the capture flag up, the rest plain
            with (self._capturing() if p.capture else contextlib.nullcontext()):
                out = p.fn(prev)
            plan.append((p, prev, out))
            prev = out

        def replay_pieces():
            for p, inp, static in plan:
                with (self._capturing() if p.capture else contextlib.nullcontext()):
                    new = p.fn(inp)
                for k, v in new.items():
                    if v is not static[k]:
                        static[k].copy_(v)

        return replay_pieces, prev
