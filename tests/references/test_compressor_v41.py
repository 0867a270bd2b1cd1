"""compressor.kv's DeepSeek-V4.1 rows: ratios 1 and 2, no position bias, no gate at ratio 1
(vLLM models/deepseek_v41/compressor.py, common/ops/fused_compress_quant_cache.py)."""

import pytest
import torch

from conformance.cases import cases_for
from conformance.cases.compressor import compressor_kv
from references.components.compressor import CompressorState, compress
from references.components.norms import rms_norm
from references.components.rope import apply_rope, rope_inv_freq
from references.config import RopeScaling

INV = rope_inv_freq(64, 160000.0, RopeScaling())


def _weights(g, D=64, d=512, gate=True):
    wkv = torch.randn(d, D, generator=g, dtype=torch.float64) * D**-0.5
    wgate = torch.randn(d, D, generator=g, dtype=torch.float64) * 3 * D**-0.5 if gate else None
    return wkv, wgate, 1 + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)


def test_ratio1_entry_is_the_tokens_own_normed_roped_kv():
    g = torch.Generator().manual_seed(1)
    wkv, _, norm = _weights(g, gate=False)
    x = torch.randn(5, 64, generator=g, dtype=torch.float64)
    got = compressor_kv(x, wkv, None, None, norm, ratio=1, head_dim=512, eps=1e-6)
    want = apply_rope(rms_norm(x @ wkv.T, norm, 1e-6), torch.arange(5), INV.double(), 64)
    assert got.shape == (5, 512) and torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_ratio2_pools_each_pair_by_the_sigmoid_of_its_score_gap():
    """Softmax over two slots, per channel: p = kv1 + (kv0 - kv1) sigmoid(z0 - z1); RoPE at the pair's first
    position 2i (fused_compress_quant_cache.py:344)."""
    g = torch.Generator().manual_seed(2)
    wkv, wgate, norm = _weights(g)
    x = torch.randn(6, 64, generator=g, dtype=torch.float64)
    kv, z = x @ wkv.T, x @ wgate.T
    p = kv[1::2] + (kv[0::2] - kv[1::2]) * torch.sigmoid(z[0::2] - z[1::2])
    want = apply_rope(rms_norm(p, norm, 1e-6), torch.arange(3) * 2, INV.double(), 64)
    got = compressor_kv(x, wkv, wgate, None, norm, ratio=2, head_dim=512, eps=1e-6)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # the weights are far from 1/2, so the gate matters
    assert (torch.sigmoid(z[0::2] - z[1::2]) - 0.5).abs().max() > 0.4


def test_ratio2_boundaries_one_token_no_entry_trailing_token_ignored():
    g = torch.Generator().manual_seed(3)
    wkv, wgate, norm = _weights(g)
    x = torch.randn(3, 64, generator=g, dtype=torch.float64)
    assert compressor_kv(x[:1], wkv, wgate, None, norm, ratio=2, head_dim=512, eps=1e-6).shape == (0, 512)
    two = compressor_kv(x[:2], wkv, wgate, None, norm, ratio=2, head_dim=512, eps=1e-6)
    three = compressor_kv(x, wkv, wgate, None, norm, ratio=2, head_dim=512, eps=1e-6)
    assert three.shape == (1, 512) and torch.equal(two, three)


@pytest.mark.parametrize("ratio,chunks", [(2, (1, 1, 3, 2, 4)), (2, (3, 5, 3)), (1, (1, 4, 6))])
def test_streaming_state_matches_the_whole_prompt(ratio, chunks):
    """CompressorState fed in chunks of odd and even lengths (a pair split across chunks) gives the whole-prompt
    entries: what vLLM's ring of the open pair's rows must reproduce."""
    g = torch.Generator().manual_seed(4)
    wkv, wgate, norm = _weights(g, gate=ratio > 1)
    T = sum(chunks)
    x = torch.randn(T, 64, generator=g, dtype=torch.float64)
    whole = compress(x, wkv, wgate, None, norm, ratio=ratio, head_dim=512, eps=1e-6, inv_freq=INV.double())
    st = CompressorState(wkv, wgate, None, norm, ratio=ratio, head_dim=512, eps=1e-6, inv_freq=INV.double())
    got, t0 = [], 0
    for n in chunks:
        e, ids = st.update(x[t0:t0 + n], torch.arange(t0, t0 + n))
        got.append(e)
        t0 += n
    assert torch.allclose(torch.cat(got), whole, rtol=1e-12, atol=1e-12)


def test_bad_v41_inputs_refused():
    g = torch.Generator().manual_seed(5)
    wkv, wgate, norm = _weights(g)
    x = torch.randn(4, 64, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="only a ratio-1 compressor"):
        compressor_kv(x, wkv, None, None, norm, ratio=2, head_dim=512, eps=1e-6)
    with pytest.raises(ValueError, match="ratio: must be >= 1"):
        compressor_kv(x, wkv, wgate, None, norm, ratio=0, head_dim=512, eps=1e-6)


def test_v41_rows_and_v4_rows_unchanged():
    rows = cases_for("compressor.kv")
    v41 = [c for c in rows if "v4.1" in c.tags]
    assert {c.params["ratio"] for c in v41} == {1, 2}
    assert {c.params["tokens"] % 2 for c in v41 if c.params["ratio"] == 2} == {0, 1}
    for c in v41:
        kw = c.make_inputs()
        assert kw["ape"] is None and (kw["wgate"] is None) == (c.params["ratio"] == 1)
    assert [c.id for c in rows if "v4.1" not in c.tags] == [
        "compressor.kv/csa/t64hd512/s0", "compressor.kv/csa/t30hd128/s1", "compressor.kv/hca/t256hd512/s2",
        "compressor.kv/hca/t259hd512/s3", "compressor.kv/csa/t2048hd512/s4"]
