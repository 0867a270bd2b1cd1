"""Block-FP8 linear (spec 4.2): activation FP8 quantisation in 1x128 groups + the 128x128 block-scaled weight
GEMM, as every FP8 linear of the checkpoint runs it (wq_a, wq_b, wkv, wo_b, shared experts, mtp projections).

Inputs are what a serving kernel consumes: activations ``x`` (float) and the checkpoint's weight bytes
(``weight`` uint8 OCP e4m3fn codes [N, K]) with their e8m0 block scales (``weight_scale`` uint8 [N/128, K/128],
``ue8m0`` checkpoints). An adapter converts layouts (and, on fnuz platforms, the dialect) inside its ``fn``.

Golden: ``y = x . dequant(W)^T`` in fp32 from the unquantised activations; the dequantised weight is exact.
Serving (``emulate(profile)``, vLLM ``Fp8LinearMethod`` block [128, 128]): bf16 activations, one FP8 block per
1x128 group in the profile's dialect with fp32 scale amax/fmax (``serving(profile).linear_act``; SM90 / ROCm),
weights converted OCP -> fnuz on gfx942 (exact), fp32 accumulation per 128-wide K block then x sa x sb into a
second fp32 accumulator, bf16 output.
"""

from __future__ import annotations

import math

import torch

from references.formats.blockscale import BlockFP8, dequantize_fp8, quantize_fp8
from references.formats.conversion import ocp_to_fnuz
from references.numerics import serving

from ..components import ComponentSpec, OutputSpec, register
from ..tolerances import Tolerance
from ._case import Case, add, dist_tensor
from ._serving import U32, UB

U8 = 2.0**-4                      # e4m3 unit roundoff (3 mantissa bits), both dialects
W_SPEC = BlockFP8.of("float8_e4m3fn", (128, 128))   # checkpoint weights: OCP codes, e8m0 128x128 scales
# one rounding to bf16, then to e4m3 at the block's scale: |Q8(Qb(x)) - x| <= (u8 (1 + ub) + ub) |x|
U_ACT = U8 * (1 + UB) + UB
# Results below e4m3's normal range (|x| / s < 2^-6 fn, 2^-7 fnuz) have absolute error at most half the
# smallest subnormal times the scale, 2^-10 s (fn) / 2^-11 s (fnuz), with s <= 2 amax / fmax (power-of-two
# rounding up; fmax >= 224): 2^-10 * 2 amax / 224 <= 2^-16.8 amax = U8 * 2^-12.8 amax. So every activation
# error is at most U_ACT * e_j with e_j = max(|x_j|, 2^-12 amax of x_j's block).
SUBNORMAL_FLOOR = 2.0**-12


