"""vLLM's DSV4 Triton kernels compiled by Triton on this machine's GPU (the ``vllm-triton-gpu`` subject's
kernels, taken from vLLM's source by ``conformance.subjects._vllm_source``): first-call time (compile + launch)
and steady-state time per launch at DeepSeek-V4-Flash decode/prefill shapes, side by side in one run.

    DSV4_VLLM_SRC=.carry/vllm-src python benchmarks/bench_vllm_triton_gpu.py [--profile ocp] [--json OUT]

Shapes (Flash: 64 heads x 512, rope 64, index 64 x 128, 256 experts top-6):
  quantize_and_insert_k_kernel   4,096 tokens into a 64-token-block fp8_ds_mla cache (584 B/token)
  _sparse_attn_decode_ragged      128 decode queries x 64 heads, 640 slots each (512 top-k + 128 window)
  FusedIndexerQRopeQuant.kernel   4,096 tokens x 64 index heads x 128
  bitmatrix metadata (pow2-safe)  4,096 tokens x top-6 over 256 experts (vLLM's builder + the stand-in stage 1)
  _w8a8_triton_block_scaled_mm    4,096 x 1,024 x 4,096 block-FP8 GEMM (Flash wq_a), default launch config
  combine_topk_swa_indices        8,192-token CSA prefill chunk: top-512 + window 128 (amd.rocm's merge)
Each time is the median of 50 launches after 5 warm-ups, CUDA events around each launch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BF = torch.bfloat16


def _time(fn, reps=50, warm=5):
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return first, statistics.median(ts), min(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="ocp")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA/ROCm device: this benchmark compiles vLLM's Triton kernels for a GPU", file=sys.stderr)
        return 2
    import triton

    from conformance.subjects import vllm_triton as vt
    from conformance.subjects._triton_kernels_standin import Bitmatrix
    from conformance.subjects._vllm_source import source_root

    if args.profile not in vt.PROFILES:
        print(f"error: unknown profile {args.profile!r}; known: {sorted(vt.PROFILES)}", file=sys.stderr)
        return 2
    why = vt.fp8_dialect_unsupported(args.profile)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    src = source_root()
    p = dict(vt.PROFILES[args.profile], dev="cuda", src=src)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []

    # K-cache quantise + insert
    N, bs = 4096, 64
    nb = N // bs
    kv = torch.randn(N, 512, device="cuda", generator=g).to(BF)
    slots = torch.arange(N, dtype=torch.int64, device="cuda")
    cache = torch.zeros(nb, bs * 584, dtype=torch.uint8, device="cuda")
    ins = vt._K.get("quantize_and_insert_k_kernel", src)

    def insert():
        ins[(N,)](kv, slots, cache, N, input_dim=512, fp8_dim=448, bf16_dim=64, scale_dim=8, quant_block=64,
                  cache_block_size=bs, token_data_size=576, block_stride=cache.stride(0), fp8_max=p["cache_fmax"],
                  n_quant_blocks=8, use_fnuz=p["fnuz"])
    rows.append(("quantize_and_insert_k_kernel", f"{N} tokens", *_time(insert)))

    # sparse MLA decode over the cache just written
    T, H, L = 128, 64, 640
    main_c = cache.view(nb, bs, 584)
    ind = torch.randint(0, N, (T * L,), dtype=torch.int32, device="cuda", generator=g)
    ptr = torch.arange(0, T * L + 1, L, dtype=torch.int32, device="cuda")
    q = torch.randn(T, H, 512, device="cuda", generator=g).to(BF)
    sink = torch.randn(H, device="cuda", generator=g)
    out = torch.empty(T, H, 512, dtype=BF, device="cuda")
    dec = vt._K.get("_sparse_attn_decode_ragged_kernel", src)

    def decode():
        dec[(T, triton.cdiv(H, 16))](
            q, main_c, ind, ptr, main_c, ind, ptr, sink, out, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            main_c.stride(0), main_c.stride(0), nb * bs, nb * bs, bs, bs, 512 ** -0.5, H, HAS_ATTN_SINK=True,
            HAS_EXTRA=False, NOPE_DIM=448, NOPE_BLOCK=512, ROPE_DIM=64, IS_FNUZ_MAIN=p["fnuz"], IS_FNUZ_EXTRA=False,
            BLOCK_H=16, BLOCK_K=16, num_warps=8)
    rows.append(("_sparse_attn_decode_ragged_kernel", f"{T} q x {H} heads x {L} slots", *_time(decode)))

    # indexer q RoPE + FP8 quant
    Tq, Hi = 4096, 64
    pos = torch.randint(0, 65536, (Tq,), device="cuda", generator=g)
    iq = torch.randn(Tq, Hi, 128, device="cuda", generator=g).to(BF)
    cs = torch.randn(65536, 64, device="cuda", generator=g)
    q8 = torch.empty(Tq, Hi, 128, dtype=p["fp8"], device="cuda")
    w_in, w_out = torch.ones(Tq, Hi, device="cuda"), torch.empty(Tq, Hi, device="cuda")
    kq = vt._K.get("indexer_q_kernel", src)
    rows.append(("FusedIndexerQRopeQuantTritonKernel.kernel", f"{Tq} tokens x {Hi} heads x 128",
                 *_time(lambda: vt.launch_indexer_q(kq, pos, iq, cs, w_in, 1.0, 1.0, q8, w_out, fp8_max=p["q_fmax"],
                                                    use_fnuz=p["fnuz"]))))

    # MoE bitmatrix metadata (vLLM's pow2-safe builder)
    ids = torch.randint(0, 256, (4096, 6), dtype=torch.int32, device="cuda", generator=g)
    build = vt._K.get("bitmatrix_metadata", src)
    bm = Bitmatrix(ids, 256)
    rows.append(("_make_bitmatrix_metadata_pow2_safe", "4096 tokens x top-6 / 256 experts",
                 *_time(lambda: build(ids, bm))))

    # block-FP8 GEMM at Flash's wq_a (q_lora 1024 x D 4096), a 4,096-token prefill; default launch config
    M, Nn, K = 4096, 1024, 4096
    A8 = torch.randn(M, K, device="cuda", generator=g).clamp(-200, 200).to(p["fp8"])
    As = torch.rand(M, K // 128, device="cuda", generator=g) / 100
    B8 = (torch.randn(Nn, K, device="cuda", generator=g) * 16).clamp(-200, 200).to(p["fp8"])
    Bs = torch.rand(Nn // 128, K // 128, device="cuda", generator=g) / 100
    gemm = vt._K.get("_w8a8_triton_block_scaled_mm", src)
    rows.append(("_w8a8_triton_block_scaled_mm", f"{M} x {Nn} x {K} (wq_a)",
                 *_time(lambda: vt.launch_block_fp8_gemm(gemm, A8, B8, As, Bs))))

    # ROCm sparse-prefill index merge: an 8,192-token prefill chunk of a CSA layer (top-512 + window 128)
    Tp, kk = 8192, 512
    top = torch.randint(0, Tp // 4, (Tp, kk), dtype=torch.int32, device="cuda", generator=g)
    comb = vt._K.get("combine_topk_swa_indices", src)
    qsl = torch.tensor([0, Tp], dtype=torch.int32, device="cuda")
    seq = torch.tensor([Tp], dtype=torch.int32, device="cuda")
    gat = torch.tensor([Tp], dtype=torch.int32, device="cuda")
    rows.append(("combine_topk_swa_indices", f"{Tp} tokens, top-{kk} + window 128",
                 *_time(lambda: comb(top, qsl, seq, gat, 128, 4, kk, Tp // 4 + Tp, Tp // 4))))

    dev = torch.cuda.get_device_name(0)
    print(f"vLLM {src.version} Triton kernels ({src.how}) compiled by Triton {triton.__version__} on {dev}, "
          f"profile {args.profile}")
    print(f"{'kernel':44s} {'shape':34s} {'first call s':>12s} {'median ms':>10s} {'min ms':>8s}")
    for name, shape, first, med, mn in rows:
        print(f"{name:44s} {shape:34s} {first:12.3f} {med:10.4f} {mn:8.4f}")
    if args.json:
        args.json.write_text(json.dumps({"device": dev, "triton": triton.__version__, "vllm_source": src.version,
                                         "profile": args.profile,
                                         "rows": [dict(kernel=r[0], shape=r[1], first_s=r[2], median_ms=r[3],
                                                       min_ms=r[4]) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
