"""Plugin subjects that serve a whole model through the public ``e2e_serve`` hook (``conformance.checks.e2e``):
the golden model itself in vLLM-CPU-like bf16 numerics, and mutants of it. Test-only."""

import torch

from conformance.checks.e2e import ServedPrompt, open_checkpoint
from conformance.checks.e2e_golden import CPU_BF16, ORDER
from conformance.subjects import Subject, SubjectInfo
from references.components.head import hc_head
from references.components.norms import rms_norm
from references.model import DSV4Model


class _Scaled:
    """A weight source with one tensor scaled (a wrong load of that tensor)."""

    def __init__(self, src, name, factor):
        self.src, self.name, self.factor = src, name, factor

    def get(self, name):
        t = self.src.get(name)
        return t * self.factor if name == self.name else t


class GoldenServer(Subject):
    def __init__(self, name="tests.harness.e2e_subjects:golden_server", scale=None, drop_layer=False, tamper=None):
        self.name, self.scale, self.drop_layer, self.tamper = name, scale, drop_layer, tamper

    def info(self):
        return SubjectInfo(self.name, "the golden DSV4Model in CPU bf16 numerics, served greedily", "cpu",
                           "bfloat16", False)

    def provides(self):
        return {}

    def e2e_serve(self, checkpoint, prompts, *, max_tokens):
        reader = open_checkpoint(checkpoint)
        cfg = reader.config
        src = _Scaled(reader, *self.scale) if self.scale else reader
        model = DSV4Model(src, cfg, numerics=CPU_BF16)
        out = []
        for p in prompts:
            gen = []
            with torch.no_grad():
                for _ in range(max_tokens):
                    gen.append(int(model.forward(torch.tensor(list(p) + gen))[-1].argmax()))
                logits, hid = model.forward(torch.tensor(list(p) + gen[:-1]), return_hidden=True)
            T = len(p)
            layers = []
            for i, tr in enumerate(hid["layers"]):
                x = hid["embed"] if i == 0 else hid["layers"][i - 1]["out"]
                layers.append({"X": x[:T], **{k: tr[k][:T] for k in ORDER}})
            if self.drop_layer:
                layers = layers[:-1]
            g = reader.get
            h = hc_head(hid["final"][:T], g("hc_head_fn"), g("hc_head_base"), g("hc_head_scale"),
                        norm_eps=cfg.rms_norm_eps, hc_eps=cfg.hc_eps, numerics=CPU_BF16)
            h = rms_norm(h.float(), g("norm.weight").float(), cfg.rms_norm_eps)
            out.append(ServedPrompt(list(p), gen, logits.float(), layers, h))
        return [self.tamper(r) for r in out] if self.tamper else out


def golden_server():
    return GoldenServer()


def wrong_wo_b_server():
    """Layer 1's attention output projection loaded at 1.25x its value: beyond attn_out's bound."""
    return GoldenServer("tests.harness.e2e_subjects:wrong_wo_b_server", scale=("layers.1.attn.wo_b.weight", 1.25))


def short_trace_server():
    """Returns one layer trace fewer than the model has."""
    return GoldenServer("tests.harness.e2e_subjects:short_trace_server", drop_layer=True)


def small_gain_wo_b_server():
    """Layer 1's wo_b loaded at 1 + 2^-5: a 3% relative error, inside attn_out's 6.6% elementwise bound, but one
    gain on every token (the systematic detector's case)."""
    return GoldenServer("tests.harness.e2e_subjects:small_gain_wo_b_server",
                        scale=("layers.1.attn.wo_b.weight", 1 + 2.0**-5))


def nan_logits_server():
    """One logit NaN (a served NaN must not be compared as if it were a number)."""
    def tamper(r):
        r.logits[3, 7] = float("nan")
        return r
    return GoldenServer("tests.harness.e2e_subjects:nan_logits_server", tamper=tamper)


def truncated_logits_server():
    """Logits of the prompt positions only (the generated tokens' prefixes missing)."""
    def tamper(r):
        r.logits = r.logits[:len(r.prompt)]
        return r
    return GoldenServer("tests.harness.e2e_subjects:truncated_logits_server", tamper=tamper)


def other_prompt_server():
    """Reports a prompt other than the one it was given."""
    def tamper(r):
        r.prompt = [r.prompt[0] + 1] + list(r.prompt[1:])
        return r
    return GoldenServer("tests.harness.e2e_subjects:other_prompt_server", tamper=tamper)
