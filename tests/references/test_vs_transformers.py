"""Cross-validation against transformers' independent DSV4 implementation (fp32), spec sections 2-3.

transformers (>= 5.20) is an fp32 implementation of the same exact-arithmetic map (hf-api.md section 5:
in fp32 its known divergences reduce to the named variants "after-w2" and "hf-vllm"). So each HF fp32
output must lie within the *same derived fp32 error bound* as our own fp32 reference, measured against
our fp64 golden; we never widen a bound for HF. Agreement numbers are printed (run with ``-s``).

Skipped when ``transformers.models.deepseek_v4`` is not importable. To run it with the project's venv:
``PYTHONPATH=/work/venvs/hf/lib/python3.11/site-packages python -m pytest tests/references/test_vs_transformers.py -s``
"""

import math

import pytest
import torch

M = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4",
                        reason="transformers with models.deepseek_v4 (>= 5.17) is not importable")
transformers = pytest.importorskip("transformers")

from references.checkpoints.hf_config import to_hf_dict  # noqa: E402
from references.checkpoints.writer import stored_tensors  # noqa: E402
from references.components.mhc import hc_head, hc_pre  # noqa: E402
from references.components.moe import expert_ffn, moe, route, sqrt_softplus  # noqa: E402
from references.components.norms import rms_norm  # noqa: E402
from references.config import TINY  # noqa: E402
from references.model import DSV4Model, Variants  # noqa: E402

from ._attn_asserts import U32, assert_within  # noqa: E402
from .test_mhc import EPS, hc_head_fp32_bound, hc_pre_fp32_bounds  # noqa: E402
from .test_model import CHAIN  # noqa: E402
from .test_moe import moe_fp32_bound  # noqa: E402

pytestmark = pytest.mark.transformers
AGREEMENT: dict[str, float] = {}


def _report(name, hf, ref):
    AGREEMENT[name] = (hf.double() - ref.double()).abs().max().item()
    print(f"\n[vs transformers {transformers.__version__}] {name}: max|HF fp32 - golden fp64| = {AGREEMENT[name]:.3g}")


@pytest.fixture(scope="module")
def hf_cfg():
    d = to_hf_dict(TINY, quantized=False)
    for k in ("architectures", "model_type", "torch_dtype"):
        d.pop(k)
    c = transformers.DeepseekV4Config(**d)
    c._attn_implementation = "eager"
    return c


@pytest.fixture(scope="module")
def deq():
    return stored_tensors(TINY, 0)[1]


