"""What ml_dtypes, torch and transformers do where formats or APIs leave room, recorded per release.

Each quirk (tests/quirks.py) is probed here: on a recorded release the probe must equal the record, on an
unrecorded one it must be a known behaviour and is reported as drift. Our own codec's behaviour at the same
inputs is asserted beside, unconditionally: it is the ground truth and does not follow any library.
"""

import numpy as np
import pytest
import torch

from references.formats.minifloat import FORMATS

from ..quirks import E8M0_SUB, QUIRKS, Quirk, ThirdPartyDrift, e8m0_subnormals, record_for
from .oracles import ENCODE, OVERFLOW


def _installed(q: Quirk) -> bool:
    import importlib.metadata as md

    try:
        md.version(q.library)
    except md.PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("quirk_id", sorted(QUIRKS))
def test_quirk_is_recorded_or_known(quirk_id):
    q = QUIRKS[quirk_id]
    if not _installed(q):
        pytest.skip(f"{q.library} is not installed (its quirks are probed where it is)")
    q.check()


def test_record_lookup_is_part_wise_and_most_specific():
    rec = {"2.1": "a", "2.13": "b", "2.13.1": "c"}
    assert record_for(rec, "2.13.0+cpu") == ("2.13", "b")
    assert record_for(rec, "2.13.1") == ("2.13.1", "c")
    assert record_for(rec, "2.1.2") == ("2.1", "a")
    assert record_for(rec, "2.14.0") is None


def test_check_fails_on_a_recorded_release_that_changed(monkeypatch):
    """A recorded release whose probe now differs fails, naming library, release and both behaviours."""
    q = QUIRKS["ml_dtypes.float8_e8m0fnu.f32_subnormals"]
    flipped = {"up": "nearest", "nearest": "up"}[q.observed()]
    v = q.version()
    bad = Quirk(q.id, q.library, q.what, q.probe, {v: flipped}, q.known)
    with pytest.raises(AssertionError, match=rf"ml_dtypes {v}: .* is now '{q.observed()}'; recorded .*'{flipped}'"):
        bad.check()


def test_check_reports_an_unrecorded_release_and_logs_it(monkeypatch, tmp_path):
    """An unrecorded release with a known behaviour passes, warns and writes the drift log line (so does a
    recorded one, without the warning); an unknown behaviour fails."""
    log = tmp_path / "quirks.jsonl"
    monkeypatch.setenv("DSV4_QUIRK_LOG", str(log))
    q = QUIRKS["ml_dtypes.float8_e8m0fnu.f32_subnormals"]
    unrec = Quirk(q.id, q.library, q.what, q.probe, {"0.0.1": "up"}, q.known)
    with pytest.warns(ThirdPartyDrift, match="is not recorded"):
        assert unrec.check() == q.observed()
    import json

    (line,) = log.read_text().splitlines()
    assert json.loads(line)["quirk"] == q.id and json.loads(line)["observed"] == q.observed()
    assert json.loads(line)["recorded_release"] is False
    q.check()
    assert json.loads(log.read_text().splitlines()[1])["recorded_release"] is True
    unknown = Quirk(q.id, q.library, q.what, q.probe, {"0.0.1": "up"}, ("something else",))
    with pytest.raises(AssertionError, match="none of the known behaviours"):
        unknown.check()


def test_torch_e4m3fn_and_e4m3fnuz_overflow_differently():
    """The asymmetry that matters on gfx942: fnuz casts give NaN (0x80); the OCP cast clamps to +-448 or gives
    its own NaN codes (0x7F / 0xFF), by torch release (recorded) — never the fnuz NaN."""
    x = torch.tensor([1000.0, -1000.0, float("inf")])
    ocp = x.to(torch.float8_e4m3fn).view(torch.uint8).tolist()
    want = [0x7E, 0xFE, 0x7E] if OVERFLOW[("torch", "float8_e4m3fn")] == "saturate" else [0x7F, 0xFF, 0x7F]
    assert ocp == want
    assert x.to(torch.float8_e4m3fnuz).view(torch.uint8).tolist() == [0x80, 0x80, 0x80]


def test_our_codec_nan_and_e8m0_choices():
    """Our codec: e5m2 NaN is 0x7F (torch's code; ml_dtypes writes 0x7E), E8M0 maps 0 to 2**-127 (nearest)
    and refuses negatives, e2m1 refuses NaN and non-saturating overflow."""
    assert FORMATS["float8_e5m2"].encode(np.array([np.nan])).tolist() == [0x7F]
    assert FORMATS["float8_e8m0fnu"].encode([0.0]).tolist() == [0x00]
    with pytest.raises(ValueError, match="unsigned"):
        FORMATS["float8_e8m0fnu"].encode([-4.0])
    assert FORMATS["float8_e8m0fnu"].encode([0.75, 1.5, 3.0, 6.0, 12.0]).tolist() == [0x7F, 0x80, 0x81, 0x82, 0x83]
    with pytest.raises(ValueError, match="NaN"):
        FORMATS["float4_e2m1fn"].encode([np.nan])
    with pytest.raises(OverflowError):
        FORMATS["float4_e2m1fn"].encode([7.0], saturate=False)


def test_e8m0_float32_subnormals_our_codec_rounds_to_nearest():
    """Inputs in (2**-127, 2**-126) are float32 subnormals. Our codec rounds them to the nearest power of two;
    each library does it by its recorded mode ("up": everything to 2**-126, as ml_dtypes <= 0.6 and torch 2.13
    do; "nearest": as our codec, ml_dtypes 0.7). The encode comparison skips (2**-127, 1.5 * 2**-127) for a
    library in mode "up" only."""
    ours = FORMATS["float8_e8m0fnu"].encode(E8M0_SUB).tolist()
    assert ours == [0x00, 0x00, 0x00, 0x00, 0x00, 0x01]
    for lib in ("ml_dtypes", "torch"):
        got = ENCODE[lib]("float8_e8m0fnu", E8M0_SUB).tolist()
        if e8m0_subnormals(lib) == "nearest":
            assert got == ours, f"{lib}: recorded as nearest but encodes {got}"
        else:
            assert got == [0x00, 0x00, 0x00, 0x01, 0x01, 0x01], f"{lib}: recorded as up but encodes {got}"
