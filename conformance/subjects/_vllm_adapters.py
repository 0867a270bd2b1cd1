"""Adapters: the golden signatures of the DSV4 components, computed by the installed vLLM's functions.

Each adapter is a *core* function taking the golden's keyword arguments (the ones of the reference
functions in ``references.components``) and returning an ordered dict of outputs. ``bind`` gives it the
exact signature of the registered golden and maps its outputs onto the golden's output names.

Layout conversion only happens here (bf16 inputs, vLLM's cos/sin cache, paged slots, the byte layout of
the caches vLLM writes); every number that the comparison sees is computed by the vLLM function named in
the Impl. Ops are looked up at call time through ``OPS`` so that tests can patch a broken vLLM function in.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from dataclasses import dataclass

import torch

from ._vllm_common import c_op
from .base import Unsupported

BF = torch.bfloat16


# --------------------------------------------------------------------------------------- op lookup
class _Ops:
    """name -> callable; tests patch entries (``OPS.patch(name, fn)``) to plant broken vLLM functions."""

    def __init__(self):
        self._over: dict = {}

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self._over:
            return self._over[name]
        op = c_op(name)
        if op is None:
            raise AttributeError(f"torch.ops._C.{name} is not available in this vLLM build")
        return op

    def patch(self, name, fn):
        self._over[name] = fn

    def unpatch(self, name):
        self._over.pop(name, None)


OPS = _Ops()


# --------------------------------------------------------------------------------------- capability probes
# What each adapter needs from the installed vLLM, checked before it is bound (``probe``): the module imports,
# the attribute exists, the ``torch.ops._C`` op is registered and its schema takes the argument types the
# adapter passes, a Python function's signature accepts the adapter's call. A release where any of these
# differs does not get the component bound: it is "not provided" with the reason, never a call that errors.
@dataclass(frozen=True)
class Op:
    """``torch.ops._C.<name>`` called positionally with arguments of these schema types (in order)."""
    name: str
    types: tuple

    def check(self) -> str | None:
        op = c_op(self.name)
        if op is None:
            return f"torch.ops._C.{self.name} is not registered"
        try:
            schema = op.default._schema
        except Exception as e:  # noqa: BLE001 - an op without a default overload is not callable as we do
            return f"torch.ops._C.{self.name} has no default overload ({type(e).__name__}: {e})"
        args = list(schema.arguments)
        got = tuple(_schema_type(a.type) for a in args[:len(self.types)])
        extra = [a.name for a in args[len(self.types):] if not a.has_default_value()]
        if got != tuple(self.types) or extra or len(args) < len(self.types):
            return (f"torch.ops._C.{self.name} schema is {schema}, the adapter passes "
                    f"({', '.join(self.types)})")
        return None


def _schema_type(t) -> str:
    """A schema argument type as the schema string writes it: Optional[Tensor] -> "Tensor?"."""
    s = str(t)
    return s[len("Optional["):-1] + "?" if s.startswith("Optional[") else s


@dataclass(frozen=True)
class Py:
    """A Python callable ``module:qualname`` called with ``nargs`` positional arguments and ``kwargs``."""
    target: str
    nargs: int = 0
    kwargs: tuple = ()

    def check(self) -> str | None:
        mod, _, qual = self.target.partition(":")
        try:
            obj = importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - any import failure means "not provided", with its reason
            return f"{mod} does not import ({type(e).__name__}: {e})"
        for part in qual.split(".") if qual else ():
            if not hasattr(obj, part):
                return f"{mod} has no {qual}"
            obj = getattr(obj, part)
        if self.nargs or self.kwargs:
            try:
                sig = inspect.signature(obj)
            except (TypeError, ValueError) as e:
                return f"{self.target}: no inspectable signature ({e})"
            try:
                sig.bind(*[None] * self.nargs, **{k: None for k in self.kwargs})
            except TypeError as e:
                kw = f" + {', '.join(self.kwargs)}=" if self.kwargs else ""
                return f"{self.target}{sig} does not take the adapter's call ({self.nargs} positional{kw}: {e})"
        return None


_T = "Tensor"
_SELF = 1   # a method looked up on its class: the bound ``self`` is one more positional argument
REQUIRES = {
    "rms_norm": (Py("vllm.model_executor.layers.layernorm:RMSNorm", 1, ("eps", "dtype")),
                 Py("vllm.model_executor.layers.layernorm:RMSNorm.forward_native", _SELF + 1)),
    "norm_head": (Op("fused_qnorm_rope_kv_insert_cpu", (_T,) * 6 + ("int", "float", "int")),),
    "apply_rope": (Py("vllm.model_executor.layers.rotary_embedding:get_rope", 1,
                      ("max_position", "is_neox_style", "rope_parameters")),
                   Py("vllm.model_executor.layers.rotary_embedding.deepseek_scaling_rope:"
                      "DeepseekV4ScalingRotaryEmbedding.forward_native", _SELF + 3, ("inverse",))),
    "rope_layer": (Py("vllm.models.deepseek_v4.common.rope:build_deepseek_v4_rope", 1,
                      ("head_dim", "rope_head_dim", "max_position_embeddings", "compress_ratio")),
                   Py("vllm.model_executor.layers.rotary_embedding.deepseek_scaling_rope:"
                      "DeepseekV4ScalingRotaryEmbedding.forward_native", _SELF + 3, ("inverse",))),
    "hc_pre": (Py("vllm.model_executor.kernels.mhc.cpu:mhc_pre_cpu", 9),
               Op("hc_pre_fused_cpu", (_T,) * 4 + ("int", "int", "float", "float"))),
    "hc_pre_torch": (Py("vllm.model_executor.kernels.mhc.torch:mhc_pre_torch", 9),),
    "hc_pre_delayed_torch": (Py("vllm.model_executor.kernels.mhc.torch:mhc_pre_delayed_torch", 9, ("pre_mix",)),),
    "hc_post": (Py("vllm.model_executor.kernels.mhc.cpu:mhc_post_cpu", 4),
                Op("hc_post_fused_cpu", (_T,) * 4)),
    "hc_head": (Py("vllm.model_executor.kernels.mhc.cpu:hc_head_fused_cpu", 6),
                Op("hc_head_fused_cpu", (_T,) * 4 + ("float", "float"))),
    "indexer_q": (Py("vllm.models.deepseek_v4.common.ops.fused_indexer_q:fused_indexer_q_rope_quant", 6),
                  Op("fused_indexer_q_rope_quant_cpu", (_T,) * 5 + ("float", "float", _T)),
                  Py("vllm.model_executor.layers.rotary_embedding:get_rope", 1,
                     ("max_position", "is_neox_style", "rope_parameters"))),
    "indexer_scores": (Op("fp8_paged_mqa_logits_cpu", (_T,) * 5 + ("int", "int")),),
    "indexer_topk": (Op("topk_transform_512_cpu", (_T,) * 4 + ("int", "Tensor?")),),
    "compress": (Op("save_partial_states_cpu", (_T,) * 6),
                 Op("compress_norm_rope_store_cpu", (_T,) * 5 + ("float", _T, _T, "int", "int")),
                 Op("compress_norm_rope_store_indexer_cpu", (_T,) * 5 + ("float", _T, _T, "int", "int")),
                 Py("vllm.model_executor.layers.rotary_embedding:get_rope", 1,
                    ("max_position", "is_neox_style", "rope_parameters"))),
    "q_path": (Py("vllm.model_executor.layers.layernorm:RMSNorm", 1, ("eps", "dtype")),
               Py("vllm.model_executor.layers.layernorm:RMSNorm.forward_native", _SELF + 1),
               Op("fused_qnorm_rope_kv_insert_cpu", (_T,) * 6 + ("int", "float", "int")),
               Py("vllm.model_executor.layers.rotary_embedding:get_rope", 1,
                  ("max_position", "is_neox_style", "rope_parameters"))),
    "kv_insert": (Op("fused_qnorm_rope_kv_insert_cpu", (_T,) * 6 + ("int", "float", "int")),
                  Py("vllm.model_executor.layers.rotary_embedding:get_rope", 1,
                     ("max_position", "is_neox_style", "rope_parameters"))),
    "sparse_attention": (Op("fused_qnorm_rope_kv_insert_cpu", (_T,) * 6 + ("int", "float", "int")),
                         Op("flash_mla_with_kvcache_cpu", (_T,) * 4 + ("int", _T, _T, "int", _T, "float"))),
    "output_projection": (Op("inverse_gptj_rope_o_proj_cpu", (_T, _T, _T, "int")),
                          Op("convert_weight_packed", (_T,)),
                          Op("bmm_cpu", (_T, _T, _T, "bool", "Tensor?")),
                          Py("vllm.model_executor.layers.rotary_embedding:get_rope", 1,
                             ("max_position", "is_neox_style", "rope_parameters"))),
    "route": (Op("biased_topk_cpu", (_T, _T, _T, "int", "bool", "str", "int", "float?", "bool")),
              Op("hash_topk_cpu", (_T, _T, "int", "str", "int", "int", "float"))),
    "moe_router": (Op("biased_topk_cpu", (_T, _T, _T, "int", "bool", "str", "int", "float?", "bool")),),
    "moe_hash_router": (Op("hash_topk_cpu", (_T, _T, "int", "str", "int", "int", "float")),),
    "expert_ffn": (Py("vllm._custom_ops:cpu_prepack_moe_weight", 2), Py("vllm._custom_ops:cpu_fused_moe", 11)),
    "moe_experts": (Py("vllm._custom_ops:cpu_prepack_moe_weight", 2), Py("vllm._custom_ops:cpu_fused_moe", 11)),
    "moe_layer": (Op("biased_topk_cpu", (_T, _T, _T, "int", "bool", "str", "int", "float?", "bool")),
                  Op("hash_topk_cpu", (_T, _T, "int", "str", "int", "int", "float")),
                  Py("vllm._custom_ops:cpu_prepack_moe_weight", 2), Py("vllm._custom_ops:cpu_fused_moe", 11)),
}
# Needed only for some cases of a component (checked when such a case runs: Unsupported with the reason).
CASE_REQUIRES = {"moe_experts.expert_map": Py("vllm.model_executor.layers.fused_moe.utils:remap_topk_to_local", 2,
                                              ("out_dtype",))}


def probe(core: str) -> str | None:
    """None when every requirement of adapter ``core`` holds in the installed vLLM, else the first reason."""
    reqs = REQUIRES.get(core)
    if reqs is None:
        return f"no capability probe is declared for adapter {core!r} (harness bug)"
    for r in reqs:
        why = r.check()
        if why:
            return why
    return None


# --------------------------------------------------------------------------------------- rope tables
def _rope_params(inv_freq: torch.Tensor, rope_dim: int) -> dict:
    """vLLM rope_parameters whose frequency table is ``inv_freq`` (theta, YaRN factor, L0 recovered)."""
    from references.components.rope import rope_inv_freq
    from references.config import RopeScaling

    f = inv_freq.double()
    theta = float(f[1]) ** (-rope_dim / 2)
    theta = float(round(theta)) if abs(theta - round(theta)) < 1e-3 * theta else theta
    plain = theta ** (-2.0 * (rope_dim // 2 - 1) / rope_dim)
    factor = plain / float(f[-1])
    common = dict(rope_type="deepseek_yarn", mscale=0, mscale_all_dim=0, is_deepseek_v4=True, rope_dim=rope_dim,
                  rope_theta=theta)
    if abs(factor - 1) < 1e-6:
        return dict(common, factor=1.0, original_max_position_embeddings=4096)
    factor = float(round(factor)) if abs(factor - round(factor)) < 1e-6 else factor
    for l0 in (65536, 4096, 8192, 16384, 32768, 131072, 163840, 1024, 2048):
        y = RopeScaling(factor=factor, original_max_position_embeddings=l0)
        if torch.allclose(rope_inv_freq(rope_dim, theta, y), f, rtol=1e-9, atol=0):
            return dict(common, factor=factor, original_max_position_embeddings=l0, beta_fast=32, beta_slow=1)
    raise ValueError(f"inv_freq is neither plain RoPE nor YaRN(beta 32/1) with a known L0 (theta {theta:g}, "
                     f"factor {factor:g})")


@functools.lru_cache(maxsize=8)
def _rope_cached(key: tuple, head_size: int, max_pos: int):
    from vllm.model_executor.layers.rotary_embedding import get_rope

    params = dict(key)
    mp = max(max_pos, int(params["original_max_position_embeddings"] * params["factor"]))
    return get_rope(head_size, max_position=mp, is_neox_style=False, rope_parameters=params)


def vllm_rope(inv_freq: torch.Tensor, rope_dim: int, head_size: int, positions=None):
    """vLLM's DeepseekV4ScalingRotaryEmbedding for this frequency table (as build_deepseek_v4_rope makes)."""
    p = _rope_params(inv_freq, rope_dim)
    need = int(positions.max()) + 1 if positions is not None and positions.numel() else 1
    if need > p["original_max_position_embeddings"] * p["factor"]:
        p["original_max_position_embeddings"] = int(2 ** math.ceil(math.log2(need / p["factor"])))
        if p["factor"] != 1.0:
            raise ValueError(f"positions up to {need - 1} exceed the YaRN table of L0*factor")
    return _rope_cached(tuple(sorted(p.items())), head_size, need)


