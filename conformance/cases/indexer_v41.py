"""DeepSeek-V4.1 lightning-indexer changes (``references.components.indexer_v41``; provenance there):

* ``indexer.k_latent``: index keys from the main compressor's latent, ``RoPE(k_norm(wk latent))`` at the group's
  first position, as the logits read them (FP8 codes x power-of-two fp32 scale in the serving numerics);
* ``indexer.topk_two_level``: the candidate source layer's block selection and a later index source's top-k
  restricted to those blocks, compared as multisets with tie handling.

Serving numerics of ``indexer.k_latent`` (``emulate(profile)``), read from vLLM 0.32.0's
``models/deepseek_v41/common/ops/indexer_k_store.py:150-253`` and ``attention.py:1405-1437``: latent, wk and k_norm
in bf16 (the latent is the compressor's bf16 output, wk a bf16 checkpoint tensor); ``k_pre = bf16(latent wk^T)``
(fp32 accumulation, ReplicatedLinear's bf16 output); k_norm in fp32, rounded to bf16; RoPE in fp32, rounded to bf16;
one FP8 block of 128 with scale 2^ceil(log2(max(amax, 1e-4) / fmax)) stored as fp32, e4m3 saturating, round to
nearest even. ``ocp``: float8_e4m3fn, fmax 448 (the kernel's ``FP8_MAX=448.0`` / ``tl.float8e4nv`` on every
platform). ``gfx942``: float8_e4m3fnuz with fmax 224, the bytes a gfx942 reader can decode (vLLM's ROCm FP8
indexer-K convention, ``indexer_cache.K_FMAX``); vLLM 0.32.0's V4.1 writer has no fnuz branch (divergence below).

Bounds of ``indexer.k_latent`` are derived per element from the inputs (``_k_bound``: the bf16 / fp32 rounding
chain GEMM -> k_norm -> RoPE, the fp32 RoPE phase, then one e4m3 rounding); at the emulated level an element must
match exactly unless the chain's error can move it across an e4m3 rounding boundary (then one e4m3 ulp).
"""

from __future__ import annotations

from collections import Counter

import torch

from references.components.indexer_v41 import (
    TWO_LEVEL_VARIANTS,
    candidate_block_scores,
    group_positions,
    indexer_k_latent,
    indexer_topk_two_level,
    selection_keys,
    topk_in_candidates,
)
from references.components.norms import rms_norm
from references.components.rope import apply_rope, layer_inv_freq
from references.config import TINY_V41, V41_FLASH_FACTS
from references.formats import cache_layouts as cl
from references.formats.minifloat import get_format

from ..components import ComponentSpec, OutputSpec, register
from ..metrics import Comparison, compare_float
from ..tolerances import Tolerance, gamma_prob
from ._case import Case, add, dist_tensor
from .indexer_cache import K_FMAX

U32, UB, E4M3_HALF_ULP, SUB_FLOOR = 2.0**-24, 2.0**-8, 2.0**-4, 2.0**-13
DIALECT = {"ocp": "float8_e4m3fn", "gfx942": "float8_e4m3fnuz"}


# ----------------------------------------------------------------------------------------- indexer.k_latent
def k_latent_golden(latent, wk, k_norm, positions, inv_freq, *, ratio: int, eps: float = 1e-6) -> torch.Tensor:
    return indexer_k_latent(latent, wk, k_norm, positions, inv_freq, ratio=ratio, eps=eps)


def _bf(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float32)


def k_latent_prequant(latent, wk, k_norm, positions, inv_freq, *, ratio: int, eps: float = 1e-6) -> torch.Tensor:
    """The serving chain up to the FP8 store: bf16 after the GEMM, after k_norm and after RoPE (fp32 between)."""
    p = _bf(_bf(latent) @ _bf(wk).T)
    k = _bf(rms_norm(p, _bf(k_norm), eps))
    return _bf(apply_rope(k, group_positions(positions, ratio), inv_freq))


def _k_fp8(x: torch.Tensor, profile: str) -> torch.Tensor:
    tok = cl.encode_indexer_k_tokens(x, DIALECT[profile], K_FMAX[profile])
    return cl.dequantize_indexer_k_tokens(tok, DIALECT[profile])


