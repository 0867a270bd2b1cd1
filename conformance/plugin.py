"""pytest plugin: options, subject loading, per-case result capture, report at the end of the session.

Hooks only; run state lives in one ``ConformanceRun`` object on ``config``. Under pytest-xdist every
worker writes its own results file and the controller renders the report once all workers finished.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from .results import FAILING, ResultWriter

DEFAULT_OUT = "out/conformance"


def pytest_addoption(parser):
    g = parser.getgroup("dsv4-conformance")
    g.addoption("--subject", action="append", default=[],
                help="implementation under test: reference | emulated:<gfx942|ocp> | transformers | vllm | "
                     "vllm-triton:<gfx942|ocp> | module:factory[@profile] (repeatable)")
    g.addoption("--out", default=DEFAULT_OUT, help=f"output folder for results and the report ({DEFAULT_OUT})")
    g.addoption("--case", action="append", default=[], help="run only this case id (repeatable)")
    g.addoption("--component", action="append", default=[], help="run only cases of this component")
    g.addoption("--tier", default="fast", choices=("fast", "full"),
                help="fast (default): every case but the big shapes; full: also the big shapes (long contexts, "
                     "large pools); a case named with --case runs whatever its tier")
    g.addoption("--baseline", default=None,
                help="run folder or baseline file to compare this run against at the end (writes compare.html; "
                     "the verdicts of this run are not changed: use `python -m conformance gate` to gate)")
    g.addoption("--no-report", action="store_true", help="do not render the HTML report at the end")
    g.addoption("--append", action="store_true", help="keep earlier results in --out (default: start fresh)")
    g.addoption("--checkpoint", default=None, metavar="PATH",
                help="e2e: serve this DSV4 checkpoint folder (official layout, config.json + "
                     "model.safetensors.index.json) instead of the written tiny one; the golden streams it one "
                     "layer at a time (nox sessions: DSV4_CHECKPOINT=PATH)")
    g.addoption("--isolate", default="auto", choices=("auto", "fork", "none"),
                help="run each case's subject code in a forked child so a crash (segfault, abort, os._exit, OOM "
                     "kill, MemoryError, timeout) becomes a 'crashed' row (auto, the default: fork unless CUDA is "
                     "initialised in the pytest process; see conformance.isolate)")
    g.addoption("--case-timeout", type=float, default=None, metavar="SECONDS",
                help="a case running longer is killed and reported 'crashed' (timeout); default "
                     "900 s (DEFAULT_CASE_TIMEOUT in conformance/isolate.py), 0 = no timeout")
    g.addoption("--golden-checkpoint", default=None, metavar="PATH",
                help="e2e, with --checkpoint: the golden streams this folder instead (same architecture; e.g. "
                     "the FP8/MXFP4 release layout while vLLM's CPU build serves the bf16 variant)")


class ConformanceRun:
    def __init__(self, config):
        self.config = config
        self.out = Path(config.getoption("--out"))
        self.subject_specs = config.getoption("--subject") or []
        self._subjects = {}
        self.writer = None
        self.emulated_cache: dict = {}
        self.checkpoint = config.getoption("--checkpoint")
        self.golden_checkpoint = config.getoption("--golden-checkpoint")
        from .isolate import DEFAULT_CASE_TIMEOUT

        t = config.getoption("--case-timeout")
        self.case_timeout = DEFAULT_CASE_TIMEOUT if t is None else float(t)
        self.isolate_requested = config.getoption("--isolate")
        self.isolation, self.isolation_why = "none", "not chosen yet"
        wi = getattr(config, "workerinput", None)
        self.workers = (wi.get("workercount") if wi else None) or getattr(config.option, "numprocesses", None)
        self.rows_written = 0

    def subject(self, spec: str):
        if spec not in self._subjects:
            from .subjects import load_subject

            self._subjects[spec] = load_subject(spec)
        return self._subjects[spec]

    def ensure_writer(self):
        if self.writer is None:
            self.writer = ResultWriter(self.out)
        return self.writer

    def write(self, row):
        self.ensure_writer().write(row)
        self.rows_written += 1

    def rerun_command(self, subject: str, case_id: str) -> str:
        return ("python -m conformance rerun " + shlex.quote(case_id) + " --subject " + shlex.quote(subject))


def _is_controller(config) -> bool:
    return not hasattr(config, "workerinput")


def pytest_configure(config):
    config.addinivalue_line("markers", "conformance: a conformance case against a subject")
    if hasattr(config, "workerinput"):
        # pytest-xdist: one process per core already; torch's own thread pool on top oversubscribes the cores
        # (measured on 2 cores: 82 s with 2 threads per worker against 16 s with 1)
        import os

        import torch

        workers = int(config.workerinput.get("workercount", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    run = ConformanceRun(config)
    config._dsv4_run = run
    if not run.subject_specs:
        return
    from .subjects import SubjectError, prepare_process

    prepare_process(run.subject_specs)
    if run.case_timeout < 0:
        raise pytest.UsageError(f"--case-timeout {run.case_timeout:g}: give seconds >= 0 (0: no timeout)")
    if run.golden_checkpoint is not None and run.checkpoint is None:
        raise pytest.UsageError("--golden-checkpoint needs --checkpoint (the folder vLLM serves)")
    for opt, path in (("--checkpoint", run.checkpoint), ("--golden-checkpoint", run.golden_checkpoint)):
        if path is not None:
            _check_checkpoint_arg(path, opt)
    # Fail fast, in one sentence, before collecting anything: unknown subject, missing package, no device.
    for spec in run.subject_specs:
        try:
            run.subject(spec)
        except SubjectError as e:
            raise pytest.UsageError(str(e)) from None
    from .isolate import choose_mode

    run.isolation, run.isolation_why = choose_mode(run.isolate_requested)
    if _is_controller(config):
        from . import env

        run.out.mkdir(parents=True, exist_ok=True)
        # a run owns its folder: results of an earlier run there would mix into this report
        old = run.out / "results"
        if old.exists() and not config.getoption("--append"):
            for f in old.glob("*.jsonl"):
                f.unlink()
        infos = {}
        for spec in run.subject_specs:
            i = run.subject(spec).info()
            infos[spec] = {"name": i.name, "implementation": i.implementation, "device": i.device,
                           "dialect": i.dialect, "emulated": i.emulated, "profile": i.profile,
                           "versions": i.versions, "shims": list(i.shims), "banner": i.banner,
                           "simulated": i.simulated,
                           "not_provided": dict(getattr(run.subject(spec), "not_provided", dict)()),
                           "provides": {k: {"function": v.function, "backend": v.backend, "note": v.note}
                                        for k, v in run.subject(spec).provides().items()}}
        from .store import write_manifest

        captured = env.capture()
        argv = list(sys.argv)
        if argv and argv[0].endswith(("conformance/__main__.py", "conformance\\__main__.py")):
            argv[0:1] = ["python", "-m", "conformance"]
        command = " ".join(shlex.quote(a) for a in argv)
        (run.out / "subjects.json").write_text(json.dumps(infos, indent=1))
        (run.out / "env.json").write_text(json.dumps(captured, indent=1))
        (run.out / "command.txt").write_text(command + "\n")
        mp = write_manifest(run.out, subjects=infos, env=captured, command=command, argv=list(sys.argv))
        m = json.loads(mp.read_text())
        m.update(isolation=run.isolation, isolation_why=run.isolation_why, case_timeout_s=run.case_timeout,
                 workers=run.workers)
        mp.write_text(json.dumps(m, indent=1, default=str))


def _check_checkpoint_arg(path: str, opt: str = "--checkpoint") -> None:
    """--checkpoint: the folder must exist and hold a readable config.json and index (a usage error, one
    sentence, before any case runs). Tensor-level defects (truncated shard, missing tensor, wrong dtype or
    shape) are found by the e2e check's header scan and reported as a failing e2e/load row."""
    from conformance.checks.e2e import CheckpointRefused
    from references.checkpoints.reader import CheckpointError, CheckpointReader

    p = Path(path)
    try:
        if not p.exists():
            raise CheckpointRefused(f"no such file or directory: {path}")
        if not p.is_dir():
            raise CheckpointRefused(f"{path} is not a directory (give the folder with config.json and "
                                    "model.safetensors.index.json)")
        CheckpointReader(p)
    except (CheckpointRefused, CheckpointError) as e:
        msg = str(e)
        raise pytest.UsageError(f"{opt}: {msg}") from None


