"""Run vLLM's Triton kernels on the CPU under Triton's interpreter, with its rounding defects corrected.

Three things, in this order (``install()`` does them; it must run before ``triton`` and ``vllm`` are
imported anywhere in the process):

1. ``TRITON_INTERPRET=1`` (``triton.jit`` decides at decoration time).
2. A stand-in backend in ``triton.backends.backends`` whose driver reports active: vLLM's
   ``vllm/triton_utils/importing.py`` disables Triton on a CPU build unless a "cpu" backend exists (and
   on a CUDA/ROCm build unless exactly one backend is active), so its kernels would not even import.
3. Fixes for defects of the interpreter (measured on triton 3.9.0; see ``self_check``):
   (i)   narrowing float casts (fp32 -> bf16 truncates; fp32 -> fp8 loses the carry across a binade,
         rounds ties away from even, flushes subnormals, overflows to 256): routed through torch's casts;
   (ii)  ``tl.dot`` with bf16 operands multiplies the raw uint16 bit patterns: operands widened to fp32;
   (iii) bf16 element-wise ops (binary, unary, ternary/fma, abs, comparisons) run on the raw bits:
         widened to fp32 and rounded back to bf16 (round to nearest even);
   (iv)  a scalar i1 mask broadcast to a block reaches the C++ load/store as an int32 array ("mask has
         unsupported dtype", e.g. vLLM's _cp_gather_indexer_quant_cache_kernel): cast to bool, which is
         what an i1 mask means.

``self_check()`` measures the casts, a bf16 dot and bf16 element-wise ops against torch on a few thousand
values and returns the defects it still sees; the vllm-triton subject refuses to run when it sees any,
so an uncorrected interpreter never produces false failures.
"""

from __future__ import annotations

import os
import sys

FIXES = ("narrowing-float-casts", "bf16-dot", "bf16-elementwise", "int-mask")
_STATE = {"installed": False, "fixes_on": False}


class _StandInDriver:
    """Only needs to look active: the interpreter never calls into a driver to launch."""

    @staticmethod
    def is_active():
        return True

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cpu", 0, 0)

    def get_current_device(self):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def install(fixes: bool = True) -> None:
    """Interpreter mode + stand-in backend (+ the rounding fixes). Idempotent."""
    if not _STATE["installed"]:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set; the interpreter "
                               "cannot be enabled in this process")
        if "vllm" in sys.modules and "vllm.triton_utils" in sys.modules:
            from vllm.triton_utils import HAS_TRITON

            if not HAS_TRITON:
                raise RuntimeError("vllm was imported before the Triton stand-in backend was registered "
                                   "(vLLM disabled Triton for this process)")
        os.environ["TRITON_INTERPRET"] = "1"
        from triton.backends import Backend, backends

        if "cpu" not in backends:
            backends["cpu"] = Backend(compiler=None, driver=_StandInDriver)
        _STATE["installed"] = True
    set_fixes(fixes)


def _interp():
    import triton.runtime.interpreter as interp

    return interp


_ORIG: dict = {}
_NEW: dict = {}
_BUILDER = ("create_dot", "binary_op", "unary_op", "ternary_op", "create_fabs", "create_masked_load",
            "create_masked_store")


def _build():
    if _NEW:
        return
    import numpy as np
    import torch
    import triton.language as tl

    interp = _interp()
    IB = interp.InterpreterBuilder
    _ORIG["_convert_float"] = interp._convert_float
    for n in _BUILDER:
        _ORIG[n] = getattr(IB, n)

    tt2torch = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                "fp8e4nv": torch.float8_e4m3fn, "fp8e4b8": torch.float8_e4m3fnuz,
                "fp8e5": torch.float8_e5m2, "fp8e5b16": torch.float8_e5m2fnuz}
    ints = {8: (np.int8, torch.int8), 16: (np.int16, torch.int16), 32: (np.int32, torch.int32),
            64: (np.int64, torch.int64)}
    orig_convert = _ORIG["_convert_float"]

    def convert_float(input, input_dtype, output_dtype, rounding_mode):
        src, dst = tt2torch.get(input_dtype.name), tt2torch.get(output_dtype.name)
        narrowing = input_dtype.primitive_bitwidth > output_dtype.primitive_bitwidth
        if not narrowing or src is None or dst is None or rounding_mode == interp._ir.ROUNDING_MODE.RTZ:
            return orig_convert(input, input_dtype, output_dtype, rounding_mode)
        ib, ob = input_dtype.primitive_bitwidth, output_dtype.primitive_bitwidth
        arr = np.ascontiguousarray(input).view(ints[ib][0])
        t = torch.from_numpy(arr).view(src)
        if dst in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):  # saturate like the hardware, not NaN
            fmax = torch.finfo(dst).max
            t = torch.where(torch.isnan(t), t, t.float().clamp(-fmax, fmax).to(src)) if src != torch.float32 \
                else torch.where(torch.isnan(t), t, t.clamp(-fmax, fmax))
        out = t.to(dst).view(ints[ob][1])
        return out.numpy().view(getattr(np, f"uint{ob}")).reshape(np.shape(input))

    def is_bf16(h):
        return getattr(getattr(h, "dtype", None), "name", None) == "bf16"

    def widen(h):
        if isinstance(h, interp.TensorHandle) and is_bf16(h):
            return interp.TensorHandle((np.asarray(h.data).astype(np.uint32) << 16).view(np.float32),
                                       tl.float32)
        return h

    def narrow(h):
        t = torch.from_numpy(np.ascontiguousarray(h.data, dtype=np.float32)).to(torch.bfloat16)
        return interp.TensorHandle(t.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)

    def create_dot(self, a, b, d, *args):
        return _ORIG["create_dot"](self, widen(a), widen(b), d, *args)

    def wrap(name):
        orig = _ORIG[name]

        def f(self, *args):
            hs = [a for a in args if isinstance(a, interp.TensorHandle)]
            if not any(is_bf16(h) for h in hs):
                return orig(self, *args)
            out = orig(self, *[widen(a) for a in args])
            ref = hs[-1] if name == "ternary_op" else hs[0]
            if isinstance(out, interp.TensorHandle) and out.data.dtype == np.float32 and is_bf16(ref):
                return narrow(out)
            return out
        return f

    def as_bool(m):
        if isinstance(m, interp.TensorHandle) and np.asarray(m.data).dtype != np.bool_:
            return interp.TensorHandle(np.asarray(m.data) != 0, tl.int1)
        return m

    def masked_load(self, ptrs, mask, *args):
        return _ORIG["create_masked_load"](self, ptrs, as_bool(mask), *args)

    def masked_store(self, ptrs, value, mask, *args):
        return _ORIG["create_masked_store"](self, ptrs, value, as_bool(mask), *args)

    _NEW["create_masked_load"] = masked_load
    _NEW["create_masked_store"] = masked_store
    _NEW["_convert_float"] = convert_float
    _NEW["create_dot"] = create_dot
    for n in ("binary_op", "unary_op", "ternary_op", "create_fabs"):
        _NEW[n] = wrap(n)


