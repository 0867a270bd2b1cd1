"""The MTP head (spec 3.15): the multi-token-prediction layer's input mixing and its own HC head + norm + the
shared LM head, around the decoder block (which is out of this component's scope).

Scope. The component takes the main model's pre-HC_head streams ``X_main [T, hc, D]``, the token sequence
``ids [T + 1]`` (position t's MTP input embeds ids[t + 1], the token after it: the shift is the component's),
the rows' ``positions [T]``, and the MTP block's *output* streams ``Y [T, hc, D]``; it returns
  * ``X``: the block's input, h_proj(hnorm(X_main)) + broadcast_hc(e_proj(enorm(Embed(ids[t+1])))) [T, hc, D];
  * ``logits``: Head . norm(HC_head(Y; the MTP's hc_head_*)) [T, vocab].
The decoder block between them is tested by the layer components (mhc.*, attn.*, moe.*) and the whole-model
golden; here ``Y`` is an input. That keeps the fast tier fast (no block, no cache), and keeps the two halves'
bounds independent: if ``Y`` were the block (or identity) applied to ``X``, the FP8 error of the mixing would
reach the logits through the HC head's sigmoid mixes, which head.lm's derivation does not cover, and a wrong
mixing would show twice.

Inputs are what the serving path holds: bf16-exact X_main, Y, embedding table, norm and head weights (the
checkpoint stores them in bf16; the residual is bf16 between layers), e_proj / h_proj as the checkpoint's OCP
e4m3fn codes with e8m0 128x128 scales (linear.fp8_block's inputs).

Variants (spec 3.15 step 1; a source divergence, not a failure): "official" (OFF ``MTPBlock``: every
position's embedding is used) and "vllm" (vLLM 0.32 ``DeepSeekV4MultiTokenPredictorLayer.forward`` ->
``_FUSED_MTP_INPUT_RMSNORM_KERNEL``, ``models/deepseek_v4/common/ops/fused_mtp_input_rmsnorm.py``: the
embedding row of position 0 is zeroed before enorm, so X's position-0 rows are h_proj(hnorm(X_main)) alone).
Cases carry the variant; the emulation follows the case's variant (as moe's renormalisation does), so an
official row is not turned into the divergence by the emulation; vLLM's own choice is "vllm".

Serving emulation (vLLM on every platform): enorm / hnorm in fp32 on the bf16 inputs, bf16 outputs (the Triton
kernel stores in the input dtype); e_proj / h_proj are ``ReplicatedLinear`` under ``DeepseekV4FP8Config`` ->
``Fp8LinearMethod`` block [128, 128] (linear.fp8_block's emulation: 1x128 activation groups in the profile's
dialect, weights converted OCP -> fnuz on gfx942, fp32 accumulation, bf16 out); the sum in bf16; the head half
is head.lm's emulation (HCHeadOp, then ``_MTP_SHARED_HEAD_RMSNORM_KERNEL``, then the shared ParallelLMHead).
"""

from __future__ import annotations

import torch

from references.components.mtp import MTP_VARIANTS, mtp_input, mtp_logits
from references.components.norms import rms_norm
from references.formats.blockscale import dequantize_fp8

from ..components import ComponentSpec, OutputSpec, register
from ..tolerances import Tolerance
from ._case import Case, add, dist_tensor
from ._serving import U32, UB
from .head import _emulate_head, _head_scale, _head_tol
from .linear import U_ACT, W_SPEC, act_floor, fp8_block_weight, sqrt_dot
from .linear import _emulate as _emulate_linear


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _check(X_main, ids, positions, Y):
    if X_main.dim() != 3:
        raise ValueError(f"X_main: expected [T, hc, D], got {tuple(X_main.shape)}")
    T = X_main.shape[0]
    if tuple(ids.shape) != (T + 1,):
        raise ValueError(f"ids: expected [T + 1] = ({T + 1},) (position t embeds ids[t + 1]), got {tuple(ids.shape)}")
    if tuple(positions.shape) != (T,):
        raise ValueError(f"positions: expected ({T},), got {tuple(positions.shape)}")
    if tuple(Y.shape) != tuple(X_main.shape):
        raise ValueError(f"Y: expected the block output's shape {tuple(X_main.shape)}, got {tuple(Y.shape)}")


