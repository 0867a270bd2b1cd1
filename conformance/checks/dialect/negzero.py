"""The negative-zero probe of one FP8 edge: does a value that the writer rounds to -0 reach the reader as NaN?

OCP e4m3 (float8_e4m3fn) writes a tiny negative (below half the smallest subnormal of its block's scale) as
byte 0x80, -0; fnuz (float8_e4m3fnuz) has no -0 and reads 0x80 as NaN. A writer in OCP and a reader in fnuz
(the gfx942 indexer K cache of vLLM 0.32) thus turn one tiny negative into a NaN in everything the reader
computes from that element (for the indexer: every logit of that key, since q . k sums over all dims).

The probe feeds the producer one block with a large value (setting the block scale) and tiny negatives, counts
the 0x80 codes it writes, and where the consumer's output is NaN: at those codes, elsewhere, or nowhere."""

from __future__ import annotations

import torch

BIG, TINY, N_TINY = 100.0, 1e-7, 16


def probe_input(block: tuple[int, int]) -> torch.Tensor:
    r, c = block
    g = torch.Generator().manual_seed(80)
    x = torch.rand(r, c, generator=g) * BIG / 4 + 1.0       # ordinary positives
    x[:, 0] = BIG                                           # the block's amax
    x[:, 1:1 + N_TINY] = -TINY                              # rounds to -0 at scale BIG / fp8_max
    return x


def negative_zero_probe(producer, consumer) -> dict:
    """Run one block through ``producer.fn`` then ``consumer.fn`` (dialect-map probe objects of one edge)."""
    x = probe_input(producer.block)
    codes, scales = producer.fn(x)
    codes = codes.to(torch.uint8)
    neg0 = codes == 0x80
    read = consumer.fn(codes, scales).float()
    nan = torch.isnan(read)
    if not neg0.any():
        verdict = "writer emits no 0x80 (tiny negatives not written as -0)"
    elif (nan & neg0).any():
        verdict = "NaN reaches the reader"
    elif nan.any():
        verdict = "NaN elsewhere"
    else:
        verdict = "-0 read as zero"
    return {"edge": producer.edge, "writer": producer.function, "reader": consumer.function,
            "tiny_negatives": N_TINY * x.shape[0], "codes_0x80": int(neg0.sum()), "nan_read": int(nan.sum()),
            "nan_at_0x80": int((nan & neg0).sum()), "nan_elsewhere": int((nan & ~neg0).sum()), "verdict": verdict}
