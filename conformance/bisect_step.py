"""One ``git bisect run`` step in a vLLM source checkout: install, import, run the predicate, exit.

    git -C ~/src/vllm bisect start <bad> <good>
    git -C ~/src/vllm bisect run python -m conformance.bisect_step \\
        --predicate case:quant.act_fp8/t1k256/normal/s0@vllm --repeat 3 \\
        --install-cmd "VLLM_TARGET_DEVICE=cpu pip install --no-build-isolation -e ."

(``python -m conformance bisect --source git:~/src/vllm ...`` does exactly this, with this repository on
PYTHONPATH.) Exit codes, as ``git bisect run`` reads them: 0 good, 1 bad, 125 skip (the commit cannot be
installed, vLLM does not import, or the predicate cannot judge it: error, not-provided, ...), 128 abort
(the harness itself is broken: never blame a commit for it).
Every step appends one JSON line (commit, verdicts, timings) to ``--log``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GOOD, BAD, SKIP, ABORT = 0, 1, 125, 128


def _commit(cwd: str) -> str:
    p = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd)
    return p.stdout.strip() or "?"


def main(argv=None) -> int:
    from .bisect import UNJUDGED, BisectError, judge, make_predicate

    p = argparse.ArgumentParser(prog="python -m conformance.bisect_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--predicate", required=True, help="case:<case-id>@<subject> | probe:<module:function>")
    p.add_argument("--mode", default="failing", choices=["failing", "changed"])
    p.add_argument("--reference", default=None, help="mode changed: the verdict at the good commit")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--install-cmd", default="", help="shell command that installs the checkout (run in it)")
    p.add_argument("--python", default=sys.executable, help="interpreter the checkout is installed into")
    p.add_argument("--import-name", default="vllm")
    p.add_argument("--log", default="bisect-steps.jsonl")
    p.add_argument("--workdir", default=None, help="scratch folder for step outputs")
    a = p.parse_args(argv)
    cwd = os.getcwd()
    rec = {"commit": _commit(cwd), "predicate": a.predicate, "time": time.time()}

    def done(code: int, **kw) -> int:
        rec.update(kw, exit=code)
        with open(a.log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"bisect_step {rec['commit'][:12]}: exit {code} {kw.get('outcome', '')} {kw.get('reason', '')}")
        return code

    try:
        pred = make_predicate(a.predicate)
        if a.mode == "changed" and a.reference is None:
            raise BisectError("--mode changed needs --reference <verdict at the good commit>")
    except BisectError as e:
        return done(ABORT, outcome="abort", reason=str(e))
    t0 = time.perf_counter()
    if a.install_cmd:
        r = subprocess.run(a.install_cmd, shell=True, cwd=cwd, capture_output=True, text=True)
        if r.returncode != 0:
            return done(SKIP, outcome="skip", reason=f"install failed (rc {r.returncode}): "
                                                       f"{(r.stderr.strip().splitlines() or ['?'])[-1]}",
                        install_s=round(time.perf_counter() - t0, 1))
    install_s = time.perf_counter() - t0
    r = subprocess.run([a.python, "-c", f"import {a.import_name}"], capture_output=True, text=True)
    if r.returncode != 0:
        return done(SKIP, outcome="skip", install_s=round(install_s, 1),
                    reason=f"import {a.import_name} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    work = Path(a.workdir or Path(a.log).resolve().parent / "steps" / rec["commit"][:12])
    t1 = time.perf_counter()
    rows = []
    try:
        for i in range(a.repeat):
            d = work / f"repeat-{i}"
            d.mkdir(parents=True, exist_ok=True)
            rows.append(pred(a.python, d))
    except Exception as e:  # noqa: BLE001 - a harness crash must abort, not mark the commit bad
        return done(ABORT, outcome="abort", reason=f"predicate crashed: {type(e).__name__}: {e}")
    verdicts = [r["verdict"] for r in rows]
    unjudged = [r for r in rows if r["verdict"] in UNJUDGED]
    if unjudged:   # an error is never a verdict: git bisect skips this commit
        return done(SKIP, outcome="skip", verdicts=verdicts, install_s=round(install_s, 1),
                    reason=f"{pred.name} could not judge this commit: {unjudged[0]['verdict']}: "
                           f"{unjudged[0].get('message', '')[:300]}")
    outcome = judge(verdicts, a.mode, a.reference)
    return done(GOOD if outcome == "good" else BAD, outcome=outcome, verdicts=verdicts,
                messages=[r.get("message", "")[:300] for r in rows], install_s=round(install_s, 1),
                run_s=round(time.perf_counter() - t1, 1))


if __name__ == "__main__":
    raise SystemExit(main())
