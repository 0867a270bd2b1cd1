"""FP8 dialect forensics (project issue 6): which dialect wrote and read every FP8 tensor, edge by edge.

classify_codes(codes, values_fed, scale, fmax=None, block=...)  -> DialectVerdict     (producers)
classify_decoding(codes_fed, dialect_fed, values_read, scales)  -> DecodingVerdict    (consumers)
ratio_signature(subject, reference, codes=..., edge=...)        -> RatioSignature
check_scale_conversion(before, after, "ue8m0" | "fp32")         -> ScaleCheck
DialectMap(producers, consumers, subject=...)                   -> rows, as_rows(), check_results()
Producer / Consumer (interface.py), reference_producers / reference_consumers(profile) (emulated.py)
"""

from ...ratio import RatioSignature, ratio_signature
from .classify import DecodingVerdict, DialectVerdict, classify_codes, classify_decoding, describe
from .dialect_map import SUSPECTS, DialectMap, EdgeRow, dialect_map_for_subject, probe_edge
from .emulated import (
    dequant_consumer,
    loader_producer,
    quantizer_producer,
    reference_consumers,
    reference_producers,
)
from .interface import DSV4_EDGES, Consumer, Edge, Producer
from .mxfp4_probe import Mxfp4Verdict, probe_mxfp4
from .probes import consumer_probe, producer_probe_values
from .scale_checks import ScaleCheck, ScaleProvenance, check_scale_conversion

__all__ = [
    "DecodingVerdict",
    "DialectVerdict",
    "classify_codes",
    "classify_decoding",
    "describe",
    "SUSPECTS",
    "DialectMap",
    "EdgeRow",
    "dialect_map_for_subject",
    "probe_edge",
    "dequant_consumer",
    "loader_producer",
    "quantizer_producer",
    "reference_consumers",
    "reference_producers",
    "DSV4_EDGES",
    "Consumer",
    "Edge",
    "Producer",
    "consumer_probe",
    "producer_probe_values",
    "RatioSignature",
    "ratio_signature",
    "ScaleCheck",
    "ScaleProvenance",
    "Mxfp4Verdict",
    "probe_mxfp4",
    "check_scale_conversion",
]
