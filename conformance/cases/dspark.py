"""The DSpark draft head (DeepSeek-V4 / V4.1 bundled drafter; the math with provenance: references/components/
dspark.py and docs/dspark.md): two components for what is DSpark's own, around the DeepSeek-V4 decoder layers
(mHC, attention, MoE: the layer components) and the shared LM head (head.lm).

``dspark.input`` -- what enters the draft layers. Inputs: the target's hc streams at every layer boundary
``streams [L + 1, T, hc, D]`` (bf16 values), the context batch (``context_positions``, ``query_start_loc``,
``num_rejected``), the anchor (bonus) token per request, ``main_proj`` as checkpoint FP8 codes + UE8M0 scales
(V4.1: 32x32 tiles, V4: 128x128), ``main_norm``, the shared embedding table. Outputs:
  * ``main_x [T, D]`` = main_norm(main_proj(concat_l mean_h streams[b(l)])) (the context every draft layer's
    SWA KV is derived from);
  * ``ids`` / ``positions [B * N]`` (exact): the query block [anchor, noise x (N - 1)] at p + 1 .. p + N;
  * ``X0 [B * N, hc, D]``: the block's embedding broadcast to the hc copies (row copies: exact at every level).
Variant ``taps`` ("v4.1" / "v4"): which stream boundary an id reads (eagle3_utils.py:112-121).

``dspark.markov`` -- the sequential stage after the shared head. Inputs: base logits ``U [B, N, V]`` (bf16
values), the pre-norm head hidden ``h [B, N, D]`` (bf16), ``anchor [B]``, ``markov_w1 [V, r]``, ``markov_w2
[V, r]`` (bf16, unquantised: DSparkMarkovHead is built without a quant config, nvidia/dspark.py:145-150), the
confidence weight ``conf_w [D + r]`` (fp32, qwen3_dspark.py:176-182). Outputs: ``logits [B, N, V]`` (U_k + W2
W1[prev_k]), ``tokens [B, N]`` (exact; greedy), ``confidence [B, N]``.

Serving emulation (vLLM 0.32.0, paths relative to site-packages/vllm; no DSpark path differs by FP8 dialect
except main_proj on native-MX platforms):
  * taps: bf16 streams, ``mhc_post(...).mean(dim=1)`` in bf16 (fp32 accumulation, bf16 result;
    deepseek_v41/amd/model.py:667-673; NVIDIA: fused into mhc_shifted_post_pre, nvidia/model.py:565-591),
    ``torch.cat`` (dflash/speculator.py:383-386);
  * main_proj: ``ReplicatedLinear(quant_config=...)`` (nvidia/dspark.py:102-109): V4.1 32x32 -> MXFP8
    (linear.fp8_block's ``wb32`` emulation: gfx942 a bf16 GEMM, ocp MXFP8 activations), V4 -> block FP8 128
    (Fp8LinearMethod: the profile's 1x128 activation dialect); bf16 out;
  * main_norm: vLLM RMSNorm (fp32 inside, bf16 out);
  * the block ids / positions: integer (dflash/speculator.py:636-669); X0: bf16 table rows.
  * Markov: ``markov_w1`` an nn.Embedding (bf16 rows), ``markov_w2`` through LogitsProcessor (scale 1.0: the V4
    model builds LogitsProcessor(vocab_size), nvidia/dspark.py:309) = a bf16 GEMM with fp32 accumulation, bf16
    out; ``base_logits[:, i] + bias`` in bf16 (speculator.py:185); argmax; confidence in fp32 on ``x.float()``
    (qwen3_dspark.py:185-189) then torch.sigmoid.
"""

from __future__ import annotations

import torch

from references.components.dspark import (
    TAP_VARIANTS,
    confidence,
    dspark_block,
    dspark_main_x,
    dspark_taps,
    markov_chain,
    tap_stream_index,
)
from references.components.norms import rms_norm
from references.formats.blockscale import dequantize_fp8

