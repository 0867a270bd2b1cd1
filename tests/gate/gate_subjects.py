"""A plugin subject whose behaviour a test picks through DSV4_GATE_VARIANT: the same subject name across
runs, as a vLLM upgrade would be (good -> regressed, or a backend switch).

Variants: ``good`` (the gfx942 serving numerics, backend torch), ``triton`` (same numbers, backend
triton), ``truncating`` (rounds toward zero: fails), ``crash`` (the process dies mid-run).
"""

import os

from conformance.subjects import Impl, Subject, SubjectInfo, load_subject


class Switchable(Subject):
    name = "switchable"

    def __init__(self):
        self.variant = os.environ.get("DSV4_GATE_VARIANT", "good")

    def info(self):
        return SubjectInfo("switchable", f"gate test subject ({self.variant})", "cpu", "float8_e4m3fnuz", False,
                           profile="gfx942")

    def provides(self):
        if self.variant == "truncating":
            from tests.harness.fake_subjects import truncating_gfx942

            fn = truncating_gfx942().provides()["quant.act_fp8"].fn
        else:
            fn = load_subject("emulated:gfx942").provides()["quant.act_fp8"].fn
        if self.variant == "crash":
            def fn(x, group=128):  # noqa: F811 - a hard crash, as a segfaulting kernel would
                os._exit(139)
        backend = "triton" if self.variant == "triton" else "torch"
        return {"quant.act_fp8": Impl(fn, function=f"tests.gate.act_quant_{backend}", backend=backend)}


def switchable():
    return Switchable()


class WholeModel(Switchable):
    """Serves a 'whole model' through the e2e hook: logits rows whose verdict follows DSV4_GATE_VARIANT
    (``good`` passes, ``truncating`` fails), as a vLLM release that broke the model output would."""
    name = "wholemodel"

    def e2e(self, out_dir):
        from conformance.results import CheckResult

        ok = self.variant != "truncating"
        return [CheckResult(self.name, "e2e/tiny/logits", "model", "e2e", "golden", "pass" if ok else "fail",
                            message=f"logits {'within' if ok else 'beyond'} bound ({self.variant})"),
                CheckResult(self.name, "e2e/tiny/greedy", "model", "e2e", "golden", "pass")]


def wholemodel():
    return WholeModel()
