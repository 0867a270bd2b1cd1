"""The whole DSV4 model (spec section 2): decoder layers, final head, MTP, prefill and incremental decode.

Dataflow per position (residual state X in R^{hc x D}):

    X0 = hc_expand(Embed[ids])
    per layer l:  (a, post, comb) = HC_pre(X; hc_attn_*)
                  X' = HC_post(Attn_l(attn_norm(a)), X, post, comb)
                  (f, post, comb) = HC_pre(X'; hc_ffn_*)
                  X  = HC_post(MoE_l(ffn_norm(f), ids), X', post, comb)
    logits = Head . norm(HC_head(X^L; hc_head_*))            (every position; OFF computes only the last)

Weights come from a ``WeightSource`` (``get(full_checkpoint_name) -> dequantised float tensor``): an
in-memory dict (``DictWeights``) or ``references.checkpoints.CheckpointReader`` (lazy, one tensor at a
time). ``layer_weights`` turns one block into the layer-relative dict the component references take
(DESIGN.md: ``attn.wq_a``, ``ffn.gate.bias``, ``hc_attn_fn``, ... with ``.weight`` dropped).

Incremental decode: ``DSV4Model.prefill(ids)`` then ``step(ids)`` (any chunk sizes) carries one
``AttentionState`` per layer (``ModelState``); it reproduces a single full forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from .checkpoints.layout import layer_prefix, layer_tensors, relative_key
from .components.attention import AttentionState, attention_layer
from .components.embedding import embed, hc_expand
from .components.head import final_head
from .components.mhc import hc_post, hc_pre
from .components.moe import gate_logits, moe, route
from .components.mtp import mtp_input, mtp_logits
from .components.norms import rms_norm
from .config import DSV4Config
from .numerics import GOLDEN, Numerics

__all__ = ["WeightSource", "DictWeights", "Variants", "ModelState", "layer_weights", "LayerWeights", "decoder_layer",
           "DSV4Model", "forward"]


@runtime_checkable
class WeightSource(Protocol):
    def get(self, name: str) -> torch.Tensor:
        """Dequantised float tensor (int64 for ``tid2eid``) of the full checkpoint name ``name``."""
        ...


class DictWeights:
    """A ``WeightSource`` over an in-memory ``{full checkpoint name: tensor}`` mapping."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors

    def get(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"weights: no tensor {name!r}") from None


def as_source(weights) -> WeightSource:
    if isinstance(weights, Mapping):
        return DictWeights(weights)
    if not isinstance(weights, WeightSource):
        raise TypeError(f"weights: need a mapping or an object with get(name), got {type(weights).__name__}")
    return weights


def layer_weights(src, cfg: DSV4Config, layer: int, *, lazy_experts: bool = False):
    """Read one block's tensors (and no other layer's) into a layer-relative dict.

    lazy_experts: return a ``LayerWeights`` mapping instead, whose routed-expert entries are read from the
    source on each access (what a full-size checkpoint needs: a Flash layer's 256 experts are ~26 GB in fp32).
    """
    if lazy_experts:
        return LayerWeights(src, cfg, layer)
    src = as_source(src)
    p = layer_prefix(cfg, layer)
    return {relative_key(t.name): src.get(p + t.name) for t in layer_tensors(cfg, layer)}


EXPERT_PREFIX = "ffn.experts."


class LayerWeights(Mapping):
    """One block's layer-relative weights over a ``WeightSource``: every tensor is read when the view is
    built, except the routed experts (``ffn.experts.{e}.{w1,w3,w2}``), which are read on each access and
    never kept (``moe`` asks for routed experts' tensors only, one at a time). ``cast`` maps each tensor read
    (the model's compute dtype). The view holds no other layer's tensors; dropping it frees the layer."""

    def __init__(self, src, cfg: DSV4Config, layer: int, *, cast=None):
        self.src = as_source(src)
        self.layer = layer
        self._cast = cast or (lambda t: t)
        p = layer_prefix(cfg, layer)
        self._names = {relative_key(t.name): p + t.name for t in layer_tensors(cfg, layer)}
        self._eager = {k: self._cast(self.src.get(n)) for k, n in self._names.items()
                       if not k.startswith(EXPERT_PREFIX)}

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._eager.get(key)
        if t is not None:
            return t
        if key in self._names:
            return self._cast(self.src.get(self._names[key]))
        raise KeyError(key)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, key) -> bool:
        return key in self._names


