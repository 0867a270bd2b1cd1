"""engram.hash / engram.memory: deliberately broken implementations are caught on the fast tier with a message
naming the component, the case, the worst element and what went wrong; the correct ones pass (reference and
both emulations: test_subjects_and_suite.py runs every registered component)."""

import functools

import pytest
import torch

from conformance.cases import cases_for
from conformance.cases.engram import _emulate_memory, engram_memory_golden, wkv_weight
from conformance.checks.numeric import run_numeric, worst_verdict
from references.components.engram import engram_gate, engram_lookup

from .test_component_mutants import Mutant
from .test_new_component_mutants import MutantGfx942


def _broken_hash(*, order_shift=0, add=0, modulus_extra=0, dead_blocks=True, before_start="pad",
                 cross_requests=False):
    """A hash that follows vLLM's except for one named flaw (the golden's algorithm, written out again here)."""

    def fn(input_ids, positions, query_start_loc, token_map, dead_mask, lookback_token_ids, lookback_dead_mask,
           multipliers, primes, offsets, *, pad_id):
        T = input_ids.shape[0]
        L, N = multipliers.shape
        H = primes.shape[1] // (N - 1)
        ids, pos, dead, tmap = input_ids.tolist(), positions.tolist(), dead_mask.tolist(), token_map.tolist()
        lb, lbd = lookback_token_ids.tolist(), lookback_dead_mask.tolist()
        qsl = query_start_loc.tolist()
        out = torch.empty(T, L, (N - 1) * H, dtype=torch.int64)
        for r in range(len(qsl) - 1):
            for t in range(qsl[r], qsl[r + 1]):
                c = pos[qsl[r]]
                vals, blocked = [], False
                for s in range(N):
                    q = pos[t] - s
                    if cross_requests:       # a flat-batch history: index t - s, blocked only before index 0
                        if t - s >= 0:
                            src, d = tmap[ids[t - s]], dead[t - s]
                        else:
                            src, d = pad_id, False
                        blocked = blocked or t - s < 0 or (d and dead_blocks)
                        vals.append(pad_id if blocked else src)
                        continue
                    if q >= c:
                        src, d = tmap[ids[t - s]], dead[t - s]
                    elif 0 <= c - 1 - q < len(lb[r]) and lb[r][c - 1 - q] >= 0:
                        src, d = tmap[lb[r][c - 1 - q]], lbd[r][c - 1 - q]
                    else:
                        src, d = pad_id, False
                    if q < 0 and before_start == "zero":
                        vals.append(0)
                        continue
                    blocked = blocked or q < 0 or (d and dead_blocks)
                    vals.append(pad_id if blocked else src)
                for layer in range(L):
                    rolling = 0
                    hashes = []
                    for s in range(N):
                        rolling ^= vals[s] * int(multipliers[layer, s])
                        hashes.append(rolling)
                    for s in range(1, N):
                        src_s = min(max(s - order_shift, 0), N - 1)
                        for h in range(H):
                            j = (s - 1) * H + h
                            p = int(primes[layer, j]) + modulus_extra
                            out[t, layer, j] = hashes[src_s] % p + int(offsets[layer, j]) + add
        return {"hashes": out}

    return fn


hash_orders_1_to_n_minus_1 = _broken_hash(order_shift=1)
hash_off_by_one = _broken_hash(add=1)
hash_modulus_prime_plus_2 = _broken_hash(modulus_extra=2)
hash_dead_tokens_not_blocking = _broken_hash(dead_blocks=False)
hash_zero_before_sequence_start = _broken_hash(before_start="zero")
hash_crosses_request_boundary = _broken_hash(cross_requests=True)
for _n, _f in list(globals().items()):
    if _n.startswith("hash_") and callable(_f):
        _f.__name__ = _n


def _bf16_wkv(fn):
    """An engram.memory mutant on the MXFP8-wkv rows too: the weight dequantised exactly (wkv_weight) and passed
    as a float wkv, so the mutant is broken only in its own way."""
    @functools.wraps(fn)
    def wrapped(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, token_mask, *, eps, wkv_scale=None):
        return fn(stream, hash_ids, table, table_scale, wkv_weight(wkv, wkv_scale), q_weight, k_weight, token_mask,
                  eps=eps)
    return wrapped


@_bf16_wkv
def memory_gate_missing(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, token_mask, *, eps):
    # out = stream + value: the gate (and with it the mask) dropped
    rows = engram_lookup(hash_ids, table, table_scale)
    T, hc, D = stream.shape
    kv = rows.reshape(T, -1) @ wkv.float().T
    return {"rows": rows, "out": stream.float() + kv[:, hc * D:].unsqueeze(1)}


