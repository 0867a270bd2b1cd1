"""Which dialect wrote these bytes, and which dialect read them.

``classify_codes``   (producers) bytes produced for the designed probe values + the producer's own scales
                     -> DialectVerdict: float8_e4m3fn / float8_e4m3fnuz / neither / ambiguous, the fmax the
                     scales imply, named defects (0x80 on fnuz, overflow -> NaN, fmax beyond the format).
``classify_decoding`` (consumers) bytes of a known dialect fed in, values read out -> DecodingVerdict.

Both judge against ``references.formats.minifloat`` (bit-layout codecs), never against torch casts.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from references.formats.minifloat import FNUZ, OCP, MiniFloat, get_format
from references.formats.scales import fp32_scale, pow2_scale

from ...ratio import EXACT, NOISE, ratio_signature
from .probes import FMAX_CANDIDATES, block_amax, expand_scales

DIALECT_FORMATS = (OCP, FNUZ)
NEITHER, AMBIGUOUS = "neither", "ambiguous"


def describe(fmt: MiniFloat, code: int) -> str:
    """MiniFloat.describe with numpy scalar reprs stripped: '0x40 s=0 e=1000 m=000 (1.0 as ...)'."""
    return re.sub(r"np\.float64\(([^)]*)\)", r"\1", fmt.describe(int(code)))


def both_decodings(code: int) -> str:
    return f"{describe(OCP, code)} | {describe(FNUZ, code)}"


def _idx(i) -> str:
    return "[" + ", ".join(str(int(x)) for x in i) + "]"


def _np(x, dtype=None):
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x, dtype=dtype) if dtype is not None else np.asarray(x)


def _rank(fmt: MiniFloat, codes: np.ndarray) -> np.ndarray:
    """Signed position of each code's value on the format's number line (NaN -> huge): 1 step = 1 ULP."""
    pos_codes, _ = fmt._positive_codes
    rank_of = np.full(fmt.n_codes, 10_000, dtype=np.int64)
    rank_of[pos_codes] = np.arange(len(pos_codes))
    vals = fmt.table
    for c in range(fmt.n_codes):
        if np.isfinite(vals[c]) and vals[c] <= 0 and np.signbit(vals[c]) and (c & fmt.sign_mask):
            rank_of[c] = -rank_of[c & ~fmt.sign_mask]
        elif np.isfinite(vals[c]) and vals[c] < 0:
            rank_of[c] = -rank_of[c & ~fmt.sign_mask]
    return rank_of[codes.astype(np.int64)]


@dataclass
class DialectVerdict:
    dialect: str  # float8_e4m3fn | float8_e4m3fnuz | neither | ambiguous
    evidence: list = field(default_factory=list)
    fmax_guess: float | None = None
    defects: list = field(default_factory=list)  # {"kind", "message", "count", "index"}
    match: dict = field(default_factory=dict)  # dialect -> fraction of discriminating bytes equal
    scale_rule: str = ""  # pow2 | fp32
    scale_offset_log2: dict = field(default_factory=dict)  # dialect -> k when bytes = D(value * 2**k)
    worst: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.dialect in (OCP.name, FNUZ.name) and not self.defects

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        f = f", fmax {self.fmax_guess:g}" if self.fmax_guess else ""
        d = "; defects: " + "; ".join(x["message"] for x in self.defects) if self.defects else ""
        return f"wrote {self.dialect}{f}{d}"


def infer_fmax(
    values: np.ndarray, scale_el: np.ndarray, block, rule: str | None = None, amax_floor: float = 0.0
):
    """fmax in {448, 240, 224} whose scale rule reproduces every block's scale, and the rule used."""
    amax = np.maximum(block_amax(values, block), amax_floor)
    br, bc = block
    sb = scale_el[..., ::br, ::bc]
    if rule is None:
        m, _ = np.frexp(sb)
        rule = "pow2" if np.all(m == 0.5) else "fp32"
    hits = []
    for f in FMAX_CANDIDATES:
        want = pow2_scale(amax, f, 1e-30) if rule == "pow2" else fp32_scale(amax, f, 1e-30)
        if rule == "pow2" and np.array_equal(want, sb):
            hits.append(f)
        elif rule == "fp32" and np.allclose(want, sb, rtol=2.0**-20, atol=0):
            hits.append(f)
    return hits, rule, (amax / sb)