@dataclass(frozen=True)
class Variants:
    """Source divergences (spec section 8) as named choices; every default follows current OFF.

    route   : "official" | "hf-vllm"   renormalisation eps (8.6)
    moe     : "official" | "after-w2"  routing-weight placement (8.5)
    shared  : "official" | "no-clamp"  shared-expert clamp (8.2)
    hc_post : "official" | "hf"        post/comb rounded to bf16 (8.7)
    rope    : "official" | "vllm-yarn-on-swa"   (8.1, attention helper)
    compressor : "official" | "vllm"   (8.8, attention helper)
    norm    : "official" | "hf"        RMSNorm weight-multiply rounding (3.2)
    mtp     : "official" | "vllm"      embedding at position 0 zeroed (3.15)
    """

    route: str = "official"
    moe: str = "official"
    shared: str = "official"
    hc_post: str = "official"
    rope: str = "official"
    compressor: str = "official"
    norm: str = "official"
    mtp: str = "official"

    @classmethod
    def hf(cls, *, bf16_streams: bool = False) -> Variants:
        """transformers 5.20+ (hf-api.md section 5): routing weight after W2, renorm eps 1e-20; HF casts
        post/comb to the *stream* dtype, which only rounds when the streams are bf16."""
        return cls(route="hf-vllm", moe="after-w2", hc_post="hf" if bf16_streams else "official")


OFFICIAL = Variants()


def decoder_layer(X: torch.Tensor, w: Mapping[str, torch.Tensor], cfg: DSV4Config, layer: int,
                  ids: torch.Tensor, positions: torch.Tensor, *, numerics: Numerics = GOLDEN,
                  state: AttentionState | None = None, variants: Variants = OFFICIAL,
                  trace: dict | None = None) -> torch.Tensor:
    """One DSV4 block: ``X [T, hc, D]`` -> ``X [T, hc, D]``.

    ``w`` is the layer-relative weight dict (``layer_weights``); ``ids`` [T] the token ids (hash routing);
    ``positions`` [T] (0..T-1 without a state, continuing at ``state.next_pos`` with one). If ``trace`` is a
    dict, every component output is stored in it (keys listed in ``TRACE_KEYS``).
    """
    eps, hc_eps, iters = cfg.rms_norm_eps, cfg.hc_eps, cfg.hc_sinkhorn_iters
    if X.dim() != 3 or X.shape[1:] != (cfg.hc_mult, cfg.hidden_size):
        raise ValueError(f"X: expected [T, {cfg.hc_mult}, {cfg.hidden_size}], got {tuple(X.shape)}")
    a, post_a, comb_a = hc_pre(X, w["hc_attn_fn"], w["hc_attn_base"], w["hc_attn_scale"], norm_eps=eps,
                               hc_eps=hc_eps, sinkhorn_iters=iters, numerics=numerics)
    x_attn = _round(rms_norm(a, w["attn_norm"], eps, variant=variants.norm), numerics)
    attn = attention_layer(x_attn, w, cfg, layer, positions, numerics=numerics, variant=variants.rope,
                           compressor_variant=variants.compressor, norm_variant=variants.norm, state=state)
    X1 = hc_post(attn, X, post_a, comb_a, variant=variants.hc_post, numerics=numerics)

    f, post_f, comb_f = hc_pre(X1, w["hc_ffn_fn"], w["hc_ffn_base"], w["hc_ffn_scale"], norm_eps=eps,
                               hc_eps=hc_eps, sinkhorn_iters=iters, numerics=numerics)
    x_ffn = _round(rms_norm(f, w["ffn_norm"], eps, variant=variants.norm), numerics)
    logits = gate_logits(x_ffn, w["ffn.gate"])
    if cfg.is_hash_layer(layer):
        rw, rid = route(logits, topk=cfg.num_experts_per_tok, route_scale=cfg.routed_scaling_factor,
                        hash_ids=w["ffn.gate.tid2eid"][ids.long()], variant=variants.route)
    else:
        rw, rid = route(logits, bias=w["ffn.gate.bias"], topk=cfg.num_experts_per_tok,
                        route_scale=cfg.routed_scaling_factor, variant=variants.route)
    experts = layer_experts(w)
    shared = {k: w[f"ffn.shared_experts.{k}"] for k in ("w1", "w3", "w2")}
    y = moe(x_ffn, rid, rw, experts, shared, limit=cfg.swiglu_limit, variant=variants.moe,
            shared_variant=variants.shared, numerics=numerics)
    X2 = hc_post(y, X1, post_f, comb_f, variant=variants.hc_post, numerics=numerics)
    if trace is not None:
        trace.update(attn_pre=a, attn_post=post_a, attn_comb=comb_a, attn_in=x_attn, attn_out=attn, after_attn=X1,
                     ffn_pre=f, ffn_post=post_f, ffn_comb=comb_f, ffn_in=x_ffn, router_logits=logits,
                     route_weights=rw, route_ids=rid, ffn_out=y, out=X2)
    return X2


