"""compare: a component one run judges and the other does not provide (a vLLM release without that function) is
'provided-changed', never worse or better; the gate still treats a judged baseline row turned unjudged as a
regression."""

from conformance.compare import compare
from conformance.store import Run


def _row(case, verdict, function="vllm.f", msg=""):
    return {"subject": "vllm", "case_id": case, "component": case.split("/")[0], "check": "numeric",
            "level": "golden", "verdict": verdict, "function": function, "backend": "compiled", "message": msg}


def _run(path, rows):
    return Run(path=path, manifest={"arch": "cpu"}, rows=rows)


def test_not_provided_on_one_side_is_provided_changed_not_worse_or_better():
    a = _run("a", [_row("mhc.head/x", "pass"), _row("mhc.post/x", "pass"), _row("mhc.pre/x", "not-provided", "")])
    b = _run("b", [_row("mhc.head/x", "not-provided", "", "vLLM 0.30.0: torch.ops._C.hc_head_fused_cpu is not "
                                                         "registered"),
                   _row("mhc.post/x", "fail"), _row("mhc.pre/x", "pass")])
    c = compare(a, b, [])
    assert [ch.case_id for ch in c.worse] == ["mhc.post/x"]            # a real verdict change still counts
    assert not c.better
    assert sorted(ch.case_id for ch in c.provided_changed) == ["mhc.head/x", "mhc.pre/x"]
    head = next(ch for ch in c.provided_changed if ch.case_id == "mhc.head/x")
    assert "pass -> not-provided" in head.reasons[0] and "hc_head_fused_cpu is not registered" in head.reasons[0]
    assert c.counts["provided-changed"] == 2 and c.counts["worse"] == 1


def test_same_function_both_sides_is_unchanged_and_a_changed_function_is_reported():
    a = _run("a", [_row("mhc.head/x", "pass"), _row("mhc.post/x", "pass", "vllm.old")])
    b = _run("b", [_row("mhc.head/x", "pass"), _row("mhc.post/x", "pass", "vllm.new")])
    c = compare(a, b, [])
    assert c.unchanged == 1 and not c.provided_changed and not c.worse
    assert [ch.case_id for ch in c.backend_changed] == ["mhc.post/x"]
