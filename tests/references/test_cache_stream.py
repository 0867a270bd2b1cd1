"""references.components.cache_stream: the incremental paged-cache goldens equal the one-shot reads for any
chunking, whatever the pool held before, and a small hand-computed case."""

import pytest
import torch

from conformance.cases.cache_stream import schedule
from references.components import cache_stream as cs


def _run(step, values, sch, read, fill, **kw):
    state = cs.new_pool(sch["blocks"], values.shape[1], dtype=torch.float64)
    state["pool"].fill_(fill)
    outs, s = [], 0
    for n in sch["row_splits"]:
        sl = slice(s, s + n)
        o, state = step(state, values[sl], positions=sch["positions"][sl], slot_mapping=sch["slot_mapping"][sl],
                        block_table=sch["block_table"][sl], read=read[sl], **kw)
        outs.append(o)
        s += n
    name = "window" if "window" in outs[0] else "k"
    return torch.cat([o[name] for o in outs]), torch.cat([o["lens"] for o in outs])


@pytest.mark.parametrize("splits", [[127, 1, 1, 131], [256, 4], [1] * 40 + [3, 217], [129, 126, 5]])
@pytest.mark.parametrize("fill", [float("nan"), 0.0, 1e30])
def test_swa_any_chunking_equals_the_one_shot_windows_whatever_the_pool_held(splits, fill):
    g = torch.Generator().manual_seed(1)
    sch = schedule(splits, pad=2, kind="swa", g=g)
    R = len(sch["positions"])
    kv = torch.randn(R, 16, generator=g, dtype=torch.float64)
    read = sch["slot_mapping"] >= 0
    got, lens = _run(cs.swa_step, kv, sch, read, fill)
    want = cs.swa_windows(kv, positions=sch["positions"], slot_mapping=sch["slot_mapping"], read=read)
    assert torch.equal(got, want["window"]) and torch.equal(lens, want["lens"])   # a copy: exact in fp64
    assert lens.max() == cs.WINDOW and lens[0] == 1


@pytest.mark.parametrize("splits", [[1] * 30, [5, 6, 7, 46], [255, 1, 1, 1, 2], [61, 3]])
@pytest.mark.parametrize("fill", [float("nan"), -7.0])
def test_indexer_any_chunking_equals_the_one_shot_entries(splits, fill):
    g = torch.Generator().manual_seed(2)
    sch = schedule(splits, pad=1, kind="k", ratio=4, g=g)
    R = len(sch["positions"])
    k = torch.randn(R, 8, generator=g, dtype=torch.float64)
    read = sch["slot_mapping"] >= 0
    got, lens = _run(cs.k_step, k, sch, read, fill, ratio=4)
    want = cs.k_entries(k, positions=sch["positions"], slot_mapping=sch["slot_mapping"], read=read, ratio=4)
    assert torch.equal(got, want["k"]) and torch.equal(lens, want["lens"])
    assert lens.tolist() == [(int(p) + 1) // 4 for p in sch["positions"][read]]


def test_swa_hand_case_window_of_three_over_recycled_blocks_of_two():
    # window 3, blocks of 2 slots, 2 physical blocks: positions 0, 1 in block 0; 2, 3 in block 1; position 4 takes
    # block 0 again (positions 0, 1 left every window: position 4 reads 2, 3, 4). A padding row (-1) is skipped.
    state = cs.new_pool(2, 1, block_size=2, dtype=torch.float64)
    state["pool"].fill_(float("nan"))
    v = torch.tensor([[10.0], [11.0], [12.0], [13.0]], dtype=torch.float64)
    o, state = cs.swa_step(state, v, positions=torch.tensor([0, 1, 2, 3]), slot_mapping=torch.tensor([0, 1, 2, 3]),
                           block_table=torch.tensor([0, 1]), read=torch.tensor([False, False, True, True]),
                           window_size=3, block_size=2)
    assert o["window"].flatten().tolist() == [10.0, 11.0, 12.0, 11.0, 12.0, 13.0] and o["lens"].tolist() == [3, 3]
    o, state = cs.swa_step(state, torch.tensor([[14.0], [99.0]], dtype=torch.float64), positions=torch.tensor([4, 0]),
                           slot_mapping=torch.tensor([0, -1]), block_table=torch.tensor([[-1, 1, 0]] * 2),
                           read=torch.tensor([True, False]), window_size=3, block_size=2)
    assert o["window"].flatten().tolist() == [12.0, 13.0, 14.0]
    assert state["pool"].flatten().tolist() == [14.0, 11.0, 12.0, 13.0]     # slot 0 rewritten by position 4 only


def test_indexer_hand_case_entries_close_every_fourth_token():
    state = cs.new_pool(1, 1, dtype=torch.float64)
    state["pool"].fill_(float("nan"))
    k = torch.arange(8, dtype=torch.float64)[:, None] + 100        # row t's key = 100 + t
    o, state = cs.k_step(state, k, positions=torch.arange(8), slot_mapping=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
                         block_table=torch.tensor([0]), read=torch.tensor([False, False, True, True, False, False,
                                                                            False, True]), ratio=4)
    # position 2 sees no entry, 3 sees entry 0 (closed by token 3: key 103), 7 sees 103 and 107
    assert o["lens"].tolist() == [0, 1, 2] and o["k"].flatten().tolist() == [103.0, 103.0, 107.0]


def test_bad_inputs_are_one_line_errors():
    st = cs.new_pool(1, 2)
    v = torch.zeros(2, 2)
    with pytest.raises(IndexError, match="neither a slot nor the padding value"):
        cs.swa_step(st, v, positions=torch.tensor([0, 1]), slot_mapping=torch.tensor([0, -2]),
                    block_table=torch.tensor([0]), read=torch.tensor([False, False]))
    with pytest.raises(IndexError, match="has no physical block"):
        cs.swa_step(st, v, positions=torch.tensor([0, 64]), slot_mapping=torch.tensor([0, 1]),
                    block_table=torch.tensor([0, -1]), read=torch.tensor([False, True]))
    with pytest.raises(ValueError, match="a padding row"):
        cs.k_step(st, v, positions=torch.tensor([0, 3]), slot_mapping=torch.tensor([0, -1]),
                  block_table=torch.tensor([0]), read=torch.tensor([False, True]), ratio=4)
    with pytest.raises(ValueError, match="read: expected a bool"):
        cs.swa_windows(v, positions=torch.tensor([0, 1]), slot_mapping=torch.tensor([0, 1]), read=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="blocks: expected a positive int"):
        cs.new_pool(0, 2)
