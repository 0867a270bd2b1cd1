"""vllm-triton:<profile> adapters of the streamed paged caches (attn.kv_stream, indexer.k_stream;
conformance.cases.cache_stream, docs/stateful-components.md): vLLM's Triton cache writers and readers called once
per chunk on one persistent pool that the harness poisons (the Streamed's state), with the case's slot mapping and
block tables (vLLM 0.32.0; paths relative to site-packages/vllm).

* attn.kv_stream: kv by the harness's serving chain (attn.kv_insert's: wkv FP8 linear, kv_norm, RoPE on bf16 kv,
  as ``vllm_triton.make_kv_insert``; the GEMM row by row, ``cache_stream._serving_kv``), written by
  ``quantize_and_insert_k_kernel`` (models/deepseek_v4/common/ops/cache_utils.py:43-100: -1 slots skipped,
  use_fnuz / fp8_max as quantize_and_insert_k_cache passes), each read row's window read back by
  ``DequantizeAndGatherKCacheKernel`` as the ROCm sparse prefill gathers the SWA window (models/deepseek_v4/amd/
  rocm.py:1492-1502: seq_lens, gather_lens, the SWA block table; here one request per read row, seq_len p + 1,
  gather_len min(p + 1, 128), the row's block table); the window entries' stored bytes (``codes``, ``scales``)
  read with the golden layout.
* indexer.k_stream (SHUFFLE rows only, as the one-shot indexer_k_cache adapter): vLLM's dedicated writer
  ``indexer_k_quant_and_cache_triton`` on the rows that close an entry (the harness makes the compressor's
  closing-token choice, fused_compress_quant_cache.py:201-202, by masking the other rows' slots to -1), then
  ``cp_gather_indexer_k_quant_cache_triton`` gathers each read row's closed entries (one request per read row,
  seq_len (p + 1) // 4, the row's block table).
"""

from __future__ import annotations

import torch

from .base import Streamed, Unsupported

BF = torch.bfloat16


def make_kv_stream(p: dict) -> Streamed:
    from .vllm_triton import _K, launch_insert_k

    dev = p.get("dev", "cpu")

    def new(x, wkv, wkv_scale, kv_norm, positions, slot_mapping, block_table, read, *, blocks, eps, theta, yarn,
            fnuz_fmax=240.0):
        from ..cases.qkv import _layout

        if p["fnuz"] and fnuz_fmax != p["cache_fmax"]:
            raise Unsupported(f"vLLM's quantize_and_insert_k_cache maps amax to fp8 max {p['cache_fmax']:g} on fnuz "
                              f"(get_fp8_min_max), not the case's {fnuz_fmax:g}")
        return {"cache": torch.zeros(blocks, _layout().block_stride, dtype=torch.uint8, device=dev)}

    def step(state, *, start, x, wkv, wkv_scale, kv_norm, positions, slot_mapping, block_table, read, blocks, eps,
             theta, yarn, fnuz_fmax=240.0):
        from ..cases.cache_stream import _serving_kv
        from ..cases.qkv import _layout

        kv = _serving_kv("gfx942" if p["fnuz"] else "ocp")(x, wkv, wkv_scale, kv_norm, positions, eps=eps,
                                                            theta=theta, yarn=yarn)
        pool, lay = state["cache"], _layout()
        launch_insert_k(_K.get("quantize_and_insert_k_kernel", p.get("src")), kv.to(dev, BF).contiguous(),
                        slot_mapping.to(dev, torch.int64).contiguous(), pool, lay.block_size, p)
        rows = torch.nonzero(read).flatten()
        n = len(rows)
        if n == 0:
            return {"window": torch.zeros(0, 512), "lens": torch.zeros(0, dtype=torch.long),
                    "codes": torch.zeros(0, 448, dtype=torch.uint8),
                    "scales": torch.zeros(0, 8, dtype=torch.uint8)}, state
        seq = positions[rows].long() + 1
        glen = seq.clamp(max=128)
        bt = block_table[rows].to(dev, torch.int32).contiguous()
        out = torch.zeros(n, 128, 512, dtype=BF, device=dev)
        workers = 128 if pool.device.type != "cpu" else 1
        _K.get("dequantize_and_gather_k_kernel", p.get("src"))[(n, workers)](
            out, out.stride(0), out.stride(1), pool, seq.to(dev, torch.int32).contiguous(), bt, 0,
            glen.to(dev, torch.int32).contiguous(), max_blocks_per_seq=bt.shape[1], fp8_dim=448, bf16_dim=64,
            scale_dim=8, quant_block=64, cache_block_size=lay.block_size, token_data_size=576,
            block_stride=pool.stride(0), output_dim=512, fp8_max=448.0, n_quant_blocks=7, use_fnuz=bool(p["fnuz"]))
        from references.components.cache_stream import slot_of, window
        from references.formats.cache_layouts import read_ds_mla_tokens

        out = out.float().cpu()
        # the stored bytes of every window entry (its slot through the row's block table), read with the golden
        # layout, as the one-shot kv_insert adapter reads them
        host = pool.cpu()
        toks = [read_ds_mla_tokens(host, [slot_of(block_table[r], q, lay.block_size, "window bytes")
                                          for q in window(int(positions[r]))], layout=lay) for r in rows.tolist()]
        return {"window": torch.cat([out[i, :int(glen[i])] for i in range(n)]), "lens": glen,
                "codes": torch.cat([t.nope for t in toks]), "scales": torch.cat([t.scales for t in toks])}, state

    return Streamed(new, step)


