"""Write a small synthetic DSV4 checkpoint in the official layout (spec section 1).

``write_checkpoint(dir, cfg=TINY, seed=0)`` produces

* ``model-0000k-of-0000n.safetensors`` shards + ``model.safetensors.index.json`` (``weight_map``) +
  ``config.json`` (HF style with ``quantization_config``): FP8 e4m3 linears with e8m0 128x128 block
  scales, MXFP4 routed experts (int8 packed [out, in/2] + e8m0 [out, in/32]), bf16 embeddings / norms /
  gate / compressor projections, fp32 mHC params, sinks, ape, router bias, int64 ``tid2eid``;
* with ``cfg.expert_dtype == "nvfp4"``: NVFP4 routed experts (uint8 packed [out, in/2], float8_e4m3fn
  ``weight_scale`` [out, in/16], fp32 scalars ``weight_scale_2`` (a power of two, see ``codec.encode``) and
  ``input_scale``) and ``quantization_config.moe_quant_algo = "NVFP4"``;
* with ``dtype="bf16"``: the *same* dequantised weights stored as bf16 (exact: an e4m3 or e2m1 value times a
  power-of-two scale has at most 4 significant bits), no ``.scale`` tensors, no ``quantization_config``;
  for engines that cannot run FP8 on CPU;
* V4.1 Engram layers: the table ``engram.embed.weight`` as FP8 e4m3 codes (float8_e4m3fn) + ``engram.embed.scale``
  UE8M0 (float8_e8m0fnu; uint8 with ``scale_dtype="uint8"``) per 32 row values in *both* dtypes (vLLM holds it
  in FP8 whatever the checkpoint's quantisation, ``layout.py``), ``engram.wkv`` like any linear,
  ``engram.q_weight`` / ``k_weight`` bf16.

It returns the dequantised float32 weights (full checkpoint names), which a reader must reproduce exactly.

Initialisation (``synth_weights``) keeps the tiny model's activations O(1) through every layer: linears
~ N(0, 1/fan_in) so each projection preserves the RMS of its (normalised) input; norm weights ~ 1;
mHC projections ~ N(0, 1/(hc D)) with unit-order scales so pre / post / comb mixes are smooth
(pre ~ sigmoid(N(0,1)), post ~ 2 sigmoid(-1 + ...) ~ 0.5, comb near uniform), attention sinks ~ N(0, 1),
router bias ~ N(0, 0.1), ``tid2eid`` rows of distinct experts; Engram table rows ~ N(0, 1) (so ``wkv`` ~ N(0, 1/fan_in)
gives O(1) keys and values) and ``q_weight`` / ``k_weight`` ~ 1 + N(0, 0.1) (like norm weights: the gate's dot
product stays a normalised correlation, gates spread around sigmoid(0)). The head's N(0, 1/D) rows give logits with
a standard deviation of about 1.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import TINY, DSV4Config
from ..formats.scales import e8m0_decode
from .codec import SCALE_DTYPES, decode, encode
from .hf_config import to_hf_dict
from .layout import TensorSpec, expected_tensors

__all__ = ["synth_weights", "stored_tensors", "write_checkpoint"]


def _init(spec: TensorSpec, g: torch.Generator, cfg: DSV4Config) -> torch.Tensor:
    n, shp = spec.name, spec.shape
    leaf = n.rsplit(".", 2)
    if spec.kind == "int":  # tid2eid: each row a random set of distinct experts
        E = cfg.n_routed_experts
        return torch.stack([torch.randperm(E, generator=g)[:shp[1]] for _ in range(shp[0])])
    if n.endswith("norm.weight") or n.endswith(("engram.q_weight", "engram.k_weight")):
        return 1.0 + 0.1 * torch.randn(shp, generator=g)
    if spec.kind == "fp8_rows":           # the Engram table: unit-variance rows
        return torch.randn(shp, generator=g)
    if n.endswith("attn_sink"):
        return torch.randn(shp, generator=g)
    if n.endswith("ape"):
        return 0.1 * torch.randn(shp, generator=g)
    if n.endswith("gate.bias") or n.endswith("gate.bias_vl"):
        return 0.1 * torch.randn(shp, generator=g)
    if "hc_" in n:
        if n.endswith("_fn"):
            return torch.randn(shp, generator=g) / math.sqrt(shp[1])
        if n.endswith("_scale"):
            return 0.5 + 0.5 * torch.rand(shp, generator=g)
        if n.endswith("_base"):
            b = 0.5 * torch.randn(shp, generator=g)
            if shp[0] > cfg.hc_mult:       # HC_pre site: post logits around -1 (post ~ 0.5)
                b[cfg.hc_mult:2 * cfg.hc_mult] -= 1.0
            return b
    if n == "embed.weight":
        return torch.randn(shp, generator=g)
    if len(shp) == 2:                      # every projection: N(0, 1/fan_in)
        return torch.randn(shp, generator=g) / math.sqrt(shp[1])
    raise AssertionError(f"no initialiser for {n} {shp} ({leaf})")


def synth_weights(cfg: DSV4Config = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """Unquantised float32 master weights (int64 for tid2eid), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {name: _init(spec, g, cfg) for name, spec in expected_tensors(cfg).items()}