def set_fixes(on: bool) -> None:
    _build()
    interp = _interp()
    src = _NEW if on else _ORIG
    interp._convert_float = src["_convert_float"]
    for n in _BUILDER:
        setattr(interp.InterpreterBuilder, n, src[n])
    _STATE["fixes_on"] = on


def fixes_on() -> bool:
    return _STATE["fixes_on"]


_KERNELS: dict = {}


def _kernels():
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def cast_kernel(x_ptr, o8_ptr, o8z_ptr, obf_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        x = tl.load(x_ptr + offs)
        tl.store(o8_ptr + offs, x.to(tl.float8e4nv).to(tl.uint8, bitcast=True))
        tl.store(o8z_ptr + offs, x.to(tl.float8e4b8).to(tl.uint8, bitcast=True))
        tl.store(obf_ptr + offs, x.to(tl.bfloat16))

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, d_ptr, N: tl.constexpr):
        o = tl.arange(0, N)
        a = tl.load(a_ptr + o[:, None] * N + o[None, :])
        b = tl.load(b_ptr + o[:, None] * N + o[None, :])
        tl.store(d_ptr + o[:, None] * N + o[None, :], tl.dot(a, b))

    @triton.jit
    def ew_kernel(a_ptr, b_ptr, m_ptr, w_ptr, N: tl.constexpr):
        o = tl.arange(0, N)
        a = tl.load(a_ptr + o)
        b = tl.load(b_ptr + o)
        tl.store(m_ptr + o, a * b)
        tl.store(w_ptr + o, tl.where(a > b, a, b))

    _KERNELS.update(cast=cast_kernel, dot=dot_kernel, ew=ew_kernel)
    return _KERNELS


def self_check() -> dict:
    """Measure the interpreter against torch; returns {check: number of wrong values} (all 0 = trusted)."""
    import torch

    k = _kernels()
    g = torch.Generator().manual_seed(1)
    special = torch.tensor([1.9908, 1.99, 3.9, 0.9999, 1.0625, 1.1875, 0.001, 2.0 ** -8, 2.0 ** -9, 2.0 ** -10,
                            0.0029, 448.0, 239.0, -1.9908, 2.0 ** -7 * 1.5, 2.0 ** -133])
    x = torch.cat([special, torch.randn(3072 - special.numel(), generator=g) * 30,
                   torch.exp2(torch.rand(1024, generator=g) * 24 - 16)]).float().contiguous()
    n = x.numel()
    o8 = torch.empty(n, dtype=torch.uint8)
    o8z = torch.empty(n, dtype=torch.uint8)
    obf = torch.empty(n, dtype=torch.bfloat16)
    k["cast"][(1,)](x, o8, o8z, obf, N=n)
    in_fn, in_fnuz = x.abs() <= 448, x.abs() <= 240
    bad = {
        "fp32->float8_e4m3fn": int((o8 != x.to(torch.float8_e4m3fn).view(torch.uint8))[in_fn].sum()),
        "fp32->float8_e4m3fnuz": int((o8z != x.to(torch.float8_e4m3fnuz).view(torch.uint8))[in_fnuz].sum()),
        "fp32->bfloat16": int((obf.view(torch.int16) != x.to(torch.bfloat16).view(torch.int16)).sum()),
    }
    g = torch.Generator().manual_seed(2)
    a = torch.randn(16, 16, generator=g).bfloat16()
    b = torch.randn(16, 16, generator=g).bfloat16()
    d = torch.empty(16, 16)
    k["dot"][(1,)](a, b, d, N=16)
    bad["tl.dot(bf16, bf16)"] = int(((d - a.float() @ b.float()).abs() > 1e-4).sum())
    a = torch.randn(256, generator=g).bfloat16()
    b = torch.randn(256, generator=g).bfloat16()
    m = torch.empty(256, dtype=torch.bfloat16)
    w = torch.empty(256, dtype=torch.bfloat16)
    k["ew"][(1,)](a, b, m, w, N=256)
    bad["bf16 a*b"] = int((m != a * b).sum())
    bad["bf16 where(a>b)"] = int((w != torch.maximum(a, b)).sum())
    return bad


def describe(bad: dict) -> str:
    return ", ".join(f"{k}: {v} wrong" for k, v in bad.items() if v)
