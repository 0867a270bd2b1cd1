"""Streamed compressor (compressor.kv_stream, issue #16: chunked prefill == one prefill, k-token verify == k single
steps, from a NaN-poisoned carry): four realistic state bugs are caught on exactly the rows whose splits expose
them, with a diagnosing message, and the correct implementations (reference, emulated:gfx942 / ocp) pass every
row. Which rows must fail is derived from each row's splits and ratio (the predicates below), not listed.

The mutants are an fp32 streamed compressor with one bug each (``buggy_step``; ``buggy_step(None)`` is correct and
passes every row, test_the_mutant_stream_without_a_bug_passes):
  drop_partial       the carry of the chunk's trailing partial window is not kept (reset to kv 0 / score -inf:
                     "only completed windows are saved"), so a window split across chunks pools only its tokens
                     of the closing chunk;
  read_unwritten     CSA entry 0 pools the previous-window slots too, relying on a zero-initialised state (a
                     fresh vLLM state cache is whatever the block held before): NaN from the poisoned carry;
  restart_positions  the RoPE position counter restarts at every chunk (entry index relative to the chunk);
  parallel_verify    a multi-token chunk after the prefill (the decode / spec-decode verify path) runs its tokens
                     as independent single steps on the state as of the chunk's start: a window closing at
                     token j reads the slots of the chunk's earlier tokens before they are written.
"""

import math

import pytest
import torch

from conformance.cases import cases_for
from conformance.cases.compressor_stream import _streamed, emulated_stream, split_tag
from conformance.checks.numeric import run_numeric, worst_verdict
from conformance.checks.stream import poison_state, run_stream
from conformance.components import get
from conformance.subjects import Impl, Streamed, Subject, SubjectInfo
from conformance.subjects.emulated import EmulatedSubject
from conformance.subjects.reference import ReferenceSubject
from references.components._checks import compute_dtype
from references.components.compressor import _check, _finish
from references.components.compressor_stream import carry_rows
from references.numerics import GOLDEN

COMP = "compressor.kv_stream"
FAST = [c for c in cases_for(COMP) if c.tier == "fast"]


def buggy_step(bug):
    """``references.components.compressor_stream.step`` with one bug (module docstring)."""

    def stp(x, state, *, start, wkv, wgate, ape, norm, ratio, head_dim, eps, inv_freq, rope_dim=64,
            numerics=GOLDEN, kind="attn", variant="official", overlap=None):
        ov = _check(x, wkv, wgate, ape, norm, ratio, head_dim, overlap, kind, variant)
        m, d, n = ratio, head_dim, x.shape[0]
        R = carry_rows(m, ov)
        dt = compute_dtype(x)
        xs = x.to(dt)
        kv_rows = xs @ wkv.to(dt).T
        sc_rows = torch.zeros_like(kv_rows) if wgate is None else xs @ wgate.to(dt).T
        if ape is not None:
            sc_rows = sc_rows + ape.to(dt)[torch.arange(start, start + n) % m]
        kv_s, sc_s = state["kv"], state["score"]
        snap = (kv_s.clone(), sc_s.clone())
        pooled, ids = [], []
        for j in range(n):
            t = start + j
            if bug == "parallel_verify" and start > 0 and n > 1:
                kv_s, sc_s = snap[0].clone(), snap[1].clone()     # this token alone on the chunk-start state
            kv_s[t % R], sc_s[t % R] = kv_rows[j], sc_rows[j]
            if (t + 1) % m:
                continue
            i = (t + 1) // m - 1
            cur = [p % R for p in range(t + 1 - m, t + 1)]
            if ov:
                c_kv, c_sc = kv_s[cur][:, d:], sc_s[cur][:, d:]
                if i > 0 or bug == "read_unwritten":
                    prev = [p % R for p in range(t + 1 - 2 * m, t + 1 - m)]
                    c_kv = torch.cat((kv_s[prev][:, :d], c_kv))
                    c_sc = torch.cat((sc_s[prev][:, :d], c_sc))
            else:
                c_kv, c_sc = kv_s[cur], sc_s[cur]
            pooled.append((torch.softmax(c_sc, dim=0) * c_kv).sum(0))
            ids.append(i)
        if bug == "parallel_verify" and start > 0 and n > 1:
            kv_s, sc_s = state["kv"], state["score"]
            for j in range(n):
                kv_s[(start + j) % R], sc_s[(start + j) % R] = kv_rows[j], sc_rows[j]
        if bug == "drop_partial":
            end = start + n
            for p in range(end - end % m, end):
                kv_s[p % R], sc_s[p % R] = 0.0, -math.inf
        if not pooled:
            return x.new_zeros(0, d, dtype=dt), state
        ids = torch.tensor(ids)
        rope_ids = ids - ids[0] if bug == "restart_positions" else ids
        return _finish(torch.stack(pooled), rope_ids, norm, ratio=m, eps=eps, inv_freq=inv_freq, rope_dim=rope_dim,
                       numerics=numerics, kind=kind, variant=variant), state

    return stp