from ..components import ComponentSpec, OutputSpec, register
from ..tolerances import Tolerance
from ._case import Case, add, dist_tensor
from ._serving import U32, UB
from .linear import U_ACT, _w_spec, act_floor, fp8_block_weight, sqrt_dot
from .linear import _emulate as _emulate_linear

MAX_MODEL_LEN = 1048576          # DSV4 max_position_embeddings; the block clamps positions to max_model_len - 1


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


# -- dspark.input -------------------------------------------------------------------------------------------------

def _check_input(streams, anchor, context_positions, query_start_loc, main_proj, weight_block):
    if streams.dim() != 4:
        raise ValueError(f"streams: expected [L + 1, T, hc, D], got {tuple(streams.shape)}")
    T = streams.shape[1]
    if tuple(context_positions.shape) != (T,):
        raise ValueError(f"context_positions: expected ({T},) (one per streamed token), got "
                         f"{tuple(context_positions.shape)}")
    if int(query_start_loc[-1]) != T or int(query_start_loc[0]) != 0:
        raise ValueError(f"query_start_loc: expected 0 .. {T}, got {query_start_loc.tolist()}")
    if main_proj.dtype != torch.uint8:
        raise TypeError(f"main_proj: expected uint8 OCP e4m3fn codes, got {main_proj.dtype}")
    _w_spec(weight_block)


def dspark_input_golden(streams: torch.Tensor, anchor: torch.Tensor, context_positions: torch.Tensor,
                        query_start_loc: torch.Tensor, num_rejected: torch.Tensor, main_proj: torch.Tensor,
                        main_proj_scale: torch.Tensor, main_norm: torch.Tensor, embed_table: torch.Tensor, *,
                        target_layer_ids: tuple, block_size: int, noise_token_id: int, norm_eps: float,
                        hc_mult: int = 4, variant: str = "v4.1", weight_block: int = 32,
                        max_model_len: int = MAX_MODEL_LEN) -> dict:
    """-> {"main_x" [T, D], "ids" [B N], "positions" [B N], "X0" [B N, hc, D]} (module docstring); main_proj
    exact-dequantised from its codes and ``weight_block`` x ``weight_block`` e8m0 scales."""
    _check_input(streams, anchor, context_positions, query_start_loc, main_proj, weight_block)
    dt = torch.promote_types(streams.dtype, torch.float32)
    taps = dspark_taps(streams.to(dt), target_layer_ids, variant=variant)
    w = dequantize_fp8(main_proj, main_proj_scale, _w_spec(weight_block)).to(dt)
    main_x = dspark_main_x(taps, w, main_norm.to(dt), eps=norm_eps)
    ids, pos = dspark_block(anchor, context_positions, query_start_loc, num_rejected, block_size=block_size,
                            noise_token_id=noise_token_id, max_model_len=max_model_len)
    X0 = embed_table.to(dt)[ids].unsqueeze(-2).expand(-1, hc_mult, -1).contiguous()
    return {"main_x": main_x, "ids": ids, "positions": pos, "X0": X0}


def _emulate_input(profile: str):
    lin = _emulate_linear(profile)

    def dspark_input_serving(streams, anchor, context_positions, query_start_loc, num_rejected, main_proj,
                             main_proj_scale, main_norm, embed_table, *, target_layer_ids, block_size,
                             noise_token_id, norm_eps, hc_mult=4, variant="v4.1", weight_block=32,
                             max_model_len=MAX_MODEL_LEN):
        """bf16 per-tap means, the draft's FP8 / MXFP8 main_proj as linear.fp8_block serves it, RMSNorm fp32
        inside / bf16 out (module docstring)."""
        _check_input(streams, anchor, context_positions, query_start_loc, main_proj, weight_block)
        taps = _bf16(dspark_taps(_bf16(streams), target_layer_ids, variant=variant))
        y = lin(taps, main_proj, main_proj_scale, weight_block=weight_block)["y"]
        main_x = _bf16(rms_norm(y, _bf16(main_norm), norm_eps))
        ids, pos = dspark_block(anchor, context_positions, query_start_loc, num_rejected, block_size=block_size,
                                noise_token_id=noise_token_id, max_model_len=max_model_len)
        X0 = _bf16(embed_table)[ids].unsqueeze(-2).expand(-1, hc_mult, -1).contiguous()
        return {"main_x": main_x, "ids": ids, "positions": pos, "X0": X0}

    dspark_input_serving.__qualname__ = f"dspark_input_serving[{profile}]"
    return dspark_input_serving


