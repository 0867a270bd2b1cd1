"""Every component detector fires on a deliberately broken implementation and names the component and the
worst element; the correct subjects pass (tests/harness/test_subjects_and_suite.py)."""

import pytest
import torch

from conformance.cases import cases_for
from conformance.cases.attention import attn_sparse
from conformance.cases.compressor import compressor_kv
from conformance.cases.indexer import idx_topk
from conformance.cases.mhc import mhc_pre, mhc_pre_lagged
from conformance.checks.numeric import run_numeric
from conformance.subjects import Impl, Subject, SubjectInfo
from references.components.rope import apply_rope, rope_inv_freq
from references.config import RopeScaling


class Mutant(Subject):
    def __init__(self, component, fn):
        self.component, self.fn, self.name = component, fn, f"mutant:{component}"

    def info(self):
        return SubjectInfo(self.name, "deliberately broken", "cpu", "float8_e4m3fn", False, profile="ocp")

    def provides(self):
        return {self.component: Impl(self.fn, function=f"mutant.{self.component}", backend="torch")}


def rms_without_eps(x, weight, *, eps):
    x = x.double()
    return (x * torch.rsqrt(x.square().mean(-1, keepdim=True)) * weight.double()).float()


def rope_neox(x, positions, *, theta, yarn, inverse=False, rope_dim=64):
    # half-split pairing (x[i], x[i+32]) instead of interleaved (x[2i], x[2i+1])
    inv = rope_inv_freq(rope_dim, theta, RopeScaling() if yarn else None)
    phi = positions.double()[:, None] * inv.double()
    phi = -phi if inverse else phi
    cos, sin = phi.cos()[:, None, :], phi.sin()[:, None, :]
    x = x.double()
    a, b = x[..., -64:-32], x[..., -32:]
    out = x.clone()
    out[..., -64:-32], out[..., -32:] = a * cos - b * sin, a * sin + b * cos
    return out.float()


def sinkhorn_one_fewer(X, fn, base, scale, *, norm_eps, hc_eps, sinkhorn_iters):
    return mhc_pre(X, fn, base, scale, norm_eps=norm_eps, hc_eps=hc_eps, sinkhorn_iters=sinkhorn_iters - 1)


def attention_without_sink(q, kv, indices, sink, *, scale):
    return attn_sparse(q, kv, indices, torch.full_like(sink, float("-inf")), scale=scale)


def compressor_softmax_over_channels(x, wkv, wgate, ape, norm, *, ratio, head_dim, eps):
    real = torch.softmax

    def wrong(t, dim=None, **kw):  # the pooling softmax is the only 3-D softmax over dim=1 in compress()
        return real(t, dim=-1 if (dim == 1 and t.dim() == 3) else dim, **kw)

    torch.softmax = wrong
    try:
        return compressor_kv(x, wkv, wgate, ape, norm, ratio=ratio, head_dim=head_dim, eps=eps)
    finally:
        torch.softmax = real



def compressor_v41_mean_pool(x, wkv, wgate, ape, norm, *, ratio, head_dim, eps):
    # V4.1 rows (ape None): the pair averaged (equal weights, the gate ignored) instead of its softmax
    if ape is None and wgate is not None:
        wgate = torch.zeros_like(wgate)
    return compressor_kv(x, wkv, wgate, ape, norm, ratio=ratio, head_dim=head_dim, eps=eps)


def compressor_v41_rope_at_group_end(x, wkv, wgate, ape, norm, *, ratio, head_dim, eps):
    # V4.1 rows: RoPE at the group's closing position i*m + m - 1 instead of its first, i*m (rotating the golden's
    # entries by m - 1 more positions; nothing moves at ratio 1)
    out = compressor_kv(x, wkv, wgate, ape, norm, ratio=ratio, head_dim=head_dim, eps=eps)
    if ape is not None:
        return out
    inv = rope_inv_freq(64, 160000.0, RopeScaling())
    return apply_rope(out.double(), torch.full((out.shape[0],), ratio - 1), inv, 64).float()


def hc_pre_not_lagged(X, fn, base, scale, pre_prev=None, *, norm_eps, hc_eps, sinkhorn_iters):
    # V4's HC_pre on a V4.1 model: the layer input collapsed with this site's own pre-mix, the carried one ignored
    out = mhc_pre_lagged(X, fn, base, scale, pre_prev, norm_eps=norm_eps, hc_eps=hc_eps,
                         sinkhorn_iters=sinkhorn_iters)
    out["a"] = mhc_pre(X, fn, base, scale, norm_eps=norm_eps, hc_eps=hc_eps, sinkhorn_iters=sinkhorn_iters)["a"]
    return out


def hc_pre_lagged_hands_on_the_carried_mix(X, fn, base, scale, pre_prev=None, *, norm_eps, hc_eps, sinkhorn_iters):
    # the right layer input, but the carried pre-mix passed on again instead of this site's (a stale seam)
    out = mhc_pre_lagged(X, fn, base, scale, pre_prev, norm_eps=norm_eps, hc_eps=hc_eps,
                         sinkhorn_iters=sinkhorn_iters)
    if pre_prev is not None:
        out["pre"] = pre_prev.float()
    return out


