"""The tested dependency set (constraints/cpu.txt): write it, and report drift against it.

    python ci/deps.py lock  --out constraints/cpu.txt          # freeze this Python's packages as the tested set
    python ci/deps.py check --constraints constraints/cpu.txt  # every installed package at its pin (CI)
    python ci/deps.py drift --constraints constraints/cpu.txt --out out/latest [-- pytest args]

``lock`` is run by ``nox -s lock`` in a fresh venv that installed the newest releases the CPU sessions ask for;
``drift`` by ``nox -s latest`` in a fresh venv with the newest releases of the test session's packages. Drift:

1. lists every package whose installed version differs from the pinned one (and packages not pinned);
2. runs the test suite with ``DSV4_QUIRK_LOG`` set, so every third-party quirk probed is logged
   (tests/quirks.py), and compares each logged behaviour with the one recorded for the pinned release: a
   difference names that package as having changed behaviour;
3. for failing tests, reverts one drifted package at a time to its pinned version (``--no-deps``), reruns the
   failing tests, and names the package whose revert makes them pass.

Exit status: 0 when nothing changed behaviour and no test failed, 1 otherwise, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.quirks import record_for  # noqa: E402  (one definition of "the record for a release")

HEADER = """\
# The tested dependency set of the CPU sessions and CI (nox -s tests / cpu / gate / lint, .ci/run).
# Every package with its exact version, as `pip freeze` printed it in the venv that ran the suite.
# Installs pass it with `-c` (constraints: it pins what gets installed, installs nothing by itself).
# Device sessions (gfx942, gfx950, cuda) keep the platform's own torch and vLLM and never use it.
# Refresh: `nox -s lock` (fresh venv, newest releases of what the sessions ask for, then this file),
# then run `nox -s tests` and `nox -s cpu` through it before committing. `nox -s latest` reports drift.
# Written by ci/deps.py lock with Python {python}.
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str) -> dict[str, str]:
    """``name==version`` lines -> {normalised name: version}; comments, blanks and editables ignored."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        if "==" not in line:
            raise ValueError(f"constraint line {line!r} is not name==version")
        name, version = line.split("==", 1)
        pins[_norm(name.split("[")[0])] = version.strip()
    return pins


def freeze(python: str = sys.executable) -> dict[str, str]:
    out = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    return parse_pins(out)


def diff(pinned: dict[str, str], installed: dict[str, str]) -> tuple[dict, dict]:
    """-> (changed {name: (pinned, installed)}, unpinned {name: installed})."""
    changed = {n: (pinned[n], v) for n, v in installed.items() if n in pinned and pinned[n] != v}
    unpinned = {n: v for n, v in installed.items() if n not in pinned}
    return changed, unpinned


def classify_quirks(entries: list[dict], pinned: dict[str, str]) -> list[dict]:
    """Each logged quirk (an unrecorded release's probe) against the behaviour recorded for the pinned release:
    status ``changed`` (differs: this package's new release changed behaviour), ``same`` or ``no-record``."""
    seen, out = set(), []
    for e in entries:
        key = (e["quirk"], e["version"])
        if key in seen:
            continue
        seen.add(key)
        pin = pinned.get(_norm(e["library"]))
        rec = record_for(e["recorded"], pin) if pin else None
        if rec is None:
            status, was = "no-record", None
        else:
            was = rec[1]
            status = "same" if was == e["observed"] else "changed"
        out.append(dict(e, pinned=pin, pinned_behaviour=was, status=status))
    return out


def failed_tests(junit: Path) -> list[str]:
    """Node ids of failing or erroring tests in a pytest junit file."""
    ids = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is None and case.find("error") is None:
            continue
        cls, name = case.get("classname", ""), case.get("name", "")
        path = cls.replace(".", "/")
        # classname is "tests.formats.test_x" or "tests.formats.test_x.TestClass"
        parts = path.split("/")
        for i in range(len(parts), 0, -1):
            if Path(*parts[:i]).with_suffix(".py").exists():
                ids.append("::".join(["/".join(parts[:i]) + ".py", *parts[i:], name]))
                break
        else:
            ids.append(f"{path}::{name}")
    return ids


def _pytest(args: list[str], env: dict) -> int:
    return subprocess.run([sys.executable, "-m", "pytest", *args], env=env).returncode


def _pip(*args: str) -> bool:
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                        *args], capture_output=True, text=True)
    if r.returncode:
        print(f"  pip install {' '.join(args)} failed: {r.stderr.strip().splitlines()[-1:]}")
    return r.returncode == 0


