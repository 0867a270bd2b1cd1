"""Encoding (round once to the format) agrees with ml_dtypes and torch on every probe group.

Probe groups (references.formats.verify.encode_probes): every code's value, every midpoint between
neighbours (ties), the float32 neighbours of each midpoint and code, the overflow boundary, specials, and
100k log-uniform random values. Each library is compared in the mode it actually implements (OVERFLOW):
non-saturating where it overflows to NaN / inf, saturating where it clamps. Saturating mode is then
checked on its own against "clamp to +-max, then cast" through each library.

Inputs a format cannot take are left out, with the library behaviour pinned in test_oracle_behaviour.py:
E8M0 gets only positive inputs (+inf, NaN), e2m1 gets no NaN, and E8M0 skips the float32 subnormals in
(2**-127, 1.5 * 2**-127) against a library whose recorded mode rounds them up to 2**-126 although 2**-127 is
nearer (ml_dtypes <= 0.6, torch 2.13; tests/quirks.py); ml_dtypes 0.7 rounds to nearest and gets them all.
"""

from functools import cache

import numpy as np
import pytest

from references.formats.minifloat import FORMATS
from references.formats.verify import check_encode, encode_probes, report

from ..quirks import e8m0_subnormals
from .oracles import DECODE, ENCODE, ORACLES, OVERFLOW


@cache
def probes(name: str, lib: str | None = None) -> dict[str, np.ndarray]:
    """The probe groups of ``name`` that ``lib`` can be compared on (None: the inputs every library takes)."""
    fmt = FORMATS[name]
    out = {}
    for group, x in encode_probes(fmt).items():
        if not fmt.signed:
            x = x[(x > 0) | np.isnan(x)]
        if not fmt.has_nan:
            x = x[~np.isnan(x)]
        if name == "float8_e8m0fnu" and (lib is None or e8m0_subnormals(lib) == "up"):
            x = x[~((x > 2.0**-127) & (x < 1.5 * 2.0**-127))]
        out[group] = x
    return out


def run_encode_checks(lib, name, transform, saturate, impl=None):
    """Every probe group of format ``name`` through ``impl`` (default: our codec) against library ``lib``.

    transform: what is done to the inputs before the library casts them (identity, or clamp to +-max).
    Returns (mismatches, number of inputs). The mutant tests call this too.
    """
    fmt = FORMATS[name] if impl is None else impl
    table = DECODE[lib](name) if (lib, name) != ("torch", "float4_e2m1fn") else None
    mism, total = [], 0
    for group, x in probes(name, lib).items():
        m = check_encode(
            fmt,
            x,
            ENCODE[lib](name, transform(fmt, x)),
            saturate=saturate,
            oracle_table=table,
            oracle_name=lib,
            check=f"encode/{group}",
        )
        mism += m
        total += len(x)
    return mism, total


@pytest.mark.parametrize("lib,name", ORACLES, ids=[f"{lib}-{n}" for lib, n in ORACLES])
def test_encode_plain_cast(lib, name):
    saturate = OVERFLOW[(lib, name)] == "saturate"
    mism, total = run_encode_checks(lib, name, lambda fmt, x: x, saturate)
    assert not mism, report(f"encode {name} vs {lib} (saturate={saturate})", mism, total)


def clamp(fmt, x):
    return np.clip(x, -fmt.max if fmt.signed else 0.0, fmt.max)  # NaN stays NaN, +-inf -> +-max


@pytest.mark.parametrize("lib,name", ORACLES, ids=[f"{lib}-{n}" for lib, n in ORACLES])
def test_encode_saturating_is_clamp_then_cast(lib, name):
    mism, total = run_encode_checks(lib, name, clamp, True)
    assert not mism, report(f"saturating encode {name} vs clamp + {lib}", mism, total)


@pytest.mark.parametrize("name", list(FORMATS))
def test_probe_groups_are_not_empty(name):
    """A probe group that filtered itself away would make the comparisons above vacuous."""
    sizes = {g: len(x) for g, x in probes(name).items()}
    assert min(sizes.values()) > 0 and sizes["random"] >= 90_000, sizes


def test_ties_go_to_even_mantissa():
    """Hand-picked e4m3fn ties: 1 + 1/16 lies between 0x38 (m=000) and 0x39 (m=001) -> 0x38; 1 + 3/16
    between 0x39 and 0x3A -> 0x3A; 464 (448 + 16) is a tie with the next binade and stays at 448."""
    fmt = FORMATS["float8_e4m3fn"]
    assert fmt.encode([1.0625, 1.1875, 464.0], saturate=False).tolist() == [0x38, 0x3A, 0x7E]
