"""The query path (spec 3.5) and the shared-KV projection written into the SWA cache (spec 3.6, 4.5).

``attn.q_path``: ``qr = q_norm(wq_a . x)`` [T, q_lora] (shared with the indexer), ``q = wq_b . qr`` viewed
[T, H, 512], per-head unweighted RMSNorm, RoPE on the last 64 dims at each token's position. wq_a and wq_b
are block-FP8 linears: the inputs are the checkpoint's bytes (OCP e4m3fn codes + e8m0 128x128 scales, as
``linear.fp8_block`` takes them). The golden dequantises them exactly and runs
``references.components.attention.query_path`` and ``references.components.rope.apply_rope`` in fp32 from
the unquantised activations; the serving emulation chains ``linear.fp8_block``'s emulation (bf16 x, 1x128 FP8
activations, fp32 accumulation per 128-block, bf16 out) with vLLM's fp32-inside norms (one bf16 store each:
``fused_q_kv_rmsnorm`` for q_norm; the fused q-norm / RoPE op for the head norm and RoPE).

DeepSeek-V4.1 rows (``.../v41/...``, ``q_head_norm=False``): no per-head norm, ``q = rope(wq_b qr)``
(``references.components.attention.query_path``'s ``head_norm`` names the vLLM lines). The V4.1 rows use V4's
shapes; wq_b's 128-row blocks are scaled by 2^k, |k| <= 2, so head magnitudes differ and a head norm applied or
dropped by mistake moves most heads by a factor of 2 or more.
"""

from __future__ import annotations

import math

import torch

from references.components.attention import query_path
from references.components.norms import rms_norm, unweighted_rms_norm
from references.components.rope import apply_rope, rope_inv_freq
from references.config import RopeScaling
from references.formats.blockscale import dequantize_fp8

from ..components import ComponentSpec, OutputSpec, register
from ..rms import kv_insert_rms, kv_rope_rms, random_sum_rms
from ..tolerances import Tolerance
from ._case import Case, add, dist_tensor
from ._serving import U32, UB
from .linear import U8, U_ACT, W_SPEC, act_floor, fp8_block_weight
from .linear import _emulate as _linear_emulate

HEAD_DIM = 512
ROPE_DIM = 64
LAMBDA = 6.0       # Hoeffding factor of every random sum below (see linear.gemm_tol): P(exceed) ~ 3e-8 per element


def _bf(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _dequant(name: str, codes: torch.Tensor, scales: torch.Tensor, k: int) -> torch.Tensor:
    """The exact fp32 weight of a checkpoint FP8 linear [N, k] (refusing bytes of the wrong type or shape)."""
    if not isinstance(codes, torch.Tensor) or not isinstance(scales, torch.Tensor):
        raise TypeError(f"{name} / {name}_scale: expected tensors")
    if codes.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"{name} / {name}_scale: expected uint8 OCP e4m3fn codes and e8m0 bytes, got "
                        f"{codes.dtype} / {scales.dtype}")
    if codes.dim() != 2 or codes.shape[1] != k:
        raise ValueError(f"{name}: expected [N, {k}] codes, got {tuple(codes.shape)}")
    n = codes.shape[0]
    if tuple(scales.shape) != (math.ceil(n / 128), math.ceil(k / 128)):
        raise ValueError(f"{name}_scale: expected [{math.ceil(n / 128)}, {math.ceil(k / 128)}], got "
                         f"{tuple(scales.shape)}")
    return dequantize_fp8(codes, scales, W_SPEC)


def _inv_freq(theta: float, yarn: bool) -> torch.Tensor:
    return rope_inv_freq(ROPE_DIM, theta, RopeScaling() if yarn else None)