def _main_x_scale(kw, want):
    """S_i = |w_i| / rms(y) * ((Q_i + |y_i|) + |y_i| sqrt(mean_j (Q_j + |y_j|)^2) / rms(y)) (fp64), y = main_proj
    (taps). A relative error r of y_j against (Q_j + |y_j|) moves rms(y) by at most r sqrt(mean (Q + |y|)^2)
    (triangle inequality in L2), so main_x_i = w_i y_i / rms moves by at most r S_i (first order); |main_x_i| <=
    S_i. Q_i = sqrt(sum_j (W_ij e_j)^2), e_j = the tap's FP8 error unit (linear.act_floor, group = weight
    block) plus (2 u32 / U_ACT) mean_h |x_hj|: the fp32 mean of the hc copies is within 2 u32 mean_h |x_hj| (the
    copies may cancel, so this is not relative to |tap_j|)."""
    s = kw["streams"].double()
    b = kw.get("weight_block", 32)
    ids = [tap_stream_index(i, kw.get("variant", "v4.1"), s.shape[0]) for i in kw["target_layer_ids"]]
    taps = torch.cat([s[i].mean(1) for i in ids], -1)
    absmean = torch.cat([s[i].abs().mean(1) for i in ids], -1)
    e = act_floor(taps, group=b) + (2 * U32 / U_ACT) * absmean
    w = dequantize_fp8(kw["main_proj"], kw["main_proj_scale"], _w_spec(b)).double()
    y = taps @ w.T
    Q = sqrt_dot(e, w) + y.abs()
    rms = y.square().mean(-1, keepdim=True).add(kw["norm_eps"]).sqrt()
    qrms = Q.square().mean(-1, keepdim=True).sqrt()
    return kw["main_norm"].double().abs() / rms * (Q + y.abs() * qrms / rms)


def _main_x_tol(params, level):
    D, n = params["d"], len(params["target_layer_ids"])
    K = n * D
    acc = 6 * K * U32          # main_proj's fp32 accumulation against 6 Q (linear.gemm_tol, Cauchy-Schwarz)
    norm = (D + 8) * U32       # RMSNorm's D-long mean of squares, rsqrt and products
    g32 = 2 * U32 + acc + norm
    if level == "fp64":
        return Tolerance(0.0, g32, f"dspark.input main_x: fp32 golden: hc mean (in Q) + accumulation 6*{K}*u32 + "
                         f"norm ({D}+8) u32 + 2 u32 = {g32:.3g} of S")
    if level == "fp32":
        return Tolerance(0.0, 2 * g32, f"dspark.input main_x: two fp32 evaluations = {2 * g32:.3g} of S")
    # serving: main_proj within 6 U_ACT Q + ub |y| + acc of the golden (linear.gemm_tol; bf16 tap rounding is
    # inside U_ACT, which also covers gfx942's bf16-activation GEMM), propagated through the norm by S; the
    # norm's bf16 output adds ub |main_x| <= ub S and its fp32 work (D+8) u32
    r = 6 * U_ACT + 2 * UB + acc + norm
    if level == "emulated":
        # a subject's bf16 tap may sit one bf16 ulp from the emulation's (another fp32 order of the hc mean), and
        # then its MXFP8 / FP8 code one e4m3 ulp away: only the triangle inequality through the golden holds
        return Tolerance(0.0, 2 * r, f"dspark.input main_x: taps rounded in-component (bf16, then FP8 on native MX "
                         f"/ V4) may differ by one ulp per element: 2 x serving = {2 * r:.3g} of S")
    return Tolerance(0.0, r, f"dspark.input main_x: main_proj 6*(2^-4(1+2^-8)+2^-8) Q (bf16 tap + e4m3 activation, "
                     f"Hoeffding lambda 6) + bf16 y 2^-8 |y| + accumulation 6*{K}*u32, through the norm (S), + "
                     f"bf16 out 2^-8 + norm ({D}+8) u32 = {r:.3g} of S")


