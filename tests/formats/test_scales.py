"""Scale rules (spec 4.2, 4.3): exact ceil(log2), the power-of-two rule, UE8M0 bytes."""

import numpy as np
import pytest

from references.formats.scales import ceil_log2, e8m0_decode, e8m0_double, e8m0_encode, pow2_scale
from references.formats.verify import check_e8m0_double, report

from .oracles import decode_ml_dtypes

K = np.arange(-1074, 1024)  # every power of two float64 holds, subnormals included
POW2 = np.ldexp(1.0, K)


def _ceil_log2_by_definition(v):
    """r with 2**(r-1) < v <= 2**r, found by comparisons of exact powers of two (no logarithm, no frexp)."""
    r = np.floor(np.log2(v)).astype(np.int64) - 1  # a guess at most a step or two away, then correct it
    for _ in range(4):
        r = np.where(np.ldexp(1.0, r) < v, r + 1, r)
    for _ in range(4):
        r = np.where(np.ldexp(1.0, r - 1) >= v, r - 1, r)
    return r


def test_ceil_log2_at_and_around_powers_of_two():
    assert (ceil_log2(POW2) == K).all()
    # neighbours are strictly between powers of two only where float64 has at least 2 mantissa bits
    n = K >= -1072
    above = np.nextafter(POW2[n][:-1], np.inf)
    below = np.nextafter(POW2[n][1:], 0)
    assert (ceil_log2(above) == K[n][:-1] + 1).all()
    assert (ceil_log2(below) == K[n][1:]).all()


def test_ceil_log2_random_against_definition():
    rng = np.random.default_rng(1)
    v = np.exp2(rng.uniform(-140, 140, 20_000)) * rng.uniform(0.5, 1.0, 20_000)
    want = _ceil_log2_by_definition(v)
    bad = np.flatnonzero(ceil_log2(v) != want)
    assert not len(bad), [(float(v[i]).hex(), int(want[i])) for i in bad[:5]]


@pytest.mark.parametrize("v", [0.0, -1.0, np.inf, np.nan])
def test_ceil_log2_refuses(v):
    with pytest.raises(ValueError, match="positive finite"):
        ceil_log2([1.0, v])


@pytest.mark.parametrize("fmax", [448.0, 240.0, 224.0, 6.0])
def test_pow2_rule(fmax):
    """s = 2**ceil(log2(max(amax, floor) / fmax)): the smallest power of two with amax / s <= fmax."""
    floor = 1e-4
    k = np.arange(-10, 20)  # fmax * 2**-10 stays above the floor for every fmax here
    exact = fmax * np.ldexp(1.0, k)  # amax exactly fmax * 2**k: scale 2**k, the block max lands on fmax
    assert (pow2_scale(exact, fmax, floor) == np.ldexp(1.0, k)).all()
    assert (pow2_scale(np.nextafter(exact, np.inf), fmax, floor) == np.ldexp(1.0, k + 1)).all()
    rng = np.random.default_rng(2)
    amax = np.exp2(rng.uniform(-30, 30, 10_000))
    s = pow2_scale(amax, fmax, floor)
    a = np.maximum(amax, floor)
    assert (np.frexp(s)[0] == 0.5).all()  # a power of two
    assert (a / s <= fmax).all() and (a / (s / 2) > fmax).all()  # and the smallest that fits
    assert pow2_scale(0.0, fmax, floor) == pow2_scale(floor, fmax, floor)  # the floor applies


def test_e8m0_decode_matches_ml_dtypes_and_round_trips():
    b = np.arange(256)
    got, want = e8m0_decode(b), decode_ml_dtypes("float8_e8m0fnu")
    assert ((got == want) | (np.isnan(got) & np.isnan(want))).all()
    assert np.isnan(e8m0_decode(0xFF)) and e8m0_decode(127) == 1.0 and e8m0_decode(0) == 2.0**-127
    assert (e8m0_encode(e8m0_decode(b[:255])) == b[:255]).all()


@pytest.mark.parametrize(
    "v", [3.0, 0.75, 0.0, -1.0, -2.0, np.inf, np.nan, 2.0**128, 2.0**-128, 1.5 * 2.0**-130]
)
def test_e8m0_refuses(v):
    with pytest.raises(ValueError):
        e8m0_encode([1.0, v])


def test_e8m0_double_is_exponent_plus_one():
    mism = check_e8m0_double(e8m0_double)
    assert not mism, report("e8m0_double", mism, 254)
    with pytest.raises(OverflowError):
        e8m0_double([254])
