"""The whole DeepSeek-V4.1 model, golden (fp32; fp64 cross-check), composed from the V4.1 component goldens.

What changes from :class:`references.model.DSV4Model` (provenance: the installed vLLM 0.32.0, paths relative to
``site-packages/vllm``; nothing copied, the dataflow restated):

* **Lagged hyper-connections** (``models/deepseek_v41/nvidia/model.py:491-526``, ``:599-614``): each sub-layer
  computes its mixes (pre, post, comb) from its input stream as in V4, but collapses the streams with the
  *previous* sub-layer's pre-mix (``references.components.mhc.hc_pre_lagged``): layer 0's attention takes stream
  copy 0 of the broadcast embedding (identity pre-mix, ``:497-512``), every FFN the same layer's attention pre-mix,
  every later attention the previous layer's FFN pre-mix.
* **No learned HC head**: the final collapse uses the last FFN's pre-mix, ``h = sum_j pre_j X_j``, then the final
  norm and the LM head (``nvidia/model.py:1066-1071``: "v4.1 has no learned hc_head"). ``hc_head_*`` tensors of a
  checkpoint are not read.
* **Attention** (``models/deepseek_v41/attention.py``): no per-head q norm (``query_path(head_norm=False)``,
  ``:1082``); compressed layers (ratio 1 or 2) attend to the sliding window plus their index top-k of the
  compressed cache. Compressors live only on ``kv_source_layer_ids`` (``:573-600``), indexers only on
  ``index_source_layer_ids`` (``:431-482``); a compressed layer reads the compressed entries of
  ``cfg.kv_source_of(layer)`` and the top-k of ``cfg.index_source_of(layer)`` (the most recent source at or below
  it, ``:321-347``). An index source scores with its own ``wq_b`` / ``weights_proj`` against the index keys of its
  kv source, which derives them from the compressor latent (``references.components.indexer_v41.indexer_k_latent``;
  ``attention.py:434-458``: a non-owning index source shares the K cache of the latest kv source below it). The
  index source ``candidate_source_layer_id`` publishes candidate blocks that every later index source's top-k
  is restricted to (``indexer_v41.topk_in_candidates``, variant "dense"; ``attention.py:460-482``).
* **Routing**: every layer biased top-k (no hash layers, ``nvidia/model.py:149``).
* **Engram** on ``engram_layer_ids``: the n-gram memory (``references.components.engram``) is injected into the
  stream before the layer's attention HC pre, so the mixes see the injected stream (``nvidia/model.py:531-560``).
  Its weights are read as ``layers.{l}.engram.{table,table_scale,wkv,q_weight,k_weight}`` (a dict source spells
  them so; ``CheckpointReader`` maps them onto the checkpoint's ``engram.embed.weight`` / ``.scale`` / ``wkv.weight``,
  ``references.checkpoints.layout.ENGRAM_GOLDEN_NAMES``); the token map is an input (identity by default).

The compressor latent (the pooled, RMS-normalised, pre-RoPE row the index keys read) is produced by the compressor
golden itself: ``compress`` with an all-zero frequency table rotates by angle 0, which is exactly the identity.

Numerics: ``GOLDEN`` (default) is the golden. Other ``Numerics`` are passed to every component as
``DSV4Model`` does (bf16 activations at the component boundaries, ``linear_act`` on the FP8 linears' inputs, FP8 KV
nope dims, indexer q). ``references.numerics.serving_v41(profile)`` adds V4.1's own rounding points, which this
model routes to the components: the compressed cache's nope record (``kv_nope_compressed``, e4m3fn 448 on every
platform), the bf16 compressor latent the index keys read (compressor variant "vllm41", no FP8 store on the latent:
``latent_numerics``), the index keys' bf16 chain and FP8 store (``indexer_k_latent(numerics=...)``), and MXFP8 1x32
linear inputs (``linear_act``, ocp only), the bf16 store of Engram's injected stream. Not routed: Engram's inner bf16
kv (``engram_memory`` has no numerics) and the attention q quantisation of NVIDIA's FlashMLA / FlashInfer paths
(docs/v41-serving-numerics.md).

Incremental decode: ``prefill(ids)`` then ``step(ids)`` (any chunking) carries one ``V41LayerState`` per layer
(the compressor states, compressed entries and index keys live on the kv-source layers) and the token history
(Engram n-grams read the request's earlier tokens, ``common/engram.py:352-406``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .components._checks import round_act
from .components.attention import kv_projection, output_projection, query_path, sparse_attention, swa_indices
from .components.compressor import CompressorState, compress
from .components.embedding import embed, hc_expand
from .components.engram import engram_memory, hash_multipliers, hash_offsets, hash_primes, ngram_hash
from .components.head import lm_head
from .components.indexer import causal_bound, indexer_q, indexer_scores, indexer_topk, indexer_weights
from .components.indexer_v41 import candidate_blocks, indexer_k_latent, topk_in_candidates
from .components.mhc import hc_post, hc_pre_lagged
from .components.moe import gate_logits, moe, route
from .components.norms import rms_norm
from .components.qat import quant_kv_nope
from .components.rope import apply_rope, layer_inv_freq
from .config import DSV4Config
from .model import TRACE_KEYS, SequenceModel, _round, as_source, layer_experts, layer_weights
from .numerics import GOLDEN, Numerics

__all__ = ["DSV41Model", "V41State", "V41LayerState", "V41_TRACE_KEYS", "ENGRAM_KEYS", "SCORE_CHUNK"]

# the per-layer trace: the V4 keys plus what V4.1 shares between layers
V41_TRACE_KEYS = TRACE_KEYS + ("X", "engram_out", "attn_mix_pre", "ffn_mix_pre", "compressed_kv", "index_k",
                               "topk", "candidates")
ENGRAM_KEYS = ("table", "table_scale", "wkv", "q_weight", "k_weight")
SCORE_CHUNK = 256   # query rows per indexer-score block (memory T x N only per block)


@dataclass
class V41LayerState:
    """Decode state of one layer of one sequence. ``swa_kv``: the last ``sliding_window`` tokens' kv; on a kv
    source also the compressor states (roped entries and the pre-RoPE latent), every compressed entry so far and,
    when the layer owns an indexer K projection, every index key so far."""

    swa_kv: torch.Tensor | None = None
    compressor: CompressorState | None = None
    latent: CompressorState | None = None
    compressed_kv: torch.Tensor | None = None
    index_k: torch.Tensor | None = None


@dataclass
class V41State:
    next_pos: int = 0
    ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    layers: list[V41LayerState] = field(default_factory=list)


def _w(w, key):
    try:
        return w[key]
    except KeyError:
        raise KeyError(f"w: missing weight {key!r}") from None


class DSV41Model(SequenceModel):
    """Golden DeepSeek-V4.1 forward over a ``WeightSource`` (module docstring).

    dtype: float32 golden or float64 cross-check (weights cast to it). token_map: Engram's token id -> compressed
    id map [vocab] (default: identity, which needs ``engram_compressed_vocab_size == vocab_size``).
    """

    # how the Engram table's bytes are read: the checkpoint's (and vLLM's, on every platform) OCP e4m3
    # (common/engram.py:1045-1052); a hook for test mutants
    engram_dialect = "float8_e4m3fn"
    state_cls = V41State   # prefill / step (references.model.SequenceModel)

    def __init__(self, weights, cfg: DSV4Config, *, numerics: Numerics = GOLDEN, dtype=torch.float32,
                 token_map: torch.Tensor | None = None):
        if not cfg.is_v41:
            raise ValueError(f"cfg: DSV41Model needs a V4.1 config (version 'v4.1'), got {cfg.version!r} "
                             f"({cfg.name}); use references.model.DSV4Model")
        if cfg.num_nextn_predict_layers or cfg.dspark_target_layer_ids:
            raise ValueError("cfg: the V4.1 MTP / DSpark heads are not modelled (num_nextn_predict_layers, "
                             "dspark_target_layer_ids must be empty)")
        if 0 in cfg.engram_layer_ids:
            raise ValueError("cfg: engram on layer 0 is undefined (vLLM's first-layer path injects none, "
                             "models/deepseek_v41/nvidia/model.py:495-529)")
        self.src = as_source(weights)
        self.cfg = cfg
        self.numerics = numerics
        self.dtype = dtype
        self._cache: dict = {}
        if cfg.engram_layer_ids:
            if token_map is None:
                if cfg.engram_compressed_vocab_size != cfg.vocab_size:
                    raise ValueError("token_map: required when engram_compressed_vocab_size != vocab_size")
                token_map = torch.arange(cfg.vocab_size)
            n, N, H = len(cfg.engram_layer_ids), cfg.engram_max_ngram_size, cfg.engram_n_heads
            self.token_map = token_map.long()
            self.primes = hash_primes(n, N, H, cfg.engram_vocab_size)
            self.offsets = hash_offsets(self.primes)
            self.mult = hash_multipliers(cfg.engram_layer_ids, N, cfg.engram_compressed_vocab_size)

    # -- weights -------------------------------------------------------------------------------------
    def _cast(self, t):
        return t.to(self.dtype) if t.dtype.is_floating_point else t

    def layer(self, layer: int) -> dict:
        if layer not in self._cache:
            lay_cfg = self.cfg.replace(engram_layer_ids=(), engram_num_embeddings=()) if self.cfg.engram_layer_ids \
                else self.cfg
            w = {k: self._cast(v) for k, v in layer_weights(self.src, lay_cfg, layer).items()}
            if layer in self.cfg.engram_layer_ids:
                for k in ENGRAM_KEYS:
                    t = self.src.get(f"layers.{layer}.engram.{k}")
                    w[f"engram.{k}"] = t if k.startswith("table") else self._cast(t)
            self._cache[layer] = w
        return self._cache[layer]

    def top(self, name: str) -> torch.Tensor:
        key = ("top", name)
        if key not in self._cache:
            self._cache[key] = self._cast(self.src.get(name))
        return self._cache[key]

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, *, state: V41State | None = None, return_hidden: bool = False,
                positions: torch.Tensor | None = None):
        """Logits [T, vocab] of every position of ``ids`` [T] (one sequence); ``state`` continues a sequence.
        return_hidden: also a dict with ``embed``, ``layers`` (one trace per layer, ``V41_TRACE_KEYS``; ``out`` the
        layer's 4-stream residual, ``X`` its input stream), ``final`` (X^L), ``final_pre`` (the last FFN's pre-mix),
        ``h`` (the collapsed stream the final norm reads) and ``logits``."""
        cfg = self.cfg
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dim() != 1:
            raise ValueError(f"ids: expected a 1-D integer tensor [T], got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)} {tuple(getattr(ids, 'shape', ()))}")
        T = ids.shape[0]
        p0 = 0 if state is None else state.next_pos
        expect = torch.arange(p0, p0 + T)
        if positions is not None and not torch.equal(positions.long(), expect):
            raise ValueError(f"positions: must be {p0}..{p0 + T - 1} (contiguous; pass a V41State to continue)")
        positions = expect
        if state is not None and not state.layers:
            state.layers = [V41LayerState() for _ in range(cfg.num_hidden_layers)]
        hashes = self._hashes(ids, positions, state) if cfg.engram_layer_ids else None
        X = hc_expand(embed(ids, self.top("embed.weight")).to(self.dtype), cfg.hc_mult)
        hidden = {"embed": X, "layers": []} if return_hidden else None
        shared: dict = {"kv": {}, "index_k": {}, "topk": {}, "candidates": None}
        pre = None
        for layer in range(cfg.num_hidden_layers):
            trace = {} if return_hidden else None
            X, pre = self.decoder_layer(X, pre, layer, ids, positions, shared, hashes,
                                        None if state is None else state.layers[layer], trace)
            if return_hidden:
                hidden["layers"].append(trace)
        h = (pre.unsqueeze(-1) * X).sum(dim=-2)
        logits = lm_head(h, self.top("norm.weight"), self.top("head.weight"), eps=cfg.rms_norm_eps)
        if state is not None:
            state.next_pos = p0 + T
            state.ids = torch.cat((state.ids, ids.long()))
        if return_hidden:
            hidden.update(final=X, final_pre=pre, h=h, logits=logits)
            return logits, hidden
        return logits

    __call__ = forward

    # -- one block -------------------------------------------------------------------------------------
    def hc_pre_site(self, X, fn, base, scale, pre_prev, **kw):
        """One HC pre site: V4.1's lagged collapse (``hc_pre_lagged``; a hook for test mutants)."""
        return hc_pre_lagged(X, fn, base, scale, pre_prev, **kw)

    def decoder_layer(self, X, pre_prev, layer, ids, positions, shared, hashes, st, trace):
        cfg, w = self.cfg, self.layer(layer)
        eps, kw = cfg.rms_norm_eps, dict(norm_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps,
                                         sinkhorn_iters=cfg.hc_sinkhorn_iters)
        X_in = X
        eng = None
        if layer in cfg.engram_layer_ids:
            j = cfg.engram_layer_ids.index(layer)
            eng = engram_memory(X, hashes[:, j], w["engram.table"], w["engram.table_scale"], w["engram.wkv"],
                                w["engram.q_weight"], w["engram.k_weight"], None, eps=eps,
                                dialect=self.engram_dialect)["out"].to(self.dtype)
            # serving: the gate kernel stores the injected stream in the stream's dtype (bf16: output =
            # torch.empty_like(hidden_states), common/engram.py:1704-1717); the bf16 kv = rows . wkv inside
            # engram_memory is not routed
            eng = round_act(eng, self.numerics)
            X = eng
        a, post_a, comb_a, pre_a = self.hc_pre_site(X, w["hc_attn_fn"], w["hc_attn_base"], w["hc_attn_scale"],
                                                    pre_prev, numerics=self.numerics, **kw)
        x_attn = _round(rms_norm(a, w["attn_norm"], eps), self.numerics)
        attn, info = self.attention(x_attn, w, layer, positions, shared, st)
        X1 = hc_post(attn, X, post_a, comb_a, numerics=self.numerics)
        f, post_f, comb_f, pre_f = self.hc_pre_site(X1, w["hc_ffn_fn"], w["hc_ffn_base"], w["hc_ffn_scale"], pre_a,
                                                    numerics=self.numerics, **kw)
        x_ffn = _round(rms_norm(f, w["ffn_norm"], eps), self.numerics)
        logits = gate_logits(x_ffn, w["ffn.gate"])
        rw, rid = route(logits, bias=w["ffn.gate.bias"], topk=cfg.num_experts_per_tok,
                        route_scale=cfg.routed_scaling_factor)
        shared_e = {k: w[f"ffn.shared_experts.{k}"] for k in ("w1", "w3", "w2")}
        y = moe(x_ffn, rid, rw, layer_experts(w), shared_e, limit=cfg.swiglu_limit, numerics=self.numerics)
        X2 = hc_post(y, X1, post_f, comb_f, numerics=self.numerics)
        if trace is not None:
            trace.update(X=X_in, engram_out=eng, attn_pre=a, attn_post=post_a, attn_comb=comb_a, attn_in=x_attn,
                         attn_out=attn, after_attn=X1, ffn_pre=f, ffn_post=post_f, ffn_comb=comb_f, ffn_in=x_ffn,
                         router_logits=logits, route_weights=rw, route_ids=rid, ffn_out=y, out=X2,
                         attn_mix_pre=pre_a, ffn_mix_pre=pre_f, **info)
        return X2, pre_f

    # -- attention -------------------------------------------------------------------------------------
    def index_source_of(self, layer: int):
        """The layer whose index top-k ``layer`` attends with (``cfg.index_source_of``; a hook for test mutants)."""
        return self.cfg.index_source_of(layer)

    def attention(self, x, w, layer, positions, shared, st):
        """V4.1 attention of one layer on its attn_norm output ``x`` [T, D] -> (y [T, D], shared-state info)."""
        cfg, nm = self.cfg, self.numerics
        eps, d, r = cfg.rms_norm_eps, cfg.head_dim, cfg.qk_rope_head_dim
        ratio = cfg.compress_ratio(layer)
        inv_freq = layer_inv_freq(cfg, layer).to(self.dtype)
        p0 = int(positions[0]) if positions.numel() else 0
        qr, q = query_path(x, _w(w, "attn.wq_a"), _w(w, "attn.q_norm"), _w(w, "attn.wq_b"),
                           n_heads=cfg.num_attention_heads, eps=eps, numerics=nm, head_norm=False)
        q = round_act(apply_rope(q, positions, inv_freq, r), nm)
        kv = kv_projection(x, _w(w, "attn.wkv"), _w(w, "attn.kv_norm"), eps=eps, numerics=nm)
        kv = quant_kv_nope(round_act(apply_rope(kv, positions, inv_freq, r), nm), d - r, nm)
        prev = st.swa_kv if st is not None and st.swa_kv is not None else kv.new_zeros(0, d)
        kv_tokens, token_offset = torch.cat((prev, kv)), p0 - prev.shape[0]
        info = {"compressed_kv": None, "index_k": None, "topk": None, "candidates": None}
        idx = swa_indices(positions, cfg.sliding_window)
        idx = torch.where(idx >= token_offset, idx - token_offset, torch.full_like(idx, -1))
        comp = None
        if ratio:
            ks, isrc = cfg.kv_source_of(layer), self.index_source_of(layer)
            if ks == layer:
                self._compress(x, w, layer, positions, inv_freq, shared, st)
            if isrc == layer:
                self._index(x, qr, w, layer, positions, inv_freq, shared)
            comp, topk = shared["kv"][ks], shared["topk"][isrc]
            # candidates: what the candidate source published / what a later index source was restricted to
            cs = cfg.candidate_source_layer_id
            info.update(compressed_kv=comp, index_k=shared["index_k"].get(ks), topk=topk,
                        candidates=shared["candidates"] if (isrc == layer and 0 <= cs <= layer) else None)
            bound = causal_bound(positions, ratio)
            bad = (topk >= bound[:, None]) | (topk < -1)
            if bad.any():
                t, j = bad.nonzero()[0].tolist()
                raise ValueError(f"topk: layer {layer} row {t} selects entry {int(topk[t, j])} outside [-1, "
                                 f"{int(bound[t])}) (a future compressed entry)")
            cidx = torch.where(topk >= 0, topk + kv_tokens.shape[0], torch.full_like(topk, -1))
            idx = torch.cat((idx, cidx), dim=1)
        kv_all = kv_tokens if comp is None else torch.cat((kv_tokens, comp.to(kv_tokens.dtype)))
        o = sparse_attention(q, kv_all, idx, _w(w, "attn.attn_sink"), scale=d ** -0.5, numerics=nm)
        y = output_projection(round_act(o, nm), positions, inv_freq, _w(w, "attn.wo_a"), _w(w, "attn.wo_b"),
                              o_groups=cfg.o_groups, rope_dim=r, numerics=nm)
        if st is not None:
            st.swa_kv = kv_tokens[-cfg.sliding_window:]
        return y, info

    def latent_numerics(self, cnm: Numerics) -> Numerics:
        """The compressor latent's numerics: the compressed-cache numerics without its FP8 store (vLLM keeps the
        latent in bf16, ``common/ops/fused_compress_quant_cache.py:216-221``; a hook for test mutants)."""
        return replace(cnm, kv_nope=None)

    def _compress(self, x, w, layer, positions, inv_freq, shared, st):
        """A kv source: its compressed entries (RoPE'd, for attention) and, with an indexer K projection, the
        index keys from the pre-RoPE latent; all entries so far are published in ``shared``."""
        cfg, nm = self.cfg, self.numerics
        m, d = cfg.compress_ratio(layer), cfg.head_dim
        cw = (_w(w, "attn.compressor.wkv"), w.get("attn.compressor.wgate"), None, _w(w, "attn.compressor.norm"))
        # V4.1 serving (numerics.serving_v41): the compressed cache has its own nope record, the latent the index
        # keys read is the bf16 row before any FP8 store (variant "vllm41": fp32 pooling + norm, one bf16 latent)
        cnm = nm if nm.kv_nope_compressed is None else replace(nm, kv_nope=nm.kv_nope_compressed)
        kw = dict(ratio=m, head_dim=d, eps=cfg.rms_norm_eps, rope_dim=cfg.qk_rope_head_dim, kind="attn",
                  variant="vllm41")
        lnm = self.latent_numerics(cnm)
        zero = torch.zeros_like(inv_freq)   # angle 0: the pre-RoPE latent, exactly
        if st is None:
            comp = compress(x, *cw, inv_freq=inv_freq, numerics=cnm, **kw)
            lat_all, first = compress(x, *cw, inv_freq=zero, numerics=lnm, **kw), 0
        else:
            if st.compressor is None:
                st.compressor = CompressorState(*cw, inv_freq=inv_freq, numerics=cnm, **kw)
                st.latent = CompressorState(*cw, inv_freq=zero, numerics=lnm, **kw)
            new, _ = st.compressor.update(x, positions)
            lat_all, _ = st.latent.update(x, positions)
            first = 0 if st.compressed_kv is None else st.compressed_kv.shape[0]
            st.compressed_kv = new if st.compressed_kv is None else torch.cat((st.compressed_kv, new))
            comp = st.compressed_kv
        shared["kv"][layer] = comp
        if "attn.indexer.wk" in w:
            bpos = torch.arange(first, first + lat_all.shape[0]) * m + (m - 1)
            newk = indexer_k_latent(lat_all, w["attn.indexer.wk"], w["attn.indexer.k_norm"], bpos, inv_freq,
                                    ratio=m, eps=cfg.rms_norm_eps, rope_dim=cfg.qk_rope_head_dim, numerics=nm)
            if st is not None:
                st.index_k = newk if st.index_k is None else torch.cat((st.index_k, newk))
                newk = st.index_k
            shared["index_k"][layer] = newk

    def _index(self, x, qr, w, layer, positions, inv_freq, shared):
        """An index source: its scores against its kv source's index keys -> causal top-k (dense on the
        candidate source, which publishes its candidate blocks; restricted to them on later index sources)."""
        cfg = self.cfg
        m, ks = cfg.compress_ratio(layer), cfg.kv_source_of(layer)
        if ks not in shared["index_k"]:
            raise KeyError(f"w: layer {ks} (kv source of index source {layer}) has no attn.indexer.wk / k_norm")
        k = shared["index_k"][ks]
        iq = indexer_q(qr, _w(w, "attn.indexer.wq_b"), positions, inv_freq, n_heads=cfg.index_n_heads,
                       head_dim=cfg.index_head_dim, numerics=self.numerics, rope_dim=cfg.qk_rope_head_dim)
        iw = indexer_weights(x, _w(w, "attn.indexer.weights_proj"), n_heads=cfg.index_n_heads,
                             head_dim=cfg.index_head_dim)
        cs = cfg.candidate_source_layer_id
        tops, cands = [], []
        for a in range(0, x.shape[0], SCORE_CHUNK):
            b = min(a + SCORE_CHUNK, x.shape[0])
            s = indexer_scores(iq[a:b], k, iw[a:b])
            pos = positions[a:b]
            if layer == cs:
                cands.append(candidate_blocks(s, pos, ratio=m, topk_blocks=cfg.candidate_topk_blocks,
                                              block_size=cfg.candidate_block_size))
            if 0 <= cs < layer:
                tops.append(topk_in_candidates(s, pos, shared["candidates"][a:b], ratio=m, topk=cfg.index_topk,
                                               block_size=cfg.candidate_block_size))
            else:
                tops.append(indexer_topk(s, pos, ratio=m, topk=cfg.index_topk))
        if layer == cs:
            shared["candidates"] = torch.cat(cands)
        shared["topk"][layer] = torch.cat(tops)

    # -- engram hashes -----------------------------------------------------------------------------------
    def _hashes(self, ids, positions, state):
        cfg = self.cfg
        hist = torch.zeros(0, dtype=torch.long) if state is None else state.ids
        depth = cfg.engram_max_ngram_size - 1
        lb = hist[-depth:].flip(0) if depth else hist[:0]        # column c = the token c + 1 before the chunk
        lb = torch.cat((lb, torch.full((depth - lb.shape[0],), -1, dtype=torch.long)))[None, :]
        return ngram_hash(ids.long(), positions, torch.tensor([0, ids.shape[0]]), self.token_map,
                          torch.zeros(ids.shape[0], dtype=torch.bool), lb, torch.zeros_like(lb, dtype=torch.bool),
                          self.mult, self.primes, self.offsets, pad_id=int(self.token_map[cfg.engram_pad_token_id]))