@_bf16_wkv
def memory_mask_ignored(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, token_mask, *, eps):
    return engram_memory_golden(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, None, eps=eps)


@_bf16_wkv
def memory_gate_without_signed_sqrt(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, token_mask, *,
                                    eps):
    # sigmoid(dot) instead of sigmoid(sign(dot) sqrt|dot|)
    rows = engram_lookup(hash_ids, table, table_scale)
    T, hc, D = stream.shape
    kv = rows.reshape(T, -1) @ wkv.float().T
    x, key, val = stream.float(), kv[:, :hc * D].reshape(T, hc, D), kv[:, hc * D:].unsqueeze(1)
    dot = (x * q_weight * k_weight * key).sum(-1) * torch.rsqrt(x.square().mean(-1) + eps) * \
        torch.rsqrt(key.square().mean(-1) + eps) / D**0.5
    gate = torch.sigmoid(dot) * token_mask.unsqueeze(-1)
    return {"rows": rows, "out": x + gate.unsqueeze(-1) * val}


@_bf16_wkv
def memory_table_read_as_fnuz(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, token_mask, *, eps):
    # a gfx942 platform that "normalises" the engram table to its fp8 dtype: the OCP bytes read as fnuz
    rows = engram_lookup(hash_ids, table, table_scale, dialect="float8_e4m3fnuz").to(torch.bfloat16).float()
    T = stream.shape[0]
    kv = (rows.reshape(T, -1) @ wkv.to(torch.bfloat16).float().T).to(torch.bfloat16).float()
    out = engram_gate(stream, kv, q_weight, k_weight, token_mask, eps=eps)
    return {"rows": rows, "out": out.to(torch.bfloat16).float()}


@_bf16_wkv
def memory_scale_of_the_next_block(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, token_mask, *,
                                   eps):
    # each 32-value block scaled by its neighbour's UE8M0 byte (a misaligned scale read)
    return _emulate_memory("ocp")(stream, hash_ids, table, table_scale.roll(1, dims=1), wkv, q_weight, k_weight,
                                  token_mask, eps=eps)


def _mx_only(fn):
    @functools.wraps(fn)
    def wrapped(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, token_mask, *, eps, wkv_scale=None):
        if wkv_scale is None:
            from conformance.subjects import Unsupported

            raise Unsupported("an MXFP8-wkv mutant: this row's wkv is bf16")
        return fn(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, token_mask, eps=eps,
                  wkv_scale=wkv_scale)
    return wrapped


@_mx_only
def memory_wkv_scale_per_128(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, token_mask, *, eps,
                             wkv_scale):
    # the 32x32 UE8M0 grid of the V4.1 wkv read as V4's 128x128 blocks (scale[i // 128, j // 128])
    w = wkv_weight(wkv, wkv_scale, scale_block=128).to(torch.bfloat16)
    return _emulate_memory("ocp")(stream, hash_ids, table, table_scale, w, q_weight, k_weight, token_mask, eps=eps)


@_mx_only
def memory_wkv_read_as_fnuz(stream, hash_ids, table, table_scale, wkv, q_weight, k_weight, token_mask, *, eps,
                            wkv_scale):
    # the OCP wkv codes decoded as e4m3fnuz (a gfx942 load path that "normalises" every FP8 weight)
    w = wkv_weight(wkv, wkv_scale, dialect="float8_e4m3fnuz").to(torch.bfloat16)
    return _emulate_memory("ocp")(stream, hash_ids, table, table_scale, w, q_weight, k_weight, token_mask, eps=eps)


MUTANTS = [
    ("engram.hash", hash_orders_1_to_n_minus_1),
    ("engram.hash", hash_off_by_one),
    ("engram.hash", hash_modulus_prime_plus_2),
    ("engram.hash", hash_dead_tokens_not_blocking),
    ("engram.hash", hash_zero_before_sequence_start),
    ("engram.hash", hash_crosses_request_boundary),
    ("engram.memory", memory_gate_missing),
    ("engram.memory", memory_mask_ignored),
    ("engram.memory", memory_gate_without_signed_sqrt),
    ("engram.memory", memory_scale_of_the_next_block),
    ("engram.memory", memory_wkv_scale_per_128),
    ("engram.memory", memory_wkv_read_as_fnuz),
]
MUTANTS_GFX942 = [("engram.memory", memory_table_read_as_fnuz)]


def _verdicts(component, fn):
    subj = (MutantGfx942 if (component, fn) in MUTANTS_GFX942 else Mutant)(component, fn)
    return {c.id: run_numeric(subj, c) for c in cases_for(component) if c.tier == "fast"}