def fp8_block_weight(g: torch.Generator, out: int, inp: int, *, std: float, spread: int = 0) -> tuple:
    """A weight as the checkpoint stores it: OCP e4m3fn codes [out, inp] and e8m0 scale bytes [out/128, inp/128]
    (quantised once from N(0, std^2) values), plus the exact dequantised fp32 weight. ``spread`` multiplies each
    128x128 block by 2^k, k uniform in [-spread, spread], so the block scales differ (a transposed or misaligned
    scale read then changes values)."""
    w = torch.randn(out, inp, generator=g) * std
    if spread:
        k = torch.randint(-spread, spread + 1, (out // 128, inp // 128), generator=g).float()
        w = w * torch.exp2(k).repeat_interleave(128, 0).repeat_interleave(128, 1)
    codes, scales = quantize_fp8(w, W_SPEC)
    return codes, scales, dequantize_fp8(codes, scales, W_SPEC)


def act_floor(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    """e_j = max(|x_j|, 2^-12 amax of the 1 x group block holding x_j) (see SUBNORMAL_FLOOR)."""
    a = x.abs()
    k = a.shape[-1]
    g = group if k % group == 0 else k
    amax = a.reshape(*a.shape[:-1], k // g, g).amax(-1, keepdim=True).expand(*a.shape[:-1], k // g, g)
    return torch.maximum(a, SUBNORMAL_FLOOR * amax.reshape(a.shape))


def sqrt_dot(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sqrt(sum_j (w_ij e_j)^2) [..., N] for e [..., K], w [N, K] (fp64): the scale of a random sum of
    independent per-input rounding errors."""
    return torch.sqrt(e.double().square() @ w.double().square().T)


def fp8_linear_golden(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> dict:
    """y = x . dequant(weight, weight_scale)^T -> {"y": [T, N]}, in x's dtype (fp32 golden, fp64 self-check)."""
    if weight.dtype != torch.uint8 or weight_scale.dtype != torch.uint8:
        raise TypeError(f"weight / weight_scale: expected uint8 OCP e4m3fn codes and e8m0 bytes, got "
                        f"{weight.dtype} / {weight_scale.dtype}")
    if x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x: expected [T, {weight.shape[1]}], got {tuple(x.shape)}")
    n, k = weight.shape
    if tuple(weight_scale.shape) != (math.ceil(n / 128), math.ceil(k / 128)):
        raise ValueError(f"weight_scale: expected [{n // 128}, {k // 128}], got {tuple(weight_scale.shape)}")
    dt = torch.promote_types(x.dtype, torch.float32)
    w = dequantize_fp8(weight, weight_scale, W_SPEC).to(dt)
    return {"y": x.to(dt) @ w.T}


def _emulate(profile: str):
    act = serving(profile).linear_act
    wspec = W_SPEC if profile == "ocp" else BlockFP8.of("float8_e4m3fnuz", (128, 128))

    def fp8_linear_serving(x, weight, weight_scale):
        codes, scales = weight, weight_scale
        if profile != "ocp":   # load-time OCP -> fnuz: 0x80 -> 0, bytes reinterpreted, e8m0 exponent + 1
            codes, scales = ocp_to_fnuz(codes, scales, "ue8m0")
        w = dequantize_fp8(codes, scales, wspec)
        xq = dequantize_fp8(*quantize_fp8(x.to(torch.bfloat16).float(), act), act)
        acc = torch.zeros(x.shape[0], w.shape[0])
        for k0 in range(0, x.shape[1], 128):     # one fp32 partial product per 128-wide K block
            acc += xq[:, k0:k0 + 128] @ w[:, k0:k0 + 128].T
        return {"y": acc.to(torch.bfloat16).float()}

    fp8_linear_serving.__qualname__ = f"fp8_linear_serving[{profile}]"
    return fp8_linear_serving


def _scale(kw, want):
    """Q + |y|: Q_i = sqrt(sum_j (W_ij e_j)^2), e_j = the activation's error unit (act_floor)."""
    w = dequantize_fp8(kw["weight"], kw["weight_scale"], W_SPEC)
    return sqrt_dot(act_floor(kw["x"].double()), w) + want.double().abs()


def gemm_tol(k: int, what: str):
    """Tolerance of a K-long GEMM relative to ``Q + |y|`` (``_scale``).

    Round-to-nearest errors of independent inputs are zero-mean and bounded: by Hoeffding, a sum
    sum_j W_ij x_j d_j with |d_j| <= u is below 6 u Q_i except with probability 2 exp(-18) ~ 3e-8 per element
    (lambda = 6; the real variance is u^2/3, so the tail is far smaller still). fp32 accumulation: 6 sqrt(k) u32
    sum_j |W_ij x_j| <= 6 k u32 Q_i (Cauchy-Schwarz), i.e. k u32 against 6 Q.
    """
    acc = 6 * k * U32

    def tol(params, level):
        if level == "fp64":
            r = 2 * U32 + acc
            return Tolerance(0.0, r, f"{what}: fp32 golden: accumulation 6*{k}*u32 + 2 u32 = {r:.3g} of Q+|y|")
        if level == "fp32":
            r = 2 * (2 * U32 + acc)
            return Tolerance(0.0, r, f"{what}: two fp32 evaluations 2*(6*{k}*u32 + 2*u32) = {r:.3g} of Q+|y|")
        if level == "emulated":
            # same activation bytes and weights on both sides: fp32 order (2 x accumulation) + one bf16 ulp of y
            r = 2 * UB + 2 * acc
            return Tolerance(0.0, r, f"{what}: same FP8 bytes; one bf16 ulp (2*2^-8) + fp32 order 2*6*{k}*u32 "
                             f"= {r:.3g} of Q+|y|")
        r = 6 * U_ACT + UB + acc
        return Tolerance(0.0, r, f"{what}: bf16 + e4m3 activation rounding, random sum (Hoeffding, lambda 6): "
                         f"6*(2^-4(1+2^-8)+2^-8) of Q + bf16 output 2^-8 |y| + accumulation 6*{k}*u32 = {r:.3g} "
                         f"of Q+|y| (Q_i = sqrt(sum_j (W_ij e_j)^2), e_j = max(|x_j|, 2^-12 block amax) covers "
                         f"subnormal results)")

    return tol


register(ComponentSpec(
    name="linear.fp8_block", family="linear", reference=fp8_linear_golden,
    outputs=(OutputSpec("y", tol=lambda p, lvl: gemm_tol(p["k"], "block-FP8 linear")(p, lvl), scale=_scale),),
    description="FP8 linear: activations quantised in 1x128 groups, OCP e4m3fn weights with 128x128 e8m0 scales",
    spec_section="4.2", emulate=_emulate,
    divergences=("spec 8.9: OFF ue8m0 activation scales (amax floor 1e-4); vLLM SM90/ROCm exact amax/fmax (1e-10)",),
))


def _make(g, p):
    T, N, K = p["tokens"], p["n"], p["k"]
    codes, scales, _ = fp8_block_weight(g, N, K, std=K**-0.5, spread=p.get("spread", 0))
    return {"x": dist_tensor(g, (T, K), p["dist"], scale=p.get("scale", 1.0)), "weight": codes,
            "weight_scale": scales}


for tokens, n, k, dist, spread, seed in [(1, 256, 512, "normal", 3, 0), (7, 384, 256, "outliers", 2, 1),
                                         (33, 256, 384, "wide", 1, 2), (129, 128, 256, "normal", 4, 3),
                                         (37, 512, 1024, "all_negative", 2, 4)]:
    add(Case(f"linear.fp8_block/t{tokens}n{n}k{k}/{dist}/s{seed}", "linear.fp8_block", _make,
             {"tokens": tokens, "n": n, "k": k, "spread": spread}, seed, dist,
             ("decode" if tokens == 1 else "prefill",)))
# Flash's wq_a shape (q_lora 1024 x D 4096), one decode token and a prefill block
for tokens, seed in [(1, 10), (64, 11)]:
    add(Case(f"linear.fp8_block/t{tokens}n1024k4096/normal/s{seed}", "linear.fp8_block", _make,
             {"tokens": tokens, "n": 1024, "k": 4096, "spread": 2}, seed, "normal",
             ("decode" if tokens == 1 else "prefill", "flash-shape"), tier="full"))


def quant_act_group(x: torch.Tensor, spec: BlockFP8) -> torch.Tensor:
    """Quantise-dequantise x [T, K] in 1 x 128 FP8 groups (the serving activation quantiser)."""
    return dequantize_fp8(*quantize_fp8(x, spec), spec)
