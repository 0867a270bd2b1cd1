"""Sparse attention with the per-head sink (spec 3.10) and the inverse-RoPE grouped output projection
(spec 3.11)."""

from __future__ import annotations

import torch

from references.components.attention import output_projection, sparse_attention
from references.components.qat import quant_kv_nope
from references.components.rope import rope_inv_freq
from references.config import RopeScaling
from references.numerics import GOLDEN, Numerics

from ..components import ComponentSpec, OutputSpec, register
from ._case import Case, add, dist_tensor
from ._serving import UB, level_tolerance, serving_emulation

SCALE = 512**-0.5
# Precondition of the attention bound below: tau * sqrt(sum_i (q_i kv_i)^2) <= L_MAX for every (t, h, j).
L_MAX = 3.0


def attn_sparse(q, kv, indices, sink, *, scale: float, numerics: Numerics = GOLDEN) -> torch.Tensor:
    """Golden: unquantised kv. With ``numerics``, kv is what the FP8 cache returns: nope dims [0, 448)
    quantised in blocks of 64 in the profile's dialect, rope dims bf16 (spec 3.6, 4.5)."""
    if numerics.kv_nope is not None:
        kv = quant_kv_nope(kv, kv.shape[-1] - 64, numerics)
    return sparse_attention(q, kv, indices, sink, scale=scale, numerics=numerics)


def _attn_scale(kw, want):
    """o is a convex combination of the selected kv rows (scaled by 1 - sink weight): its error is measured
    against the largest |kv| entry of the row's selected set."""
    kv, idx = kw["kv"].double(), kw["indices"].long()
    mag = kv.abs().amax(dim=-1)[idx.clamp(min=0)].masked_fill(idx < 0, 0).amax(dim=-1)  # [T]
    return mag[:, None, None].expand_as(want)


# bf16 q and kv perturb each logit by a random sum of 512 rounding errors: |dl| <= 6 ub tau
# sqrt(sum (q_i kv_i)^2) <= 6 ub L_MAX (probabilistic, lambda = 6); a logit error dl changes the
# normalised weights by at most 2 dl relative, so o moves by 2 dl max|kv|; plus kv's own rounding (ub)
# and the output rounding (ub). The serving path also reads kv from an FP8 cache (nope dims, block 64):
# the values move by at most 2^-4 max|kv| and the logits by a random sum of e4m3 rounding errors,
# |dl| <= 6 * 2^-4 * L (same argument with u = 2^-4), so 2 dl max|kv| more. This bound is loose by
# construction (an fp32 golden against FP8 attention); the emulated level, which quantises kv the same
# way, is the tight one.
FP8_U = 2.0**-4
ATTN_TOL = level_tolerance(n=512, k_inputs=1, what="sparse attention",
                           extra_serving=2 * 6 * UB * L_MAX + FP8_U + 2 * 6 * FP8_U * L_MAX,
                           extra_reason=f"logit perturbation 2*6*(ub + 2^-4)*L, L={L_MAX}, + FP8 kv values 2^-4")
register(ComponentSpec(
    name="attn.sparse", family="attention", reference=attn_sparse,
    outputs=(OutputSpec("o", tol=ATTN_TOL, scale=_attn_scale),),
    description="sparse MQA attention over selected KV rows with the per-head sink in the denominator",
    spec_section="3.10", emulate=serving_emulation(attn_sparse, bf16_inputs=("q", "kv"), output_names=("o",)),
    divergences=("OFF rounds probabilities to bf16 before P.V (spec 8.11)",),
))


def attn_output(o, positions, wo_a, wo_b, *, o_groups: int, theta: float, yarn: bool) -> torch.Tensor:
    inv = rope_inv_freq(64, theta, RopeScaling() if yarn else None)
    return output_projection(o, positions, inv, wo_a, wo_b, o_groups=o_groups)