def cos_sin(inv_freq, rope_dim, head_size=512, positions=None) -> torch.Tensor:
    return vllm_rope(inv_freq, rope_dim, head_size, positions).cos_sin_cache.float().contiguous()


# --------------------------------------------------------------------------------------- cache codecs
# The byte layouts vLLM writes (fp8_ds_mla: 576 data bytes + 8 scale bytes per token; indexer-K: 128 fp8
# bytes + one fp32 scale per entry). Decoding them is layout conversion: the values are vLLM's.
def read_584(cache2d: torch.Tensor, slots, bs: int, fp8=torch.float8_e4m3fn) -> torch.Tensor:
    rows = []
    for s in (slots.tolist() if isinstance(slots, torch.Tensor) else slots):
        b, o = divmod(int(s), bs)
        d = cache2d[b, o * 576:(o + 1) * 576]
        sb = cache2d[b, bs * 576 + o * 8: bs * 576 + o * 8 + 7]
        nope = d[:448].view(fp8).float().view(7, 64) * torch.exp2(sb.float() - 127).view(7, 1)
        rows.append(torch.cat([nope.flatten(), d[448:].view(BF).float()]))
    return torch.stack(rows) if rows else torch.empty(0, 512)


def read_indexer_k(cache2d: torch.Tensor, slots, bs: int, fp8=torch.float8_e4m3fn) -> torch.Tensor:
    rows = []
    for s in (slots.tolist() if isinstance(slots, torch.Tensor) else slots):
        b, o = divmod(int(s), bs)
        q = cache2d[b, o * 128:(o + 1) * 128].view(fp8).float()
        sc = cache2d[b, bs * 128 + o * 4: bs * 128 + o * 4 + 4].view(torch.float32)
        rows.append(q * sc)
    return torch.stack(rows) if rows else torch.empty(0, 128)


