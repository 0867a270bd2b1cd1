"""Run one bisect probe (``module:function``) in this interpreter and print its verdict as one JSON line.

Used by ``python -m conformance bisect --predicate probe:...``: the bisect runs
``<version venv>/bin/python -m conformance.probe_runner module:function`` with this repository on
PYTHONPATH. Output: a line ``PROBE-RESULT {"verdict": ..., ...}``. Exit 0 when the probe ran (whatever
its verdict), 3 when the probe itself could not be loaded or raised.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback

MARK = "PROBE-RESULT "


def run(spec: str) -> dict:
    mod, _, fn = spec.partition(":")
    if not fn:
        raise ValueError(f"probe {spec!r} is not module:function")
    t0 = time.perf_counter()
    res = dict(getattr(importlib.import_module(mod), fn)())
    res.setdefault("message", "")
    res["probe"] = spec
    res["duration_s"] = round(time.perf_counter() - t0, 3)
    return res


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m conformance.probe_runner module:function", file=sys.stderr)
        return 2
    try:
        res = run(args[0])
    except Exception as e:  # noqa: BLE001 - report as a verdict row, the bisect decides
        res = {"verdict": "error", "message": f"probe {args[0]} raised {type(e).__name__}: {e}",
               "traceback": traceback.format_exc(limit=8), "probe": args[0]}
        print(MARK + json.dumps(res), flush=True)
        return 3
    print(MARK + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
