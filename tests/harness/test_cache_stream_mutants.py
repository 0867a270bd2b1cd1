"""Streamed paged caches (attn.kv_stream, indexer.k_stream; issue #16): four state bugs are caught on exactly the
rows whose schedule exposes them, each with a diagnosing message, and the correct implementations (reference fp64,
emulated:gfx942 / ocp) pass every fast row. Which rows must fail is derived from each row's inputs (positions,
slot mapping, block tables, reads) by an owner simulation below (which position / entry each pool slot holds),
not listed.

The mutants (fp32 pools, the golden's numerics, judged at the serving level) are the reference step with one bug:
  pad_to_slot0      the writer takes a padding row's slot -1 as slot 0 (an unsigned / clamped index);
  ring_off_by_one   SWA: once the window is full (p >= 128) the reader's window is one position late (positions
                    p - 128 .. p - 1); indexer: the first entry of every block after the first is read through the
                    previous block's table entry (the block index off by one at the block wrap);
  stale_read        the reader runs before the chunk's write (attention before the insert): the chunk's own
                    tokens / entries are read from the pool as it was (the poison, or a recycled block's old data);
  verify_first_pos  a multi-token chunk after the first (the verify path) writes every token at the first token's
                    slot (indexer: and with its position, so only the entries the first token closes are stored).
"""

import pytest
import torch

from conformance.cases import cases_for
from conformance.cases.cache_stream import RATIO, W
from conformance.cases.qkv import HEAD_DIM, _kv_roped
from conformance.checks.numeric import run_numeric, worst_verdict
from conformance.subjects import Impl, Streamed, Subject, SubjectInfo
from conformance.subjects.emulated import EmulatedSubject
from conformance.subjects.reference import ReferenceSubject
from references.components import cache_stream as cs
from references.components.cache_stream import BLOCK as BS

SWA, KS = "attn.kv_stream", "indexer.k_stream"
FAST = {c: [x for x in cases_for(c) if x.tier == "fast"] for c in (SWA, KS)}
BUGS = ("pad_to_slot0", "ring_off_by_one", "stale_read", "verify_first_pos")


