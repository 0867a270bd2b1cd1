"""The DSpark draft head's own math (DeepSeek-V4 / V4.1 bundled drafter; docs/dspark.md has the whole head).

DSpark drafts a block of ``N = dspark_block_size`` tokens in one parallel pass of its own decoder layers, then
adds a sequential low-rank Markov bias to each position's logits. The decoder layers (mHC, attention over the
sliding-window context + the whole block, MoE with ``dspark_n_routed_experts`` top-``dspark_num_experts_per_tok``)
are DeepSeek-V4 layers and are covered by the layer goldens; this module holds what is specific to DSpark.
Paths are relative to the installed vLLM 0.32.0 (``site-packages/vllm``).

1. Taps (``dspark_taps``). For each id ``l`` of ``dspark_target_layer_ids`` the target model's hc residual stream
   at a layer boundary, averaged over the ``hc_mult`` copies: ``tap_l[t] = mean_h S[b(l)][t, h, :]`` where
   ``S[i]`` is the stream after ``i`` backbone layers (``S[0]`` the embedding broadcast, ``S[L]`` the last
   layer's output). The capture of aux layer ``A`` is the stream after ``A`` layers (``deepseek_v41/amd/model.py
   :667-673``, ``deepseek_v4/amd/model.py:1201-1212``: ``idx + 1 in aux_hidden_state_layers`` ->
   ``mhc_post(...).mean(dim=1)``). Which ``A`` an id means differs by release (variant ``taps``):
   "v4.1": ``A = l`` (the attention *input* of layer ``l``), "v4": ``A = l + 1`` (the output of layer ``l``)
   (``v1/worker/gpu/spec_decode/eagle/eagle3_utils.py:112-121``). The taps are concatenated in id order.
2. Context projection (``dspark_main_x``): ``main_x = main_norm(main_proj(concat taps))`` (RMSNorm with weight;
   ``deepseek_v41/nvidia/dspark.py:102-110``, ``:161-166``). Every draft layer derives its sliding-window context
   KV from this same ``main_x`` (``kv_norm(wkv(main_x))`` + RoPE + the SWA cache insert, ``:168-199``): that is
   attn.kv_insert's math and is not repeated here.
3. The query block (``dspark_block``): per request, ``N`` query tokens ``[anchor, noise, ..., noise]`` at
   positions ``p + 1 .. p + N`` where ``p`` is the position of the request's last *accepted* context token and
   ``anchor`` is the token just sampled (the bonus token; the next prefill token while chunking). Every position
   predicts the next token (``sample_from_anchor``; ``v1/worker/gpu/spec_decode/dspark/speculator.py:46-55``,
   ``dflash/speculator.py:595-680``: ``query_pos = last_valid_pos + 1 + off``, ``input_id = bonus if off == 0
   else parallel_drafting_token_id``, the position clamped to ``max_model_len - 1``). The noise id is the config's
   ``dspark_noise_token_id`` (``v1/worker/gpu/spec_decode/utils.py:92-115``). The block enters the draft layers as
   the shared embedding of these ids broadcast to the hc copies (``nvidia/dspark.py:207-228``).
4. The Markov stage (``markov_chain``): with ``U_k`` the base logits of position ``k`` (the shared LM head on the
   normed collapsed draft output, ``nvidia/dspark.py:343-349``) and ``prev_0 = anchor``:
   ``e_k = W1[prev_k]`` (``markov_w1``: an embedding [V, r], r = ``dspark_markov_rank``),
   ``logits_k = U_k + W2 e_k`` (``markov_w2`` [V, r] as a linear), ``token_k = argmax logits_k`` (greedy; with
   sampling the draw replaces the argmax), ``prev_{k+1} = token_k`` (``dspark/speculator.py:156-199``,
   ``model_executor/models/qwen3_dspark.py:48-93``).
5. The confidence head (``confidence``): ``c_k = sigmoid(w . [h_k ; e_k])``, ``h_k`` the draft's PRE-norm head
   hidden (``speculator.py:165``, ``:192-196``; ``nvidia/dspark.py:334-365``), in fp32 (``qwen3_dspark.py
   :164-189``).
"""

from __future__ import annotations

import torch

from ._validate import check_float, compute_dtype
from .norms import rms_norm

__all__ = ["TAP_VARIANTS", "tap_stream_index", "dspark_taps", "dspark_main_x", "dspark_block", "markov_chain",
           "confidence"]

TAP_VARIANTS = ("v4.1", "v4")


def tap_stream_index(layer_id: int, variant: str, n_streams: int) -> int:
    """The stream boundary ``S[i]`` a target-layer id reads (module docstring, step 1)."""
    if variant not in TAP_VARIANTS:
        raise ValueError(f"variant: unknown tap semantics {variant!r}; known {TAP_VARIANTS}")
    i = int(layer_id) + (1 if variant == "v4" else 0)
    if not 0 <= i < n_streams:
        raise ValueError(f"dspark_target_layer_ids: id {layer_id} ({variant}) reads stream {i}, outside the "
                         f"{n_streams} stream boundaries given (L + 1 for L backbone layers)")
    return i


