"""Every case that starts ends as a row: subject code runs in a forked child, a crash is a ``crashed`` row.

``--isolate fork`` (the default where it is safe): each conformance test body runs in a child process forked
from the pytest process (``os.fork``: the loaded subjects are inherited copy-on-write, nothing is imported
again). The child writes its rows to the parent's results file and reports its pytest outcome (pass, fail,
skip, exception) through a pipe. When the child dies instead (a segfault or abort in a kernel, ``os._exit``,
the out-of-memory killer's SIGKILL), raises ``MemoryError``, or runs past ``--case-timeout`` (then it is
killed), the parent writes one row with verdict ``crashed`` for the case: the signal or exit code, the last
lines the case printed (its stdout and stderr, with faulthandler's traceback of a fatal signal), the log file
and the commands that rerun it. Neither the pytest process nor an xdist worker dies, so ``-n 0`` and ``-n 2``
give the same rows and the report is always written.

``--isolate none`` runs the body in the pytest process (and is the choice of ``auto`` once CUDA is
initialised in the parent, since a forked child cannot use it). Then a crash still leaves its trace: before a
case starts, an in-flight marker (``results/<worker>-<pid>.inflight.json``, the crashed row it would become) is
written and removed when the case ends. ``adopt_orphans`` turns the marker of a process that is gone into a
``crashed`` row: the controller does it at the end of the session (an xdist worker that died), and
``python -m conformance report DIR`` does it for a run whose process died (``-n 0``). A per-case timeout then
exits the process through ``faulthandler.dump_traceback_later`` (the marker becomes the row).
"""

from __future__ import annotations

import faulthandler
import json
import os
import select
import shlex
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest

from .results import CheckResult

DEFAULT_CASE_TIMEOUT = 900.0     # seconds; the longest fast-tier case on the 2-core CPU takes about 150 s
TAIL_LINES = 20
ISOLATE_MODES = ("auto", "fork", "none")

_SIGNAL_HINT = {signal.SIGSEGV: "segmentation fault", signal.SIGABRT: "abort",
                signal.SIGKILL: "SIGKILL: the out-of-memory killer, a timeout or an external kill",
                signal.SIGBUS: "bus error", signal.SIGFPE: "floating-point exception",
                signal.SIGILL: "illegal instruction"}


def choose_mode(requested: str) -> tuple[str, str]:
    """(mode, why) for ``--isolate``: auto -> fork unless fork is unavailable or CUDA is initialised here."""
    if requested == "none":
        return "none", "--isolate none"
    if not hasattr(os, "fork"):
        if requested == "fork":
            raise pytest.UsageError("--isolate fork: this platform has no os.fork")
        return "none", "this platform has no os.fork"
    try:
        import torch

        cuda = bool(torch.cuda.is_initialized())
        device = bool(torch.cuda.is_available())     # NVML/HIP query: does not initialise CUDA
    except Exception:  # noqa: BLE001 - no torch / no CUDA build: nothing to break
        cuda = device = False
    if cuda:
        if requested == "fork":
            raise pytest.UsageError("--isolate fork: CUDA is initialised in the pytest process and a forked child "
                                    "cannot use it; use --isolate none (crashes then leave in-flight markers)")
        return "none", "CUDA is initialised in the pytest process (a forked child cannot use it)"
    if device and requested == "auto":
        # a GPU subject initialises CUDA in this process (info(), loading its kernels) after the mode is chosen,
        # and every forked case would then fail with "Cannot re-initialize CUDA in forked subprocess"
        return "none", "a CUDA/ROCm device is present (subjects initialise CUDA, which a forked child cannot use)"
    return "fork", "--isolate fork" if requested == "fork" else "auto: fork"


# ---- what the case is -----------------------------------------------------------------------------------

