"""fp8_ds_mla and indexer-K cache codecs (spec 3.6, 3.7): byte positions by hand, round trips, refusals.

The hand-built tests spell every byte position as a literal number computed here in the docstrings, so
a wrong offset formula in cache_layouts.py cannot agree with itself.
"""

import numpy as np
import pytest
import torch

from references.formats.blockscale import BlockFP8, fake_quant_fp8, fake_quant_mxfp4
from references.formats.cache_layouts import (
    DsMlaLayout,
    IndexerKLayout,
    read_ds_mla,
    read_ds_mla_tokens,
    read_indexer_k,
    read_indexer_k_tokens,
    write_ds_mla,
    write_indexer_k,
)
from references.formats.minifloat import get_format
from references.formats.verify import check_values, report


def test_layout_strides():
    assert DsMlaLayout(64).block_stride == 37440  # 64 * 584 = 37376 -> 65 * 576
    assert DsMlaLayout(4).block_stride == 2880  # 4 * 584 = 2336 -> 5 * 576
    assert DsMlaLayout(4, alignment=1).block_stride == 2336
    assert DsMlaLayout(64).scale_offset(3) == 64 * 576 + 24
    assert IndexerKLayout(64).block_stride == 8640  # 64 * 132 = 8448 -> 15 * 576
    assert IndexerKLayout(64, value_format="mxfp4").block_stride == 4608  # 64 * 68 = 4352 -> 8 * 576
    assert IndexerKLayout(4).block_stride == 576  # 528 -> 576


# One token in slot 6 of a block_size-4 cache: block 1 (bytes 2880..5759 of the flat cache), position 2.
#   nope  at 2880 + 2*576        = 4032 .. 4479
#   rope  at 4032 + 448          = 4480 .. 4607
#   scale at 2880 + 4*576 + 2*8  = 5200 .. 5207
# Nope block j (j = 0..6): element 0 = 448 * 2**(j-3), element 1 = -2**(j-3), the rest 0.
#   OCP,  fmax 448: scale 2**(j-3) -> byte 124+j; codes 448 -> 0x7E, -1.0 -> 0xB8
#   fnuz, fmax 240: amax/240 = 1.87 * 2**(j-3) -> scale 2**(j-2), byte 125+j; 224 -> 0x7E, -0.5 -> 0xB8
# Rope: [0] = 1.0 (bf16 0x3F80 -> bytes 80 3F), [1] = -2.0 (0xC000 -> 00 C0),
#       [63] = 1 + 2**-7 (0x3F81 -> 81 3F).
HAND_DS_MLA = [("ocp", 448.0, 124), ("fnuz", 240.0, 125)]


def hand_built_ds_mla(dialect, fmax, byte0):
    """Write the token above; return (cache, list of 'byte N: got 0x.., want 0x..' for every wrong byte)."""
    kv = torch.zeros(1, 512)
    for j in range(7):
        kv[0, 64 * j] = 448.0 * 2.0 ** (j - 3)
        kv[0, 64 * j + 1] = -(2.0 ** (j - 3))
    kv[0, 448], kv[0, 449], kv[0, 511] = 1.0, -2.0, 1.0 + 2**-7
    cache = torch.zeros(3, 2880, dtype=torch.uint8)
    write_ds_mla(cache, torch.tensor([6]), kv, dialect, fmax, layout=DsMlaLayout(4))

    want = np.zeros(3 * 2880, np.uint8)
    for j in range(7):
        want[4032 + 64 * j] = 0x7E
        want[4032 + 64 * j + 1] = 0xB8
        want[5200 + j] = byte0 + j
    want[4480:4484] = [0x80, 0x3F, 0x00, 0xC0]
    want[4606:4608] = [0x81, 0x3F]
    got = cache.numpy().ravel()
    return cache, [f"byte {i}: got 0x{got[i]:02X}, want 0x{want[i]:02X}" for i in np.flatnonzero(got != want)]


