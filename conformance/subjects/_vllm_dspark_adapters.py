"""Adapters that drive vLLM 0.32.0's DSpark draft-head code with the goldens' inputs on the CPU (paths relative to
site-packages/vllm). Used by ``vllm:sim-<arch>`` (``vllm_sim.ADAPTERS``: dspark.markov) and ``vllm-triton:<profile>``
(``vllm_triton.KERNELS``: dspark.input's block construction, a Triton kernel).

``dspark.markov``: the V2 runner's sequential stage ``DSparkSpeculator._sample_sequential``
(``v1/worker/gpu/spec_decode/dspark/speculator.py:156-199``) and the ``_sample_logits`` it calls (``:116-126``,
greedy: ``draft_logits`` None), run as they are on a stand-in speculator object that holds the buffers
``__init__`` would allocate on the device (``sample_indices``, ``sample_idx_mapping``, ``sample_pos``,
``input_buffers.input_ids``, ``_anchor_idx``, ``_step_cols``, ``draft_tokens``,
``draft_token_confidence_probs``) and a stand-in draft model whose ``markov_embed`` / ``markov_bias`` /
``compute_confidence`` / ``map_draft_to_target`` are ``DSparkDeepseekV4ForCausalLM``'s own methods
(``models/deepseek_v41/amd/dspark.py``) over real ``DSparkMarkovHead`` / ``DSparkConfidenceHead`` /
``LogitsProcessor`` modules (``model_executor/models/qwen3_dspark.py:48-189``) loaded with the case's weights.
The one harness piece: ``compute_draft_logits`` returns the case's base logits ``U`` (the component starts
after the shared LM head, see ``conformance.cases.dspark``).
"""

from __future__ import annotations

import types

import torch

BF = torch.bfloat16


def _draft_model_cls():
    """DSparkDeepseekV4ForCausalLM of the AMD V4.1 model (its methods only; importing the module builds nothing)."""
    from vllm.models.deepseek_v41.amd import dspark

    return dspark.DSparkDeepseekV4ForCausalLM


def make_dspark_markov(p: dict):
    def dspark_markov(U, h, anchor, markov_w1, markov_w2, conf_w):
        from vllm.model_executor.layers.logits_processor import LogitsProcessor
        from vllm.model_executor.models.qwen3_dspark import DSparkConfidenceHead, DSparkMarkovHead
        from vllm.v1.worker.gpu.spec_decode.dspark.speculator import DSparkSpeculator

        B, N, V = U.shape
        r, D = markov_w1.shape[1], h.shape[-1]
        import vllm.distributed.parallel_state as ps

        old = torch.get_default_dtype(), ps._TP
        torch.set_default_dtype(BF)           # the model dtype vLLM builds the draft under
        # TP 1 (no process group on the CPU): the replicated confidence projection and its parameter ask for their
        # rank at construction; a stand-in group answers rank 0 of 1 for the construction only
        if ps._TP is None:
            ps._TP = types.SimpleNamespace(rank_in_group=0, world_size=1)
        try:
            mh = DSparkMarkovHead(markov_w1.shape[0], V, r, prefix="markov_head")
            ch = DSparkConfidenceHead(D + r, prefix="confidence_head")
            lp = LogitsProcessor(V)
        finally:
            torch.set_default_dtype(old[0])
            ps._TP = old[1]
        with torch.no_grad():
            mh.markov_w1.weight.copy_(markov_w1.to(BF))
            mh.markov_w2.weight.zero_()
            mh.markov_w2.weight[:V].copy_(markov_w2.to(BF))     # the vocab-padded ParallelLMHead rows stay 0
            ch.proj.weight.copy_(conf_w.float().view(1, -1))
        cls = _draft_model_cls()
        base = U.to(BF).reshape(B * N, V)
        model = types.SimpleNamespace(model=types.SimpleNamespace(markov_head=mh, confidence_head=ch),
                                      logits_processor=lp, compute_draft_logits=lambda hidden: base)
        for name in ("markov_embed", "markov_bias", "compute_confidence", "map_draft_to_target"):
            setattr(model, name, types.MethodType(getattr(cls, name), model))
        ids = torch.zeros(B * N, dtype=torch.int64)
        ids[torch.arange(B) * N] = anchor.long()                 # the anchor at query offset 0 of each request
        spec = types.SimpleNamespace(
            num_speculative_steps=N, _draft_topk=None, model=model, draft_logits=None, use_confidence_head=True,
            acceptance_estimator=None,
            sample_indices=torch.arange(B * N, dtype=torch.int64),   # DSpark samples every query (sample_off 0)
            sample_idx_mapping=torch.arange(B, dtype=torch.int64).repeat_interleave(N),
            sample_pos=torch.zeros(B * N, dtype=torch.int64),
            input_buffers=types.SimpleNamespace(input_ids=ids),
            _anchor_idx=torch.arange(B, dtype=torch.int64) * N, _step_cols=torch.arange(N, dtype=torch.int32),
            draft_tokens=torch.zeros(B, N, dtype=torch.int64),
            draft_token_confidence_probs=torch.zeros(B, N, dtype=torch.float32))
        for name in ("_sample_sequential", "_sample_logits", "_maybe_predict_acceptance"):
            setattr(spec, name, types.MethodType(getattr(DSparkSpeculator, name), spec))
        logits = []
        real_sample = spec._sample_logits

        def sample(logits_i, idx_map, sample_pos, step):     # records the Markov-corrected logits it is given
            logits.append(logits_i.float().clone())
            return real_sample(logits_i, idx_map, sample_pos, step)

        spec._sample_logits = sample
        with torch.no_grad():
            spec._sample_sequential(B, h.to(BF).reshape(B * N, D))
        return {"logits": torch.stack(logits, 1), "tokens": spec.draft_tokens.clone(),
                "confidence": spec.draft_token_confidence_probs.clone()}
    return dspark_markov


