"""Reusable exhaustive checks of a number-format codec against an oracle (spec section 4).

Every check returns a list of ``Mismatch`` (empty = agreement) instead of asserting, so the same function
serves the harness's own tests (real codec: expect ``[]``), the mutant tests (a deliberately wrong codec:
expect the right diagnosis) and later the dialect checks of subjects. ``report`` renders the list in the
project's message contract: check id, "k / n (p%) mismatched", then each mismatch with the code's
sign/exponent/mantissa fields (``MiniFloat.describe``), both values and a dialect verdict (which known
format decodes that byte to the value that was seen).

Oracles are passed in as plain arrays (decoded values, or codes), so this module never imports the
libraries it judges; tests/formats/oracles.py builds them from ml_dtypes and torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .minifloat import FORMATS, MiniFloat
from .scales import e8m0_decode

E8M0 = FORMATS["float8_e8m0fnu"]


@dataclass(frozen=True)
class Mismatch:
    """One disagreement. ``detail`` is already rendered (s/e/m fields and both values)."""

    check: str
    fmt: str
    index: int
    detail: str

    def __str__(self) -> str:
        return f"[{self.check} {self.fmt} #{self.index}] {self.detail}"


def same_value(a, b) -> np.ndarray:
    """Bitwise-meaningful equality of decoded values: NaN == NaN, and +0 != -0."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    eq = (a == b) & (np.signbit(a) == np.signbit(b))
    return both_nan | eq


def dialect_verdict(code: int, value: float, bits: int) -> str:
    """Which reference formats of the same width decode ``code`` to ``value`` ('none' if no format does)."""
    hits = [f.name for f in FORMATS.values() if f.bits == bits and same_value(f.table[int(code)], value)]
    return "decodes like " + (", ".join(hits) if hits else "no known format")


def report(check: str, mismatches: Sequence[Mismatch], n_total: int, *, limit: int = 8) -> str:
    """'check: k / n (p%) mismatched' followed by the first ``limit`` mismatches, one per line."""
    k = len(mismatches)
    head = f"{check}: {k} / {n_total} ({100.0 * k / max(n_total, 1):.3g}%) mismatched"
    lines = [head] + [f"  {m}" for m in mismatches[:limit]]
    if k > limit:
        lines.append(f"  ... {k - limit} more")
    return "\n".join(lines)


# -- decode ------------------------------------------------------------------------------------------
def check_decode_table(impl: MiniFloat, oracle: np.ndarray, *, oracle_name: str = "oracle") -> list[Mismatch]:
    """Compare ``impl.decode`` of every code 0 .. 2**bits-1 with the oracle's decoded values."""
    codes = np.arange(impl.n_codes)
    oracle = np.asarray(oracle, dtype=np.float64)
    if oracle.shape != codes.shape:
        return [
            Mismatch(
                "decode", impl.name, -1, f"oracle table has shape {oracle.shape}, expected ({impl.n_codes},)"
            )
        ]
    got = impl.decode(codes)
    out = []
    for c in np.flatnonzero(~same_value(got, oracle)):
        out.append(
            Mismatch(
                "decode",
                impl.name,
                int(c),
                f"code {impl.describe(c)}: {oracle_name} decodes to {float(oracle[c])!r}, codec to "
                f"{float(got[c])!r} ({dialect_verdict(c, got[c], impl.bits)})",
            )
        )
    return out


@dataclass(frozen=True)
class Capabilities:
    """What a format can represent, probed from its decode table (never declared)."""

    bits: int
    has_inf: bool
    has_nan: bool
    has_negative_zero: bool
    max: float
    smallest_normal: float
    smallest_subnormal: float
    eps: float


def probe_capabilities(table: np.ndarray, bits: int, man_bits: int) -> Capabilities:
    """Capabilities of the format whose code c decodes to ``table[c]``.

    smallest_normal: the smallest positive value whose mantissa field carries an implicit one, i.e. the
    value of the first code with a non-zero exponent field (E8M0 has no exponent-0 subnormals, so its
    code 0 is the smallest normal; ``man_bits=0`` covers that). eps: distance from 1 to the next value.
    """
    t = np.asarray(table, dtype=np.float64)
    fin = t[np.isfinite(t)]
    pos = np.sort(fin[fin > 0])
    if man_bits:
        exp_field = (np.arange(len(t)) >> man_bits) & ((1 << (bits - 1 - man_bits)) - 1)
        normals = t[(exp_field != 0) & np.isfinite(t) & (t > 0)]
    else:  # no mantissa field: every positive code is a normal number
        normals = pos
    above_one = pos[pos > 1.0]
    return Capabilities(
        bits=bits,
        has_inf=bool(np.isinf(t).any()),
        has_nan=bool(np.isnan(t).any()),
        has_negative_zero=bool(((t == 0) & np.signbit(t)).any()),
        max=float(fin.max()),
        smallest_normal=float(normals.min()),
        smallest_subnormal=float(pos.min()),
        eps=float(above_one.min() - 1.0),
    )