@pytest.mark.parametrize("dialect,fmax,byte0", HAND_DS_MLA, ids=[d for d, _, _ in HAND_DS_MLA])
def test_ds_mla_hand_built_token(dialect, fmax, byte0):
    cache, bad = hand_built_ds_mla(dialect, fmax, byte0)
    assert not bad, "\n".join(bad[:10])

    back = read_ds_mla(cache, [6], dialect, layout=DsMlaLayout(4))
    assert back[0, :2].tolist() == [56.0, -0.125] and back[0, 384].item() == 448.0 * 8
    assert back[0, [448, 449, 511]].tolist() == [1.0, -2.0, 1.0 + 2**-7]


@pytest.mark.parametrize("dialect,fmax", [("ocp", 448.0), ("ocp", 240.0), ("fnuz", 240.0), ("fnuz", 224.0)])
def test_ds_mla_round_trip(dialect, fmax):
    g = torch.Generator().manual_seed(3)
    n, bs, nb = 37, 16, 5
    kv = torch.randn(n, 512, generator=g) * torch.exp2(torch.randint(-10, 10, (n, 1), generator=g).float())
    kv[0] = 0.0  # amax floor
    slots = torch.randperm(nb * bs, generator=g)[:n]
    slots_padded = torch.cat([slots[:10], torch.tensor([-1]), slots[10:]])
    kv_padded = torch.cat([kv[:10], torch.full((1, 512), 1e6), kv[10:]])  # the -1 row must be skipped
    layout = DsMlaLayout(bs)
    cache = torch.zeros(nb, layout.block_stride, dtype=torch.uint8)
    write_ds_mla(cache, slots_padded, kv_padded, dialect, fmax, layout=layout)

    want = torch.cat(
        [
            fake_quant_fp8(kv[:, :448], BlockFP8.of(dialect, (1, 64), fmax=fmax)),
            kv[:, 448:].to(torch.bfloat16).float(),
        ],
        dim=1,
    )
    mism = check_values(read_ds_mla(cache, slots, dialect, layout=layout).numpy(), want.numpy(), check="read")
    assert not mism, report(f"ds_mla round trip {dialect} fmax={fmax}", mism, want.numel())

    # bytes of slots never written stay zero, pad bytes are zero
    tok = read_ds_mla_tokens(cache, slots, layout=layout)
    assert (tok.scales[:, 7] == 0).all()
    unused = sorted(set(range(nb * bs)) - set(slots.tolist()))
    empty = read_ds_mla_tokens(cache, unused, layout=layout)
    assert not empty.nope.any() and not empty.scales.any() and not empty.rope.view(torch.int16).any()
    assert not cache[:, bs * 584 :].any()  # alignment padding at the end of each block untouched


# Indexer K, block_size 4 (stride 576), slot 5 -> block 1 (flat bytes 576..1151), position 1.
#   fp8:   values at 576 + 128 = 704 .. 831; fp32 scale at 576 + 4*128 + 4 = 1092 .. 1095
#          k[0] = 1792, k[1] = -4.  OCP/448: scale 4.0 (0x40800000 -> 00 00 80 40); 448 -> 0x7E, -1 -> 0xB8
#                                   fnuz/240: scale 8.0 (0x41000000 -> 00 00 00 41); 224 -> 0x7E, -0.5 -> 0xB8
#   mxfp4: values at 576 + 64 = 640 .. 703; UE8M0 bytes at 576 + 4*64 + 4 = 836 .. 839
#          k[0] = 1, k[1] = 2: scale 0.5 (byte 126), nibbles 2.0 -> 0x4 (low), 4.0 -> 0x6 (high): 0x64;
#          blocks 1..3 all zero: amax floor 6 * 2**-126 -> scale 2**-126, byte 1
HAND_INDEXER = [("ocp", 448.0, [0x00, 0x00, 0x80, 0x40]), ("fnuz", 240.0, [0x00, 0x00, 0x00, 0x41])]


