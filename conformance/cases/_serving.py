"""Shared pieces of the component families: the serving-numerics emulation wrapper and the derived
tolerances at the three levels (fp64 / serving / emulated).

Serving numerics (vLLM on every platform): activations and weights arrive in bf16, the op computes in
fp32, and its float outputs are stored in bf16. The emulation applies exactly those roundings around the
golden reference (plus the FP8 points of ``references.numerics.serving(profile)`` where the reference
takes a ``numerics`` argument).

Tolerance derivations (u32 = 2^-24, ub = 2^-8 = bf16 unit roundoff, n = reduction length):
  fp32      an independent fp32 implementation (transformers): twice the fp32 bound, plus terms it
            legitimately computes in fp32 where the golden uses fp64 (RoPE phases)
  fp64      the fp32 golden's own error: ops * u32 + 6 sqrt(n) u32 (probabilistic bound for the
            reduction, Higham & Mary), relative to the output scale.
  serving   bf16 rounding of the k inputs that feed an output (k ub, first order, relative to the
            magnitude scale of that output: for a dot product sum |a_i b_i|, for elementwise |y|), times
            the op's condition factor ``cond`` where it amplifies (normalisations: 1), plus the bf16 output
            rounding ub, plus the fp32 reduction bound.
  emulated  the subject and the emulation take identical bf16 inputs; they may differ by the fp32
            accumulation order on both sides (2 x 6 sqrt(n) u32) and by one bf16 ulp (2 ub) where the
            outputs round on opposite sides of a tie-adjacent value.
"""

from __future__ import annotations

import inspect

import torch

from references.numerics import serving

from ..tolerances import Tolerance, gamma_prob

U32 = 2.0**-24
UB = 2.0**-8


def level_tolerance(*, n: int, k_inputs: int, ops: int = 4, cond: float = 1.0, what: str,
                    extra_serving: float = 0.0, extra_reason: str = "", atol: float = 0.0,
                    extra_fp32: float = 0.0, stored_fp8: bool = False):
    """A tolerance function (params, level) -> Tolerance following the module docstring."""

    def tol(params: dict, level: str) -> Tolerance:
        g = gamma_prob(n, U32)
        if level == "fp64":
            r = ops * U32 + g
            return Tolerance(atol * U32, r, f"{what}: fp32 golden error {ops}*u32 + 6*sqrt({n})*u32 = {r:.3g}")
        if level == "fp32":
            # an independent fp32 implementation of the same math against the fp32 golden: both carry the
            # fp32 error, plus whatever the implementation legitimately computes in fp32 that the golden
            # computes in fp64 (extra_fp32, e.g. RoPE phases)
            r = 2 * (ops * U32 + g) + extra_fp32
            return Tolerance(atol * U32, r, f"{what}: two fp32 evaluations 2*({ops}*u32 + 6*sqrt({n})*u32)"
                             + (f" + {extra_fp32:.3g} ({extra_reason})" if extra_fp32 else "") + f" = {r:.3g}")
        if level == "emulated":
            r = 2 * UB + 2 * g
            if stored_fp8:
                # the output is read back from an FP8 store: values that agree to within the bf16 bound
                # before quantisation can round to neighbouring e4m3 codes, one ulp = 2 * 2^-4 relative
                r += 2 * 2.0**-4
                return Tolerance(atol * UB, r, f"{what}: one e4m3 ulp of the FP8 store (2*2^-4) + one bf16 ulp "
                                 f"(2*2^-8) + fp32 order 2*6*sqrt({n})*u32 = {r:.3g}")
            return Tolerance(atol * UB, r, f"{what}: one bf16 ulp (2*2^-8) + fp32 order 2*6*sqrt({n})*u32 = {r:.3g}")
        r = cond * k_inputs * UB + UB + g + extra_serving
        return Tolerance(atol * UB, r, f"{what}: {cond:g}*{k_inputs} bf16 input roundings + bf16 output "
                         f"+ 6*sqrt({n})*u32" + (f" + {extra_serving:.3g} ({extra_reason})" if extra_serving else "")
                         + f" = {r:.3g}")

    return tol


def _round(v):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.to(torch.bfloat16).to(torch.float32)
    return v


def serving_emulation(ref, *, bf16_inputs: tuple[str, ...], bf16_outputs: tuple[str, ...] | str = "all",
                      output_names: tuple[str, ...] = ("y",)):
    """emulate(profile) -> fn with the reference's signature computing the serving numerics."""
    takes_numerics = "numerics" in inspect.signature(ref).parameters

    def emulate(profile: str):
        numerics = serving(profile)

        def fn(**kw):
            kw = {k: (_round(v) if k in bf16_inputs else v) for k, v in kw.items()}
            if takes_numerics:
                kw["numerics"] = numerics
            out = ref(**kw)
            if not isinstance(out, dict):
                out = dict(zip(output_names, out if isinstance(out, tuple) else (out,)))
            return {k: (_round(v) if bf16_outputs == "all" or k in bf16_outputs else v) for k, v in out.items()}

        fn.__qualname__ = f"serving_emulation({ref.__name__})[{profile}]"
        return fn

    return emulate