@functools.lru_cache(maxsize=4)
def _quantised(cfg: DSV4Config, seed: int):
    """Encode once per (config, seed): the stored tensors with e8m0 scales and the dequantised values.
    Cached because quantising is the slow part; callers get fresh dicts but shared tensors (read-only)."""
    specs = expected_tensors(cfg)
    enc_all, deq = {}, {}
    for name, w in synth_weights(cfg, seed).items():
        spec = specs[name]
        enc = encode(spec, w, scale_dtype="e8m0")
        extra = {k: enc[n] for k, n in spec.nvfp4_names().items() if k != "weight_scale"} \
            if spec.kind == "nvfp4" else None
        deq[name] = decode(spec, enc[name], enc.get(spec.scale_name), extra)
        enc_all.update(enc)
    return enc_all, deq


def stored_tensors(cfg: DSV4Config = TINY, seed: int = 0, *, dtype: str = "fp8", scale_dtype: str = "e8m0"):
    """-> (stored {name: tensor} in the official layout, dequantised {name: float32 / int64 tensor}).

    Treat the returned tensors as read-only (they are shared with a cache)."""
    if dtype not in ("fp8", "bf16"):
        raise ValueError(f"dtype: 'fp8' or 'bf16', got {dtype!r}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype: one of {SCALE_DTYPES}, got {scale_dtype!r}")
    enc, deq = _quantised(cfg, seed)
    stored = {}
    for name, spec in expected_tensors(cfg).items():
        if spec.kind in ("fp8", "fp4", "nvfp4") and dtype == "bf16":
            b = deq[name].to(torch.bfloat16)
            assert torch.equal(b.float(), deq[name]), f"{name}: dequantised value not exact in bf16"
            stored[name] = b
            continue
        stored[name] = enc[name]
        if spec.kind == "fp8":
            s = enc[spec.scale_name]
            if scale_dtype == "uint8":
                s = s.view(torch.uint8)
            elif scale_dtype == "fp32":   # the same powers of two as fp32 values (Flash-Base style)
                s = torch.from_numpy(e8m0_decode(s.view(torch.uint8).numpy())).float()
            stored[spec.scale_name] = s
        elif spec.kind == "fp8_rows":   # FP8 bytes in either dtype; UE8M0 scales (no fp32 form: vLLM copies bytes)
            s = enc[spec.scale_name]
            stored[spec.scale_name] = s.view(torch.uint8) if scale_dtype == "uint8" else s
        elif spec.kind == "fp4":
            stored[spec.scale_name] = enc[spec.scale_name]
        elif spec.kind == "nvfp4":
            for n in spec.nvfp4_names().values():
                stored[n] = enc[n]
    return stored, dict(deq)


def write_checkpoint(path, cfg: DSV4Config = TINY, seed: int = 0, *, dtype: str = "fp8",
                     scale_dtype: str = "e8m0", max_shard_bytes: int = 4 << 20) -> dict[str, torch.Tensor]:
    """Write the checkpoint under ``path`` (created); returns the dequantised weights (see module doc)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    stored, deq = stored_tensors(cfg, seed, dtype=dtype, scale_dtype=scale_dtype)
    # shard in name order, keeping a weight next to its scale (the release groups by layer the same way)
    shards, cur, size = [], {}, 0
    for name in sorted(stored, key=_layer_sort_key):
        t = stored[name]
        nb = t.numel() * t.element_size()
        if cur and size + nb > max_shard_bytes and not name.endswith(".scale"):
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t.contiguous()
        size += nb
    if cur:
        shards.append(cur)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (path / "config.json").write_text(json.dumps(to_hf_dict(cfg, quantized=dtype == "fp8"), indent=2))
    return deq


def _layer_sort_key(name: str):
    parts = name.split(".")
    if parts[0] in ("layers", "mtp"):
        return (1 if parts[0] == "layers" else 2, int(parts[1]), name)
    return (0, 0, name)