@pytest.mark.parametrize("dialect,fmax,scale_bytes", HAND_INDEXER, ids=[d for d, _, _ in HAND_INDEXER])
def test_indexer_fp8_hand_built(dialect, fmax, scale_bytes):
    k = torch.zeros(1, 128)
    k[0, 0], k[0, 1] = 1792.0, -4.0
    cache = torch.zeros(2, 576, dtype=torch.uint8)
    write_indexer_k(cache, [5], k, dialect, fmax, layout=IndexerKLayout(4))
    want = np.zeros(2 * 576, np.uint8)
    want[704:706] = [0x7E, 0xB8]
    want[1092:1096] = scale_bytes
    got = cache.numpy().ravel()
    assert (got == want).all(), [
        (int(i), hex(got[i]), hex(want[i])) for i in np.flatnonzero(got != want)[:10]
    ]
    assert read_indexer_k(cache, [5], dialect, layout=IndexerKLayout(4))[0, :2].tolist() == [1792.0, -4.0]


def test_indexer_mxfp4_hand_built():
    k = torch.zeros(1, 128)
    k[0, 0], k[0, 1] = 1.0, 2.0
    layout = IndexerKLayout(4, value_format="mxfp4")
    cache = torch.zeros(2, 576, dtype=torch.uint8)
    write_indexer_k(cache, [5], k, layout=layout)
    want = np.zeros(2 * 576, np.uint8)
    want[640] = 0x64
    want[836:840] = [126, 1, 1, 1]
    got = cache.numpy().ravel()
    assert (got == want).all(), [
        (int(i), hex(got[i]), hex(want[i])) for i in np.flatnonzero(got != want)[:10]
    ]
    assert read_indexer_k(cache, [5], layout=layout)[0, :2].tolist() == [1.0, 2.0]


@pytest.mark.parametrize(
    "value_format,dialect,fmax",
    [("fp8", "ocp", 448.0), ("fp8", "fnuz", 240.0), ("fp8", "fnuz", 224.0), ("mxfp4", "ocp", None)],
)
def test_indexer_round_trip(value_format, dialect, fmax):
    g = torch.Generator().manual_seed(4)
    n, bs, nb = 50, 8, 9
    k = torch.randn(n, 128, generator=g) * torch.exp2(torch.randint(-8, 8, (n, 1), generator=g).float())
    slots = torch.randperm(nb * bs, generator=g)[:n]
    layout = IndexerKLayout(bs, value_format=value_format)
    cache = torch.zeros(nb, layout.block_stride, dtype=torch.uint8)
    write_indexer_k(cache, slots, k, dialect, fmax, layout=layout)
    if value_format == "fp8":
        want = fake_quant_fp8(k, BlockFP8.of(dialect, (1, 128), fmax=fmax))
        scales = read_indexer_k_tokens(cache, slots, layout=layout).scales.numpy().view("<f4")
        assert (np.frexp(scales)[0] == 0.5).all()  # fp32 scales are powers of two
    else:
        want = fake_quant_mxfp4(k)
    mism = check_values(
        read_indexer_k(cache, slots, dialect, layout=layout).numpy(), want.numpy(), check="read"
    )
    assert not mism, report(f"indexer {value_format} round trip", mism, want.numel())
    assert not cache[:, bs * (layout.value_bytes + 4) :].any()


