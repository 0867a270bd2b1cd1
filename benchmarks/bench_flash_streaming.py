"""The golden streaming a Flash-sized checkpoint from its files, one layer at a time, on the CPU. Not a test.

    python benchmarks/bench_flash_streaming.py [--dir /tmp/dsv4-flash-4l] [--layers 4] [--tokens 64]

Writes (once, if ``--dir`` has no config.json) a checkpoint in the official layout with FLASH's real
dimensions and its first ``--layers`` layers (4: SWA, SWA, CSA with the indexer, HCA; the first three
hash-routed), no MTP block: FP8 e4m3 linears with e8m0 128x128 block scales, MXFP4 routed experts with e8m0
scales, bf16 embedding and head; about 3.4 GB per layer and 15.5 GB for 4 layers. Then
``DSV4Model(CheckpointReader(dir), cfg, cache_weights=False).forward`` over ``--tokens`` tokens, reporting per
layer: wall time, stored tensors (weights and scales) and bytes read from the files, routed-expert tensors
decoded, and the process's resident memory (VmRSS) after the layer; and the peak RSS of the whole forward
against the size of one layer's weights decoded to fp32 (a layer's routed experts alone are ~25.8 GB in fp32,
more than this machine's memory: a golden that decoded a layer whole could not run here). Run it a second time
for the forward alone: the first run's peak includes writing the checkpoint.

The weights are random *codes*, not quantised floats: uniform MXFP4 nibbles with one e8m0 scale per tensor
chosen so that a row's RMS is ~1/sqrt(fan_in), FP8 codes of N(0, 16^2) values (torch's cast, clamped to the
e4m3 range) with a matching power-of-two block scale. (Encoding floats with the reference codec takes ~2 s
per expert tensor, ~30 min per layer.) Only the bf16 / fp32 / int tensors use the checkpoint writer's
initialisers. The values only need to keep activations O(1): this measures reading and memory, not
accuracy.

Results (this 2-core CPU machine, 24 GiB, 2026-11-25; 4 layers, 64 tokens): checkpoint 15.3 GiB written in
73 s; header check of every tensor < 0.1 s; forward 97 s in a fresh process (layers 25.6 / 25.7 / 25.5 /
18.5 s, each reading 1.9-2.7 GiB of its own shard and 426-603 routed-expert tensors, i.e. the 142-201 experts
its 384 (token, slot) pairs hit, plus the embedding with layer 0), RSS 0.80-0.90 GiB after each layer, peak
RSS 3.36 GiB (the embedding and head decoded to fp32 are 2 GiB each): against 24.6 GiB for one layer
decoded to fp32. Logits finite, std 1.01.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safetensors.torch import save_file  # noqa: E402

from references.checkpoints.hf_config import to_hf_dict  # noqa: E402
from references.checkpoints.layout import expected_tensors  # noqa: E402
from references.checkpoints.reader import CheckpointReader  # noqa: E402
from references.checkpoints.writer import _init  # noqa: E402
from references.config import FLASH, DSV4Config  # noqa: E402
from references.model import DSV4Model  # noqa: E402

E2M1_RMS = math.sqrt(sum(v * v for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)) / 8)   # uniform nibbles


def flash_config(layers: int) -> DSV4Config:
    return FLASH.replace(num_hidden_layers=layers, num_nextn_predict_layers=0,
                         num_hash_layers=min(FLASH.num_hash_layers, layers),
                         compress_ratios=FLASH.compress_ratios[:layers], name=f"flash-{layers}l")


def _e8m0(exp: int) -> torch.Tensor:
    return torch.tensor([127 + exp], dtype=torch.uint8)


def _stored(spec, g, cfg) -> dict[str, torch.Tensor]:
    if spec.kind == "fp4":   # [out, in/2] packed nibbles + e8m0 [out, in/32]
        packed = torch.randint(0, 256, spec.stored_shape, generator=g, dtype=torch.uint8).view(torch.int8)
        exp = round(math.log2(1.0 / (E2M1_RMS * math.sqrt(spec.shape[1]))))
        scale = _e8m0(exp).expand(spec.scale_shape).contiguous().view(torch.float8_e8m0fnu)
        return {spec.name: packed, spec.scale_name: scale}
    if spec.kind == "fp8":   # e4m3 codes of N(0, 16^2), block scale 2^round(log2(1 / (16 sqrt(fan_in))))
        codes = (torch.randn(spec.stored_shape, generator=g) * 16).clamp(-448, 448).to(torch.float8_e4m3fn)
        exp = round(math.log2(1.0 / (16 * math.sqrt(spec.shape[1]))))
        scale = _e8m0(exp).expand(spec.scale_shape).contiguous().view(torch.float8_e8m0fnu)
        return {spec.name: codes, spec.scale_name: scale}
    t = _init(spec, g, cfg)
    return {spec.name: t.to({"bf16": torch.bfloat16, "fp32": torch.float32, "int": torch.int64}[spec.kind])}


def write_large(path: Path, cfg: DSV4Config, seed: int = 0) -> None:
    """One shard per block (top-level tensors first), written as each block is generated."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    groups: dict[str, list] = {}
    for name, spec in expected_tensors(cfg).items():
        key = ".".join(name.split(".")[:2]) if name.startswith(("layers.", "mtp.")) else "top"
        groups.setdefault(key, []).append(spec)
    weight_map, total = {}, 0
    keys = sorted(groups, key=lambda k: (k != "top", int(k.split(".")[1]) if k != "top" else 0))
    for i, key in enumerate(keys):
        t0 = time.perf_counter()
        shard = {}
        for spec in groups[key]:
            shard.update(_stored(spec, g, cfg))
        fname = f"model-{i + 1:05d}-of-{len(keys):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        nbytes = sum(t.numel() * t.element_size() for t in shard.values())
        total += nbytes
        weight_map.update({n: fname for n in shard})
        print(f"wrote {fname} ({key}): {nbytes / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f} s", flush=True)
        del shard
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    (path / "config.json").write_text(json.dumps(to_hf_dict(cfg, quantized=True), indent=1))


