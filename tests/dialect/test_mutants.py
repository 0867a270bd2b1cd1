"""Acceptance of issue 6: each mutant caught with the right diagnosis on the right edge; no alarm on the
reference serving numerics (both profiles) nor on mixed-but-consistent dialects."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conformance.checks.dialect import (
    DialectMap,
    Producer,
    dequant_consumer,
    quantizer_producer,
    reference_consumers,
    reference_producers,
)
from references.formats.blockscale import BlockFP8, quantize_fp8
from references.formats.minifloat import FNUZ
from references.formats.scales import e8m0_encode, pow2_scale
from references.numerics import serving

EDGES = [
    "weights->gemm",
    "act_quant->gemm",
    "swa_cache->sparse_attn",
    "compressed_cache->sparse_attn",
    "indexer_k->logits",
    "indexer_q->logits",
    "nvfp4_scales->experts",
]


def run(producers=None, consumers=None, profile="gfx942"):
    p, c = reference_producers(profile), reference_consumers(profile)
    p.update(producers or {})
    c.update(consumers or {})
    return DialectMap(p, c, subject=f"mutant:{profile}")


def assert_only(m: DialectMap, edge: str, factor_has: str, *diagnosis: str):
    alarms = {r.edge: r for r in m.alarms}
    assert set(alarms) == {edge}, m.table() + "\n" + "\n".join(r.message for r in m.alarms)
    row = alarms[edge]
    assert factor_has in row.factor, row.message
    for d in diagnosis:
        assert d in row.message, row.message
    # failure message: edge, worst element with index, both decodings (s/e/m), the dialect verdict
    assert f"edge {edge}" in row.message and "worst element [" in row.message, row.message
    assert "s=" in row.message and "as float8_e4m3fn)" in row.message and "as float8_e4m3fnuz)" in row.message
    return row


# -- no alarm on correct implementations -----------------------------------------------------------------
@pytest.mark.parametrize("profile", ["ocp", "gfx942"])
def test_reference_serving_numerics_raise_no_alarm(profile):
    m = run(profile=profile)
    assert not m.alarms, m.table() + "\n" + "\n".join(r.message for r in m.alarms)
    want = serving(profile).dialect
    # the NVFP4 block scales stay OCP on every profile (vLLM decodes them as float8e4nv on every arch)
    assert all(r.producer_dialect == want and r.consumer_decodes == want for r in m.rows
               if r.edge != "nvfp4_scales->experts"), m.table()
    assert m["nvfp4_scales->experts"].producer_dialect == m["nvfp4_scales->experts"].consumer_decodes == \
        "float8_e4m3fn"
    assert [r.edge for r in m.rows] == EDGES
    assert m["indexer_q->logits"].producer_fmax == (224.0 if profile == "gfx942" else 448.0)
    assert m["weights->gemm"].scale_provenance["converted"] == (
        "exponent+1" if profile == "gfx942" else "not applied"
    )


def test_mixed_but_consistent_dialects_raise_no_alarm():
    """Indexer cache and q kept OCP (read as OCP, like the torch logits fallback); SWA cache fnuz."""
    ocp_k = dataclasses.replace(BlockFP8.of("ocp", (1, 128)))
    m = run(
        {
            "indexer_k->logits": quantizer_producer("indexer_k->logits", ocp_k, scales_as_fp32=True),
            "indexer_q->logits": quantizer_producer("indexer_q->logits", ocp_k, scales_as_fp32=True),
        },
        {
            "indexer_k->logits": dequant_consumer("indexer_k->logits", "ocp", (1, 128), "fp32"),
            "indexer_q->logits": dequant_consumer("indexer_q->logits", "ocp", (1, 128), "fp32"),
        },
    )
    assert not m.alarms, m.table()
    assert m["indexer_k->logits"].producer_dialect == "float8_e4m3fn"
    assert m["swa_cache->sparse_attn"].producer_dialect == "float8_e4m3fnuz"


def test_fp32_scale_checkpoint_converted_x2_raises_no_alarm():
    from conformance.checks.dialect.emulated import CHECKPOINT_FP32, loader_producer

    m = DialectMap(
        {"weights->gemm": loader_producer("weights->gemm", "fnuz", CHECKPOINT_FP32)},
        {"weights->gemm": dequant_consumer("weights->gemm", "fnuz", (128, 128), "fp32")},
    )
    assert m["weights->gemm"].verdict == "consistent", m["weights->gemm"].message
    assert m["weights->gemm"].scale_provenance["converted"] == "x2"
    assert m["swa_cache->sparse_attn"].verdict == "not provided"


# -- the six mutants -------------------------------------------------------------------------------------
def test_fnuz_cache_bytes_decoded_as_ocp_is_x2_on_the_swa_edge():
    ocp_reader = dequant_consumer("swa_cache->sparse_attn", "ocp", (1, 64), "ue8m0")
    mutant = dataclasses.replace(
        ocp_reader, dialect="float8_e4m3fnuz", function="mutant: OCP bitcast of fnuz cache"
    )
    row = assert_only(
        run(consumers={"swa_cache->sparse_attn": mutant}),
        "swa_cache->sparse_attn",
        "x2",
        "producer writes float8_e4m3fnuz, consumer decodes float8_e4m3fn",
        "bias 8 written, bias 7 read",
    )
    assert row.read_signature["signature"] == "x2:exact"
    assert row.read_signature["fractions"]["x2:exact"] == 1.0


def _loader(edge, fix_scales):
    def fn(codes, scales):
        out = codes.clone()
        out[out == 0x80] = 0
        return out, fix_scales(scales)

    from conformance.checks.dialect.emulated import CHECKPOINT_E8M0

    return Producer(
        edge, fn, (128, 128), "ue8m0", kind="loader", checkpoint=CHECKPOINT_E8M0, function="mutant loader"
    )


def test_ocp_weights_without_scale_conversion_is_x05_on_the_weight_edge():
    row = assert_only(
        run({"weights->gemm": _loader("weights->gemm", lambda s: s)}),
        "weights->gemm",
        "x0.5",
        "scales unchanged",
        "without the x2 scale conversion",
    )
    assert row.producer_dialect == "float8_e4m3fn" and row.consumer_decodes == "float8_e4m3fnuz"
    assert row.read_signature["signature"] == "x0.5:exact"


def test_e8m0_scale_multiplied_by_two_as_float_is_caught_on_the_weight_edge():
    mutant = _loader("weights->gemm", lambda s: (s.float() * 2.0).to(torch.uint8))
    row = assert_only(
        run({"weights->gemm": mutant}),
        "weights->gemm",
        "x2**",
        "e8m0 byte multiplied by 2 as a number instead of exponent + 1",
    )
    assert row.scale_check["conversion"] == "byte*2"


def test_fmax_448_under_fnuz_profile_is_x0536_on_its_edge():
    def fn(x):  # scale for OCP's 448, bytes in fnuz (saturating at 240)
        xa = x.double().numpy().reshape(-1, 64)
        s = pow2_scale(np.abs(xa).max(-1), 448.0, 1e-4)
        codes = FNUZ.encode(xa / s[:, None], saturate=True).reshape(x.shape)
        return torch.from_numpy(codes), torch.from_numpy(e8m0_encode(s).reshape(x.shape[0], -1))

    mutant = Producer("swa_cache->sparse_attn", fn, (1, 64), "ue8m0", function="mutant: fnuz with fmax 448")
    row = assert_only(
        run({"swa_cache->sparse_attn": mutant}),
        "swa_cache->sparse_attn",
        "x0.536",
        "fmax 448 exceeds float8_e4m3fnuz max 240",
    )
    assert row.producer_fmax == 448.0
    assert row.write_signature["signature"] == "fmax240/448:exact"


def test_0x80_written_for_tiny_negatives_on_fnuz_is_nan_on_its_edge():
    spec = serving("gfx942").kv_nope

    def fn(x):
        codes, scales = quantize_fp8(x, spec)
        codes[(torch.signbit(x)) & (codes == 0)] = 0x80
        return codes, scales

    mutant = Producer("compressed_cache->sparse_attn", fn, (1, 64), "ue8m0", function="mutant: -0 as 0x80")
    row = assert_only(
        run({"compressed_cache->sparse_attn": mutant}),
        "compressed_cache->sparse_attn",
        "NaN<->-0 at 0x80",
        "written as 0x80",
    )
    assert row.defects[0]["kind"] == "nan_from_negative_underflow"
    assert row.write_signature["signature"] == "nan_at_0x80"


def test_indexer_q_quantised_ocp_while_k_fnuz_is_x05_on_the_q_edge():
    q_ocp = quantizer_producer(
        "indexer_q->logits",
        BlockFP8.of("ocp", (1, 128)),
        scales_as_fp32=True,
        function="mutant: indexer q hard-coded float8_e4m3fn",
    )
    row = assert_only(
        run({"indexer_q->logits": q_ocp}),
        "indexer_q->logits",
        "x0.5",
        "producer writes float8_e4m3fn, consumer decodes float8_e4m3fnuz",
    )
    assert row.read_signature["signature"] == "x0.5:exact"


def test_non_saturating_cast_overflow_to_nan_is_caught():
    def fn(x):
        xa = x.double().numpy().reshape(-1, 128)
        s = pow2_scale(np.abs(xa).max(-1), 448.0, 1e-4)
        codes = FNUZ.encode(xa / s[:, None], saturate=False).reshape(x.shape)
        return torch.from_numpy(codes), torch.from_numpy(s.astype(np.float32).reshape(x.shape[0], -1))

    mutant = Producer("indexer_k->logits", fn, (1, 128), "fp32", function="mutant: non-saturating fnuz cast")
    row = assert_only(run({"indexer_k->logits": mutant}), "indexer_k->logits", "", "became NaN")
    assert {d["kind"] for d in row.defects} >= {"overflow_to_nan", "fmax_exceeds_format"}


def test_check_results_carry_the_map():
    m = run(
        {
            "indexer_q->logits": quantizer_producer(
                "indexer_q->logits", BlockFP8.of("ocp", (1, 128)), scales_as_fp32=True
            )
        }
    )
    rows = m.check_results()
    assert [r.check for r in rows] == ["dialect"] * 8
    summary = rows[-1]
    assert summary.case_id == "dialect/map" and summary.verdict == "fail"
    assert len(summary.extra["dialect_map"]) == 7
    assert {r.case_id: r.verdict for r in rows[:-1]}["dialect/indexer_q->logits"] == "fail"
    summary.to_json()  # JSON-safe


# -- NVFP4 block scales (issue 18): the checkpoint writes OCP E4M3 bytes; the reader is the serving subject's
NV = "nvfp4_scales->experts"


def test_nvfp4_ocp_scale_bytes_read_as_fnuz_is_x05_on_the_nvfp4_edge():
    """An fnuz reader of the checkpoint's unconverted OCP scale bytes (the same byte, half the value)."""
    row = assert_only(run(consumers={NV: dequant_consumer(NV, "fnuz", (1, 128), "fp32")}), NV, "x0.5",
                      "scales unchanged", "producer writes float8_e4m3fn, consumer decodes float8_e4m3fnuz")
    assert row.read_signature["signature"] == "x0.5:exact"


