"""The ``transformers`` subject: Hugging Face transformers' DeepSeek-V4 (an independent implementation).

It runs in fp32 on the CPU (HF's bf16 paths round differently from the serving path; its fp32 path is an
exact-arithmetic cross-check). Components bound: the ones HF exposes as modules or functions that can be
called in isolation. HF has no MTP and no FP8/FP4 simulation, so those components are not provided.
"""

from __future__ import annotations

import importlib
import platform

import torch

from .base import Impl, Subject, SubjectError, SubjectInfo, Unsupported

MOD = "transformers.models.deepseek_v4.modeling_deepseek_v4"


def _load():
    try:
        import transformers

        M = importlib.import_module(MOD)
    except ImportError as e:
        raise SubjectError(f"subject 'transformers' needs transformers with models.deepseek_v4 (>= 5.17): {e}") from e
    return transformers, M


def _config(M, *, theta: float, yarn: bool, hidden: int = 256, hc_iters: int = 20):
    kw = dict(vocab_size=64, hidden_size=hidden, num_hidden_layers=1, compress_ratios=[0], num_attention_heads=8,
              num_key_value_heads=1, head_dim=512, qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=128,
              index_n_heads=8, index_head_dim=128, index_topk=512, sliding_window=128, hc_mult=4,
              hc_sinkhorn_iters=hc_iters, hc_eps=1e-6, n_routed_experts=64, num_experts_per_tok=6,
              moe_intermediate_size=64, num_hash_layers=0, rms_norm_eps=1e-6, rope_theta=theta,
              compress_rope_theta=theta, max_position_embeddings=1048576)
    if yarn:
        kw["rope_scaling"] = dict(type="yarn", factor=16, original_max_position_embeddings=65536, beta_fast=32,
                                  beta_slow=1)
    c = M.DeepseekV4Config(**kw)
    c._attn_implementation = "eager"
    return c