# Row families of the whole-suite tests (one test per subject, many rows): a --case of another family deselects
# them, so a rerun or a bisect step of one case runs only the test that produces its row.
WHOLE_SUITE = {"test_dialect_map": "dialect/", "test_e2e": "e2e/", "test_graph_replay": "graph/",
               "test_e2e_v41": "e2e-v41/"}
WHOLE_SUITE_PREFIXES = tuple(WHOLE_SUITE.values())


def pytest_collection_modifyitems(config, items):
    want = config.getoption("--case", default=None) or []
    if not want:
        return
    op_wanted = any(not c.startswith(WHOLE_SUITE_PREFIXES) for c in want)
    keep, drop = [], []
    for it in items:
        name = getattr(it, "originalname", None) or it.name.split("[")[0]
        fam = WHOLE_SUITE.get(name)
        if fam is not None:
            wanted = any(c.startswith(fam) for c in want)
        elif "conformance_case" in getattr(it, "fixturenames", ()):
            # a suite none of whose cases was asked for has an empty parameter set: deselected, not skipped
            cs = getattr(it, "callspec", None)
            wanted = op_wanted and cs is not None and hasattr(cs.params.get("conformance_case"), "component")
        else:
            wanted = True
        (keep if wanted else drop).append(it)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_generate_tests(metafunc):
    if "conformance_subject_only" in metafunc.fixturenames:
        specs = metafunc.config._dsv4_run.subject_specs
        if not specs:
            raise pytest.UsageError("the conformance suite needs at least one --subject")
        metafunc.parametrize("conformance_subject_only", specs, ids=specs)
        return
    if "conformance_case" not in metafunc.fixturenames:
        return
    from .cases import all_cases

    run = metafunc.config._dsv4_run
    if not run.subject_specs:
        raise pytest.UsageError("the conformance suite needs at least one --subject")
    want_cases = set(metafunc.config.getoption("--case"))
    want_comp = set(metafunc.config.getoption("--component"))
    full = metafunc.config.getoption("--tier") == "full"
    cases = [c for c in all_cases() if (c.id in want_cases if want_cases else (full or c.tier == "fast"))
             and (not want_comp or c.component in want_comp)]
    op_wanted = {c for c in want_cases if not c.startswith(WHOLE_SUITE_PREFIXES)}
    unknown = op_wanted - {c.id for c in cases}
    if unknown:
        raise pytest.UsageError(f"no case has id {sorted(unknown)}")
    params, ids = [], []
    for s in run.subject_specs:
        for c in cases:
            if getattr(metafunc.module, "select", lambda c: True)(c):
                params.append((s, c))
                ids.append(f"{s}::{c.id}")
    metafunc.parametrize("conformance_subject,conformance_case", params, ids=ids)