def attribute(failing: list[str], changed: dict[str, tuple[str, str]], env: dict) -> dict[str, list[str]]:
    """Revert each changed package alone to its pinned release, rerun the failing tests, restore it.
    -> {package: tests that pass once it is reverted}."""
    blamed = {}
    for name, (pin, new) in sorted(changed.items()):
        if name in ("pip", "setuptools", "wheel"):
            continue
        if not _pip(f"{name}=={pin}"):
            continue
        try:
            junit = Path(env["DSV4_DRIFT_OUT"]) / f"revert-{name}.xml"
            _pytest([*failing, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"], env)
            still = set(failed_tests(junit)) if junit.exists() else set(failing)
            fixed = [t for t in failing if t not in still]
            if fixed:
                blamed[name] = fixed
        finally:
            _pip(f"{name}=={new}")
    return blamed


def drift(constraints: Path, out: Path, pytest_args: list[str]) -> int:
    pinned = parse_pins(constraints.read_text())
    installed = freeze()
    changed, unpinned = diff(pinned, installed)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "quirks.jsonl"
    log.unlink(missing_ok=True)
    env = dict(os.environ, DSV4_QUIRK_LOG=str(log), DSV4_DRIFT_OUT=str(out))
    junit = out / "junit.xml"
    args = pytest_args or ["tests", "-n", "2", "-q", "-p", "no:cacheprovider"]
    rc = _pytest([*args, f"--junitxml={junit}"], env)
    failing = failed_tests(junit) if junit.exists() else []
    quirks = classify_quirks([json.loads(x) for x in log.read_text().splitlines()] if log.exists() else [], pinned)
    blamed = attribute(failing, changed, env) if failing else {}

    lines = [f"# Drift against {constraints} (Python {sys.version.split()[0]})", ""]
    lines.append(f"## Packages newer or older than pinned ({len(changed)})")
    lines += [f"- {n}: {p} -> {v}" for n, (p, v) in sorted(changed.items())] or ["- none"]
    if unpinned:
        lines.append(f"- not pinned: {', '.join(f'{n} {v}' for n, v in sorted(unpinned.items()))}")
    lines += ["", "## Third-party behaviour (each quirk of tests/quirks.py against the record of its pinned release)"]
    changed_q = [q for q in quirks if q["status"] == "changed"]
    for q in quirks:
        if q["status"] == "same":
            continue
        was = f"{q['pinned_behaviour']!r} at pinned {q['pinned']}" if q["pinned_behaviour"] is not None else \
            f"no record for pinned {q['pinned']}"
        rel = "" if q.get("recorded_release") else ", release not recorded"
        lines.append(f"- {q['status'].upper()}: {q['library']} {q['version']}{rel}: {q['what']}: {q['observed']!r} "
                     f"({was}) [{q['quirk']}]")
    same = [q for q in quirks if q["status"] == "same"]
    lines.append(f"- same as pinned: {len(same)} quirks" + (
        f" ({', '.join(sorted({q['library'] + ' ' + q['version'] for q in same}))})" if same else ""))
    if not quirks:
        lines.append("- no quirk was logged (DSV4_QUIRK_LOG not honoured?): behaviour NOT compared")
    lines += ["", f"## Test suite: exit {rc}, {len(failing)} failing"]
    lines += [f"- {t}" for t in failing]
    if failing:
        lines += ["", "## Attribution (failing tests that pass once one package is reverted to its pin)"]
        lines += [f"- {n} {changed[n][1]} (pinned {changed[n][0]}): {', '.join(ts)}" for n, ts in blamed.items()]
        unexplained = [t for t in failing if not any(t in ts for ts in blamed.values())]
        if unexplained:
            lines.append(f"- not explained by any single package: {', '.join(unexplained)}")
    names = sorted({_norm(q["library"]) for q in changed_q} | set(blamed))
    lines += ["", "## Verdict", f"- packages whose new release changed behaviour: {', '.join(names) or 'none'}"]
    text = "\n".join(lines) + "\n"
    (out / "drift.md").write_text(text)
    print(text)
    return 1 if (failing or changed_q or not quirks or rc not in (0, 5)) else 0


def check(constraints: Path) -> int:
    """Every installed package is pinned, at its pinned version (CI runs it after the suite)."""
    changed, unpinned = diff(parse_pins(constraints.read_text()), freeze())
    for n, (p, v) in sorted(changed.items()):
        print(f"deps: {n} {v} installed, {constraints} pins {p}")
    for n, v in sorted(unpinned.items()):
        print(f"deps: {n} {v} installed, not pinned in {constraints}")
    if changed or unpinned:
        print(f"deps: the installed set is not the tested set ({len(changed)} at another version, "
              f"{len(unpinned)} unpinned): refresh with `nox -s lock`")
        return 1
    print(f"deps: all {len(freeze())} installed packages are at their pinned versions ({constraints})")
    return 0


def lock(out: Path) -> int:
    pins = freeze()
    body = "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(HEADER.format(python=sys.version.split()[0]) + body)
    print(f"wrote {out}: {len(pins)} packages")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="ci/deps.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    lk = sub.add_parser("lock")
    lk.add_argument("--out", type=Path, default=Path("constraints/cpu.txt"))
    ck = sub.add_parser("check")
    ck.add_argument("--constraints", type=Path, default=Path("constraints/cpu.txt"))
    dr = sub.add_parser("drift")
    dr.add_argument("--constraints", type=Path, default=Path("constraints/cpu.txt"))
    dr.add_argument("--out", type=Path, default=Path("out/latest"))
    a = ap.parse_args(argv)
    if a.cmd == "lock":
        return lock(a.out)
    if not a.constraints.is_file():
        print(f"{a.cmd}: --constraints {a.constraints}: no such file", file=sys.stderr)
        return 2
    if a.cmd == "check":
        return check(a.constraints)
    return drift(a.constraints, a.out, rest)


if __name__ == "__main__":
    sys.exit(main())
