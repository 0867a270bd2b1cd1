"""dspark.input / dspark.markov: deliberately broken implementations are caught on the fast tier with a message
naming the component, the case, the failing output and its worst element; the correct ones pass (reference and
both emulations: test_correct_implementations_pass here and test_subjects_and_suite.py)."""

import pytest
import torch

from conformance.cases import cases_for
from conformance.cases.dspark import _emulate_input, _emulate_markov, dspark_input_golden, dspark_markov_golden
from conformance.checks.numeric import run_numeric, worst_verdict

from .test_component_mutants import Mutant


def input_last_three_layers(streams, *a, target_layer_ids, **kw):
    # the taps read the last len(ids) backbone layers' outputs (V4-Flash's bundled DSpark taps [40, 41, 42] are its
    # last three layers) instead of dspark_target_layer_ids
    L = streams.shape[0] - 1
    n = len(target_layer_ids)
    off = 1 if kw.get("variant", "v4.1") == "v4" else 0
    return dspark_input_golden(streams, *a, target_layer_ids=tuple(range(L - n + 1 - off, L + 1 - off)), **kw)


def input_v4_tap_semantics(streams, *a, variant="v4.1", **kw):
    # V4's capture-after semantics (ids + 1, eagle3_utils.py:119-121) applied to every row
    if variant == "v4":
        kw["target_layer_ids"] = tuple(i + 1 for i in kw["target_layer_ids"])
    return dspark_input_golden(streams, *a, variant="v4", **kw)


def input_noise_embedding_zero(*a, **kw):
    out = dspark_input_golden(*a, **kw)
    noise = (out["ids"] == kw["noise_token_id"]).view(-1, 1, 1)
    out["X0"] = torch.where(noise, torch.zeros_like(out["X0"]), out["X0"])
    return out


def input_positions_off_by_one(*a, **kw):
    # the block starts AT the last accepted position (p + off) instead of after it (p + 1 + off)
    out = dspark_input_golden(*a, **kw)
    out["positions"] = out["positions"] - 1
    return out


def input_anchor_is_noise(*a, **kw):
    # every block slot the noise token (DFlash's 1 + N fill-in layout without the bonus slot)
    out = dspark_input_golden(*a, **kw)
    out["ids"] = torch.full_like(out["ids"], kw["noise_token_id"])
    out["X0"] = kw["embed_table"].float()[out["ids"]].unsqueeze(-2).expand_as(out["X0"])
    return out


def input_rejected_tokens_as_context(streams, anchor, context_positions, query_start_loc, num_rejected, *a, **kw):
    return dspark_input_golden(streams, anchor, context_positions, query_start_loc, torch.zeros_like(num_rejected),
                               *a, **kw)


def _chain(U, anchor, w1, w2, *, prev_of, bias):
    B, N, _ = U.shape
    logits, toks, embeds = [], [], []
    for k in range(N):
        prev = prev_of(k, anchor, toks)
        e = w1.float()[prev]
        lk = U[:, k].float() + bias(e, prev, w1, w2)
        toks.append(lk.argmax(-1))
        logits.append(lk)
        embeds.append(e)
    return torch.stack(logits, 1), torch.stack(toks, 1), torch.stack(embeds, 1)


def _markov(name, prev_of=None, bias=None):
    prev_of = prev_of or (lambda k, anchor, toks: anchor.long() if k == 0 else toks[-1])
    bias = bias or (lambda e, prev, w1, w2: e @ w2.float().T)

    def fn(U, h, anchor, markov_w1, markov_w2, conf_w):
        logits, toks, e = _chain(U, anchor, markov_w1, markov_w2, prev_of=prev_of, bias=bias)
        c = torch.sigmoid(torch.cat([h.float(), e], -1) @ conf_w.float())
        return {"logits": logits, "tokens": toks, "confidence": c}
    fn.__name__ = fn.__qualname__ = name
    return fn


markov_dropped = _markov("markov_dropped", bias=lambda e, prev, w1, w2: torch.zeros(e.shape[0], w2.shape[0]))
# the two factors' roles swapped: markov_w2[prev] embeds, markov_w1 projects
markov_transposed = _markov("markov_transposed", bias=lambda e, prev, w1, w2: w2.float()[prev] @ w1.float().T)
# one step late: position k uses the token two back (the anchor for k = 0, 1)
markov_prev_late = _markov("markov_prev_late", prev_of=lambda k, anchor, toks: anchor.long() if k < 2 else toks[-2])


def markov_confidence_without_embed(U, h, anchor, markov_w1, markov_w2, conf_w):
    out = dspark_markov_golden(U, h, anchor, markov_w1, markov_w2, conf_w)
    D = h.shape[-1]
    out["confidence"] = torch.sigmoid(h.float() @ conf_w.float()[:D])
    return out


MUTANTS = [("dspark.input", input_last_three_layers, "main_x"), ("dspark.input", input_v4_tap_semantics, "main_x"),
           ("dspark.input", input_noise_embedding_zero, "X0"), ("dspark.input", input_positions_off_by_one,
                                                                "positions"),
           ("dspark.input", input_anchor_is_noise, "ids"), ("dspark.input", input_rejected_tokens_as_context,
                                                            "positions"),
           ("dspark.markov", markov_dropped, "logits"), ("dspark.markov", markov_transposed, "logits"),
           ("dspark.markov", markov_prev_late, "logits"), ("dspark.markov", markov_confidence_without_embed,
                                                           "confidence")]


def _run(component, fn):
    subj = Mutant(component, fn)
    return {c.id: run_numeric(subj, c) for c in cases_for(component) if c.tier == "fast"}


@pytest.mark.parametrize("component, fn, output", MUTANTS, ids=[f"{c}:{f.__name__}" for c, f, _ in MUTANTS])
def test_mutant_caught_with_diagnosis(component, fn, output):
    caught = False
    for cid, rows in _run(component, fn).items():
        if worst_verdict(rows) in ("fail", "catastrophic"):
            caught = True
            for r in rows:
                if r.verdict in ("fail", "catastrophic"):
                    assert component in r.message and cid in r.message, r.message
                    assert f"{output}:" in r.message, r.message
                    assert r.worst.get("index") is not None, r.message
    assert caught, f"mutant {fn.__name__} of {component} passed every case"


def test_rejected_tail_mutant_caught_only_where_tokens_are_rejected():
    for cid, rows in _run("dspark.input", input_rejected_tokens_as_context).items():
        case = next(c for c in cases_for("dspark.input") if c.id == cid)
        want = ("fail", "catastrophic") if any(case.params["rejected"]) else ("pass",)
        assert worst_verdict(rows) in want, cid


def test_last_three_layers_mutant_caught_on_every_row():
    # no row's ids are the last three layers, so every row must catch it
    for cid, rows in _run("dspark.input", input_last_three_layers).items():
        assert worst_verdict(rows) in ("fail", "catastrophic"), cid


@pytest.mark.parametrize("component, fn", [("dspark.input", dspark_input_golden), ("dspark.input",
                                           _emulate_input("gfx942")), ("dspark.input", _emulate_input("ocp")),
                                           ("dspark.markov", dspark_markov_golden),
                                           ("dspark.markov", _emulate_markov("gfx942"))])
def test_correct_implementations_pass(component, fn):
    for cid, rows in _run(component, fn).items():
        assert worst_verdict(rows) == "pass", (cid, [r.message for r in rows if r.verdict != "pass"])