def describe(item, run) -> dict | None:
    """Subject, case id, component, check of a conformance test item (None for other tests)."""
    cs = getattr(item, "callspec", None)
    params = cs.params if cs is not None else {}
    mod = getattr(item, "module", None)
    check = (getattr(mod, "__name__", "") or "").rsplit(".", 1)[-1].removeprefix("test_") or "?"
    if "conformance_case" in params:
        c = params["conformance_case"]
        return {"subject": params["conformance_subject"], "case_id": c.id, "component": c.component,
                "check": check, "params": dict(c.params), "seed": c.seed}
    if "conformance_subject_only" in params:
        s = params["conformance_subject_only"]
        comp = {"dialect": "dialect_map", "e2e": "model", "e2e_v41": "model"}.get(check, check)
        return {"subject": s, "case_id": f"{check}/{'map' if check == 'dialect' else 'run'}", "component": comp,
                "check": check, "params": {}, "seed": None}
    if "graph_case" in params:
        return {"subject": "reference", "case_id": f"graph/{params['graph_case']}", "component": params["graph_case"],
                "check": "graph", "params": {}, "seed": None}
    return None


def rerun_commands(run, d: dict) -> tuple[str, str]:
    """(the case's rerun command, the run command narrowed to this case with the run's -n)."""
    rerun = run.rerun_command(d["subject"], d["case_id"])
    args = ["python", "-m", "conformance", "run", "--subject", d["subject"]]
    if d["check"] in ("numeric", "routing"):
        args += ["--case", d["case_id"]]
    args += ["--case-timeout", f"{run.case_timeout:g}"]
    if run.workers:
        args += ["-n", str(run.workers)]
    args += ["--out", "out/rerun-crashed"]
    if d["check"] not in ("numeric", "routing"):
        args += ["--", "-k", f"test_{d['check']}"]
    return rerun, " ".join(shlex.quote(a) for a in args)


def crashed_row(run, d: dict, *, what: str, crash: dict, tail: list[str], duration: float) -> CheckResult:
    info = {}
    fn, backend = "", ""
    try:
        subj = run.subject(d["subject"])
        i = subj.info()
        info = {"device": i.device, "dialect": i.dialect, "emulated": i.emulated}
        impl = subj.provides().get(d["component"])
        if impl is not None:
            fn, backend = impl.function, impl.backend
    except Exception:  # noqa: BLE001 - the row must be written even if the subject cannot describe itself now
        pass
    rerun, run_cmd = rerun_commands(run, d)
    last = _last_line(tail)
    msg = (f"[{d['component']} | {d['case_id']} | {d['subject']}] CRASHED: {what}"
           + (f" in {fn} [{backend}]" if fn else "") + (f"; last output: {last.strip()[:400]}" if last else
                                                       "; no output"))
    return CheckResult(d["subject"], d["case_id"], d["component"], d["check"], "-", "crashed", message=msg,
                       function=fn, backend=backend, params=d.get("params") or {}, seed=d.get("seed"),
                       duration_s=round(duration, 3), rerun=rerun,
                       extra={"crash": dict(crash, what=what, output_tail=tail, run_command=run_cmd,
                                            isolation=run.isolation)}, **info)


def describe_status(status: int | None, timed_out: float | None) -> tuple[str, dict]:
    if timed_out is not None:
        return (f"timed out after {timed_out:g} s (--case-timeout; killed)",
                {"kind": "timeout", "timeout_s": timed_out, "signal": int(signal.SIGKILL), "signal_name": "SIGKILL"})
    if status is not None and os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        hint = _SIGNAL_HINT.get(sig)
        return (f"killed by signal {sig} ({name}{': ' + hint if hint and hint != name else ''})",
                {"kind": "signal", "signal": sig, "signal_name": name, "exit_code": 128 + sig})
    code = os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None
    return (f"the process exited with code {code} before the case finished (os._exit / sys.exit in subject code)",
            {"kind": "exit", "exit_code": code})


_DUMP_HEADS = ("Fatal Python error", "Timeout (")


