"""The dialect map: every DSV4 FP8 edge, producer and consumer probed, one verdict per edge.

Per edge:
  producer probe  designed values in -> bytes + scales out -> classify_codes (dialect, fmax, defects);
                  a loader also gets check_scale_conversion against the checkpoint's scales
  consumer probe  every finite code of the consumer's declared dialect in -> values out -> classify_decoding
  edge run        the consumer reads the producer's actual bytes: read signature (read vs what the producer
                  meant in its own dialect) and write signature (what the producer meant vs values fed)
Verdict: "consistent" when the producer's dialect is the consumer's and nothing is flagged; "MISMATCH" with
the suspected factor and a diagnosis otherwise; "not provided" when a side is missing. Mixed dialects are
fine: only each edge's own consistency is judged.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from references.formats.blockscale import quantize_fp8
from references.formats.minifloat import get_format

from ...ratio import ratio_signature
from .classify import NEITHER, both_decodings, classify_codes, classify_decoding, describe
from .interface import DSV4_EDGES, Consumer, Edge, Producer
from .probes import consumer_probe, expand_scales, producer_probe_values, scales_as_float
from .scale_checks import ScaleProvenance, check_scale_conversion

_DEFECT_FACTOR = {
    "nan_from_negative_underflow": "NaN<->-0 at 0x80",
    "overflow_to_nan": "NaN (overflow)",
    "nan_written": "NaN",
    "bad_scale": "bad scale",
    "fmax_mismatch": "fmax",
    "subnormal_mishandled": "subnormal codes (not a dialect error)",
}

# where each ratio signature usually comes from (used when a comparison has no edge of its own)
SUSPECTS = {
    "x2": "swa_cache->sparse_attn / compressed_cache->sparse_attn (fnuz cache read as OCP) or weights->gemm "
    "(scale conversion applied twice)",
    "x0.5": "weights->gemm (OCP weights without the scale conversion), indexer_q->logits "
    "(OCP q read as fnuz) or nvfp4_scales->experts (the checkpoint's OCP E4M3 block scales read as fnuz)",
    "fmax240/448": "a producer using fmax 448 with fnuz bytes (act_quant / cache writers)",
    "fmax448/240": "a producer scaling for 240 read by a 448 consumer",
    "fmax224/240": "indexer_q->logits (USE_FNUZ fmax 224)",
    "fmax240/224": "indexer_q->logits (USE_FNUZ fmax 224)",
    "nan_at_0x80": "a fnuz producer writing 0x80 (cache writers, indexer q/K) or weights->gemm "
    "without the 0x80 fix",
}


def _np(x):
    x = x.detach().cpu()
    return x.float().numpy() if x.is_floating_point() else x.numpy()


@dataclass
class EdgeRow:
    edge: str
    producer: str
    consumer: str
    verdict: str = "not provided"  # consistent | MISMATCH | not provided | error
    factor: str = ""
    diagnosis: str = ""
    producer_function: str = ""
    consumer_function: str = ""
    producer_dialect: str = ""
    producer_fmax: float | None = None
    consumer_fed: str = ""
    consumer_decodes: str = ""
    defects: list = field(default_factory=list)
    scale_provenance: dict = field(default_factory=dict)
    scale_check: dict = field(default_factory=dict)
    write_signature: dict = field(default_factory=dict)
    read_signature: dict = field(default_factory=dict)
    producer_evidence: list = field(default_factory=list)
    consumer_evidence: list = field(default_factory=list)
    worst: dict = field(default_factory=dict)
    message: str = ""

    @property
    def alarm(self) -> bool:
        return self.verdict in ("MISMATCH", "error")

    def as_dict(self) -> dict:
        return asdict(self)


def run_producer(p: Producer):
    """-> (values fed, codes, per-element scale values, checkpoint scales or None)."""
    x = producer_probe_values(p.block)
    ckpt_scales = None
    if p.kind == "loader":
        ocp_codes, ckpt_scales = quantize_fp8(x, p.checkpoint)
        codes, scales = p.fn(ocp_codes.clone(), ckpt_scales.clone())
    else:
        codes, scales = p.fn(x.clone())
    if codes.dtype != torch.uint8:
        codes = codes.view(torch.uint8) if codes.element_size() == 1 else codes
    codes = codes.reshape(x.shape)
    s = expand_scales(scales_as_float(scales, p.scale_fmt), p.block, tuple(x.shape))
    return x, codes, scales, s, ckpt_scales


def probe_edge(edge: Edge, producer: Producer | None, consumer: Consumer | None) -> EdgeRow:
    row = EdgeRow(edge.name, edge.producer, edge.consumer)
    if producer is None or consumer is None:
        missing = [n for n, o in (("producer", producer), ("consumer", consumer)) if o is None]
        row.diagnosis = f"{' and '.join(missing)} not provided by this subject"
        row.message = f"edge {edge.name}: {row.diagnosis}"
        return row
    row.producer_function, row.consumer_function = producer.function, consumer.function
    try:
        _probe(row, producer, consumer)
    except MemoryError:   # out of memory is a crash of the case (conformance.isolate), not a verdict
        raise
    except Exception as e:  # a probe that crashes is an error on that edge, never a silent pass
        row.verdict, row.factor = "error", ""
        row.diagnosis = f"{type(e).__name__}: {e}"
        row.message = f"edge {edge.name}: probe raised {row.diagnosis}\n{traceback.format_exc(limit=3)}"
    notes = [n for n in (producer.note, consumer.note) if n]   # what the subject knows of the edge beyond the probe
    if notes:
        row.message = f"{row.message}; " + "; ".join(f"note: {n}" for n in notes)
    return row


def _probe(row: EdgeRow, p: Producer, c: Consumer) -> None:
    x, codes, scales, s_el, ckpt_scales = run_producer(p)
    pv = classify_codes(codes, x, s_el, block=p.block, amax_floor=p.amax_floor)
    row.producer_dialect, row.producer_fmax = pv.dialect, pv.fmax_guess
    row.defects, row.producer_evidence = pv.defects, pv.evidence
    # consumer probe: bytes of its declared dialect
    fed = get_format(c.dialect)
    ccodes, cscales, cs = consumer_probe(fed, c.block, c.scale_fmt)
    with np.errstate(over="ignore", invalid="ignore"):
        cread = _np(c.fn(ccodes.clone(), cscales.clone())).reshape(ccodes.shape)
    cv = classify_decoding(ccodes, fed.name, cread, cs, block=c.block)
    row.consumer_fed, row.consumer_decodes, row.consumer_evidence = cv.dialect_fed, cv.decoded_as, cv.evidence
    # scale conversion and provenance
    if ckpt_scales is not None:
        expected = "double" if cv.decoded_as == "float8_e4m3fnuz" else "none"
        sc = check_scale_conversion(ckpt_scales, scales, p.checkpoint.scale_fmt, expected=expected)
        row.scale_check = sc.as_dict()
        row.scale_provenance = ScaleProvenance(
            row.edge, p.scale_fmt, pv.scale_rule, p.checkpoint.fmt.name, sc.conversion, p.checkpoint.fmax
        ).as_dict()
    else:
        row.scale_provenance = ScaleProvenance(
            row.edge, p.scale_fmt, pv.scale_rule, pv.dialect, "no", pv.fmax_guess
        ).as_dict()
    # the edge itself: the consumer reads the producer's bytes
    with np.errstate(over="ignore", invalid="ignore"):  # a wrong scale may overflow float32: that is evidence
        read = _np(c.fn(codes.clone(), scales.clone() if hasattr(scales, "clone") else scales)).reshape(
            x.shape
        )
    cn = _np(codes)
    meant_fmt = get_format(pv.dialect) if pv.dialect in ("float8_e4m3fn", "float8_e4m3fnuz") else fed
    meant = meant_fmt.decode(cn) * s_el
    rs = ratio_signature(read, meant, codes=cn, edge=row.edge)
    ws = ratio_signature(
        meant, _np(x), codes=cn, edge=row.edge, ignore_below=s_el * 2.0 ** (1 - meant_fmt.bias)
    )
    row.read_signature, row.write_signature = rs.as_dict(), ws.as_dict()
    _verdict(row, pv, cv, rs, ws, x, cn, read, meant, meant_fmt)


def _verdict(row, pv, cv, rs, ws, x, cn, read, meant, meant_fmt) -> None:
    reasons, factor = [], ""
    dp, dc = pv.dialect, cv.decoded_as
    known = ("float8_e4m3fn", "float8_e4m3fnuz")
    sc = row.scale_check
    if sc and not sc["ok"]:
        # "x2" / "exponent+1" fail only where no conversion was due (an OCP reader): the scales read doubled
        f = {"not applied": "x0.5", "applied twice": "x2", "byte*2": "x2**(byte)", "x2": "x2",
             "exponent+1": "x2"}.get(sc["conversion"], "?")
        if sc["conversion"] == "byte*2" and sc["factor_log2"] is not None:
            f = f"x2**{sc['factor_log2']:g} instead of x2"
        factor = factor or f
        reasons.append(sc["message"])
    for d in pv.defects:
        factor = factor or (
            f"x{get_format(dp).max / pv.fmax_guess:.3f} (fmax {pv.fmax_guess:g} vs {get_format(dp).max:g})"
            if d["kind"] == "fmax_exceeds_format"
            else _DEFECT_FACTOR.get(d["kind"], d["kind"])
        )
        reasons.append(f"producer: {d['message']}")
    if dp not in known:
        off = ", ".join(f"{k} x2**{v}" for k, v in pv.scale_offset_log2.items())
        factor = factor or (f"scale off ({off})" if off else "?")
        reasons.append(f"producer bytes are {dp} dialect for its own scales" + (f" ({off})" if off else ""))
    for d in getattr(cv, "defects", []):
        factor = factor or _DEFECT_FACTOR.get(d["kind"], d["kind"])
        reasons.append(f"consumer: {d['message']}")
    if dc not in known:
        # a real reader can smear one NaN over a whole output (attention, logits): the power-of-two factor
        # against the fed decoding still names the error
        k = cv.factor_log2.get(cv.dialect_fed)
        factor = factor or ({1: "x2", -1: "x0.5"}.get(k) if k else "") or "?"
        reasons.append(f"consumer decodes {dc} ({'; '.join(cv.evidence[-1:])})")
    if dp in known and dc in known and dp != dc:
        k = get_format(dp).bias - get_format(dc).bias
        f = "x2" if k > 0 else "x0.5"
        factor = factor or f
        why = ""
        if row.edge == "weights->gemm" and sc.get("conversion") == "not applied":
            why = " (OCP checkpoint used on a fnuz device without the x2 scale conversion)"
        reasons.append(
            f"producer writes {dp}, consumer decodes {dc}: values read {f} "
            f"(bias {get_format(dp).bias} written, bias {get_format(dc).bias} read){why}"
        )
    if rs.flagged:
        factor = factor or rs.factor
        reasons.append(f"read {rs.summary()}")
    if ws.flagged:
        factor = factor or ws.factor
        reasons.append(f"write {ws.summary()}")
    row.verdict = "MISMATCH" if reasons else "consistent"
    row.factor = factor if reasons else "x1"
    row.diagnosis = "; ".join(reasons) if reasons else f"{dp} written and read"
    row.worst = _worst(rs, ws, pv, x, cn, read, meant)
    w = row.worst
    where = (
        f" worst element {w['index']}: fed {w['fed']:g}, byte {w['bytes']}; read {w['read']!r}, "
        f"producer meant {w['meant']!r}."
        if w
        else ""
    )
    fm = f", fmax {row.producer_fmax:g}" if row.producer_fmax else ""
    row.message = (
        f"edge {row.edge} [{row.verdict} {row.factor}]: producer '{row.producer}' ({row.producer_function}) "
        f"wrote {dp}{fm}; consumer '{row.consumer}' ({row.consumer_function}) decodes {dc} "
        f"(fed {cv.dialect_fed}). {row.diagnosis}.{where}"
    )


def _worst(rs, ws, pv, x, cn, read, meant) -> dict:
    src = rs.worst if rs.flagged else ws.worst if ws.flagged else pv.worst
    if not src or "index" not in src:
        if not pv.defects or not pv.defects[0].get("index"):
            return {}
        src = {"index": pv.defects[0]["index"]}
    i = tuple(src["index"])
    return dict(
        index=list(i),
        fed=float(_np(x)[i]),
        code=int(cn[i]),
        bytes=both_decodings(int(cn[i])),
        read=float(read[i]),
        meant=float(meant[i]),
    )


class DialectMap:
    """Probe every DSV4 edge; ``rows`` in DSV4_EDGES order; ``as_rows()`` is render-ready."""

    def __init__(self, producers: dict, consumers: dict, *, subject: str = "", edges=None):
        self.subject = subject
        self.edges = list((edges or DSV4_EDGES).values())
        t = time.perf_counter()
        self.rows = [probe_edge(e, producers.get(e.name), consumers.get(e.name)) for e in self.edges]
        self.duration_s = time.perf_counter() - t

    def __getitem__(self, edge: str) -> EdgeRow:
        return next(r for r in self.rows if r.edge == edge)

    @property
    def alarms(self) -> list[EdgeRow]:
        return [r for r in self.rows if r.alarm]

    def as_rows(self) -> list[dict]:
        """One dict per edge with the columns the report table shows (full detail under 'detail')."""
        return [
            dict(
                edge=r.edge,
                producer=r.producer,
                producer_function=r.producer_function,
                producer_dialect=r.producer_dialect,
                producer_fmax=r.producer_fmax,
                consumer=r.consumer,
                consumer_function=r.consumer_function,
                consumer_decodes=r.consumer_decodes,
                verdict=r.verdict,
                factor=r.factor,
                diagnosis=r.diagnosis,
                scale=r.scale_provenance,
                detail=r.as_dict(),
            )
            for r in self.rows
        ]

    def table(self) -> str:
        """Plain-text table (logs, terminal)."""
        lines = [f"{'edge':32} {'producer writes':18} {'fmax':>5} {'consumer reads':18} verdict"]
        for r in self.rows:
            fm = f"{r.producer_fmax:g}" if r.producer_fmax else "-"
            lines.append(
                f"{r.edge:32} {r.producer_dialect or '-':18} {fm:>5} {r.consumer_decodes or '-':18} "
                f"{r.verdict} {r.factor if r.verdict == 'MISMATCH' else ''}"
            )
        return "\n".join(lines)

    def check_results(self, info=None) -> list:
        """CheckResult rows (check="dialect", level="bytes"): one per edge, one for the whole map."""
        from conformance.results import CheckResult

        kw = dict(
            device=getattr(info, "device", ""),
            dialect=getattr(info, "dialect", ""),
            emulated=bool(getattr(info, "emulated", False)),
            params={"implementation": getattr(info, "implementation", "")},   # for vLLM: the release
        )
        out = []
        tiers = {"consistent": "pass", "MISMATCH": "fail", "error": "error", "not provided": "not-provided"}
        for r in self.rows:
            out.append(
                CheckResult(
                    subject=self.subject,
                    case_id=f"dialect/{r.edge}",
                    component=r.edge,
                    check="dialect",
                    level="bytes",
                    verdict=tiers[r.verdict],
                    message=r.message,
                    metrics={"read_exact_fraction": r.read_signature.get("fractions", {}).get("exact", 0.0)},
                    worst=dict(
                        r.worst, producer_dialect=r.producer_dialect, consumer_decodes=r.consumer_decodes
                    ),
                    function=f"{r.producer_function} -> {r.consumer_function}",
                    backend="",
                    extra={"edge": r.as_dict()},
                    **kw,
                )
            )
        worst = max(
            (tiers[r.verdict] for r in self.rows if r.verdict != "not provided"),
            key=lambda v: ["pass", "fail", "error"].index(v),
            default="not-provided",
        )
        msg = (
            "; ".join(r.message for r in self.alarms)
            or "every provided FP8 edge is written and read in one dialect"
        )
        out.append(
            CheckResult(
                subject=self.subject,
                case_id="dialect/map",
                component="dialect_map",
                check="dialect",
                level="bytes",
                verdict=worst,
                message=msg,
                duration_s=self.duration_s,
                extra={"dialect_map": self.as_rows()},
                **kw,
            )
        )
        return out


def dialect_map_for_subject(subject) -> DialectMap | None:
    """A subject that provides ``dialect_probes() -> (producers, consumers)`` gets a map; others None."""
    get = getattr(subject, "dialect_probes", None)
    if get is None:
        return None
    probes = get()
    if probes is None:          # the subject has no FP8 probes on this device (said by the suite's row)
        return None
    producers, consumers = probes
    return DialectMap(producers, consumers, subject=getattr(subject, "name", ""))


__all__ = [
    "DialectMap",
    "EdgeRow",
    "probe_edge",
    "run_producer",
    "dialect_map_for_subject",
    "SUSPECTS",
    "describe",
    "NEITHER",
]
