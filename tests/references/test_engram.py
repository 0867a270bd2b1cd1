"""The V4.1 Engram golden (references.components.engram): a hand-computed hash, the history properties vLLM's
kernel has (no request crosses another, chunked = whole, dead tokens block), the layout, the exact FP8 row
decode in both dialects, the gate's mask, and the fp32 golden within its derived bound of fp64."""

import pytest
import torch

from conformance.cases.engram import TINY, hash_inputs, layout, memory_bound, table_bytes
from references.components.engram import (
    engram_lookup,
    engram_memory,
    hash_multipliers,
    hash_offsets,
    hash_primes,
    ngram_hash,
)


def _hash(ids, pos, qsl, *, lookback=None, dead=None, mult=(3, 5, 7), primes=(11, 13), pad=0, V=16):
    ids = torch.tensor(ids)
    R = len(qsl) - 1
    lb = torch.full((R, len(mult) - 1), -1) if lookback is None else torch.tensor(lookback)
    return ngram_hash(ids, torch.tensor(pos), torch.tensor(qsl), torch.arange(V),
                      torch.zeros(len(ids), dtype=torch.bool) if dead is None else torch.tensor(dead), lb,
                      torch.zeros_like(lb, dtype=torch.bool), torch.tensor([list(mult)]), torch.tensor([list(primes)]),
                      hash_offsets(torch.tensor([list(primes)])), pad_id=pad)


def test_hand_computed_hash():
    # N = 3, H = 1, multipliers (3, 5, 7), primes 11 (2-gram) and 13 (3-gram), offsets 0 and 11, pad id 0,
    # identity token map, ids (2, 5, 6) at positions 0, 1, 2:
    #   t0: values 2, pad, pad: rolling 2*3 = 6 -> 6 % 11 = 6; 6 ^ 0 = 6 -> 6 % 13 + 11 = 17
    #   t1: values 5, 2, pad: 15 ^ 6 ... with multiplier 5 on the shift-1 value: 5*3 ^ 2*5 = 15 ^ 10 = 5 -> 5;
    #       5 ^ 0 = 5 -> 5 + 11 = 16
    #   t2: values 6, 5, 2: 18 ^ 25 = 11 -> 11 % 11 = 0; 11 ^ 14 = 5 -> 5 + 11 = 16
    got = _hash([2, 5, 6], [0, 1, 2], [0, 3])
    assert got[:, 0].tolist() == [[6, 17], [5, 16], [0, 16]]


def test_requests_never_read_each_other():
    a = _hash([2, 5, 6], [0, 1, 2], [0, 3])
    b = _hash([9, 4], [0, 1], [0, 2])
    both = _hash([2, 5, 6, 9, 4], [0, 1, 2, 0, 1], [0, 3, 5])
    assert torch.equal(both, torch.cat([a, b]))


def test_chunk_with_lookback_equals_the_whole_prompt():
    whole = _hash([2, 5, 6, 9, 4, 1], list(range(6)), [0, 6])
    # the last 3 tokens as a chunk from position 3, lookback = ids at positions 2, 1 (most recent first)
    chunk = _hash([9, 4, 1], [3, 4, 5], [0, 3], lookback=[[6, 5]])
    assert torch.equal(chunk, whole[3:])
    # an unknown lookback id (-1, position 2) reads as the pad id without blocking the older one (position 1):
    # t3's values 9, pad, 5: 27 ^ 0 = 27 -> 27 % 11 = 5; 27 ^ 35 = 56 -> 56 % 13 + 11 = 15 (whole prompt:
    # 9, 6, 5: 27 ^ 30 = 5 -> 5; 5 ^ 35 = 38 -> 38 % 13 + 11 = 23)
    part = _hash([9, 4, 1], [3, 4, 5], [0, 3], lookback=[[-1, 5]])
    assert part[0, 0].tolist() == [5, 15] and whole[3, 0].tolist() == [5, 23]
    assert part[1, 0, 0] == whole[4, 0, 0] and part[1, 0, 1] != whole[4, 0, 1]   # t4's 3-gram reaches position 2
    assert torch.equal(part[2], whole[5])


