"""Where a DSV4 forward rounds or quantises: the explicit simulation points (spec 4.4, 4.5, section 8).

``GOLDEN`` simulates nothing (pure fp32/fp64 math from unquantised inputs). ``official()`` is the model as
DeepSeek's current reference code runs it (QAT simulation points of spec 4.4). ``serving(profile)`` is a
numerics model of the vLLM serving path for a platform profile, used by the ``emulated:<profile>``
subject: bf16 activations between ops, block-FP8 linear activations, FP8 KV cache in the platform's
dialect, the indexer's FP8 q/K, MXFP4 experts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .formats.blockscale import BlockFP8


@dataclass(frozen=True)
class Numerics:
    name: str = "golden"
    # dtype activations are rounded to between ops (None = never round)
    act_dtype: torch.dtype | None = None
    # FP8 quantise-dequantise of every FP8-linear input (block (1,128))
    linear_act: BlockFP8 | None = None
    # FP8 quantise-dequantise of the KV nope part (SWA and compressed attention cache, block (1,64))
    kv_nope: BlockFP8 | None = None
    # indexer q / compressed indexer K: "fp4" (official: Hadamard + MXFP4 block 32), a BlockFP8 (vLLM:
    # one FP8 block per 128-vector), or None
    indexer_q: object = None
    indexer_k: object = None
    indexer_hadamard: bool = False
    # attention probabilities rounded before P.V (official: bf16)
    attn_probs_dtype: torch.dtype | None = None
    # expert weights as stored (dequantised MXFP4 / FP8) versus the unquantised originals: the golden uses
    # whatever weights it is given, so this flag only documents intent
    dialect: str = "none"
    # V4.1: the compressed KV cache's nope record where it differs from the sliding-window one (None: kv_nope)
    kv_nope_compressed: BlockFP8 | None = None

    @property
    def simulates_anything(self) -> bool:
        return any(v is not None and v is not False for k, v in vars(self).items()
                   if k not in ("name", "dialect"))


GOLDEN = Numerics()


def official() -> Numerics:
    """DeepSeek's current official inference code (act_quant really rounds to FP8; spec section 0)."""
    return Numerics(
        name="official",
        act_dtype=torch.bfloat16,
        linear_act=BlockFP8.of("ocp", (1, 128)),
        kv_nope=BlockFP8.of("ocp", (1, 64)),
        indexer_q="fp4",
        indexer_k="fp4",
        indexer_hadamard=True,
        attn_probs_dtype=torch.bfloat16,
        dialect="float8_e4m3fn",
    )


# Serving profiles: the FP8 dialect and the fmax each vLLM path uses on that platform.
PROFILES = {
    # MI300X / MI325X: e4m3fnuz; Triton cache writers use finfo(fnuz).max = 240; the indexer-q kernel's
    # USE_FNUZ branch uses 224 (spec 3.8 / notes). Block-FP8 activations use 224: every ROCm FP8 linear
    # quantises its input with per_token_group_quant_fp8 (the compiled op or its Triton twin), whose bounds are
    # quant_utils.get_fp8_min_max() = (-224, 224) on an fnuz platform (vLLM 0.32.0; "240 causes accuracy
    # issues"), not finfo's 240. Found by vllm:sim-gfx942 driving TritonFp8BlockScaledMMKernel.
    "gfx942": dict(dialect="float8_e4m3fnuz", fmax=240.0, indexer_q_fmax=224.0, linear_act_fmax=224.0),
    # OCP everywhere else (CUDA, gfx950, CPU)
    "ocp": dict(dialect="float8_e4m3fn", fmax=448.0, indexer_q_fmax=448.0, linear_act_fmax=448.0),
}


