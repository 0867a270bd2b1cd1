"""Ratio signature: the distribution of log2(|subject| / |reference|) and what its peaks mean.

A dialect error is a *constant factor* on every element, not noise:
  +1 / -1          bias 8 vs bias 7: the same byte read in the other dialect (x2 / x0.5), or the x2
                   OCP->fnuz scale conversion applied twice / not at all. Exact: same bytes, power-of-two.
  +-log2(448/240)  = +-0.9005: fmax 448 vs 240 (a value scaled for 448 clipped at fnuz's 240, or back)
  +-log2(240/224)  = +-0.0995: fmax 224 vs 240 (the indexer-q USE_FNUZ branch)
  NaN at 0x80      the reference is finite, the subject NaN: fnuz's NaN is OCP's -0.

Windows are derived from the element format: e4m3 has 3 mantissa bits, so one round-to-nearest changes a
normal value by at most 2**-4 relative (|log2| <= log2(1/(1 - 2**-4)) = 0.0931). A factor of exactly
2**k between identical bytes is exact; a bf16 output adds at most 2**-9 relative, so "exact" means within
``EXACT`` = 2**-7 in log2. A peak counts as *exact* (identical bytes, wrong reading) or *noisy* (within the
one-rounding window of the peak: a wrong scale followed by a fresh rounding).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

E4M3_MAN_BITS = 3
ROUNDING_REL = 2.0 ** -(E4M3_MAN_BITS + 1)  # 2**-4: one FP8 rounding, relative
NOISE = -math.log2(1.0 - ROUNDING_REL)  # 0.0931 in log2
EXACT = 2.0**-8  # > one bf16 rounding (2**-9 rel = 0.0028), and
# < the gap 240/256 vs 224/240 (0.0064 in log2)

FMAX_448_240 = math.log2(448.0 / 240.0)  # 0.9005
FMAX_240_224 = math.log2(240.0 / 224.0)  # 0.0995

# name -> (log2 target, factor label, meaning)
PEAKS = {
    "x2": (1.0, "x2", "bias 8 (fnuz) bytes read with bias 7 (OCP), or the x2 scale conversion applied twice"),
    "x0.5": (-1.0, "x0.5", "bias 7 (OCP) bytes read with bias 8 (fnuz) without the x2 scale conversion"),
    "fmax448/240": (FMAX_448_240, "x1.87", "scaled for fmax 240 but read / clipped as if fmax were 448"),
    "fmax240/448": (-FMAX_448_240, "x0.536", "scaled for fmax 448 but clipped at 240 (fmax 448 under fnuz)"),
    "fmax240/224": (FMAX_240_224, "x1.071", "fmax 240 where 224 was expected"),
    "fmax224/240": (-FMAX_240_224, "x0.933", "scaled for fmax 240 but clipped at 224 (224 vs 240)"),
}
SPECIAL = {
    "nan_at_0x80": "subject NaN at byte 0x80 where the reference is finite: fnuz's NaN is OCP's -0 "
    "(negative underflow written as 0x80, or -0 not cleared by the OCP->fnuz conversion)",
    "nan": "subject NaN where the reference is finite (non-saturating cast: overflow -> NaN on fnuz)",
    "inf": "subject infinite where the reference is finite",
    "zero": "subject zero where the reference is not (underflow or a lost scale)",
    "other": "ratios that match no dialect signature",
}
# ordering used to pick the headline: exact peaks, special values, noisy peaks, other
_PRIORITY = (
    [f"{k}:exact" for k in PEAKS]
    + ["nan_at_0x80", "nan", "inf"]
    + [f"{k}:noisy" for k in PEAKS]
    + ["zero", "other"]
)


@dataclass
class RatioSignature:
    n: int  # elements compared (reference finite, above ignore_below)
    counts: dict = field(default_factory=dict)
    signature: str = "match"  # headline bin ("match" when nothing is flagged)
    factor: str = "x1"
    meaning: str = ""
    suspect: str = ""  # suspected edge / cause
    worst: dict = field(default_factory=dict)
    histogram: dict = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        return self.signature != "match"

    @property
    def fractions(self) -> dict:
        return {k: v / self.n for k, v in self.counts.items()} if self.n else {}

    def as_dict(self) -> dict:
        d = asdict(self)
        d["fractions"] = self.fractions
        return d

    def summary(self) -> str:
        if not self.flagged:
            return f"ratio signature: match ({self.n} elements within FP8 rounding)"
        c = self.counts.get(self.signature, 0)
        also = [f"{k} {v}" for k, v in self.counts.items() if k not in ("exact", "noise", self.signature)]
        return (
            f"ratio signature: {self.factor} ({self.signature}, {c}/{self.n} elements): {self.meaning}"
            + (f" [also: {', '.join(also)}]" if also else "")
            + (f"; suspected edge: {self.suspect}" if self.suspect else "")
        )


def _classify(d: np.ndarray) -> np.ndarray:
    """log2 ratios (finite) -> bin names."""
    names = list(PEAKS)
    targets = np.array([PEAKS[k][0] for k in names])
    near = np.argmin(np.abs(d[..., None] - targets), axis=-1)
    dist = np.abs(d - targets[near])
    peak = np.array(names, dtype=object)[near]
    out = np.full(d.shape, "other", dtype=object)
    noisy = dist <= NOISE + EXACT
    out[noisy] = peak[noisy] + ":noisy"
    out[np.abs(d) <= NOISE + EXACT] = "noise"
    ex = dist <= EXACT
    out[ex] = peak[ex] + ":exact"
    out[np.abs(d) <= EXACT] = "exact"
    return out


def ratio_signature(
    subject, reference, *, codes=None, ignore_below=0.0, edge: str = "", suspects: dict | None = None
) -> RatioSignature:
    """Elementwise log2(|subject| / |reference|), binned onto the dialect signatures.

    codes        : the FP8 bytes behind ``subject`` (optional): NaN at 0x80 is then named as such
    ignore_below : |reference| below this (scalar or per element) is not compared: subnormal and
                   underflowing values carry more than 2**-4 relative rounding by design
    edge         : the edge this comparison sits on (named in ``suspect``)
    suspects     : signature name -> edge, used when ``edge`` is not given (see dialect_map.SUSPECTS)
    """
    s = np.asarray(_np(subject), dtype=np.float64)
    r = np.asarray(_np(reference), dtype=np.float64)
    if s.shape != r.shape:
        raise ValueError(f"ratio_signature: subject shape {s.shape} != reference shape {r.shape}")
    floor = np.broadcast_to(np.asarray(ignore_below, dtype=np.float64), r.shape)
    # compared: finite reference above the floor, and always a NaN / inf subject against a finite reference
    keep = np.isfinite(r) & (np.abs(r) >= floor) & ~((r == 0) & (s == 0)) & ~((r == 0) & (floor > 0))
    keep |= np.isfinite(r) & ~np.isfinite(s)
    bins = np.full(r.shape, "", dtype=object)
    d = np.full(r.shape, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        d_all = np.log2(np.abs(s) / np.abs(r))
    cb = np.asarray(_np(codes)) if codes is not None else None
    ok = keep & np.isfinite(s) & (s != 0) & (r != 0)
    d[ok] = d_all[ok]
    bins[ok] = _classify(d_all[ok])
    bins[keep & (r == 0) & (s != 0)] = "other"
    bins[keep & (s == 0) & (r != 0)] = "zero"
    bins[keep & np.isinf(s)] = "inf"
    nan_s = keep & np.isnan(s)
    bins[nan_s] = "nan"
    if cb is not None:
        bins[nan_s & (cb.astype(np.int64) == 0x80)] = "nan_at_0x80"
    n = int(keep.sum())
    counts: dict[str, int] = {}
    for b in bins[keep].ravel():
        counts[b] = counts.get(b, 0) + 1
    sig = RatioSignature(n=n, counts=counts)
    fin = d[np.isfinite(d)]
    if fin.size:
        h, e = np.histogram(np.clip(fin, -2.0, 2.0), bins=32, range=(-2.0, 2.0))
        sig.histogram = {"edges": e.round(4).tolist(), "counts": h.tolist()}
    headline = next((b for b in _PRIORITY if counts.get(b)), None)
    if headline is None:
        return sig
    sig.signature = headline
    base = headline.split(":")[0]
    if base in PEAKS:
        _, sig.factor, sig.meaning = PEAKS[base]
        if headline.endswith(":noisy"):
            sig.meaning += " (with a fresh rounding: a scale off by this factor, not a byte reinterpretation)"
    else:
        sig.factor = {"nan_at_0x80": "NaN<->-0", "nan": "NaN", "inf": "inf", "zero": "x0"}.get(base, "?")
        sig.meaning = SPECIAL[base]
    sig.suspect = edge or (suspects or {}).get(base, "")
    # worst element: first element of the headline bin with the largest |log2 ratio|
    sel = (bins == headline) & keep
    cand = np.argwhere(sel)
    dd = np.array([abs(d[tuple(i)]) if np.isfinite(d[tuple(i)]) else np.inf for i in cand])
    i = tuple(int(x) for x in cand[int(np.argmax(dd))])
    sig.worst = {
        "index": list(i),
        "subject": float(s[i]),
        "reference": float(r[i]),
        "log2_ratio": float(d[i]) if np.isfinite(d[i]) else None,
    }
    if cb is not None:
        sig.worst["code"] = int(cb[i])
    return sig


def _np(x):
    if x is None:
        return None
    if hasattr(x, "detach"):
        return x.detach().to("cpu").float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


__all__ = ["RatioSignature", "ratio_signature", "PEAKS", "NOISE", "EXACT", "ROUNDING_REL"]