def _copy_tol(params, level):
    return Tolerance(0.0, 0.0, "dspark.input X0: bf16 embedding rows copied to the hc copies: no rounding at any "
                     "level (the table is bf16-exact)")


def _abs_scale(kw, want):
    return want.double().abs()


register(ComponentSpec(
    name="dspark.input", family="dspark", reference=dspark_input_golden,
    outputs=(OutputSpec("main_x", tol=_main_x_tol, scale=_main_x_scale), OutputSpec("ids", kind="exact"),
             OutputSpec("positions", kind="exact"), OutputSpec("X0", tol=_copy_tol, scale=_abs_scale)),
    description="DSpark draft input: target taps (hc mean at dspark_target_layer_ids), main_proj (FP8) + main_norm "
                "-> main_x; the query block [anchor, noise x (N-1)] at p+1..p+N and its hc-broadcast embedding",
    spec_section="DSpark (docs/dspark.md)", emulate=_emulate_input,
    divergences=("tap semantics differ by release (eagle3_utils.py:112-121): V4.1 reads the input of layer l, V4 "
                 "the output of layer l (variant taps)",),
))


def _make_input(g, p):
    L, D, hc, V = p["layers"], p["d"], 4, p["vocab"]
    lens, rej = p["ctx"], p["rejected"]
    T, B = sum(lens), len(lens)
    b = p["weight_block"]
    ids = p["target_layer_ids"]
    # per-boundary streams whose scale grows with depth (4 x from first to last), so reading a neighbouring
    # boundary changes main_x well beyond the FP8 budget even after the norm
    depth = torch.linspace(1.0, 4.0, L + 1).view(L + 1, 1, 1, 1)
    streams = _bf16(dist_tensor(g, (L + 1, T, hc, D), p["dist"]) * depth
                    + torch.randn(L + 1, T, 1, D, generator=g))      # a shared part: the hc mean is not ~0
    codes, scales, _ = fp8_block_weight(g, D, len(ids) * D, std=(len(ids) * D) ** -0.5, spread=2, block=b)
    qsl = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()))
    start = p["start"]
    cpos = torch.cat([torch.arange(start[r], start[r] + lens[r]) for r in range(B)])
    anchor = torch.randint(0, V, (B,), generator=g)
    anchor[0] = V - 1 if p["noise"] != V - 1 else 0   # the table's last row
    table = _bf16(torch.randn(V, D, generator=g) * 0.05)
    kw = {"streams": streams, "anchor": anchor, "context_positions": cpos, "query_start_loc": qsl,
          "num_rejected": torch.tensor(rej), "main_proj": codes, "main_proj_scale": scales,
          "main_norm": _bf16(1.0 + torch.rand(D, generator=g)), "embed_table": table,
          "target_layer_ids": tuple(ids), "block_size": p["block"], "noise_token_id": p["noise"], "norm_eps": 1e-6,
          "hc_mult": hc, "variant": p["variant"], "weight_block": b}
    if p.get("max_model_len"):
        kw["max_model_len"] = p["max_model_len"]
    return kw


