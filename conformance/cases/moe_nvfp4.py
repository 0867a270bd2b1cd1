"""NVFP4 routed experts (spec 3.13; issue 18): the SwiGLU-with-clamp experts of an NVFP4 checkpoint
(``nvidia/DeepSeek-V4-*-NVFP4``, AMD Quark), whose expert weights are packed E2M1 (two a byte, the even element in
the low nibble) with one E4M3 scale byte per 16 values along the input dimension and one fp32 per-tensor
``weight_scale_2``, plus an fp32 per-tensor activation ``input_scale``; FP8 elsewhere.

Inputs (ModelOpt's per-expert tensors stacked over E, names as vLLM's loader registers them,
``model_executor/layers/quantization/modelopt.py:911-1006``): ``w1``/``w3`` uint8 [E, I, D/2], ``w1_scale``/
``w3_scale`` uint8 [E, I, D/16] (the bytes of the checkpoint's ``float8_e4m3fn`` ``weight_scale``: OCP),
``w1_scale_2``/``w3_scale_2`` fp32 [E] (decode multipliers: value = e2m1 x e4m3(byte) x weight_scale_2), ``w2``
uint8 [E, D, I/2], ``w2_scale`` [E, D, I/16], ``w2_scale_2`` [E]; ``w13_input_scale`` / ``w2_input_scale`` fp32 [E]
(activation amax / (6 x 448), the decode multiplier of the activation quantiser); x [T, D], ids / weights [T, k] as
``moe.experts`` (-1 = dropped slot), ``limit`` the swiglu clamp.

Golden: the weights dequantised exactly (``references.formats.nvfp4.dequantize_nvfp4``, OCP scale bytes; exact in
fp32: a 2-bit x 4-bit product times the fp32 global scale, one rounding) fed to ``moe.experts``' golden
(``references.components.moe.expert_ffn``: W2 (SiLU(min(W1 x, L)) * clamp(W3 x, -L, L)), routing weight before W2),
from unquantised activations: the activation ``input_scale`` is a serving-side quantisation the golden does not do.

What vLLM 0.32 serves (``emulate(profile)``). On ROCm every NVFP4 MoE backend but EMULATION needs CUDA
(``fused_moe/experts/marlin_moe.py:588-589``, ``fused_humming_moe.py:401-405``; FlashInfer / CUTLASS are NVIDIA
kernels), so gfx942 runs ``Nvfp4QuantizationEmulationTritonExperts`` (``fused_moe/oracle/nvfp4.py:147-152``,
``fused_moe/experts/nvfp4_emulation_moe.py:409-543``), W4A4 emulated in bf16:
  * activations NVFP4 quantise-dequantised with the encode global scale g = 1 / max_e(input_scale)
    (``oracle/nvfp4.py:480-505``): per block of 16, s = e4m3fn(min(g * (amax / 6), 448)), q = e2m1(clamp(x * (g /
    s), +-6)) (round to nearest even; 0 where s = 0), x' = q * (s / g) in fp32, stored bf16
    (``quantization/utils/nvfp4_emulation_utils.py:363-415``, Triton on any CUDA-alike device, ROCm included);
  * weights dequantised in the GEMM kernel: e2m1(nibble) * (float8e4nv(byte) * weight_scale_2) in fp32, cast to bf16
    (``nvfp4_emulation_moe.py:201-233``); the scale byte is bitcast to Triton's ``float8e4nv`` (OCP) on every
    arch, so gfx942 decodes the checkpoint's OCP bytes correctly and the two profiles' numerics are the same; the
    fnuz misreading (same byte, half the value) is the dialect edge a plugin can get wrong
    (``tests/harness/test_new_component_mutants.py``: an fnuz reader is diagnosed x0.5);
  * w3 uses w1's global scale: vLLM keeps ``w13_weight_scale_2[:, 0]`` only (``modelopt.py:1024-1032``, a warning
    when they differ). The cases give w1 and w3 one global scale (ModelOpt's fused gate/up export); a checkpoint
    with two would make vLLM's w3 off by their ratio (not a case here: noted in the report);
  * GEMMs accumulate in fp32 (``tl.dot``), outputs bf16; SiLU-and-mul with the clamp in fp32 from bf16, bf16 out;
    the routing weight multiplies the fp32 W2 accumulator (after W2, spec 8.5), bf16; the k contributions summed
    (``moe_sum``) in fp32, bf16.

Comparison (``compare`` hook): ``y`` elementwise against the golden within a per-element first-order bound
``_bounds`` derives from the format rounding units; on a failure the hook replays the golden under each known
misreading of the checkpoint's bytes (scale bytes as fnuz: x0.5 per scale; nibble order swapped; weight_scale_2
ignored; one scale per 32 values instead of 16) and names the one the subject matches.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from references.formats.minifloat import FLOAT4_E2M1FN, get_format
from references.formats.nvfp4 import E2M1_MAX, NVFP4_BLOCK, dequantize_nvfp4, nvfp4_global_scale, quantize_nvfp4

from ..components import ComponentSpec, OutputSpec, register
from ..metrics import Comparison, compare_float
from ..tolerances import Tolerance
from ._case import Case, add
from .moe import SWIGLU_LIMIT, _local_ids, _routes, experts_golden

E4M3_OCP_MAX = 448.0
PROJ = ("w1", "w3", "w2")
LAMBDA = 6.0          # random sums at 6 sigma (Hoeffding), as linear.gemm_tol
U_BF16 = 2.0**-8
U32 = 2.0**-24


# ---------------------------------------------------------------------------------------------------
# weights
def _weights(kw, *, dialect="ocp", swap=False, group=NVFP4_BLOCK, use_global=True) -> dict:
    """Dequantised fp32 expert weights {"w1","w3","w2": [E, out, in]}. The defaults are the checkpoint's meaning
    (the golden); the keywords are the misreadings the diagnosis replays."""
    out = {}
    for n in PROJ:
        packed, sb, g2 = kw[n], kw[f"{n}_scale"], kw[f"{n}_scale_2"].double()
        if not swap and group == NVFP4_BLOCK:
            w = torch.stack([dequantize_nvfp4(packed[e], sb[e], float(g2[e]) if use_global else 1.0,
                                              dialect=dialect) for e in range(packed.shape[0])])
        else:
            p = packed.numpy()
            lo, hi = p & 0x0F, p >> 4
            codes = np.stack([hi, lo] if swap else [lo, hi], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
            vals = FLOAT4_E2M1FN.decode(codes)
            s = get_format(dialect).decode(sb.numpy())
            K = vals.shape[-1]
            s = np.repeat(s[..., :K // group], group, axis=-1)
            gs = g2.numpy()[:, None, None] if use_global else 1.0
            w = torch.from_numpy((vals * s * gs).astype(np.float32))
        out[n] = w
    return out


def experts_nvfp4_golden(x, ids, weights, w1, w1_scale, w1_scale_2, w3, w3_scale, w3_scale_2, w2, w2_scale,
                         w2_scale_2, w13_input_scale, w2_input_scale, *, limit, out=None) -> dict:
    """Routed NVFP4 experts -> {"y": [T, D]}: ``moe.experts``' golden on the exactly dequantised weights (the
    activation scales are not used: the golden does not quantise activations)."""
    kw = dict(w1=w1, w1_scale=w1_scale, w1_scale_2=w1_scale_2, w3=w3, w3_scale=w3_scale, w3_scale_2=w3_scale_2,
              w2=w2, w2_scale=w2_scale, w2_scale_2=w2_scale_2)
    _check(x, kw)
    w = _weights(kw)
    return experts_golden(x, ids, weights, w["w1"], w["w3"], w["w2"], limit=limit, out=out)


def _check(x, kw):
    """One-line refusals naming the tensor: dtypes, and packed / scale shapes consistent with x's width."""
    D = x.shape[-1]
    for n in PROJ:
        p, s, g = kw[n], kw[f"{n}_scale"], kw[f"{n}_scale_2"]
        if p.dtype != torch.uint8 or p.dim() != 3:
            raise ValueError(f"{n}: expected packed e2m1 uint8 [E, out, in/2], got {p.dtype} {tuple(p.shape)}")
        if s.dtype != torch.uint8 or tuple(s.shape) != (*p.shape[:2], 2 * p.shape[2] // NVFP4_BLOCK):
            raise ValueError(f"{n}_scale: expected E4M3 bytes uint8 {(*p.shape[:2], 2 * p.shape[2] // NVFP4_BLOCK)} "
                             f"(one per {NVFP4_BLOCK} values of {n}), got {s.dtype} {tuple(s.shape)}")
        if tuple(g.shape) != (p.shape[0],) or not g.dtype.is_floating_point:
            raise ValueError(f"{n}_scale_2: expected a float per expert ({p.shape[0]},), got {g.dtype} "
                             f"{tuple(g.shape)}")
    if 2 * kw["w1"].shape[2] != D or 2 * kw["w2"].shape[2] != kw["w1"].shape[1]:
        raise ValueError(f"w1/w2: packed widths {kw['w1'].shape[2]} / {kw['w2'].shape[2]} do not match x's {D} "
                         f"and the intermediate size {kw['w1'].shape[1]}")


# ---------------------------------------------------------------------------------------------------
# emulation (vLLM 0.32's EMULATION backend; the same on gfx942 and OCP, see the module docstring)
def _bf(t):
    return t.to(torch.bfloat16).float()


def nvfp4_act_qdq(x: torch.Tensor, g_enc: float) -> torch.Tensor:
    """vLLM's activation quantise-dequantise (``nvfp4_emulation_utils.py:380-415``), fp32 ops in its order, bf16
    out. x [M, K] fp32 (bf16 values), g_enc the encode global scale (1 / input_scale)."""
    M, K = x.shape
    g = torch.tensor(g_enc, dtype=torch.float32)
    b = x.float().reshape(M, K // NVFP4_BLOCK, NVFP4_BLOCK)
    amax = b.abs().amax(-1)
    s = (g * (amax * torch.tensor(1.0 / E2M1_MAX, dtype=torch.float32))).clamp(-E4M3_OCP_MAX, E4M3_OCP_MAX)
    s = s.to(torch.float8_e4m3fn).float()
    osc = torch.where(s == 0, torch.zeros_like(s), g / s)[..., None]
    v = (b * osc).clamp(-E2M1_MAX, E2M1_MAX)
    q = torch.from_numpy(FLOAT4_E2M1FN.decode(FLOAT4_E2M1FN.encode(v.double().numpy())).astype(np.float32))
    return _bf((q * (s / g)[..., None]).reshape(M, K))


def _served_weight(packed, sb, g2):
    """e2m1 * (float8e4nv(byte) * weight_scale_2) in fp32, then bf16 (``nvfp4_emulation_moe.py:201-233``)."""
    vals = torch.from_numpy(FLOAT4_E2M1FN.decode(
        np.stack([packed.numpy() & 0x0F, packed.numpy() >> 4], -1).reshape(*packed.shape[:-1], -1)).astype(np.float32))
    s = sb.view(torch.float8_e4m3fn).float() * torch.tensor(float(g2), dtype=torch.float32)
    return _bf(vals * s.repeat_interleave(NVFP4_BLOCK, -1))


def _emulate(profile):
    def experts_nvfp4_serving(x, ids, weights, w1, w1_scale, w1_scale_2, w3, w3_scale, w3_scale_2, w2, w2_scale,
                              w2_scale_2, w13_input_scale, w2_input_scale, *, limit, out=None):
        g1 = 1.0 / float(w13_input_scale.float().max())
        g2 = 1.0 / float(w2_input_scale.float().max())
        xq = nvfp4_act_qdq(_bf(x), g1)
        local = _local_ids(ids, None)
        T, k = ids.shape
        contrib = torch.zeros(T, k, x.shape[1])
        for e in torch.unique(local[local >= 0]).tolist():
            tok, slot = torch.nonzero(local == e, as_tuple=True)
            W1 = _served_weight(w1[e], w1_scale[e], w1_scale_2[e])
            W3 = _served_weight(w3[e], w3_scale[e], w1_scale_2[e])     # w1's global scale (modelopt.py:1032)
            W2 = _served_weight(w2[e], w2_scale[e], w2_scale_2[e])
            xe = xq[tok]
            g, u = _bf(xe @ W1.T), _bf(xe @ W3.T)
            a = _bf(torch.nn.functional.silu(g.clamp(max=limit)) * u.clamp(-limit, limit))
            ye = (nvfp4_act_qdq(a, g2) @ W2.T) * weights[tok, slot].float()[:, None]
            contrib[tok, slot] = _bf(ye)
        y = _bf(contrib.sum(1))
        if out is not None:
            out.copy_(y)
        return {"y": y}
    return experts_nvfp4_serving


# ---------------------------------------------------------------------------------------------------
# bounds
def _qdq_bound(v: torch.Tensor, g_enc: float) -> torch.Tensor:
    """|x - NVFP4-qdq(x)| <= max(|x|, sigma_hi) / 4 + max(0, |x| - 6 sigma_lo), elementwise, v [..., K] fp64.

    sigma = s / g is the decoded block scale, s = e4m3(min(g amax / 6, 448)). s rounds to nearest: |s - s*| <=
    2^-4 s* for a normal s* (>= 2^-6), <= 2^-10 (half the subnormal step 2^-9) below, so sigma lies in [sigma_lo,
    sigma_hi]. With |x / sigma| <= 6 the e2m1 rounding error is at most half a step: 0.25 on [0, 2), 0.5 on [2, 4),
    1 on [4, 6], i.e. <= max(0.25, |x / sigma| / 4) sigma = max(sigma, |x|) / 4; beyond 6 the value clips to
    6 sigma (error |x| - 6 sigma <= |x| - 6 sigma_lo; a scale rounding to 0 gives 0: error |x|). The fp32 products
    of the quantiser move x / sigma by 2^-23 relative: a tie decided the other way, still within half a step."""
    b = v.reshape(*v.shape[:-1], v.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    s_star = (g_enc * b.abs().amax(-1) / E2M1_MAX).clamp(max=E4M3_OCP_MAX)
    d = torch.maximum(s_star * 2.0**-4, torch.full_like(s_star, 2.0**-10))
    sig_hi = ((s_star + d).clamp(max=E4M3_OCP_MAX) / g_enc)[..., None]
    sig_lo = ((s_star - d).clamp(min=0.0) / g_enc)[..., None]
    a = b.abs()
    e = torch.maximum(a, sig_hi) / 4 + (a - 6 * sig_lo).clamp(min=0.0)
    return e.reshape(v.shape)


def _expert_passes(local, x, kw, w, L):
    """Per expert routed to: (tok, wt, W1, W3, W2, xe, g, u, fg, fu, a, ye) in fp64 for the tokens ``tok`` sent to
    it, with ``wt`` their routing weights, g = x W1^T, u = x W3^T, the clamped SwiGLU a = SiLU(min(g, L)) clamp(u,
    +-L), its partial derivatives fg = da/dg, fu = da/du (0 where the clamp is active) and ye = a W2^T: the one
    forward pass the elementwise bound (_bounds) and the RMS model (rms_variance) propagate their terms through."""
    for e in torch.unique(local[local >= 0]).tolist():
        tok, slot = torch.nonzero(local == e, as_tuple=True)
        wt = kw["weights"][tok, slot].double()[:, None]
        W1, W3, W2 = w["w1"][e], w["w3"][e], w["w2"][e]
        xe = x[tok]
        g, u = xe @ W1.T, xe @ W3.T
        gc, uc = g.clamp(max=L), u.clamp(-L, L)
        sg = torch.sigmoid(gc)
        fg = (sg * (1 + gc * (1 - sg))) * uc * (g < L)
        fu = gc * sg * (u.abs() < L)
        a = gc * sg * uc
        yield tok, wt, W1, W3, W2, xe, g, u, fg, fu, a, a @ W2.T


def _bounds(kw) -> dict:
    """Per-element magnitudes B [T, D] per level: |got - want| <= B[level] (first order, x1.1 for the second).

    Per routed pair (t, e, w), y_e = W2 a, a = SiLU(min(g, L)) clamp(u, -L, L), g = W1 x, u = W3 x (golden fp64,
    dequantised weights). Sensitivities fg = da/dg = SiLU'(g) u [g < L], fu = da/du = SiLU(g) [|u| < L] (the clamp
    is 1-Lipschitz). Rounding sources of the served path, each with its magnitude, combined as a random sum at
    lambda = 6 (independent zero-mean errors; J = W2 diag(fg) W1 + W2 diag(fu) W3 carries x's errors, which every
    channel shares):
      x: NVFP4 qdq (``_qdq_bound`` with g1 = 1 / max input_scale) + bf16 of the dequantised x (u_bf 2^-8);
      weights: the dequantised weight rounded to bf16 (u_bf |W_kj x_j| per product term);
      g, u: bf16 (u_bf |g_k|); a: bf16 (u_bf |a_k|) then NVFP4 qdq (g2 = 1 / max w2 input_scale);
      W2 weights: u_bf |W2_ik a_k|; the pair's output: bf16 (u_bf |w y_e,i|, summed over pairs); y: bf16.
    fp32 accumulation (n + 4) u32 rides on every bf16 term (u_bf + (n + 4) u32).
    Levels: "serving" = all of it; "fp32" / "fp64" = the fp32 golden against fp64 or another fp32 evaluation: each
    fp32 rounding is one of the bf16 sources above with (n + 4) u32 in place of u_bf (no fp4 source), twice for
    two evaluations; "emulated" = the same W4A4 bf16 pipeline in another accumulation order: g, u, a, the outputs
    may land one bf16 ulp (2 u_bf) apart, and an a channel's e2m1 code then flips by one step (<= 2x its
    half-step bound) where it sits within that ulp of a rounding boundary, or its block's scale byte flips (2 u_bf
    against the e4m3 step 2^-3 relative): a share rho <= 2 u_bf * 4 + 2 u_bf / 2^-3 = 2^-4 of the channels, whose
    random sum is sqrt(rho) of their total."""
    x = kw["x"].double()
    D = x.shape[1]
    w = {n: t.double() for n, t in _weights(kw).items()}
    I = w["w1"].shape[1]
    n = max(D, I)
    ub = U_BF16 + (n + 4) * U32
    u32 = (n + 4) * U32
    g1 = 1.0 / float(kw["w13_input_scale"].double().max())
    g2 = 1.0 / float(kw["w2_input_scale"].double().max())
    L = kw["limit"]
    ex = _qdq_bound(x, g1) + ub * x.abs()
    local = _local_ids(kw["ids"], None)
    T = x.shape[0]
    acc = {lvl: torch.zeros(T, D, dtype=torch.float64) for lvl in ("serving", "fp32", "emulated")}
    lin = {lvl: torch.zeros(T, D, dtype=torch.float64) for lvl in acc}
    y = torch.zeros(T, D, dtype=torch.float64)
    rho = 2.0**-4
    for tok, wt, W1, W3, W2, xe, g, u, fg, fu, a, ye in _expert_passes(local, x, kw, w, L):
        y.index_add_(0, tok, wt * ye)
        M = fg[:, :, None] * W1 + fu[:, :, None] * W3                       # [P, I, D]
        t_x = torch.einsum("di,pij->pdj", W2, M * ex[tok][:, None, :]).square().sum(-1)
        G2 = xe.square() @ W1.square().T + g.square()                    # random-sum magnitudes (unit-free)
        U2 = xe.square() @ W3.square().T + u.square()
        ea = _qdq_bound(a, g2)
        unit = (fg.square() * G2 + fu.square() * U2 + a.square()) @ W2.square().T + a.square() @ W2.square().T
        t_k = ub**2 * unit + ea.square() @ W2.square().T
        acc["serving"].index_add_(0, tok, wt.square() * (t_x + t_k))
        lin["serving"].index_add_(0, tok, ub * (wt * ye).abs())
        acc["fp32"].index_add_(0, tok, wt.square() * u32**2 * unit)   # x is exact in both
        lin["fp32"].index_add_(0, tok, u32 * (wt * ye).abs())
        acc["emulated"].index_add_(0, tok, wt.square() * ((2 * ub)**2 * unit + rho * (2 * ea).square()
                                                          @ W2.square().T))
        lin["emulated"].index_add_(0, tok, 2 * ub * (wt * ye).abs())
    out = {}
    for lvl, unit_y in (("serving", ub), ("fp32", u32), ("emulated", 2 * ub)):
        out[lvl] = 1.1 * (LAMBDA * acc[lvl].sqrt() + lin[lvl] + unit_y * y.abs())
    out["fp32"] = 2 * out["fp32"]      # two fp32 evaluations (the golden and the subject)
    out["fp64"] = out["fp32"] / 2      # the fp32 golden against fp64
    return out


# ---------------------------------------------------------------------------------------------------
# RMS (calc_diff) model: the same sources as ``_bounds``, each as a variance instead of a worst-case magnitude
# (conformance.rms: round-to-nearest leaves an error uniform over its cell, variance cell^2/12; independent sources
# add). docs/rms-limits.md "moe.experts_nvfp4".
def _e4m3_cell(s_star: torch.Tensor) -> torch.Tensor:
    """The OCP E4M3 cell (ulp) the block scale s* = g amax / 6 rounds in: 2^(floor(log2 s*) - 3) for a normal s*
    (>= 2^-6), 2^-9 below (subnormal step), 0 at the clamp (448 is exact)."""
    e = torch.floor(torch.log2(s_star.clamp_min(2.0**-6)))
    return torch.where(s_star >= E4M3_OCP_MAX, torch.zeros_like(s_star), torch.exp2(e - 3))


def _qdq_moments(v: torch.Tensor, g_enc: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(variance, cell, sigma) of the NVFP4 activation quantise-dequantise error per element, v [..., K] fp64.

    sigma = s / g with s = e4m3(s*), s* = min(g amax / 6, 448) of the element's block of 16 (from the golden
    values; the served block's amax differs by the upstream errors, a second-order change of sigma^2). The value's
    code is its e2m1 rounding at t = |v| / sigma: cells of 0.5 on [0, 2) (codes 0, .5, 1, 1.5, 2), 1 on [2, 4)
    (2, 3, 4) and 2 on [4, 6] (4, 6): the error is uniform over the cell the value lands in, variance
    sigma^2 cell(t)^2 / 12 (the per-code ulp^2/12, not one unit roundoff: the relative half-step is 1/4 on every
    binade but 1/6 .. 1/4 across a cell, and 1 at t < 0.5); the scale's own E4M3 rounding (uniform over its cell
    c_s, E[s^2] = s*^2 + c_s^2/12) scales that: sigma^2 -> (s*^2 + c_s^2/12) / g^2. A scale rounded down puts the
    block's amax at t <= 6 / (1 - 2^-4) = 6.4: clipped to 6, an error <= 0.4 sigma, inside the top cell's
    sqrt(1/3) sigma. Where s* is clamped at 448 (calibration below the block's amax) the values beyond 6 sigma clip:
    (|v| - 6 sigma)^2, deterministic; a subnormal s* (< 2^-6) rounds by up to 2^-10 absolute, so its values clip
    at most to (|v| - 6 (s* - 2^-10) / g)^2; a scale below half the smallest subnormal (s* < 2^-10) rounds to 0: the
    block encodes as zeros, error v^2."""
    b = v.reshape(*v.shape[:-1], v.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    s_star = (g_enc * b.abs().amax(-1) / E2M1_MAX).clamp(max=E4M3_OCP_MAX)
    cs = _e4m3_cell(s_star)
    sig2 = ((s_star.square() + cs.square() / 12) / g_enc**2)[..., None]
    sig = sig2.sqrt()
    t = b.abs() / (s_star / g_enc).clamp_min(1e-300)[..., None]
    cell = torch.where(t < 2, 0.5, torch.where(t < 4, 1.0, 2.0)).to(torch.float64)
    # clipping: at the 448 clamp (s* itself), and for a subnormal s* (< 2^-6) whose rounding down by up to half the
    # subnormal step 2^-10 can put values well past 6 sigma: bounded at sigma_lo = (s* - 2^-10) / g
    s_lo = torch.where(s_star < 2.0**-6, (s_star - 2.0**-10).clamp(min=0.0), s_star)
    var = sig2 * cell.square() / 12 + (b.abs() - 6 * s_lo[..., None] / g_enc).clamp(min=0.0).square()
    zero = (s_star < 2.0**-10)[..., None].expand_as(b)
    var = torch.where(zero, b.square(), var)
    cell = torch.where(zero, torch.zeros_like(cell), cell)
    shape = v.shape
    return var.reshape(shape), cell.reshape(shape), (sig.expand_as(b)).reshape(shape)


def rms_variance(kw, level: str) -> tuple[torch.Tensor, str, float]:
    """Per-element expected squared error V [T, D] of ``y`` at ``level``, its derivation, and the largest single
    flip event's squared-error cost b (emulated level: the Bennett / Poisson allowance counts lambda = sum V / b
    events; 0 elsewhere). Notation as ``_bounds`` (J = W2 M the pair's Jacobian to x, G2 / U2 the random-sum
    magnitudes of g / u, fg / fu the SwiGLU sensitivities); uq^2 = ub^2 + ((n + 4) u32)^2 (a bf16 rounding with
    the fp32 accumulation that rides on it, each uniform: /3).
      serving   per routed pair (t, e, w), w^2 x [ sum_j J_ij^2 vx_j                         x: NVFP4 qdq (g1) +
                                                                                               bf16 x', _qdq_moments
                  + uq^2/3 ((fg^2 G2 + fu^2 U2) @ W2^2)                                      W1 / W3 bf16, g, u bf16
                  + 3 uq^2/3 (a^2 @ W2^2)                                 a bf16, dequantised a' bf16, W2 bf16
                  + va @ W2^2 ]                                                  a: NVFP4 qdq (g2), _qdq_moments
                + uq^2/3 (w ye)^2 (the pair's bf16 output), summed over pairs; + uq^2/3 y^2 (bf16 y).
      emulated  (the same W4A4 bf16 pipeline: same x codes, same weights; fp32 order r = sqrt(2 (n+4)/3) u32)
                a's pre-quantisation disagreement: vLLM rounds SiLU(g) to bf16 before the product with u
                (``model_executor/layers/fused_moe/utils.py:575-589``: clamp, F.silu, * up in bf16, eager on CPU;
                a device's inductor kernel may round once), the emulation rounds the fp32 product once: one
                intermediate bf16 rounding placed differently, relative to |a| (ub^2/3 a^2), and
                it decorrelates the two sides' output roundings (2 ub^2/3 a^2); g, u bf16 flips under the fp32 order,
                E|dg| 2 ub |g| <= 2 ub r G2, through fg / fu: E[da^2] <= d_a^2 = ub^2 a^2 + 2 ub r A2w,
                A2w = fg^2 G2 + fu^2 U2. The dequantised a' is the same unless a code flips: probability
                E|da| / (cell sigma) <= d_a / (cell sigma) (code boundaries one cell apart), cost (cell sigma)^2,
                so E[e^2] <= d_a cell sigma (+ d_a^2 where da exceeds a cell); a block's scale byte flips with
                probability <= d_a(m) (g2 / 6) / c_s (m the block's amax element), every value of
                the block then re-rounded on a grid 2^-3 .. 2^-4 apart: 2 cell^2 sigma^2 / 12 each. Through W2:
                (.) @ W2^2; the pair's output: bf16 flips under r (ub r (R2 + ye^2), R2 = a^2 @ W2^2) and one
                rounding placed differently (ub^2 ye^2); y: (ub^2 + 2 ub r + r^2) y^2.
      fp32/fp64 uq32^2/3 x the bf16 terms' magnitudes with (n+4) u32 in place of ub (x exact, no qdq), twice at
                fp32 (two evaluations); measured, not judged."""
    x = kw["x"].double()
    D = x.shape[1]
    w = {n: t.double() for n, t in _weights(kw).items()}
    I = w["w1"].shape[1]
    n = max(D, I)
    u32 = (n + 4) * U32
    uq2 = U_BF16**2 + u32**2
    r = math.sqrt(2 * (n + 4) / 3) * U32
    g1 = 1.0 / float(kw["w13_input_scale"].double().max())
    g2 = 1.0 / float(kw["w2_input_scale"].double().max())
    L = kw["limit"]
    vq_x, _, _ = _qdq_moments(x, g1)
    vx = vq_x + uq2 / 3 * x.square()
    local = _local_ids(kw["ids"], None)
    T = x.shape[0]
    V = torch.zeros(T, D, dtype=torch.float64)
    y = torch.zeros(T, D, dtype=torch.float64)
    b_max = 0.0
    for tok, wt, W1, W3, W2, xe, g, u, fg, fu, a, ye in _expert_passes(local, x, kw, w, L):
        W2sq = W2.square().T
        y.index_add_(0, tok, wt * ye)
        G2 = xe.square() @ W1.square().T + g.square()
        U2 = xe.square() @ W3.square().T + u.square()
        A2w = fg.square() * G2 + fu.square() * U2
        if level == "serving":
            M = fg[:, :, None] * W1 + fu[:, :, None] * W3                       # [P, I, D]
            J = torch.einsum("di,pij->pdj", W2, M)                               # [P, D, D]
            t_x = (J.square() * vx[tok][:, None, :]).sum(-1)
            va, _, _ = _qdq_moments(a, g2)
            vp = t_x + uq2 / 3 * (A2w @ W2sq) + uq2 * (a.square() @ W2sq) + va @ W2sq
            V.index_add_(0, tok, wt.square() * vp + uq2 / 3 * (wt * ye).square())
        elif level == "emulated":
            d2 = U_BF16**2 * a.square() + 2 * U_BF16 * r * A2w                   # E[da^2] (docstring)
            _, cell, sig = _qdq_moments(a, g2)
            ea = d2.sqrt() * cell * sig + d2                                      # a-code flips
            ab = a.reshape(*a.shape[:-1], -1, NVFP4_BLOCK)
            s_star = (g2 * ab.abs().amax(-1) / E2M1_MAX).clamp(max=E4M3_OCP_MAX)
            cs = _e4m3_cell(s_star)
            am = torch.gather(d2.reshape(ab.shape), -1, ab.abs().argmax(-1, keepdim=True)).sqrt()[..., 0]
            p_b = torch.where(cs > 0, (am * g2 / E2M1_MAX / cs.clamp_min(1e-300)).clamp(max=1.0),
                              torch.zeros_like(cs))
            eb = (p_b[..., None] * (cell * sig).reshape(ab.shape).square() / 6).reshape(a.shape)
            R2 = a.square() @ W2sq
            vp = (ea + eb) @ W2sq + U_BF16 * r * (R2 + ye.square()) + U_BF16**2 * ye.square()
            V.index_add_(0, tok, wt.square() * vp)
            # the largest single event: one a code flipping by a cell, its cost over the token's D outputs
            cost = wt.square() * (cell * sig).square() * W2.square().sum(0)[None, :]
            b_max = max(b_max, float(cost.max()))
        else:
            unit = (A2w + a.square()) @ W2sq + a.square() @ W2sq
            V.index_add_(0, tok, wt.square() * (u32**2 / 3 * unit) + u32**2 / 3 * (wt * ye).square())
    if level == "serving":
        V = V + uq2 / 3 * y.square()
        how = ("moe.experts_nvfp4 serving: per-element quadrature of _bounds' sources (rms_variance): x and a "
               "NVFP4 qdq at the e2m1 cell of each value (cell^2/12 sigma^2, the E4M3 scale's rounding in E[s^2], "
               f"clipping beyond 6 sigma), bf16 weights / g / u / a / a' / outputs at uq^2/3, "
               f"uq = {math.sqrt(uq2):.4g}")
    elif level == "emulated":
        ey = U_BF16**2 + 2 * U_BF16 * r + r * r
        V = V + ey * y.square()
        b_max = max(b_max, float(((2 * U_BF16 * y).square()).max()))
        how = ("moe.experts_nvfp4 emulated: a's pre-quantisation disagreement d_a^2 = ub^2 a^2 + 2 ub r A2w "
               "(vLLM's bf16 SiLU before the product) turned into e2m1 code flips (d_a cell sigma) and block-scale "
               "flips (p_b 2 cell^2 "
               f"sigma^2/12), through W2; pair outputs ub r (R2 + ye^2) + ub^2 ye^2; y {ey:.3g} y^2 (r = {r:.3g})")
    else:
        V = V + u32**2 / 3 * y.square()
        if level == "fp32":
            V = 4 * V     # two fp32 evaluations, each bound doubled in _bounds: variance x 2 covered by x 4
        how = f"moe.experts_nvfp4 {level}: the bf16 sources' magnitudes at ((n+4) u32)^2/3 = {u32**2 / 3:.3g}"
    return V, how, b_max


# ---------------------------------------------------------------------------------------------------
# comparison with the misreading diagnosis
MISREADINGS = (
    ("x0.5: the checkpoint's OCP E4M3 scale bytes read as fnuz (bias 8: the same byte, half the value)",
     dict(dialect="fnuz")),
    ("nibble order swapped: the even element read from the high nibble", dict(swap=True)),
    ("weight_scale_2 ignored: the per-tensor global scale taken as 1", dict(use_global=False)),
    ("one scale per 32 values: the [out, in/16] scale bytes read as 32-value groups", dict(group=32)),
)


def _diagnose(got, want, bound, kw) -> str:
    """Replay the golden under each misreading; name those whose output the subject's matches better than the
    checkpoint's meaning (worst |got - y_h| / bound below 1, or the best when none is)."""
    g = got.double()
    fits = []
    for what, how in MISREADINGS:
        wm = _weights(dict(kw), **how)
        yh = experts_golden(kw["x"], kw["ids"], kw["weights"], wm["w1"], wm["w3"], wm["w2"],
                            limit=kw["limit"])["y"].double()
        r = float(((g - yh).abs() / bound).nan_to_num(nan=math.inf).max())
        fits.append((r, what))
    r0 = float(((g - want.double()).abs() / bound).nan_to_num(nan=math.inf).max())
    r, what = min(fits)
    if r < 1.0 or r < r0 / 8:
        return f"; diagnosis: matches {what} (worst/bound {r:.3g} under that reading, {r0:.3g} under the checkpoint's)"
    return f"; diagnosis: matches none of the known misreadings (best: {what}, worst/bound {r:.3g})"


def _tol(level):
    return Tolerance(0.0, 1.0, f"NVFP4 experts ({level}): first-order bound per element, conformance.cases."
                               "moe_nvfp4._bounds (random sums at lambda 6, x1.1)")


def compare_experts_nvfp4(got, want, params, level, label, kwargs) -> list[Comparison]:
    if "y" not in got:
        return [Comparison("y", "fail", message=f"{label} y: the subject returned no 'y' output (returned "
                                                 f"{sorted(got)})")]
    Bs = _bounds(kwargs)
    B = Bs[level]
    # RMS (calc_diff) limit: E = sum of the per-element quadrature variance, passed as the magnitude m with
    # ms_rel = 1 (conformance.rms: E = ms_rel * sum m^2); emulated: the errors are counted flips, flip_ulp set so
    # that the Bennett / Poisson allowance counts lambda = E / b events (b the largest single event's cost)
    var, how, b = rms_variance(kwargs, level)
    n_el = int(torch.isfinite(var).sum())
    e_sum = float(var.sum())
    flip = math.sqrt(n_el * b / e_sum) if b > 0 and e_sum > 0 else 0.0
    tol = _tol(level).with_rms(ms_rel=1.0, flip_ulp=flip, derivation=how)
    c = compare_float(got["y"].float(), want["y"], tol, output="y", scale=B, label=label,
                      ulp_dtype="float32" if level in ("fp64", "fp32") else "bfloat16", level=level,
                      rms_magnitude=var.sqrt())
    if c.verdict != "pass" and level in ("serving", "emulated") and got["y"].shape == want["y"].shape:
        gold = want["y"] if level == "serving" else experts_nvfp4_golden(**kwargs)["y"]
        c.message += _diagnose(got["y"], gold, Bs["serving"], kwargs)
    return [c]


EXPERTS_NVFP4 = register(ComponentSpec(
    name="moe.experts_nvfp4", family="moe", reference=experts_nvfp4_golden,
    outputs=(OutputSpec("y", "float", tol=lambda p, lvl: _tol(lvl)),),
    description="routed SwiGLU experts with NVFP4 weights (packed e2m1, E4M3 scale per 16, fp32 weight_scale_2) "
                "and NVFP4 activation scales (input_scale), -1 = dropped slot",
    spec_section="3.13 (NVFP4 checkpoints, issue 18)", emulate=_emulate, compare=compare_experts_nvfp4,
    divergences=("vLLM 0.32 serves W4A4 emulation on ROCm (activations NVFP4-quantised with 1/max(input_scale)); "
                 "the golden is W4A16 (unquantised activations)",
                 "vLLM 0.32 uses w1's weight_scale_2 for w3 (modelopt.py:1032)",
                 "spec 8.5: routing weight before (golden) / after (vLLM) W2"),
))


# ---------------------------------------------------------------------------------------------------
# cases
def _expert_weights(g, E, out, inp, p, gain):
    """fp32 weights [E, out, inp] ~ N(0, (gain / sqrt(inp))^2) x a per-expert magnitude; "blocks" shapes the
    per-16 block magnitudes (what the scale bytes become)."""
    w = torch.randn(E, out, inp, generator=g, dtype=torch.float64) * gain / math.sqrt(inp)
    mag = torch.exp2(torch.rand(E, 1, 1, generator=g, dtype=torch.float64) * p.get("expert_spread", 0.0)
                     - p.get("expert_spread", 0.0) / 2)
    w = w * mag
    kind = p.get("blocks", "normal")
    b = w.reshape(E, out, inp // NVFP4_BLOCK, NVFP4_BLOCK)
    if kind == "flat":
        # every block's amax equal to the tensor's: every scale byte lands at (or next to) 448 = 0x7E, the bytes
        # fnuz reads as 224 (above fnuz's max 240 in OCP terms)
        b = b / b.abs().amax(-1, keepdim=True) * b.abs().amax(dim=(1, 2, 3), keepdim=True)
    elif kind == "wide":
        # block magnitudes log-uniform over 2^-20 .. 1 of the tensor's: subnormal scale bytes (0x01..0x07), and
        # whole zero blocks (scale byte 0)
        b = b * torch.exp2(-20 * torch.rand(*b.shape[:-1], 1, generator=g, dtype=torch.float64))
        b = b * (torch.rand(*b.shape[:-1], 1, generator=g) > 0.05)
    return b.reshape(E, out, inp)


def _quant(wf, shared_global=None):
    packed, sb, gs = [], [], []
    for e in range(wf.shape[0]):
        gl = nvfp4_global_scale(wf[e].numpy()) if shared_global is None else shared_global[e]
        p, s, _ = quantize_nvfp4(wf[e], global_scale=gl)
        packed.append(p)
        sb.append(s)
        gs.append(gl)
    return torch.stack(packed), torch.stack(sb), torch.tensor(gs, dtype=torch.float32)


def _make(g, p):
    T, E, D, I, k = p["tokens"], p["experts"], p["dim"], p["inter"], p["topk"]
    x = (torch.randn(T, D, generator=g) * p.get("x_scale", 1.0)).to(torch.bfloat16).float()
    w1f = _expert_weights(g, E, I, D, p, p["gain"])
    w3f = _expert_weights(g, E, I, D, p, p["gain"])
    w2f = _expert_weights(g, E, D, I, p, 1.0 / p["gain"])
    # gate and up share one global scale per expert (ModelOpt's fused gate/up export; vLLM keeps one)
    g13 = [nvfp4_global_scale(torch.cat([w1f[e], w3f[e]]).numpy()) for e in range(E)]
    w1, s1, gs1 = _quant(w1f, g13)
    w3, s3, gs3 = _quant(w3f, g13)
    w2, s2, gs2 = _quant(w2f)
    kw = dict(x=x, ids=_routes(g, T, E, k, p.get("routes", "dropped")),
              weights=0.1 + 1.4 * torch.rand(T, k, generator=g), w1=w1, w1_scale=s1, w1_scale_2=gs1, w3=w3,
              w3_scale=s3, w3_scale_2=gs3, w2=w2, w2_scale=s2, w2_scale_2=gs2, limit=SWIGLU_LIMIT)
    # activation scales calibrated on this batch (amax / (6 * 448)), as ModelOpt's calibration does: x's, and the
    # golden hidden activation's over every routed pair (one value per expert, vLLM takes the max)
    dq = _weights(kw)
    amax_a = 0.0
    for e in range(E):
        xe = x.double()
        gg, uu = xe @ dq["w1"][e].double().T, xe @ dq["w3"][e].double().T
        a = torch.nn.functional.silu(gg.clamp(max=SWIGLU_LIMIT)) * uu.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)
        amax_a = max(amax_a, float(a.abs().max()))
    cal = p.get("calibration", 1.0)
    kw["w13_input_scale"] = torch.full((E,), float(x.abs().max()) * cal / (E2M1_MAX * E4M3_OCP_MAX))
    kw["w2_input_scale"] = torch.full((E,), amax_a * cal / (E2M1_MAX * E4M3_OCP_MAX))
    return kw


ROWS = [
    # tag, T, E, D, I, k, gain, extra, seed, tier
    ("decode", 1, 8, 64, 64, 2, 3.0, {}, 0, "fast"),
    ("prefill", 7, 8, 64, 64, 4, 3.0, {}, 1, "fast"),
    ("prefill", 33, 8, 128, 64, 4, 6.0, {}, 2, "fast"),                        # the clamp active
    ("prefill", 17, 8, 64, 64, 2, 3.0, {"blocks": "flat"}, 3, "fast"),        # scale bytes at 448 (0x7E)
    ("prefill", 17, 8, 64, 64, 2, 3.0, {"blocks": "wide"}, 4, "fast"),        # subnormal / zero scale bytes
    ("prefill", 17, 8, 64, 64, 2, 3.0, {"expert_spread": 16.0}, 5, "fast"),   # global scales over 2^16
    ("prefill", 17, 8, 64, 64, 2, 3.0, {"calibration": 0.5}, 6, "fast"),      # calibrated below the batch amax
    ("prefill", 64, 16, 256, 128, 6, 6.0, {}, 10, "full"),
]
for tag, T, E, D, I, k, gain, extra, seed, tier in ROWS:
    name = (extra.get("blocks") and f"blocks-{extra['blocks']}") or ("expert-spread" if "expert_spread" in extra
                                                                      else "calibration-half" if "calibration" in
                                                                      extra else "normal")
    add(Case(f"moe.experts_nvfp4/T{T}E{E}k{k}D{D}I{I}/{name}/s{700 + seed}", "moe.experts_nvfp4", _make,
             dict(tokens=T, experts=E, dim=D, inter=I, topk=k, gain=gain, **extra), seed=700 + seed, dist="normal",
             tags=(tag, "nvfp4") + (("clamp-active",) if gain > 3 else ()), tier=tier))