# --------------------------------------------------------------------------------------------- attn.q_path
def q_path_golden(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, positions, *, n_heads: int, eps: float,
                  theta: float, yarn: bool, q_head_norm: bool = True) -> dict:
    """-> {"qr": [T, q_lora], "q": [T, H, 512]} (spec 3.5): qr = q_norm(wq_a x); q = rope(headnorm(wq_b qr)) on
    dims [448, 512) at ``positions`` [T] with the layer's theta / YaRN. In x's dtype (fp32 golden, fp64 check).
    ``q_head_norm=False`` (V4.1): q = rope(wq_b qr), no per-head norm."""
    if not isinstance(q_head_norm, bool):
        raise TypeError(f"q_head_norm: expected a bool, got {type(q_head_norm).__name__}")
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.dim() != 2:
        raise ValueError(f"x: expected a float [T, D] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    dt = torch.promote_types(x.dtype, torch.float32)
    wa = _dequant("wq_a", wq_a, wq_a_scale, x.shape[1]).to(dt)
    wb = _dequant("wq_b", wq_b, wq_b_scale, wa.shape[0]).to(dt)
    if wb.shape[0] != n_heads * HEAD_DIM:
        raise ValueError(f"wq_b: {wb.shape[0]} rows, expected n_heads * 512 = {n_heads * HEAD_DIM}")
    qr, q = query_path(x.to(dt), wa, q_norm.to(dt), wb, n_heads=n_heads, eps=eps, head_norm=q_head_norm)
    inv = _inv_freq(theta, yarn)
    return {"qr": qr, "q": apply_rope(q, positions, inv.to(dt) if dt == torch.float64 else inv, ROPE_DIM)}


def _emulate_q_path(profile: str):
    lin = _linear_emulate(profile)

    def q_path_serving(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, positions, *, n_heads, eps, theta, yarn,
                       q_head_norm=True):
        """vLLM: wq_a FP8 linear (bf16 out) -> q_norm RMSNorm in fp32 from bf16 operands, bf16 store -> wq_b FP8
        linear (bf16 out) -> per-head norm + RoPE in fp32, one bf16 store (the fused q-norm/RoPE/insert op; V4.1:
        apply_q_norm False, RoPE only)."""
        T = x.shape[0]
        y = lin(x, wq_a, wq_a_scale)["y"]
        qr = _bf(rms_norm(y, _bf(q_norm), eps))
        z = lin(qr, wq_b, wq_b_scale)["y"].view(T, n_heads, HEAD_DIM)
        q = apply_rope(unweighted_rms_norm(z, eps) if q_head_norm else z, positions, _inv_freq(theta, yarn),
                       ROPE_DIM)
        return {"qr": qr, "q": _bf(q)}

    q_path_serving.__qualname__ = f"q_path_serving[{profile}]"
    return q_path_serving


# Error propagation. Every rounding source s of the chain perturbs its value v_s by at most u |v_s| (u per level
# below), independently and with zero mean (round to nearest). First order, an output moves by sum_s J_s u v_s,
# a random sum: by Hoeffding below LAMBDA u sqrt(sum_s (J_s v_s)^2) except with probability ~3e-8. The scales
# below are these magnitudes with u factored out; the tolerance is u (per level) x 1.1 (second-order terms:
# products of two relative errors <= 2^-3.8 each) times the scale.
#
# qr_k = w_k y_k / rms(y), y = x Wa^T. Sources: the activations x_j (bf16 then e4m3: u e_j, e_j = act_floor: the
# subnormal floor of linear.SUBNORMAL_FLOOR), each y_k (bf16 output), w_k (bf16), qr_k (bf16 store). Through the
# normalisation dqr_k = w_k dy_k / rms - qr_k (sum_j y_j dy_j) / sum_j y_j^2, so
#   S_qr_k = LAMBDA |w_k| / rms sqrt(Q_k^2 + y_k^2) + LAMBDA |qr_k| sqrt(sum_j (v_j e_j)^2 + sum_j y_j^4) / sum y^2
#            + 2 |qr_k|,     Q_k^2 = sum_j (Wa_kj e_j)^2, v = Wa^T y.
# q: z = qr Wb^T per head h (512 values), n = z / rms(z_h), q = R(n). A factor common to every qr_k (the rms term
# above, including y's errors through rms(y)) cancels in the per-head norm (up to eps = 1e-6 against mean z^2),
# so z sees only the elementwise sources: x_j through M = Wb diag(w / rms(y)) Wa, y_k through Wb_ik w_k / rms(y),
# qr_k (w_k and bf16 store and the wq_b activation's e4m3: counted as one source of size e(qr_k)), z_i's bf16:
#   B_i = LAMBDA sqrt(sum_j (M_ij e_j)^2 + sum_k (Wb_ik w_k y_k / rms)^2 + sum_k (Wb_ik e(qr)_k)^2) + |z_i|.
# The head norm's Jacobian is (I - nh nh^T) / rms(z_h), nh = z_h / ||z_h||: |dn_i| <= (B_i + |nh_i| ||B_h||) /
# rms(z_h) (given |dz_i| <= B_i for all i, ||dz_h|| <= ||B_h||). RoPE mixes a pair with |cos|, |sin| <= 1:
# |dq_2i|, |dq_2i+1| <= |dn_2i| + |dn_2i+1|. The output's bf16 rounding and the phase error (below) scale with the
# pair's magnitude <= |n_2i| + |n_2i+1|, so S_q = N + |n| on nope dims, summed over the pair on rope dims.
# M is formed in fp32 (q_lora-long sums: absolute error <= q_lora u32 sum_k |Wb_ik w_k Wa_kj| / rms per entry, a
# 2^-14 share of the coherent magnitude at q_lora <= 1024: inside the 1.1).
# V4.1 (no head norm): q = R(z). The factor common to every qr_k no longer cancels: it moves z_i by |z_i| times
# qr's common relative error C = LAMBDA sqrt(sum_j (v_j e_j)^2 + sum_j y_j^4) / sum_j y^2 (the second term of
# S_qr), added to B_i (Minkowski: the x sources' direct and common parts are one random sum, whose Hoeffding bound is
# at most the sum of the two parts' bounds). Then N = B + C |z|, S_q = N + |z| (nope), summed over the pair (rope).
def _qr_parts(kw):
    x = kw["x"].double()
    wa = _dequant("wq_a", kw["wq_a"], kw["wq_a_scale"], x.shape[1]).double()
    w = kw["q_norm"].double()
    e = act_floor(x)
    y = x @ wa.T
    ms = y.square().mean(-1, keepdim=True) + kw["eps"]
    rms = ms.sqrt()
    qr = w * y / rms
    return x, wa, w, e, y, rms, qr


def _qr_common(x, wa, e, y):
    """sqrt(sum_j (v_j e_j)^2 + sum_j y_j^4) / sum_j y_j^2 [T, 1]: qr's error common to every channel (through
    rms(y)), without LAMBDA."""
    v = y @ wa
    return torch.sqrt((v * e).square().sum(-1, keepdim=True) + y.pow(4).sum(-1, keepdim=True)) / \
        y.square().sum(-1, keepdim=True)


def _qr_scale(kw, want):
    x, wa, w, e, y, rms, qr = _qr_parts(kw)
    Q2 = e.square() @ wa.square().T
    common = _qr_common(x, wa, e, y)
    return LAMBDA * w.abs() / rms * torch.sqrt(Q2 + y.square()) + LAMBDA * qr.abs() * common + 2 * qr.abs()


def _q_scale(kw, want):
    x, wa, w, e, y, rms, qr = _qr_parts(kw)
    T, H = x.shape[0], kw["n_heads"]
    wb = _dequant("wq_b", kw["wq_b"], kw["wq_b_scale"], wa.shape[0]).double()
    z = qr @ wb.T
    eq = act_floor(qr)
    src = (wb.square() @ ((w * y / rms).square() + eq.square()).T).T            # [T, H*512]: y and qr sources
    wwa, e2 = w.float()[:, None] * wa.float(), e.square()
    for r0 in range(0, wb.shape[0], 4096):                                       # x sources, M in row blocks
        m = (wb[r0:r0 + 4096].float() @ wwa).double()                            # [rows, D], / rms per token
        src[:, r0:r0 + 4096] += (e2 @ m.square().T) / rms.square()
    B = (LAMBDA * src.sqrt() + z.abs()).view(T, H, HEAD_DIM)
    zh = z.view(T, H, HEAD_DIM)
    if kw.get("q_head_norm", True):
        nrm = zh.norm(dim=-1, keepdim=True)
        rz = (zh.square().mean(-1, keepdim=True) + kw["eps"]).sqrt()
        N = (B + zh.abs() / nrm * B.norm(dim=-1, keepdim=True)) / rz
        S = N + (zh / rz).abs()
    else:   # V4.1: q = R(z); the common rms(y) error does not cancel (see above)
        C = LAMBDA * _qr_common(x, wa, e, y)[:, :, None]
        S = B + C * zh.abs() + zh.abs()
    rot = S[..., -ROPE_DIM:].view(T, H, ROPE_DIM // 2, 2).sum(-1, keepdim=True).expand(T, H, ROPE_DIM // 2, 2)
    return torch.cat((S[..., :-ROPE_DIM], rot.reshape(T, H, ROPE_DIM)), -1)


def _phase(params) -> float:
    # an implementation computing phi = pos * omega in fp32 (HF, vLLM's fp32 cos/sin cache) instead of the golden's
    # fp64: |d phi| <= pos u32 (the product) + pos |d omega| (omega rounded to fp32) = 2 pos u32 radians, moving
    # each rotated value by at most |d phi| times its pair's magnitude (inside S)
    return 2 * params["max_pos"] * U32


def _q_tol(what: str, rotated: bool):
    def tol(params, level):
        # the quadrature (RMS) model of the same sources: conformance.rms.random_sum_rms (qr: S = 6 R + 2|qr|;
        # q: lam 6 / sqrt 2 for the head norm's Jacobian bound; the fp32 phase as one step)
        n = max(params["d"], params["q_lora"], HEAD_DIM)
        ph = _phase(params) if rotated else 0.0
        rms = random_sum_rms(level, n + 4, what=what, lam=6 / math.sqrt(2) if rotated else 6.0, extra=ph)
        return _elementwise(params, level).with_rms(**rms)

    def _elementwise(params, level):
        n = max(params["d"], params["q_lora"], HEAD_DIM)
        # fp32 arithmetic: each GEMM's accumulation 6 sqrt(n) u32 sum|.| <= 6 n u32 sqrt(sum (.)^2) (Cauchy-Schwarz)
        # against S's random-sum magnitudes (which carry LAMBDA = 6), plus 8 elementwise ops (norms, rotation)
        g32 = (n + 8) * U32
        ph = _phase(params) if rotated else 0.0
        if level == "fp64":
            r = 1.1 * g32
            return Tolerance(0.0, r, f"{what}: fp32 golden 1.1*({n}+8)*u32 = {r:.3g} of S")
        if level == "fp32":
            r = 2.2 * g32 + ph
            return Tolerance(0.0, r, f"{what}: two fp32 evaluations 2*1.1*({n}+8)*u32" + (
                f" + fp32 phase 2*{params['max_pos']}*u32" if rotated else "") + f" = {r:.3g} of S")
        if level == "emulated":
            # same bf16 x and FP8 activation bytes of x: y, qr, z, q may round to the neighbouring bf16 value (2 ub
            # per source); qr's e4m3 code for wq_b flips by one ulp (2 u8) only where qr_k moved across a rounding
            # boundary: a 2^-8 share of the channels at most, whose random sum is sqrt(2^-8) * 2 u8; fp32 order
            # 2 x g32; a subject computing the RoPE phase in fp32 (vLLM's cos/sin cache)
            r = 1.1 * (2 * UB + 2.0**-4 * 2 * U8 + 2 * g32) + ph
            return Tolerance(0.0, r, f"{what}: one bf16 ulp per source (2*2^-8) + rare e4m3 flips of qr "
                             f"(2^-4*2*2^-4) + fp32 order, x1.1" + (" + fp32 phase" if rotated else "")
                             + f" = {r:.3g} of S")
        r = 1.1 * (U_ACT + g32) + ph
        return Tolerance(0.0, r, f"{what}: every rounding source (bf16 then e4m3 of x and qr, bf16 of y, w, qr, z, q) "
                         f"<= 2^-4(1+2^-8)+2^-8 relative, random sums at lambda 6 in S, + fp32 ({n}+8) u32, x1.1"
                         + (f" + fp32 phase 2*{params['max_pos']}*u32" if rotated else "") + f" = {r:.3g} of S")
    return tol


register(ComponentSpec(
    name="attn.q_path", family="attention", reference=q_path_golden,
    outputs=(OutputSpec("qr", tol=_q_tol("q_norm(wq_a x)", False), scale=_qr_scale),
             OutputSpec("q", tol=_q_tol("rope(headnorm(wq_b qr))", True), scale=_q_scale)),
    description="query path: qr = q_norm(wq_a x) (FP8 block linear), q = RoPE(per-head RMSNorm(wq_b qr)) on the "
                "last 64 of 512 dims (V4.1 rows: no per-head RMSNorm)",
    spec_section="3.5", emulate=_emulate_q_path,
    divergences=("serving zero-pads heads to 64 / 128 for FlashMLA (spec 3.5): the padded heads are not compared",
                 "spec 8.9: OFF ue8m0 activation scales; vLLM SM90/ROCm exact amax/fmax"),
))


def _positions(g, p):
    T, start = p["tokens"], p["start"]
    if p.get("scatter"):       # a decode batch: one token per request at unrelated positions
        return torch.randint(start, start + p["scatter"], (T,), generator=g)
    return torch.arange(start, start + T)


def _make_q_path(g, p):
    T, D, L, H = p["tokens"], p["d"], p["q_lora"], p["heads"]
    wa, wa_s, _ = fp8_block_weight(g, L, D, std=D**-0.5, spread=2)
    # wq_b's 128-row blocks scaled by 2^k, |k| <= 2: heads of different magnitude, so the head norm matters
    wb, wb_s, _ = fp8_block_weight(g, H * HEAD_DIM, L, std=L**-0.5, spread=2)
    kw = {"x": dist_tensor(g, (T, D), p["dist"]), "wq_a": wa, "wq_a_scale": wa_s,
          # learned norm weights are far from 1: log-normal, so dropping the weight is visible
          "q_norm": torch.exp(0.5 * torch.randn(L, generator=g)), "wq_b": wb, "wq_b_scale": wb_s,
          "positions": _positions(g, p), "n_heads": H, "eps": 1e-6, "theta": p["theta"], "yarn": p["yarn"]}
    if p.get("version") == "v4.1":
        kw["q_head_norm"] = False
    return kw


# (tokens, D, q_lora, heads, start, scatter, theta, yarn, dist, seed, tier); positions past 5k and 28k
_Q_ROWS = [
    (1, 256, 128, 8, 5000, 1000, 10000.0, False, "normal", 0, "fast"),
    (33, 256, 256, 16, 28000, 0, 160000.0, True, "normal", 1, "fast"),
    (7, 256, 128, 128, 5100, 0, 160000.0, True, "outliers", 2, "fast"),
    (5, 512, 256, 64, 28600, 4000, 10000.0, False, "wide", 3, "fast"),
    (1, 4096, 1024, 64, 28000, 2000, 160000.0, True, "normal", 10, "full"),    # Flash: D 4096, q_lora 1024, 64 heads
    (16, 4096, 1024, 64, 5200, 0, 160000.0, True, "normal", 11, "full"),
    (1100, 256, 128, 8, 5000, 0, 10000.0, False, "normal", 12, "full"),        # a batch past 1,024 rows
]
for T, D, L, H, start, scatter, theta, yarn, dist, seed, tier in _Q_ROWS:
    max_pos = start + max(scatter, T)
    add(Case(f"attn.q_path/t{T}d{D}l{L}h{H}/p{start}/{dist}/s{seed}", "attn.q_path", _make_q_path,
             {"tokens": T, "d": D, "q_lora": L, "heads": H, "start": start, "scatter": scatter, "theta": theta,
              "yarn": yarn, "max_pos": max_pos}, seed, dist,
             ("decode" if T == 1 else "prefill",) + (("long",) if T > 1024 else ())
             + (("flash-shape",) if D == 4096 else ()), tier=tier))
# V4.1: no per-head q norm (q_head_norm False); the V4 shapes again, new seeds
_Q_ROWS_V41 = [
    (1, 256, 128, 8, 5000, 1000, 10000.0, False, "normal", 20, "fast"),
    (33, 256, 256, 16, 28000, 0, 160000.0, True, "normal", 21, "fast"),
    (5, 512, 256, 64, 28600, 4000, 10000.0, False, "wide", 23, "fast"),
    (16, 4096, 1024, 64, 5200, 0, 160000.0, True, "normal", 24, "full"),
]
for T, D, L, H, start, scatter, theta, yarn, dist, seed, tier in _Q_ROWS_V41:
    add(Case(f"attn.q_path/v41/t{T}d{D}l{L}h{H}/p{start}/{dist}/s{seed}", "attn.q_path", _make_q_path,
             {"tokens": T, "d": D, "q_lora": L, "heads": H, "start": start, "scatter": scatter, "theta": theta,
              "yarn": yarn, "max_pos": start + max(scatter, T), "version": "v4.1"}, seed, dist,
             ("decode" if T == 1 else "prefill", "v4.1") + (("flash-shape",) if D == 4096 else ()), tier=tier))


# ------------------------------------------------------------------------------------------ attn.kv_insert
# kv = kv_norm(wkv . x) [T, 512]; RoPE on kv[448:512] at the token's position; the nope dims quantised in 7 blocks
# of 64 through FP8 e4m3 with UE8M0 scales, the rope dims kept bf16, written into the paged fp8_ds_mla SWA cache
# (references.formats.cache_layouts: 576 data bytes per token, the 8 scale bytes in a region after all token data
# of the block, block size 64) through a slot mapping (-1: padding, never written), and read back at the mapped
# slots. The pool's row b holds block id ``block_base + b`` (a pool whose first rows are not materialised: the
# slots are global, so a high block id reaches the writer's offset arithmetic without the memory of the blocks
# below it). ``fnuz_fmax``: the FP8 max an e4m3fnuz writer maps amax to (240 = finfo(float8_e4m3fnuz).max, the
# spec's Triton writers; 224 = vLLM's get_fp8_min_max() on fnuz, what quantize_and_insert_k_cache passes); OCP
# writers use 448 whatever it says.
LAYOUT = None   # cache_layouts.DsMlaLayout() (block size 64), built on first use


def _layout():
    global LAYOUT
    if LAYOUT is None:
        from references.formats.cache_layouts import DsMlaLayout

        LAYOUT = DsMlaLayout()
    return LAYOUT


def _pool_slots(slot_mapping, cache, block_base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots relative to the pool's first row, -1 kept; mask of mapped tokens), refusing a mapped slot outside
    the pool's blocks [block_base, block_base + rows) in one line."""
    lay = _layout()
    if not isinstance(cache, torch.Tensor) or cache.dtype != torch.uint8 or cache.dim() != 2 \
            or cache.shape[1] != lay.block_stride:
        raise ValueError(f"cache: expected uint8 [blocks, {lay.block_stride}] (fp8_ds_mla, block size "
                         f"{lay.block_size}), got {getattr(cache, 'dtype', type(cache).__name__)} "
                         f"{tuple(getattr(cache, 'shape', ()))}")
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise TypeError("slot_mapping: expected an int64/int32 tensor")
    if not isinstance(block_base, int) or block_base < 0:
        raise ValueError(f"block_base: expected a non-negative int, got {block_base!r}")
    s = slot_mapping.long()
    mapped = s >= 0
    rel = torch.where(mapped, s - block_base * lay.block_size, -1)
    bad = mapped & ((rel < 0) | (rel >= cache.shape[0] * lay.block_size))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise IndexError(f"slot_mapping[{i}] = {int(s[i])}: block {int(s[i]) // lay.block_size} is outside the "
                         f"pool's blocks [{block_base}, {block_base + cache.shape[0]})")
    if (s < -1).any():
        raise IndexError(f"slot_mapping: {int(s.min())} is neither a slot nor the padding value -1")
    return rel, mapped


def _untouched(cache: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """The pool with each mapped slot's 576 data bytes and 8 scale bytes set to 0: every other byte (unmapped
    slots, padding rows' would-be slots, the block's tail padding) must come back as it went in."""
    from references.formats.cache_layouts import DS_MLA_SCALE_BYTES, DS_MLA_TOKEN_BYTES

    lay = _layout()
    out = cache.clone()
    for s in rel[rel >= 0].tolist():
        b, p = divmod(s, lay.block_size)
        out[b, lay.nope_offset(p):lay.nope_offset(p) + DS_MLA_TOKEN_BYTES] = 0
        out[b, lay.scale_offset(p):lay.scale_offset(p) + DS_MLA_SCALE_BYTES] = 0
    return out


def _kv_roped(x, wkv, wkv_scale, kv_norm, positions, *, eps, theta, yarn):
    from references.components.attention import kv_projection

    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point or x.dim() != 2:
        raise ValueError(f"x: expected a float [T, D] tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    dt = torch.promote_types(x.dtype, torch.float32)
    w = _dequant("wkv", wkv, wkv_scale, x.shape[1]).to(dt)
    if w.shape[0] != HEAD_DIM:
        raise ValueError(f"wkv: {w.shape[0]} rows, expected {HEAD_DIM}")
    kv = kv_projection(x.to(dt), w, kv_norm.to(dt), eps=eps)
    inv = _inv_freq(theta, yarn)
    return apply_rope(kv, positions, inv.to(dt) if dt == torch.float64 else inv, ROPE_DIM)


def kv_insert_golden(x, wkv, wkv_scale, kv_norm, positions, slot_mapping, cache, *, eps: float, theta: float,
                     yarn: bool, block_base: int = 0, fnuz_fmax: float = 240.0) -> dict:
    """-> {"kv": [M, 512], "untouched": uint8 pool}: what a reader of the SWA cache sees. ``kv`` is, for the M tokens
    with a slot (token order), rope(kv_norm(wkv x)) unquantised (the golden of the FP8 store is its input);
    ``untouched`` is ``cache`` with the mapped slots' bytes zeroed (nothing else may change). Serving subjects also
    return "codes" [M, 448] (nope FP8 bytes), "scales" [M, 8] (7 UE8M0 bytes + pad) and "rope" [M, 64] (the bf16
    rope values) read from the slots, compared with the emulation of their profile."""
    if fnuz_fmax not in (240.0, 224.0):
        raise ValueError(f"fnuz_fmax: {fnuz_fmax} is neither 240 (finfo) nor 224 (get_fp8_min_max)")
    rel, mapped = _pool_slots(slot_mapping, cache, block_base)
    if slot_mapping.shape != (x.shape[0],):
        raise ValueError(f"slot_mapping: expected [{x.shape[0]}], got {tuple(slot_mapping.shape)}")
    kv = _kv_roped(x, wkv, wkv_scale, kv_norm, positions, eps=eps, theta=theta, yarn=yarn)
    return {"kv": kv[mapped], "untouched": _untouched(cache, rel)}


def _emulate_kv_insert(profile: str):
    from references.formats.cache_layouts import dequantize_ds_mla_tokens, read_ds_mla_tokens, write_ds_mla
    from references.numerics import PROFILES

    lin = _linear_emulate(profile)
    dialect = PROFILES[profile]["dialect"]

    def kv_insert_serving(x, wkv, wkv_scale, kv_norm, positions, slot_mapping, cache, *, eps, theta, yarn,
                          block_base=0, fnuz_fmax=240.0):
        """vLLM: wkv FP8 linear (bf16 out) -> kv_norm in fp32, bf16 store (fused_q_kv_rmsnorm) -> the insert op:
        RoPE in fp32 on the bf16 kv's last 64 dims, nope dims quantised from bf16 (UE8M0, the profile's dialect,
        fmax 448 OCP / ``fnuz_fmax`` fnuz), rope stored bf16 -> bytes read back and decoded."""
        rel, mapped = _pool_slots(slot_mapping, cache, block_base)
        y = lin(x, wkv, wkv_scale)["y"]
        kv = _bf(rms_norm(y, _bf(kv_norm), eps))
        kv = apply_rope(kv, positions, _inv_freq(theta, yarn), ROPE_DIM)   # nope dims pass through (bf16 values)
        pool = cache.clone()
        fmax = fnuz_fmax if dialect == "float8_e4m3fnuz" else None
        write_ds_mla(pool, rel, kv, dialect, fmax, layout=_layout())
        tok = read_ds_mla_tokens(pool, rel[mapped], layout=_layout())
        return {"kv": dequantize_ds_mla_tokens(tok, dialect), "untouched": _untouched(pool, rel),
                "codes": tok.nope, "scales": tok.scales, "rope": tok.rope.float()}

    kv_insert_serving.__qualname__ = f"kv_insert_serving[{profile}]"
    return kv_insert_serving


def _kv_scale(kw, want):
    """S for the read-back kv: the normed-GEMM magnitude of q_path's qr (kv_norm in place of q_norm), summed over
    each rotated pair on dims [448, 512) (RoPE, |cos|, |sin| <= 1), plus the FP8 store's own source on the nope
    dims: e_i = max(|kv_i|, 2^-12 amax of its 64-block) (a result below e4m3's normal range has absolute error at
    most half the smallest subnormal times the block's scale s <= 2 amax / fmax, fmax >= 224: <= 2^-16.8 amax =
    u8 2^-12.8 amax, as linear.SUBNORMAL_FLOOR), and 2^-12 of the token's largest |kv| on every dim."""
    mapped = kw["slot_mapping"] >= 0
    sub = {"x": kw["x"], "wq_a": kw["wkv"], "wq_a_scale": kw["wkv_scale"], "q_norm": kw["kv_norm"], "eps": kw["eps"]}
    S = _qr_scale(sub, None)
    T = S.shape[0]
    rot = S[:, -ROPE_DIM:].view(T, ROPE_DIM // 2, 2).sum(-1, keepdim=True).expand(T, ROPE_DIM // 2, 2)
    S = torch.cat((S[:, :-ROPE_DIM], rot.reshape(T, ROPE_DIM)), -1)[mapped]
    kv = want.double().abs()
    e = torch.cat((act_floor(kv[:, :-ROPE_DIM], 64), kv[:, -ROPE_DIM:]), -1)
    return S + e + 2.0**-12 * kv.amax(-1, keepdim=True)


def _rope_scale(kw, want):
    """The stored rope values: each pair's magnitude |r_2i| + |r_2i+1| (both members), plus 2^-12 of the token's
    largest stored rope magnitude."""
    r = want.double().abs()
    T = r.shape[0]
    pair = r.view(T, ROPE_DIM // 2, 2).sum(-1, keepdim=True).expand(T, ROPE_DIM // 2, 2).reshape(T, ROPE_DIM)
    return pair + 2.0**-12 * r.amax(-1, keepdim=True)


def _kv_tol(params, level):
    """The elementwise bound below with its quadrature (RMS) model ``conformance.rms.kv_insert_rms``."""
    n = max(params["d"], HEAD_DIM)
    return _kv_elementwise(params, level).with_rms(**kv_insert_rms(level, n + 4, phase=_phase(params)))


def _kv_elementwise(params, level):
    n = max(params["d"], HEAD_DIM)
    g32 = (n + 8) * U32          # as q_path: each GEMM's fp32 accumulation + 8 elementwise ops, against S
    ph = _phase(params)
    if level == "fp64":
        r = 1.1 * g32
        return Tolerance(0.0, r, f"kv read back: fp32 golden 1.1*({n}+8)*u32 = {r:.3g} of S")
    if level == "fp32":
        r = 2.2 * g32 + ph
        return Tolerance(0.0, r, f"kv read back: two fp32 evaluations 2*1.1*({n}+8)*u32 + fp32 phase "
                         f"2*{params['max_pos']}*u32 = {r:.3g} of S")
    if level == "emulated":
        # loose by construction here (the bytes, scales and rope values are the tight emulated checks): both sides
        # store FP8 from the same bf16 kv up to a bf16 flip, so each is within u8 e_i of it (2 u8), plus one bf16 ulp
        # per chain source and fp32 order, x1.1, + a phase computed in fp32
        r = 1.1 * (2 * UB + 2 * g32) + 2 * U8 + ph
        return Tolerance(0.0, r, f"kv read back: both FP8 stores within 2^-4 e of the same bf16 kv (2*2^-4) + one "
                         f"bf16 ulp per source (2*2^-8) + fp32 order, + fp32 phase = {r:.3g} of S")
    # every chain source (bf16 then e4m3 of x, bf16 of y, w, kv) and the FP8 store of the nope dims (u8 of e_i)
    # are <= 2^-4(1+2^-8)+2^-8 relative: random sums at lambda 6 in S, + fp32, x1.1, + the fp32 phase
    r = 1.1 * (U_ACT + g32) + ph
    return Tolerance(0.0, r, f"kv read back: every rounding source (bf16 then e4m3 of x, bf16 of y, w, kv; e4m3 "
                     f"store of the nope dims at the block's power-of-two scale, e = max(|kv|, 2^-12 block amax)) "
                     f"<= 2^-4(1+2^-8)+2^-8 relative, random sums at lambda 6 in S, + fp32 ({n}+8) u32, x1.1 + fp32 "
                     f"phase 2*{params['max_pos']}*u32 = {r:.3g} of S")


def _rope_tol(params, level):
    """The elementwise bound below with its quadrature (RMS) model ``conformance.rms.kv_rope_rms``."""
    n = max(params["d"], HEAD_DIM)
    return _rope_elementwise(params, level).with_rms(**kv_rope_rms(level, n + 4, phase=_phase(params)))


def _rope_elementwise(params, level):
    # Only the emulated level compares it (the golden has no stored rope). Same bf16 x, FP8 activation bytes and
    # weights: the bf16 kv the op reads can differ by one bf16 ulp per element (2 ub: its own store, and a flip of
    # y_k through the norm w_k dy_k / rms: 2 ub |kv_k|), both mixed into the pair by the rotation (|cos|, |sin| <=
    # 1): 2 * 2 ub of the pair magnitude; the stored value's own bf16 rounding on opposite sides of a tie-adjacent
    # value (2 ub); fp32 order differences before those roundings are below 2^-12 of the row's magnitude (covered
    # by the scale's floor); x1.1; + a phase computed in fp32 (2 pos u32 radians of the pair)
    r = 1.1 * 3 * 2 * UB + _phase(params)
    return Tolerance(0.0, r, f"stored bf16 rope vs emulation: three bf16 flips (kv store, y through the norm, the "
                     f"stored value) 3*2*2^-8, x1.1, + fp32 phase 2*{params['max_pos']}*u32 = {r:.3g} of the pair "
                     f"magnitude")


register(ComponentSpec(
    name="attn.kv_insert", family="attention", reference=kv_insert_golden,
    outputs=(OutputSpec("kv", tol=_kv_tol, scale=_kv_scale), OutputSpec("untouched", "exact"),
             OutputSpec("codes", "fp8-codes"), OutputSpec("scales", "exact"),
             OutputSpec("rope", tol=_rope_tol, scale=_rope_scale)),
    description="shared K=V: kv_norm(wkv x), RoPE on the last 64 dims, UE8M0 FP8 nope + bf16 rope into the paged "
                "fp8_ds_mla SWA cache through a slot mapping (-1 skipped), read back",
    spec_section="3.6, 4.5", emulate=_emulate_kv_insert,
    divergences=("vLLM's quantize_and_insert_k_cache uses fp8 max 224 on fnuz (get_fp8_min_max); the spec's Triton "
                 "writers 240 (finfo): the fnuz_fmax axis", "the CUDA/HIP insert op hard-codes FP8_MAX 448 (spec 4.5)"),
))


def _make_kv_insert(g, p):
    T, D, nb, base = p["tokens"], p["d"], p["blocks"], p["block_base"]
    lay = _layout()
    w, w_s, _ = fp8_block_weight(g, HEAD_DIM, D, std=D**-0.5, spread=2)
    cache = torch.randint(0, 256, (nb, lay.block_stride), generator=g, dtype=torch.uint8)   # garbage, NaN codes too
    # mapped tokens take distinct random slots of the pool, never slot 0 of its first block (so a write to slot 0
    # is visible); ``pad`` tokens (every ``pad_every``-th, and the tail) get -1
    n_slots = nb * lay.block_size
    rel = torch.randperm(n_slots - 1, generator=g)[:T] + 1
    if p.get("contiguous"):
        rel = torch.arange(p["contiguous"], p["contiguous"] + T)
    slots = rel + base * lay.block_size
    pad = torch.arange(T) >= T - p["pad_tail"]          # padded tail (a graph batch's padding rows)
    if p["pad_every"]:
        pad[::p["pad_every"]] = True
    slots = torch.where(pad, -1, slots)
    start = p["start"]
    pos = torch.arange(start, start + T) if p.get("contiguous") else torch.randint(start, start + 4000, (T,),
                                                                                    generator=g)
    return {"x": dist_tensor(g, (T, D), p["dist"]), "wkv": w, "wkv_scale": w_s,
            "kv_norm": torch.exp(0.5 * torch.randn(HEAD_DIM, generator=g)), "positions": pos,
            "slot_mapping": slots.long(), "cache": cache, "eps": 1e-6, "theta": p["theta"], "yarn": p["yarn"],
            "block_base": base, "fnuz_fmax": p["fnuz_fmax"]}


# 57,400 blocks x 37,440 bytes = 2,149,056,000 > 2^31: the high-block rows put their slots past the 2^31-byte offset
HIGH_BLOCK = 57400
# (tokens, D, blocks, block_base, contiguous start or 0, pad_every, pad_tail, start pos, theta, yarn, fnuz_fmax, dist,
#  seed, tier)
_KV_ROWS = [
    (5, 256, 2, 0, 0, 3, 0, 5000, 10000.0, False, 240.0, "normal", 0, "fast"),      # decode batch, 2 padding rows
    (5, 256, 2, 0, 0, 3, 0, 5000, 10000.0, False, 224.0, "normal", 1, "fast"),
    (40, 256, 2, 0, 50, 0, 3, 28000, 160000.0, True, 240.0, "normal", 2, "fast"),   # prefill across a block edge
    (40, 256, 2, 0, 50, 0, 3, 28000, 160000.0, True, 224.0, "wide", 3, "fast"),     # subnormal codes
    (17, 512, 3, HIGH_BLOCK, 0, 4, 0, 5100, 160000.0, True, 224.0, "outliers", 4, "fast"),
    (1100, 256, 20, 0, 0, 7, 4, 5000, 10000.0, False, 224.0, "normal", 10, "full"),
    (64, 4096, 2, HIGH_BLOCK, 60, 0, 2, 28000, 160000.0, True, 240.0, "normal", 11, "full"),   # Flash wkv [512, 4096]
]
for T, D, nb, base, contig, every, tail, start, theta, yarn, fm, dist, seed, tier in _KV_ROWS:
    add(Case(f"attn.kv_insert/t{T}d{D}/b{base}x{nb}/fnuz{int(fm)}/p{start}/{dist}/s{seed}", "attn.kv_insert",
             _make_kv_insert, {"tokens": T, "d": D, "blocks": nb, "block_base": base, "contiguous": contig,
                               "pad_every": every, "pad_tail": tail, "start": start, "theta": theta, "yarn": yarn,
                               "fnuz_fmax": fm, "max_pos": start + max(T, 4000)}, seed, dist,
             ("decode" if not contig else "prefill",) + (("long",) if T > 1024 else ())
             + (("high-block",) if base else ()) + (("flash-shape",) if D == 4096 else ()), tier=tier))
