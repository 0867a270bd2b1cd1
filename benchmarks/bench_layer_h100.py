"""One DSV4-Flash decoder layer on a GPU, fp32 with TF32 off: our golden ``decoder_layer`` next to
transformers' ``DeepseekV4DecoderLayer`` (same weights, shared storage), the fp32 matmul roofline, and the
golden-vs-transformers agreement against a derived fp32 bound. Not a test.

    python benchmarks/bench_layer_h100.py [--tokens 4096] [--repeat 3] [--out DIR]
    python benchmarks/bench_layer_h100.py --small --device cpu     # scaled-down shapes, to debug on a CPU

Layer: the first CSA (ratio 4) layer of ``references.config.FLASH`` past the hash-routed ones (hidden 4096,
64 heads x 512, q_lora 1024, 8 output groups, indexer 64 x 128 top-512, 256 experts top-6 of width 2048 +
the shared expert). Weights are random (the checkpoint writer's initialisers for the dense tensors, N(0,
1/fan_in) experts generated on the device) and fp32; transformers' module gets the very same tensors
(``load_state_dict(assign=True)``, the golden's experts are views into its stacked ``gate_up_proj`` /
``down_proj``), so nothing is stored twice. The golden runs with the device as torch's default device
(its index helpers build their aranges there).

Agreement: the golden in fp64 (hf variants: routing weight after W2, renorm eps 1e-20; spec 8.5/8.6) is
the exact reference; transformers fp32 and the golden fp32 must both lie within N u32 (1 + |ref|) of it,
N the longest dependent reduction chain of the layer (see ``chain_length``). Routing and indexer top-k are
discontinuous: rows whose expert set or top-k set differ between the runs are counted and left out.

Results (H100 80GB HBM3, torch 2.11 cu130, transformers 5.17.0; 4096 tokens, 2026-11-25; details in
docs/bench-layer-h100.md): fp32 matmul roofline 51.0 TFLOP/s; layer 2.80 TFLOP (55 ms at roofline).
Golden (stacked experts as torch's grouped GEMM, 2^27-element indexer blocks, per-slot sparse attention in
1 GiB blocks), latest run: 112.3-113.1 ms, reruns bitwise equal; transformers 172.2-173.2 ms with
grouped_mm experts, 246-288 ms eager, batched_mm out of memory: HF/golden = 1.53 (0.90 before the speed
work); the 2x goal is NOT met (<= 86.1 ms: the GEMMs alone need ~72 ms at the best rates measured for
them, the rest is ~20 ms of eager kernels and ~15 ms of host waits). Agreement on 4090/4096 rows (5
indexer near-tie flips and 1 fp64/fp32 flip left out): max|HF32 - golden64| 1.6e-5, max|golden32 -
golden64| 1.1e-5, 0.0026 and 0.0021 of the bound N u32 (1 + |ref|), N = 71,296.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import references.components.attention as attn_mod  # noqa: E402
import references.model as model_mod  # noqa: E402
from references.checkpoints.hf_config import to_hf_dict  # noqa: E402
from references.checkpoints.layout import layer_tensors, relative_key  # noqa: E402
from references.checkpoints.writer import _init  # noqa: E402
from references.config import FLASH, DSV4Config  # noqa: E402
from references.model import Variants, decoder_layer  # noqa: E402
from references.precision import golden_mode  # noqa: E402

U32 = 2.0**-24


def small_config() -> DSV4Config:
    return FLASH.replace(hidden_size=256, num_attention_heads=8, q_lora_rank=128, o_groups=2, o_lora_rank=128,
                         index_n_heads=8, n_routed_experts=16, moe_intermediate_size=64, index_topk=16)


def bench_layer(cfg: DSV4Config) -> int:
    return next(i for i in range(cfg.num_hash_layers, cfg.num_hidden_layers) if cfg.compress_ratio(i) == 4)


# -- weights ---------------------------------------------------------------------------------------------
def make_weights(cfg, layer, device, seed=0):
    """Layer-relative golden dict (fp32 on ``device``) + stacked expert tensors gate_up [E, 2I, D], down [E, D, I]."""
    g = torch.Generator().manual_seed(seed)
    w = {}
    for spec in layer_tensors(cfg, layer):
        if ".experts." in spec.name:
            continue
        t = _init(spec, g, cfg)
        w[relative_key(spec.name)] = (t.float() if t.dtype.is_floating_point else t).to(device)
    E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    gd = torch.Generator(device=device).manual_seed(seed + 1)
    gate_up = torch.randn(E, 2 * I, D, generator=gd, device=device).mul_(D**-0.5)
    down = torch.randn(E, D, I, generator=gd, device=device).mul_(I**-0.5)
    # the golden takes the routed experts stacked, as transformers holds them (references.model.layer_experts)
    w["ffn.experts.w13"], w["ffn.experts.w2"] = gate_up, down
    return w, gate_up, down


def hf_state(w, cfg, layer, gate_up, down):
    """Golden layer dict -> transformers' DeepseekV4DecoderLayer state_dict names (hf-api.md section 3)."""
    sd = {"input_layernorm.weight": w["attn_norm"], "post_attention_layernorm.weight": w["ffn_norm"],
          "mlp.gate.weight": w["ffn.gate"], "mlp.experts.gate_up_proj": gate_up, "mlp.experts.down_proj": down}
    for site, hs in (("attn", "attn_hc"), ("ffn", "ffn_hc")):
        for k in ("fn", "base", "scale"):
            sd[f"{hs}.{k}"] = w[f"hc_{site}_{k}"]
    for a, b in {"wq_a": "q_a_proj.weight", "q_norm": "q_a_norm.weight", "wq_b": "q_b_proj.weight",
                 "wkv": "kv_proj.weight", "kv_norm": "kv_norm.weight", "wo_a": "o_a_proj.weight",
                 "wo_b": "o_b_proj.weight", "attn_sink": "sinks"}.items():
        sd["self_attn." + b] = w["attn." + a]
    comp = {"wkv": "kv_proj.weight", "wgate": "gate_proj.weight", "ape": "position_bias", "norm": "kv_norm.weight"}
    for a, b in comp.items():
        sd["self_attn.compressor." + b] = w["attn.compressor." + a]
        sd["self_attn.compressor.indexer." + b] = w["attn.indexer.compressor." + a]
    sd["self_attn.compressor.indexer.q_b_proj.weight"] = w["attn.indexer.wq_b"]
    sd["self_attn.compressor.indexer.scorer.weights_proj.weight"] = w["attn.indexer.weights_proj"]
    if cfg.is_hash_layer(layer):
        sd["mlp.gate.tid2eid"] = w["ffn.gate.tid2eid"]
    else:
        sd["mlp.gate.e_score_correction_bias"] = w["ffn.gate.bias"]
    for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        sd[f"mlp.shared_experts.{b}.weight"] = w[f"ffn.shared_experts.{a}"]
    return sd


