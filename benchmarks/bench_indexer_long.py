"""Long-context benchmark of the golden lightning indexer: chunked scores + causal top-k.

Not a test (never collected by pytest). At a 131072-token context a CSA layer holds N = 32768 compressed
indexer keys; a full golden prefill would score 131072 x 32768 x 64 heads x 128 dims (~7e16 flop), far too
much for a CPU, so this times a block of queries at the END of the context (the most expensive rows,
every key visible) and extrapolates the full-prefill cost. It reports wall time and peak memory:

  * peak RSS from ``resource.getrusage`` (torch allocates outside Python's allocator, so tracemalloc only
    sees the Python-level objects; its figure is printed too), as the increase over the peak after the
    inputs were allocated;
  * the working set the chunking promises: chunk * (Hi * key_chunk + N) floats.

    python benchmarks/bench_indexer_long.py --context 131072 --queries 64 --chunk 16
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from references.components.indexer import indexer_scores, indexer_topk, indexer_topk_chunked  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--queries", type=int, default=64, help="query rows at the end of the context")
    ap.add_argument("--ratio", type=int, default=4)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--topk", type=int, default=512, help="512 Flash, 1024 Pro")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--key-chunk", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave torch's default)")
    ap.add_argument("--check", action="store_true", help="also run the unchunked form and compare indices")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    n_keys = a.context // a.ratio
    g = torch.Generator().manual_seed(0)
    q = torch.randn(a.queries, a.heads, a.head_dim, generator=g)
    k = torch.randn(n_keys, a.head_dim, generator=g)
    w = torch.randn(a.queries, a.heads, generator=g)
    pos = torch.arange(a.context - a.queries, a.context)
    base = peak_rss_mib()

    tracemalloc.start()
    t0 = time.perf_counter()
    idx = indexer_topk_chunked(q, k, w, pos, ratio=a.ratio, topk=a.topk, chunk=a.chunk, key_chunk=a.key_chunk)
    dt = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = peak_rss_mib()

    promised = a.chunk * (a.heads * min(a.key_chunk, n_keys) + n_keys) * 4 / 2**20
    inputs = (q.numel() + k.numel() + w.numel()) * 4 / 2**20
    per_q = dt / a.queries
    # each row's cost is proportional to its visible keys; over a full prefill the average is half the last's
    full = per_q * a.context / 2
    print(f"indexer chunked top-k: context {a.context}, N {n_keys} keys, {a.queries} queries, Hi {a.heads}, "
          f"hd {a.head_dim}, topk {a.topk}, chunk {a.chunk}, key_chunk {a.key_chunk}, "
          f"threads {torch.get_num_threads()}")
    print(f"  time            : {dt:.3f} s  ({per_q * 1e3:.2f} ms / query row at full context)")
    print(f"  full prefill    : ~{full / 3600:.1f} h extrapolated (rows scale with visible keys)")
    print(f"  inputs          : {inputs:.1f} MiB")
    print(f"  peak RSS        : {peak:.1f} MiB (+{peak - base:.1f} MiB over the inputs' peak)")
    print(f"  promised working: {promised:.1f} MiB (chunk * (Hi * key_chunk + N) fp32)")
    print(f"  tracemalloc peak: {py_peak / 2**20:.3f} MiB (Python objects only)")
    assert (idx >= 0).all(), "every row at full context should select topk entries"
    if a.check:
        ref = indexer_topk(indexer_scores(q, k, w), pos, ratio=a.ratio, topk=a.topk)
        same = torch.equal(ref, idx)
        print(f"  unchunked equal : {same}")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