def mtp_head_golden(X_main: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, embed_table: torch.Tensor,
                    enorm: torch.Tensor, hnorm: torch.Tensor, e_proj: torch.Tensor, e_proj_scale: torch.Tensor,
                    h_proj: torch.Tensor, h_proj_scale: torch.Tensor, Y: torch.Tensor, hc_fn: torch.Tensor,
                    hc_base: torch.Tensor, hc_scale: torch.Tensor, norm_weight: torch.Tensor,
                    head_weight: torch.Tensor, *, norm_eps: float, hc_eps: float, variant: str = "official") -> dict:
    """-> {"X": MTP block input [T, hc, D], "logits": [T, vocab] of the block output Y}; weights exact-dequantised
    (e_proj / h_proj: uint8 OCP codes [D, D] + e8m0 bytes [D/128, D/128]). variant: see the module docstring."""
    _check(X_main, ids, positions, Y)
    for n, t in (("e_proj", e_proj), ("h_proj", h_proj)):
        if t.dtype != torch.uint8:
            raise TypeError(f"{n}: expected uint8 OCP e4m3fn codes, got {t.dtype}")
    dt = torch.promote_types(X_main.dtype, torch.float32)
    w = {"enorm": enorm.to(dt), "hnorm": hnorm.to(dt), "e_proj": dequantize_fp8(e_proj, e_proj_scale, W_SPEC).to(dt),
         "h_proj": dequantize_fp8(h_proj, h_proj_scale, W_SPEC).to(dt), "hc_head_fn": hc_fn.to(dt),
         "hc_head_base": hc_base.to(dt), "hc_head_scale": hc_scale.to(dt), "norm": norm_weight.to(dt)}
    X = mtp_input(X_main.to(dt), ids[1:], embed_table.to(dt), w, eps=norm_eps, positions=positions, variant=variant)
    logits = mtp_logits(Y.to(dt), w, head_weight.to(dt), norm_eps=norm_eps, hc_eps=hc_eps)
    return {"X": X, "logits": logits}


def _emulate(profile: str):
    lin = _emulate_linear(profile)
    head = _emulate_head(profile)

    def mtp_head_serving(X_main, ids, positions, embed_table, enorm, hnorm, e_proj, e_proj_scale, h_proj,
                         h_proj_scale, Y, hc_fn, hc_base, hc_scale, norm_weight, head_weight, *, norm_eps, hc_eps,
                         variant="official"):
        """vLLM's MTP layer around its block (module docstring): fused enorm/hnorm (fp32 inside, bf16 out), the
        two block-FP8 linears, bf16 sum; the MTP head as head.lm serves it."""
        _check(X_main, ids, positions, Y)
        T, hc, D = X_main.shape
        e = _bf16(embed_table)[ids[1:].long()]
        if variant == "vllm":
            e = torch.where((positions == 0).unsqueeze(-1), torch.zeros_like(e), e)
        en = _bf16(rms_norm(e, _bf16(enorm), norm_eps))
        hn = _bf16(rms_norm(_bf16(X_main), _bf16(hnorm), norm_eps))
        yh = lin(hn.reshape(T * hc, D), h_proj, h_proj_scale)["y"].reshape(T, hc, D)
        ye = lin(en, e_proj, e_proj_scale)["y"]
        X = _bf16(yh + ye.unsqueeze(-2))
        logits = head(Y, hc_fn, hc_base, hc_scale, norm_weight, head_weight, norm_eps=norm_eps,
                      hc_eps=hc_eps)["logits"]
        return {"X": X, "logits": logits}

    mtp_head_serving.__qualname__ = f"mtp_head_serving[{profile}]"
    return mtp_head_serving