def hf_layer(cfg, layer, w, gate_up, down, device):
    import transformers
    import transformers.models.deepseek_v4.modeling_deepseek_v4 as M

    d = to_hf_dict(cfg, quantized=False)
    for k in ("architectures", "model_type", "torch_dtype"):
        d.pop(k, None)
    c = transformers.DeepseekV4Config(**d)
    c._attn_implementation = "eager"
    with torch.device("meta"):
        mod = M.DeepseekV4DecoderLayer(c, layer)
    missing, unexpected = mod.load_state_dict(hf_state(w, cfg, layer, gate_up, down), strict=False, assign=True)
    for name, sub in list(mod.named_modules()):  # rotary tables (non-persistent buffers): build them for real
        if isinstance(sub, M.DeepseekV4RotaryEmbedding):
            parent, _, leaf = name.rpartition(".")
            setattr(mod.get_submodule(parent), leaf, M.DeepseekV4RotaryEmbedding(c).to(device))
    left = [n for n, t in list(mod.named_parameters()) + list(mod.named_buffers()) if t.is_meta]
    if missing or unexpected or left:
        raise RuntimeError(f"HF state mapping: missing {missing}, unexpected {unexpected}, still meta {left}")
    mod.eval()
    rot = M.DeepseekV4RotaryEmbedding(c).to(device)
    return M, c, mod, rot


