"""``python -m conformance coverage --subject S``: one row per registered component, provided or the reason."""

from conformance import components
from conformance.cli import main


def test_coverage_lists_every_component(capsys):
    assert main(["coverage", "--subject", "emulated:gfx942"]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| component")]
    assert sorted(r.split(" | ")[0][2:] for r in rows) == sorted(components.load_all())
    n = len(components.load_all())
    assert f"{n} of {n} components provided" in out


def test_coverage_of_an_unknown_subject_is_one_line_and_rc_2(capsys):
    assert main(["coverage", "--subject", "no.such.module:factory"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("coverage: ")