def _out_scale(kw, want):
    # |y| <= |wo_b| |wo_a| |o| elementwise bound: the sum of absolute products of both GEMMs
    o = kw["o"].double().abs()
    T, H, d = o.shape
    g = kw["o_groups"]
    wa = kw["wo_a"].double().abs().view(g, -1, H // g * d)
    z = torch.einsum("tgk,grk->tgr", o.reshape(T, g, -1), wa).reshape(T, -1)
    return (z @ kw["wo_b"].double().abs().T).expand_as(want)


register(ComponentSpec(
    name="attn.output", family="attention", reference=attn_output,
    outputs=(OutputSpec("y", tol=level_tolerance(n=4096 + 1024, k_inputs=3, what="inverse rope + wo_a + wo_b"),
                        scale=_out_scale),),
    description="inverse RoPE at the query position, grouped low-rank wo_a, then wo_b", spec_section="3.11",
    emulate=serving_emulation(attn_output, bf16_inputs=("o", "wo_a", "wo_b")),
    divergences=("vLLM CUDA quantises o to FP8 per 128 before an FP8 einsum; ROCm uses bf16 (spec 8.10)",),
))


def _make_sparse(g, p):
    T, H, N, K = p["tokens"], p["heads"], p["n_kv"], p["k"]
    q = dist_tensor(g, (T, H, 512), p["dist"])
    kv = dist_tensor(g, (N, 512), p["dist"])
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(T)])
    # a ragged batch: each row keeps a random number of valid entries, the rest -1 (and one empty row)
    keep = torch.randint(0, K + 1, (T,), generator=g)
    keep[0] = K
    if T > 2:
        keep[1] = 0
    idx = torch.where(torch.arange(K)[None, :] < keep[:, None], idx, -1)
    sink = torch.randn(H, generator=g) * 2
    L = SCALE * torch.sqrt(torch.einsum("thd,nd->thn", q.double() ** 2, kv.double() ** 2)).max()
    if L > L_MAX:  # the tolerance derivation's precondition: fail loudly instead of passing vacuously
        raise ValueError(f"case inputs break the attention bound's precondition: L = {L:.3g} > {L_MAX}")
    return {"q": q, "kv": kv, "indices": idx, "sink": sink, "scale": SCALE}


