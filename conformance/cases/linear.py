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

DeepSeek-V4.1 (rows ``.../wb32/...``, ``weight_block=32``): the checkpoint's dense FP8 linears carry one UE8M0
scale per 32x32 weight tile (``quantization_config.weight_block_size`` [32, 32]); vLLM serves them as MXFP8
(vLLM ``models/deepseek_v41/quant_config.py:221-243``: ``ModelOptLinearMethod(QuantSpec(weight=kMxfp8Static,
activation=kMxfp8Dynamic), CkptCtx(scale_block_size=(32, 32)))``). At load the [N/32, K/32] scale grid is
repeated row-wise to one scale per row and 1x32 K group (``model_executor/layers/quantization/modelopt.py
:2278-2291``, ``KMxfp8Static.get_scale_weight_loader``), which reads the same values as the 32x32 tiles.
The kernel then depends on the platform (``model_executor/kernels/linear/__init__.py:552-571``):

* gfx942 (MI300X): ``RocmDotScaledMxfp8LinearKernel`` needs CDNA4 (``kernels/linear/mxfp8/rocm_native.py
  :229-238``), so ``EmulationMxfp8LinearKernel`` runs: the weight is dequantised to bf16 once at load (exact:
  an e4m3 value times a power of two has 4 significant bits) and the layer is a bf16 GEMM; the activations are
  NOT quantised (``kernels/linear/mxfp8/emulation.py:31-63``). No fnuz conversion happens on this path.
* native MX (gfx950 ``rocm_mxfp8_block32_gemm``, ``rocm_native.py:282-289``; SM100 FlashInfer): activations
  quantised by ``mxfp8_e4m3_quantize`` in 1x32 K groups, e4m3fn values, e8m0 scale ``2^ceil(log2(amax/448))``
  with amax floored at fp32 tiny (``model_executor/layers/quantization/utils/mxfp8_utils.py:38-85``). The
  ``ocp`` profile emulates this path (fp32 partial product per 32-wide K block). H100 (SM90) takes Marlin or
  the emulation kernel, both bf16-activation paths: the gfx942 emulation describes them, not ``ocp``.
