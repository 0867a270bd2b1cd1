"""Plugin subjects that serve the tiny V4.1 checkpoint through the ``e2e_serve_v41`` hook
(``conformance.checks.e2e_v41``): the golden DSV41Model, and mutants of it that break one V4.1 rule. Test-only."""


from conformance.checks.e2e_v41 import e2e_config, serve_with_model
from conformance.subjects import Subject, SubjectInfo
from references.checkpoints.reader import CheckpointReader
from references.components.mhc import hc_pre_lagged
from references.model_v41 import DSV41Model


class OwnTopkModel(DSV41Model):
    """Layer 3 recomputes its own index top-k (with layer 2's indexer weights on its own query) where V4.1 has it
    reuse layer 2's (``cfg.index_source_of(3) == 2``)."""

    def index_source_of(self, layer):
        return layer if layer == 3 else super().index_source_of(layer)

    def layer(self, layer):
        w = super().layer(layer)
        if layer == 3 and "attn.indexer.wq_b" not in w:
            w2 = super().layer(2)
            w.update({k: w2[k] for k in ("attn.indexer.wq_b", "attn.indexer.weights_proj")})
        return w


class PerSublayerHCModel(DSV41Model):
    """V4's HC pre: every sub-layer collapses with its OWN pre-mix, not the previous sub-layer's (not lagged)."""

    def hc_pre_site(self, X, fn, base, scale, pre_prev, **kw):
        _, post, comb, pre = hc_pre_lagged(X, fn, base, scale, pre_prev, **kw)
        return (pre.unsqueeze(-1) * X).sum(dim=-2), post, comb, pre


class FnuzEngramTableModel(DSV41Model):
    """Reads the Engram table's bytes as float8_e4m3fnuz (the gfx942 dialect) where the checkpoint (and vLLM on
    every platform) stores OCP float8_e4m3fn: every finite row value halves exactly (exponent bias 8, not 7; the
    -0 code 0x80 becomes NaN)."""

    engram_dialect = "float8_e4m3fnuz"


class NoEngramTableScaleModel(DSV41Model):
    """Ignores the Engram table's UE8M0 scales (reads every scale byte as 127, i.e. 2^0): rows come out as raw
    e4m3 codes, 2^-k too large."""

    def layer(self, layer):
        w = super().layer(layer)
        if "engram.table_scale" in w:
            w = dict(w, **{"engram.table_scale": w["engram.table_scale"].clone().fill_(127)})
        return w


class V41Server(Subject):
    def __init__(self, name, model_cls=DSV41Model):
        self.name, self.model_cls = name, model_cls

    def info(self):
        return SubjectInfo(self.name, f"{self.model_cls.__name__} (fp32) serving the tiny V4.1 checkpoint", "cpu",
                           "float32", False)

    def provides(self):
        return {}

    def e2e_serve_v41(self, checkpoint, prompts, *, max_tokens):
        model = self.model_cls(CheckpointReader(checkpoint), e2e_config())
        return serve_with_model(model, prompts, max_tokens=max_tokens)


def golden_v41_server():
    return V41Server("tests.harness.e2e_subjects_v41:golden_v41_server")


def own_topk_v41_server():
    return V41Server("tests.harness.e2e_subjects_v41:own_topk_v41_server", OwnTopkModel)


def per_sublayer_hc_v41_server():
    return V41Server("tests.harness.e2e_subjects_v41:per_sublayer_hc_v41_server", PerSublayerHCModel)


def fnuz_engram_table_v41_server():
    return V41Server("tests.harness.e2e_subjects_v41:fnuz_engram_table_v41_server", FnuzEngramTableModel)


def no_engram_table_scale_v41_server():
    return V41Server("tests.harness.e2e_subjects_v41:no_engram_table_scale_v41_server", NoEngramTableScaleModel)


__all__ = ["golden_v41_server", "own_topk_v41_server", "per_sublayer_hc_v41_server", "fnuz_engram_table_v41_server",
           "no_engram_table_scale_v41_server"]