def check_capabilities(impl: MiniFloat, expected: Capabilities, *, oracle_name="oracle") -> list[Mismatch]:
    """Compare the capabilities probed from the codec's table with the oracle's, field by field."""
    got = probe_capabilities(impl.table, impl.bits, impl.man_bits)
    out = []
    for i, name in enumerate(Capabilities.__dataclass_fields__):
        g, e = getattr(got, name), getattr(expected, name)
        if g != e:
            out.append(Mismatch("capabilities", impl.name, i, f"{name}: {oracle_name} {e!r}, codec {g!r}"))
    return out


# -- encode ------------------------------------------------------------------------------------------
def check_encode(
    impl: MiniFloat,
    x,
    oracle_codes,
    *,
    saturate: bool,
    oracle_table: np.ndarray | None = None,
    oracle_name: str = "oracle",
    check: str = "encode",
) -> list[Mismatch]:
    """Compare ``impl.encode(x, saturate=...)`` with the oracle's codes for the same inputs.

    NaN payloads and signs are not portable between libraries (ml_dtypes writes 0x7E for an e5m2 NaN,
    torch 0x7F), so two codes that both decode to NaN under ``oracle_table`` (default: the codec's own
    table) count as equal. Every other difference counts, including +0 vs -0.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    exp = np.asarray(oracle_codes, dtype=np.int64).ravel()
    if exp.shape != x.shape:
        return [Mismatch(check, impl.name, -1, f"{exp.shape[0]} oracle codes for {x.shape[0]} inputs")]
    table = impl.table if oracle_table is None else np.asarray(oracle_table, np.float64)
    try:
        got = impl.encode(x, saturate=saturate).astype(np.int64)
    except Exception as e:  # a codec that refuses an input the oracle accepts is a mismatch, not a crash
        return [Mismatch(check, impl.name, -1, f"codec raised {type(e).__name__}: {e}")]
    ok = (got == exp) | (np.isnan(table[got]) & np.isnan(table[exp]))
    out = []
    for i in np.flatnonzero(~ok):
        out.append(
            Mismatch(
                check,
                impl.name,
                int(i),
                f"x={float(x[i])!r} ({float(x[i]).hex()}), saturate={saturate}: "
                f"{oracle_name} gives {impl.describe(exp[i])}"
                f" [oracle value {float(table[exp[i]])!r}], codec gives {impl.describe(got[i])}",
            )
        )
    return out


def ulp_of_max(fmt: MiniFloat) -> float:
    """Spacing of the binade holding max: the step to the value max would have if the exponent range went on.

    Overflow starts at max + ulp/2. This is *not* max minus the previous value when max opens its binade
    (E8M0: every value does, so the step past 2**127 is 2**127, not 2**126).
    """
    _, e = np.frexp(fmt.max)  # max in [2**(e-1), 2**e)
    return float(np.ldexp(1.0, int(e) - 1 - fmt.man_bits))


def encode_probes(fmt: MiniFloat, *, n_random: int = 100_000, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32-exact inputs that pin down rounding, grouped by why they are there.

    All values are float32 (then widened), so every oracle sees exactly the same number whatever width it
    converts from. Groups: every finite code's value; every midpoint between neighbouring values (a tie:
    decides ties-to-even); the float32 neighbours just below and above each midpoint (decide
    round-to-nearest); the overflow boundary max + step/2 and its neighbours; specials (+-inf, NaN, +-0,
    below the smallest subnormal); and ``n_random`` values spread log-uniformly over the range.
    """
    t = fmt.table
    vals = np.unique(t[np.isfinite(t)])  # sorted, -0 and +0 merged
    if not fmt.signed:
        vals = vals[vals > 0]
    mids = (vals[:-1] + vals[1:]) / 2
    top = vals[-1]
    step = ulp_of_max(fmt)
    boundary = np.array([top + step / 2, -(top + step / 2)] if fmt.signed else [top + step / 2])
    f32 = np.float32

    def around(v):
        v = v.astype(f32)
        return np.concatenate([np.nextafter(v, f32(-np.inf)), np.nextafter(v, f32(np.inf))])

    tiny = fmt.smallest_subnormal
    specials = np.array(
        [np.inf, np.nan, 0.0, tiny / 4, tiny / 2, tiny * 0.75, top * 2, 1e30, np.finfo(np.float32).max],
        dtype=np.float64,
    )
    if fmt.signed:
        specials = np.concatenate([specials, -specials, [-0.0]])
    rng = np.random.default_rng(seed)
    lo, hi = np.log2(tiny) - 2, np.log2(top) + 1
    mag = np.exp2(rng.uniform(lo, hi, n_random))
    sign = np.where(rng.random(n_random) < 0.5, -1.0, 1.0) if fmt.signed else 1.0
    groups = {
        "codes": vals,
        "midpoints": mids,
        "around_midpoints": around(mids),
        "around_codes": around(vals),
        "overflow_boundary": np.concatenate([boundary, around(boundary)]),
        "specials": specials,
        "random": sign * mag,
    }
    # float32 is what every oracle converts from; drop values float32 cannot hold (e.g. below 2**-149)
    out = {}
    for k, v in groups.items():
        with np.errstate(over="ignore"):  # 2 * max of E8M0 overflows float32 to inf: wanted
            v32 = np.asarray(v, dtype=np.float64).astype(f32)
        if not fmt.signed:
            v32 = v32[~(v32 < 0)]
        out[k] = v32.astype(np.float64)
    return out