def dspark_taps(streams: torch.Tensor, target_layer_ids, *, variant: str = "v4.1") -> torch.Tensor:
    """``streams [L + 1, T, hc, D]`` -> concatenated taps ``[T, len(ids) * D]`` (mean over the hc copies)."""
    check_float("streams", streams)
    if streams.dim() != 4:
        raise ValueError(f"streams: expected [L + 1, T, hc, D], got {tuple(streams.shape)}")
    ids = list(target_layer_ids)
    if not ids:
        raise ValueError("dspark_target_layer_ids: empty")
    dt = compute_dtype(streams)
    return torch.cat([streams[tap_stream_index(i, variant, streams.shape[0])].to(dt).mean(dim=1) for i in ids], -1)


def dspark_main_x(taps: torch.Tensor, main_proj: torch.Tensor, main_norm: torch.Tensor, *, eps: float) -> torch.Tensor:
    """``main_norm(taps @ main_proj^T)``: ``taps [T, n D]``, ``main_proj [D, n D]`` (dequantised) -> ``[T, D]``."""
    if main_proj.dim() != 2 or main_proj.shape[1] != taps.shape[-1]:
        raise ValueError(f"main_proj: expected [D, {taps.shape[-1]}], got {tuple(main_proj.shape)}")
    dt = compute_dtype(taps)
    return rms_norm(taps.to(dt) @ main_proj.to(dt).T, main_norm.to(dt), eps)


def dspark_block(anchor: torch.Tensor, context_positions: torch.Tensor, query_start_loc: torch.Tensor,
                 num_rejected: torch.Tensor, *, block_size: int, noise_token_id: int,
                 max_model_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3 -> (ids [B * N], positions [B * N]), request-major. ``context_positions [T]`` are the target batch's
    token positions, ``query_start_loc [B + 1]`` its request bounds, ``num_rejected [B]`` the trailing rejected
    tokens of each request (not context)."""
    if block_size < 1:
        raise ValueError(f"block_size: must be >= 1, got {block_size}")
    B = anchor.shape[0]
    if tuple(query_start_loc.shape) != (B + 1,) or tuple(num_rejected.shape) != (B,):
        raise ValueError(f"query_start_loc / num_rejected: expected ({B + 1},) / ({B},), got "
                         f"{tuple(query_start_loc.shape)} / {tuple(num_rejected.shape)}")
    ids, pos = [], []
    qsl, rej, cpos = query_start_loc.tolist(), num_rejected.tolist(), context_positions.tolist()
    for b in range(B):
        end = qsl[b + 1] - rej[b]
        if end <= qsl[b]:
            raise ValueError(f"request {b}: no accepted context token (tokens {qsl[b]}..{qsl[b + 1]}, "
                             f"{rej[b]} rejected)")
        last = cpos[end - 1]
        for off in range(block_size):
            ids.append(int(anchor[b]) if off == 0 else int(noise_token_id))
            q = last + 1 + off
            pos.append(min(q, max_model_len - 1) if max_model_len is not None else q)
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(pos, dtype=torch.int64)


def markov_chain(U: torch.Tensor, anchor: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> dict:
    """Step 4: ``U [B, N, V]`` base logits, ``anchor [B]``, ``w1 [V_in, r]``, ``w2 [V, r]`` ->
    {"logits" [B, N, V], "tokens" [B, N] int64, "embed" [B, N, r] (the e_k used)}."""
    check_float("U", U)
    if U.dim() != 3:
        raise ValueError(f"U: expected [B, N, V], got {tuple(U.shape)}")
    B, N, V = U.shape
    if w2.dim() != 2 or w2.shape[0] != V or w1.dim() != 2 or w1.shape[1] != w2.shape[1]:
        raise ValueError(f"markov_w1 / markov_w2: expected [V_in, r] / [{V}, r], got {tuple(w1.shape)} / "
                         f"{tuple(w2.shape)}")
    if tuple(anchor.shape) != (B,):
        raise ValueError(f"anchor: expected ({B},), got {tuple(anchor.shape)}")
    dt = compute_dtype(U)
    w1, w2 = w1.to(dt), w2.to(dt)
    prev = anchor.long()
    logits, tokens, embeds = [], [], []
    for k in range(N):
        e = w1[prev]
        lk = U[:, k].to(dt) + e @ w2.T
        tok = lk.argmax(-1)
        logits.append(lk)
        tokens.append(tok)
        embeds.append(e)
        prev = tok
    return {"logits": torch.stack(logits, 1), "tokens": torch.stack(tokens, 1), "embed": torch.stack(embeds, 1)}


def confidence(h: torch.Tensor, embed: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Step 5: ``sigmoid([h ; e] . w)``, ``h [..., D]``, ``embed [..., r]``, ``w [D + r]`` -> ``[...]``."""
    if w.shape != (h.shape[-1] + embed.shape[-1],):
        raise ValueError(f"confidence weight: expected ({h.shape[-1] + embed.shape[-1]},) = D + r, got "
                         f"{tuple(w.shape)}")
    dt = compute_dtype(h)
    return torch.sigmoid(torch.cat([h.to(dt), embed.to(dt)], -1) @ w.to(dt))