# -- refusals: (what, callable, exception, message pattern) rows --------------------------------------
L = DsMlaLayout(4)
C = torch.zeros(2, 2880, dtype=torch.uint8)
KV = torch.zeros(2, 512)
IL = IndexerKLayout(4)
IC = torch.zeros(2, 576, dtype=torch.uint8)
REFUSALS = [
    ("slot past the end", lambda: write_ds_mla(C.clone(), [0, 8], KV, layout=L), IndexError, "slot 8"),
    ("slot below -1", lambda: write_ds_mla(C.clone(), [0, -2], KV, layout=L), IndexError, "slot -2"),
    ("read of slot -1", lambda: read_ds_mla(C, [-1], layout=L), IndexError, "slot -1"),
    ("read past the end", lambda: read_ds_mla(C, [8], layout=L), IndexError, "out of range"),
    ("duplicate slot", lambda: write_ds_mla(C.clone(), [3, 3], KV, layout=L), ValueError, "more than once"),
    (
        "float slots",
        lambda: write_ds_mla(C.clone(), torch.tensor([0.0, 1.0]), KV, layout=L),
        TypeError,
        "integers",
    ),
    ("slot count", lambda: write_ds_mla(C.clone(), [0, 1, 2], KV, layout=L), ValueError, r"shape \[2\]"),
    ("cache dtype", lambda: write_ds_mla(C.to(torch.int8), [0, 1], KV, layout=L), TypeError, "uint8"),
    (
        "cache width",
        lambda: write_ds_mla(torch.zeros(2, 2336, dtype=torch.uint8), [0, 1], KV, layout=L),
        ValueError,
        "2880",
    ),
    ("kv width", lambda: write_ds_mla(C.clone(), [0, 1], torch.zeros(2, 511), layout=L), ValueError, "512"),
    (
        "kv dtype",
        lambda: write_ds_mla(C.clone(), [0, 1], KV.to(torch.int32), layout=L),
        TypeError,
        "floating",
    ),
    (
        "kv not a tensor",
        lambda: write_ds_mla(C.clone(), [0, 1], KV.numpy(), layout=L),
        TypeError,
        "torch.Tensor",
    ),
    (
        "kv NaN",
        lambda: write_ds_mla(C.clone(), [0, 1], torch.full((2, 512), float("nan")), layout=L),
        ValueError,
        "NaN",
    ),
    (
        "e5m2 dialect",
        lambda: write_ds_mla(C.clone(), [0, 1], KV, "float8_e5m2", layout=L),
        ValueError,
        "e4m3",
    ),
    (
        "fnuz fmax 448",
        lambda: write_ds_mla(C.clone(), [0, 1], KV, "fnuz", 448.0, layout=L),
        ValueError,
        "fmax",
    ),
    ("k width", lambda: write_indexer_k(IC.clone(), [0], torch.zeros(1, 64), layout=IL), ValueError, "128"),
    (
        "indexer slot",
        lambda: write_indexer_k(IC.clone(), [8], torch.zeros(1, 128), layout=IL),
        IndexError,
        "slot 8",
    ),
    ("indexer cache width", lambda: read_indexer_k(IC, [0], layout=IndexerKLayout(64)), ValueError, "8640"),
    ("value format", lambda: IndexerKLayout(4, value_format="fp4"), ValueError, "value_format"),
    ("block size", lambda: DsMlaLayout(0), ValueError, "block_size"),
]


@pytest.mark.parametrize("what,fn,exc,pattern", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals(what, fn, exc, pattern):
    with pytest.raises(exc, match=pattern):
        fn()


def test_failed_write_leaves_cache_untouched():
    cache = C.clone()
    with pytest.raises(IndexError):
        write_ds_mla(cache, [0, 99], torch.ones(2, 512), layout=L)
    assert not cache.any()


def test_dialects_share_bytes_but_not_values():
    """The same cache bytes read as fnuz give exactly half the OCP nope values (spec 4.1); rope is bf16."""
    kv = torch.randn(4, 512, generator=torch.Generator().manual_seed(5))
    cache = torch.zeros(1, 2880, dtype=torch.uint8)
    write_ds_mla(cache, [0, 1, 2, 3], kv, "ocp", layout=L)
    ocp = read_ds_mla(cache, [0, 1, 2, 3], "ocp", layout=L)
    fnuz = read_ds_mla(cache, [0, 1, 2, 3], get_format("fnuz"), layout=L)
    assert torch.equal(fnuz[:, :448] * 2, ocp[:, :448]) and torch.equal(fnuz[:, 448:], ocp[:, 448:])