@pytest.mark.parametrize("profile", ["ocp", "gfx942"])
def test_nvfp4_scales_converted_to_fnuz_and_read_as_fnuz_raise_no_alarm(profile):
    """A correct conversion (0x80 -> 0, weight_scale_2 x2) read as fnuz is consistent, like vLLM's OCP read."""
    from conformance.checks.dialect.emulated import CHECKPOINT_NVFP4_SCALES, loader_producer

    m = run({NV: loader_producer(NV, "fnuz", CHECKPOINT_NVFP4_SCALES)},
            {NV: dequant_consumer(NV, "fnuz", (1, 128), "fp32")}, profile=profile)
    assert not m.alarms, m.table()
    assert m[NV].scale_provenance["converted"] == "x2"


def test_nvfp4_scales_converted_but_read_as_ocp_is_x2():
    from conformance.checks.dialect.emulated import CHECKPOINT_NVFP4_SCALES, loader_producer

    row = assert_only(run({NV: loader_producer(NV, "fnuz", CHECKPOINT_NVFP4_SCALES)}), NV, "x2")
    assert row.producer_dialect == "float8_e4m3fnuz" and row.consumer_decodes == "float8_e4m3fn"


# -- MXFP4 staging (no FP8 dialect; e8m0 scale and nibble-order hazards) -----------------------------------
def test_mxfp4_staging_reference_passes_and_mutants_are_named():
    from conformance.checks.dialect import probe_mxfp4
    from references.formats.blockscale import quantize_mxfp4

    assert probe_mxfp4(quantize_mxfp4).ok
    v = probe_mxfp4(lambda x: (quantize_mxfp4(x)[0], (quantize_mxfp4(x)[1].float() * 2.0).to(torch.uint8)))
    assert not v.ok and v.scale_check["conversion"] == "byte*2", v.message

    def swapped(x):
        p, s = quantize_mxfp4(x)
        return (p >> 4) | ((p & 0xF) << 4), s

    v = probe_mxfp4(swapped)
    assert not v.ok and v.nibbles_swapped and "low nibble" in v.message