def _emulate_k(profile: str):
    def k_latent_serving(latent, wk, k_norm, positions, inv_freq, *, ratio, eps=1e-6):
        return _k_fp8(k_latent_prequant(latent, wk, k_norm, positions, inv_freq, ratio=ratio, eps=eps), profile)

    k_latent_serving.__qualname__ = f"k_latent_serving[{profile}]"
    return k_latent_serving


def _chain_error(kw: dict, *, u_out: float, gam: float, phase_fp32: bool, in_round: bool) -> tuple:
    """(golden k in fp64, per-element bound on |chain - golden| before any FP8 store) for the GEMM -> k_norm ->
    RoPE chain with every intermediate rounded at ``u_out`` (one rounding = u_out relative) and fp32 accumulation
    error ``gam`` relative to sum |l w|. First-order terms, each written where it enters:
      GEMM   E1 = e_in + gam M + u_out (|p| + e_in + gam M),  M = sum_j |l_j w_ij|, e_in the bf16 input rounding
      k_norm E2 = |g| E1 / r + |kn| (E1rms / r)(1 + 2 E1rms / r) + (u_out + 4 u32)(|kn| + |g| E1 / r + ...)
             (r the row rms: |r' - r| <= ||dp||_2 / sqrt(n) <= rms(E1) = E1rms; kn = g p / r; the fp32
             normalisation 4 u32)
      RoPE   pairs (a, b) rotated: the input error vector maps with norm <= E2_a + E2_b; phase error (2 u32 |phi| +
             2 u32 with an fp32 phase table, else 2 u32 for the cos/sin rounding) times the pair norm P; fp32
             rotation 3 u32 P; then the output rounding u_out |k|. Nope dims pass through (E3 = E2)."""
    lat, w, g = kw["latent"].double(), kw["wk"].double(), kw["k_norm"].double()
    ratio, eps = kw["ratio"], kw.get("eps", 1e-6)
    p = lat @ w.T
    M = lat.abs() @ w.abs().T
    e_in = ((lat - _bf(kw["latent"]).double()).abs() @ w.abs().T
            + _bf(kw["latent"]).double().abs() @ (w - _bf(kw["wk"]).double()).abs().T) if in_round else 0 * M
    r = (p.square().mean(-1, keepdim=True) + eps).sqrt()
    g_err = (g - _bf(kw["k_norm"]).double()).abs() if in_round else 0 * g
    kn = p * g / r
    E1 = e_in + gam * M + u_out * (p.abs() + e_in + gam * M)
    E1rms = E1.square().mean(-1, keepdim=True).sqrt()
    first = g.abs() * E1 / r + kn.abs() * (E1rms / r) * (1 + 2 * E1rms / r) + p.abs() / r * g_err
    E2 = first + (u_out + 4 * U32) * (kn.abs() + first)
    k = k_latent_golden(kw["latent"].double(), kw["wk"].double(), kw["k_norm"].double(), kw["positions"],
                        kw["inv_freq"], ratio=ratio, eps=eps)
    hd = k.shape[1]
    nope = hd - 64
    E3 = E2.clone()
    a, b = E2[:, nope::2], E2[:, nope + 1::2]
    P = (k[:, nope::2].square() + k[:, nope + 1::2].square()).sqrt()
    phi = group_positions(kw["positions"], ratio).double()[:, None] * kw["inv_freq"].double()[None, :]
    phase = (2 * U32 * phi.abs() + 2 * U32) if phase_fp32 else torch.full_like(phi, 2 * U32)
    pair = a + b + (phase + 3 * U32) * P
    for off in (0, 1):
        E3[:, nope + off::2] = pair + u_out * (k[:, nope + off::2].abs() + pair)
    return k, E3