@pytest.fixture
def conformance_run(request):
    return request.config._dsv4_run


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Conformance tests run isolated (conformance.isolate): a crash, a hang or a MemoryError is a row."""
    run = getattr(pyfuncitem.config, "_dsv4_run", None)
    if run is None or not run.subject_specs or "conformance_run" not in pyfuncitem.fixturenames:
        return None
    from .isolate import describe, run_forked, run_in_process

    d = describe(pyfuncitem, run)
    if d is None:
        return None
    if run.isolation == "fork":
        return run_forked(pyfuncitem, run, d)
    return run_in_process(pyfuncitem, run, d)


def record(run: ConformanceRun, rows) -> None:
    """Write rows, then turn the worst verdict into the pytest outcome (with the diagnostic message)."""
    for r in rows:
        run.write(r)
    bad = [r for r in rows if r.verdict in FAILING]
    if bad:
        pytest.fail("\n".join(f"{r.verdict.upper()} {r.message}\n  rerun: {r.rerun}" for r in bad), pytrace=False)
    missing = [r for r in rows if r.verdict in ("not-provided", "needs-gpu", "not-run")]
    if missing:
        pytest.skip("; ".join(f"{r.verdict}: {r.message}" for r in missing))


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    run = getattr(config, "_dsv4_run", None)
    if run is None or not run.subject_specs or not _is_controller(config):
        return
    from .isolate import adopt_orphans
    from .store import finish_manifest

    adopted = adopt_orphans(run.out, all_dead=True)   # every worker has ended: a marker left is a dead case
    finish_manifest(run.out, int(exitstatus))
    if config.getoption("--no-report"):
        return
    from reports.render import render_report

    path = render_report(run.out)
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        if adopted:
            tr.write_line(f"DSV4 conformance: {adopted} case(s) whose process died were recorded as crashed")
        tr.write_line(f"DSV4 conformance report: {path}")
    baseline = config.getoption("--baseline")
    if baseline:
        from reports.render import render_compare

        from .compare import compare, format_text
        from .store import load_run

        c = compare(load_run(baseline), load_run(run.out))
        render_compare(c, run.out / "compare.html")
        if tr is not None:
            for line in format_text(c, limit=10).splitlines():
                tr.write_line(line)
            tr.write_line(f"comparison with {baseline}: {run.out / 'compare.html'}")