def vm_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/dsv4-flash-4l")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = Path(a.dir)
    cfg = flash_config(a.layers)
    if not (path / "config.json").exists():
        t0 = time.perf_counter()
        write_large(path, cfg)
        print(f"checkpoint written in {time.perf_counter() - t0:.0f} s", flush=True)
    reader = CheckpointReader(path)
    t0 = time.perf_counter()
    reader.check()
    print(f"header check of every tensor: {time.perf_counter() - t0:.1f} s", flush=True)
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    rss0 = vm_rss_gib()

    # per-layer accounting: wrap the reader's raw reads and the model's per-layer weight views
    reads: list[tuple[str, int]] = []
    raw = reader.raw

    def counting_raw(name, **kw):
        t = raw(name, **kw)
        reads.append((name, t.numel() * t.element_size()))
        return t
    reader.raw = counting_raw
    model = DSV4Model(reader, cfg, cache_weights=False)
    import references.model as M
    rows, marks = [], {"t": time.perf_counter(), "n": 0}
    orig_layer = M.decoder_layer

    def timed_layer(X, w, cfg_, layer, *args, **kw):
        out = orig_layer(X, w, cfg_, layer, *args, **kw)
        now = time.perf_counter()
        new = reads[marks["n"]:]
        rows.append({"layer": layer, "type": cfg.layer_type(layer), "s": now - marks["t"],
                     "tensors": len(new), "gib_read": sum(b for _, b in new) / 2**30,
                     "expert_tensors": sum(".experts." in n and not n.endswith(".scale") for n, _ in new),
                     "rss_gib": vm_rss_gib()})
        marks.update(t=now, n=len(reads))
        return out
    M.decoder_layer = timed_layer
    ids = torch.randint(2, cfg.vocab_size, (a.tokens,), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model.forward(ids)
    total = time.perf_counter() - t0
    M.decoder_layer = orig_layer
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    layer_fp32 = max(sum(math.prod(s.shape) for n, s in expected_tensors(cfg).items()
                         if n.startswith(f"layers.{i}.")) for i in range(a.layers)) * 4 / 2**30
    print(f"\nconfig {cfg.name}: {a.layers} layers of FLASH's dimensions, {disk / 2**30:.1f} GiB on disk; "
          f"{a.tokens} tokens, {a.threads} threads")
    print("layer  type                           s   tensors  GiB read  expert tensors  RSS after (GiB)")
    for r in rows:
        print(f"{r['layer']:5d}  {r['type']:29s} {r['s']:6.1f}  {r['tensors']:7d}  {r['gib_read']:8.2f}  "
              f"{r['expert_tensors']:14d}  {r['rss_gib']:8.2f}")
    print(f"forward {total:.1f} s; logits {tuple(logits.shape)} finite={bool(torch.isfinite(logits).all())} "
          f"std {logits.std().item():.3g}")
    print(f"RSS before the forward {rss0:.2f} GiB; peak RSS of the process {peak:.2f} GiB; one layer decoded to "
          f"fp32 would be {layer_fp32:.1f} GiB; the checkpoint {disk / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