"""

from __future__ import annotations

import math

import torch

from references.formats.blockscale import BlockFP8, dequantize_fp8, quantize_fp8
from references.formats.conversion import ocp_to_fnuz
from references.numerics import serving

from ..components import ComponentSpec, OutputSpec, register
from ..rms import block_fp8_gemm_rms
from ..tolerances import Tolerance
from ._case import Case, add, dist_tensor
from ._serving import U32, UB

U8 = 2.0**-4                      # e4m3 unit roundoff (3 mantissa bits), both dialects
W_SPEC = BlockFP8.of("float8_e4m3fn", (128, 128))   # checkpoint weights: OCP codes, e8m0 128x128 scales
# V4.1 checkpoint weights: OCP codes, e8m0 32x32 scales (quant_config.py:221-243)
W_SPECS = {128: W_SPEC, 32: BlockFP8.of("float8_e4m3fn", (32, 32))}
# V4.1 native-MX activation quant (mxfp8_utils.py:38-85): 1x32 groups, e4m3fn, 2^ceil(log2(amax/448)), amax
# floored at fp32 tiny (2^-126)
MX_ACT = BlockFP8.of("float8_e4m3fn", (1, 32), scale_fmt="ue8m0", amax_floor=2.0**-126)
# one rounding to bf16, then to e4m3 at the block's scale: |Q8(Qb(x)) - x| <= (u8 (1 + ub) + ub) |x|
U_ACT = U8 * (1 + UB) + UB
# Results below e4m3's normal range (|x| / s < 2^-6 fn, 2^-7 fnuz) have absolute error at most half the
# smallest subnormal times the scale, 2^-10 s (fn) / 2^-11 s (fnuz), with s <= 2 amax / fmax (power-of-two
# rounding up; fmax >= 224): 2^-10 * 2 amax / 224 <= 2^-16.8 amax = U8 * 2^-12.8 amax. So every activation
# error is at most U_ACT * e_j with e_j = max(|x_j|, 2^-12 amax of x_j's block). The same holds for V4.1's
# MXFP8 activations (1x32 groups, e4m3fn, power-of-two scale s < 2 amax / 448: the floor is 2^-17.8 amax).
SUBNORMAL_FLOOR = 2.0**-12


def fp8_block_weight(g: torch.Generator, out: int, inp: int, *, std: float, spread: int = 0,
                     block: int = 128) -> tuple:
    """A weight as the checkpoint stores it: OCP e4m3fn codes [out, inp] and e8m0 scale bytes [out/b, inp/b]
    (b = ``block``: 128, or 32 for V4.1; quantised once from N(0, std^2) values), plus the exact dequantised fp32
    weight. ``spread`` multiplies each b x b block by 2^k, k uniform in [-spread, spread], so the block scales
    differ (a transposed or misaligned scale read then changes values)."""
    spec = _w_spec(block)
    w = torch.randn(out, inp, generator=g) * std
    if spread:
        k = torch.randint(-spread, spread + 1, (out // block, inp // block), generator=g).float()
        w = w * torch.exp2(k).repeat_interleave(block, 0).repeat_interleave(block, 1)
    codes, scales = quantize_fp8(w, spec)
    return codes, scales, dequantize_fp8(codes, scales, spec)


def _w_spec(block: int) -> BlockFP8:
    if block not in W_SPECS:
        raise ValueError(f"weight_block: expected one of {sorted(W_SPECS)} (V4 128x128, V4.1 32x32), got {block!r}")
    return W_SPECS[block]


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


def fp8_linear_golden(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *,
                      weight_block: int = 128) -> dict:
    """y = x . dequant(weight, weight_scale)^T -> {"y": [T, N]}, in x's dtype (fp32 golden, fp64 self-check).
    ``weight_block``: the side of one square e8m0 scale tile, 128 (V4) or 32 (V4.1)."""
    spec = _w_spec(weight_block)
    if weight.dtype != torch.uint8 or weight_scale.dtype != torch.uint8:
        raise TypeError(f"weight / weight_scale: expected uint8 OCP e4m3fn codes and e8m0 bytes, got "
                        f"{weight.dtype} / {weight_scale.dtype}")
    if x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x: expected [T, {weight.shape[1]}], got {tuple(x.shape)}")
    n, k = weight.shape
    b = weight_block
    if tuple(weight_scale.shape) != (math.ceil(n / b), math.ceil(k / b)):
        raise ValueError(f"weight_scale: expected [{math.ceil(n / b)}, {math.ceil(k / b)}] for {b}x{b} blocks, "
                         f"got {tuple(weight_scale.shape)}")
    dt = torch.promote_types(x.dtype, torch.float32)
    w = dequantize_fp8(weight, weight_scale, spec).to(dt)
    return {"y": x.to(dt) @ w.T}


def _emulate(profile: str):
    act = serving(profile).linear_act
    wspec = W_SPEC if profile == "ocp" else BlockFP8.of("float8_e4m3fnuz", (128, 128))

    def fp8_linear_serving(x, weight, weight_scale, *, weight_block=128):
        if weight_block == 32:
            return _mxfp8_serving(profile, x, weight, weight_scale)
        _w_spec(weight_block)
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


def _mxfp8_serving(profile: str, x, weight, weight_scale) -> dict:
    """V4.1's 32x32-scaled linear as vLLM serves it (module docstring): the weight dequantised exactly (the
    loader's row-wise repeat of the 32x32 grid reads the same values); gfx942: a bf16 GEMM on bf16 activations
    (EmulationMxfp8LinearKernel), one fp32 accumulator; ocp (native MX): MXFP8 activations, one fp32 partial
    product per 32-wide K block. bf16 output either way."""
    w = dequantize_fp8(weight, weight_scale, W_SPECS[32])
    xb = x.to(torch.bfloat16).float()
    if profile != "ocp":
        return {"y": (xb @ w.T).to(torch.bfloat16).float()}
    xq = dequantize_fp8(*quantize_fp8(xb, MX_ACT), MX_ACT)
    acc = torch.zeros(x.shape[0], w.shape[0])
    for k0 in range(0, x.shape[1], 32):
        acc += xq[:, k0:k0 + 32] @ w[:, k0:k0 + 32].T
    return {"y": acc.to(torch.bfloat16).float()}


def _scale(kw, want):
    """Q + |y|: Q_i = sqrt(sum_j (W_ij e_j)^2), e_j = the activation's error unit (act_floor)."""
    b = kw.get("weight_block", 128)
    w = dequantize_fp8(kw["weight"], kw["weight_scale"], _w_spec(b))
    return sqrt_dot(act_floor(kw["x"].double(), group=b), w) + want.double().abs()