# -- scales and conversion ---------------------------------------------------------------------------
def check_e8m0_double(double_fn: Callable[[np.ndarray], np.ndarray]) -> list[Mismatch]:
    """For every finite e8m0 byte that can be doubled (0 .. 253): decode(double(b)) == 2 * decode(b)."""
    b = np.arange(254, dtype=np.uint8)
    got = np.asarray(double_fn(b)).astype(np.int64)
    out = []
    for i in np.flatnonzero(~same_value(E8M0.table[got], 2 * e8m0_decode(b))):
        out.append(
            Mismatch(
                "e8m0_double",
                E8M0.name,
                int(i),
                f"scale {E8M0.describe(b[i])} doubled should be {2 * float(E8M0.table[b[i]])!r}, "
                f"got {E8M0.describe(got[i])}",
            )
        )
    return out


def check_same_dequant(
    before: np.ndarray,
    after: np.ndarray,
    codes: np.ndarray,
    code_fmts: tuple[MiniFloat, MiniFloat],
    *,
    check: str,
    scale_bytes: tuple[np.ndarray, np.ndarray] | None = None,
    scale_index: Callable[[int], tuple] | None = None,
) -> list[Mismatch]:
    """Elementwise: dequantised values before and after a conversion must be identical.

    ``codes`` are the element codes before (the byte shown with both formats' s/e/m), ``code_fmts`` the
    (before, after) element formats. With ``scale_bytes`` (e8m0 bytes before/after) and ``scale_index``
    (element flat index -> scale index) the message also shows the scale bytes.
    """
    before = np.asarray(before, np.float64).ravel()
    after = np.asarray(after, np.float64).ravel()
    codes = np.asarray(codes).ravel()
    out = []
    for i in np.flatnonzero(~same_value(before, after) & ~((before == 0) & (after == 0))):
        c = int(codes[i])
        msg = (
            f"code {code_fmts[0].describe(c)} / {code_fmts[1].describe(c)}: "
            f"dequantised {float(before[i])!r} before, "
            f"{float(after[i])!r} after"
        )
        if scale_bytes is not None and scale_index is not None:
            j = scale_index(int(i))
            msg += (
                f"; scale {E8M0.describe(int(scale_bytes[0][j]))} -> {E8M0.describe(int(scale_bytes[1][j]))}"
            )
        out.append(Mismatch(check, code_fmts[0].name, int(i), msg))
    return out


def check_codes(
    got,
    want,
    fmt: MiniFloat,
    *,
    check: str,
    where: Callable[[int], str] | None = None,
    limit: int | None = None,
) -> list[Mismatch]:
    """Two code arrays of the same shape must hold the same codes (two NaN codes count as equal).

    ``where`` renders a flat index as a position (e.g. 'row 3 col 70, block (0, 1)'); ``limit`` stops
    building messages after that many (the count in ``report`` needs the full list, so the default is all).
    """
    got = np.asarray(got).astype(np.int64)
    want = np.asarray(want).astype(np.int64)
    if got.shape != want.shape:
        return [Mismatch(check, fmt.name, -1, f"shape {got.shape} != expected {want.shape}")]
    g, w = got.ravel(), want.ravel()
    bad = np.flatnonzero((g != w) & ~(np.isnan(fmt.table[g]) & np.isnan(fmt.table[w])))
    out = []
    for i in bad[:limit]:
        pos = where(int(i)) if where else f"index {np.unravel_index(i, got.shape)}"
        out.append(
            Mismatch(
                check, fmt.name, int(i), f"{pos}: expected {fmt.describe(w[i])}, got {fmt.describe(g[i])}"
            )
        )
    return out


def check_values(
    got, want, *, check: str, fmt_name: str = "float32", where: Callable[[int], str] | None = None
) -> list[Mismatch]:
    """Exact elementwise equality of two float arrays (NaN == NaN; +0 == -0, as dequantised values)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return [Mismatch(check, fmt_name, -1, f"shape {got.shape} != expected {want.shape}")]
    g, w = got.ravel(), want.ravel()
    bad = np.flatnonzero(~((g == w) | (np.isnan(g) & np.isnan(w))))
    return [
        Mismatch(
            check,
            fmt_name,
            int(i),
            f"{where(int(i)) if where else f'index {np.unravel_index(i, got.shape)}'}: expected "
            f"{float(w[i])!r}, got {float(g[i])!r}",
        )
        for i in bad
    ]
