"""mtp.head's golden (conformance.cases.mtp.mtp_head_golden over references.components.mtp): its known
properties, exactly where the arithmetic allows it (spec 3.15)."""

import pytest
import torch

from conformance.cases import cases_for
from conformance.cases.head import lm_head_golden
from conformance.cases.linear import W_SPEC
from conformance.cases.mtp import mtp_head_golden
from references.components.moe import linear
from references.components.norms import rms_norm
from references.formats.blockscale import dequantize_fp8

CASE = "mtp.head/prefill/t33p0d256v1000/normal/official/s2"


def _kw(case_id=CASE, **over):
    (c,) = [c for c in cases_for("mtp.head") if c.id == case_id]
    kw = c.make_inputs()
    kw.update(over)
    return kw


def _h_part(kw):
    return linear(rms_norm(kw["X_main"], kw["hnorm"], kw["norm_eps"]),
                  dequantize_fp8(kw["h_proj"], kw["h_proj_scale"], W_SPEC))


def _e_part(kw, ids):
    e = rms_norm(kw["embed_table"][ids.long()], kw["enorm"], kw["norm_eps"])
    return linear(e, dequantize_fp8(kw["e_proj"], kw["e_proj_scale"], W_SPEC))


def test_zero_e_proj_leaves_h_proj_of_hnorm():
    kw = _kw()
    kw["e_proj"] = torch.zeros_like(kw["e_proj"])
    assert torch.equal(mtp_head_golden(**kw)["X"], _h_part(kw))


def test_zero_h_proj_broadcasts_the_embedding_term_of_the_next_token():
    kw = _kw()
    kw["h_proj"] = torch.zeros_like(kw["h_proj"])
    X = mtp_head_golden(**kw)["X"]
    want = _e_part(kw, kw["ids"][1:])
    for s in range(X.shape[1]):
        assert torch.equal(X[:, s], want), s


def test_position0_variant_difference_is_exactly_the_embedding_term():
    kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in _kw().items()}
    off = mtp_head_golden(**dict(kw64, variant="official"))
    vll = mtp_head_golden(**dict(kw64, variant="vllm"))
    # vLLM zeroes the position-0 embedding before enorm: its position-0 rows are h_proj(hnorm(X_main)) alone
    assert torch.equal(vll["X"][0], _h_part(kw64)[0])
    e0 = _e_part(kw64, kw64["ids"][1:])[0]             # the golden's own GEMM shape: the same term, bitwise
    diff = off["X"][0] - vll["X"][0]
    # (a + b) - a in fp64: one rounding of the sum, |err| <= 2^-53 |a + b| per element
    assert (diff - e0).abs().max() <= 2.0**-52 * off["X"][0].abs().max(), (diff - e0).abs().max()
    assert e0.abs().max() > 0.1
    assert torch.equal(off["X"][1:], vll["X"][1:])             # every other position: identical
    assert torch.equal(off["logits"], vll["logits"])           # the head half has no variant


def test_variants_agree_where_no_row_is_at_position_0():
    kw = _kw("mtp.head/decode/t1p37d256v1000/normal/official/s0")
    assert torch.equal(mtp_head_golden(**kw)["X"], mtp_head_golden(**dict(kw, variant="vllm"))["X"])


def test_logits_are_head_lm_of_the_block_output():
    kw = _kw()
    want = lm_head_golden(kw["Y"], kw["hc_fn"], kw["hc_base"], kw["hc_scale"], kw["norm_weight"], kw["head_weight"],
                          norm_eps=kw["norm_eps"], hc_eps=kw["hc_eps"])["logits"]
    assert torch.equal(mtp_head_golden(**kw)["logits"], want)


def test_the_next_token_is_embedded():
    kw = _kw()
    ids = kw["ids"].clone()
    ids[0] = (ids[0] + 1) % kw["embed_table"].shape[0]        # the first token only feeds no MTP row
    assert torch.equal(mtp_head_golden(**dict(kw, ids=ids))["X"], mtp_head_golden(**kw)["X"])
    ids = kw["ids"].clone()
    ids[1] = (ids[1] + 1) % kw["embed_table"].shape[0]        # token 1 is row 0's next token
    X, X0 = mtp_head_golden(**dict(kw, ids=ids))["X"], mtp_head_golden(**kw)["X"]
    assert not torch.equal(X[0], X0[0]) and torch.equal(X[1:], X0[1:])


@pytest.mark.parametrize("key,bad,msg", [("ids", lambda kw: kw["ids"][:-1], "ids: expected"),
                                         ("positions", lambda kw: kw["positions"][:-1], "positions: expected"),
                                         ("Y", lambda kw: kw["Y"][:, :2], "Y: expected"),
                                         ("h_proj", lambda kw: kw["h_proj"].float(), "h_proj: expected uint8")])
def test_bad_input_is_refused_in_one_line(key, bad, msg):
    kw = _kw()
    with pytest.raises((ValueError, TypeError), match=msg) as e:
        mtp_head_golden(**dict(kw, **{key: bad(kw)}))
    assert "\n" not in str(e.value)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant"):
        mtp_head_golden(**dict(_kw(), variant="hf"))