def gemm_tol(k: int, what: str):
    """Tolerance of a K-long GEMM relative to ``Q + |y|`` (``_scale``).

    Round-to-nearest errors of independent inputs are zero-mean and bounded: by Hoeffding, a sum
    sum_j W_ij x_j d_j with |d_j| <= u is below 6 u Q_i except with probability 2 exp(-18) ~ 3e-8 per element
    (lambda = 6; the real variance is u^2/3, so the tail is far smaller still). fp32 accumulation: 6 sqrt(k) u32
    sum_j |W_ij x_j| <= 6 k u32 Q_i (Cauchy-Schwarz), i.e. k u32 against 6 Q.
    """
    acc = 6 * k * U32

    def tol(params, level):
        # the quadrature (RMS) model of the same steps: conformance.rms.block_fp8_gemm_rms (s = Q + |y|)
        return _elementwise(params, level).with_rms(**block_fp8_gemm_rms(level, k, what=what))

    def _elementwise(params, level):
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
    description="FP8 linear: activations quantised in 1x128 groups, OCP e4m3fn weights with 128x128 e8m0 scales "
                "(V4.1 rows: 32x32 scales, MXFP8 1x32 activations on native-MX platforms, bf16 on gfx942)",
    spec_section="4.2", emulate=_emulate,
    divergences=("spec 8.9: OFF ue8m0 activation scales (amax floor 1e-4); vLLM SM90/ROCm exact amax/fmax (1e-10)",
                 "V4.1 32x32 rows: gfx942 runs EmulationMxfp8LinearKernel (bf16 GEMM, activations not quantised; "
                 "kernels/linear/__init__.py:562-567)"),
))


def _make(g, p):
    T, N, K = p["tokens"], p["n"], p["k"]
    b = p.get("weight_block", 128)
    codes, scales, _ = fp8_block_weight(g, N, K, std=K**-0.5, spread=p.get("spread", 0), block=b)
    kw = {"x": dist_tensor(g, (T, K), p["dist"], scale=p.get("scale", 1.0)), "weight": codes,
          "weight_scale": scales}
    if b != 128:
        kw["weight_block"] = b
    return kw


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
# V4.1: 32x32 weight-scale blocks (MXFP8 serving). Shapes are multiples of 32 and (but for one) not of 128, so a
# reader assuming 128x128 tiles cannot even tile them; spread >= 2 per 32x32 tile, so reading the 32x32 grid
# with 128x128 blocks (scale[i // 128, j // 128]) changes most tiles' values. "wide" exercises MXFP8
# activation subnormals / per-group scales.
for tokens, n, k, dist, spread, seed in [(1, 96, 160, "normal", 3, 20), (7, 160, 224, "outliers", 2, 21),
                                         (33, 64, 96, "wide", 2, 22), (19, 256, 256, "all_negative", 3, 23)]:
    add(Case(f"linear.fp8_block/wb32/t{tokens}n{n}k{k}/{dist}/s{seed}", "linear.fp8_block", _make,
             {"tokens": tokens, "n": n, "k": k, "spread": spread, "weight_block": 32}, seed, dist,
             ("decode" if tokens == 1 else "prefill", "v4.1")))
add(Case("linear.fp8_block/wb32/t64n1024k4096/normal/s24", "linear.fp8_block", _make,
         {"tokens": 64, "n": 1024, "k": 4096, "spread": 2, "weight_block": 32}, 24, "normal",
         ("prefill", "flash-shape", "v4.1"), tier="full"))


def quant_act_group(x: torch.Tensor, spec: BlockFP8) -> torch.Tensor:
    """Quantise-dequantise x [T, K] in 1 x 128 FP8 groups (the serving activation quantiser)."""
    return dequantize_fp8(*quantize_fp8(x, spec), spec)
