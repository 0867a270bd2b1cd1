"""Small floating-point formats (FP8, FP4, E8M0) written from their bit layouts.

This module is the ground truth the harness verifies torch / ml_dtypes / vLLM casts against, so it
never calls those casts itself. Every format is one row of ``FORMATS``; decoding reads the sign,
exponent and mantissa fields of a code; encoding rounds a real number once to the nearest
representable value (ties to the even code, i.e. even mantissa LSB) by searching the decoded table.

Names follow ml_dtypes: ``fn`` = finite (no inf; NaN is only the all-ones pattern), ``fnuz`` = finite,
unsigned zero (no -0; the code 0x80 is the single NaN), ``fnu`` = finite, unsigned.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class MiniFloat:
    """Parameters of one small float format.

    nan_style:
      "ieee"  - all-ones exponent: mantissa 0 is +-inf, otherwise NaN (float8_e5m2)
      "fn"    - only S.1111.111 is NaN, no inf (float8_e4m3fn)
      "fnuz"  - the code 0x80 (negative zero's pattern) is the only NaN; no -0, no inf
      "fnu"   - unsigned, all-ones is NaN (float8_e8m0fnu)
      "none"  - every code is a finite number (float4_e2m1fn)

    ties: how encode breaks an exact tie between two neighbouring values.
      "even"  - to the even code (even mantissa LSB): IEEE round-to-nearest-even, every FP8 / FP4 format
      "away"  - to the larger magnitude. E8M0 has no mantissa, so "even" would mean "even exponent"; the
                OCP MX spec leaves E8M0 rounding to the implementation, and both ml_dtypes and torch round
                a tie (1.5 * 2**k) up to 2**(k+1) whatever k's parity. We follow them.
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    signed: bool
    nan_style: str
    has_zero: bool = True
    ties: str = "even"

    def __post_init__(self):
        if self.ties not in ("even", "away"):
            raise ValueError(f"ties must be 'even' or 'away', not {self.ties!r}")

    @property
    def bits(self) -> int:
        return int(self.signed) + self.exp_bits + self.man_bits

    @property
    def n_codes(self) -> int:
        return 1 << self.bits

    @property
    def sign_mask(self) -> int:
        return (1 << (self.bits - 1)) if self.signed else 0

    # -- capabilities (probed from the table, not declared twice) ---------------------------------
    @property
    def has_inf(self) -> bool:
        return bool(np.isinf(self.table).any())

    @property
    def has_nan(self) -> bool:
        return bool(np.isnan(self.table).any())

    @property
    def has_negative_zero(self) -> bool:
        return any(v == 0 and np.signbit(v) for v in self.table)

    @cached_property
    def table(self) -> np.ndarray:
        """Decoded value (float64) of every code 0 .. 2**bits-1."""
        return np.array([self._decode_one(c) for c in range(self.n_codes)], dtype=np.float64)

    def fields(self, code: int) -> tuple[int, int, int]:
        """(sign, biased exponent, mantissa) bit fields of ``code``."""
        code = int(code)
        sign = (code >> (self.bits - 1)) & 1 if self.signed else 0
        exp = (code >> self.man_bits) & ((1 << self.exp_bits) - 1)
        man = code & ((1 << self.man_bits) - 1)
        return sign, exp, man

    def _decode_one(self, code: int) -> float:
        sign, exp, man = self.fields(code)
        exp_all_ones = exp == (1 << self.exp_bits) - 1
        man_all_ones = man == (1 << self.man_bits) - 1
        if self.nan_style == "fnuz" and code == self.sign_mask:
            return float("nan")
        if self.nan_style == "fn" and exp_all_ones and man_all_ones:
            return float("nan")
        if self.nan_style == "fnu" and exp_all_ones and man_all_ones:
            return float("nan")
        if self.nan_style == "ieee" and exp_all_ones:
            return float("nan") if man else (-1.0) ** sign * float("inf")
        if exp == 0 and self.has_zero:
            # subnormal (or zero): no implicit leading one, exponent fixed at 1 - bias
            mag = (man / (1 << self.man_bits)) * 2.0 ** (1 - self.bias)
        else:
            mag = (1.0 + man / (1 << self.man_bits)) * 2.0 ** (exp - self.bias)
        return -mag if sign else mag

    @cached_property
    def max(self) -> float:
        finite = self.table[np.isfinite(self.table)]
        return float(finite.max())

    @cached_property
    def smallest_subnormal(self) -> float:
        pos = self.table[np.isfinite(self.table) & (self.table > 0)]
        return float(pos.min())

    @cached_property
    def _positive_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """Non-negative finite codes sorted by value, with their values (first code of +0 only)."""
        codes = np.arange(self.n_codes)
        vals = self.table
        keep = np.isfinite(vals) & (vals >= 0) & ~np.signbit(vals)
        if self.signed:
            keep &= (codes & self.sign_mask) == 0
        codes, vals = codes[keep], vals[keep]
        order = np.argsort(vals, kind="stable")
        return codes[order], vals[order]

    @cached_property
    def nan_code(self) -> int:
        nans = np.flatnonzero(np.isnan(self.table))
        if not len(nans):
            raise ValueError(f"{self.name} has no NaN")
        # the positive NaN where both signs exist (torch / ml_dtypes produce 0x7F for e4m3fn)
        return int(nans[0] if self.nan_style in ("fnuz", "fnu") else nans[len(nans) // 2 - 1])

    def describe(self, code: int) -> str:
        """'0x38 s=0 e=0111 m=000 (1.0)' - the diagnostic form used in every FP8 failure message."""
        s, e, m = self.fields(code)
        val = float(self.table[int(code)])  # plain float: numpy 2 would print np.float64(...)
        return (f"0x{int(code):02X} s={s} e={e:0{self.exp_bits}b} m={m:0{self.man_bits}b}"
                f" ({val!r} as {self.name})") if self.man_bits else (
                f"0x{int(code):02X} e={e:0{self.exp_bits}b} ({val!r} as {self.name})")

    # -- encode / decode ---------------------------------------------------------------------------
    def decode(self, codes) -> np.ndarray:
        """Codes (any integer array) -> float64 values."""
        return self.table[np.asarray(codes, dtype=np.int64)]

    def encode(self, x, *, saturate: bool = True) -> np.ndarray:
        """Round real values once to this format (round to nearest; ties to the even code, or away from
        zero for ``ties="away"``).

        saturate=True: finite overflow and +-inf clamp to +-max (what the DSV4 quantisers do after
        their explicit clamp). saturate=False: overflow past the rounding boundary of max becomes
        inf where the format has one, else NaN (torch's and ml_dtypes' plain casts). NaN -> NaN.
        Zero and negative values that round to zero give +0 in formats without -0.
        """
        x = np.asarray(x, dtype=np.float64)
        codes_sorted, vals_sorted = self._positive_codes
        mag = np.abs(x)
        neg = np.signbit(x)
        # nearest representable magnitude; ties go to the even code (= even mantissa LSB)
        hi = np.clip(np.searchsorted(vals_sorted, mag, side="left"), 0, len(vals_sorted) - 1)
        lo = np.clip(hi - 1, 0, len(vals_sorted) - 1)
        d_hi = np.abs(vals_sorted[hi] - mag)
        d_lo = np.abs(mag - vals_sorted[lo])
        tie_to_lo = (codes_sorted[lo] % 2 == 0) if self.ties == "even" else np.zeros_like(lo, dtype=bool)
        pick_lo = (d_lo < d_hi) | ((d_lo == d_hi) & tie_to_lo)
        idx = np.where(pick_lo, lo, hi)
        out_codes = codes_sorted[idx].astype(np.int64)
        out_vals = vals_sorted[idx]

        # overflow: beyond max by at least half a step (the step max would have to the next value)
        top = vals_sorted[-1]
        # The step past max is the spacing of max's own binade, 2**(exponent(max) - man_bits). It is not
        # max minus the previous value when max opens its binade: E8M0's values are all powers of two, so
        # the step past 2**127 is 2**127 (boundary 1.5 * 2**127), not 2**126 (boundary 1.25 * 2**127).
        _, e = np.frexp(top)  # top in [2**(e-1), 2**e)
        step = np.ldexp(1.0, int(e) - 1 - self.man_bits)
        boundary = top + step / 2  # a tie at the boundary rounds to even: max's code parity decides
        max_code = codes_sorted[-1]
        tie_over = (max_code % 2 == 1) if self.ties == "even" else True  # the next code would be max_code + 1
        over = (mag > boundary) | ((mag == boundary) & tie_over) | np.isinf(mag)
        if saturate:
            out_codes = np.where(mag > top, max_code, out_codes)
        else:
            if self.nan_style == "ieee":
                inf_code = int(np.flatnonzero(np.isposinf(self.table))[0])
                out_codes = np.where(over, inf_code, out_codes)
            elif over.any():
                if not self.has_nan:
                    raise OverflowError(f"{self.name} has neither inf nor NaN for overflow")
                out_codes = np.where(over, self.nan_code, out_codes)
            out_codes = np.where(~over & (mag > top), max_code, out_codes)

        nan_in = np.isnan(x)
        if nan_in.any():
            if not self.has_nan:
                raise ValueError(f"{self.name} cannot represent NaN")
            out_codes = np.where(nan_in, self.nan_code, out_codes)
        if self.signed:
            # the sign bit is copied from the input except where the result has no signed form:
            # zero in formats without -0, and the single NaN of fnuz formats (0x80 *is* that NaN)
            is_zero = (out_vals == 0) & ~over & ~nan_in
            is_nan = nan_in | (over & ~np.asarray(saturate) & (self.nan_style != "ieee"))
            apply_sign = neg.copy()
            if not self.has_negative_zero:
                apply_sign &= ~is_zero
            if self.nan_style == "fnuz":
                apply_sign &= ~is_nan
            out_codes = np.where(apply_sign, out_codes | self.sign_mask, out_codes)
        elif (neg & (mag > 0) & ~nan_in).any():
            raise ValueError(f"{self.name} is unsigned; got negative values")
        return out_codes.astype(np.uint8)

    def round(self, x, *, saturate: bool = True) -> np.ndarray:
        """Quantise-dequantise: the float64 value ``x`` takes after one rounding to this format."""
        return self.decode(self.encode(x, saturate=saturate))


FLOAT8_E4M3FN = MiniFloat("float8_e4m3fn", 4, 3, 7, True, "fn")
FLOAT8_E4M3FNUZ = MiniFloat("float8_e4m3fnuz", 4, 3, 8, True, "fnuz")
FLOAT8_E5M2 = MiniFloat("float8_e5m2", 5, 2, 15, True, "ieee")
FLOAT8_E5M2FNUZ = MiniFloat("float8_e5m2fnuz", 5, 2, 16, True, "fnuz")
FLOAT8_E8M0FNU = MiniFloat("float8_e8m0fnu", 8, 0, 127, False, "fnu", has_zero=False, ties="away")
FLOAT4_E2M1FN = MiniFloat("float4_e2m1fn", 2, 1, 1, True, "none")

FORMATS: dict[str, MiniFloat] = {
    f.name: f for f in (FLOAT8_E4M3FN, FLOAT8_E4M3FNUZ, FLOAT8_E5M2, FLOAT8_E5M2FNUZ,
                        FLOAT8_E8M0FNU, FLOAT4_E2M1FN)
}

# The two e4m3 dialects this project is about. OCP = checkpoints, CUDA, gfx950; FNUZ = gfx942.
OCP = FLOAT8_E4M3FN
FNUZ = FLOAT8_E4M3FNUZ
DIALECTS = {"ocp": OCP, "fnuz": FNUZ, OCP.name: OCP, FNUZ.name: FNUZ}


def get_format(name: str) -> MiniFloat:
    try:
        return FORMATS[name] if name in FORMATS else DIALECTS[name]
    except KeyError:
        raise KeyError(f"unknown number format {name!r}; known: {sorted(FORMATS)}") from None