def _make_out(g, p):
    T, H, D, gr, r = p["tokens"], p["heads"], p["d"], p["groups"], p["rank"]
    return {"o": dist_tensor(g, (T, H, 512), p["dist"]), "positions": torch.randint(0, 5000, (T,), generator=g),
            "wo_a": torch.randn(gr * r, H // gr * 512, generator=g) * (H // gr * 512) ** -0.5,
            "wo_b": torch.randn(D, gr * r, generator=g) * (gr * r) ** -0.5, "o_groups": gr,
            "theta": p["theta"], "yarn": p["yarn"]}


for tokens, heads, n_kv, k, seed in [(1, 64, 300, 256, 0), (5, 8, 700, 640, 1), (33, 8, 200, 128, 2),
                                     (1024, 4, 2048, 512, 3)]:
    # the 1,024-query prefill is full tier: vLLM's ragged Triton kernel takes ~150 s of it under the interpreter
    # (vllm:sim-<arch>, vllm-triton:<profile>); nox -s cpu and nox -s gfx942-sim run the full tier
    add(Case(f"attn.sparse/t{tokens}h{heads}/kv{n_kv}k{k}/s{seed}", "attn.sparse", _make_sparse,
             {"tokens": tokens, "heads": heads, "n_kv": n_kv, "k": k}, seed, "normal",
             ("decode",) if tokens == 1 else ("prefill", "long") if tokens >= 1024 else ("prefill",),
             tier="full" if tokens >= 1024 else "fast"))
for tokens, heads, d, groups, rank, theta, yarn, seed in [(1, 8, 256, 2, 128, 10000.0, False, 0),
                                                         (9, 8, 256, 2, 128, 160000.0, True, 1),
                                                         (3, 64, 4096, 8, 1024, 160000.0, True, 2),
                                                         # 37 tokens: enough clusters for the systematic detector
                                                         (37, 8, 256, 2, 128, 160000.0, True, 3)]:
    add(Case(f"attn.output/t{tokens}h{heads}g{groups}/theta{int(theta)}/s{seed}", "attn.output", _make_out,
             {"tokens": tokens, "heads": heads, "d": d, "groups": groups, "rank": rank, "theta": theta,
              "yarn": yarn}, seed, "normal", ("decode" if tokens == 1 else "prefill",)))


# ------------------------------------------------------------------------------------------ attn.index_set
def attn_index_set(positions: torch.Tensor, topk_idx: torch.Tensor | None = None, *, layer_type: str,
                   ratio: int, window: int = 128) -> dict:
    """The KV slots each query reads (spec 3.9) -> {"indices": [T, window + K_c]} into cat(token_kv [max pos + 1],
    compressed_kv): token rows are positions, compressed entry i is row max(positions) + 1 + i; -1 = none.
    swa: the window {t-w+1 .. t} (the query itself included); hca: + every entry i < floor((t+1)/128); csa: + the
    indexer's ``topk_idx`` [T, k] (entry numbers, -1 padded; an entry at or past the causal bound is refused).
    Order and padding width are free: a subject's rows are compared as multisets of their valid slots."""
    from references.components.attention import attention_set

    return {"indices": attention_set(layer_type, positions, window, ratio, topk_idx)}


def _multiset_compare(got, want, params, level, label, kwargs):
    """Per query row: the sorted valid slots (>= 0) must be equal, duplicates counted (a slot listed twice is
    attended twice). Widths may differ (vLLM pads to a multiple of 128)."""
    from ..metrics import Comparison

    if "indices" not in got:
        return [Comparison("indices", "fail", message=f"{label} indices: the subject returned no 'indices' output")]
    g, w = got["indices"], want["indices"]
    if g.dtype.is_floating_point or g.dim() != 2 or g.shape[0] != w.shape[0]:
        return [Comparison("indices", "fail", message=f"{label} indices: expected integer [T={w.shape[0]}, *], "
                           f"got {g.dtype} {tuple(g.shape)}")]
    gs = torch.where(g.long() >= 0, g.long(), torch.iinfo(torch.int64).max).sort(-1).values
    ws = torch.where(w.long() >= 0, w.long(), torch.iinfo(torch.int64).max).sort(-1).values
    width = max(gs.shape[1], ws.shape[1])
    # pad with a full int64 tensor: F.pad's value is a float, and 2^63 - 1 as a float wraps to -2^63
    pad = lambda t: torch.cat([t, torch.full((t.shape[0], width - t.shape[1]), torch.iinfo(torch.int64).max,  # noqa: E731
                                             dtype=torch.int64)], 1)
    bad = (pad(gs) != pad(ws)).any(-1)
    n_bad = int(bad.sum())
    metrics = {"rows_differing": n_bad, "rows": int(w.shape[0])}
    tol = {"tolerance": "exact multiset equality of each row's valid slots"}
    if not n_bad:
        return [Comparison("indices", "pass", metrics, {"rows_differing": 0}, tol,
                           message=f"{label} indices: every row's slot multiset equal")]
    r = int(bad.nonzero()[0])
    a, b = [i for i in g[r].tolist() if i >= 0], [i for i in w[r].tolist() if i >= 0]
    extra = sorted(set(a) - set(b)) or sorted(i for i in set(a) if a.count(i) > b.count(i))
    missing = sorted(set(b) - set(a)) or sorted(i for i in set(b) if b.count(i) > a.count(i))
    pos = int(kwargs["positions"][r])
    msg = (f"{label} indices: {n_bad} / {w.shape[0]} rows read a different slot multiset; row {r} (position {pos}, "
           f"{(pos + 1) % 4} mod 4 / {(pos + 1) % 128} mod 128 tokens past a boundary): extra {extra[:8]}, "
           f"missing {missing[:8]}")
    return [Comparison("indices", "fail", metrics, {"rows_differing": 0}, tol,
                       {"index": [r], "got": extra[:8], "want": missing[:8]}, msg)]


register(ComponentSpec(
    name="attn.index_set", family="attention", reference=attn_index_set,
    outputs=(OutputSpec("indices", "index-set"),),
    description="slots each query attends: SWA window + compressed entries (HCA: all visible; CSA: indexer top-k)",
    spec_section="3.9", compare=_multiset_compare,
    emulate=serving_emulation(attn_index_set, bf16_inputs=(), bf16_outputs=(), output_names=("indices",)),
))


def _make_index_set(g, p):
    start, T, kind = p["start"], p["tokens"], p["layer_type"]
    positions = torch.arange(start, start + T)
    kw = {"positions": positions, "layer_type": kind, "ratio": {"swa": 0, "csa": 4, "hca": 128}[kind],
          "window": 128}
    if kind == "csa":
        k = p.get("topk", 512)
        bound = torch.div(positions + 1, 4, rounding_mode="floor")
        n = max(int(bound.max()), 1)
        s = torch.rand(T, n, generator=g).masked_fill(torch.arange(n)[None] >= bound[:, None], -1.0)
        top = s.topk(min(k, n), dim=-1)
        idx = torch.where(top.values >= 0, top.indices, -1)
        kw["topk_idx"] = torch.nn.functional.pad(idx, (0, k - idx.shape[1]), value=-1)
    return kw


# prefill lengths at every residue mod 4 and around the 128 boundaries; decode steps and a chunk past 5k tokens
_INDEX_ROWS = [(0, L) for L in (1, 3, 4, 5, 6, 127, 128, 129, 130, 131, 255, 256, 257)] + \
              [(5119, 1), (5120, 1), (5246, 1), (5247, 1), (5000, 131)]
for kind in ("swa", "csa", "hca"):
    for i, (start, T) in enumerate(_INDEX_ROWS):
        end = start + T
        add(Case(f"attn.index_set/{kind}/p{start}-{end}/r4_{end % 4}-r128_{end % 128}/s{i}", "attn.index_set",
                 _make_index_set, {"layer_type": kind, "start": start, "tokens": T}, i, "positions",
                 ("decode",) if T == 1 else ("prefill",) + (("long-context",) if end > 5000 else ())))
    # a whole 5,123-token prefill (5123 = 3 mod 4 = 3 mod 128): full tier (vLLM's Triton combine under the
    # interpreter takes ~20 s per row; the fast tier keeps the 5,000-5,131 chunk and the decode steps past 5k)
    add(Case(f"attn.index_set/{kind}/p0-5123/r4_3-r128_3/s99", "attn.index_set", _make_index_set,
             {"layer_type": kind, "start": 0, "tokens": 5123}, 99, "positions", ("prefill", "long-context"),
             tier="full"))
