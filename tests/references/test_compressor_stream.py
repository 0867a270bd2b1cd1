"""The streamed compressor golden (references.components.compressor_stream, compressor.kv_stream): any chunking
of a prompt gives the one-shot entries (fp64), the result does not depend on the initial contents of the state
(a NaN-filled state gives the same bits as a zeroed one), a hand-computed ratio-2 case, clear errors."""

import math

import pytest
import torch

from references.components.compressor import compress
from references.components.compressor_stream import carry_rows, new_state, step
from references.components.rope import rope_inv_freq
from references.config import RopeScaling

INV = rope_inv_freq(64, 160000.0, RopeScaling()).double()


def _inputs(g, T, ratio, d, *, D=64, ape=True, gate=True):
    c = 2 if ratio == 4 else 1
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    wkv = torch.randn(c * d, D, generator=g, dtype=torch.float64) * D**-0.5
    wgate = torch.randn(c * d, D, generator=g, dtype=torch.float64) * 3 * D**-0.5 if gate else None
    a = torch.randn(ratio, c * d, generator=g, dtype=torch.float64) * 0.5 if ape else None
    norm = 1 + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
    return x, dict(wkv=wkv, wgate=wgate, ape=a, norm=norm, ratio=ratio, head_dim=d, eps=1e-6, inv_freq=INV)


def _stream(x, w, splits, fill=float("nan"), kind="attn"):
    st = new_state(w["wkv"], ratio=w["ratio"], head_dim=w["head_dim"], dtype=torch.float64)
    for v in st.values():
        v.fill_(fill)
    out, s = [], 0
    for n in splits:
        e, st = step(x[s:s + n], st, start=s, kind=kind, **w)
        out.append(e)
        s += n
    return torch.cat(out)


@pytest.mark.parametrize("ratio,d,T,splits,kind", [
    (4, 512, 30, [1] * 30, "attn"), (4, 128, 30, [13, 17], "indexer"), (4, 512, 64, [5, 6, 7, 46], "attn"),
    (4, 512, 64, [61, 3], "attn"), (128, 512, 259, [127, 132], "attn"), (128, 512, 259, [129, 1, 1, 128], "attn"),
    (2, 512, 9, [1, 2, 3, 3], "attn"), (1, 512, 5, [2, 3], "attn")])
def test_any_chunking_from_a_nan_state_gives_the_one_shot_entries_fp64(ratio, d, T, splits, kind):
    g = torch.Generator().manual_seed(ratio * 1000 + T)
    x, w = _inputs(g, T, ratio, d, ape=ratio >= 4, gate=ratio > 1)
    want = compress(x, kind=kind, **w)
    got = _stream(x, w, splits, kind=kind)
    assert got.shape == want.shape == (T // ratio, d)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (got - want).abs().max()


def test_initial_state_contents_do_not_matter():
    g = torch.Generator().manual_seed(7)
    x, w = _inputs(g, 21, 4, 512)
    a = _stream(x, w, [3, 1, 9, 8], fill=float("nan"))
    b = _stream(x, w, [3, 1, 9, 8], fill=0.0)
    c = _stream(x, w, [3, 1, 9, 8], fill=1e30)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_ring_holds_the_last_coff_times_ratio_tokens():
    assert carry_rows(4, True) == 8 and carry_rows(128, False) == 128 and carry_rows(2, False) == 2
    st = new_state(torch.zeros(1024, 3), ratio=4, head_dim=512)
    assert st["kv"].shape == st["score"].shape == (8, 1024)


def test_hand_computed_ratio2_pair_split_across_two_single_steps():
    """x = [1], [2] (D = 1), wkv = ones (kv_t = x_t in every channel), wgate = 0, ape row 1 = ln 3 on even channels:
    even channels pool 1/4 * 1 + 3/4 * 2 = 1.75, odd channels 1/2 * 1 + 1/2 * 2 = 1.5; RMSNorm with unit weight
    divides by sqrt((1.75^2 + 1.5^2) / 2); a zero RoPE frequency leaves the entry unrotated."""
    d = 64
    ape = torch.zeros(2, d, dtype=torch.float64)
    ape[1, 0::2] = math.log(3.0)
    w = dict(wkv=torch.ones(d, 1, dtype=torch.float64), wgate=torch.zeros(d, 1, dtype=torch.float64), ape=ape,
             norm=torch.ones(d, dtype=torch.float64), ratio=2, head_dim=d, eps=0.0,
             inv_freq=torch.zeros(32, dtype=torch.float64))
    x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    got = _stream(x, w, [1, 1])
    rms = math.sqrt((1.75**2 + 1.5**2) / 2)
    want = torch.tensor([1.75 / rms, 1.5 / rms] * (d // 2), dtype=torch.float64)
    assert got.shape == (1, d) and torch.allclose(got[0], want, rtol=1e-14, atol=0)


def test_bad_state_and_start_are_one_line_errors():
    g = torch.Generator().manual_seed(9)
    x, w = _inputs(g, 4, 4, 512)
    st = new_state(w["wkv"], ratio=4, head_dim=512, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"state\['kv'\]: shape \(4, 1024\), expected \(8, 1024\)"):
        step(x, {"kv": st["kv"][:4], "score": st["score"]}, start=0, **w)
    with pytest.raises(ValueError, match="start: must be a non-negative int"):
        step(x, st, start=-1, **w)
    with pytest.raises(TypeError, match=r"state\['score'\]: expected a torch.Tensor"):
        step(x, {"kv": st["kv"]}, start=0, **w)
    with pytest.raises(ValueError, match="wkv: 512 rows, expected 1024"):
        new_state(w["wkv"][:512], ratio=4, head_dim=512)