TRACE_KEYS = ("attn_pre", "attn_post", "attn_comb", "attn_in", "attn_out", "after_attn", "ffn_pre", "ffn_post",
              "ffn_comb", "ffn_in", "router_logits", "route_weights", "route_ids", "ffn_out", "out")


def layer_experts(w):
    """The routed experts of a layer dict, as ``moe`` takes them: stacked tensors when the dict holds
    ``ffn.experts.w2`` [E, D, I] with ``ffn.experts.w13`` [E, 2I, D] (or ``.w1`` and ``.w3`` [E, I, D]),
    the layout an engine keeps in memory; otherwise the checkpoint's ``ffn.experts.{e}.{w1,w3,w2}``, one
    expert at a time (lazy sources decode each when it is used)."""
    if "ffn.experts.w2" in w:
        keys = ("w13", "w2") if "ffn.experts.w13" in w else ("w1", "w3", "w2")
        missing = [f"ffn.experts.{k}" for k in keys if f"ffn.experts.{k}" not in w]
        if missing:
            raise KeyError(f"w: stacked experts ffn.experts.w2 need ffn.experts.w13 or ffn.experts.w1 and .w3 "
                           f"beside them; missing {missing}")
        return {k: w[f"ffn.experts.{k}"] for k in keys}
    return _ExpertView(w)


class _ExpertView:
    """Experts of a layer dict as the callable ``e -> {"w1","w3","w2"}`` that ``moe`` accepts."""

    def __init__(self, w):
        self.w = w

    def __call__(self, e: int):
        return _OneExpert(self.w, e)


class _OneExpert(Mapping):
    """``{"w1","w3","w2"}`` of one expert, each looked up only when used (a lazy layer dict decodes it then)."""

    def __init__(self, w, e: int):
        self.w, self.e = w, e

    def __getitem__(self, k):
        if k not in ("w1", "w3", "w2"):
            raise KeyError(k)
        try:
            return self.w[f"ffn.experts.{self.e}.{k}"]
        except KeyError as err:
            raise KeyError(f"w: missing weights of expert {self.e} ({err})") from None

    def __iter__(self):
        return iter(("w1", "w3", "w2"))

    def __len__(self):
        return 3


def _round(x, numerics: Numerics):
    return x if numerics.act_dtype is None else x.to(numerics.act_dtype).to(x.dtype)


@dataclass
class ModelState:
    """Decode state of one sequence: the next position and one ``AttentionState`` per layer (MTP last)."""

    next_pos: int = 0
    layers: list[AttentionState] = field(default_factory=list)
    mtp: AttentionState = field(default_factory=AttentionState)


class SequenceModel:
    """prefill / step over ``forward(ids, state=...)`` for a model whose decode state is ``state_cls()``."""

    state_cls: type = ModelState

    def prefill(self, ids: torch.Tensor, state=None):
        """Start (or continue) a sequence; returns (logits, state)."""
        state = state if state is not None else self.state_cls()
        return self.forward(ids, state=state), state

    def step(self, ids: torch.Tensor, state):
        """Decode one or more further tokens of the sequence held by ``state``; returns their logits."""
        if state is None:
            raise ValueError(f"state: step() needs the {self.state_cls.__name__} returned by prefill()")
        return self.forward(ids, state=state)