assert TAP_VARIANTS == ("v4.1", "v4")
# (layers, ids, d, vocab, noise, ctx lengths, rejected, starts, block, variant, weight block, dist, seed, tier,
# max_model_len). ids are never the last three layers (that mutant must show); the V4 rows read ids + 1. Starts
# include 0 (a first prefill chunk), decode rows (ctx 1 after rejections), a rejected tail, several requests.
INPUT_ROWS = [
    (6, (2, 3, 4), 160, 512, 300, (1,), (0,), (37,), 5, "v4.1", 32, "normal", 0, "fast", None),
    (6, (2, 3, 4), 160, 512, 300, (4, 1), (0, 0), (0, 9), 5, "v4.1", 32, "normal", 1, "fast", None),
    (6, (2, 3, 4), 160, 512, 511, (6, 3, 2), (2, 0, 1), (0, 100, 5), 1, "v4.1", 32, "outliers", 2, "fast", None),
    (6, (2, 3, 4), 160, 512, 300, (3, 2), (1, 0), (0, 7), 2, "v4.1", 32, "normal", 3, "fast", None),
    (6, (2, 3, 4), 160, 512, 300, (5,), (0,), (0,), 7, "v4.1", 32, "normal", 4, "fast", None),
    (5, (1, 2, 3), 128, 512, 300, (3, 2), (0, 1), (0, 50), 5, "v4", 128, "normal", 5, "fast", None),
    (6, (2, 3, 4), 160, 512, 300, (2,), (0,), (15,), 5, "v4.1", 32, "normal", 6, "fast", 20),   # clamp at 19
    # the production noise id 128799 in a 129280-row table (narrow, so the table stays small)
    (6, (2, 3, 4), 32, 129280, 128799, (3, 1), (0, 0), (0, 4), 5, "v4.1", 32, "normal", 7, "fast", None),
    # V4.1-Flash width (hidden 5120, V41_FLASH_FACTS) at the public config's ids [37, 38, 39] of 44 boundaries
    # (the layer count is not in vLLM: 43 layers, as V4-Flash, is an assumption; any L >= 40 reads the same
    # streams); block 5
    (43, (37, 38, 39), 5120, 1024, 1000, (9, 3), (1, 0), (0, 4000), 5, "v4.1", 32, "normal", 8, "full", None),
]
for (L, ids, d, vocab, noise, ctx, rej, start, block, variant, wb, dist, seed, tier, mml) in INPUT_ROWS:
    phase = "decode" if max(ctx) == 1 else "prefill"
    add(Case(f"dspark.input/{variant}/L{L}d{d}v{vocab}/ctx{'-'.join(map(str, ctx))}n{block}"
             f"{'/clamp' if mml else ''}/{dist}/s{seed}", "dspark.input", _make_input,
             {"layers": L, "target_layer_ids": ids, "d": d, "vocab": vocab, "noise": noise, "ctx": ctx,
              "rejected": rej, "start": start, "block": block, "variant": variant, "weight_block": wb,
              "max_model_len": mml}, seed, dist,
             (phase, "v4.1" if variant == "v4.1" else "v4") + (("long",) if tier == "full" else ()), tier=tier))


# -- dspark.markov ------------------------------------------------------------------------------------------------

def _check_markov(U, h, anchor, markov_w1, markov_w2, conf_w):
    if U.dim() != 3 or h.dim() != 3 or U.shape[:2] != h.shape[:2]:
        raise ValueError(f"U / h: expected [B, N, V] / [B, N, D] with the same B, N, got {tuple(U.shape)} / "
                         f"{tuple(h.shape)}")
    r = markov_w1.shape[-1]
    if tuple(conf_w.shape) != (h.shape[-1] + r,):
        raise ValueError(f"conf_w: expected (D + r,) = ({h.shape[-1] + r},), got {tuple(conf_w.shape)}")


def dspark_markov_golden(U: torch.Tensor, h: torch.Tensor, anchor: torch.Tensor, markov_w1: torch.Tensor,
                         markov_w2: torch.Tensor, conf_w: torch.Tensor) -> dict:
    """-> {"logits" [B, N, V], "tokens" [B, N], "confidence" [B, N]} (module docstring)."""
    _check_markov(U, h, anchor, markov_w1, markov_w2, conf_w)
    dt = torch.promote_types(U.dtype, torch.float32)
    out = markov_chain(U.to(dt), anchor, markov_w1.to(dt), markov_w2.to(dt))
    return {"logits": out["logits"], "tokens": out["tokens"], "confidence": confidence(h.to(dt), out["embed"],
                                                                                        conf_w.to(dt))}


