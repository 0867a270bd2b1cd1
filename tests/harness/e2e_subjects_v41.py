"""Plugin subjects that serve the tiny V4.1 checkpoint through the ``e2e_serve_v41`` hook
(``conformance.checks.e2e_v41``): the golden DSV41Model, and mutants of it that break one V4.1 rule. Test-only.

Serving-numerics mutants (``e2e_v41_profile`` set: judged at the emulated level against a replay in
``serving_v41(profile)``): each rounds ONE place the way a V4.1 server does not."""

import dataclasses

from conformance.checks.e2e_v41 import e2e_config, serve_with_model
from conformance.subjects import Subject, SubjectInfo
from references.checkpoints.reader import CheckpointReader
from references.components.mhc import hc_pre_lagged
from references.formats.blockscale import BlockFP8
from references.model_v41 import DSV41Model
from references.numerics import serving, serving_v41


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


class LatentFP8Model(DSV41Model):
    """The compressor latent the index keys read is taken after the compressed cache's FP8 nope store, where vLLM
    keeps the bf16 latent (``common/ops/fused_compress_quant_cache.py:216-221``)."""

    def latent_numerics(self, cnm):
        return cnm


class KeysOcpReadAsFnuzModel(DSV41Model):
    """Index keys written as OCP e4m3fn bytes at fmax 448 (vLLM 0.32.0's V4.1 writer has no fnuz branch,
    ``indexer_k_store.py:237-253``) and decoded as e4m3fnuz on gfx942: the same byte reads as half the value."""

    def _compress(self, x, w, layer, positions, inv_freq, shared, st):
        super()._compress(x, w, layer, positions, inv_freq, shared, st)
        if layer in shared["index_k"]:
            shared["index_k"][layer] = shared["index_k"][layer] * 0.5


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
    def __init__(self, name, model_cls=DSV41Model, profile=None, numerics=None):
        self.name, self.model_cls = name, model_cls
        self.e2e_v41_profile = profile
        self.numerics = numerics if numerics is not None or profile is None else serving_v41(profile)

    def info(self):
        return SubjectInfo(self.name, f"{self.model_cls.__name__} (fp32) serving the tiny V4.1 checkpoint", "cpu",
                           "float32", False)

    def provides(self):
        return {}

    def e2e_serve_v41(self, checkpoint, prompts, *, max_tokens):
        kw = {} if self.numerics is None else {"numerics": self.numerics}
        model = self.model_cls(CheckpointReader(checkpoint), e2e_config(), **kw)
        return serve_with_model(model, prompts, max_tokens=max_tokens)


def golden_v41_server():
    return V41Server("tests.harness.e2e_subjects_v41:golden_v41_server")


def own_topk_v41_server():
    return V41Server("tests.harness.e2e_subjects_v41:own_topk_v41_server", OwnTopkModel)


def per_sublayer_hc_v41_server():
    return V41Server("tests.harness.e2e_subjects_v41:per_sublayer_hc_v41_server", PerSublayerHCModel)


def emulated_v41_server(profile="gfx942"):
    """The correct V4.1 serving numerics through the plugin hook (what ``emulated:<profile>`` serves)."""
    return V41Server(f"tests.harness.e2e_subjects_v41:emulated_v41_server[{profile}]", profile=profile)


def latent_fp8_v41_server():
    return V41Server("tests.harness.e2e_subjects_v41:latent_fp8_v41_server", LatentFP8Model, profile="gfx942")


def keys_ocp_as_fnuz_v41_server():
    return V41Server("tests.harness.e2e_subjects_v41:keys_ocp_as_fnuz_v41_server", KeysOcpReadAsFnuzModel,
                     profile="gfx942")


def v4_block_fp8_v41_server():
    """ocp linear inputs quantised with V4's block FP8 (1x128 groups, fp32 scale amax / 448,
    ``serving("ocp").linear_act``) instead of V4.1's MXFP8 (1x32 groups, E8M0 power-of-two scale)."""
    nm = dataclasses.replace(serving_v41("ocp"), name="serving-v41:ocp-v4-block-fp8",
                             linear_act=serving("ocp").linear_act)
    return V41Server("tests.harness.e2e_subjects_v41:v4_block_fp8_v41_server", profile="ocp", numerics=nm)


def compressed_cache_v4_record_v41_server():
    """gfx942: the compressed cache written in V4's record (the profile's e4m3fnuz at fmax 240) where V4.1's writer
    stores e4m3fn at 448 on every platform (``fused_compress_quant_cache.py:304-350``). NOT a caught mutant: the
    fnuz grid is the fn grid halved, so with power-of-two scales both round every normal element to the same value
    (docs/v41-serving-numerics.md: measured, within the emulated bound)."""
    nm = dataclasses.replace(serving_v41("gfx942"), name="serving-v41:gfx942-v4-compressed-record",
                             kv_nope_compressed=None)
    return V41Server("tests.harness.e2e_subjects_v41:compressed_cache_v4_record_v41_server", profile="gfx942",
                     numerics=nm)


def mxfp8_1x128_v41_server():
    """ocp MXFP8 in 1x128 groups instead of 1x32, still with E8M0 scales. With power-of-two scales the e4m3 rounding
    of an element is scale-invariant while it stays normal, so only elements about 2^-14 below their group's amax
    round differently: within the bound on layer 0, caught on layer 1 (docs/v41-serving-numerics.md)."""
    nm = serving_v41("ocp")
    nm = dataclasses.replace(nm, name="serving-v41:ocp-mxfp8-1x128", linear_act=BlockFP8.of(
        "float8_e4m3fn", (1, 128), fmax=448.0, scale_fmt="ue8m0", amax_floor=nm.linear_act.amax_floor))
    return V41Server("tests.harness.e2e_subjects_v41:mxfp8_1x128_v41_server", profile="ocp", numerics=nm)


def fnuz_engram_table_v41_server():
    return V41Server("tests.harness.e2e_subjects_v41:fnuz_engram_table_v41_server", FnuzEngramTableModel)


def no_engram_table_scale_v41_server():
    return V41Server("tests.harness.e2e_subjects_v41:no_engram_table_scale_v41_server", NoEngramTableScaleModel)


__all__ = ["golden_v41_server", "own_topk_v41_server", "per_sublayer_hc_v41_server", "fnuz_engram_table_v41_server",
           "no_engram_table_scale_v41_server", "emulated_v41_server", "latent_fp8_v41_server",
           "keys_ocp_as_fnuz_v41_server", "v4_block_fp8_v41_server", "mxfp8_1x128_v41_server",
           "compressed_cache_v4_record_v41_server"]