def _tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    """The last lines the case printed. A fatal signal's faulthandler dump is cut to its innermost frames
    (the harness's and pytest's own frames below the test say nothing about the crash)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    fatal = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith(_DUMP_HEADS)), None)
    if fatal is None:
        return lines[-n:]
    keep = lines[max(0, fatal - 6):fatal + 1]
    for ln in lines[fatal + 1:]:
        if "conformance/isolate.py" in ln or "/_pytest/" in ln or "/pluggy/" in ln:
            break
        keep.append(ln)
    return keep[-n:]


def _last_line(tail: list[str]) -> str:
    """The line that says what happened: the fatal error with the innermost frame, else the last line."""
    for i, ln in enumerate(tail):
        if ln.startswith(_DUMP_HEADS):
            frame = next((f.strip() for f in tail[i + 1:] if f.strip().startswith("File ")), "")
            return ln.strip() + (f" (innermost: {frame})" if frame else "")
    return next((ln for ln in reversed(tail) if ln.strip()), "")


# ---- in-flight markers (the safety net without fork) ------------------------------------------------------

def marker_path(run) -> Path:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return run.out / "results" / f"{worker}-{os.getpid()}.inflight.json"


def write_marker(run, d: dict) -> Path:
    p = marker_path(run)
    p.parent.mkdir(parents=True, exist_ok=True)
    row = crashed_row(run, d, what="the process running this case died before the case finished (no row was "
                      "written; isolation " + run.isolation + ")", crash={"kind": "process-died"}, tail=[],
                      duration=0.0)
    p.write_text(json.dumps({"pid": os.getpid(), "started": time.time(), "row": json.loads(row.to_json())}))
    return p


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def adopt_orphans(out: str | Path, *, all_dead: bool = False) -> int:
    """Turn the in-flight markers of processes that are gone (or all, at the end of a session) into crashed
    rows in ``results/orphans.jsonl``. Returns how many."""
    res = Path(out) / "results"
    n = 0
    for p in sorted(res.glob("*.inflight.json")) if res.is_dir() else []:
        try:
            m = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not all_dead and _alive(int(m.get("pid", 0))):
            continue
        row = m["row"]
        row["duration_s"] = round(time.time() - float(m.get("started", time.time())), 3)
        with open(res / "orphans.jsonl", "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        p.unlink(missing_ok=True)
        n += 1
    return n


# ---- the forked child ------------------------------------------------------------------------------------

def _single_threaded_after_fork() -> None:
    """torch's CPU thread pool (GNU OpenMP in the CPU wheels) does not survive fork: a child whose parent has used
    the pool hangs in its first parallel op (measured: ``x.to(torch.float64)`` of a 4000 x 4000 tensor never
    returns; loading vllm-triton runs such a region in the parent, its interpreter self-check). The child therefore
    runs torch single-threaded; its parallel ops, and vLLM's CPU ops, which follow torch's OpenMP setting, then
    run inline."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _call(item):
    args = {a: item.funcargs[a] for a in item._fixtureinfo.argnames}
    return item.obj(**args)


