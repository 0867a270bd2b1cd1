"""The layers stay acyclic (DESIGN.md): references <- cases <- checks / suite <- reports, and the product's
import graph holds no test-only code. Read from the source (ast), so a lazy import inside a function counts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package (as a path prefix) -> module prefixes it must never import
RULES = {
    "references": ("conformance", "reports", "tests", "vllm", "transformers"),
    "conformance/cases": ("conformance.checks", "conformance.suite", "conformance.subjects", "conformance.plugin",
                          "reports", "tests"),
    "conformance": ("tests",),
    "reports": ("tests",),
}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) for every import statement in ``path``, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            # ``from .. import checks`` imports a module through its name
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def violations(prefix: str, banned: tuple[str, ...], root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / prefix).rglob("*.py")):
        seen = set()
        for line, mod in imports(path, root):
            hit = any(mod == b or mod.startswith(b + ".") for b in banned)
            if hit and line not in seen:     # one row per import statement
                seen.add(line)
                bad.append(f"{path.relative_to(root)}:{line} imports {mod}")
    return bad


@pytest.mark.parametrize("prefix", sorted(RULES))
def test_layer_imports_nothing_above_it(prefix):
    bad = violations(prefix, RULES[prefix])
    assert not bad, f"{prefix} must not import {RULES[prefix]}:\n" + "\n".join(bad)


def test_the_rule_fires_on_a_case_module_that_imports_checks(tmp_path):
    """The detector itself: a case module importing the checks layer (relative or absolute) is named, and a
    sibling import is not."""
    cases = tmp_path / "conformance" / "cases"
    cases.mkdir(parents=True)
    (cases / "_layering_probe_tmp.py").write_text(
        "from ..checks.routing import run_routing\nimport conformance.suite\nfrom ._case import Case\n")
    bad = violations("conformance/cases", RULES["conformance/cases"], root=tmp_path)
    assert len(bad) == 2, bad
    assert any("_layering_probe_tmp.py:1 imports conformance.checks.routing" in b for b in bad), bad
    assert any("_layering_probe_tmp.py:2 imports conformance.suite" in b for b in bad), bad
