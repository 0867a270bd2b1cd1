"""The gfx950 MXFP4 indexer-K page (issue 18; ``cache_layouts.Mxfp4ShuffledLayout``, vLLM's
``RocmPagedMxfp4CacheLayout``): hand-computed offsets, every byte of a page owned once, the block-flat layout as its
(1, 64, 1) case, and a round trip exhaustive over the 16 e2m1 codes and UE8M0 scale bytes 7 .. 247."""

import numpy as np
import pytest
import torch

from references.formats.blockscale import pack_nibbles
from references.formats.cache_layouts import (
    IndexerKLayout,
    Mxfp4ShuffledLayout,
    read_indexer_k_mxfp4_shuffled,
    read_indexer_k_mxfp4_shuffled_tokens,
    read_indexer_k_tokens,
    write_indexer_k,
    write_indexer_k_mxfp4_shuffled,
)

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
PARAMS = [(4, 2, 16, 2), (64, 16, 16, 4), (64, 8, 32, 1), (64, 64, 8, 2), (32, 4, 64, 4), (8, 1, 64, 1)]


def test_hand_computed_offsets():
    """bs 4, runs of 2 entries, 16-byte chunks, 2 scale lanes. Entry 3 = run 1, position 1: value byte 20 is chunk 1,
    byte 4 -> 1*2*64 + 1*2*16 + 1*16 + 4 = 180; its scale 3 is lane 1, q 1 -> 4*64 + 1*2*4 + (1*2 + 1)*2 + 1 = 271.
    Entry 1's value byte 0 follows entry 0's first chunk (16); entry 0's byte 16 starts chunk 1 after both entries'
    chunk 0 (32); entry 1's scale 0 is lane 0, q 0 -> 256 + (0 + 1)*2 = 258."""
    lay = Mxfp4ShuffledLayout(4, 2, 16, 2)
    assert lay.value_cols(3)[20] == 180 and lay.scale_cols(3)[3] == 271
    assert lay.value_cols(1)[0] == 16 and lay.value_cols(0)[16] == 32 and lay.scale_cols(1)[0] == 258
    assert lay.block_stride == 576          # 4 * 68 = 272 rounded up to 576


@pytest.mark.parametrize("p", PARAMS, ids=lambda p: "bs%d-n%d-d%d-L%d" % p)
def test_every_page_byte_is_owned_once(p):
    lay = Mxfp4ShuffledLayout(*p)
    cols = np.concatenate([np.concatenate([lay.value_cols(s), lay.scale_cols(s)]) for s in range(lay.block_size)])
    assert np.array_equal(np.sort(cols), np.arange(lay.block_size * 68))


def test_one_entry_runs_of_64_bytes_and_one_lane_are_the_block_flat_layout():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(10, 128, generator=g)
    slots = torch.tensor([3, 70, 5, -1, 64, 0, 127, 9, 100, 1])
    a = torch.zeros(2, 8 * 576, dtype=torch.uint8)
    b = torch.zeros_like(a)
    write_indexer_k(a, slots, k, layout=IndexerKLayout(64, value_format="mxfp4"))
    write_indexer_k_mxfp4_shuffled(b, slots, k, layout=Mxfp4ShuffledLayout(64, 1, 64, 1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("p", PARAMS, ids=lambda p: "bs%d-n%d-d%d-L%d" % p)
def test_round_trip_exhaustive_over_codes_and_scale_bytes(p):
    """Key i, block j holds the 16 e2m1 values twice times 2^e (amax 6 * 2^e, so its scale byte is 127 + e), e over
    -120 .. 120: every code meets every scale byte 7 .. 247. Written at scattered slots with padding rows and read
    back: the codes, the scale bytes and the values exactly; bytes of unwritten entries untouched."""
    lay = Mxfp4ShuffledLayout(*p)
    es = np.arange(-120, 121)
    n_keys = -(-len(es) // 4)
    e = np.resize(es, n_keys * 4).reshape(n_keys, 4)
    base = np.array(E2M1 * 2)
    k = torch.from_numpy((base[None, None, :] * np.exp2(e)[:, :, None]).reshape(n_keys, 128).astype(np.float32))
    blocks = -(-(n_keys + 7) // lay.block_size) + 1
    cache = torch.randint(0, 256, (blocks, lay.block_stride), generator=torch.Generator().manual_seed(1),
                          dtype=torch.int32).to(torch.uint8)
    before = cache.clone()
    slots = torch.randperm(blocks * lay.block_size, generator=torch.Generator().manual_seed(2))[:n_keys]
    mapping = torch.cat([slots, torch.full((5,), -1)])
    write_indexer_k_mxfp4_shuffled(cache, mapping, torch.cat([k, torch.randn(5, 128)]), layout=lay)
    tok = read_indexer_k_mxfp4_shuffled_tokens(cache, slots, layout=lay)
    want_codes = pack_nibbles(np.tile(np.arange(32) % 16, (n_keys, 4)))
    assert np.array_equal(tok.values.numpy(), want_codes)
    assert np.array_equal(tok.scales.numpy(), (127 + e).astype(np.uint8))
    got = read_indexer_k_mxfp4_shuffled(cache, slots, layout=lay)
    assert torch.equal(got, k) and torch.equal(torch.signbit(got), torch.signbit(k))   # -0 kept
    owned = torch.zeros_like(cache, dtype=torch.bool)
    for s in slots.tolist():
        b, q = divmod(s, lay.block_size)
        owned[b, torch.from_numpy(lay.value_cols(q))] = True
        owned[b, torch.from_numpy(lay.scale_cols(q))] = True
    assert torch.equal(cache[~owned], before[~owned])


def test_a_reader_of_the_block_flat_order_gets_other_bytes():
    """The shuffled page read block-flat (the wrong reader) returns different keys: the layouts are not
    interchangeable once runs hold more than one entry."""
    lay = Mxfp4ShuffledLayout(64, 16, 16, 4)
    k = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    cache = torch.zeros(1, lay.block_stride, dtype=torch.uint8)
    write_indexer_k_mxfp4_shuffled(cache, torch.arange(64), k, layout=lay)
    flat = read_indexer_k_tokens(cache, list(range(64)), layout=IndexerKLayout(64, value_format="mxfp4"))
    good = read_indexer_k_mxfp4_shuffled_tokens(cache, list(range(64)), layout=lay)
    assert not torch.equal(flat.values, good.values) and not torch.equal(flat.scales, good.scales)


@pytest.mark.parametrize("p,msg", [((64, 24, 16, 4), "n_per_tile 24 must divide block_size 64"),
                                   ((64, 16, 24, 4), "d_per_tile 24"), ((64, 16, 16, 3), "scale_lanes 3"),
                                   ((64, 0, 16, 4), "n_per_tile")])
def test_inexpressible_tile_parameters_refused_in_one_line(p, msg):
    with pytest.raises(ValueError, match=msg) as ei:
        Mxfp4ShuffledLayout(*p)
    assert "\n" not in str(ei.value)


def test_reading_a_padding_slot_is_refused():
    lay = Mxfp4ShuffledLayout(4, 2, 16, 2)
    with pytest.raises(IndexError, match=r"slot -1 \(token 1\) out of range"):
        read_indexer_k_mxfp4_shuffled(torch.zeros(1, lay.block_stride, dtype=torch.uint8), [0, -1], layout=lay)
