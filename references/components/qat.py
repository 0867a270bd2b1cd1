"""Quantisation-simulation points of the attention side (spec 4.2-4.4), driven by a ``Numerics``.

Each helper is the identity when its ``Numerics`` field is ``None`` (``GOLDEN``), so goldens simulate
nothing. Quantisers follow the formats package: compute from the unquantised value, round once.
"""

from __future__ import annotations

import torch

from ..formats.blockscale import BlockFP8, fake_quant_fp8, fake_quant_mxfp4
from ..numerics import Numerics
from ._checks import compute_dtype


def linear(x: torch.Tensor, weight: torch.Tensor, numerics: Numerics, *, fp8: bool = True) -> torch.Tensor:
    """``x @ weight.T`` in the compute dtype of ``x``.

    ``fp8=True`` marks an FP8 linear of the checkpoint (spec 4.4: wq_a, wq_b, wkv, wo_b, indexer.wq_b):
    its input goes through ``numerics.linear_act`` (block (1, 128) FP8, OFF ``act_quant``) first.
    bf16 / fp32 linears (wo_a, weights_proj, compressor wkv / wgate) pass ``fp8=False``.
    """
    dt = compute_dtype(x)
    x = x.to(dt)
    if fp8 and numerics.linear_act is not None:
        x = fake_quant_fp8(x.reshape(-1, x.shape[-1]), numerics.linear_act).reshape(x.shape)
    return x @ weight.to(dt).T


def quant_kv_nope(kv: torch.Tensor, nope_dim: int, numerics: Numerics) -> torch.Tensor:
    """FP8 quantise-dequantise of the nope dims [0, nope_dim) (block (1, 64), ue8m0 in OFF); rope dims
    are left alone (they stay bf16 in every cache layout)."""
    if numerics.kv_nope is None:
        return kv
    nope = kv[..., :nope_dim]
    q = fake_quant_fp8(nope.reshape(-1, nope_dim), numerics.kv_nope).reshape(nope.shape).to(kv.dtype)
    return torch.cat((q, kv[..., nope_dim:]), dim=-1)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform over the last dim (Sylvester / natural order, scale n^-1/2),
    the ``rotate_activation`` of OFF. It is symmetric and orthogonal, hence its own inverse."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"x: Hadamard needs a power-of-two last dim, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2).view(-1, n)
        h *= 2
    return (y * n**-0.5).view(*lead, n)


def quant_indexer(x: torch.Tensor, spec, use_hadamard: bool) -> torch.Tensor:
    """Indexer q / K simulation. OFF (``official()``): Hadamard, then MXFP4 (e2m1, block 32, ue8m0);
    the result stays in the rotated basis (q.k is invariant because the rotation is orthonormal).
    vLLM (``serving()``): one FP8 block per 128-vector, power-of-two scale, no Hadamard."""
    if use_hadamard:
        x = hadamard(x)
    if spec is None:
        return x
    if spec == "fp4":
        return fake_quant_mxfp4(x)
    if isinstance(spec, BlockFP8):
        d = x.shape[-1]
        return fake_quant_fp8(x.reshape(-1, d), spec).reshape(x.shape).to(x.dtype)
    raise ValueError(f"numerics: unknown indexer quantisation {spec!r} (None, 'fp4' or a BlockFP8)")