class StreamMutant(Subject):
    def __init__(self, bug):
        self.bug, self.name = bug, f"mutant:{bug}"

    # the mutants run in fp32 (the golden's numerics: no FP8 store, whose quantiser refuses NaN, so a NaN read
    # from the poisoned carry reaches the output as a real kernel's would) and are judged at the serving level
    # (no emulation to compare an fp32 stream with); correct, this stream is the reference's (0.02-0.05x)
    def info(self):
        return SubjectInfo(self.name, "deliberately broken streamed compressor", "cpu", "none", False)

    def provides(self):
        return {COMP: Impl(_streamed(step_fn=buggy_step(self.bug)), function=f"mutant.{self.bug}",
                           backend="torch")}


def _chunks(case):
    s, out = 0, []
    for n in case.params["splits"]:
        out.append((s, n))
        s += n
    return out


def _overlap(case):
    return case.params["ratio"] == 4


def exposes(bug, case) -> bool:
    """Whether the row's splits expose ``bug`` (derived from the splits, the ratio and the overlap)."""
    m, T = case.params["ratio"], case.params["tokens"]
    ch = _chunks(case)
    if bug == "drop_partial":          # a chunk boundary inside a window, followed by that window's closure
        return any((s + n) % m and (s + n) // m * m + m <= T for s, n in ch[:-1])
    if bug == "read_unwritten":        # CSA entry 0 exists
        return _overlap(case) and T >= m
    if bug == "restart_positions":     # a chunk whose first closed entry is not entry 0
        return any(any((t + 1) % m == 0 for t in range(s, s + n)) and
                   next(t for t in range(s, s + n) if (t + 1) % m == 0) >= m for s, n in ch)
    if bug == "parallel_verify":       # a window closing in a later multi-token chunk reads an earlier token of it
        for s, n in ch[1:]:
            if n < 2:
                continue
            for t in range(s, s + n):
                if (t + 1) % m:
                    continue
                lo = t + 1 - (2 * m if _overlap(case) and t + 1 > m else m)
                if any(s <= p < t for p in range(lo, t)):
                    return True
        return False
    raise ValueError(bug)


BUGS = ("drop_partial", "read_unwritten", "restart_positions", "parallel_verify")


def _verdicts(subject, cases):
    out = {}
    for c in cases:
        rows = run_numeric(subject, c)
        out[c.id] = (worst_verdict(rows), rows)
    return out


@pytest.mark.parametrize("bug", BUGS)
def test_stream_mutant_fails_exactly_the_rows_that_expose_it(bug):
    res = _verdicts(StreamMutant(bug), FAST)
    want_fail = {c.id for c in FAST if exposes(bug, c)}
    got_fail = {cid for cid, (v, _) in res.items() if v not in ("pass", "degraded")}
    assert want_fail, f"{bug}: no fast row exposes it"
    assert got_fail == want_fail, (f"{bug}: missed {sorted(want_fail - got_fail)}; "
                                   f"false alarms {sorted(got_fail - want_fail)}")
    for cid in want_fail:
        msg = res[cid][1][0].message
        assert COMP in msg and cid in msg, msg
        if bug == "read_unwritten":
            assert "nan" in msg.lower(), msg


def test_k_token_verify_differs_from_k_single_steps_only_for_the_parallel_verify_mutant():
    pairs = {}
    for c in FAST:
        if "verify" in c.tags:
            pairs.setdefault(c.seed, {})["single" if "single-steps" in c.tags else "chunk"] = c
    assert len(pairs) >= 6
    res = _verdicts(StreamMutant("parallel_verify"), [c for p in pairs.values() for c in p.values()])
    for p in pairs.values():
        assert res[p["single"].id][0] == "pass", res[p["single"].id][1][0].message
        assert exposes("parallel_verify", p["chunk"]), p["chunk"].id   # every verify row closes a window
        assert res[p["chunk"].id][0] in ("fail", "catastrophic"), p["chunk"].id


@pytest.mark.parametrize("subject", [ReferenceSubject(), EmulatedSubject("gfx942"), EmulatedSubject("ocp")],
                         ids=lambda s: s.name)
def test_correct_streams_pass_every_fast_row_and_report_their_own_one_shot(subject):
    res = _verdicts(subject, FAST)
    bad = {cid: rows[0].message for cid, (v, rows) in res.items() if v != "pass"}
    assert not bad, bad
    for cid, (_, rows) in res.items():
        extra = rows[0].extra
        assert extra["stream"]["poisoned"] and all("<- NaN" in p for p in extra["stream"]["poisoned"]), cid
        assert "entries~one-shot.worst_over_bound" in rows[0].metrics, cid
        # reported, not asserted: the chunk-wise projection GEMM may round differently from the whole-prompt one
        # (measured: bit-identical on every fast row; 0.00049x of the emulated bound on the 8k full row)
        assert isinstance(extra["stream_vs_one_shot"]["bit_identical"]["entries"], bool), cid


def test_the_mutant_stream_without_a_bug_passes():
    res = _verdicts(StreamMutant(None), FAST)
    assert all(v == "pass" for v, _ in res.values()), {k: r[0].message for k, (v, r) in res.items() if v != "pass"}


def test_poison_fills_floats_with_nan_and_integers_with_minus_one():
    st = {"kv": torch.zeros(2, 3), "slots": torch.zeros(4, dtype=torch.int32), "used": torch.zeros(2, dtype=bool),
          "nested": [torch.zeros(1, dtype=torch.float64)], "cache": torch.zeros(3, dtype=torch.uint8)}
    done = poison_state(st)
    assert torch.isnan(st["kv"]).all() and (st["slots"] == -1).all() and st["used"].all()
    assert torch.isnan(st["nested"][0]).all() and (st["cache"] == 0xFF).all() and len(done) == 5
    assert done[-1].endswith("<- 0xFF")
    with pytest.raises(TypeError, match="stream state holds tensors"):
        poison_state({"bad": object()})


def test_bad_splits_and_a_plain_fn_are_one_line_errors():
    c = FAST[0]
    spec = get(COMP)
    with pytest.raises(ValueError, match="splits sum to 3"):
        run_stream(emulated_stream("ocp"), spec, c.make_inputs(), [1, 2], case_id=c.id)

    class Plain(StreamMutant):
        def provides(self):
            return {COMP: Impl(lambda **kw: None, function="plain", backend="torch")}

    rows = run_numeric(Plain("plain"), c)
    assert rows[0].verdict == "error" and "must be a conformance.subjects.Streamed" in rows[0].message


def test_streamed_called_like_a_one_shot_fn_runs_one_chunk():
    c = next(c for c in FAST if c.params["ratio"] == 128)
    kw = c.make_inputs()
    st = emulated_stream("ocp")
    assert isinstance(st, Streamed)
    one = get("compressor.kv").emulate("ocp")(**kw)
    assert torch.equal(st(**kw), one)


def test_split_tags_name_the_chunks():
    assert split_tag([61, 1, 1, 1]) == "61-1x3" and split_tag([13, 17]) == "13-17"