def launch_prepare_dflash_inputs(kernel, context_positions, query_start_loc, num_rejected, anchor, *, block_size,
                                 noise_token_id, max_model_len, cache_block=64):
    """vLLM's ``_prepare_dflash_inputs_kernel`` launched as ``prepare_dflash_inputs`` launches it for DSpark
    (``v1/worker/gpu/spec_decode/dflash/speculator.py:733-815``: grid (requests, cdiv(max ctx + N, BLOCK)), BLOCK
    = min(256, next_pow2(max ctx + N)), ``SAMPLE_FROM_ANCHOR=True``, ``num_query_per_req = num_speculative_steps =
    N``, CP 1) on one batch: every request has sampled (``num_sampled`` 1: the anchor is ``last_sampled``), a block
    table of distinct non-null blocks (ids 1..) covering ``max_model_len``. -> (input_ids [B N], positions [B N])."""
    import triton

    B = anchor.shape[0]
    N = int(block_size)
    T = int(context_positions.shape[0])
    lens = (query_start_loc[1:] - query_start_loc[:-1]).tolist()
    max_tokens = max(lens) + N
    blk = min(256, triton.next_power_of_2(max(1, max_tokens)))
    n_blocks = triton.cdiv(max_tokens, blk)
    nq = B * N
    i32, i64 = dict(dtype=torch.int32), dict(dtype=torch.int64)
    stride = triton.cdiv(int(max_model_len), cache_block) + 1
    block_table = (torch.arange(B * stride, **i32).view(B, stride) + 1).contiguous()
    out = dict(ids=torch.zeros(nq, **i32), pos=torch.zeros(nq, **i64), qsl=torch.zeros(B + 1, **i32),
               seq_lens=torch.zeros(B, **i32), q_slots=torch.zeros(nq, **i64), c_pos=torch.zeros(T, **i64),
               c_slots=torch.zeros(T, **i64), s_idx=torch.zeros(nq, **i64), s_pos=torch.zeros(nq, **i64),
               s_map=torch.zeros(nq, **i64), temp=torch.zeros(B, dtype=torch.float32), seeds=torch.zeros(B, **i64))
    kernel[(B, n_blocks)](
        out["ids"], out["pos"], out["qsl"], out["seq_lens"], out["q_slots"], out["c_pos"], out["c_slots"],
        out["s_idx"], out["s_pos"], out["s_map"], out["temp"], out["seeds"],
        context_positions.to(torch.int64).contiguous(), query_start_loc.to(torch.int32).contiguous(),
        torch.arange(B, **i32), anchor.to(torch.int64).contiguous(), torch.zeros(B, **i64), torch.ones(B, **i32),
        num_rejected.to(torch.int32).contiguous(), torch.ones(B, dtype=torch.float32), torch.zeros(B, **i64),
        block_table, block_table.stride(0), int(noise_token_id), cache_block, N, N, B, nq, int(max_model_len), 0,
        SAMPLE_FROM_ANCHOR=True, PAD_SLOT_ID=-1, CP_SIZE=1, CP_INTERLEAVE=1, BLOCK_SIZE=blk)
    return out["ids"].long(), out["pos"]


def make_dspark_input(p: dict):
    profile = "gfx942" if p.get("fnuz") else "ocp"

    def dspark_input(streams, anchor, context_positions, query_start_loc, num_rejected, main_proj, main_proj_scale,
                     main_norm, embed_table, *, target_layer_ids, block_size, noise_token_id, norm_eps, hc_mult=4,
                     variant="v4.1", weight_block=32, max_model_len=1048576):
        """The query block (ids, positions) from vLLM's ``_prepare_dflash_inputs_kernel`` under the interpreter
        (``launch_prepare_dflash_inputs``); ``main_x`` and ``X0`` by the harness's serving chain (the case module's
        emulation of the profile: vLLM computes the taps inside the target's forward and ``main_x`` inside the
        draft model, neither callable alone)."""
        from ..cases.dspark import _emulate_input
        from .base import Unsupported

        if p.get("src") is not None:
            raise Unsupported("the DSpark block kernel is taken from the installed vllm package, which "
                              "vllm-triton-gpu does not load")
        from vllm.v1.worker.gpu.spec_decode.dflash.speculator import _prepare_dflash_inputs_kernel

        out = _emulate_input(profile)(streams, anchor, context_positions, query_start_loc, num_rejected, main_proj,
                                      main_proj_scale, main_norm, embed_table, target_layer_ids=target_layer_ids,
                                      block_size=block_size, noise_token_id=noise_token_id, norm_eps=norm_eps,
                                      hc_mult=hc_mult, variant=variant, weight_block=weight_block,
                                      max_model_len=max_model_len)
        ids, pos = launch_prepare_dflash_inputs(_prepare_dflash_inputs_kernel, context_positions, query_start_loc,
                                                num_rejected, anchor, block_size=block_size,
                                                noise_token_id=noise_token_id, max_model_len=max_model_len)
        X0 = embed_table.to(BF).float()[ids].unsqueeze(-2).expand(-1, hc_mult, -1).contiguous()
        return {"main_x": out["main_x"], "ids": ids, "positions": pos, "X0": X0}
    return dspark_input