def make_k_stream(p: dict) -> Streamed:
    from .vllm_triton import _K

    def new(k, positions, slot_mapping, block_table, read, *, blocks, layout="normal"):
        if p.get("src") is not None:
            raise Unsupported("this pair is called through vLLM's Python wrappers, imported from the installed vllm "
                              "package, which vllm-triton-gpu does not load (not in the source bundle)")
        if layout != "shuffle":
            raise Unsupported("vLLM's dedicated indexer-K writer lays a block of 64 out in 16x16 SHUFFLE tiles; "
                              "DSV4's C4A block-flat pool is written by the compressor's store (no key input)")
        from ..cases.indexer_cache import KCacheLayout

        return {"cache": torch.zeros(blocks, KCacheLayout(64, layout).block_stride, dtype=torch.uint8)}

    def step(state, *, start, k, positions, slot_mapping, block_table, read, blocks, layout="normal"):
        import vllm.v1.attention.ops.rocm_aiter_mla_sparse as rams

        pool = state["cache"]
        nb, stride = pool.shape
        kv = pool.as_strided((nb, 64, 132), (stride, 132, 1))
        closes = (positions.long() + 1) % 4 == 0
        slots = torch.where(closes, slot_mapping.long(), -1).contiguous()
        rows = torch.nonzero(read).flatten()
        seq = (positions[rows].long() + 1) // 4
        M = int(seq.sum())
        cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(seq, 0).to(torch.int32)
        k_fp8 = torch.empty(M, 128, dtype=p["fp8"])
        k_scale = torch.empty(M, 4, dtype=torch.uint8)
        old = rams.FP8_DTYPE
        rams.FP8_DTYPE = p["fp8"]
        try:
            _K.get("indexer_k_quant_and_cache_triton")(k.to(BF).contiguous(), kv, slots, 128, "ue8m0")
            if M:
                _K.get("cp_gather_indexer_k_quant_cache_triton")(
                    kv, k_fp8, k_scale, block_table[rows].to(torch.int32).contiguous(), cu,
                    token_to_seq=torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), seq))
        finally:
            rams.FP8_DTYPE = old
        return {"k": k_fp8.float() * k_scale.view(torch.float32), "lens": seq}, state

    return Streamed(new, step)