def _k_bound(kw: dict, level: str, profile: str = "ocp") -> torch.Tensor:
    n = kw["latent"].shape[1]
    if level in ("fp64", "fp32"):
        # the fp32 golden against fp64 (every rounding at u32, cos / sin rounded from fp64 phases); an independent
        # fp32 implementation: twice that, with an fp32 phase table
        _, E = _chain_error(kw, u_out=U32, gam=gamma_prob(n, U32), phase_fp32=level == "fp32", in_round=False)
        return E * (2 if level == "fp32" else 1)
    k, E = _chain_error(kw, u_out=UB, gam=gamma_prob(n, U32), phase_fp32=True, in_round=True)
    A = (k.abs().amax(-1, keepdim=True) + E.amax(-1, keepdim=True)).clamp(min=1e-4)
    if level == "serving":
        # one e4m3 rounding of the chain's value at the row's power-of-two scale: half an ulp (2^-4 relative) for
        # normal results, SUB_FLOOR A for subnormal ones (half the smallest subnormal x scale <= 2^-17.8 A for
        # fn / 448 and fnuz / 224; the floor is 2^-4 * 2^-13 A = 2^-17 A); no saturation (|x| / s <= fmax)
        return E + E4M3_HALF_ULP * torch.maximum(k.abs() + E, SUB_FLOOR * A)
    # emulated: same bf16 inputs on both sides; they differ by the fp32 accumulation order (2 gam M), so a bf16
    # rounding may fall on either side (2 u_b, one ulp) at each of the three roundings, and by the RoPE phase table
    # (the subject's fp32 table against the emulation's fp64 phases: 2 u32 |phi|, the larger term far into the
    # context). The subject's pre-store value then lies within Ee of the emulation's x, and its row's power-of-two
    # scale is one of those the row amax +- max Ee gives; e4m3 rounding is monotone, so both codes lie between the
    # roundings of x - Ee and x + Ee at those scales: the bound is that range (zero where no boundary is in reach).
    _, Ee = _chain_error(kw, u_out=2 * UB, gam=2 * gamma_prob(n, U32), phase_fp32=True, in_round=False)
    x = k_latent_prequant(**{k_: kw[k_] for k_ in ("latent", "wk", "k_norm", "positions", "inv_freq", "ratio")},
                          eps=kw.get("eps", 1e-6)).double()
    fmt, fmax = get_format(DIALECT[profile]), K_FMAX[profile]
    amax, emax = x.abs().amax(-1, keepdim=True), Ee.amax(-1, keepdim=True)
    e_lo, e_hi = (torch.ceil(torch.log2(torch.clamp(amax + d, min=1e-4) / fmax)) for d in (-emax, emax))
    lo = hi = None
    for d in range(int((e_hi - e_lo).max()) + 1):
        sc = torch.exp2(torch.minimum(e_lo + d, e_hi))
        ql = torch.from_numpy(fmt.round(((x - Ee) / sc).numpy())) * sc
        qh = torch.from_numpy(fmt.round(((x + Ee) / sc).numpy())) * sc
        lo = ql if lo is None else torch.minimum(lo, ql)
        hi = qh if hi is None else torch.maximum(hi, qh)
    return hi - lo


def _k_tol(level: str) -> Tolerance:
    what = {"fp64": "the fp32 golden's rounding chain at u32 (GEMM with 6 sqrt(n) u32 accumulation, k_norm, RoPE)",
            "fp32": "twice the fp32 chain, with an fp32 RoPE phase table (2 u32 |phi|)",
            "serving": "bf16 chain (inputs, GEMM output, k_norm, RoPE; fp32 phase table) propagated through the "
                       "norm and the rotation, plus one e4m3 rounding: 2^-4 max(|x|, 2^-13 row amax)",
            "emulated": "the range between the e4m3 roundings of x -+ Ee at the row's reachable power-of-two "
                        "scales, x the emulation's pre-store value and Ee the chain difference of two serving "
                        "evaluations (2 bf16 ulps per rounding, accumulation order, fp32 phase table): exact where "
                        "no rounding boundary is in reach"}[level]
    return Tolerance(0.0, 1.0, f"indexer K from the latent: per-element bound (scale) = {what}")


def _constant_factor(got: torch.Tensor, ref: torch.Tensor) -> int | None:
    """k when the subject is ref x 2^k (k != 0) on the significant elements (|ref| > amax / 8): the median of
    log2 |got / ref| within 2^-7 of k (a wrong dialect or scale is an exact power of two; one e4m3 rounding moves a
    single element by at most 0.093 in log2, not the median of a row), else None."""
    sig = ref.abs() > ref.abs().amax(-1, keepdim=True) / 8
    if not sig.any():
        return None
    r = torch.log2((got.double()[sig] / ref.double()[sig]).abs().clamp_min(1e-30)).median().item()
    k = round(r)
    return k if k != 0 and abs(r - k) < 2.0**-7 else None