def hf_inputs(M, c, rot, X, positions):
    from transformers.masking_utils import create_sliding_window_causal_mask

    emb = X[None, :, 0, :]
    pos = positions[None]
    mask = create_sliding_window_causal_mask(config=c, inputs_embeds=emb, attention_mask=None,
                                             past_key_values=None, position_ids=pos)
    pe = {k: rot(emb, position_ids=pos, layer_type=k) for k in ("main", "compress")}
    return dict(position_embeddings=pe, position_ids=pos, attention_mask=mask, past_key_values=None)


@contextlib.contextmanager
def patched(obj, name, fn):
    saved = getattr(obj, name)
    setattr(obj, name, fn)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeat, warmup=1):
    for _ in range(warmup):
        out = fn()
    sync(device)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return out, ts


def breakdown(run, device):
    """Synchronised wall time inside the golden's main components during one call of ``run``."""
    acc = {}

    def wrap(name, fn):
        def inner(*a, **k):
            sync(device)
            t = time.perf_counter()
            r = fn(*a, **k)
            sync(device)
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t
            return r
        return inner

    sites = [(model_mod, "attention_layer"), (model_mod, "moe"), (model_mod, "hc_pre"), (model_mod, "hc_post"),
             (model_mod, "gate_logits"), (model_mod, "route"), (model_mod, "rms_norm"),
             (attn_mod, "sparse_attention"), (attn_mod, "indexer_topk_chunked"), (attn_mod, "compress"),
             (attn_mod, "query_path"), (attn_mod, "kv_projection"), (attn_mod, "output_projection"),
             (attn_mod, "apply_rope"), (attn_mod, "indexer_q"), (attn_mod, "indexer_weights"),
             (attn_mod, "attention_set"), (attn_mod, "quant_kv_nope")]
    with contextlib.ExitStack() as st:
        for obj, name in sites:
            st.enter_context(patched(obj, name, wrap(name, getattr(obj, name))))
        sync(device)
        t = time.perf_counter()
        run()
        sync(device)
        acc["total"] = time.perf_counter() - t
    return {k: round(v * 1e3, 2) for k, v in acc.items()}


# -- FLOPs and error-bound bookkeeping --------------------------------------------------------------------
def layer_flops(cfg, T):
    """Useful multiply-add FLOPs (2 per MAC) of one CSA layer at T prefill tokens (causal work only)."""
    D, H, d, ql, g, ol = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank, cfg.o_groups,
                          cfg.o_lora_rank)
    Hi, hi, E, I, k, hc = (cfg.index_n_heads, cfg.index_head_dim, cfg.n_routed_experts, cfg.moe_intermediate_size,
                           cfg.num_experts_per_tok, cfg.hc_mult)
    t = torch.arange(1, T + 1, dtype=torch.float64)
    n_c = torch.div(t, 4, rounding_mode="floor")
    f = {
        "projections": 2 * T * (D * ql + ql * H * d + D * d + H * d * ol + g * ol * D + 2 * D * 2 * d
                                + ql * Hi * hi + D * Hi + 2 * D * 2 * hi),
        "hc_pre x2 + gate": 2 * T * (2 * hc * D * (2 * hc + hc * hc) + D * E),
        "indexer scores": float((2 * Hi * hi * n_c).sum()),
        "attention core": float((4 * H * d * (t.clamp(max=cfg.sliding_window) + n_c.clamp(max=cfg.index_topk))).sum()),
        "experts (top-k + shared)": 2 * T * (k + 1) * 3 * D * I,
    }
    f["total"] = sum(f.values())
    return f