def topk_off_by_one(scores, positions, *, ratio, topk):
    # visible entries computed as floor((t + 2) / m): one token early at every window boundary
    return idx_topk(scores, positions + 1, ratio=ratio, topk=topk)


def rope_layer_yarn_on_swa(x, positions, *, compress_ratio, inverse=False, preset="flash", rope_dim=64):
    # vLLM 0.27-0.29's build_deepseek_v4_rope: YaRN on every layer type, theta per type (spec 8.1)
    from references.components.rope import apply_rope, layer_inv_freq
    from references.config import FLASH

    inv = layer_inv_freq(FLASH, FLASH.compress_ratios.index(compress_ratio), variant="vllm-yarn-on-swa")
    return apply_rope(x.double(), positions, inv, rope_dim, inverse=inverse).float()


MUTANTS = [
    ("norm.rms", rms_without_eps),
    ("rope.apply", rope_neox),
    ("rope.layer", rope_layer_yarn_on_swa),
    ("mhc.pre", sinkhorn_one_fewer),
    ("attn.sparse", attention_without_sink),
    ("compressor.kv", compressor_softmax_over_channels),
    ("compressor.kv", compressor_v41_mean_pool),
    ("mhc.pre_lagged", hc_pre_not_lagged),
    ("mhc.pre_lagged", hc_pre_lagged_hands_on_the_carried_mix),
    ("compressor.kv", compressor_v41_rope_at_group_end),
    ("indexer.topk", topk_off_by_one),
]


@pytest.mark.parametrize("component,fn", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_caught_with_diagnosis(component, fn):
    subj = Mutant(component, fn)
    caught = []
    for case in cases_for(component):
        for r in run_numeric(subj, case):
            if r.verdict in ("fail", "catastrophic"):
                caught.append(r)
                assert component in r.message and case.id in r.message
                assert "worst at" in r.message or "row" in r.message
                assert r.worst.get("index") is not None
    assert caught, f"mutant of {component} passed every case"


@pytest.mark.parametrize("fn", [compressor_v41_mean_pool, compressor_v41_rope_at_group_end])
def test_v41_compressor_mutants_are_caught_on_every_ratio2_row_only(fn):
    """Against the golden (serving level) every V4.1 ratio-2 row fails, the worst element named; the ratio-1 rows
    (one slot: no pooling, RoPE position unchanged) and the V4 rows are the golden and pass."""
    subj = Mutant("compressor.kv", fn)
    seen = set()
    for case in cases_for("compressor.kv"):
        if case.tier != "fast":
            continue
        (r,) = [r for r in run_numeric(subj, case) if r.level == "serving"]
        if "/v41-r2/" in case.id:
            seen.add(case.id)
            assert r.verdict in ("fail", "catastrophic") and r.worst.get("index") is not None, r.message
        else:
            assert r.verdict == "pass", r.message
    assert len(seen) >= 5


def test_unlagged_pre_is_caught_on_every_lagged_row_in_a_and_a_stale_seam_in_pre():
    """V4's collapse fails every fast mhc.pre_lagged row at the serving level on output a only; handing the
    carried pre-mix on fails the carried rows on output pre only (the entry row has none to hand on)."""
    for fn, out in ((hc_pre_not_lagged, "a"), (hc_pre_lagged_hands_on_the_carried_mix, "pre")):
        subj = Mutant("mhc.pre_lagged", fn)
        for case in cases_for("mhc.pre_lagged"):
            if case.tier != "fast":
                continue
            (r,) = [r for r in run_numeric(subj, case) if r.level == "serving"]
            if out == "pre" and case.params["entry"]:
                assert r.verdict == "pass", r.message
                continue
            assert r.verdict in ("fail", "catastrophic"), r.message
            assert f" {out}: fail" in r.message or f" {out}: catastrophic" in r.message, r.message
            assert r.worst.get("index") is not None


def test_rope_layer_yarn_on_swa_is_caught_on_swa_layers_only():
    """The mutant gives CSA / HCA layers the right rope: only the SWA cases may fail."""
    subj = Mutant("rope.layer", rope_layer_yarn_on_swa)
    failing = {case.id.split("/")[1].replace("-inv", "") for case in cases_for("rope.layer")
               for r in run_numeric(subj, case) if r.verdict in ("fail", "catastrophic")}
    assert failing == {"swa"}



def topk_int16_indices(scores, positions, *, ratio, topk):
    # indices stored as int16: entries past 2^15 wrap negative (a kernel sized for short contexts)
    return idx_topk(scores, positions, ratio=ratio, topk=topk).to(torch.int16).to(torch.int64)


def test_long_context_axis_int16_index_wrap_is_caught_only_past_2_15_entries():
    """Tier full's 262,144-token case fails the int16 mutant; every fast-tier case and the shorter full-tier
    contexts pass it (the wrap is invisible below 32,768 entries)."""
    subj = Mutant("indexer.topk", topk_int16_indices)
    verdicts = {c.id: run_numeric(subj, c)[0].verdict for c in cases_for("indexer.topk")}
    assert verdicts["indexer.topk/t3n65536k1024/s13"] == "fail"
    assert all(v == "pass" for k, v in verdicts.items() if k != "indexer.topk/t3n65536k1024/s13"), verdicts
