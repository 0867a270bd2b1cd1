"""The components added for issue #16 (moe.shared_expert, head.lm, embed, attn.index_set, linear.fp8_block,
attn.q_path, attn.kv_insert, mtp.head, indexer.k_cache) and issue #18 (indexer.k_latent, indexer.topk_two_level):
a deliberately broken implementation fails with a diagnosis naming the component, the case and the worst
element, and the correct ones pass (the reference and both emulations: test_subjects_and_suite.py)."""

import functools

import numpy as np
import pytest
import torch

from conformance.cases import cases_for
from conformance.cases.attention import attn_index_set
from conformance.cases.head import embed_golden, lm_head_golden
from conformance.cases.indexer_cache import FP4_LAYOUTS, K_FMAX, KCacheLayout, gather_slots
from conformance.cases.indexer_cache import _emulate as k_cache_emulate
from conformance.cases.indexer_cache import relative as k_cache_relative
from conformance.cases.linear import W_SPECS, fp8_linear_golden, quant_act_group
from conformance.cases.linear import _emulate as linear_emulate
from conformance.cases.mtp import mtp_head_golden
from conformance.cases.qkv import _dequant as _q_dequant
from conformance.cases.qkv import _inv_freq as _q_inv_freq
from conformance.cases.qkv import _pool_slots as kv_pool_slots
from conformance.cases.qkv import _untouched as kv_untouched
from conformance.cases.qkv import q_path_golden
from conformance.checks.numeric import run_numeric, worst_verdict
from conformance.subjects import Impl, SubjectInfo, Unsupported
from references.components.attention import swa_indices
from references.components.moe import shared_expert
from references.components.norms import rms_norm, unweighted_rms_norm
from references.components.rope import apply_rope
from references.formats.blockscale import BlockFP8, dequantize_fp8, quantize_fp8
from references.formats.cache_layouts import (
    DsMlaLayout,
    DsMlaTokens,
    dequantize_ds_mla_tokens,
    dequantize_indexer_k_tokens,
    encode_ds_mla_tokens,
    encode_indexer_k_tokens,
    read_ds_mla_tokens,
)
from references.formats.minifloat import get_format
from references.formats.scales import e8m0_encode
from references.numerics import serving

from .test_component_mutants import Mutant


def shared_expert_without_clamp(x, w1, w3, w2, *, limit):
    # the initial OFF release / HF commit 361455895: no swiglu_limit on the shared expert (spec 8.2)
    return {"y": shared_expert(x, {"w1": w1, "w3": w3, "w2": w2}, limit=limit, variant="no-clamp")}


def shared_expert_up_clamped_max_side_only(x, w1, w3, w2, *, limit):
    # the up projection clamped like the gate (max side only): u < -10 passes through. (Clamping the gate on
    # both sides instead is not observable: SiLU(g) for g < -10 is below 5e-4 either way.)
    g, u = x @ w1.T, x @ w3.T
    a = torch.nn.functional.silu(g.clamp(max=limit)) * u.clamp(max=limit)
    return {"y": a @ w2.T}


def head_without_norm_weight(X, hc_fn, hc_base, hc_scale, norm_weight, head_weight, *, norm_eps, hc_eps):
    return lm_head_golden(X, hc_fn, hc_base, hc_scale, torch.ones_like(norm_weight), head_weight,
                          norm_eps=norm_eps, hc_eps=hc_eps)


def head_from_stream_mean(X, hc_fn, hc_base, hc_scale, norm_weight, head_weight, *, norm_eps, hc_eps):
    # the streams averaged instead of the HC head's learned pre weights
    from references.components.head import lm_head

    return {"logits": lm_head(X.mean(-2), norm_weight, head_weight, eps=norm_eps)}


def embed_scaled(ids, table, *, hc_mult):
    # Gemma-style sqrt(D) embedding scale (DSV4 has none, spec 3.1)
    return {"X": embed_golden(ids, table, hc_mult=hc_mult)["X"] * table.shape[1] ** 0.5}


def embed_off_by_one(ids, table, *, hc_mult):
    return embed_golden((ids.long() + 1) % table.shape[0], table, hc_mult=hc_mult)


def index_set_window_129(positions, topk_idx=None, *, layer_type, ratio, window=128):
    return attn_index_set(positions, topk_idx, layer_type=layer_type, ratio=ratio, window=window + 1)


def index_set_window_without_query(positions, topk_idx=None, *, layer_type, ratio, window=128):
    out = attn_index_set(positions, topk_idx, layer_type=layer_type, ratio=ratio, window=window)["indices"]
    out[:, window - 1] = -1          # the window's last column is the query itself (swa_indices: ascending)
    return {"indices": out}


def index_set_hca_one_token_early(positions, topk_idx=None, *, layer_type, ratio, window=128):
    # an HCA entry becomes visible at t + 2 = 128 (i + 1) instead of t + 1: one token before its window closes
    if layer_type != "hca":
        return attn_index_set(positions, topk_idx, layer_type=layer_type, ratio=ratio, window=window)
    sw = swa_indices(positions, window)
    bound = torch.div(positions + 2, ratio, rounding_mode="floor")
    n = int(bound.max())
    comp = torch.arange(n)[None].expand(len(positions), -1)
    comp = torch.where(comp < bound[:, None], comp + int(positions.max()) + 1, -1)
    return {"indices": torch.cat((sw, comp), 1)}


def linear_scale_layout_transposed(x, weight, weight_scale, *, weight_block=128):
    # the [N/b, K/b] scale grid read in the other order (column-major): block (i, j) gets another block's scale
    s = weight_scale.T.contiguous().view(weight_scale.shape)
    return fp8_linear_golden(x, weight, s, weight_block=weight_block)


def linear_per_token_scale(x, weight, weight_scale, *, weight_block=128):
    # one FP8 scale per token over the whole K instead of per 1x128 group (OCP serving numerics otherwise)
    act = serving("ocp").linear_act
    xb = x.to(torch.bfloat16).float()
    spec = BlockFP8(act.fmt, act.fmax, (1, x.shape[1]), act.scale_fmt, act.amax_floor)
    w = dequantize_fp8(weight, weight_scale, W_SPECS[weight_block])
    return {"y": (quant_act_group(xb, spec) @ w.T).to(torch.bfloat16).float()}


def linear_32x32_scales_read_as_128_blocks(x, weight, weight_scale, *, weight_block=128):
    # a V4 reader on a V4.1 checkpoint: the [N/32, K/32] grid indexed as if each scale covered a 128x128 tile,
    # element (i, j) scaled by weight_scale[i // 128, j // 128] (exactly the golden on the 128x128 rows)
    n, k = weight.shape
    rows, cols = torch.arange(n) // 128, torch.arange(k) // 128
    s = weight_scale[rows][:, cols]
    w = dequantize_fp8(weight, s.contiguous(), BlockFP8.of("float8_e4m3fn", (1, 1)))
    return {"y": x.float() @ w.T}