def _pow2_scale(amax, fmax):
    return torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-4) / fmax)))


def write_indexer_k(k: torch.Tensor, bs: int, fp8=torch.float8_e4m3fn, fmax=448.0) -> torch.Tensor:
    """Keys [N, 128] -> the indexer-K cache layout, one power-of-two scale per entry (the compressor's rule)."""
    n = k.shape[0]
    nb = (n + bs - 1) // bs
    cache = torch.zeros(nb, bs * 132, dtype=torch.uint8)
    kb = k.to(BF).float()
    s = _pow2_scale(kb.abs().amax(-1, keepdim=True), fmax)
    q = (kb / s).clamp(-fmax, fmax).to(fp8).view(torch.uint8)
    for j in range(n):
        b, o = divmod(j, bs)
        cache[b, o * 128:(o + 1) * 128] = q[j]
        cache[b, bs * 128 + o * 4: bs * 128 + o * 4 + 4] = s[j].float().view(torch.uint8)
    return cache


def _out(**kw):
    return dict(kw)


# --------------------------------------------------------------------------------------- adapters (CPU)
def rms_norm(x, weight, eps, variant="official"):
    from vllm.model_executor.layers.layernorm import RMSNorm

    n = RMSNorm(x.shape[-1], eps=eps, dtype=BF)
    n.weight.data = weight.to(BF)
    return _out(y=n.forward_native(x.to(BF)).float())


def norm_head(q, eps):
    T, H, D = q.shape
    cache = torch.zeros(1, 584, dtype=torch.uint8)
    cs = torch.cat([torch.ones(1, 32), torch.zeros(1, 32)], -1)
    y = OPS.fused_qnorm_rope_kv_insert_cpu(q.to(BF).contiguous(), torch.zeros(T, D, dtype=BF),
                                           torch.zeros(T, dtype=torch.int64), cache,
                                           torch.full((T,), -1, dtype=torch.int64), cs, H, eps, 1)
    return _out(y=y.float())


