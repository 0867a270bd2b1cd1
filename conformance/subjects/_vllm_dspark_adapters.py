"""Adapters that drive vLLM 0.32.0's DSpark draft-head code with the goldens' inputs on the CPU (paths relative to
site-packages/vllm). Used by ``vllm:sim-<arch>`` (``vllm_sim.ADAPTERS``).

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
