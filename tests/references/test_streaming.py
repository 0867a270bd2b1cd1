"""The streaming golden holds at most one layer: ``DSV4Model(reader, cache_weights=False)`` and the
teacher-forced replay (``layer_rows_data``) over a written multi-layer checkpoint, with every tensor the
reader decodes tracked until it is freed (weakref finalizers).

Claims checked:
* peak live decoded bytes <= the largest layer's non-expert tensors + one routed expert (w1, w3, w2) + the
  top-level tensors (embedding, head, final norm, HC head);
* when the first tensor of layer l+1 is read, nothing of layer l (or earlier) is live;
* routed-expert tensors are read only for the experts the layer routes a token to, each once.

The mutants (parametrized) must be caught: ``cache_weights=True`` (keeps every layer) and eager experts
(``lazy_experts=False``: all 64 experts of a layer decoded at once).
"""

import weakref

import pytest
import torch

from references.checkpoints.layout import layer_prefix
from references.checkpoints.reader import CheckpointReader
from references.checkpoints.writer import write_checkpoint
from references.config import TINY
from references.model import DSV4Model

TOP = ("embed.weight", "norm.weight", "head.weight", "hc_head_fn", "hc_head_base", "hc_head_scale")


class Tracked:
    """A ``WeightSource`` over a reader that counts the bytes of every decoded tensor until it is freed."""

    def __init__(self, src):
        self.src = src
        self.live = 0
        self.peak = 0
        self.events = []          # (name, live bytes just before this read)

    def get(self, name):
        self.events.append((name, self.live))
        t = self.src.get(name)
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, n)
        return t

    def _free(self, n):
        self.live -= n


def _nbytes(t):
    return t.numel() * t.element_size()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream") / "ckpt-tiny-fp8"
    deq = write_checkpoint(d, TINY, seed=3)        # FP8 / MXFP4: the reader really decodes
    return d, deq


def _budget(deq, cfg):
    top = sum(_nbytes(deq[n]) for n in TOP)
    nonexp, expert = 0, 0
    for layer in range(cfg.num_hidden_layers):
        p = layer_prefix(cfg, layer)
        nonexp = max(nonexp, sum(_nbytes(t) for n, t in deq.items()
                                 if n.startswith(p) and not n.startswith(p + "ffn.experts.")))
        expert = max(expert, sum(_nbytes(deq[f"{p}ffn.experts.0.{k}.weight"]) for k in ("w1", "w3", "w2")))
    return top, nonexp, expert


def _layer_of(name):
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


def streaming_violations(src: Tracked, deq, cfg, routed: list[set]) -> list[str]:
    """What a golden that streams one layer at a time must satisfy (see module doc); [] when it does."""
    top, nonexp, expert = _budget(deq, cfg)
    bound = top + nonexp + expert
    out = []
    if src.peak > bound:
        out.append(f"peak live decoded bytes {src.peak} > one layer's budget {bound} "
                   f"(top {top} + largest layer without experts {nonexp} + one expert {expert})")
    seen_layers = []
    for name, live in src.events:
        layer = _layer_of(name)
        if layer is None or (seen_layers and seen_layers[-1] == layer):
            continue
        if layer in seen_layers:
            out.append(f"layer {layer} read again after layer {seen_layers[-1]}")
        if seen_layers and live > top:
            out.append(f"{live - top} bytes beyond the top-level tensors still live when layer {layer} starts")
        seen_layers.append(layer)
    for layer, want in enumerate(routed):
        p = f"layers.{layer}.ffn.experts."
        reads = [n for n, _ in src.events if n.startswith(p)]
        got = {int(n[len(p):].split(".")[0]) for n in reads}
        if got != want:
            out.append(f"layer {layer}: experts read {sorted(got - want)} not routed / {sorted(want - got)} "
                       "routed not read")
        elif len(reads) != 3 * len(want):
            out.append(f"layer {layer}: {len(reads)} expert tensor reads for {len(want)} routed experts (want 3 each)")
    return out


VARIANTS = {"streaming": (dict(cache_weights=False), False),
            "mutant-cache_weights": (dict(cache_weights=True), True),
            "mutant-eager-experts": (dict(cache_weights=False, lazy_experts=False), True)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_streaming_golden_holds_one_layer(ckpt, variant):
    d, deq = ckpt
    kw, caught = VARIANTS[variant]
    src = Tracked(CheckpointReader(d))
    cfg = src.src.config
    ids = torch.randint(2, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(5))
    m = DSV4Model(src, cfg, **kw)
    logits, hid = m.forward(ids, return_hidden=True)
    routed = [set(tr["route_ids"].flatten().tolist()) for tr in hid["layers"]]
    del hid
    # the streamed logits are those of the in-memory weights
    assert torch.equal(logits, DSV4Model(deq, TINY).forward(ids))
    bad = streaming_violations(src, deq, cfg, routed)
    if caught:
        assert bad, f"{variant}: the streaming check did not catch it (peak {src.peak})"
    else:
        assert not bad, bad
        assert max(len(r) for r in routed) < cfg.n_routed_experts   # some experts are never read


@pytest.mark.parametrize("variant", ["streaming", "mutant-eager-experts"])
def test_teacher_forced_replay_streams(ckpt, variant, monkeypatch):
    """layer_rows_data on golden traces (standing in for vLLM's captures) over the tracked reader."""
    import conformance.checks.e2e as E
    from conformance.checks import e2e_golden as G
    from references.model import layer_weights

    d, deq = ckpt
    src = Tracked(CheckpointReader(d))
    cfg = src.src.config
    ids = torch.randint(2, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(6))
    _, hid = DSV4Model(deq, TINY).forward(ids, return_hidden=True)
    vt, X = [], hid["embed"]
    for tr in hid["layers"]:
        vt.append({"X": X, **{k: tr[k].reshape(tr[k].shape[0], -1) if k.endswith("_post") else tr[k]
                              for k in G.ORDER}})
        X = tr["out"]
    del hid
    routed = []
    for layer, v in enumerate(vt):
        rid = G.routing(v["ffn_in"], layer_weights(deq, TINY, layer), cfg, layer, ids, G.VLLM_VARIANTS)[1]
        routed.append(set(rid.flatten().tolist()))
    events0 = len(src.events)
    assert events0 == 0
    if variant == "mutant-eager-experts":     # layer_rows_data imports layer_weights when called
        import references.model as M

        monkeypatch.setattr(M, "layer_weights", lambda s, c, layer, lazy_experts=False: layer_weights(s, c, layer))
    table, _ = E.layer_rows_data(vt, src, cfg, ids)
    assert len(table) == cfg.num_hidden_layers
    bad = streaming_violations(src, deq, cfg, routed)
    if variant == "streaming":
        assert not bad, bad
    else:
        assert bad


def test_fp8_variant_decodes_to_the_bf16_variant(ckpt, tmp_path):
    """Every tensor of the FP8/MXFP4 official-layout checkpoint decodes to the bf16 variant's value (same
    seed): the golden can stream the quantised release layout while vLLM's CPU build serves the bf16 one."""
    d, deq = ckpt
    write_checkpoint(tmp_path, TINY, seed=3, dtype="bf16")
    q, b = CheckpointReader(d), CheckpointReader(tmp_path)
    assert q.quantized and not b.quantized
    for name in q.specs:
        assert torch.equal(q.get(name), b.get(name)), name