def rope_layer(x, positions, *, compress_ratio, inverse=False, preset="flash", rope_dim=64):
    """vLLM's own per-layer rope: ``build_deepseek_v4_rope`` as DeepseekV4 attention calls it
    (``compress_ratio = max(1, config.compress_ratios[layer])``), from the preset's Hugging Face config fields
    (rope_parameters = the YaRN rope_scaling, rope_theta, compress_rope_theta), then ``forward_native``. So what
    the release decides per layer type (YaRN on SWA layers or not) is what the case sees."""
    import types

    from vllm.models.deepseek_v4.common.rope import build_deepseek_v4_rope

    from references.config import FLASH, PRO

    cfg = {"flash": FLASH, "pro": PRO}[preset]
    rs = cfg.rope_scaling
    hf = types.SimpleNamespace(  # a fresh dict per call: some releases write into config.rope_parameters
        rope_parameters=dict(rope_type=rs.type, factor=rs.factor, beta_fast=rs.beta_fast, beta_slow=rs.beta_slow,
                             original_max_position_embeddings=rs.original_max_position_embeddings),
        rope_theta=cfg.rope_theta, compress_rope_theta=cfg.compress_rope_theta,
        max_position_embeddings=cfg.max_position_embeddings)
    r = build_deepseek_v4_rope(hf, head_dim=x.shape[-1], rope_head_dim=rope_dim,
                               max_position_embeddings=cfg.max_position_embeddings,
                               compress_ratio=max(1, compress_ratio))
    y, _ = r.forward_native(positions.long(), x.to(BF).clone(), None, inverse=inverse)
    return _out(y=y.reshape(x.shape).float())


def apply_rope(x, positions, inv_freq, rope_dim=64, inverse=False):
    r = vllm_rope(inv_freq, rope_dim, x.shape[-1], positions)
    pos = positions.long()
    xs = x.to(BF)
    if pos.ndim != 1:
        lead = pos.shape
        pos = pos.reshape(-1)
        xs = xs.reshape(pos.numel(), *x.shape[len(lead):])
    y, _ = r.forward_native(pos, xs.clone(), None, inverse=inverse)
    return _out(y=y.reshape(x.shape).float())


def hc_pre(X, fn, base, scale, *, norm_eps, hc_eps, sinkhorn_iters, numerics=None):
    from vllm.model_executor.kernels.mhc.cpu import mhc_pre_cpu

    post, comb, a = mhc_pre_cpu(X.to(BF).contiguous(), fn.float().contiguous(), scale.float().contiguous(),
                                base.float().contiguous(), norm_eps, hc_eps, hc_eps, 2.0, sinkhorn_iters)
    return _out(a=a.float(), post=post.squeeze(-1).float(), comb=comb.float())


def hc_pre_torch(X, fn, base, scale, *, norm_eps, hc_eps, sinkhorn_iters, numerics=None):
    from vllm.model_executor.kernels.mhc.torch import mhc_pre_torch

    post, comb, a = mhc_pre_torch(X.to(BF), fn.float(), scale.float(), base.float(), norm_eps, hc_eps, hc_eps, 2.0,
                                  sinkhorn_iters)
    return _out(a=a.float(), post=post.squeeze(-1).float(), comb=comb.float())


def hc_pre_delayed_torch(X, fn, base, scale, pre_prev=None, *, norm_eps, hc_eps, sinkhorn_iters, numerics=None):
    """V4.1's lagged HC_pre: mhc_pre_delayed_torch (MHCPreDelayedOp.forward_native, what forward_hip falls back to
    without aiter mHC or TileLang) on the bf16 streams, the carried fp32 pre-mix (None at the model's entry);
    returns the bf16 layer input, post, comb and the pre-mix for the next sub-layer."""
    from vllm.model_executor.kernels.mhc.torch import mhc_pre_delayed_torch

    pm = None if pre_prev is None else pre_prev.float().contiguous()
    post, comb, a, pre = mhc_pre_delayed_torch(X.to(BF).contiguous(), fn.float(), scale.float(), base.float(),
                                               norm_eps, hc_eps, hc_eps, 2.0, sinkhorn_iters, pre_mix=pm)
    return _out(a=a.float(), post=post.squeeze(-1).float(), comb=comb.float(), pre=pre.float())


def hc_post(F, X, post, comb, *, variant="official", numerics=None):
    from vllm.model_executor.kernels.mhc.cpu import mhc_post_cpu

    lead = X.shape[:-2]
    hc, D = X.shape[-2:]
    y = mhc_post_cpu(F.to(BF).reshape(-1, D).contiguous(), X.to(BF).reshape(-1, hc, D).contiguous(),
                     post.float().reshape(-1, hc).contiguous(), comb.float().reshape(-1, hc, hc).contiguous())
    return _out(y=y.reshape(*lead, hc, D).float())


def hc_head(X, fn, base, scale, *, norm_eps, hc_eps, numerics=None):
    from vllm.model_executor.kernels.mhc.cpu import hc_head_fused_cpu

    lead = X.shape[:-2]
    hc, D = X.shape[-2:]
    h = hc_head_fused_cpu(X.to(BF).reshape(-1, hc, D).contiguous(), fn.float().contiguous(),
                          scale.float().reshape(1).contiguous(), base.float().contiguous(), norm_eps, hc_eps)
    return _out(h=h.reshape(*lead, D).float())


def indexer_q(qr, wq_b, positions, inv_freq, *, n_heads, head_dim, numerics=None, rope_dim=64):
    """vLLM: bf16 linear wq_b (torch), then fused_indexer_q_rope_quant (RoPE + FP8 per (token, head) with a
    power-of-two scale folded into the weights). Weights 1 and scales 1 make the returned weights the q scale."""
    from vllm.models.deepseek_v4.common.ops import fused_indexer_q as fiq

    T = qr.shape[0]
    q = (qr.to(BF) @ wq_b.to(BF).t()).view(T, n_heads, head_dim)
    cs = cos_sin(inv_freq, rope_dim, head_dim, positions)
    ones = torch.ones(T, n_heads)
    q8, w = fiq.fused_indexer_q_rope_quant(positions.long(), q.float().contiguous(), cs, ones, 1.0, 1.0)
    return _out(q=q8.float() * w.float()[..., None])