def compare_k_latent(got: dict, want: dict, params: dict, level: str, label: str, kwargs: dict) -> list[Comparison]:
    if "k" not in got:
        return [Comparison("k", "fail", message=f"{label} k: the subject returned no 'k' output "
                                                f"(returned {sorted(got)})")]
    g = got["k"].float() if got["k"].dtype == torch.bfloat16 else got["k"]
    bound = _k_bound(kwargs, level, params.get("profile", "ocp"))
    ulp = "float32" if level in ("fp64", "fp32") else "bfloat16"
    c = compare_float(g, want["k"], _k_tol(level), output="k", scale=bound, label=label, ulp_dtype=ulp, level=level)
    if c.verdict != "pass" and level in ("serving", "emulated"):
        ref = want["k"] if level == "emulated" else _emulate_k(params.get("profile", "ocp"))(**kwargs)
        f = _constant_factor(g, ref)
        if f is not None:
            c.message += (f"; dialect diagnosis: a constant factor 2^{f} on the key"
                          + (" (x0.5: OCP bytes read as fnuz, edge indexer_k->logits)" if f == -1 else
                             " (x2: fnuz bytes read as OCP)" if f == 1 else ""))
            c.worst = dict(c.worst, factor=2.0**f)
        nan = torch.isnan(g) & torch.isfinite(ref)
        if nan.any():
            c.message += (f"; {int(nan.sum())} NaN where the emulation is finite (in fnuz 0x80 is NaN: an OCP writer's "
                          "-0 read as fnuz)")
    return [c]


register(ComponentSpec(
    name="indexer.k_latent", family="indexer", reference=k_latent_golden,
    outputs=(OutputSpec("k", tol=lambda p, lvl: _k_tol(lvl)),),
    description="V4.1 index keys from the main compressor's latent: RoPE(k_norm(wk latent)) at (t // m) m, as the "
                "logits read them (FP8 block of 128, pow2 fp32 scale)",
    spec_section="3.8 (V4.1)", emulate=_emulate_k, compare=compare_k_latent,
    divergences=("V4 (spec 3.8 step 4): the indexer's own compressor over the hidden state; V4.1: wk + k_norm over "
                 "the kv-source compressor's latent (models/deepseek_v41/attention.py:1255-1263)",
                 "vLLM 0.32.0's V4.1 FP8 key writer (common/ops/indexer_k_store.py:112, :246) stores "
                 "tl.float8e4nv with FP8_MAX 448 on every platform: OCP bytes, which the gfx942 readers decode as "
                 "fnuz (x0.5), and a type CDNA3 has no native conversion for (Triton's HIP backend "
                 "software-emulates fp8e4nv there, triton/backends/amd/compiler.py)"),
))