def _emulate_markov(profile: str):
    def dspark_markov_serving(U, h, anchor, markov_w1, markov_w2, conf_w):
        """bf16 Markov embedding rows, the bias as a bf16 GEMM (fp32 accumulation, bf16 out), the bf16 add, argmax;
        confidence in fp32 (module docstring). The same on every profile (no FP8 in this stage)."""
        _check_markov(U, h, anchor, markov_w1, markov_w2, conf_w)
        w1, w2, Ub = _bf16(markov_w1), _bf16(markov_w2), _bf16(U)
        prev = anchor.long()
        logits, toks, embeds = [], [], []
        for k in range(U.shape[1]):
            e = w1[prev]
            lk = _bf16(Ub[:, k] + _bf16(e @ w2.T))
            tok = lk.argmax(-1)
            logits.append(lk)
            toks.append(tok)
            embeds.append(e)
            prev = tok
        c = confidence(_bf16(h), torch.stack(embeds, 1), conf_w.float())
        return {"logits": torch.stack(logits, 1), "tokens": torch.stack(toks, 1), "confidence": c}

    dspark_markov_serving.__qualname__ = f"dspark_markov_serving[{profile}]"
    return dspark_markov_serving


def _golden_embeds(kw):
    out = markov_chain(kw["U"].double(), kw["anchor"], kw["markov_w1"].double(), kw["markov_w2"].double())
    return out


def _logits_scale(kw, want):
    """S_kv = |U_kv| + sum_j |W2_vj e_kj| along the golden chain (fp64)."""
    e = _golden_embeds(kw)["embed"]
    return kw["U"].double().abs() + e.abs() @ kw["markov_w2"].double().abs().T


def _logits_tol(params, level):
    r = params["rank"]
    if level in ("fp64", "fp32"):
        g = (r + 2) * U32          # the r-long fp32 dot (deterministic gamma_r) + the add
        m = 1 if level == "fp64" else 2
        return Tolerance(0.0, m * g, f"dspark.markov logits: {'' if m == 1 else 'two '}fp32 evaluation(s) of the "
                         f"{r}-long bias dot + the add ({r}+2) u32 = {m * g:.3g} of S (S = |U| + sum |W2 e|)")
    acc = 6 * r * U32
    if level == "emulated":
        t = 4 * UB + 2 * acc
        return Tolerance(0.0, t, f"dspark.markov logits: identical bf16 operands; the bf16 bias and the bf16 sum may "
                         f"each round one ulp apart (2*2*2^-8) + fp32 order 2*6*{r}*u32 = {t:.3g} of S")
    t = 2 * UB + acc
    return Tolerance(0.0, t, f"dspark.markov logits: bf16 bias 2^-8 |W2 e| + bf16 sum 2^-8 |logit| (operands "
                     f"bf16-exact) + accumulation 6*{r}*u32 = {t:.3g} of S")


def _conf_scale(kw, want):
    """sigma'(z) sum_j |w_j x_j| + |c| (fp64): a z error d moves c by at most sigma'(z) d (first order)."""
    e = _golden_embeds(kw)["embed"]
    x = torch.cat([kw["h"].double(), e], -1)
    z = x @ kw["conf_w"].double()
    s = torch.sigmoid(z)
    return s * (1 - s) * (x.abs() @ kw["conf_w"].double().abs()) + want.double().abs()