def serving(profile: str) -> Numerics:
    try:
        p = PROFILES[profile]
    except KeyError:
        raise KeyError(f"unknown serving profile {profile!r}; known: {sorted(PROFILES)}") from None
    d, fmax = p["dialect"], p["fmax"]
    return Numerics(
        name=f"serving:{profile}",
        act_dtype=torch.bfloat16,
        linear_act=BlockFP8.of(d, (1, 128), fmax=p["linear_act_fmax"], scale_fmt="fp32", amax_floor=1e-10),
        kv_nope=BlockFP8.of(d, (1, 64), fmax=fmax),
        indexer_q=BlockFP8.of(d, (1, 128), fmax=p["indexer_q_fmax"]),
        indexer_k=BlockFP8.of(d, (1, 128), fmax=fmax),
        indexer_hadamard=False,
        attn_probs_dtype=None,
        dialect=d,
    )


# V4.1 MXFP8 activation quantiser (vLLM 0.32.0 model_executor/layers/quantization/utils/mxfp8_utils.py:19-47):
# groups of 32 along K, scale 2^clamp(ceil(log2(amax / 448)), -127, 127) (E8M0), amax floored at fp32 tiny, e4m3fn.
MXFP8_ACT = BlockFP8.of("float8_e4m3fn", (1, 32), fmax=448.0, scale_fmt="ue8m0", amax_floor=2.0 ** -126)
# V4.1's compressed-cache writer (models/deepseek_v41/common/ops/fused_compress_quant_cache.py:304-350): 448 nope dims
# in 7 blocks of 64, 2^ceil(log2(max(amax, 1e-4) / 448)), tl.float8e4nv (OCP e4m3fn) on every platform
V41_KV_NOPE_COMPRESSED = BlockFP8.of("float8_e4m3fn", (1, 64), fmax=448.0, scale_fmt="ue8m0", amax_floor=1e-4)


def serving_v41(profile: str) -> Numerics:
    """The V4.1 serving rounding model of a platform profile (docs/v41-serving-numerics.md lists every point with
    its vLLM 0.32.0 file:line). What differs from ``serving(profile)``:

    * linear inputs: the V4.1 checkpoint's dense FP8 linears have 32x32 UE8M0 weight blocks and are served as MXFP8
      (``models/deepseek_v41/quant_config.py:221-243``: ``kMxfp8Static`` weights, ``kMxfp8Dynamic`` activations,
      1x32 groups). ``ocp``: the native MX kernels quantise the activation (gfx950 ``kernels/linear/mxfp8/
      rocm_native.py:85-92``, SM100 ``flashinfer.py:283``): ``MXFP8_ACT``. ``gfx942``: no MX hardware, so ROCm
      falls back to ``EmulationMxfp8LinearKernel`` (``kernels/linear/__init__.py:563-570``, ``rocm_native.py:
      229-238``), which dequantises the weight to bf16 once and runs a bf16 linear (``mxfp8/emulation.py:29-65``):
      no activation quantisation (linear_act None).
    * compressed KV cache: e4m3fn at 448 in 64-blocks on every platform (``V41_KV_NOPE_COMPRESSED``); the
      sliding-window record is V4's (``models/deepseek_v41/attention.py:122-129``: every arch but SM100 keeps the
      584-byte record, written by the V4 op ``fused_deepseek_v4_kv_rope_insert``, ``attention.py:697-711``), so
      ``kv_nope`` stays the profile's.
    * index keys: bf16 chain from the bf16 latent, then one FP8 block of 128 with a power-of-two scale
      (``common/ops/indexer_k_store.py:150-253``): the profile's indexer-K convention (ocp e4m3fn 448, gfx942
      e4m3fnuz 224, as ``conformance/cases/indexer_v41.py`` models it).
    * indexer q: as V4 (``model_executor/layers/sparse_attn_indexer.py:245-282``: the platform's fp8 dtype at
      ``get_fp8_min_max()``).
    """
    base = serving(profile)
    return replace(
        base, name=f"serving-v41:{profile}",
        linear_act=None if profile == "gfx942" else MXFP8_ACT,
        kv_nope_compressed=V41_KV_NOPE_COMPRESSED,
        indexer_k=BlockFP8.of(base.dialect, (1, 128), fmax=224.0 if profile == "gfx942" else 448.0))