class DSV4Model(SequenceModel):
    """Golden DSV4 forward over a ``WeightSource``.

    dtype: the compute dtype (float32 golden, float64 cross-check); weights are cast to it.
    cache_weights: keep every layer's weights after first use (fast decode; the tiny model is ~80 MB in
    fp32). False streams one layer at a time from the source (what a full-size checkpoint needs): a layer's
    weights are read when the layer runs and dropped before the next one is read.
    lazy_experts: read routed experts only when ``moe`` routes a token to them, one at a time, never kept
    (``LayerWeights``); default: on exactly when ``cache_weights`` is off.
    """

    def __init__(self, weights, cfg: DSV4Config, *, numerics: Numerics = GOLDEN, dtype=torch.float32,
                 variants: Variants = OFFICIAL, cache_weights: bool = True, lazy_experts: bool | None = None):
        self.src = as_source(weights)
        self.cfg = cfg
        self.numerics = numerics
        self.dtype = dtype
        self.variants = variants
        self.cache_weights = cache_weights
        self.lazy_experts = (not cache_weights) if lazy_experts is None else lazy_experts
        self._cache: dict = {}

    # -- weights -------------------------------------------------------------------------------------
    def _cast(self, t):
        return t.to(self.dtype) if t.dtype.is_floating_point else t

    def layer(self, layer: int) -> dict:
        if layer in self._cache:
            return self._cache[layer]
        if self.lazy_experts:
            w = LayerWeights(self.src, self.cfg, layer, cast=self._cast)
        else:
            w = {k: self._cast(v) for k, v in layer_weights(self.src, self.cfg, layer).items()}
        if self.cache_weights:
            self._cache[layer] = w
        return w

    def top(self, name: str) -> torch.Tensor:
        key = ("top", name)
        if key in self._cache:
            return self._cache[key]
        t = self._cast(self.src.get(name))
        if self.cache_weights:
            self._cache[key] = t
        return t

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, *, positions: torch.Tensor | None = None, state: ModelState | None = None,
                return_hidden: bool = False):
        """Logits [T, vocab] for every position of ``ids`` [T] (1-D: one sequence).

        state=None: ``ids`` is a whole sequence (positions 0..T-1). With a ``ModelState`` the call continues
        the sequence at ``state.next_pos`` (prefill, chunked prefill or decode steps) and updates it.
        return_hidden: also return a dict with ``embed`` [T, hc, D], ``layers`` (one trace dict per layer,
        see ``TRACE_KEYS``; ``out`` is the layer's 4-stream residual), ``final`` (= X^L, the pre-HC-head
        residual MTP consumes), ``h`` (HC_head output) and ``logits``.
        """
        cfg = self.cfg
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dim() != 1:
            raise ValueError(f"ids: expected a 1-D integer tensor [T], got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
        T = ids.shape[0]
        p0 = 0 if state is None else state.next_pos
        expect = torch.arange(p0, p0 + T)
        if positions is None:
            positions = expect
        elif not torch.equal(positions.long(), expect):
            raise ValueError(f"positions: must be {p0}..{p0 + T - 1} (contiguous; pass a ModelState to continue)")
        if state is not None and not state.layers:
            state.layers = [AttentionState() for _ in range(cfg.num_hidden_layers)]
        X = hc_expand(embed(ids, self.top("embed.weight")).to(self.dtype), cfg.hc_mult)
        hidden = {"embed": X, "layers": []} if return_hidden else None
        for layer in range(cfg.num_hidden_layers):
            trace = {} if return_hidden else None
            X = decoder_layer(X, self.layer(layer), cfg, layer, ids, positions, numerics=self.numerics,
                              state=None if state is None else state.layers[layer], variants=self.variants,
                              trace=trace)
            if return_hidden:
                hidden["layers"].append(trace)
            if not self.cache_weights:
                self._cache.pop(layer, None)
        head = final_head(X, self.top("hc_head_fn"), self.top("hc_head_base"), self.top("hc_head_scale"),
                          self.top("norm.weight"), self.top("head.weight"), norm_eps=cfg.rms_norm_eps,
                          hc_eps=cfg.hc_eps, numerics=self.numerics, return_h=return_hidden)
        h, logits = head if return_hidden else (None, head)
        if state is not None:
            state.next_pos = p0 + T
        if return_hidden:
            hidden.update(final=X, h=h, logits=logits)
            return logits, hidden
        return logits

    __call__ = forward

    # -- MTP ------------------------------------------------------------------------------------------
    def mtp(self, X_main: torch.Tensor, next_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
            state: ModelState | None = None, k: int = 0) -> torch.Tensor:
        """MTP layer ``k`` (spec 3.15): logits for token t+2 from X_main[t] (pre-HC-head residual of the
        main model, ``hidden["final"]``) and ``next_ids[t]`` = token t+1. Positions as in ``forward``
        (the MTP block has its own attention state ``state.mtp``)."""
        cfg = self.cfg
        if cfg.num_nextn_predict_layers <= k:
            raise ValueError(f"k: the config has {cfg.num_nextn_predict_layers} MTP layer(s)")
        layer = cfg.num_hidden_layers + k
        T = X_main.shape[0]
        p0 = 0 if state is None else state.mtp.next_pos
        positions = torch.arange(p0, p0 + T) if positions is None else positions
        w = self.layer(layer)
        X = mtp_input(X_main.to(self.dtype), next_ids, self.top("embed.weight"), w, eps=cfg.rms_norm_eps,
                      positions=positions, variant=self.variants.mtp, numerics=self.numerics)
        X = decoder_layer(X, w, cfg, layer, next_ids, positions, numerics=self.numerics,
                          state=None if state is None else state.mtp, variants=self.variants)
        return mtp_logits(X, w, self.top("head.weight"), norm_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps,
                          numerics=self.numerics)


def forward(ids: torch.Tensor, weights, cfg: DSV4Config, *, numerics: Numerics = GOLDEN,
            positions: torch.Tensor | None = None, state: ModelState | None = None, return_hidden: bool = False,
            dtype=torch.float32, variants: Variants = OFFICIAL):
    """Functional form of ``DSV4Model(weights, cfg, ...).forward(ids, ...)`` (weights read on each call)."""
    return DSV4Model(weights, cfg, numerics=numerics, dtype=dtype, variants=variants).forward(
        ids, positions=positions, state=state, return_hidden=return_hidden)
