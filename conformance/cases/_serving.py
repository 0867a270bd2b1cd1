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

Quadrature (RMS) model of the same steps, ``conformance.rms`` (variance u^2/3 per rounding step of unit
roundoff u; expected sum of squares relative to sum want^2 ("rel") or to sum scale^2 ("scale")):
  fp64      (ops + n) u32^2/3 scale: ops fp32 roundings and n partial sums each <= the magnitude scale
  fp32      twice that + extra_fp32^2/3 scale
  serving   (cond^2 k_inputs + 1) ub^2/3 rel (each bf16 input rounding amplified by cond, the output rounding;
            a dot product's input roundings are relative to |want| in mean square for zero-mean terms)
            + (n u32^2 + extra_serving^2)/3 scale (the fp32 reduction; the worst-case extra, kept as one
            uniform step: an upper bound on its quadrature split)
  emulated  fp32 disagreement r = sqrt(2 (n + ops)/3) u32 relative to |want| (both sides' order), turned into
            bf16 flips: E[e^2] = E|delta| ulp <= r * 2 ub, + r^2; plus ONE intermediate bf16 rounding that the
            subject places inside the op where the emulation keeps fp32 (the elementwise bound's one bf16 ulp
            allows it; vLLM CPU does it on every float output measured, docs/rms-limits.md): the extra rounding
            (ub^2/3) decorrelates the two output roundings (2 ub^2/3), ub^2 in all (rel). With stored_fp8 the
            FP8 store flips instead: pre-store disagreement r8 = sqrt(ub^2 + 2 ub r), E[e^2] <= r8 * 2 * 2^-4
            rel, counted as flips of one e4m3 ulp 2 * 2^-4
"""

from __future__ import annotations

import inspect

import torch

from references.numerics import serving

from ..tolerances import Tolerance, gamma_prob

U32 = 2.0**-24
UB = 2.0**-8
FP8_U = 2.0**-4  # e4m3 unit roundoff (3 mantissa bits), both dialects


def level_tolerance(*, n: int, k_inputs: int, ops: int = 4, cond: float = 1.0, what: str,
                    extra_serving: float = 0.0, extra_reason: str = "", atol: float = 0.0,
                    extra_fp32: float = 0.0, stored_fp8: bool = False, fp8_inputs: int = 0):
    """A tolerance function (params, level) -> Tolerance following the module docstring.

    ``fp8_inputs``: how many of the k inputs the serving path also rounds to e4m3 (one block per 128-vector,
    power-of-two scale) before the op (the indexer's q and K): each adds one e4m3 rounding, unit 2^-4, at the
    serving level only (the emulation applies the same quantisation, so the emulated level is unchanged)."""

    def tol(params: dict, level: str) -> Tolerance:
        t = _tol(params, level)
        return t.with_rms(**_rms_model(level))

    def _rms_model(level: str) -> dict:
        fp = (ops + n) * U32**2 / 3
        if level == "fp64":
            return dict(ms_scale=fp, derivation=f"{what}: ({ops} + {n}) fp32 roundings u32^2/3 = {fp:.3g} scale^2")
        if level == "fp32":
            ms = 2 * fp + extra_fp32**2 / 3
            return dict(ms_scale=ms, derivation=f"{what}: two fp32 evaluations 2 ({ops} + {n}) u32^2/3"
                        + (" + extra_fp32^2/3" if extra_fp32 else "") + f" = {ms:.3g} scale^2")
        if level == "emulated":
            r = (2 * (n + ops) / 3) ** 0.5 * U32
            bf = UB**2 + 2 * UB * r + r * r
            if stored_fp8:
                r8 = bf ** 0.5
                ms = r8 * 2 * 2.0**-4
                return dict(ms_rel=ms, flip_ulp=2 * 2.0**-4, derivation=(
                    f"{what}: FP8-store flips of one e4m3 ulp: pre-store disagreement sqrt(ub^2 + 2 ub r) with fp32 "
                    f"order r = sqrt(2({n}+{ops})/3) u32 = {r:.3g}, E[e^2] <= {ms:.3g} want^2"))
            return dict(ms_rel=bf, derivation=(
                f"{what}: one intermediate bf16 rounding placed differently (ub^2/3, decorrelating both output "
                f"roundings: 2 ub^2/3) + bf16 flips of the fp32 order disagreement r = sqrt(2({n}+{ops})/3) u32 "
                f"= {r:.3g}: ub^2 + 2 ub r + r^2 = {bf:.3g} want^2"))
        rel = (cond**2 * k_inputs + 1) * UB**2 / 3 + cond**2 * fp8_inputs * FP8_U**2 / 3
        sc = (n * U32**2 + extra_serving**2) / 3
        return dict(ms_rel=rel, ms_scale=sc, derivation=(
            f"{what}: ({cond:g}^2*{k_inputs} bf16 input + 1 output) ub^2/3"
            + (f" + {cond:g}^2*{fp8_inputs} e4m3 input (2^-4)^2/3" if fp8_inputs else "") + f" = {rel:.3g} want^2 + "
            f"({n} u32^2" + (f" + extra {extra_serving:.3g}^2" if extra_serving else "") + f")/3 = {sc:.3g} scale^2"))

    def _tol(params: dict, level: str) -> Tolerance:
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
        r = cond * k_inputs * UB + cond * fp8_inputs * FP8_U + UB + g + extra_serving
        return Tolerance(atol * UB, r, f"{what}: {cond:g}*{k_inputs} bf16 input roundings "
                         + (f"+ {cond:g}*{fp8_inputs} e4m3 input roundings (2^-4) " if fp8_inputs else "")
                         + f"+ bf16 output + 6*sqrt({n})*u32"
                         + (f" + {extra_serving:.3g} ({extra_reason})" if extra_serving else "")
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