def chain_length(cfg):
    """Longest dependent reduction chain of one layer (forward error analysis, no cancellation assumed; as
    CHAIN in tests/references/test_model.py): hc_pre 4D, attn_norm D, wq_a D, q_norm q_lora, wq_b q_lora,
    head norm d, q.kv d, P.V window + top-k, wo_a (H/g) d, wo_b g o_lora, hc_pre 4D, ffn_norm D, gate D,
    W1/W3 D, W2 I. Each stage is Lipschitz-O(1) on RMS-normalised activations: |dX| <= N u (1 + |X|)."""
    D, d = cfg.hidden_size, cfg.head_dim
    return (2 * cfg.hc_mult * D + 5 * D + 2 * cfg.q_lora_rank + 2 * d + cfg.sliding_window + cfg.index_topk
            + cfg.num_attention_heads // cfg.o_groups * d + cfg.o_groups * cfg.o_lora_rank + cfg.moe_intermediate_size)


def roofline(device, n, repeat=5):
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    with golden_mode():
        _, ts = timeit(lambda: a @ b, device, repeat, warmup=2)
    return 2 * n**3 / statistics.median(ts) / 1e12


# -- main ---------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="scaled-down shapes (debugging on a CPU)")
    ap.add_argument("--skip", default="", help="comma list of: old, hf-grouped, hf-batched, fp64")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    device = torch.device(a.device)
    cfg = small_config() if a.small else FLASH
    layer, T = bench_layer(cfg), a.tokens
    res = {"config": cfg.name + (" (small)" if a.small else ""), "layer": layer, "tokens": T,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    import transformers
    res["transformers"] = transformers.__version__

    def log(k, v):
        res[k] = v
        print(f"{k}: {v}", flush=True)

    log("matmul_fp32_tflops", round(roofline(device, 8192 if device.type == "cuda" else 1024), 2))
    t0 = time.perf_counter()
    w, gate_up, down = make_weights(cfg, layer, device)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(T, cfg.hc_mult, cfg.hidden_size, generator=g).to(device)
    ids = torch.randint(0, cfg.vocab_size, (T,), generator=g).to(device)
    positions = torch.arange(T, device=device)
    log("setup_s", round(time.perf_counter() - t0, 1))

    def golden(x=X, variants=None, trace=None):
        with golden_mode(), torch.no_grad(), device:
            return decoder_layer(x, w, cfg, layer, ids, positions, variants=variants or Variants(), trace=trace)

    out_g, ts = timeit(golden, device, a.repeat)
    log("golden_ms", [round(t * 1e3, 1) for t in ts])
    log("golden_rerun_bitwise_equal", bool(torch.equal(out_g, golden())))
    log("golden_breakdown_ms", breakdown(golden, device))
    if "old" not in skip:
        with patched(attn_mod, "sparse_attention", attn_mod.sparse_attention_gather):
            _, ts_old = timeit(golden, device, a.repeat)
            log("golden_old_gather_ms", [round(t * 1e3, 1) for t in ts_old])
            log("golden_old_gather_breakdown_ms", breakdown(golden, device))
    del out_g

    M, c, mod, rot = hf_layer(cfg, layer, w, gate_up, down, device)
    kw = hf_inputs(M, c, rot, X, positions)
    captured = {}
    mod.self_attn.compressor.indexer.register_forward_hook(lambda m, i, o: captured.__setitem__("topk", o))
    mod.mlp.gate.register_forward_hook(lambda m, i, o: captured.__setitem__("route", o[2]))

    def hf():
        with golden_mode(), torch.no_grad():
            return mod(X[None], input_ids=ids[None], **kw)[0]

    hf_times = {}
    for impl in ("eager", "grouped_mm", "batched_mm"):   # every experts implementation transformers offers
        if impl != "eager" and f"hf-{impl.split('_')[0]}" in skip:
            continue
        c._experts_implementation = impl
        try:
            out_hf, ts = timeit(hf, device, a.repeat)
            hf_times[impl] = [round(t * 1e3, 1) for t in ts]
            log(f"hf_{impl}_ms", hf_times[impl])
        except Exception as err:  # noqa: BLE001 - report and go on
            log(f"hf_{impl}_error", f"{type(err).__name__}: {str(err)[:300]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if device.type == "cuda":
            log(f"hf_{impl}_peak_mem_gb", round(torch.cuda.max_memory_allocated() / 2**30, 1))
    c._experts_implementation = "eager"
    out_hf = hf()
    hf_topk, hf_route = captured["topk"][0], captured["route"]

    # -- agreement (same weights) --
    cap = {}
    inner_topk = attn_mod.indexer_topk_chunked

    def capture_topk(*args, **kw):
        cap["topk"] = inner_topk(*args, **kw)
        return cap["topk"]

    tr32, tr64 = {}, {}
    with patched(attn_mod, "indexer_topk_chunked", capture_topk):
        g32 = golden(variants=Variants.hf(), trace=tr32)
        g_topk = cap["topk"]
        g64 = None if "fp64" in skip else golden(X.double(), Variants.hf(), tr64)
        g64_topk = cap["topk"]
    same = torch.ones(T, dtype=torch.bool, device=device)

    def set_eq(a_, b_):
        a_ = torch.where(a_ >= 0, a_, torch.full_like(a_, -1)).sort(-1).values
        b_ = torch.where(b_ >= 0, b_, torch.full_like(b_, -1)).sort(-1).values
        return (a_ == b_).all(-1)

    same &= set_eq(hf_route.long(), tr32["route_ids"])
    rows_topk = set_eq(hf_topk.long(), g_topk.long()) if hf_topk.shape == g_topk.shape else None
    if rows_topk is None:
        log("topk_shapes", [list(hf_topk.shape), list(g_topk.shape)])
    else:
        same &= rows_topk
    log("rows_same_selection", f"{int(same.sum())}/{T} (route ids hf vs golden32 equal on "
        f"{int(set_eq(hf_route.long(), tr32['route_ids']).sum())}, indexer top-k on "
        f"{'?' if rows_topk is None else int(rows_topk.sum())})")
    N = chain_length(cfg)
    agree = {"chain_N": N, "max|hf32 - golden32| (all rows)": (out_hf - g32).abs().max().item(),
             "max|hf32 - golden32| (same-selection rows)": (out_hf - g32).abs()[same].max().item(),
             "max|golden32 official - golden32 hf-variants|": (golden() - g32).abs().max().item()}
    if g64 is not None:
        flips64 = ~(set_eq(tr64["route_ids"], tr32["route_ids"]) & set_eq(g64_topk.long(), g_topk.long()))
        agree["rows where fp64 and fp32 golden select differently"] = int(flips64.sum())
        same &= ~flips64
        agree["rows compared"] = int(same.sum())
        bound = N * U32 * (1 + g64.abs())
        for name, got in (("hf32", out_hf), ("golden32", g32)):
            err = (got.double() - g64).abs()[same]
            b = bound[same]
            agree[f"max|{name} - golden64|"] = err.max().item() if err.numel() else None
            agree[f"{name} max err/bound"] = (err / b).max().item() if err.numel() else None
            agree[f"{name} within bound"] = bool((err <= b).all())
        agree["max|golden64|"] = g64.abs().max().item()
    log("agreement", agree)

    flops = layer_flops(cfg, T)
    best_g = min(ts_ for ts_ in res["golden_ms"]) / 1e3
    best_hf = min(min(v) for v in hf_times.values()) / 1e3 if hf_times else float("nan")
    peak = res["matmul_fp32_tflops"] * 1e12
    log("flops_tflop", {k: round(v / 1e12, 3) for k, v in flops.items()})
    med_g = statistics.median(res["golden_ms"]) / 1e3
    med_hf = min(statistics.median(v) for v in hf_times.values()) / 1e3 if hf_times else float("nan")
    log("summary", {"golden_ms": round(best_g * 1e3, 1), "hf_best_ms": round(best_hf * 1e3, 1),
                    "hf_over_golden": round(best_hf / best_g, 2),
                    "golden_median_ms": round(med_g * 1e3, 1), "hf_best_median_ms": round(med_hf * 1e3, 1),
                    "hf_over_golden_medians": round(med_hf / med_g, 2),
                    "golden_roofline_fraction": round(flops["total"] / peak / best_g, 3),
                    "hf_roofline_fraction": round(flops["total"] / peak / best_hf, 3),
                    "roofline_ms": round(flops["total"] / peak * 1e3, 1)})
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "bench_layer.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