def classify_codes(
    codes,
    values_fed,
    scale,
    fmax: float | None = None,
    *,
    block=None,
    scale_rule: str | None = None,
    amax_floor: float = 0.0,
) -> DialectVerdict:
    """Decide which dialect (and fmax) wrote ``codes`` for ``values_fed`` quantised with ``scale``.

    codes      : uint8 bytes produced, any shape
    values_fed : the float values the producer was given (same shape)
    scale      : the producer's scale as float values, per element or per block (with ``block``)
    fmax       : the fmax the producer is expected to use (optional; a different one is a defect)
    block      : (rows, cols) of one scale block; needed to infer fmax from the scales
    """
    c = _np(codes).astype(np.uint8)
    x = _np(values_fed, np.float64)
    if c.shape != x.shape:
        raise ValueError(f"classify_codes: codes {c.shape} and values {x.shape} differ in shape")
    s = _np(scale, np.float64)
    s = (
        expand_scales(s, block, x.shape)
        if block is not None and s.shape != x.shape
        else np.broadcast_to(s, x.shape)
    )
    v = DialectVerdict(dialect=AMBIGUOUS)
    if not np.isfinite(s).all() or (s <= 0).any():
        bad = np.argwhere(~np.isfinite(s) | (s <= 0))[0]
        v.dialect = NEITHER
        v.defects.append(
            dict(
                kind="bad_scale",
                count=int((~np.isfinite(s) | (s <= 0)).sum()),
                index=bad.tolist(),
                message=f"scale at {_idx(bad)} is {float(s[tuple(bad)])!r} (not a positive finite number)",
            )
        )
        return v
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        y = x / s
    y = np.where(np.isfinite(y), y, np.sign(y) * 1e300)
    exp = {f.name: f.encode(y, saturate=True) for f in DIALECT_FORMATS}
    signed_zero = np.signbit(y) & (OCP.decode(exp[OCP.name]) == 0) & (FNUZ.decode(exp[FNUZ.name]) == 0)
    discr = ~signed_zero & (exp[OCP.name] != exp[FNUZ.name])
    # fmax the scales imply
    if block is not None:
        hits, v.scale_rule, ratio = infer_fmax(x, s, block, scale_rule, amax_floor)
        v.fmax_guess = hits[0] if len(hits) == 1 else None
        v.evidence.append(
            f"scales ({v.scale_rule} rule) imply fmax {hits or 'none of 448/240/224'}"
            f" (block amax/scale = {np.unique(ratio.round(3)).tolist()[:6]})"
        )
    ymax = float(np.abs(y).max())
    v.evidence.append(f"max |value/scale| = {ymax:g}")
    n = int(discr.sum())
    if n == 0:
        stray = (c != exp[OCP.name]) & (c != exp[FNUZ.name])
        if stray.any():  # bytes where both dialects expect (signed) zero: the scale is off, not the dialect
            v.dialect = NEITHER
            i = tuple(np.argwhere(stray)[0])
            v.evidence.append(
                f"{int(stray.sum())} bytes are nonzero where both dialects round value/scale to zero, "
                f"e.g. {_idx(i)} fed {x[i]:g} (value/scale {y[i]:g}): {both_decodings(c[i])}"
            )
            _scale_offsets(v, c, y)
        else:
            v.evidence.append("no probe element tells the dialects apart (all values round to zero?)")
        return v
    good = {}
    for f in DIALECT_FORMATS:
        in_range = discr & (np.abs(y) <= f.max)
        eq = c == exp[f.name]
        v.match[f.name] = float((eq & discr).sum() / n)
        ulp = np.abs(_rank(f, c) - _rank(f, exp[f.name])) <= 1
        good[f.name] = bool(np.all(ulp[in_range])) and in_range.any()
    winners = [k for k, ok in good.items() if ok]
    subnormal_only = None
    if not winners:
        # bytes that match one dialect everywhere except where its expected code is subnormal (exponent field
        # 0): the dialect is right, the subnormal handling is not (e.g. flushed to zero)
        for f in DIALECT_FORMATS:
            in_range = discr & (np.abs(y) <= f.max)
            off = in_range & (np.abs(_rank(f, c) - _rank(f, exp[f.name])) > 1)
            sub = (exp[f.name].astype(np.int64) >> f.man_bits) & ((1 << f.exp_bits) - 1) == 0
            if off.any() and not (off & ~sub).any() and (in_range & ~sub).any():
                winners, subnormal_only = [f.name], (f, off)
                break
    if len(winners) == 1:
        v.dialect = winners[0]
    elif len(winners) > 1:
        v.dialect = AMBIGUOUS
    else:
        v.dialect = NEITHER
    if subnormal_only is not None:
        f, off = subnormal_only
        i = tuple(np.argwhere(off)[0])
        v.defects.append(dict(
            kind="subnormal_mishandled", count=int(off.sum()), index=list(map(int, i)),
            message=f"{int(off.sum())} values whose {f.name} code is subnormal were written wrongly (normal codes "
                    f"match {f.name}), e.g. {_idx(i)} value/scale {y[i]:g}: produced {describe(f, c[i])}, "
                    f"expected {describe(f, exp[f.name][i])}"))
    # evidence: the first discriminating element (1.0 by design) and the worst mismatch
    i0 = tuple(np.argwhere(discr)[0])
    v.evidence.append(
        f"element {_idx(i0)} fed {x[i0]:g} (value/scale {y[i0]:g}): produced {both_decodings(c[i0])}; "
        f"OCP would write 0x{exp[OCP.name][i0]:02X}, fnuz 0x{exp[FNUZ.name][i0]:02X}"
    )
    best = v.dialect if v.dialect in exp else max(v.match, key=v.match.get)
    fb = get_format(best)
    bad = discr & (c != exp[best]) & (np.abs(y) <= fb.max)
    if bad.any():
        err = np.abs(fb.decode(c) - y)
        err = np.where(np.isnan(err), np.inf, err)
        wi = tuple(np.argwhere(bad)[np.argmax(err[bad])])
        v.worst = dict(
            index=list(map(int, wi)),
            fed=float(x[wi]),
            value_over_scale=float(y[wi]),
            code=int(c[wi]),
            expected_code=int(exp[best][wi]),
            against=best,
        )
        v.evidence.append(
            f"{int(bad.sum())}/{n} discriminating bytes differ from {best}; worst {_idx(wi)} fed "
            f"{x[wi]:g} (value/scale {y[wi]:g}): produced {both_decodings(c[wi])}; "
            f"{best} expects {describe(fb, exp[best][wi])}"
        )
    if v.dialect == NEITHER:
        _scale_offsets(v, c, y)
        return v
    _special_values(v, c, y, x, signed_zero, get_format(v.dialect), fmax)
    return v