def indexer_scores(q, k, w):
    """vLLM CPU: q quantised per (token, head) into FP8 (fused_indexer_q's rule), keys in the indexer-K
    cache, then fp8_paged_mqa_logits_cpu (its garbage tail past seq_len is never read here)."""
    T, H, D = q.shape
    N = k.shape[0]
    qb = q.to(BF).float()
    s = _pow2_scale(qb.abs().amax(-1, keepdim=True), 448.0)
    q8 = (qb / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    wq = (w.float() * s.squeeze(-1)).contiguous()
    bs = 64
    cache = write_indexer_k(k, bs)
    nb = cache.shape[0]
    out = OPS.fp8_paged_mqa_logits_cpu(q8.contiguous(), cache, wq, torch.full((T,), N, dtype=torch.int32),
                                       torch.arange(nb, dtype=torch.int32).expand(T, nb).contiguous(), bs, N)
    return _out(scores=out[:, :N].float())


def indexer_topk(scores, positions, *, ratio, topk):
    T, N = scores.shape
    if topk != 512:
        raise Unsupported(f"topk_transform_512_cpu supports only top-k 512 (case asks for {topk})")
    lens = torch.minimum((positions.long() + 1) // ratio, torch.tensor(N)).to(torch.int32)
    ps = 64
    nb = max(1, (N + ps - 1) // ps)
    pt = torch.arange(nb, dtype=torch.int32).expand(T, nb).contiguous()
    pages = torch.empty(T, 512, dtype=torch.int32)
    raw = torch.empty(T, 512, dtype=torch.int32)
    OPS.topk_transform_512_cpu(scores.float().contiguous(), lens, pt, pages, ps, raw)
    return _out(idx=raw.long())


# compressor.kv's V4.1 rows (ape None): what no V4 compressor adapter runs
V41_COMPRESSOR = ("V4.1 compressor (ratio 1 / 2, no position bias): vLLM runs models/deepseek_v41/compressor.py's "
                  "fused_save_compress_norm + rope_quant_insert (Triton; vllm:sim-<arch> drives them under the "
                  "interpreter), not the CPU build's ops, which need an ape and ratio 4 / 128")


def compress(x, wkv, wgate, ape, norm, *, ratio, head_dim, eps, inv_freq, rope_dim=64, numerics=None,
             kind="attn", variant="official", overlap=None):
    """vLLM CPU compressor: bf16 projections (torch), save_partial_states_cpu into the state cache, then
    compress_norm_rope_store_cpu (attn, fp8_ds_mla entries) / _indexer_cpu (indexer-K entries)."""
    if ape is None:
        raise Unsupported(V41_COMPRESSOR)
    T, m, d = x.shape[0], ratio, head_dim
    ov = (m == 4) if overlap is None else overlap
    coff = 2 if ov else 1
    xb = x.to(BF)
    kv = (xb @ wkv.to(BF).t()).float().contiguous()
    score = (xb @ wgate.to(BF).t()).float().contiguous()
    sbs = 4 if m == 4 else 8
    state = torch.zeros((T + sbs - 1) // sbs + 1, sbs, 2 * coff * d)
    positions = torch.arange(T, dtype=torch.int64)
    OPS.save_partial_states_cpu(kv, score, ape.float().contiguous(), positions, state, positions.clone())
    win = (1 + ov) * m
    local = positions[:, None] - win + 1 + torch.arange(win)
    gather = torch.where(local >= 0, local, torch.full_like(local, -1)).contiguous()
    fire = (positions + 1) % m == 0
    kv_slot = torch.where(fire, (positions + 1) // m - 1, torch.full_like(positions, -1))
    n = T // m
    cbs = 4
    ncb = (n + cbs - 1) // cbs + 1
    cs = cos_sin(inv_freq, rope_dim, 512, positions)
    w = norm.float().contiguous()
    if kind == "indexer" or d == 128:  # the d=128 entries are the indexer's (compress_norm_rope_store_indexer_cpu)
        cache = torch.zeros(ncb, cbs * 132, dtype=torch.uint8)
        OPS.compress_norm_rope_store_indexer_cpu(state, gather, positions, kv_slot, w, eps, cs, cache, cbs, m)
        return _out(entries=read_indexer_k(cache, range(n), cbs))
    cache = torch.zeros(ncb, cbs * 584, dtype=torch.uint8)
    OPS.compress_norm_rope_store_cpu(state, gather, positions, kv_slot, w, eps, cs, cache, cbs, m)
    return _out(entries=read_584(cache, range(n), cbs))


def _insert_kv(kv: torch.Tensor, bs: int):
    """kv [N, 512] (already roped) -> fp8_ds_mla cache written by vLLM's CPU SWA writer at position 0
    (RoPE at position 0 is the identity, so the op only quantises and inserts)."""
    N = kv.shape[0]
    nb = (N + bs - 1) // bs
    cache = torch.zeros(nb, bs * 584, dtype=torch.uint8)
    q = torch.zeros(N, 1, 512, dtype=BF)
    cs = torch.cat([torch.ones(1, 32), torch.zeros(1, 32)], -1)
    OPS.fused_qnorm_rope_kv_insert_cpu(q, kv.to(BF).contiguous(), torch.zeros(N, dtype=torch.int64), cache,
                                       torch.arange(N, dtype=torch.int64), cs, 1, 1e-6, bs)
    return cache


def q_path(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, positions, *, n_heads, eps, theta, yarn,
           q_head_norm=True):
    """vLLM CPU's q path around the harness's FP8 GEMMs (``linear.fp8_block``'s OCP serving emulation: vLLM CPU has
    no FP8 linear adapter here): q_norm by vLLM's RMSNorm.forward_native (DeepseekV4CPUAttention._split_qkv_and_norm
    calls q_norm separately), then fused_qnorm_rope_kv_insert_cpu's q side: per-head unweighted RMSNorm and GPT-J
    RoPE on the last 64 dims with vLLM's cos/sin cache (no kv token written: slot -1)."""
    from vllm.model_executor.layers.layernorm import RMSNorm

    if not q_head_norm:
        raise Unsupported("V4.1 (no per-head q norm): vLLM has no DeepSeek-V4.1 CPU attention (models/deepseek_v41 "
                          "holds amd/ and nvidia/ only) and fused_qnorm_rope_kv_insert_cpu has no apply_q_norm "
                          "argument (it always normalises each head)")

    from ..cases.linear import _emulate as linear_emulate
    from ..cases.qkv import _inv_freq

    T = x.shape[0]
    lin = linear_emulate("ocp")
    y = lin(x, wq_a, wq_a_scale)["y"]
    n = RMSNorm(y.shape[-1], eps=eps, dtype=BF)
    n.weight.data = q_norm.to(BF)
    qr = n.forward_native(y.to(BF)).float()
    z = lin(qr, wq_b, wq_b_scale)["y"].view(T, n_heads, -1).to(BF).contiguous()
    cs = cos_sin(_inv_freq(theta, yarn), 64, 512, positions)
    cache = torch.zeros(1, 584, dtype=torch.uint8)
    q = OPS.fused_qnorm_rope_kv_insert_cpu(z, torch.zeros(T, 512, dtype=BF), positions.long().contiguous(), cache,
                                           torch.full((T,), -1, dtype=torch.int64), cs, n_heads, eps, 1)
    return _out(qr=qr, q=q.float())


def kv_insert(x, wkv, wkv_scale, kv_norm, positions, slot_mapping, cache, *, eps, theta, yarn, block_base=0,
              fnuz_fmax=240.0):
    """vLLM CPU's SWA writer: kv up to the op by the harness's OCP serving chain (``cases.qkv``: wkv FP8 linear,
    kv_norm, bf16 kv), then fused_qnorm_rope_kv_insert_cpu ropes kv at the positions (vLLM's cos/sin cache for the
    case's theta / YaRN), quantises the nope dims and inserts into a pool of ``block_base + rows`` blocks (a sparse
    file past 2^31 bytes for high block ids) through the global slot mapping; the top rows are read back with the
    golden decoder (the values are vLLM's bytes). The CPU build is OCP (fmax 448): ``fnuz_fmax`` does not apply."""
    from references.components.norms import rms_norm as golden_rms
    from references.formats.cache_layouts import dequantize_ds_mla_tokens, read_ds_mla_tokens

    from ..cases.linear import _emulate as linear_emulate
    from ..cases.qkv import _bf, _inv_freq, _layout, _pool_slots, _untouched
    from .vllm_triton import _sparse_pool

    rel, mapped = _pool_slots(slot_mapping, cache, block_base)
    T = x.shape[0]
    y = linear_emulate("ocp")(x, wkv, wkv_scale)["y"]
    kv = _bf(golden_rms(y, _bf(kv_norm), eps)).to(BF).contiguous()
    lay, nb = _layout(), cache.shape[0]
    pool = _sparse_pool(block_base + nb, lay.block_stride) if block_base else torch.zeros(
        nb, lay.block_stride, dtype=torch.uint8)
    pool[block_base:] = cache
    cs = cos_sin(_inv_freq(theta, yarn), 64, 512, positions)
    OPS.fused_qnorm_rope_kv_insert_cpu(torch.zeros(T, 1, 512, dtype=BF), kv, positions.long().contiguous(), pool,
                                       slot_mapping.long().contiguous(), cs, 1, eps, lay.block_size)
    top = pool[block_base:].clone()
    del pool
    tok = read_ds_mla_tokens(top, rel[mapped], layout=lay)
    return _out(kv=dequantize_ds_mla_tokens(tok, "ocp"), untouched=_untouched(top, rel), codes=tok.nope,
                scales=tok.scales, rope=tok.rope.float())


def sparse_attention(q, kv, indices, sink, *, scale, numerics=None, chunk=256):
    """vLLM CPU: kv quantised into the fp8_ds_mla cache by fused_qnorm_rope_kv_insert_cpu, then
    flash_mla_with_kvcache_cpu over the case's index lists (as window slots)."""
    T, H, D = q.shape
    bs = 64
    cache = _insert_kv(kv, bs)
    out = torch.empty(T, H, D, dtype=BF)
    OPS.flash_mla_with_kvcache_cpu(out, q.to(BF).contiguous(), cache, indices.long().contiguous(), bs, cache,
                                   torch.full((T, 0), -1, dtype=torch.int64), 1, sink.float().contiguous(), scale)
    return _out(o=out.float())


def output_projection(o, positions, inv_freq, wo_a, wo_b, *, o_groups, rope_dim=64, numerics=None):
    T, H, D = o.shape
    cs = cos_sin(inv_freq, rope_dim, D, positions)
    z = OPS.inverse_gptj_rope_o_proj_cpu(o.to(BF).contiguous(), positions.long(), cs, rope_dim)
    G = o_groups
    R = wo_a.shape[0] // G
    zg = z.reshape(T, G, (H // G) * D).to(BF).transpose(0, 1).contiguous()
    packed = OPS.convert_weight_packed(wo_a.view(G, R, -1).to(BF).contiguous())
    out = torch.empty(G, T, R, dtype=BF)
    OPS.bmm_cpu(out, zg, packed, True, None)
    y = out.transpose(0, 1).reshape(T, G * R) @ wo_b.to(BF).t()
    return _out(y=y.float())


def route(logits, *, bias=None, topk, route_scale, hash_ids=None, variant="official"):
    lg = logits.float().contiguous()
    if hash_ids is not None:
        w, ids = OPS.hash_topk_cpu(lg, hash_ids.to(torch.int32).contiguous(), topk, "sqrtsoftplus", 0,
                                   lg.shape[-1], float(route_scale))
    else:
        b = torch.zeros(lg.shape[-1]) if bias is None else bias.float().contiguous()
        w, ids = OPS.biased_topk_cpu(lg, lg, b, topk, True, "sqrtsoftplus", 0, float(route_scale), True)
    return _out(weights=w.float(), ids=ids.long())


def expert_ffn(x, w1, w3, w2, *, limit, numerics=None, route_weight=None):
    """vLLM CPU unquantised experts: cpu_fused_moe (isa "vec") with one expert; the swiglu clamp is not
    forwarded by vLLM's CPU expert path (see the findings), so ``limit`` is not passed either."""
    from vllm import _custom_ops as ops

    lead = x.shape[:-1]
    xs = x.to(BF).reshape(-1, x.shape[-1]).contiguous()
    T = xs.shape[0]
    w13 = torch.cat([w1, w3], 0).to(BF)[None].contiguous()
    p13 = ops.cpu_prepack_moe_weight(w13, "vec")
    p2 = ops.cpu_prepack_moe_weight(w2.to(BF)[None].contiguous(), "vec")
    rw = torch.ones(T, 1) if route_weight is None else route_weight.float().reshape(T, 1)
    out = torch.empty(T, xs.shape[-1], dtype=BF)
    ops.cpu_fused_moe(out, xs, p13, p2, None, None, rw.contiguous(), torch.zeros(T, 1, dtype=torch.int32), "silu",
                      "vec", False)
    return _out(y=out.reshape(*lead, -1).float())


# --------------------------------------------------------------------------------------- MoE routing (CPU)
# The moe.* goldens of conformance.cases.moe. vLLM's CPU DSV4 MoE block (models/deepseek_v4/cpu/model.py)
# routes through CPURouter -> cpu_router._sqrtsoftplus_bias_topk -> biased_topk_cpu / hash_topk_cpu (called
# here with the same arguments through OPS so tests can plant a broken op) and computes the routed experts
# with CPUUnquantizedExperts -> cpu_fused_moe (isa "vec"; never "amx" on a CPU without AMX: SIGILL).
def _gate_logits(x, weight):
    """fp32 logits of bf16 operands (x W^T with an fp32 result, the serving contract of GateLinear with
    out_dtype fp32 on CUDA). vLLM's CPU GateLinear (tier 6, F.linear in bf16 then a cast) would round the
    logits to bf16 as well (spec 8.12 on CPU): not bound here, see the vllm subject's note."""
    return (x.to(BF).float() @ weight.to(BF).float().t()).contiguous()


def moe_router(x, weight, bias=None, *, topk, route_scale, variant="official"):
    """biased_topk_cpu(hidden, logits, bias, topk, renormalize=True, "sqrtsoftplus", 0, rsf, True), as
    _sqrtsoftplus_bias_topk calls it (no bias: a zero bias, which selects on s + 0 = s exactly). vLLM has one
    renormalisation (its own eps): the case's ``variant`` is the golden's and is not passed on."""
    lg = _gate_logits(x, weight)
    b = torch.zeros(lg.shape[-1]) if bias is None else bias.float().contiguous()
    w, ids = OPS.biased_topk_cpu(lg, lg, b, topk, True, "sqrtsoftplus", 0, float(route_scale), True)
    return _out(ids=ids.long(), weights=w.float())


def moe_hash_router(x, weight, tid2eid, input_ids, *, topk, route_scale, variant="official"):
    """hash_topk_cpu(logits, hash_indices_table[input_ids] int32, topk, "sqrtsoftplus", 0, E, rsf)."""
    lg = _gate_logits(x, weight)
    t2e = tid2eid.to(torch.int32)[input_ids.long()].contiguous()
    w, ids = OPS.hash_topk_cpu(lg, t2e, topk, "sqrtsoftplus", 0, lg.shape[-1], float(route_scale))
    return _out(ids=ids.long(), weights=w.float())


def remap_to_local(ids: torch.Tensor, expert_map: torch.Tensor) -> torch.Tensor:
    """vLLM's fused_moe.utils.remap_topk_to_local (global -> local, -1 for remote or dropped; a Triton kernel,
    run under the interpreter on CPU), the mapping the DSV4 ROCm experts (UnfusedOAITritonExperts) apply."""
    from vllm.model_executor.layers.fused_moe.utils import remap_topk_to_local
    from vllm.triton_utils import HAS_TRITON

    if not HAS_TRITON:   # vLLM disabled Triton in this process: its documented torch equivalent
        m = expert_map.long()
        return torch.where(ids >= 0, m[ids.long().clamp(min=0)], torch.full_like(ids.long(), -1)).to(torch.int32)
    return remap_topk_to_local(ids.to(torch.int32).contiguous(), expert_map.to(torch.int32).contiguous(),
                               out_dtype=torch.int32)


REMAP = {"fn": remap_to_local}   # tests plant a broken map here


def moe_experts(x, ids, weights, w1, w3, w2, *, limit, expert_map=None, variant="official", out=None):
    """cpu_fused_moe (isa "vec") over the rank's experts, weights prepacked with cpu_prepack_moe_weight and the
    intermediate size zero-padded to a multiple of 32 (CPUUnquantizedExperts._pad_moe_intermediate).

    * ``limit`` is not passed: vLLM's CPU unquantised expert path has no swiglu clamp (finding
      vllm-cpu-moe-no-swiglu-clamp); the fingerprint cases keep the gate pre-activation at 4 < 10.
    * cpu_fused_moe must never see an id of -1 (it corrupts the heap, finding vllm-cpu-fused-moe-negative-id;
      vLLM's CPU path never produces one): a dropped or remote slot is handed over as local expert 0 with
      weight 0, whose contribution 0 * y is exactly zero.
    * ``expert_map``: the CPU experts take none (CPU has no expert parallelism), so the ids are mapped with
      vLLM's remap_topk_to_local first."""
    from vllm import _custom_ops as ops

    T, D0 = x.shape
    E_l, inter, _ = w1.shape
    D = -(-D0 // 32) * 32   # the kernel needs hidden % 32 == 0: zero lanes (x 0, weights 0) are exact
    if D != D0:
        x = torch.nn.functional.pad(x, (0, D - D0))
        w1 = torch.nn.functional.pad(w1, (0, D - D0))
        w3 = torch.nn.functional.pad(w3, (0, D - D0))
        w2 = torch.nn.functional.pad(w2, (0, 0, 0, D - D0))
    if expert_map is not None and REMAP["fn"] is remap_to_local:
        why = CASE_REQUIRES["moe_experts.expert_map"].check()
        if why:
            from ._vllm_common import release

            raise Unsupported(f"vLLM {release()}: expert_map cases need {why}")
    local = ids.to(torch.int32) if expert_map is None else REMAP["fn"](ids, expert_map)
    w = weights.float()
    dropped = local < 0
    local = torch.where(dropped, torch.zeros_like(local), local).to(torch.int32).contiguous()
    w = torch.where(dropped, torch.zeros_like(w), w).contiguous()
    ip = -(-inter // 32) * 32
    w13 = torch.zeros(E_l, 2 * ip, D, dtype=BF)
    w13[:, :inter] = w1.to(BF)
    w13[:, ip:ip + inter] = w3.to(BF)
    w2p = torch.zeros(E_l, D, ip, dtype=BF)
    w2p[:, :, :inter] = w2.to(BF)
    p13 = ops.cpu_prepack_moe_weight(w13.contiguous(), "vec")
    p2 = ops.cpu_prepack_moe_weight(w2p.contiguous(), "vec")
    y = torch.empty(T, D, dtype=BF)
    OPS_MOE["cpu_fused_moe"](y, x.to(BF).contiguous(), p13, p2, None, None, w, local, "silu", "vec", False)
    y = y.float()[:, :D0].contiguous()
    if out is not None:
        out.copy_(y)
    return _out(y=y)


def _cpu_fused_moe(*a):
    from vllm import _custom_ops as ops

    return ops.cpu_fused_moe(*a)


OPS_MOE = {"cpu_fused_moe": _cpu_fused_moe}


def moe_layer(x, gate_weight, w1, w3, w2, gate_bias=None, tid2eid=None, input_ids=None, *, topk, route_scale,
              limit, route_variant="official", variant="official"):
    """The CPU DSV4 MoE block's routed part: biased_topk_cpu / hash_topk_cpu, then cpu_fused_moe."""
    if tid2eid is not None:
        r = moe_hash_router(x, gate_weight, tid2eid, input_ids, topk=topk, route_scale=route_scale)
    else:
        r = moe_router(x, gate_weight, gate_bias, topk=topk, route_scale=route_scale)
    return _out(y=moe_experts(x, r["ids"], r["weights"], w1, w3, w2, limit=limit)["y"])


# ------------------------------------------------------------------ attn.index_set: one request's layout
def index_set_request(positions, topk_idx, layer_type: str, ratio: int, window: int, hca_list):
    """The arguments vLLM's ROCm prefill passes amd.rocm.combine_topk_swa_indices for one request whose query
    is ``positions`` (a chunk ending at seq_len = max + 1): gather_len = query_len + min(prefix, window - 1) (the
    SWA metadata's plan), the compressed region N = ceil(seq_len / ratio), and the candidates: csa the indexer's
    ``topk_idx``, swa none (top_k 0, ratio 1), hca ``hca_list(positions, ratio, width)`` with the C128A active
    width. Returns (candidates int32 [T, k], top_k, ratio, N, seq_len, gather_len)."""
    pos = positions.long()
    T = pos.shape[0]
    seq_len = int(pos.max()) + 1
    gather = T + min(max(seq_len - T, 0), window - 1)
    if layer_type == "swa":
        return torch.zeros(T, 1, dtype=torch.int32), 0, 1, 0, seq_len, gather
    n_c = -(-seq_len // ratio)
    if layer_type == "csa":
        top = topk_idx.to(torch.int32).contiguous()
    else:
        width = max(1 << max(seq_len // ratio - 1, 0).bit_length(), 128)   # next power of two, at least 128
        top = hca_list(pos, ratio, width).to(torch.int32).contiguous()
    return top, top.shape[-1], ratio, n_c, seq_len, gather


def index_set_unmap(idx, lens, n_c: int, seq_len: int, gather: int) -> dict:
    """combine_topk_swa_indices' rows (indices into [N compressed | gathered SWA rows], valid up to ``lens``) in
    the golden's numbering: compressed entry i -> seq_len + i, gathered row j -> position seq_len - gather + j."""
    idx, lens = idx.long().cpu(), lens.long().cpu()
    valid = (idx >= 0) & (torch.arange(idx.shape[1])[None] < lens[:, None])
    mapped = torch.where(idx < n_c, seq_len + idx, idx - n_c + seq_len - gather)
    return {"indices": torch.where(valid, mapped, torch.full_like(idx, -1))}


def act_quant_as_compiled(x: torch.Tensor, fp8: torch.dtype, fmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-FP8 activations [T, K] as vLLM's compiled per_token_group_fp8_quant makes them (csrc
    per_token_group_quant.cu, group 128, fp32 scales): bf16 input, y_s = max(amax, 1e-10) / fmax, q = x / y_s in
    fp32 clamped to +-fmax, rounded to nearest even. -> (codes [T, K] in ``fp8``, scales fp32 [T, K / 128])."""
    xb = x.to(torch.bfloat16).float()
    T, K = xb.shape
    g = xb.reshape(T, K // 128, 128)
    s = g.abs().amax(-1).clamp_min(1e-10) / fmax
    q = (g / s[..., None]).clamp(-fmax, fmax).to(fp8).reshape(T, K).contiguous()
    return q, s.contiguous()