def _conf_tol(params, level):
    k = params["d"] + params["rank"]
    g = (k + 4) * U32              # the (D + r)-long fp32 dot, deterministic gamma_k, + sigmoid's exp / divide
    if level == "fp64":
        return Tolerance(0.0, g, f"dspark.markov confidence: fp32 dot of {k} + sigmoid ({k}+4) u32 = {g:.3g} of S")
    # every other level computes in fp32 from bf16-exact inputs (vLLM: params_dtype fp32, x.float())
    return Tolerance(0.0, 2 * g, f"dspark.markov confidence: two fp32 evaluations 2*({k}+4) u32 = {2 * g:.3g} of S "
                     f"(S = sigma'(z) sum |w x| + |c|)")


register(ComponentSpec(
    name="dspark.markov", family="dspark", reference=dspark_markov_golden,
    outputs=(OutputSpec("logits", tol=_logits_tol, scale=_logits_scale), OutputSpec("tokens", kind="exact"),
             OutputSpec("confidence", tol=_conf_tol, scale=_conf_scale)),
    description="DSpark sequential Markov stage: logits_k = U_k + markov_w2 . markov_w1[prev_k] (prev_0 = anchor, "
                "prev_k+1 = argmax logits_k), greedy tokens, confidence sigmoid(w . [h_k ; markov_w1[prev_k]])",
    spec_section="DSpark (docs/dspark.md)", emulate=_emulate_markov,
))


MARGIN = 2.0


def _make_markov(g, p):
    """Base logits with a planted tie: at every step the two top base logits are equal (top + MARGIN) and sit on
    the tokens of largest and smallest Markov bias along the golden chain, so the greedy token is decided by the
    Markov term, with margin min(MARGIN, bias range) over every other token (far above the bf16 budget)."""
    B, N, V, r, D = p["batch"], p["block"], p["vocab"], p["rank"], p["d"]
    w1 = _bf16(torch.randn(V, r, generator=g))
    w2 = _bf16(torch.randn(V, r, generator=g) * r ** -0.5)
    U = _bf16(dist_tensor(g, (B, N, V), p["dist"]))
    anchor = torch.randint(0, V, (B,), generator=g)
    anchor[0] = V - 1
    prev = anchor.clone()
    w1d, w2d = w1.double(), w2.double()
    for k in range(N):
        bias = w1d[prev] @ w2d.T
        a, c = bias.argmax(-1), bias.argmin(-1)
        top = U[:, k].amax(-1) + MARGIN
        for b in range(B):
            U[b, k, a[b]] = U[b, k, c[b]] = _bf16(top[b])
        prev = a
    h = _bf16(dist_tensor(g, (B, N, D), "normal"))
    conf_w = torch.randn(D + r, generator=g) * (D + r) ** -0.5
    return {"U": U, "h": h, "anchor": anchor, "markov_w1": w1, "markov_w2": w2, "conf_w": conf_w}


# full-tier rows are tagged long (production widths: minutes and several GB on the CPU; the conformance session runs
# them, test_reference_and_emulated_pass_every_case leaves them out)
# (batch, block, vocab, rank, d, dist, seed, tier): block 5 (the released dspark_block_size) and others, one
# request and several, rank 256 (V4.1-Flash dspark_markov_rank) and small
MARKOV_ROWS = [(1, 5, 1000, 16, 64, "normal", 0, "fast"), (3, 5, 1000, 64, 64, "normal", 1, "fast"),
               (2, 1, 512, 16, 32, "normal", 2, "fast"), (2, 2, 512, 32, 32, "outliers", 3, "fast"),
               (2, 7, 4096, 256, 128, "normal", 4, "fast"),
               (2, 5, 129280, 256, 5120, "normal", 5, "full")]
for (B, N, V, r, d, dist, seed, tier) in MARKOV_ROWS:
    add(Case(f"dspark.markov/b{B}n{N}v{V}r{r}d{d}/{dist}/s{seed}", "dspark.markov", _make_markov,
             {"batch": B, "block": N, "vocab": V, "rank": r, "d": d}, seed, dist,
             ("decode", "v4.1") + (("long",) if tier == "full" else ()), tier=tier))