def test_a_dead_token_blocks_every_older_position():
    dead = _hash([2, 5, 6], [0, 1, 2], [0, 3], dead=[False, True, False])
    # t2: values 6, pad, pad: the 2-gram and 3-gram as at a sequence start with id 6: 18 -> 18 % 11 = 7; 18 % 13
    # + 11 = 16
    assert dead[2, 0].tolist() == [7, 16]
    # t1 is dead itself: every value is the pad id -> 0, 0 + 11
    assert dead[1, 0].tolist() == [0, 11]


def test_layout_primes_offsets_multipliers():
    p = hash_primes(2, 3, 2, 10)
    assert p.tolist() == [[11, 13, 17, 19], [23, 29, 31, 37]]      # consecutive primes >= 10
    assert hash_offsets(p).tolist() == [[0, 11, 24, 41], [0, 23, 52, 83]]
    m = hash_multipliers((1, 14), 4, 3000)
    assert bool((m % 2 == 1).all()) and bool((m > 0).all())
    assert int(m.max()) * 3000 < 2**63                     # id * multiplier cannot overflow int64


def test_buckets_stay_in_their_range_on_a_case_layout():
    g = torch.Generator().manual_seed(0)
    kw = hash_inputs(g, TINY, (5, 7), (0, 3), dead_share=0.1, pad_share=0.1, high_ids=True)
    h = ngram_hash(**kw)
    lo = kw["offsets"].unsqueeze(0)
    assert bool(((h >= lo) & (h < lo + kw["primes"].unsqueeze(0))).all())
    assert layout(TINY)["primes"].shape == (2, 8)


def test_row_decode_is_exact_in_both_dialects():
    table = torch.tensor([[0x38] * 32, [0x80] + [0x40] * 31], dtype=torch.uint8)
    scale = torch.tensor([[128], [126]], dtype=torch.uint8)              # 2^1, 2^-1
    ids = torch.tensor([[0, 1]])
    ocp = engram_lookup(ids, table, scale)
    assert ocp[0, 0, 0] == 2.0 and ocp[0, 1, 1] == 1.0                   # 0x38 = 1.0, 0x40 = 2.0 in OCP
    assert ocp[0, 1, 0] == 0.0 and torch.signbit(ocp[0, 1, 0])           # 0x80 = -0 in OCP
    fnuz = engram_lookup(ids, table, scale, dialect="float8_e4m3fnuz")
    assert fnuz[0, 0, 0] == 1.0 and torch.isnan(fnuz[0, 1, 0])           # x0.5; NaN at 0x80


def _memory_inputs(seed=0, T=5, hc=4, D=64, hd=32, cols=4, rows=50):
    g = torch.Generator().manual_seed(seed)
    table, scale = table_bytes(g, rows, hd)
    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    return {"stream": bf(torch.randn(T, hc, D, generator=g)),
            "hash_ids": torch.randint(0, rows, (T, cols), generator=g),
            "table": table, "table_scale": scale, "wkv": bf(torch.randn((hc + 1) * D, cols * hd, generator=g) * 0.02),
            "q_weight": bf(1 + 0.5 * torch.randn(hc, D, generator=g)),
            "k_weight": bf(1 + 0.5 * torch.randn(hc, D, generator=g)),
            "token_mask": torch.tensor([True, False, True, True, False]), "eps": 1e-6}


