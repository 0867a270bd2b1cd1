"""The components added for issue #16 (moe.shared_expert, head.lm, embed, attn.index_set, linear.fp8_block,
attn.q_path, attn.kv_insert, mtp.head, indexer.k_cache):
a deliberately broken implementation fails with a diagnosis naming the component, the case and the worst
element, and the correct ones pass (the reference and both emulations: test_subjects_and_suite.py)."""

import numpy as np
import pytest
import torch

from conformance.cases import cases_for
from conformance.cases.attention import attn_index_set
from conformance.cases.head import embed_golden, lm_head_golden
from conformance.cases.indexer_cache import K_FMAX, KCacheLayout, gather_slots
from conformance.cases.linear import W_SPECS, fp8_linear_golden, quant_act_group
from conformance.cases.linear import _emulate as linear_emulate
from conformance.cases.mtp import mtp_head_golden
from conformance.cases.qkv import _dequant as _q_dequant
from conformance.cases.qkv import _inv_freq as _q_inv_freq
from conformance.cases.qkv import _pool_slots as kv_pool_slots
from conformance.cases.qkv import _untouched as kv_untouched
from conformance.cases.qkv import q_path_golden
from conformance.checks.numeric import run_numeric, worst_verdict
from conformance.subjects import Impl, SubjectInfo
from references.components.attention import swa_indices
from references.components.moe import shared_expert
from references.components.norms import rms_norm, unweighted_rms_norm
from references.components.rope import apply_rope
from references.formats.blockscale import BlockFP8, dequantize_fp8, quantize_fp8
from references.formats.cache_layouts import (
    DsMlaLayout,
    DsMlaTokens,
    dequantize_ds_mla_tokens,
    encode_ds_mla_tokens,
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


def k_cache_scale_per_block(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64, layout="normal"):
    return _kc(k, slot_mapping, cache, block_table, seq_lens, block_size, layout, per_block=True)


def k_cache_padding_row_to_slot0(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64, layout="normal"):
    return _kc(k, slot_mapping, cache, block_table, seq_lens, block_size, layout, padding_slot=0)


def k_cache_scale_read_at_next_entry(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64,
                                     layout="normal"):
    return _kc(k, slot_mapping, cache, block_table, seq_lens, block_size, layout, scale_shift=1)


def k_cache_ocp_bytes_read_as_fnuz(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64, layout="normal"):
    # the DSV4 compressor's store on gfx942 (float8e4nv, 448) read by the fnuz gather: spec 4.1, x0.5
    return _kc(k, slot_mapping, cache, block_table, seq_lens, block_size, layout, dialect="float8_e4m3fnuz",
               fmax=K_FMAX["gfx942"], write_dialect="float8_e4m3fn")


def k_cache_fnuz_writer_emitting_0x80(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64,
                                      layout="normal"):
    return _kc(k, slot_mapping, cache, block_table, seq_lens, block_size, layout, dialect="float8_e4m3fnuz",
               fmax=K_FMAX["gfx942"], neg_zero_0x80=True)


def k_cache_block_flat_on_shuffle_pool(k, slot_mapping, cache, block_table, seq_lens, *, block_size=64,
                                       layout="normal"):
    # writer and reader agree with each other, but always lay the values out block-flat
    return _kc(k, slot_mapping, cache, block_table, seq_lens, block_size, "normal")


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
]
# mutants whose platform is gfx942 (fnuz): run by a subject of that profile
MUTANTS_GFX942 = [
    ("indexer.k_cache", k_cache_ocp_bytes_read_as_fnuz),
    ("indexer.k_cache", k_cache_fnuz_writer_emitting_0x80),
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
    return {cid: rows for cid, rows in _verdicts("indexer.k_cache", fn).items()}


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