def _child(item, run, w: int, log: Path) -> None:
    res: dict
    _single_threaded_after_fork()
    try:
        os.setpgid(0, 0)       # its own process group: a timeout kills what the case started, too
        fd = os.open(str(log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False, errors="replace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="replace")
        faulthandler.enable(file=sys.stderr, all_threads=True)
        if run.case_timeout:   # where a hang hangs: the stack is in the log before the parent kills it
            faulthandler.dump_traceback_later(run.case_timeout, file=sys.stderr)
        n0 = run.rows_written
        try:
            _call(item)
            res = {"status": "pass"}
        except pytest.skip.Exception as e:
            res = {"status": "skip", "msg": str(e.msg)}
        except pytest.fail.Exception as e:
            res = {"status": "fail", "msg": str(e.msg)}
        except MemoryError:
            res = {"status": "crashed", "what": "raised MemoryError (out of memory)", "kind": "memory",
                   "tb": traceback.format_exc(limit=12)}
        except BaseException as e:  # noqa: BLE001 - every outcome goes to the parent
            res = {"status": "exception", "msg": f"{type(e).__name__}: {e}", "tb": traceback.format_exc(limit=12)}
        res["rows"] = run.rows_written - n0
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(w, json.dumps(res).encode())
    except BaseException:  # noqa: BLE001 - never return into the parent's pytest from a child
        try:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(70)
    os._exit(0)


def run_forked(item, run, d: dict):
    run.ensure_writer()                     # the child appends to this process's results file
    logs = run.out / "case-logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / ("".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{d['subject']}__{d['case_id']}")
                  + f"__{os.getpid()}.log")
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(item, run, w, log)
    os.close(w)
    data, status, timed_out = b"", None, None
    timeout = run.case_timeout
    try:
        while True:
            ready, _, _ = select.select([r], [], [], 0.2)
            if ready:
                chunk = os.read(r, 65536)
                data += chunk
                if chunk:
                    continue
            got, st = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                status = st
                break
            if timeout and time.monotonic() - t0 > timeout + 1.0:   # 1 s for the child's stack dump
                timed_out = timeout
                _kill_group(pid)
                _, status = os.waitpid(pid, 0)
                break
    except BaseException:   # Ctrl-C in the parent: the child goes too
        _kill_group(pid)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        raise
    finally:
        try:
            while True:
                ready, _, _ = select.select([r], [], [], 0)
                chunk = os.read(r, 65536) if ready else b""
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        os.close(r)
    dt = time.monotonic() - t0
    text = log.read_text(errors="replace") if log.exists() else ""
    if text.strip():
        sys.stdout.write(text if text.endswith("\n") else text + "\n")   # pytest's capture shows it on failure
    try:
        res = json.loads(data.decode()) if data else None
    except json.JSONDecodeError:
        res = None
    if res is not None and timed_out is None and res.get("status") != "crashed":
        log.unlink(missing_ok=True)
        st = res["status"]
        if st == "pass":
            return True
        if st == "skip":
            pytest.skip(res["msg"])
        if st == "fail":
            pytest.fail(res["msg"], pytrace=False)
        # an exception the test itself did not turn into rows (a harness defect): still a row, never lost
        if not res.get("rows"):
            _, run_cmd = rerun_commands(run, d)
            row = crashed_row(run, d, what="", crash={}, tail=[], duration=dt)
            row.verdict, row.message = "error", (f"[{d['component']} | {d['case_id']} | {d['subject']}] the test "
                                                 f"raised {res['msg']}")
            row.extra = {"traceback": res.get("tb", "")}
            run.write(row)
        pytest.fail(f"{res['msg']}\n{res.get('tb', '')}", pytrace=False)
    if res is not None and res.get("status") == "crashed":
        what, crash = res["what"], {"kind": res.get("kind", "memory")}
        tail = (text + res.get("tb", "")).splitlines()[-TAIL_LINES:]
    else:
        what, crash = describe_status(status, timed_out)
        tail = _tail(log)
    crash["log"] = str(log)
    row = crashed_row(run, d, what=what, crash=crash, tail=tail, duration=dt)
    run.write(row)
    pytest.fail(f"CRASHED {row.message}\n  rerun: {row.rerun}\n  or: {row.extra['crash']['run_command']}\n"
                f"  log: {log}", pytrace=False)


def _kill_group(pid: int) -> None:
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
            return
        except (ProcessLookupError, PermissionError, OSError):
            continue


def run_in_process(item, run, d: dict):
    """--isolate none: the in-flight marker is the row if this process dies; a hang exits the process."""
    p = write_marker(run, d)
    if run.case_timeout:
        faulthandler.dump_traceback_later(run.case_timeout, exit=True)
    try:
        try:
            _call(item)
        except MemoryError:
            row = crashed_row(run, d, what="raised MemoryError (out of memory)", crash={"kind": "memory"},
                              tail=traceback.format_exc(limit=12).splitlines()[-TAIL_LINES:], duration=0.0)
            run.write(row)
            pytest.fail(f"CRASHED {row.message}\n  rerun: {row.rerun}", pytrace=False)
    finally:
        if run.case_timeout:
            faulthandler.cancel_dump_traceback_later()
        p.unlink(missing_ok=True)
    return True