def _mix_parts(kw):
    """fp64: the normed activations (enorm'd embedding [T, D], hnorm'd streams [T*hc, D]) and the dequantised
    projection weights, with the case's variant."""
    X = kw["X_main"].double()
    T, hc, D = X.shape
    e = kw["embed_table"].double()[kw["ids"][1:].long()]
    if kw.get("variant", "official") == "vllm":
        e = torch.where((kw["positions"] == 0).unsqueeze(-1), torch.zeros_like(e), e)
    en = rms_norm(e, kw["enorm"].double(), kw["norm_eps"])
    hn = rms_norm(X, kw["hnorm"].double(), kw["norm_eps"]).reshape(T * hc, D)
    we = dequantize_fp8(kw["e_proj"], kw["e_proj_scale"], W_SPEC).double()
    wh = dequantize_fp8(kw["h_proj"], kw["h_proj_scale"], W_SPEC).double()
    return en, hn, we, wh


def _mix_scale(kw, want):
    """S = Q_h + |y_h| + broadcast(Q_e + |y_e|): Q = sqrt(sum_j (W_ij e_j)^2) of each linear with e_j its
    activation's error unit (linear.act_floor), y_h / y_e the two projections (fp64)."""
    en, hn, we, wh = _mix_parts(kw)
    T, hc, D = kw["X_main"].shape
    sh = (sqrt_dot(act_floor(hn), wh) + (hn @ wh.T).abs()).reshape(T, hc, D)
    se = sqrt_dot(act_floor(en), we) + (en @ we.T).abs()
    return sh + se.unsqueeze(-2)


def _mix_tol(params, level):
    """The elementwise bound below with its quadrature (RMS) model ``conformance.rms.random_sum_rms`` (lam 1: S =
    Q_h + |y_h| + Q_e + |y_e|; the two projections' bf16 outputs, ub |y_h| + ub |y_e| <= ub S, as one step; the
    fp32 accumulation and norm in the (2D + 8) u32 step)."""
    from ..rms import random_sum_rms

    D = params["d"]
    return _mix_elementwise(params, level).with_rms(**random_sum_rms(level, 2 * D + 4, what="mtp.head X", lam=1.0,
                                                                     extra=UB))


def _mix_elementwise(params, level):
    D = params["d"]
    acc = 6 * D * U32          # each linear's fp32 accumulation, Cauchy-Schwarz against 6 Q (linear.gemm_tol)
    norm = (D + 8) * U32       # RMSNorm's D-long mean of squares and rsqrt / products, relative to the activation
    g32 = 2 * U32 + acc + norm
    if level == "fp64":
        return Tolerance(0.0, g32, f"mtp.head X: fp32 golden: norm (D+8) u32 + accumulation 6*D*u32 + 2 u32 = "
                         f"{g32:.3g} of S (S = Q_h + |y_h| + Q_e + |y_e|)")
    if level == "fp32":
        return Tolerance(0.0, 2 * g32, f"mtp.head X: two fp32 evaluations 2*((D+8) u32 + 6 D u32 + 2 u32) = "
                         f"{2 * g32:.3g} of S")
    # serving: each linear is within 6 U_ACT Q + ub |y| + acc of the golden (linear.gemm_tol: bf16 then e4m3
    # rounding of its normed activation, random sum at lambda 6, bf16 output); the bf16 sum adds ub |X| <=
    # ub (|y_h| + |y_e|); the norm's own fp32 error (D+8) u32 of the activation enters through Q <= S.
    r = 6 * U_ACT + 2 * UB + acc + norm
    if level == "emulated":
        # The FP8 activation codes are made inside the component from bf16 norm outputs; a subject whose fp32
        # norm sums in another order can land one bf16 ulp away, and that element's e4m3 code one e4m3 ulp
        # away, at any element: no bound tighter than the triangle inequality through the golden holds
        # (both sides within the serving bound): 2 x serving.
        return Tolerance(0.0, 2 * r, f"mtp.head X: FP8 codes derived in-component from bf16 norm outputs (may "
                         f"differ by one e4m3 ulp per element): 2 x serving = {2 * r:.3g} of S")
    return Tolerance(0.0, r, f"mtp.head X: per linear 6*(2^-4(1+2^-8)+2^-8) Q (bf16 + e4m3 activation, Hoeffding "
                     f"lambda 6) + bf16 output 2^-8 |y|; bf16 sum 2^-8 |X|; accumulation 6*D*u32; norm (D+8) u32 = "
                     f"{r:.3g} of S (S = Q_h + |y_h| + Q_e + |y_e|, Q_i = sqrt(sum_j (W_ij e_j)^2))")