def _scale_offsets(v: DialectVerdict, c: np.ndarray, y: np.ndarray) -> None:
    """Bytes that are D codes of value * 2**k: the scale is off by a power of two."""
    for f in DIALECT_FORMATS:
        dv = f.decode(c)
        ok = np.isfinite(dv) & (dv != 0) & (y != 0) & (np.abs(y) < 1e300)
        if not ok.any():
            continue
        d = np.log2(np.abs(dv[ok] / y[ok]))
        k = float(np.round(np.median(d)))
        if k != 0 and np.mean(np.abs(d - k) <= NOISE + EXACT) >= 0.9:
            v.scale_offset_log2[f.name] = int(k)
            v.evidence.append(
                f"bytes are {f.name} codes of value x 2**{int(k)}: the scale reported is 2**{int(k)} "
                f"times the one the bytes were written with"
            )


def _flag(v, kind: str, mask: np.ndarray, message) -> None:
    """Record defect ``kind`` where ``mask`` holds: its count, the first index ``i`` and ``message(i, count)``."""
    if mask.any():
        i = tuple(np.argwhere(mask)[0])
        n = int(mask.sum())
        v.defects.append(dict(kind=kind, count=n, index=list(map(int, i)), message=message(i, n)))


def _special_values(v, c, y, x, signed_zero, f: MiniFloat, fmax_expected) -> None:
    nan_c = np.isnan(f.decode(c))
    over = np.abs(y) > f.max
    if f is FNUZ:
        _flag(v, "nan_from_negative_underflow", signed_zero & (c == 0x80),
              lambda i, n: f"{n} tiny negative / -0 inputs written as 0x80 (OCP's -0 is fnuz's NaN), e.g. "
                           f"{_idx(i)} fed {x[i]:g}: {both_decodings(0x80)}")
    else:
        m = signed_zero & (c == 0x00)
        if m.any():
            v.evidence.append(
                f"{int(m.sum())} negative underflows written as +0 (0x00): sign of zero dropped "
                "(harmless; what the OCP->fnuz code fix-up does)"
            )
    _flag(v, "overflow_to_nan", nan_c & over & ~signed_zero,
          lambda i, n: f"non-saturating cast: {n} values beyond {f.name} max {f.max:g} became NaN, e.g. "
                       f"{_idx(i)} value/scale {y[i]:g} -> {describe(f, c[i])}")
    _flag(v, "nan_written", nan_c & ~over & ~signed_zero,
          lambda i, n: f"{n} NaN bytes for finite in-range inputs, e.g. {_idx(i)} fed {x[i]:g}: "
                       f"{describe(f, c[i])}")
    if v.fmax_guess is not None and v.fmax_guess > f.max:
        n = int(over.sum())
        i = tuple(np.argwhere(over)[0]) if n else ()
        v.defects.append(
            dict(
                kind="fmax_exceeds_format",
                count=n,
                index=list(map(int, i)),
                message=f"fmax {v.fmax_guess:g} exceeds {f.name} max {f.max:g}: {n} values in "
                f"({f.max:g}, {v.fmax_guess:g}] clipped or NaN (x{f.max / v.fmax_guess:.3f} at "
                f"the block max)"
                + (f", e.g. {_idx(i)} value/scale {y[i]:g} -> {describe(f, c[i])}" if n else ""),
            )
        )
    if fmax_expected is not None and v.fmax_guess is not None and v.fmax_guess != fmax_expected:
        v.defects.append(
            dict(
                kind="fmax_mismatch",
                count=0,
                index=[],
                message=f"scales follow fmax {v.fmax_guess:g}, expected {fmax_expected:g}",
            )
        )


