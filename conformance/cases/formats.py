"""FP8 producers as components: activation group quantisation (spec 4.2).

The golden of a quantiser is the unquantised input (fp32); a subject returns its quantise-dequantise
(``dequant``) and, where it exposes them, the bytes and scales it produced (``codes``, ``scales``). Against
the golden the bound is the format's rounding budget; against the emulated profile the bytes must match
exactly.
"""

from __future__ import annotations

import torch

from references.formats.minifloat import get_format

from ..components import ComponentSpec, OutputSpec, register
from ..tolerances import Tolerance
from ._case import Case, add, dist_tensor


def act_quant_golden(x: torch.Tensor, *, group: int = 128) -> dict:
    """Golden: the unquantised activations (what every quantiser approximates)."""
    if x.shape[-1] % group:
        raise ValueError(f"x: last dim {x.shape[-1]} is not a multiple of group {group}")
    return {"dequant": x.clone()}


def _act_quant_tol(params: dict, level: str) -> Tolerance:
    if level in ("fp64", "fp32"):
        return Tolerance(0.0, 0.0, "identity: the fp32 and fp64 goldens are the same values")
    if level == "emulated":
        # same dialect, fmax and power-of-two scale rule -> the same bytes, so the same values
        return Tolerance(0.0, 0.0, "emulated serving numerics: identical bytes and scales, exact")
    # serving vs golden: one rounding to e4m3 at the block's scale. For a normal result the error is at
    # most half an ulp = 2^-4 |x| (3 mantissa bits). Results in the subnormal range (|x|/s < 2^-6 in
    # fn, 2^-7 in fnuz) have absolute error at most half the smallest subnormal times the scale; the
    # scale of a block is at most 2 amax / fmax (power-of-two rounding up), and amax <= the case's
    # largest |x|, so atol = (2 max|x| / fmax) * smallest_subnormal / 2.
    fmt = get_format(params["dialect"])
    fmax = params["fmax"]
    atol = 2 * params["inputs_absmax"] / fmax * fmt.smallest_subnormal / 2
    # Serving paths take bf16 activations: one more rounding of 2^-8 relative before the FP8 one.
    r = 2.0**-4 + 2.0**-8
    # RMS (calc_diff) model, conformance.rms: ONE rounding chain per element (bf16 then e4m3 at the block's scale):
    # the error is at most r |x| (+ atol below e4m3's normal range) and round-to-nearest spreads it uniformly over
    # +-half a cell, variance <= (r |x|)^2 / 3 (+ atol^2 / 3, counted by rms_judgement): the one-uniform-step form,
    # exact for a single rounding (no reduction, no chain to split)
    return Tolerance(atol, r,
                     f"bf16 input (2^-8) + e4m3 rounding (2^-4, half ulp); atol (2*{params['inputs_absmax']:.3g}"
                     f"/{fmax})*{fmt.smallest_subnormal:.3g}/2 = {atol:.3g} for subnormal results").with_rms(
        ms_rel=r * r / 3, derivation=f"quant.act_fp8: one rounding chain (bf16 then e4m3), uniform in +-half a "
                                     f"cell: (2^-4 + 2^-8)^2/3 = {r * r / 3:.3g} x^2 + atol^2/3")


def _make_act(g: torch.Generator, p: dict) -> dict:
    return {"x": dist_tensor(g, (p["tokens"], p["k"]), p["dist"], scale=p.get("scale", 1.0)), "group": 128}


def _emulate_act_quant(profile: str):
    from references.formats.blockscale import dequantize_fp8, quantize_fp8
    from references.numerics import serving

    spec = serving(profile).linear_act

    def act_quant_emulated(x: torch.Tensor, *, group: int = 128) -> dict:
        if group != spec.block[1]:
            raise ValueError(f"group {group} != emulated block {spec.block}")
        codes, scales = quantize_fp8(x.to(torch.bfloat16).float(), spec)  # serving inputs are bf16
        return {"dequant": dequantize_fp8(codes, scales, spec), "codes": codes, "scales": scales}

    return act_quant_emulated



ACT_QUANT = register(ComponentSpec(
    name="quant.act_fp8",
    family="formats",
    reference=act_quant_golden,
    outputs=(OutputSpec("dequant", "float", tol=_act_quant_tol),
             OutputSpec("codes", "fp8-codes"), OutputSpec("scales", "exact")),
    description="per-token 1x128 group FP8 quantisation of linear-layer activations (power-of-two scale)",
    spec_section="4.2",
    emulate=_emulate_act_quant,
))

for tokens, k, dist, seed in [(1, 256, "normal", 0), (7, 512, "outliers", 1), (33, 256, "wide", 2),
                              (129, 128, "all_negative", 3)]:
    add(Case(id=f"quant.act_fp8/t{tokens}k{k}/{dist}/s{seed}", component="quant.act_fp8",
             maker=_make_act, params={"tokens": tokens, "k": k}, seed=seed, dist=dist,
             tags=("decode" if tokens == 1 else "prefill",)))