register(ComponentSpec(
    name="mtp.head", family="mtp", reference=mtp_head_golden,
    outputs=(OutputSpec("X", tol=_mix_tol, scale=_mix_scale),
             OutputSpec("logits", tol=_head_tol, scale=lambda kw, want: _head_scale(dict(kw, X=kw["Y"]), want))),
    description="MTP input mixing (enorm(Embed(ids[t+1])), hnorm(X_main), FP8 e_proj / h_proj, hc broadcast) and "
                "the MTP's HC head + norm + shared LM head on the block's output (the block itself: layer components)",
    spec_section="3.15", emulate=_emulate,
    divergences=("spec 3.15 step 1: vLLM (DeepSeekV4MultiTokenPredictorLayer, fused_mtp_input_rmsnorm) zeroes the "
                 "embedding at position 0; OFF MTPBlock does not (variant vllm)",),
))


def _make(g, p):
    T, D, V, hc, p0 = p["tokens"], p["d"], p["vocab"], 4, p["start"]
    ids = torch.randint(0, V, (T + 1,), generator=g)
    ids[-1] = V - 1                     # the last row of the table: an off-by-one read falls off it
    e_codes, e_scales, _ = fp8_block_weight(g, D, D, std=D**-0.5, spread=2)
    h_codes, h_scales, _ = fp8_block_weight(g, D, D, std=D**-0.5, spread=2)
    # enorm and hnorm differ clearly (a swap shows), and the embedding term outweighs the streams' (hnorm 4x
    # smaller), so a lost or wrong embedding stands out of the FP8 budget of the h_proj part
    return {"X_main": _bf16(dist_tensor(g, (T, hc, D), p["dist"], scale=3.0)), "ids": ids,
            "positions": torch.arange(p0, p0 + T), "embed_table": _bf16(torch.randn(V, D, generator=g) * 0.05),
            "enorm": _bf16(1.0 + torch.rand(D, generator=g)), "hnorm": _bf16(0.25 + 0.25 * torch.rand(D, generator=g)),
            "e_proj": e_codes, "e_proj_scale": e_scales, "h_proj": h_codes, "h_proj_scale": h_scales,
            "Y": _bf16(dist_tensor(g, (T, hc, D), p["dist"])),
            "hc_fn": torch.randn(hc, hc * D, generator=g) * (hc * D) ** -0.5,
            "hc_base": torch.randn(hc, generator=g) * 0.5, "hc_scale": 0.5 + torch.rand(1, generator=g),
            "norm_weight": _bf16(1 + 0.1 * torch.randn(D, generator=g)),
            "head_weight": _bf16(torch.randn(V, D, generator=g) * D**-0.5), "norm_eps": 1e-6, "hc_eps": 1e-6,
            "variant": p["variant"]}


assert MTP_VARIANTS == ("official", "vllm")
# (tokens, start position, D, vocab, dist, variant, seed, tier): decode rows at a later position and at
# position 0 (where the variants differ), prefill chunks from 0 (both variants) and from a later position
for tokens, start, d, vocab, dist, variant, seed, tier in [
        (1, 37, 256, 1000, "normal", "official", 0, "fast"),
        (1, 0, 256, 1000, "normal", "official", 1, "fast"),
        (1, 0, 256, 1000, "normal", "vllm", 1, "fast"),
        (33, 0, 256, 1000, "normal", "official", 2, "fast"),
        (33, 0, 256, 1000, "normal", "vllm", 2, "fast"),
        (7, 100, 384, 2048, "outliers", "official", 3, "fast"),
        (129, 0, 512, 4096, "normal", "vllm", 4, "full")]:
    phase = "decode" if tokens == 1 else "prefill"
    add(Case(f"mtp.head/{phase}/t{tokens}p{start}d{d}v{vocab}/{dist}/{variant}/s{seed}", "mtp.head", _make,
             {"tokens": tokens, "start": start, "d": d, "vocab": vocab, "variant": variant}, seed, dist,
             (phase,) + (("variant-vllm",) if variant == "vllm" else ()), tier=tier))