@dataclass
class DecodingVerdict:
    decoded_as: str  # float8_e4m3fn | float8_e4m3fnuz | neither | ambiguous
    dialect_fed: str
    evidence: list = field(default_factory=list)
    factor_log2: dict = field(default_factory=dict)  # dialect -> k when read = D(code) * scale * 2**k
    ratio: dict = field(default_factory=dict)  # RatioSignature vs the fed dialect, as a dict
    worst: dict = field(default_factory=dict)
    defects: list = field(default_factory=list)  # e.g. subnormal codes decoded as normals

    @property
    def ok(self) -> bool:
        return self.decoded_as == self.dialect_fed and not self.defects

    def as_dict(self) -> dict:
        return asdict(self)


def classify_decoding(
    codes_fed, dialect_fed: str, values_read, scales=None, *, block=None, rel_tol: float = 2.0**-8
) -> DecodingVerdict:
    """How did a consumer decode bytes of ``dialect_fed``? ``scales``: float per element or per block."""
    c = _np(codes_fed).astype(np.uint8)
    r = _np(values_read, np.float64)
    if r.shape != c.shape:
        raise ValueError(f"classify_decoding: read {r.shape} for {c.shape} codes")
    s = np.ones(c.shape) if scales is None else _np(scales, np.float64)
    s = (
        expand_scales(s, block, c.shape)
        if block is not None and s.shape != c.shape
        else np.broadcast_to(s, c.shape)
    )
    fed = get_format(dialect_fed)
    v = DecodingVerdict(decoded_as=AMBIGUOUS, dialect_fed=fed.name)
    ok = {}
    for f in DIALECT_FORMATS:
        want = f.decode(c) * s
        same = (np.isnan(want) & np.isnan(r)) | (np.abs(r - want) <= rel_tol * np.abs(want))
        ok[f.name] = bool(same.all())
        fin = np.isfinite(want) & np.isfinite(r) & (want != 0) & (r != 0)
        if fin.any():
            d = np.log2(np.abs(r[fin] / want[fin]))
            k = float(np.round(np.median(d)))
            if np.mean(np.abs(d - k) <= EXACT) >= 0.9:
                v.factor_log2[f.name] = int(k)
    winners = [k for k, good in ok.items() if good]
    v.decoded_as = winners[0] if len(winners) == 1 else (AMBIGUOUS if winners else NEITHER)
    want = fed.decode(c) * s
    if not winners:
        # every normal code read as the fed dialect, only subnormal codes (exponent field 0) wrong: the
        # dialect is right, the subnormal decoding is not (e.g. exponent-0 codes read as normals)
        same = (np.isnan(want) & np.isnan(r)) | (np.abs(r - want) <= rel_tol * np.abs(want))
        sub = ((c.astype(np.int64) >> fed.man_bits) & ((1 << fed.exp_bits) - 1)) == 0
        if (~same).any() and not (~same & ~sub).any() and (same & ~sub).any():
            v.decoded_as = fed.name
            i = tuple(np.argwhere(~same)[0])
            v.defects.append(dict(
                kind="subnormal_mishandled", count=int((~same).sum()), index=list(map(int, i)),
                message=f"{int((~same).sum())} subnormal codes decoded wrongly (normal codes read as {fed.name}), "
                        f"e.g. {_idx(i)} {describe(fed, c[i])} with scale {s[i]:g} read as {r[i]!r}, "
                        f"expected {want[i]!r}"))
    sig = ratio_signature(r, want, codes=c)
    v.ratio = sig.as_dict()
    i0 = tuple(np.argwhere(c == 0x40)[0]) if (c == 0x40).any() else tuple(np.argwhere(c != 0)[0])
    v.evidence.append(f"byte {_idx(i0)} {both_decodings(c[i0])} with scale {s[i0]:g} read as {r[i0]!r}")
    if v.decoded_as == NEITHER:
        for k, e in v.factor_log2.items():
            if e:
                v.evidence.append(
                    f"values read = {k} decoding x 2**{e} (another bias, or the scale mishandled)"
                )
    if sig.worst:
        wi = tuple(sig.worst["index"])
        v.worst = dict(sig.worst, fed=describe(fed, c[wi]), both=both_decodings(c[wi]))
    if 0x80 in c:
        i = tuple(np.argwhere(c == 0x80)[0])
        v.evidence.append(f"byte 0x80 ({both_decodings(0x80)}) read as {r[i]!r}")
    return v


__all__ = [
    "DialectVerdict",
    "DecodingVerdict",
    "classify_codes",
    "classify_decoding",
    "describe",
    "both_decodings",
    "infer_fmax",
    "NEITHER",
    "AMBIGUOUS",
]
