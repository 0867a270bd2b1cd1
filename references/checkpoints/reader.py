"""Lazy reader of a DSV4 checkpoint in the official layout (spec section 1).

``CheckpointReader(dir)`` reads ``config.json`` and ``model.safetensors.index.json`` only. Each ``get(name)``
opens the one shard holding that tensor with ``safetensors.safe_open`` (memory-mapped; never the whole file,
never pickle), checks the stored dtype and shape against the layout the config implies *before* reading
the data, reads the tensor (and its ``.scale``), and dequantises it with ``references.formats``:

* FP8 e4m3 weights (``float8_e4m3fn``, or raw uint8 bytes) x block scales (e8m0 as uint8 or
  ``float8_e8m0fnu``; fp32 for the Flash-Base release) with the config's ``weight_block_size`` (128x128 in V4,
  32x32 in V4.1). A scale grid that is not that block's grid is refused with the block its shape implies
  (``weight [N,K] with scale [a,b] implies block (32,32); config says 128x128``), so 32x32 scales are never read
  as 128x128 ones or the other way round;
* MXFP4 experts: packed int8/uint8 [out, in/2] (low nibble first) x e8m0 [out, in/32];
* NVFP4 experts (``quantization_config.moe_quant_algo = "NVFP4"``): packed uint8 [out, in/2] x ``weight_scale``
  E4M3 bytes (float8_e4m3fn or uint8) [out, in/16] x the fp32 scalar ``weight_scale_2``; the fp32 scalar
  ``input_scale`` is checked (positive, finite) and returned by ``nvfp4(name)`` with the raw pieces. A NaN or
  negative scale byte, or a non-positive global scale, is refused naming the tensor;
* bf16 / fp32 tensors upcast to fp32; ``tid2eid`` as int64;
* V4.1 Engram tables (kind ``fp8_rows``, in quantised and bf16 checkpoints alike): ``engram.embed.weight`` FP8 e4m3
  codes (float8_e4m3fn or uint8) [rows, head_dim] x ``engram.embed.scale`` UE8M0 (float8_e8m0fnu or uint8)
  [rows, head_dim / 32]; a scale grid of another grouping is refused naming it, a NaN code or scale byte naming
  where. The golden's names (``layout.ENGRAM_GOLDEN_NAMES``) are served too: ``layers.{l}.engram.table`` /
  ``.table_scale`` return the stored bytes as uint8 (the golden decodes them: ``engram_lookup``),
  ``engram.wkv`` the decoded ``engram.wkv.weight``.

Every problem raises ``CheckpointError`` naming the file and the tensor: missing tensor, truncated or
unreadable shard, wrong dtype, wrong shape. For a V4.1 config the index is first checked against the sharing
of compressors and indexers (``layout.sharing_problems``): a layer with its own indexer / compressor where
``index_source_layer_ids`` / ``kv_source_layer_ids`` make it reuse another layer's, or a source without one.
The reader implements the ``WeightSource`` protocol
(``get(name) -> float32 tensor``) used by ``references.model``; ``layer(i)`` returns one decoder block's
weights keyed relative to the layer (DESIGN.md), touching no other layer's tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..formats.blockscale import block_mismatch
from .codec import decode, table_bytes
from .hf_config import from_hf_dict
from .layout import (
    ENGRAM_GOLDEN_NAMES,
    ENGRAM_TABLE_BLOCK,
    TensorSpec,
    expected_tensors,
    layer_prefix,
    layer_tensors,
    relative_key,
    sharing_problems,
)

__all__ = ["CheckpointError", "CheckpointReader"]


class CheckpointError(RuntimeError):
    """A checkpoint that does not match the official layout; the message names file and tensor."""


_FP8_DTYPES = (torch.float8_e4m3fn, torch.uint8)
_SCALE_DTYPES = (torch.float8_e8m0fnu, torch.uint8, torch.float32)
_FP4_DTYPES = (torch.int8, torch.uint8)
_FLOAT_DTYPES = (torch.bfloat16, torch.float32)
_SAFE_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "U8": torch.uint8,
                "I8": torch.int8, "BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16,
                "I32": torch.int32, "I64": torch.int64, "F64": torch.float64, "BOOL": torch.bool}


_SCALAR = [(), (1,)]   # a per-tensor scale stored as a 0-d or a one-element tensor


def _shape_ok(shp, want) -> bool:
    return tuple(shp) in [tuple(w) for w in want] if isinstance(want, list) else tuple(shp) == tuple(want)


class CheckpointReader:
    def __init__(self, path):
        self.path = Path(path)
        cfg_file = self.path / "config.json"
        idx_file = self.path / "model.safetensors.index.json"
        for f in (cfg_file, idx_file):
            if not f.is_file():
                raise CheckpointError(f"{f}: missing")
        try:
            self.config, self.quantized = from_hf_dict(json.loads(cfg_file.read_text()), name=self.path.name)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{cfg_file}: {e}") from e
        try:
            self.weight_map: dict[str, str] = json.loads(idx_file.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{idx_file}: no readable weight_map ({e})") from e
        sharing = sharing_problems(self.config, self.weight_map)
        if sharing:   # V4.1: compressors / indexers on the wrong layers (before any layout check)
            more = f" (and {len(sharing) - 1} more problem(s))" if len(sharing) > 1 else ""
            raise CheckpointError(f"{idx_file}: {sharing[0]}{more}")
        try:
            self.specs: dict[str, TensorSpec] = expected_tensors(self.config)
        except ValueError as e:
            raise CheckpointError(f"{cfg_file}: {e}") from e
        self._fp8_of_scale = {s.scale_name: s for s in self.specs.values() if s.kind == "fp8"} if self.quantized \
            else {}
        self._nvfp4_of_scale = {s.scale_name: s for s in self.specs.values() if s.kind == "nvfp4"}
        self._table_of_scale = {s.scale_name: s for s in self.specs.values() if s.kind == "fp8_rows"}
        self.reads: list[str] = []   # every tensor name whose data was read (get_tensor), in order

    # -- raw access ------------------------------------------------------------------------------------
    def _file_of(self, name: str, wanted_by: str) -> Path:
        try:
            return self.path / self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"{self.path / 'model.safetensors.index.json'}: tensor {name!r} "
                                  f"(needed for {wanted_by!r}) is not in the weight_map") from None

    def raw(self, name: str, *, dtypes=None, shape=None, wanted_by: str | None = None) -> torch.Tensor:
        """Read one stored tensor after checking its dtype / shape from the shard header."""
        f = self._file_of(name, wanted_by or name)
        if not f.is_file():
            raise CheckpointError(f"{f}: shard missing (tensor {name!r})")
        try:
            with safe_open(str(f), framework="pt") as sf:
                if name not in sf.keys():
                    raise CheckpointError(f"{f}: tensor {name!r} listed in the index but absent from the shard")
                sl = sf.get_slice(name)
                dt = _SAFE_DTYPES.get(sl.get_dtype())
                shp = tuple(sl.get_shape())
                if dtypes is not None and dt not in dtypes:
                    raise CheckpointError(f"{f}: tensor {name!r} has dtype {sl.get_dtype()} ({dt}); expected one "
                                          f"of {[str(d) for d in dtypes]}")
                if shape is not None and not _shape_ok(shp, shape):
                    raise self._shape_error(f, name, shp, shape)
                self.reads.append(name)
                return sf.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' own errors (truncated file, bad header, ...)
            raise CheckpointError(f"{f}: cannot read tensor {name!r}: {type(e).__name__}: {e}") from e

    # -- WeightSource ----------------------------------------------------------------------------------
    def spec(self, name: str) -> TensorSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: {name!r} is not a tensor of the DSV4 layout for this config") from None

    def get(self, name: str) -> torch.Tensor:
        """Dequantised float32 value (int64 for tid2eid) of the logical tensor ``name``; a golden Engram name
        (``layers.{l}.engram.table`` / ``table_scale``: uint8 bytes; ``wkv`` / ``q_weight`` / ``k_weight``) is read
        from the checkpoint tensor it stands for (``layout.ENGRAM_GOLDEN_NAMES``)."""
        alias = self._golden_alias(name)
        if alias is not None:
            target, part = alias
            if part == "value":
                return self.get(target)
            spec = self.spec(target)
            _, got = self._read(spec)   # checked (table_bytes) by the decode in _read
            codes, sb = table_bytes(spec, got[spec.name], got[spec.scale_name])
            return codes if part == "codes" else sb
        return self._decode(self.spec(name))

    def _golden_alias(self, name: str):
        """``layers.{l}.<golden engram key>`` of an Engram layer -> (checkpoint name, part); else None."""
        if name in self.specs:
            return None
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in ENGRAM_GOLDEN_NAMES:
            target, part = ENGRAM_GOLDEN_NAMES[parts[2]]
            full = f"layers.{parts[1]}.{target}"
            if full in self.specs:
                return full, part
        return None

    def _stored(self, spec: TensorSpec) -> list[tuple[str, tuple, tuple]]:
        """What ``spec`` is stored as: [(stored name, accepted dtypes, stored shape)], the weight first and
        its block scale second (quantised kinds of a quantised checkpoint)."""
        name = spec.name
        quant = spec.kind in ("fp8", "fp4") and self.quantized
        if quant and spec.kind == "fp8":
            return [(name, _FP8_DTYPES, spec.stored_shape), (spec.scale_name, _SCALE_DTYPES, spec.scale_shape)]
        if quant and spec.kind == "fp4":
            return [(name, _FP4_DTYPES, spec.stored_shape),
                    (spec.scale_name, (torch.float8_e8m0fnu, torch.uint8), spec.scale_shape)]
        if spec.kind == "nvfp4" and self.quantized:
            n = spec.nvfp4_names()
            return [(name, (torch.uint8,), spec.stored_shape),
                    (n["weight_scale"], (torch.float8_e4m3fn, torch.uint8), spec.scale_shape),
                    (n["weight_scale_2"], (torch.float32,), _SCALAR), (n["input_scale"], (torch.float32,), _SCALAR)]
        if spec.kind == "fp8_rows":   # FP8 bytes whatever the checkpoint's quantisation (layout.py)
            return [(name, _FP8_DTYPES, spec.shape),
                    (spec.scale_name, (torch.float8_e8m0fnu, torch.uint8), spec.scale_shape)]
        if spec.kind == "int":
            return [(name, (torch.int64, torch.int32), spec.shape)]
        if spec.kind == "fp32":
            return [(name, (torch.float32,), spec.shape)]
        return [(name, _FLOAT_DTYPES, spec.shape)]

    def _decode(self, spec: TensorSpec) -> torch.Tensor:
        return self._read(spec)[0]

    def _read(self, spec: TensorSpec):
        """-> (decoded value, stored tensors {stored name: tensor})."""
        name = spec.name
        parts = self._stored(spec)
        got = {n: self.raw(n, dtypes=dt, shape=shp, wanted_by=name) for n, dt, shp in parts}
        w = got[name]
        s = got[parts[1][0]] if len(parts) > 1 else None
        extra = {k: got[f"{spec.stem}.{k}"] for k in ("weight_scale_2", "input_scale")} \
            if spec.kind == "nvfp4" and len(parts) > 1 else None
        try:
            return decode(spec, w, s, extra), got
        except ValueError as e:
            raise CheckpointError(f"{self._file_of(name, name)}: tensor {name!r}: {e}") from e

    def nvfp4(self, name: str) -> dict[str, torch.Tensor]:
        """An NVFP4 expert weight's stored pieces, checked: {"weight": packed uint8 [out, in/2], "weight_scale": E4M3
        bytes uint8 [out, in/16], "weight_scale_2": fp32 scalar, "input_scale": fp32 scalar}."""
        spec = self.spec(name)
        if spec.kind != "nvfp4" or not self.quantized:
            raise CheckpointError(f"{self.path}: {name!r} is not an NVFP4 tensor of this checkpoint (kind {spec.kind})")
        _, got = self._read(spec)
        n = spec.nvfp4_names()
        return {"weight": got[name], "weight_scale": got[n["weight_scale"]].view(torch.uint8),
                "weight_scale_2": got[n["weight_scale_2"]].reshape(()),
                "input_scale": got[n["input_scale"]].reshape(())}

    def check(self) -> int:
        """Check every tensor the config implies from the shard headers alone (no tensor data is read, so it
        is cheap on a full-size checkpoint): listed in the index, shard present and complete, tensor
        present, dtype and shape as the layout says. Raises ``CheckpointError`` naming file and tensor for
        the first problem (and how many more there are); returns the number of stored tensors checked."""
        headers: dict[str, dict] = {}
        problems: list[str] = []
        problems_seen: dict = {}
        for spec in self.specs.values():
            for name, dtypes, shape in self._stored(spec):
                try:
                    f = self._file_of(name, spec.name)
                    if f.name not in headers:
                        try:
                            headers[f.name] = self._header(f, name)
                        except CheckpointError as e:
                            headers[f.name] = e
                    h = headers[f.name]
                    if isinstance(h, CheckpointError):
                        if h is problems_seen.get(f.name):
                            continue
                        problems_seen[f.name] = h
                        raise h
                    if name not in h:
                        raise CheckpointError(f"{f}: tensor {name!r} listed in the index but absent from the shard")
                    dt_s, shp = h[name]
                    dt = _SAFE_DTYPES.get(dt_s)
                    if dt not in dtypes:
                        raise CheckpointError(f"{f}: tensor {name!r} has dtype {dt_s} ({dt}); expected one of "
                                              f"{[str(d) for d in dtypes]}")
                    if not _shape_ok(tuple(shp), shape):
                        raise self._shape_error(f, name, tuple(shp), shape)
                except CheckpointError as e:
                    problems.append(str(e))
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise CheckpointError(problems[0] + more)
        return sum(len(self._stored(s)) for s in self.specs.values())

    def _shape_error(self, f: Path, name: str, shp: tuple, want: tuple) -> CheckpointError:
        """A stored shape that differs from the layout's; for the block scale of an FP8 weight, the diagnosis
        names the block the weight / scale shapes imply and the config's block."""
        tb = self._table_of_scale.get(name)
        if tb is not None and len(shp) == 2 and tuple(shp[:1]) == tb.shape[:1] and shp[1] and \
                tb.shape[1] % shp[1] == 0:
            return CheckpointError(f"{f}: tensor {name!r} (UE8M0 scales of the Engram table {tb.name!r}) has shape "
                                   f"{tuple(shp)}: one scale per {tb.shape[1] // shp[1]} values; the table has one "
                                   f"per {ENGRAM_TABLE_BLOCK} (expects {tuple(want)})")
        nv = self._nvfp4_of_scale.get(name)
        if nv is not None and len(shp) == 2 and tuple(shp[:1]) == nv.shape[:1] and shp[1] and \
                nv.shape[1] % shp[1] == 0:
            return CheckpointError(f"{f}: tensor {name!r} (E4M3 block scales of {nv.name!r}) has shape {tuple(shp)}: "
                                   f"one scale per {nv.shape[1] // shp[1]} values; NVFP4 has one per 16 "
                                   f"(expects {tuple(want)})")
        spec = self._fp8_of_scale.get(name)
        bad = block_mismatch(spec.shape, shp, spec.block) if spec is not None and len(shp) == 2 else None
        if bad is not None:
            return CheckpointError(f"{f}: tensor {name!r} (block scale of {spec.name!r}): {bad}")
        want_s = " or ".join(str(tuple(w)) for w in want) if isinstance(want, list) else str(tuple(want))
        return CheckpointError(f"{f}: tensor {name!r} has shape {tuple(shp)}; the config implies {want_s}")

    def _header(self, f: Path, name: str) -> dict:
        """{tensor: (safetensors dtype string, shape)} of one shard, from its header (validated against the
        file size by safetensors: a truncated shard is refused here)."""
        if not f.is_file():
            raise CheckpointError(f"{f}: shard missing (tensor {name!r})")
        try:
            with safe_open(str(f), framework="pt") as sf:
                return {k: (sf.get_slice(k).get_dtype(), tuple(sf.get_slice(k).get_shape())) for k in sf.keys()}
        except Exception as e:  # safetensors' own errors (truncated file, bad header, ...)
            raise CheckpointError(f"{f}: cannot read the shard header (tensor {name!r}): {type(e).__name__}: {e}") \
                from e

    def layer(self, layer: int, *, experts: bool = True) -> dict[str, torch.Tensor]:
        """One decoder block (main or MTP) keyed relative to the layer, ``.weight`` dropped (DESIGN.md)."""
        p = layer_prefix(self.config, layer)
        out = {}
        for t in layer_tensors(self.config, layer):
            if not experts and t.name.startswith("ffn.experts."):
                continue
            out[relative_key(t.name)] = self.get(p + t.name)
        return out

    def __contains__(self, name: str) -> bool:
        return name in self.specs or self._golden_alias(name) is not None