def _x(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_rms_norm(hf_cfg, deq):
    w = deq["layers.0.attn_norm.weight"].double()
    x = _x((50, TINY.hidden_size), 1, 3.0)
    mod = M.DeepseekV4RMSNorm(TINY.hidden_size, eps=TINY.rms_norm_eps).float()
    with torch.no_grad():
        mod.weight.copy_(w)
        hf = mod(x.float())
    ref = rms_norm(x, w, TINY.rms_norm_eps)
    _report("RMSNorm", hf, ref)
    # mean of D squares (D+1) u32, rsqrt 2 u32, two products 2 u32, input rounding 2 u32: (D+7) u32 |y|
    assert_within("RMSNorm HF", hf, ref, (TINY.hidden_size + 7) * U32 * ref.abs())


def test_hc_pre(hf_cfg, deq):
    hc = M.DeepseekV4HyperConnection(hf_cfg).float()
    fn, base, scale = (deq[f"layers.1.hc_attn_{k}"].double() for k in ("fn", "base", "scale"))
    X = _x((1, 40, TINY.hc_mult, TINY.hidden_size), 2)
    with torch.no_grad():
        hc.fn.copy_(fn), hc.base.copy_(base), hc.scale.copy_(scale)
        post, comb, a = hc(X.float())
    a64, p64, c64 = hc_pre(X[0], fn, base, scale, norm_eps=EPS, hc_eps=TINY.hc_eps, sinkhorn_iters=20)
    da, dpost, rel_c = hc_pre_fp32_bounds(X[0], fn, base, scale, p64, c64)
    _report("mHC pre: a", a[0], a64)
    _report("mHC pre: post", post[0], p64)
    _report("mHC pre: comb", comb[0], c64)
    assert_within("HC_pre a", a[0], a64, da)
    assert_within("HC_pre post", post[0], p64, dpost)
    assert_within("HC_pre comb", comb[0], c64, rel_c[:, None, None] * c64)


def test_hc_head(hf_cfg, deq):
    hh = M.DeepseekV4HyperHead(hf_cfg).float()
    fn, base, scale = (deq[f"hc_head_{k}"].double() for k in ("fn", "base", "scale"))
    X = _x((1, 40, TINY.hc_mult, TINY.hidden_size), 3)
    with torch.no_grad():
        hh.hc_fn.copy_(fn), hh.hc_base.copy_(base), hh.hc_scale.copy_(scale)
        h = hh(X.float())
    ref = hc_head(X[0], fn, base, scale, norm_eps=EPS, hc_eps=TINY.hc_eps)
    _report("mHC head", h[0], ref)
    assert_within("HC_head", h[0], ref, hc_head_fp32_bound(X[0], fn, base, scale))


def _route_bound(x, W, s64, w64):
    """|d z| <= (D+2) u32 |W||x|; |d s / s| <= 1/2 |d z| + 12 u32 (d log sqrt(softplus z)/dz =
    sigmoid(z) / (2 softplus(z)) <= 1/2); renormalising doubles relative errors and adds (k+2) u32."""
    D = x.shape[-1]
    dz = (D + 2) * U32 * (x.abs() @ W.abs().T)
    rel = 0.5 * dz + 12 * U32
    return w64 * (2 * rel.max(-1, keepdim=True).values + 8 * U32)


@pytest.mark.parametrize("layer", [0, 1])
def test_router(hf_cfg, deq, layer):
    W = deq[f"layers.{layer}.ffn.gate.weight"].double()
    x = _x((64, TINY.hidden_size), 4)
    tok = torch.randint(0, TINY.vocab_size, (64,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        if layer < TINY.num_hash_layers:
            r = M.DeepseekV4HashRouter(hf_cfg).float()
            r.weight.copy_(W)
            r.tid2eid.copy_(deq["layers.0.ffn.gate.tid2eid"])
            _, hw, hi = r(x.float(), tok)
            w64, i64 = route(x @ W.T, topk=6, route_scale=TINY.routed_scaling_factor,
                             hash_ids=deq["layers.0.ffn.gate.tid2eid"][tok], variant="hf-vllm")
        else:
            r = M.DeepseekV4TopKRouter(hf_cfg).float()
            r.weight.copy_(W)
            r.e_score_correction_bias.copy_(deq[f"layers.{layer}.ffn.gate.bias"])
            _, hw, hi = r(x.float())
            w64, i64 = route(x @ W.T, bias=deq[f"layers.{layer}.ffn.gate.bias"].double(), topk=6,
                             route_scale=TINY.routed_scaling_factor, variant="hf-vllm")
    # HF's top-k is unsorted: compare as sets, ordered by expert id
    hi_s, ho = hi.sort(-1)
    ri_s, ro = i64.sort(-1)
    assert torch.equal(hi_s, ri_s), "router selected different experts"
    hw_s, w64_s = hw.gather(-1, ho), w64.gather(-1, ro)
    s64 = sqrt_softplus(x @ W.T)
    _report(f"router weights (layer {layer})", hw_s, w64_s)
    assert_within(f"router layer {layer}", hw_s, w64_s, _route_bound(x, W, s64, w64_s))


def _experts(deq, layer):
    return {e: {k: deq[f"layers.{layer}.ffn.experts.{e}.{k}.weight"].double() for k in ("w1", "w3", "w2")}
            for e in range(TINY.n_routed_experts)}


def test_routed_experts_and_shared(hf_cfg, deq):
    ex = _experts(deq, 1)
    sh = {k: deq[f"layers.1.ffn.shared_experts.{k}.weight"].double() for k in ("w1", "w3", "w2")}
    x = _x((48, TINY.hidden_size), 6)
    g = torch.Generator().manual_seed(7)
    ids = torch.stack([torch.randperm(TINY.n_routed_experts, generator=g)[:6] for _ in range(48)])
    wts = torch.rand(48, 6, generator=g, dtype=torch.float64)
    mod = M.DeepseekV4Experts(hf_cfg).float()
    mlp = M.DeepseekV4MLP(hf_cfg).float()
    with torch.no_grad():
        mod.gate_up_proj.copy_(torch.stack([torch.cat([ex[e]["w1"], ex[e]["w3"]]) for e in range(len(ex))]))
        mod.down_proj.copy_(torch.stack([ex[e]["w2"] for e in range(len(ex))]))
        mlp.gate_proj.weight.copy_(sh["w1"]), mlp.up_proj.weight.copy_(sh["w3"]), mlp.down_proj.weight.copy_(sh["w2"])
        hf = mod(x.float(), ids, wts.float())
        hf_sh = mlp(x.float())
    ref = moe(x, ids, wts, ex, None, limit=TINY.swiglu_limit, variant="after-w2")
    ref_sh = expert_ffn(x, sh["w1"], sh["w3"], sh["w2"], limit=TINY.swiglu_limit)
    _report("routed experts (after-w2)", hf, ref)
    _report("shared expert", hf_sh, ref_sh)
    assert_within("experts HF", hf, ref, moe_fp32_bound(x, ids, wts, ex, None))
    assert_within("shared expert HF", hf_sh, ref_sh, moe_fp32_bound(x, ids[:, :0], wts[:, :0], ex, sh))


def _to_hf_state_dict(deq, cfg):
    """Official checkpoint names -> transformers' DeepseekV4ForCausalLM state_dict (hf-api.md section 3)."""
    sd = {"model.embed_tokens.weight": deq["embed.weight"], "lm_head.weight": deq["head.weight"],
          "model.norm.weight": deq["norm.weight"], "model.hc_head.hc_fn": deq["hc_head_fn"],
          "model.hc_head.hc_base": deq["hc_head_base"], "model.hc_head.hc_scale": deq["hc_head_scale"]}
    attn = {"wq_a.weight": "q_a_proj.weight", "q_norm.weight": "q_a_norm.weight", "wq_b.weight": "q_b_proj.weight",
            "wkv.weight": "kv_proj.weight", "kv_norm.weight": "kv_norm.weight", "wo_a.weight": "o_a_proj.weight",
            "wo_b.weight": "o_b_proj.weight", "attn_sink": "sinks"}
    comp = {"wkv.weight": "kv_proj.weight", "wgate.weight": "gate_proj.weight", "ape": "position_bias",
            "norm.weight": "kv_norm.weight"}
    for i in range(cfg.num_hidden_layers):
        s, h = f"layers.{i}.", f"model.layers.{i}."
        sd[h + "input_layernorm.weight"] = deq[s + "attn_norm.weight"]
        sd[h + "post_attention_layernorm.weight"] = deq[s + "ffn_norm.weight"]
        for site, hs in (("attn", "attn_hc"), ("ffn", "ffn_hc")):
            for k in ("fn", "base", "scale"):
                sd[f"{h}{hs}.{k}"] = deq[f"{s}hc_{site}_{k}"]
        for a, b in attn.items():
            sd[h + "self_attn." + b] = deq[s + "attn." + a]
        if cfg.compress_ratio(i):
            for a, b in comp.items():
                sd[h + "self_attn.compressor." + b] = deq[s + "attn.compressor." + a]
        if cfg.compress_ratio(i) == 4:
            for a, b in comp.items():
                sd[h + "self_attn.compressor.indexer." + b] = deq[s + "attn.indexer.compressor." + a]
            sd[h + "self_attn.compressor.indexer.q_b_proj.weight"] = deq[s + "attn.indexer.wq_b.weight"]
            sd[h + "self_attn.compressor.indexer.scorer.weights_proj.weight"] = \
                deq[s + "attn.indexer.weights_proj.weight"]
        sd[h + "mlp.gate.weight"] = deq[s + "ffn.gate.weight"]
        if cfg.is_hash_layer(i):
            sd[h + "mlp.gate.tid2eid"] = deq[s + "ffn.gate.tid2eid"]
        else:
            sd[h + "mlp.gate.e_score_correction_bias"] = deq[s + "ffn.gate.bias"]
        E = cfg.n_routed_experts
        sd[h + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([deq[f"{s}ffn.experts.{e}.w1.weight"], deq[f"{s}ffn.experts.{e}.w3.weight"]]) for e in range(E)])
        sd[h + "mlp.experts.down_proj"] = torch.stack([deq[f"{s}ffn.experts.{e}.w2.weight"] for e in range(E)])
        for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            sd[f"{h}mlp.shared_experts.{b}.weight"] = deq[f"{s}ffn.shared_experts.{a}.weight"]
    return sd


def test_whole_model_logits(hf_cfg, deq):
    torch.manual_seed(0)
    m = transformers.DeepseekV4ForCausalLM(hf_cfg).float().eval()
    missing, unexpected = m.load_state_dict(_to_hf_state_dict(deq, TINY), strict=False)
    assert not unexpected and not [k for k in missing if "inv_freq" not in k], (missing, unexpected)
    ids = torch.randint(0, TINY.vocab_size, (140,), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        hf = m(ids[None], use_cache=False).logits[0]
    gold = DSV4Model(deq, TINY, dtype=torch.float64, variants=Variants.hf()).forward(ids)
    gold32 = DSV4Model(deq, TINY).forward(ids)
    _report("whole-model logits (HF fp32 vs golden fp64, hf variants)", hf, gold)
    AGREEMENT["whole-model logits HF fp32 vs golden fp32 official"] = (hf - gold32).abs().max().item()
    print(f"\n[vs transformers] whole-model logits HF fp32 vs golden fp32 (official variants): "
          f"{AGREEMENT['whole-model logits HF fp32 vs golden fp32 official']:.3g}; logit scale "
          f"{gold.abs().max().item():.3g}; argmax agreement {(hf.argmax(-1) == gold.argmax(-1)).float().mean():.3f}")
    assert math.isfinite(AGREEMENT["whole-model logits (HF fp32 vs golden fp64, hf variants)"])
    assert_within("whole model HF", hf, gold, CHAIN * U32 * (1 + gold.abs()))