def _make_k(g, p):
    cfg = p["cfg"]
    N, ratio, dl, hd = p["rows"], p["ratio"], cfg["head_dim"], cfg["index_head_dim"]
    # group-boundary positions ((t + 1) % m == 0) spread up to max_pos, sorted, the first group included
    groups = torch.randint(0, p["max_pos"] // ratio, (N,), generator=g)
    groups[0] = 0
    positions = (torch.sort(groups).values + 1) * ratio - 1
    # the latent is the compressor's RMS-normalised bf16 row (norm weight ~ 1 + noise); wk a bf16 checkpoint
    # tensor; k_norm a bf16 weight near 1
    lat = dist_tensor(g, (N, dl), p["dist"]) * (1 + 0.1 * torch.randn(dl, generator=g))
    if p["dist"] == "wide":   # per-row magnitudes spread too: the k_norm output is scale-free, its inputs are not
        lat = lat * torch.exp2(torch.rand(N, 1, generator=g) * 16 - 8)
    wk = torch.randn(hd, dl, generator=g) * dl**-0.5
    k_norm = 1 + 0.2 * torch.randn(hd, generator=g)
    if p.get("small_norm_dims"):
        k_norm[:16] = k_norm[:16] * 2.0**-12     # results in the e4m3 subnormal range
    return {"latent": _bf(lat), "wk": _bf(wk), "k_norm": _bf(k_norm), "positions": positions.long(),
            "inv_freq": layer_inv_freq(TINY_V41, p["layer"]), "ratio": ratio, "eps": 1e-6}


_TINY = {"head_dim": TINY_V41.head_dim, "index_head_dim": TINY_V41.index_head_dim}
_FLASH = {"head_dim": V41_FLASH_FACTS["head_dim"], "index_head_dim": V41_FLASH_FACTS["index_head_dim"]}
for layer in (1, 2):                                   # TINY_V41's kv sources: ratio 1 (layer 1) and 2 (layer 2)
    ratio = TINY_V41.compress_ratios[layer]
    for rows, max_pos, dist, extra, seed in [(16, 4096, "normal", {}, 0), (40, 1 << 20, "outliers", {}, 1),
                                            (24, 300000, "wide", {}, 2),
                                            (12, 2048, "normal", {"small_norm_dims": True}, 3)]:
        tag = "subnormal" if extra else dist
        add(Case(f"indexer.k_latent/tiny-v41-l{layer}r{ratio}/n{rows}p{max_pos}/{tag}/s{seed + 10 * layer}",
                 "indexer.k_latent", _make_k,
                 dict({"cfg": _TINY, "rows": rows, "ratio": ratio, "max_pos": max_pos, "layer": layer}, **extra),
                 seed + 10 * layer, dist, ("prefill", "v4.1")))
# V4.1-Flash widths (V41_FLASH_FACTS: head_dim 512, index_head_dim 128; the table of layer 2's type) over a long
# prefill chunk at positions to 2^20 (max_position_embeddings)
add(Case("indexer.k_latent/v41-flash-r2/n4096p1048576/normal/s40", "indexer.k_latent", _make_k,
         {"cfg": _FLASH, "rows": 4096, "ratio": 2, "max_pos": 1 << 20, "layer": 2}, 40, "normal",
         ("prefill", "v4.1", "long-context"), tier="full"))


# ----------------------------------------------------------------------------------- indexer.topk_two_level
def topk_two_level_golden(src_scores, scores, positions, *, ratio: int, topk: int, topk_blocks: int,
                          block_size: int, variant: str = "dense") -> dict:
    return indexer_topk_two_level(src_scores, scores, positions, ratio=ratio, topk=topk, topk_blocks=topk_blocks,
                                  block_size=block_size, variant=variant)


TIE_NOTE = ("exact multiset equality per row (duplicates and the -1 padding count too); a differing entry is a tie "
            "when its key equals the k-th selected key: the scores are the case's fp32 inputs, handed to every "
            "subject unchanged, and the selection does no arithmetic on them (a max per block, comparisons), so the "
            "tie window is zero at every level and only exactly equal keys are interchangeable")


def _rows_multiset(got: torch.Tensor, want: torch.Tensor, key: torch.Tensor, selectable: torch.Tensor, *,
                   output: str, label: str, what: str) -> tuple[Comparison, list[bool]]:
    """Per row: the subject's entries as a multiset against the golden's; ties by equal ``key``. Returns the
    comparison and, per row, whether the row is acceptable (equal or a tie)."""
    if tuple(got.shape) != tuple(want.shape) or got.dtype.is_floating_point:
        return Comparison(output, "fail", message=f"{label} {output}: expected an integer tensor of shape "
                          f"{tuple(want.shape)}, got {got.dtype} {tuple(got.shape)}"), [False] * want.shape[0]
    ok, ties, bad, first = [], 0, 0, None
    n_ent = key.shape[1]
    for r, (a, b) in enumerate(zip(got.long().tolist(), want.tolist())):
        ca, cb = Counter(a), Counter(b)
        if ca == cb:
            ok.append(True)
            continue
        why = None
        dup = sorted(i for i, c in ca.items() if i >= 0 and c > 1)
        wrong = sorted(i for i in ca if i >= 0 and (i >= n_ent or not bool(selectable[r, i])))
        if dup:
            why = f"duplicate {what} {dup[:8]}"
        elif wrong:
            why = f"{what} {wrong[:8]} cannot be selected here (not visible, or not a candidate where only those are)"
        elif ca[-1] != cb[-1]:
            nv = [sum(c for i, c in x.items() if i >= 0) for x in (ca, cb)]
            why = f"{nv[0]} valid {what}, expected {nv[1]}"
        else:
            extra, missing = sorted(set(ca) - set(cb)), sorted(set(cb) - set(ca))
            kth = min(float(key[r, i]) for i in cb if i >= 0)
            off = [i for i in extra + missing if float(key[r, i]) != kth]
            if not off:
                ties += 1
                ok.append(True)
                continue
            why = (f"selected {extra[:8]} not expected, missing {missing[:8]}; keys of the differing {what} "
                   f"{[float(key[r, i]) for i in off[:4]]} vs k-th selected key {kth}")
        ok.append(False)
        bad += 1
        if first is None:
            first = (r, why)
    metrics = {"rows_differing": bad, "tie_rows": ties, "rows": want.shape[0]}
    if not bad:
        return Comparison(output, "pass", metrics, {"rows_differing": 0}, {"tolerance": TIE_NOTE},
                          message=f"{label} {output}: multisets equal ({ties} tie rows)"), ok
    r, why = first
    return Comparison(output, "fail", metrics, {"rows_differing": 0}, {"tolerance": TIE_NOTE},
                      {"index": [r], "why": why},
                      f"{label} {output}: {bad} / {want.shape[0]} rows differ; row {r}: {why}"), ok


def compare_two_level(got: dict, want: dict, params: dict, level: str, label: str, kwargs: dict) -> list[Comparison]:
    for name in ("candidates", "idx"):
        if name not in got:
            return [Comparison(name, "fail", message=f"{label} {name}: the subject returned no {name!r} output "
                                                     f"(returned {sorted(got)})")]
    kw = {k: kwargs[k] for k in ("ratio", "block_size")}
    bs = candidate_block_scores(kwargs["src_scores"], kwargs["positions"], **kw).double()
    cc, ok = _rows_multiset(got["candidates"], want["candidates"], bs, bs > float("-inf"), output="candidates",
                            label=label, what="blocks")
    variant = kwargs.get("variant", "dense")
    # the consumer's top-k is judged under the subject's own candidates on rows where those are acceptable (a tie
    # among blocks legitimately changes the entries), under the golden's elsewhere
    rows_ok = torch.tensor(ok, dtype=torch.bool)[:, None]
    cand = (torch.where(rows_ok, got["candidates"].long(), want["candidates"].long())
            if tuple(got["candidates"].shape) == tuple(want["candidates"].shape) else want["candidates"])
    ref_idx = topk_in_candidates(kwargs["scores"], kwargs["positions"], cand, topk=kwargs["topk"], variant=variant,
                                 **kw)
    key, sel = selection_keys(kwargs["scores"], kwargs["positions"], cand, variant=variant, **kw)
    ci, _ = _rows_multiset(got["idx"], ref_idx, key, sel, output="idx", label=label, what="entries")
    return [cc, ci]


def _emulate_two_level(profile: str):
    # every platform ranks the same fp32 scores: the selection has no serving rounding
    def topk_two_level_serving(src_scores, scores, positions, *, ratio, topk, topk_blocks, block_size,
                               variant="dense"):
        return topk_two_level_golden(src_scores, scores, positions, ratio=ratio, topk=topk,
                                     topk_blocks=topk_blocks, block_size=block_size, variant=variant)

    topk_two_level_serving.__qualname__ = f"topk_two_level_serving[{profile}]"
    return topk_two_level_serving


register(ComponentSpec(
    name="indexer.topk_two_level", family="indexer", reference=topk_two_level_golden,
    outputs=(OutputSpec("candidates", kind="index-set"), OutputSpec("idx", kind="index-set")),
    description="V4.1 two-level top-k: the candidate source's top blocks (max score per block, newest block pinned), "
                "then a later indexer's causal top-k with non-candidate entries at -inf",
    spec_section="3.8 (V4.1)", emulate=_emulate_two_level, compare=compare_two_level,
    divergences=("short rows (n <= topk, and the whole batch when max_seq_len // m <= topk: attention.py:1481-1506) "
                 "select every visible entry, candidates or not; with M < topk visible candidate entries the dense "
                 "path fills with visible non-candidates at -inf (variant 'dense'); vLLM's opt-in sparse-logits "
                 "path selects candidates only (variant 'candidates_only')",
                 "vLLM does not check that a candidate consumer's compress ratio equals the source's: block ids are "
                 "in the source's compressed entries (nvidia/model.py:711-723 names ratio-1 consumers)"),
))
assert set(TWO_LEVEL_VARIANTS) == {"dense", "candidates_only"}


def _make_two_level(g, p):
    T, N, ratio, B = p["tokens"], p["n"], p["ratio"], p["block_size"]
    dist = p["dist"]

    def scores():
        if dist == "permutation":
            return torch.stack([torch.randperm(N, generator=g).float() for _ in range(T)])
        if dist == "exact_ties":   # a coarse integer grid: many exactly equal scores and block maxima
            return torch.randint(0, 6, (T, N), generator=g).float()
        return dist_tensor(g, (T, N), dist)

    positions = torch.randint(0, N * ratio, (T,), generator=g)
    fixed = [N * ratio - 1,                                # the whole context (the long context itself)
             p["topk"] * ratio - 1,                        # exactly topk visible: every visible entry selected
             (p["topk"] + 1) * ratio - 1,                  # one more than topk: the candidate mask applies
             (B * 3 + 5) * ratio - 1,                      # a context not a multiple of the block size
             ratio - 1, 0]                                 # one entry visible; position 0 (none at ratio 2)
    fixed += [(p["topk_blocks"] * B // 2) * ratio + ratio - 1]   # fewer blocks than topk_blocks
    for i, t in enumerate(fixed[:T]):
        positions[i] = min(t, N * ratio - 1)
    return {"src_scores": scores(), "scores": scores(), "positions": positions, "ratio": ratio, "topk": p["topk"],
            "topk_blocks": p["topk_blocks"], "block_size": B, "variant": p.get("variant", "dense")}


_T1 = {"topk": TINY_V41.index_topk, "topk_blocks": TINY_V41.candidate_topk_blocks,
       "block_size": TINY_V41.candidate_block_size,
       "ratio": TINY_V41.compress_ratios[TINY_V41.candidate_source_layer_id]}
# V4.1-Flash's candidate_topk_blocks / candidate_block_size are not known (V41_FLASH_FACTS has none): a synthetic
# setting whose candidates cover more than top-k (40 x 16 = 640 > 512), ratio 1 as nvidia/model.py:711-723's
# consumers
_SYN = {"topk": V41_FLASH_FACTS["index_topk"], "topk_blocks": 40, "block_size": 16, "ratio": 1}
for name, cfg, tokens, n, dist, variant, seed in [
        ("tiny-v41", _T1, 9, 700, "permutation", "dense", 0),
        ("tiny-v41", _T1, 9, 700, "near_ties", "dense", 1),
        ("tiny-v41", _T1, 8, 650, "all_negative", "dense", 2),
        ("tiny-v41", _T1, 8, 600, "exact_ties", "dense", 3),
        ("tiny-v41", _T1, 7, 700, "normal", "candidates_only", 4),
        ("synthetic-k40b16", _SYN, 9, 1100, "permutation", "dense", 5),
        ("synthetic-k40b16", _SYN, 8, 1030, "near_ties", "dense", 6),
        ("synthetic-k40b16", _SYN, 8, 900, "all_negative", "candidates_only", 7),
        ("synthetic-k40b16", _SYN, 7, 1000, "exact_ties", "dense", 8)]:
    add(Case(f"indexer.topk_two_level/{name}/t{tokens}n{n}/{variant}/{dist}/s{seed}", "indexer.topk_two_level",
             _make_two_level, dict(cfg, tokens=tokens, n=n, variant=variant), seed, dist, ("prefill", "v4.1")))
# Tier full: 131,072 and 262,144 compressed entries (ratio 1 contexts of that length; past 2^15 an int16 wraps, past
# 2^17 a 17-bit block id), synthetic candidates
for tokens, n, seed in [(4, 131072, 20), (3, 262144, 21)]:
    add(Case(f"indexer.topk_two_level/synthetic-k40b16/t{tokens}n{n}/dense/permutation/s{seed}",
             "indexer.topk_two_level", _make_two_level, dict(_SYN, tokens=tokens, n=n), seed, "permutation",
             ("prefill", "v4.1", "long-context"), tier="full"))