def _raw_slot(row, q):
    """The slot a kernel computes, unchecked: a freed (-1) block gives a negative slot, which indexes from the
    pool's end (a garbage read, as an unchecked kernel's out-of-table read is)."""
    return int(row[q // BS]) * BS + q % BS


def _write(pool, values, slots, keep):
    for i in torch.nonzero((slots >= 0) & keep).flatten().tolist():
        pool[int(slots[i])] = values[i].to(pool.dtype)


def _mutant_step(bug, kind, state, values, positions, slot_mapping, block_table, read, start):
    pool = state["pool"]
    snapshot = pool.clone()
    slots, pos = slot_mapping.clone(), positions.clone()
    real = torch.nonzero(slots >= 0).flatten()
    if bug == "pad_to_slot0":
        slots = slots.clamp(min=0)
    if bug == "verify_first_pos" and start > 0 and len(real) > 1:
        slots[real] = int(slots[real[0]])
        if kind == "k":
            pos[real] = int(pos[real[0]])
    _write(pool, values, slots, torch.ones_like(slots, dtype=torch.bool) if kind == "swa" else cs.closes(pos, RATIO))
    src = snapshot if bug == "stale_read" else pool
    out, lens = [], []
    for r in torch.nonzero(read).flatten().tolist():
        p = int(positions[r])
        if kind == "swa":
            idx = list(cs.window(p))
            if bug == "ring_off_by_one" and p >= W:
                idx = [q - 1 for q in idx]
            ss = [_raw_slot(block_table[r], q) for q in idx]
        else:
            ss = [_raw_slot(block_table[r], j - BS if bug == "ring_off_by_one" and j and j % BS == 0 else j)
                  for j in range((p + 1) // RATIO)]
        out.append(src[torch.tensor(ss, dtype=torch.long)])
        lens.append(len(ss))
    name = "window" if kind == "swa" else "k"
    return {name: torch.cat(out) if out else pool.new_zeros(0, values.shape[1]),
            "lens": torch.tensor(lens, dtype=torch.long)}, state


def mutant_stream(bug, kind) -> Streamed:
    if kind == "swa":
        def new(x, *a, blocks, **kw):
            return cs.new_pool(blocks, HEAD_DIM)

        def stp(state, *, start, x, wkv, wkv_scale, kv_norm, positions, slot_mapping, block_table, read, blocks,
                eps, theta, yarn, fnuz_fmax=240.0):
            kv = _kv_roped(x, wkv, wkv_scale, kv_norm, positions, eps=eps, theta=theta, yarn=yarn)
            if bug is None:
                return cs.swa_step(state, kv, positions=positions, slot_mapping=slot_mapping,
                                   block_table=block_table, read=read)
            return _mutant_step(bug, kind, state, kv, positions, slot_mapping, block_table, read, start)
    else:
        def new(k, *a, blocks, **kw):
            return cs.new_pool(blocks, 128)

        def stp(state, *, start, k, positions, slot_mapping, block_table, read, blocks, layout="normal"):
            if bug is None:
                return cs.k_step(state, k, positions=positions, slot_mapping=slot_mapping, block_table=block_table,
                                 read=read, ratio=RATIO)
            return _mutant_step(bug, kind, state, k, positions, slot_mapping, block_table, read, start)
    return Streamed(new, stp)


class CacheMutant(Subject):
    def __init__(self, bug):
        self.bug, self.name = bug, f"mutant:{bug}"

    def info(self):
        return SubjectInfo(self.name, "deliberately broken streamed cache", "cpu", "none", False)

    def provides(self):
        return {SWA: Impl(mutant_stream(self.bug, "swa"), function=f"mutant.swa.{self.bug}", backend="torch"),
                KS: Impl(mutant_stream(self.bug, "k"), function=f"mutant.k.{self.bug}", backend="torch")}


# ------------------------------------------------------------------------------ which rows expose which bug
def _chunks(case):
    out, s = [], 0
    for n in case.params["splits"]:
        out.append((s, s + n))
        s += n
    return out


def exposes(bug, case) -> bool:
    """Owner simulation: the pool slots hold ids (("tok", row) for a token's / entry's value, ("pad", row) for a
    padding row's, None for the poison); the bug's writes and reads applied to ids; the row exposes the bug iff
    some read id differs from the one the correct schedule gives."""
    kw = case.make_inputs()
    kind = "swa" if case.component == SWA else "k"
    pos, slots, bt, read = kw["positions"], kw["slot_mapping"], kw["block_table"], kw["read"]
    row_at = {}                                  # what a correct read returns: the row of that position / entry
    for r in range(len(pos)):
        if int(slots[r]) >= 0 and (kind == "swa" or (int(pos[r]) + 1) % RATIO == 0):
            row_at[int(pos[r]) if kind == "swa" else int(pos[r]) // RATIO] = r
    held: dict[int, tuple] = {}
    for start, end in _chunks(case):
        before = dict(held)
        real = [r for r in range(start, end) if int(slots[r]) >= 0]
        for r in range(start, end):
            s, p = int(slots[r]), int(pos[r])
            if bug == "pad_to_slot0" and s < 0:
                s = 0
            if bug == "verify_first_pos" and start > 0 and len(real) > 1 and s >= 0 and int(slots[r]) >= 0:
                s = int(slots[real[0]])
                p = int(pos[real[0]]) if kind == "k" else p
            if s < 0 or (kind == "k" and (p + 1) % RATIO):
                continue
            held[s] = ("pad", r) if int(slots[r]) < 0 else ("tok", r)
        src = before if bug == "stale_read" else held
        for r in range(start, end):
            if not bool(read[r]):
                continue
            p = int(pos[r])
            want = list(cs.window(p)) if kind == "swa" else list(range((p + 1) // RATIO))
            for q in want:
                qq = q - 1 if kind == "swa" and bug == "ring_off_by_one" and p >= W else q
                if kind == "k" and bug == "ring_off_by_one" and q and q % BS == 0:
                    qq = q - BS
                s = _raw_slot(bt[r], qq)
                if src.get(s) != ("tok", row_at[q]):
                    return True
    return False


def _verdicts(subject, cases):
    return {c.id: (worst_verdict(rows := run_numeric(subject, c)), rows) for c in cases}


@pytest.mark.parametrize("comp", [SWA, KS])
@pytest.mark.parametrize("bug", BUGS)
def test_cache_mutant_fails_exactly_the_rows_that_expose_it(bug, comp):
    cases = FAST[comp]
    res = _verdicts(CacheMutant(bug), cases)
    want_fail = {c.id for c in cases if exposes(bug, c)}
    got_fail = {cid for cid, (v, _) in res.items() if v not in ("pass", "degraded")}
    assert want_fail, f"{bug}: no fast {comp} row exposes it"
    assert got_fail == want_fail, (f"{bug}: missed {sorted(want_fail - got_fail)}; "
                                   f"false alarms {sorted(got_fail - want_fail)}")
    expect = {"pad_to_slot0": "padding row", "ring_off_by_one": "off by", "stale_read": "",
              "verify_first_pos": ""}[bug]
    for cid in want_fail:
        msg = res[cid][1][0].message
        assert comp in msg and cid in msg and "entries out of bound" in msg, msg
        assert expect in msg, msg
        if bug == "stale_read":
            assert "NaN" in msg or "stale slot" in msg or "off by" in msg, msg


@pytest.mark.parametrize("comp", [SWA, KS])
def test_verify_chunk_differs_from_single_steps_only_for_the_verify_mutant(comp):
    pairs = {}
    for c in FAST[comp]:
        if "verify" in c.tags:
            pairs.setdefault(c.seed, {})["single" if "single-steps" in c.tags else "chunk"] = c
    assert len(pairs) >= 4
    res = _verdicts(CacheMutant("verify_first_pos"), [c for p in pairs.values() for c in p.values()])
    for p in pairs.values():
        assert res[p["single"].id][0] == "pass", res[p["single"].id][1][0].message
        assert res[p["chunk"].id][0] in ("fail", "catastrophic"), p["chunk"].id


@pytest.mark.parametrize("comp", [SWA, KS])
@pytest.mark.parametrize("subject", [ReferenceSubject(), EmulatedSubject("gfx942"), EmulatedSubject("ocp"),
                                     CacheMutant(None)], ids=lambda s: s.name)
def test_correct_streams_pass_every_fast_row(subject, comp):
    res = _verdicts(subject, FAST[comp])
    bad = {cid: rows[0].message for cid, (v, rows) in res.items() if v != "pass"}
    assert not bad, bad
    for cid, (_, rows) in res.items():
        poisoned = rows[0].extra["stream"]["poisoned"]
        assert poisoned and all(p.endswith(("<- NaN", "<- 0xFF")) for p in poisoned), cid
        assert "no one-shot component" in rows[0].extra["stream_vs_one_shot"], cid


def test_schedules_recycle_blocks_and_keep_slot_zero_live():
    c = next(c for c in FAST[SWA] if c.params["token_splits"] == (255, 1, 1, 1, 2))
    kw = c.make_inputs()
    bt = kw["block_table"]
    first, last = bt[0].tolist(), bt[-1].tolist()
    assert first[0] == 0 and last[0] == -1, (first, last)                # block 0 freed once out of the window
    owners = {}                                                          # physical block -> logical blocks
    for row in bt.tolist():
        for j, b in enumerate(row):
            if b >= 0:
                owners.setdefault(b, set()).add(j)
    assert any(len(v) > 1 for v in owners.values()), owners            # a freed block reused (the ring)
    assert (kw["slot_mapping"] == -1).sum() == 4                         # one padding row per later chunk
    assert sorted(set(kw["slot_mapping"][kw["slot_mapping"] >= 0].tolist())).count(0) == 1
