"""MXFP4 staging probe (e2m1 values + e8m0 scales, block 32): no FP8 dialect, but the same scale hazards.

The staged bytes are compared with ``references.formats.blockscale.quantize_mxfp4`` for the designed probe
values: e8m0 scale bytes (exponent + 1 / byte*2 / unchanged, via check_scale_conversion against the
reference bytes, expected unchanged) and the packed nibbles (value codes, and the low-nibble-first order).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from references.formats.blockscale import quantize_mxfp4, unpack_nibbles

from .probes import producer_probe_values
from .scale_checks import check_scale_conversion


@dataclass
class Mxfp4Verdict:
    ok: bool
    message: str
    scale_check: dict = field(default_factory=dict)
    nibble_mismatches: int = 0
    nibbles_swapped: bool = False
    worst: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def probe_mxfp4(fn, *, function: str = "") -> Mxfp4Verdict:
    """``fn(values float32 [R, K]) -> (packed uint8 [R, K/2], e8m0 uint8 [R, K/32])``."""
    x = producer_probe_values((1, 128)) / 64.0  # MXFP4 range: amax 232/64 .. 7 -> scales 2**0 .. 2**1
    want_p, want_s = quantize_mxfp4(x)
    got_p, got_s = fn(x.clone())
    gp, gs = np.asarray(got_p.cpu().numpy(), np.uint8), np.asarray(got_s.cpu().numpy(), np.uint8)
    sc = check_scale_conversion(want_s.numpy(), gs, "ue8m0", expected="none")
    wn, gn = unpack_nibbles(want_p.numpy()), unpack_nibbles(gp)
    bad = wn != gn
    swapped = bool(bad.any() and np.array_equal(wn, unpack_nibbles((gp >> 4) | ((gp & 0xF) << 4))))
    worst = {}
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        worst = dict(index=list(i), fed=float(x.numpy()[i]), nibble=int(gn[i]), expected=int(wn[i]))
    ok = sc.ok and not bad.any()
    parts = [] if sc.ok else [sc.message]
    if swapped:
        parts.append("nibbles swapped: the even (first) element must sit in the low nibble")
    elif bad.any():
        parts.append(
            f"{int(bad.sum())} e2m1 nibbles differ, first at {worst['index']}: fed {worst['fed']:g}, "
            f"got 0x{worst['nibble']:X}, expected 0x{worst['expected']:X}"
        )
    msg = f"mxfp4 staging ({function or 'subject'}): " + (
        "; ".join(parts) if parts else "matches the reference"
    )
    return Mxfp4Verdict(ok, msg, sc.as_dict(), int(bad.sum()), swapped, worst)


__all__ = ["Mxfp4Verdict", "probe_mxfp4"]