def test_masked_tokens_pass_through_and_the_gate_is_the_formula():
    kw = _memory_inputs()
    out = engram_memory(**kw)["out"]
    assert torch.equal(out[~kw["token_mask"]], kw["stream"][~kw["token_mask"]])
    # token 0, copy 0 by hand in fp64
    x = kw["stream"][0, 0].double()
    rows = engram_lookup(kw["hash_ids"], kw["table"], kw["table_scale"]).double()
    kv = rows[0].flatten() @ kw["wkv"].double().T
    D = x.shape[0]
    key, val = kv[:D], kv[4 * D:]
    dot = (x * kw["q_weight"][0].double() * kw["k_weight"][0].double() * key).sum()
    dot = dot / torch.sqrt((x * x).mean() + 1e-6) / torch.sqrt((key * key).mean() + 1e-6) / D**0.5
    gate = torch.sigmoid(torch.sign(dot) * torch.sqrt(dot.abs().clamp_min(1e-6)))
    assert torch.allclose(out[0, 0].double(), x + gate * val, rtol=0, atol=1e-5)


def test_fp32_golden_within_its_derived_bound_of_fp64():
    for seed in range(3):
        kw = _memory_inputs(seed)
        kw["table"][kw["table"] == 0x80] = 0     # -0 and +0 alike here; keep the test about rounding
        got = engram_memory(**kw)["out"].double()
        want = engram_memory(**dict(kw, stream=kw["stream"].double(), wkv=kw["wkv"].double(),
                                    q_weight=kw["q_weight"].double(), k_weight=kw["k_weight"].double()))["out"]
        bound = memory_bound(kw, "fp64")
        assert bool(((got - want).abs() <= bound).all()), float(((got - want).abs() / bound).max())


# -- MXFP8 wkv rows ------------------------------------------------------------------------------------------------
def _mx_case(seed_id="engram.memory/prefill/tiny/r2t13/mxfp8-wkv/layer/outliers/s22"):
    from conformance.cases import cases_for

    (c,) = [c for c in cases_for("engram.memory") if c.id == seed_id]
    return c.make_inputs()


def test_wkv_weight_hand_checked():
    """0x38 is 1.0 in e4m3fn (exponent 7 - bias 7, mantissa 0) and 0.5 in e4m3fnuz (bias 8); byte 128 = 2^1.
    A 32x32 tile (i, j) takes byte (i, j); read as 128x128 blocks, every tile of rows/cols < 128 takes byte (0, 0)."""
    from conformance.cases.engram import wkv_weight

    codes = torch.full((64, 64), 0x38, dtype=torch.uint8)
    sc = torch.tensor([[128, 126], [129, 127]], dtype=torch.uint8)
    w = wkv_weight(codes, sc)
    assert w[0, 0] == 2.0 and w[0, 32] == 0.5 and w[32, 0] == 4.0 and w[63, 63] == 1.0
    assert torch.equal(wkv_weight(codes, sc, scale_block=128), torch.full((64, 64), 2.0))
    assert torch.equal(wkv_weight(codes, sc, dialect="float8_e4m3fnuz"), w / 2)
    with pytest.raises(ValueError, match="one byte per 32x32 tile"):
        wkv_weight(codes, sc[:1])


def test_mxfp8_activation_quant_of_the_table_rows_is_exact():
    """The bound's premise (cases.engram docstring): 1x32 MXFP8 quantisation (mxfp8_utils' rule) of the looked-up
    rows returns them unchanged, since they already are e4m3fn codes x one UE8M0 scale per aligned 32 values."""
    from conformance.cases.linear import MX_ACT
    from references.formats.blockscale import dequantize_fp8, quantize_fp8

    kw = _mx_case()
    rows = engram_lookup(kw["hash_ids"], kw["table"], kw["table_scale"]).reshape(kw["hash_ids"].shape[0], -1)
    assert torch.equal(dequantize_fp8(*quantize_fp8(rows, MX_ACT), MX_ACT), rows)


def test_mxfp8_golden_is_the_bf16_golden_of_the_dequantised_weight():
    from conformance.cases.engram import engram_memory_golden, wkv_weight

    kw = _mx_case()
    a = engram_memory_golden(**kw)
    b = engram_memory_golden(**dict(kw, wkv=wkv_weight(kw["wkv"], kw["wkv_scale"]), wkv_scale=None))
    assert torch.equal(a["out"], b["out"]) and torch.equal(a["rows"], b["rows"])
