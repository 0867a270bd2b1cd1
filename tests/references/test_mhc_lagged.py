"""mhc.pre_lagged: DeepSeek-V4.1's HC_pre collapsing with the previous sub-layer's pre-mix
(vLLM models/deepseek_v41/nvidia/model.py:491-493, model_executor/kernels/mhc/torch.py:6-43)."""

import pytest
import torch

from conformance.cases import cases_for
from conformance.cases.mhc import mhc_pre, mhc_pre_lagged


def _inputs(seed, T=5, D=64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, 4, D, generator=g, dtype=torch.float64)
    site = {"fn": torch.randn(24, 4 * D, generator=g, dtype=torch.float64) * (4 * D) ** -0.5,
            "base": torch.randn(24, generator=g, dtype=torch.float64) * 0.5,
            "scale": 0.5 + torch.rand(3, generator=g, dtype=torch.float64)}
    return g, X, site, dict(norm_eps=1e-6, hc_eps=1e-6, sinkhorn_iters=20)


def test_mixes_are_v4s_and_the_input_uses_the_carried_pre_mix():
    """post / comb / pre equal mhc.pre's mixes of the same site; a = sum_j pre_prev_j X_j by hand."""
    g, X, site, kw = _inputs(1)
    pre_prev = torch.sigmoid(torch.randn(5, 4, generator=g, dtype=torch.float64)) + 1e-6
    lag = mhc_pre_lagged(X, **site, pre_prev=pre_prev, **kw)
    v4 = mhc_pre(X, **site, **kw)
    assert torch.equal(lag["post"], v4["post"]) and torch.equal(lag["comb"], v4["comb"])
    hand = sum(pre_prev[:, j:j + 1] * X[:, j] for j in range(4))
    assert torch.allclose(lag["a"], hand, rtol=1e-14, atol=1e-14)
    # this site's pre: V4's a is sum_j pre_j X_j with it
    assert torch.allclose(v4["a"], (lag["pre"].unsqueeze(-1) * X).sum(1), rtol=1e-14, atol=1e-14)
    assert not torch.allclose(lag["a"], v4["a"], rtol=1e-2)


def test_entry_takes_stream_zero_and_chaining_hands_pre_on():
    """At the model's entry (pre_prev None) a = X_0 (the broadcast embedding); the next site collapses with the
    entry site's pre (attention -> FFN: nvidia/model.py:590-606 pass pre_mix=attn_pre)."""
    g, X, site, kw = _inputs(2)
    e = X[:, 0]
    Xe = e[:, None, :].expand(5, 4, 64).contiguous()
    first = mhc_pre_lagged(Xe, **site, pre_prev=None, **kw)
    assert torch.equal(first["a"], e)
    nxt = mhc_pre_lagged(X, **site, pre_prev=first["pre"], **kw)
    assert torch.allclose(nxt["a"], (first["pre"].unsqueeze(-1) * X).sum(1), rtol=1e-14, atol=1e-14)
    assert ((first["pre"] > 0) & (first["pre"] <= 1 + 1e-6)).all()


def test_bad_pre_prev_refused():
    _, X, site, kw = _inputs(3)
    with pytest.raises(ValueError, match="pre_prev"):
        mhc_pre_lagged(X, **site, pre_prev=torch.ones(5, 3, dtype=torch.float64), **kw)


def test_rows_cover_the_entry_and_carried_pre_mixes():
    rows = cases_for("mhc.pre_lagged")
    entry = [c for c in rows if c.params["entry"]]
    assert entry and len(rows) > len(entry)
    kw = entry[0].make_inputs()
    assert kw["pre_prev"] is None and torch.equal(kw["X"][:, 0], kw["X"][:, 3])