def _q_unroped(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, *, n_heads, eps, head_norm=True):
    wa = _q_dequant("wq_a", wq_a, wq_a_scale, x.shape[1])
    wb = _q_dequant("wq_b", wq_b, wq_b_scale, wa.shape[0])
    qr = rms_norm(x @ wa.T, q_norm, eps)
    z = (qr @ wb.T).view(x.shape[0], n_heads, -1)
    return qr, (unweighted_rms_norm(z, eps) if head_norm else z)


def q_path_rope_on_first_dims(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, positions, *, n_heads, eps, theta,
                              yarn, q_head_norm=True):
    # RoPE on q[..., 0:64] instead of the trailing q[..., 448:512]
    qr, q = _q_unroped(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, n_heads=n_heads, eps=eps,
                       head_norm=q_head_norm)
    head = apply_rope(q[..., :64], positions, _q_inv_freq(theta, yarn), 64)
    return {"qr": qr, "q": torch.cat((head, q[..., 64:]), -1)}


def q_path_without_head_norm(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, positions, *, n_heads, eps, theta,
                             yarn, q_head_norm=True):
    # never normalises a head: V4.1's math on every row (so V4 rows catch it, V4.1 rows pass)
    qr, z = _q_unroped(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, n_heads=n_heads, eps=eps, head_norm=False)
    return {"qr": qr, "q": apply_rope(z, positions, _q_inv_freq(theta, yarn), 64)}


def q_path_without_q_norm_weight(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, positions, *, n_heads, eps, theta,
                                 yarn, q_head_norm=True):
    return q_path_golden(x, wq_a, wq_a_scale, torch.ones_like(q_norm), wq_b, wq_b_scale, positions,
                         n_heads=n_heads, eps=eps, theta=theta, yarn=yarn, q_head_norm=q_head_norm)


def q_path_head_norm_always(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, positions, *, n_heads, eps, theta,
                            yarn, q_head_norm=True):
    # a V4 kernel serving V4.1: the per-head RMSNorm applied whatever q_head_norm says (V4 math on every row)
    return q_path_golden(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, positions, n_heads=n_heads, eps=eps,
                         theta=theta, yarn=yarn)


def _kv_bf16(x, wkv, wkv_scale, kv_norm, positions, *, eps, theta, yarn):
    """The OCP serving chain up to the insert (the mutant subject's profile): bf16 kv, fp32-roped last 64 dims."""
    y = linear_emulate("ocp")(x, wkv, wkv_scale)["y"]
    kv = rms_norm(y, kv_norm.to(torch.bfloat16).float(), eps).to(torch.bfloat16).float()
    return apply_rope(kv, positions, _q_inv_freq(theta, yarn), 64)


def _kv_outputs(pool, rel, tok):
    return {"kv": dequantize_ds_mla_tokens(tok, "ocp"), "untouched": kv_untouched(pool, rel), "codes": tok.nope,
            "scales": tok.scales, "rope": tok.rope.float()}


def _kv_write_read(kw, *, slots=None, encode=None):
    """Emulated OCP insert with a planted defect: ``slots`` replaces the relative slot mapping the writer sees,
    ``encode`` the token encoder; the reader and the untouched mask use the true mapping."""
    rel, mapped = kv_pool_slots(kw["slot_mapping"], kw["cache"], kw["block_base"])
    kv = _kv_bf16(kw["x"], kw["wkv"], kw["wkv_scale"], kw["kv_norm"], kw["positions"], eps=kw["eps"],
                  theta=kw["theta"], yarn=kw["yarn"])
    pool = kw["cache"].clone()
    w = rel if slots is None else slots(rel)
    keep = w >= 0
    tok = (encode or encode_ds_mla_tokens)(kv[keep], "ocp")
    blocks, pos = w[keep] // 64, w[keep] % 64
    for i, (b, p) in enumerate(zip(blocks.tolist(), pos.tolist())):
        pool[b, p * 576:p * 576 + 448] = tok.nope[i]
        pool[b, p * 576 + 448:p * 576 + 576] = tok.rope[i:i + 1].view(torch.uint8)[0]
        pool[b, 64 * 576 + p * 8:64 * 576 + p * 8 + 8] = tok.scales[i]
    return _kv_outputs(pool, rel, read_ds_mla_tokens(pool, rel[mapped]))


def kv_insert_scale_not_pow2(x, wkv, wkv_scale, kv_norm, positions, slot_mapping, cache, *, eps, theta, yarn,
                             block_base=0, fnuz_fmax=240.0):
    # codes at the plain scale amax / 448 (no rounding to a power of two); the e8m0 byte can only hold its ceil
    def enc(kv, dialect):
        spec = BlockFP8.of("ocp", (1, 64), scale_fmt="fp32")
        codes, s = quantize_fp8(kv[:, :448], spec)
        sb = torch.from_numpy(e8m0_encode(np.exp2(np.ceil(np.log2(s.numpy().astype(np.float64))))))
        return DsMlaTokens(codes, torch.cat([sb, torch.zeros(kv.shape[0], 1, dtype=torch.uint8)], 1),
                           kv[:, 448:].to(torch.bfloat16))
    return _kv_write_read(dict(locals()), encode=enc)


