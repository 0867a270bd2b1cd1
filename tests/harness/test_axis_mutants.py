"""Axis-specific mutants (issue #16 item 2): each is invisible below the axis value and caught above it, so the
case rows on that axis are what catches it (docs/detection-axes.md). The correct implementations pass the same
rows (tests/harness/test_subjects_and_suite.py, tests/harness/test_new_component_mutants.py)."""

import torch

from conformance.cases import cases_for
from conformance.cases.indexer import _emulate_scores, idx_topk
from conformance.checks.numeric import run_numeric, worst_verdict

from .test_component_mutants import Mutant
from .test_new_component_mutants import q_path_golden, q_path_without_head_norm

WAVE = 1024


def rms_one_wave(x, weight, *, eps):
    """A kernel sized for one wave of 1,024 rows: rows past it reuse the reduction of row i mod 1,024. Otherwise
    the serving numerics (bf16 inputs, fp32 math, bf16 output)."""
    xb, wb = x.to(torch.bfloat16).float(), weight.to(torch.bfloat16).float()
    ms = xb.square().mean(-1, keepdim=True)
    if x.shape[0] > WAVE:
        ms = ms[torch.arange(x.shape[0]) % WAVE]
    return (xb * torch.rsqrt(ms + eps) * wb).to(torch.bfloat16).float()


def topk_capped_at_512(scores, positions, *, ratio, topk):
    """A top-k kernel built for k <= 512 (V4-Flash): the best 512 entries, the rest of a k = 1,024 row -1."""
    out = idx_topk(scores, positions, ratio=ratio, topk=min(topk, 512))
    if topk > 512:
        out = torch.cat([out, torch.full((out.shape[0], topk - 512), -1, dtype=out.dtype)], 1)
    return out


def q_path_head_norm_first_64_heads(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, positions, *, n_heads, eps,
                                    theta, yarn):
    """A fused q-norm kernel variant that normalises at most 64 heads: heads 64.. keep the un-normed q."""
    good = q_path_golden(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, positions, n_heads=n_heads, eps=eps,
                         theta=theta, yarn=yarn)
    if n_heads <= 64:
        return good
    bad = q_path_without_head_norm(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, positions, n_heads=n_heads,
                                   eps=eps, theta=theta, yarn=yarn)
    return {"qr": good["qr"], "q": torch.cat([good["q"][:, :64], bad["q"][:, 64:]], 1)}


def scores_sized_for_32k_tokens(q, k, w):
    """An indexer-score kernel sized for 32k-token contexts: entries past 8,192 are left at zero. Otherwise the
    serving numerics (FP8 q and K in the OCP dialect of the Mutant subject, cases/indexer.py _emulate_scores)."""
    out = _emulate_scores("ocp")(q=q, k=k, w=w)["scores"].clone()
    out[:, 8192:] = 0
    return out


def _verdicts(component, fn, full=False):
    return {c.id: worst_verdict(run_numeric(Mutant(component, fn), c)) for c in cases_for(component)
            if full or c.tier == "fast"}


def test_rms_one_wave_is_caught_on_the_batch_past_1024_rows_only():
    v = _verdicts("norm.rms", rms_one_wave)
    for cid, x in v.items():
        big = int(cid.split("/")[1][1:].split("d")[0]) > WAVE
        assert (x in ("fail", "catastrophic")) if big else x == "pass", (cid, x)
    assert any(x != "pass" for x in v.values())


def test_topk_capped_at_512_is_caught_on_the_k1024_rows_only():
    v = _verdicts("indexer.topk", topk_capped_at_512)
    for cid, x in v.items():
        assert (x in ("fail", "catastrophic")) if "k1024" in cid else x == "pass", (cid, x)
    assert any("k1024" in cid for cid in v)


def test_head_norm_for_64_heads_only_is_caught_on_the_128_head_row_only():
    # the V4 rows only: the mutant breaks the per-head q norm, which V4.1 rows (q_head_norm=False) do not have
    v = {cid: x for cid, x in _verdicts("attn.q_path", q_path_head_norm_first_64_heads).items()
         if not cid.startswith("attn.q_path/v41/")}
    for cid, x in v.items():
        assert (x in ("fail", "catastrophic")) if "h128" in cid else x == "pass", (cid, x)
    assert any("h128" in cid for cid in v)


def test_scores_sized_for_32k_tokens_is_caught_on_the_131072_token_row_only():
    """Tier full's 131,072-token row (32,768 entries) fails; the 8k / 32k-token rows and the fast tier pass."""
    v = _verdicts("indexer.scores", scores_sized_for_32k_tokens, full=True)
    for cid, x in v.items():
        assert (x in ("fail", "catastrophic")) if "n32768" in cid else x == "pass", (cid, x)
    assert any("n32768" in cid for cid in v)