class TransformersSubject(Subject):
    name = "transformers"

    def __init__(self):
        self.transformers, self.M = _load()

    def info(self) -> SubjectInfo:
        return SubjectInfo(name=self.name, implementation=f"transformers {self.transformers.__version__} "
                           f"DeepSeek-V4 modules in fp32", device=f"cpu ({platform.machine()})", dialect="none",
                           emulated=False, versions={"transformers": self.transformers.__version__,
                                                     "torch": torch.__version__})

    def not_provided(self) -> dict[str, str]:
        return {"mtp.head": "transformers' DeepSeek-V4 has no MTP module: DeepseekV4PreTrainedModel drops the "
                            "checkpoint's mtp.* weights (_keys_to_ignore_on_load_unexpected)",
                "indexer.k_cache": "transformers' DeepSeek-V4 indexer scores unquantised keys: no FP8 indexer-K "
                                   "cache, no paged pool",
                **{c: f"transformers {self.transformers.__version__} has no DeepSeek-V4.1 model (models/deepseek_v4 "
                      "only; the V4.1 config class is vLLM's transformers_utils/configs/deepseek_v41.py): no "
                      "indexer K from the compressor latent, no two-level candidate top-k"
                   for c in ("indexer.k_latent", "indexer.topk_two_level")},
                **{c: f"transformers {self.transformers.__version__} has no DSpark drafter (its DeepSeek-V4 model "
                      "loads no mtp.* / dspark weights and has no speculative-decoding head)"
                   for c in ("dspark.input", "dspark.markov")},
                "moe.experts_nvfp4": "transformers' DeepSeek-V4 experts take dequantised weights: no NVFP4 expert "
                                     "kernel to drive (its quantizer integrations are not part of the model)"}

    def comparison_level(self) -> str:
        # an independent fp32 implementation of the same math (see cases/_serving.py, level "fp32")
        return "fp32"

    def provides(self) -> dict[str, Impl]:
        M = self.M

        @torch.no_grad()
        def norm_rms(x, weight, *, eps):
            n = M.DeepseekV4RMSNorm(x.shape[-1], eps=eps)
            n.weight.copy_(weight)
            return n(x.float())

        @torch.no_grad()
        def rope(x, positions, *, theta, yarn, inverse=False, rope_dim=64):
            c = _config(M, theta=theta, yarn=yarn)
            rot = M.DeepseekV4RotaryEmbedding(c)
            xb = x.float().permute(1, 0, 2)[None]                  # [1, H, T, d]
            cos, sin = rot(xb, position_ids=positions[None].long(), layer_type="compress")
            y = M.apply_rotary_pos_emb(xb, cos, -sin if inverse else sin)
            return y[0].permute(1, 0, 2)

        @torch.no_grad()
        def mhc_pre(X, fn, base, scale, *, norm_eps, hc_eps, sinkhorn_iters):
            c = _config(M, theta=10000.0, yarn=False, hidden=X.shape[-1], hc_iters=sinkhorn_iters)
            c.rms_norm_eps, c.hc_eps = norm_eps, hc_eps
            hc = M.DeepseekV4HyperConnection(c)
            hc.fn.copy_(fn), hc.base.copy_(base), hc.scale.copy_(scale)
            post, comb, a = hc(X.float()[None])
            return {"a": a[0], "post": post[0], "comb": comb[0]}

        @torch.no_grad()
        def mhc_head(X, fn, base, scale, *, norm_eps, hc_eps):
            c = _config(M, theta=10000.0, yarn=False, hidden=X.shape[-1])
            c.rms_norm_eps, c.hc_eps = norm_eps, hc_eps
            hh = M.DeepseekV4HyperHead(c)
            hh.hc_fn.copy_(fn), hh.hc_base.copy_(base), hh.hc_scale.copy_(scale)
            return hh(X.float()[None])[0]

        @torch.no_grad()
        def shared_expert(x, w1, w3, w2, *, limit):
            c = _config(M, theta=10000.0, yarn=False, hidden=x.shape[-1])
            c.intermediate_size, c.swiglu_limit = w1.shape[0], limit
            mlp = M.DeepseekV4MLP(c).float()
            mlp.gate_proj.weight.copy_(w1), mlp.up_proj.weight.copy_(w3), mlp.down_proj.weight.copy_(w2)
            return {"y": mlp(x.float())}

        @torch.no_grad()
        def lm_head(X, hc_fn, hc_base, hc_scale, norm_weight, head_weight, *, norm_eps, hc_eps):
            c = _config(M, theta=10000.0, yarn=False, hidden=X.shape[-1])
            c.rms_norm_eps, c.hc_eps = norm_eps, hc_eps
            hh = M.DeepseekV4HyperHead(c).float()
            hh.hc_fn.copy_(hc_fn), hh.hc_base.copy_(hc_base), hh.hc_scale.copy_(hc_scale)
            norm = M.DeepseekV4RMSNorm(X.shape[-1], eps=norm_eps).float()
            norm.weight.copy_(norm_weight)
            head = torch.nn.Linear(X.shape[-1], head_weight.shape[0], bias=False)
            head.weight.copy_(head_weight)
            return {"logits": head(norm(hh(X.float()[None])))[0]}   # DeepseekV4Model: norm(hc_head(h)); lm_head

        @torch.no_grad()
        def q_path(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, positions, *, n_heads, eps, theta, yarn,
                   q_head_norm=True):
            # DeepseekV4Attention.forward's first four lines, with its own modules: q_a_proj -> q_a_norm ->
            # q_b_proj viewed [B, S, H, 512] and transposed -> q_b_norm -> apply_rotary_pos_emb
            from ..cases.qkv import _dequant

            if not q_head_norm:
                raise Unsupported(f"V4.1 (no per-head q norm): transformers {self.transformers.__version__} has no "
                                  "DeepSeek-V4.1 model (models/deepseek_v4's attention always applies q_b_norm)")

            wa = _dequant("wq_a", wq_a, wq_a_scale, x.shape[1])
            wb = _dequant("wq_b", wq_b, wq_b_scale, wa.shape[0])
            c = _config(M, theta=theta, yarn=yarn, hidden=x.shape[1])
            c.num_attention_heads, c.q_lora_rank, c.rms_norm_eps = n_heads, wa.shape[0], eps
            attn = M.DeepseekV4Attention(c, 0).float()
            attn.q_a_proj.weight.copy_(wa), attn.q_a_norm.weight.copy_(q_norm), attn.q_b_proj.weight.copy_(wb)
            h = x.float()[None]
            rot = M.DeepseekV4RotaryEmbedding(c)
            cos, sin = rot(h, position_ids=positions[None].long(), layer_type="compress")
            qr = attn.q_a_norm(attn.q_a_proj(h))
            q = attn.q_b_proj(qr).view(1, x.shape[0], n_heads, -1).transpose(1, 2)
            q = M.apply_rotary_pos_emb(attn.q_b_norm(q), cos, sin)
            return {"qr": qr[0], "q": q[0].transpose(0, 1)}

        return {
            "attn.q_path": Impl(q_path, f"{MOD}.DeepseekV4Attention (q_a_proj, q_a_norm, q_b_proj, q_b_norm) + "
                                "DeepseekV4RotaryEmbedding + apply_rotary_pos_emb", "torch",
                                note="the q lines of DeepseekV4Attention.forward, its modules called in that order; "
                                     "weights dequantised from the FP8 bytes"),
            "moe.shared_expert": Impl(shared_expert, f"{MOD}.DeepseekV4MLP", "torch",
                                      note="shared_experts module (clamped with swiglu_limit in 5.19)"),
            "head.lm": Impl(lm_head, f"{MOD}.DeepseekV4HyperHead + DeepseekV4RMSNorm + lm_head (nn.Linear)",
                            "torch", note="the chain DeepseekV4Model.forward / DeepseekV4ForCausalLM end with"),
            "norm.rms": Impl(norm_rms, f"{MOD}.DeepseekV4RMSNorm", "torch"),
            "rope.apply": Impl(rope, f"{MOD}.DeepseekV4RotaryEmbedding + apply_rotary_pos_emb", "torch",
                               note="compress rope table built for the case's theta / YaRN"),
            "mhc.pre": Impl(mhc_pre, f"{MOD}.DeepseekV4HyperConnection", "torch"),
            "mhc.head": Impl(mhc_head, f"{MOD}.DeepseekV4HyperHead", "torch"),
        }