def kv_insert_scales_inline(x, wkv, wkv_scale, kv_norm, positions, slot_mapping, cache, *, eps, theta, yarn,
                            block_base=0, fnuz_fmax=240.0):
    # each token's 8 scale bytes right after its 576 data bytes (584-byte tokens) instead of the block's scale
    # region; written and read back with that layout, so the values read are right
    rel, mapped = kv_pool_slots(slot_mapping, cache, block_base)
    kv = _kv_bf16(x, wkv, wkv_scale, kv_norm, positions, eps=eps, theta=theta, yarn=yarn)
    pool = cache.clone()
    tok = encode_ds_mla_tokens(kv[mapped], "ocp")
    for i, (b, p) in enumerate(zip((rel[mapped] // 64).tolist(), (rel[mapped] % 64).tolist())):
        row = torch.cat([tok.nope[i], tok.rope[i:i + 1].view(torch.uint8)[0], tok.scales[i]])
        pool[b, p * 584:p * 584 + 584] = row
    return _kv_outputs(pool, rel, tok)


def kv_insert_padding_to_slot0(x, wkv, wkv_scale, kv_norm, positions, slot_mapping, cache, *, eps, theta, yarn,
                               block_base=0, fnuz_fmax=240.0):
    # the last padding row (-1) written to slot 0 of the pool (an unguarded slot_mapping[i] used as an index)
    def slots(rel):
        out = rel.clone()
        if (rel < 0).any():
            out[int((rel < 0).nonzero()[-1])] = 0
        return out
    return _kv_write_read(dict(locals()), slots=slots)


def kv_insert_rope_fp8(x, wkv, wkv_scale, kv_norm, positions, slot_mapping, cache, *, eps, theta, yarn,
                       block_base=0, fnuz_fmax=240.0):
    # the rope dims quantised like the nope dims (one UE8M0 FP8 block of 64) before the bf16 store
    def enc(kv, dialect):
        tok = encode_ds_mla_tokens(kv, dialect)
        spec = BlockFP8.of("ocp", (1, 64))
        rope = dequantize_fp8(*quantize_fp8(kv[:, 448:], spec), spec)
        return DsMlaTokens(tok.nope, tok.scales, rope.to(torch.bfloat16))
    return _kv_write_read(dict(locals()), encode=enc)


def kv_insert_int32_block_offset(x, wkv, wkv_scale, kv_norm, positions, slot_mapping, cache, *, eps, theta, yarn,
                                 block_base=0, fnuz_fmax=240.0):
    # block_id * block_stride computed in int32 (the overflow vLLM's writer guards against with .to(tl.int64)): past
    # 2^31 bytes the offset wraps negative and the token lands outside the pool (lost); below it nothing changes
    stride = DsMlaLayout().block_stride

    def slots(rel):
        gb = torch.where(rel >= 0, rel // 64 + block_base, -1)
        off = (gb * stride + 2**31) % 2**32 - 2**31                 # int32 wrap-around
        nb = torch.div(off, stride, rounding_mode="floor") - block_base
        ok = (rel >= 0) & (nb >= 0) & (nb < cache.shape[0])
        return torch.where(ok, nb * 64 + rel % 64, -1)
    return _kv_write_read(dict(locals()), slots=slots)
def mtp_enorm_hnorm_swapped(**kw):
    return mtp_head_golden(**dict(kw, enorm=kw["hnorm"], hnorm=kw["enorm"]))


def mtp_embeds_token_t(**kw):
    # position t embeds its own token ids[t] instead of the next one, ids[t + 1] (the proposer's shift missed)
    ids = kw["ids"]
    return mtp_head_golden(**dict(kw, ids=torch.cat((ids[:1], ids[:-1]))))


def mtp_zeroes_every_position(**kw):
    # vLLM's position-0 mask applied to every row: the embedding term never reaches the block
    e = dict(kw, embed_table=torch.zeros_like(kw["embed_table"]))
    return mtp_head_golden(**e)


# -- indexer.k_cache: writers and readers of the paged indexer-K pool, each broken in one way -----------------
def _global_slots(fn):
    """The mutant on the high-block rows too: slots / block ids made relative to the pool's row 0 exactly (int64),
    so each mutant is broken only in its own way."""
    @functools.wraps(fn)
    def wrapped(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64, layout="normal", block_base=0):
        sm, bt = k_cache_relative(slot_mapping, block_table, block_base, block_size, cache.shape[0])
        return fn(k, sm, cache, bt, seq_lens, block_size=block_size, layout=layout)
    return wrapped


def _kc_write(pool, slot_mapping, codes, scales, lay, *, padding_slot=None):
    """Raw writes of (codes [N, 128], fp32 scales [N]), rows in order; -1 rows skipped unless ``padding_slot``
    says where they go."""
    for i, s in enumerate(slot_mapping.tolist()):
        if s < 0:
            if padding_slot is None:
                continue
            s = padding_slot
        b, o = divmod(s, lay.block_size)
        pool[b, lay.value_cols(o)] = codes[i]
        pool[b, lay.scale_cols(o)] = scales[i:i + 1].float().view(torch.uint8)
    return pool


def _kc_read(pool, slots, lay, dialect, *, scale_shift=0):
    f = get_format(dialect)
    out = []
    for s in slots.tolist():
        b, o = divmod(s, lay.block_size)
        v = torch.from_numpy(f.decode(pool[b, lay.value_cols(o)].numpy())).float()
        cols = lay.scale_cols(o) + 4 * scale_shift
        out.append(v * pool[b, cols].clone().view(torch.float32))
    return torch.stack(out)


def _kc_quant(k, dialect, fmax, amax=None):
    a = (k.abs().amax(-1, keepdim=True) if amax is None else amax).clamp(min=1e-4)
    s = torch.exp2(torch.ceil(torch.log2(a / fmax)))
    codes = get_format(dialect).encode((k / s).numpy())
    return torch.from_numpy(codes.astype("uint8")), s.reshape(-1)


def _kc(k, slot_mapping, cache, block_table, seq_lens, block_size, layout, *, dialect="float8_e4m3fn",
        fmax=448.0, write_dialect=None, per_block=False, padding_slot=None, scale_shift=0, neg_zero_0x80=False):
    if layout in FP4_LAYOUTS:   # these mutants are FP8 writers/readers: the MXFP4 rows are not theirs
        raise Unsupported("an FP8 indexer-K mutant: no MXFP4 pool")
    lay = KCacheLayout(block_size, layout)
    amax = None
    if per_block:   # one scale per 64-slot block: the amax over every key written to the block
        blk = torch.where(slot_mapping >= 0, slot_mapping // block_size, -1)
        a = k.abs().amax(-1)
        amax = torch.stack([a[blk == b].max() if b >= 0 else a[i] for i, b in enumerate(blk.tolist())])[:, None]
    wd = write_dialect or dialect
    codes, s = _kc_quant(k, wd, 448.0 if write_dialect == "float8_e4m3fn" else fmax, amax)
    if neg_zero_0x80:   # an OCP-style sign bit on the zeros of negative inputs: 0x80, NaN in fnuz
        codes[(codes == 0) & (k < 0)] = 0x80
    pool = _kc_write(cache.clone(), slot_mapping, codes, s, lay, padding_slot=padding_slot)
    read = gather_slots(block_table, seq_lens, block_size)
    return {"k": _kc_read(pool, read, lay, dialect, scale_shift=scale_shift), "cache": pool}


@_global_slots
def k_cache_scale_per_block(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64, layout="normal"):
    return _kc(k, slot_mapping, cache, block_table, seq_lens, block_size, layout, per_block=True)


@_global_slots
def k_cache_padding_row_to_slot0(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64, layout="normal"):
    return _kc(k, slot_mapping, cache, block_table, seq_lens, block_size, layout, padding_slot=0)


@_global_slots
def k_cache_scale_read_at_next_entry(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64,
                                     layout="normal"):
    return _kc(k, slot_mapping, cache, block_table, seq_lens, block_size, layout, scale_shift=1)


@_global_slots
def k_cache_ocp_bytes_read_as_fnuz(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64, layout="normal"):
    # the DSV4 compressor's store on gfx942 (float8e4nv, 448) read by the fnuz gather: spec 4.1, x0.5
    return _kc(k, slot_mapping, cache, block_table, seq_lens, block_size, layout, dialect="float8_e4m3fnuz",
               fmax=K_FMAX["gfx942"], write_dialect="float8_e4m3fn")


@_global_slots
def k_cache_fnuz_writer_emitting_0x80(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64,
                                      layout="normal"):
    return _kc(k, slot_mapping, cache, block_table, seq_lens, block_size, layout, dialect="float8_e4m3fnuz",
               fmax=K_FMAX["gfx942"], neg_zero_0x80=True)


@_global_slots
def k_cache_block_flat_on_shuffle_pool(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64,
                                       layout="normal"):
    # writer and reader agree with each other, but always lay the values out block-flat
    if layout in FP4_LAYOUTS:
        raise Unsupported("an FP8 indexer-K mutant: no MXFP4 pool")
    return _kc(k, slot_mapping, cache, block_table, seq_lens, block_size, "normal")


# -- indexer.k_cache, MXFP4 pools: writers and readers each broken in one way (FP8 rows: not provided) ----------
def _mx_quant(k, block=32):
    """(e2m1 nibbles [N, 128] uint8, pow2 scales [N, 128 / block] float64): the spec's rule at ``block``."""
    from references.formats.minifloat import FLOAT4_E2M1FN

    x = k.double().reshape(k.shape[0], -1, block)
    a = x.abs().amax(-1, keepdim=True).clamp(min=6.0 * 2.0**-126)
    s = torch.exp2(torch.ceil(torch.log2(a / 6.0)))
    nib = FLOAT4_E2M1FN.encode((x / s).numpy(), saturate=True).reshape(k.shape[0], -1)
    return torch.from_numpy(nib.astype("uint8")), s.reshape(k.shape[0], -1)


def _mx(k, slot_mapping, cache, block_table, seq_lens, block_size, layout, *, swap=False, block=32, bias=127,
        read_bias=127, read_layout=None):
    if layout not in FP4_LAYOUTS:
        raise Unsupported("an MXFP4 indexer-K mutant: no FP8 pool")
    from references.formats.minifloat import FLOAT4_E2M1FN

    lay, rlay = KCacheLayout(block_size, layout), KCacheLayout(block_size, read_layout or layout)
    nib, s = _mx_quant(k, block)
    lo, hi = (1, 0) if swap else (0, 1)
    packed = (nib[:, lo::2] | (nib[:, hi::2] << 4)).to(torch.uint8)
    sb = (torch.log2(s).round().long() + bias).to(torch.uint8)      # one byte per block (8 for block 16)
    nsc = sb.shape[1]
    pool = cache.clone()
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            b, o = divmod(slot, block_size)
            pool[b, lay.value_cols(o)] = packed[i]
            if nsc == 4:
                pool[b, lay.scale_cols(o)] = sb[i]
            else:   # per-16 scales: 8 bytes an entry, block-flat from the scale region (the next entry's clobbered)
                pool[b, lay.scale_region + o * nsc + torch.arange(nsc)] = sb[i]
    out = []
    for slot in gather_slots(block_table, seq_lens, block_size).tolist():
        b, o = divmod(slot, block_size)
        v = pool[b, rlay.value_cols(o)]
        n = torch.stack(((v >> 4), (v & 0xF)) if swap else ((v & 0xF), (v >> 4)), -1).reshape(-1)
        sc = pool[b, rlay.scale_cols(o)] if nsc == 4 else pool[b, lay.scale_region + o * nsc + torch.arange(nsc)]
        e = torch.exp2(sc.double() - read_bias)
        e = torch.where(sc == 0xFF, torch.full_like(e, float("nan")), e)
        out.append(torch.from_numpy(FLOAT4_E2M1FN.decode(n.numpy())).reshape(-1, block) * e[:, None])
    return {"k": (torch.stack(out).reshape(-1, 128) if out else torch.empty(0, 128)).float(), "cache": pool}


@_global_slots
def k_cache_fp4_nibbles_swapped(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64, layout="normal"):
    # writer and reader agree: the even element in the high nibble (spec, vLLM: low nibble first)
    return _mx(k, slot_mapping, cache, block_table, seq_lens, block_size, layout, swap=True)


@_global_slots
def k_cache_fp4_scale_per_16(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64, layout="normal"):
    # one UE8M0 scale per 16 values (NVFP4's block) instead of 32: 8 scale bytes an entry, reader consistent
    return _mx(k, slot_mapping, cache, block_table, seq_lens, block_size, layout, block=16)


@_global_slots
def k_cache_fp4_shuffled_read_as_block_flat(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64,
                                            layout="normal"):
    # the right writer for the pool's layout; the reader always gathers block-flat (the CUDA/references order)
    return _mx(k, slot_mapping, cache, block_table, seq_lens, block_size, layout, read_layout="mxfp4")


@_global_slots
def k_cache_fp4_scale_read_bias_128(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64,
                                    layout="normal"):
    # the right bytes; the reader decodes the UE8M0 byte as 2^(b - 128)
    return _mx(k, slot_mapping, cache, block_table, seq_lens, block_size, layout, read_bias=128)


@_global_slots
def k_cache_fp4_scale_written_bias_128(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64,
                                       layout="normal"):
    # writer and reader agree on 2^(b - 128): the keys round-trip, the scale bytes are one too high
    return _mx(k, slot_mapping, cache, block_table, seq_lens, block_size, layout, bias=128, read_bias=128)


def k_cache_int32_block_offset(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64, layout="normal",
                               block_base=0):
    # the writer computes block_id * block_stride in int32 (vLLM's casts the block id to int64 first,
    # rocm_aiter_mla_sparse.py:143-145): past 2^31 bytes the offset wraps negative, before the pool: the write is
    # lost (modelled as nothing written); the reader (int64) then gathers the pool's old bytes. Below 2^31: exact.
    kw = dict(k=k, slot_mapping=slot_mapping, cache=cache, block_table=block_table, seq_lens=seq_lens,
              block_size=block_size, layout=layout, block_base=block_base)
    out = k_cache_emulate("ocp")(**kw)
    lay = KCacheLayout(block_size, layout)
    sm = slot_mapping.long()
    off = torch.where(sm >= 0, sm // block_size, 0) * lay.block_stride
    lost = (sm >= 0) & (((off + 2**31) % 2**32 - 2**31) != off)
    if not lost.any():
        return out
    rel, bt = k_cache_relative(slot_mapping, block_table, block_base, block_size, cache.shape[0])
    pool = out["cache"]
    for s_ in rel[lost].tolist():
        b, o = divmod(s_, block_size)
        for cols in (lay.value_cols(o), lay.scale_cols(o)):
            pool[b, cols] = cache[b, cols]
    return {"k": lay.read(pool, gather_slots(bt, seq_lens, block_size), "float8_e4m3fn"), "cache": pool}


# -- indexer.k_latent (V4.1): the index key from the compressor latent, each broken in one way --------------------
def _k_serving(x, profile="ocp", *, pow2=True):
    from conformance.cases.indexer_v41 import _k_fp8

    if pow2:
        return _k_fp8(x, profile)
    # scale = amax / 448 exactly (no power-of-two rounding up): the codes land on another grid
    s = x.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448.0
    return torch.from_numpy(get_format("float8_e4m3fn").round((x / s).numpy())).float() * s


def _k_chain(latent, wk, k_norm, positions, inv_freq, *, ratio, eps, norm=True, rope_pos=None, rotate_latent=False):
    from references.components.indexer_v41 import group_positions

    bf = lambda x: x.to(torch.bfloat16).float()  # noqa: E731
    lat = bf(latent)
    if rotate_latent:
        # wk applied to the main cache's latent after its RoPE (dims 448..511 rotated at the group position) instead
        # of the pre-RoPE latent (attention.py:1343: "wk maps the main compressor's (pre-RoPE) latent")
        lat = bf(apply_rope(lat, group_positions(positions, ratio), inv_freq))
    p = bf(lat @ bf(wk).T)
    k = bf(rms_norm(p, bf(k_norm), eps)) if norm else p
    pos = group_positions(positions, ratio) if rope_pos is None else rope_pos
    return bf(apply_rope(k, pos, inv_freq))


def k_latent_without_k_norm(latent, wk, k_norm, positions, inv_freq, *, ratio, eps=1e-6):
    return {"k": _k_serving(_k_chain(latent, wk, k_norm, positions, inv_freq, ratio=ratio, eps=eps, norm=False))}


def k_latent_rope_at_token_position(latent, wk, k_norm, positions, inv_freq, *, ratio, eps=1e-6):
    # RoPE at the boundary token's own position t instead of the group's first position (t // m) m
    return {"k": _k_serving(_k_chain(latent, wk, k_norm, positions, inv_freq, ratio=ratio, eps=eps,
                                     rope_pos=positions))}


def k_latent_from_rotated_latent(latent, wk, k_norm, positions, inv_freq, *, ratio, eps=1e-6):
    return {"k": _k_serving(_k_chain(latent, wk, k_norm, positions, inv_freq, ratio=ratio, eps=eps,
                                     rotate_latent=True))}


def k_latent_scale_not_pow2(latent, wk, k_norm, positions, inv_freq, *, ratio, eps=1e-6):
    return {"k": _k_serving(_k_chain(latent, wk, k_norm, positions, inv_freq, ratio=ratio, eps=eps), pow2=False)}


def k_latent_ocp_bytes_read_as_fnuz(latent, wk, k_norm, positions, inv_freq, *, ratio, eps=1e-6):
    # what vLLM 0.32.0's V4.1 writer does on gfx942: OCP codes (fmax 448), decoded by an fnuz reader
    x = _k_chain(latent, wk, k_norm, positions, inv_freq, ratio=ratio, eps=eps)
    tok = encode_indexer_k_tokens(x, "float8_e4m3fn", 448.0)
    return {"k": dequantize_indexer_k_tokens(tok, "float8_e4m3fnuz")}


# -- indexer.topk_two_level (V4.1) --------------------------------------------------------------------------
def _two_level(src_scores, scores, positions, ratio, topk, topk_blocks, block_size, variant, *, cand=None,
               cand_block=None):
    from references.components.indexer_v41 import candidate_blocks, topk_in_candidates

    c = candidate_blocks(src_scores, positions, ratio=ratio, topk_blocks=topk_blocks,
                         block_size=cand_block or block_size) if cand is None else cand
    return {"candidates": c, "idx": topk_in_candidates(scores, positions, c, ratio=ratio, topk=topk,
                                                       block_size=block_size, variant=variant)}


def two_level_candidates_not_applied(src_scores, scores, positions, *, ratio, topk, topk_blocks, block_size,
                                     variant="dense"):
    from references.components.indexer import indexer_topk
    from references.components.indexer_v41 import candidate_blocks

    c = candidate_blocks(src_scores, positions, ratio=ratio, topk_blocks=topk_blocks, block_size=block_size)
    return {"candidates": c, "idx": indexer_topk(scores, positions, ratio=ratio, topk=topk)}


def two_level_block_size_off_by_one(src_scores, scores, positions, *, ratio, topk, topk_blocks, block_size,
                                    variant="dense"):
    # blocks of B + 1 entries on both sides (the source's block ids and the consumer's mask agree with each other)
    return _two_level(src_scores, scores, positions, ratio, topk, topk_blocks, block_size + 1, variant)


def _blocks_from_scores(bs, topk_blocks):
    order = torch.sort(bs, dim=1, descending=True, stable=True).indices[:, :topk_blocks]
    c = torch.where(bs.gather(1, order) > float("-inf"), order, torch.full_like(order, -1))
    if c.shape[1] < topk_blocks:
        c = torch.cat([c, torch.full((c.shape[0], topk_blocks - c.shape[1]), -1, dtype=c.dtype)], 1)
    return c


def _block_max(src_scores, n, block_size):
    """[T, nb] max of each block over the entries below n (-inf where none); no pin."""
    T, N = src_scores.shape
    nb = -(-N // block_size)
    key = torch.full((T, nb * block_size), float("-inf"))
    vis = torch.arange(N)[None, :] < n[:, None]
    key[:, :N] = torch.where(vis, src_scores.float(), torch.full_like(src_scores.float(), float("-inf")))
    return key.view(T, nb, block_size).amax(-1)


def two_level_newest_block_not_pinned(src_scores, scores, positions, *, ratio, topk, topk_blocks, block_size,
                                      variant="dense"):
    from references.components.indexer import causal_bound

    # the newest (partial) block ranked by its score like any other, not pinned at +inf
    n = causal_bound(positions, ratio).clamp(max=src_scores.shape[1])
    c = _blocks_from_scores(_block_max(src_scores, n, block_size), topk_blocks)
    return _two_level(src_scores, scores, positions, ratio, topk, topk_blocks, block_size, variant, cand=c)


def two_level_block_scores_not_causal(src_scores, scores, positions, *, ratio, topk, topk_blocks, block_size,
                                      variant="dense"):
    from references.components.indexer import causal_bound

    # block maxima over the whole row, future blocks included (the causal row end not applied; the newest visible
    # block still pinned): future blocks can displace visible ones
    N = src_scores.shape[1]
    n = causal_bound(positions, ratio).clamp(max=N)
    bs = _block_max(src_scores, torch.full_like(n, N), block_size)
    rows = (n > 0).nonzero().flatten()
    bs[rows, (n[rows] - 1) // block_size] = float("inf")
    c = _blocks_from_scores(bs, topk_blocks)
    return _two_level(src_scores, scores, positions, ratio, topk, topk_blocks, block_size, variant, cand=c)


def two_level_fill_with_padding(src_scores, scores, positions, *, ratio, topk, topk_blocks, block_size,
                                variant="dense"):
    # -1 where the dense path fills with visible non-candidates (the sparse-logits variant run on dense rows)
    return _two_level(src_scores, scores, positions, ratio, topk, topk_blocks, block_size, "candidates_only")

# -- moe.experts_nvfp4: readers of the checkpoint's NVFP4 bytes, each wrong in one way (written independently of
# the case module's diagnosis replay: torch views and a literal e2m1 table)
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _nv_dequant(packed, sb, g2, *, scale_dtype=torch.float8_e4m3fn, swap=False, group=16, use_global=True):
    lo, hi = (packed & 0x0F).long(), (packed >> 4).long()
    codes = torch.stack((hi, lo) if swap else (lo, hi), -1).flatten(-2)
    s = sb.view(scale_dtype).float()
    s = s[..., :codes.shape[-1] // group].repeat_interleave(group, -1)
    return _E2M1[codes] * s * (g2.float()[:, None, None] if use_global else 1.0)


def _nv_mutant(**how):
    def experts_nvfp4(x, ids, weights, w1, w1_scale, w1_scale_2, w3, w3_scale, w3_scale_2, w2, w2_scale, w2_scale_2,
                      w13_input_scale, w2_input_scale, *, limit, out=None):
        from conformance.cases.moe import experts_golden

        W = [_nv_dequant(p, s, g, **how) for p, s, g in ((w1, w1_scale, w1_scale_2), (w3, w3_scale, w3_scale_2),
                                                         (w2, w2_scale, w2_scale_2))]
        return experts_golden(x, ids, weights, *W, limit=limit)
    return experts_nvfp4


nvfp4_scales_read_as_fnuz = _nv_mutant(scale_dtype=torch.float8_e4m3fnuz)
nvfp4_nibbles_swapped = _nv_mutant(swap=True)
nvfp4_global_scale_ignored = _nv_mutant(use_global=False)
nvfp4_scale_per_32 = _nv_mutant(group=32)
for _n in ("nvfp4_scales_read_as_fnuz", "nvfp4_nibbles_swapped", "nvfp4_global_scale_ignored", "nvfp4_scale_per_32"):
    globals()[_n].__name__ = _n


class MutantGfx942(Mutant):
    def info(self):
        return SubjectInfo(self.name, "deliberately broken", "cpu", "float8_e4m3fnuz", False, profile="gfx942")

    def provides(self):
        return {self.component: Impl(self.fn, function=f"mutant.{self.component}", backend="torch")}


MUTANTS = [
    ("moe.shared_expert", shared_expert_without_clamp),
    ("moe.shared_expert", shared_expert_up_clamped_max_side_only),
    ("head.lm", head_without_norm_weight),
    ("head.lm", head_from_stream_mean),
    ("embed", embed_scaled),
    ("embed", embed_off_by_one),
    ("attn.index_set", index_set_window_129),
    ("attn.index_set", index_set_window_without_query),
    ("attn.index_set", index_set_hca_one_token_early),
    ("linear.fp8_block", linear_scale_layout_transposed),
    ("linear.fp8_block", linear_per_token_scale),
    ("linear.fp8_block", linear_32x32_scales_read_as_128_blocks),
    ("attn.q_path", q_path_rope_on_first_dims),
    ("attn.q_path", q_path_without_head_norm),
    ("attn.q_path", q_path_without_q_norm_weight),
    ("attn.q_path", q_path_head_norm_always),
    ("attn.kv_insert", kv_insert_scale_not_pow2),
    ("attn.kv_insert", kv_insert_scales_inline),
    ("attn.kv_insert", kv_insert_padding_to_slot0),
    ("attn.kv_insert", kv_insert_rope_fp8),
    ("attn.kv_insert", kv_insert_int32_block_offset),
    ("mtp.head", mtp_enorm_hnorm_swapped),
    ("mtp.head", mtp_embeds_token_t),
    ("mtp.head", mtp_zeroes_every_position),
    ("indexer.k_cache", k_cache_scale_per_block),
    ("indexer.k_cache", k_cache_padding_row_to_slot0),
    ("indexer.k_cache", k_cache_scale_read_at_next_entry),
    ("indexer.k_cache", k_cache_block_flat_on_shuffle_pool),
    ("indexer.k_cache", k_cache_fp4_nibbles_swapped),
    ("indexer.k_cache", k_cache_fp4_scale_per_16),
    ("indexer.k_cache", k_cache_fp4_shuffled_read_as_block_flat),
    ("indexer.k_cache", k_cache_fp4_scale_read_bias_128),
    ("indexer.k_cache", k_cache_fp4_scale_written_bias_128),
    ("indexer.k_cache", k_cache_int32_block_offset),
    ("indexer.k_latent", k_latent_without_k_norm),
    ("indexer.k_latent", k_latent_rope_at_token_position),
    ("indexer.k_latent", k_latent_from_rotated_latent),
    ("indexer.k_latent", k_latent_scale_not_pow2),
    ("indexer.topk_two_level", two_level_candidates_not_applied),
    ("indexer.topk_two_level", two_level_block_size_off_by_one),
    ("indexer.topk_two_level", two_level_newest_block_not_pinned),
    ("indexer.topk_two_level", two_level_block_scores_not_causal),
    ("indexer.topk_two_level", two_level_fill_with_padding),

    ("moe.experts_nvfp4", nvfp4_nibbles_swapped),
    ("moe.experts_nvfp4", nvfp4_global_scale_ignored),
    ("moe.experts_nvfp4", nvfp4_scale_per_32),
]
# mutants whose platform is gfx942 (fnuz): run by a subject of that profile
MUTANTS_GFX942 = [
    ("indexer.k_cache", k_cache_ocp_bytes_read_as_fnuz),
    ("indexer.k_cache", k_cache_fnuz_writer_emitting_0x80),
    ("indexer.k_latent", k_latent_ocp_bytes_read_as_fnuz),

    ("moe.experts_nvfp4", nvfp4_scales_read_as_fnuz),
]


def _verdicts(component, fn, fast=False):
    subj = (MutantGfx942 if (component, fn) in MUTANTS_GFX942 else Mutant)(component, fn)
    return {c.id: run_numeric(subj, c) for c in cases_for(component) if not fast or c.tier == "fast"}


@pytest.mark.parametrize("component,fn", MUTANTS + MUTANTS_GFX942,
                         ids=[f"{m[0]}:{m[1].__name__}" for m in MUTANTS + MUTANTS_GFX942])
def test_mutant_caught_with_diagnosis(component, fn):
    """Caught on the fast tier (what every run executes; the full tier's Flash shapes add minutes, not cases a
    mutant needs)."""
    caught = []
    for cid, rows in _verdicts(component, fn, fast=True).items():
        for r in rows:
            if r.verdict in ("fail", "catastrophic"):
                caught.append(r)
                assert component in r.message and cid in r.message, r.message
                assert r.worst.get("index") is not None, r.message
    assert caught, f"mutant {fn.__name__} of {component} passed every case"


def test_missing_clamp_is_caught_only_where_the_clamp_is_active():
    """The gain-1 case keeps every pre-activation below 10: the unclamped shared expert is the same map there.
    (The one-token case, 4 gate and 10 up channels past the limit, is caught at the emulated level only.)"""
    v = {cid: worst_verdict(rows) for cid, rows in _verdicts("moe.shared_expert", shared_expert_without_clamp).items()}
    assert v["moe.shared_expert/T33D256I128/gain1-normal/s602"] == "pass"
    assert all(x in ("fail", "catastrophic") for cid, x in v.items() if "gain1-" not in cid), v


def test_hca_one_token_early_is_caught_at_the_126_mod_128_positions_only():
    """Entry i turns visible at t = 128 i + 126 under the mutant: prefills that reach such a position fail, the
    others (and every SWA / CSA case) pass."""
    v = {cid: worst_verdict(rows) for cid, rows in _verdicts("attn.index_set", index_set_hca_one_token_early).items()}
    for cid, x in v.items():
        start, end = (int(t) for t in cid.split("/")[2][1:].split("-"))
        reaches = "/hca/" in cid and any((t + 2) % 128 == 0 for t in range(start, end))
        assert x == ("fail" if reaches else "pass"), (cid, x)


def test_per_token_activation_scale_is_caught_at_the_emulated_level():
    rows = _verdicts("linear.fp8_block", linear_per_token_scale)
    emu = [r for rs in rows.values() for r in rs if r.level == "emulated"]
    assert emu and any(r.verdict == "fail" for r in emu)


def test_32x32_scales_read_as_128_blocks_is_caught_on_every_v41_row_only():
    """Against the golden (serving level) every V4.1 row (wb32) fails with the worst element named; on V4's
    128x128 rows the mutant is the golden itself and passes there (so the rows, not a loose comparison, make the
    catch; its emulated-level rows fail on every case, being no serving numerics)."""
    rows = _verdicts("linear.fp8_block", linear_32x32_scales_read_as_128_blocks, fast=True)
    assert any("/wb32/" in c for c in rows)
    for cid, rs in rows.items():
        (r,) = [r for r in rs if r.level == "serving"]
        if "/wb32/" in cid:
            assert r.verdict in ("fail", "catastrophic") and r.worst.get("index") is not None, (cid, r.message)
        else:
            assert r.verdict == "pass", (cid, r.message)


@pytest.mark.parametrize("fn,caught_on", [(q_path_head_norm_always, "v4.1"), (q_path_without_head_norm, "v4")])
def test_head_norm_mutants_are_caught_on_the_other_versions_rows_only(fn, caught_on):
    """Applying the per-head norm on V4.1 rows fails every V4.1 row's q (serving level, the worst element named) and
    is the golden on V4 rows; dropping it fails every V4 row and is the golden on V4.1 rows. qr is untouched."""
    rows = _verdicts("attn.q_path", fn, fast=True)
    assert {("/v41/" in c) for c in rows} == {True, False}
    for cid, rs in rows.items():
        r = [r for r in rs if r.level == "serving"]
        version = "v4.1" if "/v41/" in cid else "v4"
        verdict = worst_verdict(r)
        if version == caught_on:
            assert verdict in ("fail", "catastrophic"), (cid, [x.message for x in r])
            assert any(" q: " in x.message and x.worst.get("index") is not None for x in r
                       if x.verdict in ("fail", "catastrophic")), [x.message for x in r]
        else:
            assert verdict == "pass", (cid, [x.message for x in r])


def test_int32_block_offset_is_caught_on_the_high_block_cases_only():
    """Block id 57,400 puts the byte offset past 2^31: only those cases see an int32 offset writer; the others pass."""
    v = {cid: worst_verdict(rows) for cid, rows in _verdicts("attn.kv_insert", kv_insert_int32_block_offset).items()}
    for cid, x in v.items():
        assert (x in ("fail", "catastrophic")) if "/b57400x" in cid else x == "pass", (cid, x)
def test_mtp_mutants_fail_on_every_case_the_embedding_reaches():
    """Each MTP mutant fails every case, except that the two embedding mutants cannot show on the vLLM-variant
    decode row at position 0: that row's embedding is zeroed, so which token it embeds does not matter there."""
    for fn in (mtp_enorm_hnorm_swapped, mtp_embeds_token_t, mtp_zeroes_every_position):
        v = {cid: worst_verdict(rows) for cid, rows in _verdicts("mtp.head", fn).items()}
        for cid, x in v.items():
            blind = fn is not mtp_enorm_hnorm_swapped and "/decode/t1p0" in cid and "/vllm/" in cid
            assert x in (("pass",) if blind else ("fail", "catastrophic")), (fn.__name__, cid, x)


def _kc_rows(fn):
    """The FP8 rows (the MXFP4 rows are not provided by these FP8 mutants)."""
    return {cid: rows for cid, rows in _verdicts("indexer.k_cache", fn).items() if "/mxfp4" not in cid}


def test_k_cache_ocp_bytes_read_as_fnuz_is_diagnosed_x0_5():
    for cid, rows in _kc_rows(k_cache_ocp_bytes_read_as_fnuz).items():
        assert all(r.verdict in ("fail", "catastrophic") for r in rows), cid
        assert all("ratio signature: x0.5" in r.message for r in rows), [r.message for r in rows]


def test_k_cache_writer_emitting_0x80_on_fnuz_is_diagnosed_as_negative_zero():
    """The writer emits 0x80 only where a negative value rounds to zero (the -0 case by design; the wide case's tiny
    values; the long case's rare ones); fnuz reads it as NaN, and every failure's diagnosis names the byte."""
    for cid, rows in _kc_rows(k_cache_fnuz_writer_emitting_0x80).items():
        for r in rows:
            assert r.verdict == "pass" or (r.verdict == "catastrophic" and "NaN<->-0" in r.message), (cid, r.message)
        if "/negzero/" in cid or "/wide/" in cid:
            assert all(r.verdict == "catastrophic" for r in rows), cid
        if "/decode/" in cid:
            assert all(r.verdict == "pass" for r in rows), cid


def test_k_cache_padding_row_is_caught_as_a_write_outside_the_written_slots():
    rows = _kc_rows(k_cache_padding_row_to_slot0)["indexer.k_cache/prefill/b1n40p2/negzero/s3"]
    assert all(r.verdict == "fail" and "cache.untouched" in r.message and "slot 0" in r.message for r in rows)


def test_k_cache_per_block_scale_passes_only_where_each_block_holds_one_entry():
    v = {cid: worst_verdict(rows) for cid, rows in _kc_rows(k_cache_scale_per_block).items()}
    for cid, x in v.items():
        assert x == ("pass" if "/decode/" in cid else "fail"), (cid, x)


def test_k_cache_self_consistent_block_flat_pair_fails_only_the_shuffle_rows():
    """A writer/reader pair that round-trips its own keys but ignores the layout: the gathered keys are right
    everywhere, and the bytes are wrong exactly on the SHUFFLE pools (caught by the layout's own decode)."""
    for cid, rows in _kc_rows(k_cache_block_flat_on_shuffle_pool).items():
        want = ("fail", "catastrophic") if "/shuffle" in cid else ("pass",)
        assert all(r.verdict in want for r in rows), (cid, [r.message for r in rows])
        for r in rows:
            assert r.extra["outputs"]["k"] == "pass", cid


def _mx_rows(fn):
    """The MXFP4 rows (the FP8 rows are not provided by the MXFP4 mutants, and say so)."""
    v = _verdicts("indexer.k_cache", fn)
    for cid, rows in v.items():
        if "/mxfp4" not in cid:
            assert [r.verdict for r in rows] == ["not-provided"] and "no FP8 pool" in rows[0].message, cid
    return {cid: [r for r in rows if r.level == "serving"] for cid, rows in v.items() if "/mxfp4" in cid}


def _out(r, name):
    return r.extra["outputs"][name]


def test_fp4_nibble_swap_is_caught_on_the_bytes_with_its_diagnosis():
    """A writer/reader pair that packs the even element high: the keys round-trip; the bytes, decoded by the
    spec's layout, fail on every MXFP4 row, diagnosed as the nibble order."""
    rows = _mx_rows(k_cache_fp4_nibbles_swapped)
    assert len(rows) == 10      # 8 MXFP4 rows + 2 high-block ones
    for cid, (r,) in rows.items():
        assert _out(r, "k") == "pass" and _out(r, "cache.values") in ("fail", "catastrophic"), (cid, r.message)
        assert "MXFP4 diagnosis: E2M1 nibble order swapped" in r.message, r.message


def test_fp4_scale_per_16_is_caught_with_its_diagnosis():
    for cid, (r,) in _mx_rows(k_cache_fp4_scale_per_16).items():
        assert r.verdict in ("fail", "catastrophic") and _out(r, "cache.values") != "pass", (cid, r.message)
        assert "one scale per 16 values" in r.message, (cid, r.message)


def test_fp4_shuffled_page_read_block_flat_fails_exactly_the_gfx950_rows():
    for cid, (r,) in _mx_rows(k_cache_fp4_shuffled_read_as_block_flat).items():
        if "/mxfp4-gfx950" in cid:
            assert _out(r, "k") in ("fail", "catastrophic"), (cid, r.message)
            assert "gfx950 shuffled pool read block-flat" in r.message, (cid, r.message)
        else:
            assert r.verdict == "pass", (cid, r.message)


def test_fp4_scale_byte_read_with_bias_128_is_diagnosed_x0_5():
    for cid, (r,) in _mx_rows(k_cache_fp4_scale_read_bias_128).items():
        assert _out(r, "k") in ("fail", "catastrophic") and _out(r, "cache.values") == "pass", (cid, r.message)
        assert "every value x0.5 of the emulation's: the UE8M0 scale byte decoded with bias 128" in r.message, r.message


def test_fp4_scale_byte_written_with_bias_128_is_caught_on_the_bytes():
    for cid, (r,) in _mx_rows(k_cache_fp4_scale_written_bias_128).items():
        assert _out(r, "k") == "pass" and _out(r, "cache.values") in ("fail", "catastrophic"), (cid, r.message)
        assert "exponent stored with bias 128 instead of 127" in r.message, r.message


def test_k_cache_int32_block_offset_fails_exactly_the_rows_past_2_31_bytes():
    """Block ids from 466,100 put block_id * block_stride in [2^31, 2^32) (FP8 and MXFP4 strides): an int32 offset
    loses those writes; every other row (offsets below 2^31) is the emulation itself and passes."""
    v = _verdicts("indexer.k_cache", k_cache_int32_block_offset)
    assert sum("-high-block/" in c for c in v) == 4
    for cid, rows in v.items():
        if "-high-block/" in cid:
            assert all(r.verdict in ("fail", "catastrophic") for r in rows), (cid, [r.message for r in rows])
            (r,) = [r for r in rows if r.level == "serving"]
            assert _out(r, "k") != "pass" and _out(r, "cache.values") != "pass", (cid, r.message)
            assert "exactly the slots whose byte offset block_id * block_stride passes 2^31" in r.message, r.message
        else:
            assert all(r.verdict == "pass" for r in rows), (cid, [r.message for r in rows])


def index_set_padded_to_256(positions, topk_idx=None, *, layer_type, ratio, window=128):
    """Correct slots in rows padded with -1 to a multiple of 128 columns, as vLLM's combine_topk_swa_indices
    returns them (its width differs from the golden's)."""
    out = attn_index_set(positions, topk_idx, layer_type=layer_type, ratio=ratio, window=window)["indices"]
    width = -(-(out.shape[1] + 1) // 128) * 128
    return {"indices": torch.cat([out.flip(1), torch.full((out.shape[0], width - out.shape[1]), -1)], 1)}


def test_index_set_rows_of_another_width_and_order_pass_when_their_slots_are_equal():
    """The multiset comparison pads the narrower side with int64 max; it padded with a float that wrapped to
    -2^63, so any width difference failed (hidden until vllm:sim-gfx942 returned vLLM's 256-wide rows)."""
    v = {cid: worst_verdict(rows) for cid, rows in _verdicts("attn.index_set", index_set_padded_to_256,
                                                             fast=True).items()}
    assert set(v.values()) == {"pass"}, {k: x for k, x in v.items() if x != "pass"}


def test_k_latent_rope_position_mutant_is_caught_exactly_on_the_ratio_two_cases():
    """At ratio 1 the group's first position is the token's own: the mutant is the same map there."""
    v = {cid: worst_verdict(rows) for cid, rows in _verdicts("indexer.k_latent", k_latent_rope_at_token_position,
                                                              fast=True).items()}
    assert all((x in ("fail", "catastrophic")) == ("r2/" in cid) for cid, x in v.items()), v


def test_k_latent_non_pow2_scale_is_caught_at_the_emulated_level_only():
    """Inside the serving budget (one e4m3 rounding at any scale is within 2^-4), outside the emulation's codes."""
    for cid, rows in _verdicts("indexer.k_latent", k_latent_scale_not_pow2, fast=True).items():
        by = {r.level: r.verdict for r in rows}
        assert by["serving"] == "pass" and by["emulated"] == "fail", (cid, by)


def test_k_latent_ocp_bytes_read_as_fnuz_is_diagnosed_x0_5():
    for cid, rows in _verdicts("indexer.k_latent", k_latent_ocp_bytes_read_as_fnuz, fast=True).items():
        assert any("a constant factor 2^-1 on the key (x0.5: OCP bytes read as fnuz" in r.message for r in rows), cid


def test_two_level_candidates_not_applied_is_caught_on_every_case():
    v = _verdicts("indexer.topk_two_level", two_level_candidates_not_applied, fast=True)
    assert all(worst_verdict(rows) == "fail" for rows in v.values()), {c: worst_verdict(r) for c, r in v.items()}


def _nv_rows(fn):
    return _verdicts("moe.experts_nvfp4", fn, fast=True)


@pytest.mark.parametrize("fn,diagnosis", [
    (nvfp4_scales_read_as_fnuz, "x0.5: the checkpoint's OCP E4M3 scale bytes read as fnuz"),
    (nvfp4_nibbles_swapped, "nibble order swapped"),
    (nvfp4_global_scale_ignored, "weight_scale_2 ignored"),
    (nvfp4_scale_per_32, "one scale per 32 values")], ids=lambda v: getattr(v, "__name__", "d"))
def test_nvfp4_misreading_diagnosed(fn, diagnosis):
    """Every failing row names the misreading; each mutant fails every fast case, except one scale per 32 values:
    on the blocks-flat case every block's scale byte is the same (448), so the 32-value grouping reads the same
    scales (not observable: it passes), and on the one-token decode case (64 outputs; neighbouring blocks' scales
    differ little in a normal weight) it shows elementwise as degraded only (one element 1.06x the emulated bound),
    and fails through the derived RMS limit at serving (calc_diff 0.088 > limit 0.0546, RMS 2.35x the model's,
    elementwise pass; moe_nvfp4.rms_variance, tests/harness/test_nvfp4_rms.py)."""
    for cid, rows in _nv_rows(fn).items():
        v = worst_verdict(rows)
        if fn is nvfp4_scale_per_32 and "/blocks-flat/" in cid:
            assert v == "pass", cid
        elif fn is nvfp4_scale_per_32 and cid.startswith("moe.experts_nvfp4/T1E"):
            assert v == "fail", cid
            assert {r.level: r.verdict for r in rows}["emulated"] == "degraded", cid
            serving = next(r for r in rows if r.level == "serving")
            assert "calc_diff" in serving.message and "elementwise: pass" in serving.message, serving.message
        else:
            assert v in ("fail", "catastrophic"), (cid, [r.message for r in rows])
        for r in rows:
            if r.verdict != "pass":
                assert f"diagnosis: matches {diagnosis}" in r.message, r.message
