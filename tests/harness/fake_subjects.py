"""Deliberately broken subjects (mutants) used by the harness's own tests."""

import numpy as np
import torch

from conformance.subjects import Impl, Subject, SubjectInfo
from references.formats.blockscale import BlockFP8, dequantize_fp8, quantize_fp8
from references.formats.minifloat import FNUZ, OCP


class _ActQuantMutant(Subject):
    def __init__(self, name, fn):
        self.name, self._fn = name, fn

    def info(self):
        # the implementation string carries markup, to prove the report escapes it
        return SubjectInfo(self.name, "mutant <script>alert(1)</script>", "cpu", "float8_e4m3fnuz", False,
                           profile="gfx942")

    def provides(self):
        return {"quant.act_fp8": Impl(self._fn, function=f"tests.fake.{self.name}", backend="torch")}


def _spec(fmax=224.0):
    # 224: the fnuz activation bound vLLM passes its quantisers (quant_utils.get_fp8_min_max), as the profile
    return BlockFP8.of("fnuz", (1, 128), fmax=fmax, scale_fmt="fp32", amax_floor=1e-10)


def _out(codes, scales, spec):
    return {"dequant": dequantize_fp8(codes, scales, spec), "codes": codes, "scales": scales}


def truncating_gfx942():
    spec = _spec()

    def fn(x, group=128):
        x = x.to(torch.bfloat16).float()
        codes, scales = quantize_fp8(x, spec)
        s = scales.numpy().astype(np.float64).repeat(128, -1)
        y = np.clip((x.numpy() / s.astype(np.float32)).astype(np.float64), -224, 224)   # fp32 quotient
        # truncate toward zero: largest magnitude code not above |y|
        vals = FNUZ.table.copy()
        vals[np.isnan(vals)] = np.inf
        order = np.argsort(vals)
        pos = order[(vals[order] >= 0) & np.isfinite(vals[order])]
        idx = np.searchsorted(vals[pos], np.abs(y), side="right") - 1
        c = pos[idx].astype(np.uint8)
        c = np.where((y < 0) & (vals[c] != 0), c | 0x80, c).astype(np.uint8)
        codes = torch.from_numpy(c)
        return _out(codes, scales, spec)
    return _ActQuantMutant("truncating_gfx942", fn)


def fmax448_gfx942():
    """The OCP bound in the scale (amax / 448) under the fnuz profile: the quotients reach 448 and saturate at
    fnuz's 224, so every group's largest values are clipped."""
    spec = _spec()

    def fn(x, group=128):
        x = x.to(torch.bfloat16).float()
        g = x.reshape(*x.shape[:-1], -1, 128)
        s = g.abs().amax(-1, keepdim=True).clamp_min(1e-10) / 448.0
        y = (g / s).clamp(-224.0, 224.0).reshape(x.shape)
        codes = torch.from_numpy(FNUZ.encode(y.double().numpy(), saturate=True))
        return _out(codes, s.squeeze(-1).float(), spec)
    return _ActQuantMutant("fmax448_gfx942", fn)


def ocp_bytes_on_gfx942():
    ocp = BlockFP8.of("ocp", (1, 128), fmax=448.0, scale_fmt="fp32", amax_floor=1e-10)

    def fn(x, group=128):
        codes, scales = quantize_fp8(x.to(torch.bfloat16).float(), ocp)
        return {"dequant": dequantize_fp8(codes, scales, ocp), "codes": codes, "scales": scales}
    return _ActQuantMutant("ocp_bytes_on_gfx942", fn)


def doubled_gfx942():
    """fnuz bytes decoded as OCP: every value x2."""
    spec = _spec()
    ocp_read = BlockFP8(OCP, 224.0, (1, 128), "fp32", 1e-10)

    def fn(x, group=128):
        codes, scales = quantize_fp8(x.to(torch.bfloat16).float(), spec)
        return {"dequant": dequantize_fp8(codes, scales, ocp_read), "codes": codes, "scales": scales}
    return _ActQuantMutant("doubled_gfx942", fn)
