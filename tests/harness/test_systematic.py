"""The systematic-error detector (conformance.metrics.systematic_error): a consistent gain or offset fails even
inside every elementwise bound; unbiased rounding of the same magnitude passes; each with a plugin mutant."""

import pytest
import torch

from conformance.cases import cases_for
from conformance.checks.numeric import run_numeric
from conformance.metrics import MIN_CLUSTERS, systematic_error, systematic_verdict
from conformance.subjects import Impl, Subject, SubjectInfo, load_subject

UB = 2.0**-8


def test_round_to_nearest_is_not_systematic_and_a_gain_is():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g, dtype=torch.float64)
    rne = w.float().to(torch.bfloat16).double()
    st = systematic_error(rne, w, UB)
    assert st["clusters"] == 64 and systematic_verdict(st, "y") is None
    assert abs(st["gain_dev"]) < 4 * st["gain_se"] + 1e-12
    for gain in (2.0**-7, -(2.0**-7), 2.0**-8):
        st = systematic_error((w * (1 + gain)).float().to(torch.bfloat16).double(), w, UB)
        why = systematic_verdict(st, "y")
        assert why and "systematic gain" in why and ("+2^" if gain > 0 else "-2^") in why, (gain, st)
    trunc = w.float().view(torch.int32).bitwise_and(~0xFFFF).view(torch.float32).double()  # bf16 by truncation
    assert "systematic gain -2^" in systematic_verdict(systematic_error(trunc, w, UB), "y")
    off = systematic_error(w + UB * w.abs().mean(), w, UB)
    assert "systematic offset" in systematic_verdict(off, "y")


def test_a_shared_per_token_rounding_is_not_systematic():
    """Each token's values share one rounded scalar (a normalisation factor rounded once): up to u per token
    but of random sign across tokens, so the cluster-robust SE absorbs it."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 512, generator=g, dtype=torch.float64)
    factor = 1 + UB * (2 * torch.rand(200, 1, generator=g, dtype=torch.float64) - 1)
    assert systematic_verdict(systematic_error(w * factor, w, UB), "y") is None


def test_too_few_clusters_are_not_judged():
    w = torch.randn(MIN_CLUSTERS - 1, 4096, dtype=torch.float64)
    assert systematic_error(w * (1 + 2.0**-5), w, UB) is None


class Scaled(Subject):
    """emulated:gfx942 with its output for one component multiplied elementwise by ``factor(out)``."""

    def __init__(self, component, factor, name):
        self.component, self.factor, self.name = component, factor, name
        self.base = load_subject("emulated:gfx942").provides()[component].fn

    def info(self):
        return SubjectInfo(self.name, "deliberately broken", "cpu", "float8_e4m3fnuz", False, profile="gfx942")

    def provides(self):
        def fn(**kw):
            out = self.base(**kw)
            if isinstance(out, dict):
                return {k: (v * self.factor(v)).to(torch.bfloat16).float() if v.is_floating_point() else v
                        for k, v in out.items()}
            return (out * self.factor(out)).to(torch.bfloat16).float()
        import inspect
        fn.__signature__ = inspect.signature(self.base)
        return {self.component: Impl(fn, function=f"mutant.{self.name}", backend="torch")}


def _rows(subject, component):
    return [r for case in cases_for(component) for r in run_numeric(subject, case) if r.level == "emulated"]


@pytest.mark.parametrize("component", ["norm.rms", "attn.output"])
def test_one_ulp_gain_fails_at_the_emulated_level_inside_the_elementwise_bound(component):
    gain = Scaled(component, lambda v: 1 + 2.0**-7, f"gain-{component}")
    rows = _rows(gain, component)
    judged = [r for r in rows if any(k.endswith("bias_gain_dev") for k in r.bounds)]
    assert judged, f"no {component} case has >= {MIN_CLUSTERS} tokens"
    for r in judged:
        assert r.verdict == "fail" and "systematic gain +2^-7" in r.message, r.message
    # unbiased noise of the same size per element: the elementwise bound decides, the detector stays quiet
    g = torch.Generator().manual_seed(7)
    noise = Scaled(component, lambda v: 1 + 2.0**-7 * (2 * torch.randint(0, 2, v.shape, generator=g) - 1),
                   f"noise-{component}")
    for r in _rows(noise, component):
        assert "systematic" not in r.message, r.message


def test_power_of_two_scale_truncation_in_the_output_projection_is_caught():
    """Issue #16's example: the o-projection's scale truncated to a power of two (a gain in (0.5, 1]) gave
    calc_diff 0.09 and passed; now its gain is named."""
    import math

    def trunc(v):
        s = v.abs().amax().item()
        return 2.0 ** math.floor(math.log2(s)) / s
    rows = _rows(Scaled("attn.output", trunc, "pow2-scale"), "attn.output")
    assert any(r.verdict == "fail" and "systematic gain -2^" in r.message for r in rows), [r.message for r in rows]
