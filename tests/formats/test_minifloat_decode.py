"""Every code of every format decodes like ml_dtypes and torch; capabilities agree with ml_dtypes."""

import math

import numpy as np
import pytest

from references.formats.minifloat import FORMATS
from references.formats.verify import check_capabilities, check_decode_table, report

from .oracles import DECODE, NAMES, TORCH, finfo_capabilities

DECODE_CASES = [(n, lib) for n in NAMES for lib in DECODE if lib != "torch" or n in TORCH]


@pytest.mark.parametrize("name,lib", DECODE_CASES, ids=[f"{n}-{lib}" for n, lib in DECODE_CASES])
def test_decode_table(name, lib):
    fmt = FORMATS[name]
    mism = check_decode_table(fmt, DECODE[lib](name), oracle_name=lib)
    assert not mism, report(f"decode {name} vs {lib}", mism, fmt.n_codes)


@pytest.mark.parametrize("name", NAMES)
def test_capabilities(name):
    fmt = FORMATS[name]
    mism = check_capabilities(fmt, finfo_capabilities(name), oracle_name="ml_dtypes")
    assert not mism, report(f"capabilities {name}", mism, 8)


# The edge codes named in spec 4.1, as literal rows (code -> expected value; "nan" / "-0")
EDGE_CODES = [
    ("float8_e4m3fn", 0x80, "-0"),
    ("float8_e4m3fn", 0x7F, "nan"),
    ("float8_e4m3fn", 0xFF, "nan"),
    ("float8_e4m3fn", 0x7E, 448.0),
    ("float8_e4m3fn", 0x01, 2.0**-9),
    ("float8_e4m3fn", 0x38, 1.0),
    ("float8_e4m3fnuz", 0x80, "nan"),
    ("float8_e4m3fnuz", 0x7F, 240.0),
    ("float8_e4m3fnuz", 0xFF, -240.0),
    ("float8_e4m3fnuz", 0x01, 2.0**-10),
    ("float8_e4m3fnuz", 0x40, 1.0),
    ("float8_e4m3fnuz", 0x38, 0.5),
    ("float8_e5m2", 0x7C, math.inf),
    ("float8_e5m2", 0xFC, -math.inf),
    ("float8_e5m2", 0x80, "-0"),
    ("float8_e5m2", 0x7B, 57344.0),
    ("float8_e5m2fnuz", 0x80, "nan"),
    ("float8_e5m2fnuz", 0x7F, 57344.0),
    ("float8_e8m0fnu", 0x00, 2.0**-127),
    ("float8_e8m0fnu", 0x7F, 1.0),
    ("float8_e8m0fnu", 0xFE, 2.0**127),
    ("float8_e8m0fnu", 0xFF, "nan"),
    ("float4_e2m1fn", 0x8, "-0"),
    ("float4_e2m1fn", 0x7, 6.0),
    ("float4_e2m1fn", 0x1, 0.5),
    ("float4_e2m1fn", 0xF, -6.0),
]


@pytest.mark.parametrize("name,code,want", EDGE_CODES, ids=[f"{n}-0x{c:02X}" for n, c, _ in EDGE_CODES])
def test_edge_code(name, code, want):
    got = FORMATS[name].decode(code)
    desc = FORMATS[name].describe(code)
    if want == "nan":
        assert np.isnan(got), desc
    elif want == "-0":
        assert got == 0 and np.signbit(got), desc
    else:
        assert got == want and not (want == 0 and np.signbit(got)), desc


def test_same_byte_is_half_in_fnuz():
    """Spec 4.1: every byte except 0x80 and the OCP NaNs decodes in fnuz to exactly half its OCP value."""
    ocp, fnuz = FORMATS["float8_e4m3fn"], FORMATS["float8_e4m3fnuz"]
    codes = [c for c in range(256) if c not in (0x80, 0x7F, 0xFF)]
    bad = [
        ocp.describe(c) + " / " + fnuz.describe(c) for c in codes if not fnuz.decode(c) * 2 == ocp.decode(c)
    ]
    assert not bad, "\n".join(bad)