@pytest.mark.parametrize("component,fn", MUTANTS + MUTANTS_GFX942,
                         ids=[f"{m[0]}:{m[1].__name__}" for m in MUTANTS + MUTANTS_GFX942])
def test_mutant_caught_with_diagnosis(component, fn):
    caught = []
    for cid, rows in _verdicts(component, fn).items():
        for r in rows:
            if r.verdict in ("fail", "catastrophic"):
                caught.append(r)
                assert component in r.message and cid in r.message, r.message
                assert r.worst.get("index") is not None, r.message
    assert caught, f"mutant {fn.__name__} of {component} passed every case"


# what each hash mutant's diagnosis must say (on every failing row)
HASH_DIAGNOSIS = {
    hash_orders_1_to_n_minus_1: "order 2's columns hold the 1-gram's rolling value",
    hash_off_by_one: "got - want = +1 at every mismatch",
    hash_modulus_prime_plus_2: "rolling mod (prime +2)",
    hash_zero_before_sequence_start: "only near the sequence start",
    hash_crosses_request_boundary: "only near chunk starts",
    hash_dead_tokens_not_blocking: "have a dead token in their n-gram window",
}


@pytest.mark.parametrize("fn", list(HASH_DIAGNOSIS), ids=[f.__name__ for f in HASH_DIAGNOSIS])
def test_hash_mutant_diagnosis_names_the_flaw(fn):
    failing = [r for rows in _verdicts("engram.hash", fn).values() for r in rows if r.verdict != "pass"]
    assert failing
    if fn in (hash_zero_before_sequence_start, hash_crosses_request_boundary):
        # a confinement to chunk / sequence starts is evidence only where other tokens exist: not on decode rows
        failing = [r for r in failing if "/decode/" not in r.case_id]
    for r in failing:
        assert HASH_DIAGNOSIS[fn] in r.message, r.message


def test_boundary_crossing_is_caught_on_every_packed_row():
    """Every fast row packs several requests; a flat-index history reads the previous request's tokens at each
    chunk start past position 0 (decode rows included: their history must come from the lookback rows)."""
    for cid, rows in _verdicts("engram.hash", hash_crosses_request_boundary).items():
        assert worst_verdict(rows) == "fail", cid


def test_dead_tokens_not_blocking_is_caught_only_where_tokens_are_dead():
    for cid, rows in _verdicts("engram.hash", hash_dead_tokens_not_blocking).items():
        assert worst_verdict(rows) == ("fail" if "dead" in cid else "pass"), cid


def test_table_read_as_fnuz_is_diagnosed_x0_5_and_nan_at_0x80():
    for cid, rows in _verdicts("engram.memory", memory_table_read_as_fnuz).items():
        for r in rows:
            assert r.verdict in ("fail", "catastrophic"), cid
            assert "ratio signature: NaN<->-0" in r.message or "ratio signature: x0.5" in r.message, r.message
        # rows holding 0x80 (OCP -0) read as NaN: the diagnosis names the byte (every fast row has some)
        assert any("nan_at_0x80" in r.message for r in rows), [r.message for r in rows]


def test_masked_token_mutant_names_the_masked_token():
    for cid, rows in _verdicts("engram.memory", memory_mask_ignored).items():
        if "dead" in cid:
            assert all(r.verdict in ("fail", "catastrophic") and "is masked (gate must be 0" in r.message
                       for r in rows), cid
        else:
            assert all(r.verdict == "pass" for r in rows), cid


@pytest.mark.parametrize("fn,says", [(memory_wkv_scale_per_128, "read as 128x128 blocks"),
                                     (memory_wkv_read_as_fnuz, "read as e4m3fnuz")],
                         ids=["scale_per_128", "read_as_fnuz"])
def test_mxfp8_wkv_mutants_fail_every_mxfp8_row_with_the_wkv_diagnosis(fn, says):
    """Each MXFP8-wkv mistake fails every fast MXFP8-wkv row (serving level), its diagnosis naming the mistake;
    the bf16-wkv rows are not provided (they have no wkv scales)."""
    v = _verdicts("engram.memory", fn)
    assert sum("/mxfp8-wkv/" in c for c in v) == 3
    for cid, rows in v.items():
        if "/mxfp8-wkv/" not in cid:
            assert [r.verdict for r in rows] == ["not-provided"], cid
            continue
        (r,) = [r for r in rows if r.level == "serving"]
        assert r.verdict in ("fail", "catastrophic") and "wkv diagnosis: out matches the golden of" in r.message \
            and says in r.message, (cid, r.message)
