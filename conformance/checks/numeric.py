"""Numeric conformance: one case, one subject -> result rows at up to two levels.

Level 1 compares the subject with the fp32 golden (the "fp64" bound for the reference subject, the
formats' precision budget for serving subjects). Level 2 compares a serving subject with the emulated
serving numerics of its profile, far tighter, so a bug hidden inside the FP8 budget is still caught.
"""

from __future__ import annotations

import dataclasses
import time
import traceback

import torch

from references.numerics import PROFILES
from references.precision import golden_mode

from .. import components
from ..cases import Case
from ..metrics import Comparison, compare_exact, compare_float, compare_index_sets
from ..results import VERDICT_RANK, CheckResult
from ..subjects.base import Streamed, Subject, SubjectInfo, Unsupported, absent_reason
from .stream import bit_identical, check_splits, run_stream


def _as_outputs(spec: components.ComponentSpec, out) -> dict:
    if isinstance(out, dict):
        return out
    if isinstance(out, (tuple, list)):
        return {o.name: v for o, v in zip(spec.outputs, out)}
    return {spec.outputs[0].name: out}


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, dict):
        return {k: _clone(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_clone(x) for x in v)
    return v


def _absmax(kw) -> float:
    m = 0.0
    for v in kw.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel():
            m = max(m, float(v.detach().abs().max()))
        elif isinstance(v, dict):
            m = max(m, _absmax(v))
    return m


def _check_finite_inputs(kw, case_id: str):
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"case {case_id}: input {k!r} has NaN/Inf; cases must feed finite inputs")


def context_params(info: SubjectInfo) -> dict:
    profile = info.profile or "ocp"
    p = PROFILES.get(profile, PROFILES["ocp"])
    # the implementation (for vLLM its release) rides on every row, so a row read alone names what ran
    return {"profile": profile, "dialect": p["dialect"], "fmax": p["fmax"], "implementation": info.implementation}


# the format whose rounding unit the error is expressed in, per comparison level
ULP_DTYPE = {"fp64": "float32", "fp32": "float32", "serving": "bfloat16", "emulated": "bfloat16"}


def _routing_compare(spec):
    from .routing import routing_compare

    def compare(got, want, params, level, label, kwargs):
        return routing_compare(spec.name, got, want, params, level, label, kwargs)[0]
    return compare


# joint comparisons a ComponentSpec names by string (``ComponentSpec.compare``)
JOINT_COMPARES = {"routing": _routing_compare}


def joint_compare(spec):
    """The joint comparison of ``spec``: its callable, or the checks-layer comparison its name selects."""
    if callable(spec.compare):
        return spec.compare
    try:
        return JOINT_COMPARES[spec.compare](spec)
    except KeyError:
        raise ValueError(f"{spec.name}: unknown joint comparison {spec.compare!r}; known: "
                         f"{sorted(JOINT_COMPARES)}") from None


def compare_outputs(spec, got: dict, want: dict, params: dict, level: str, label: str,
                    kwargs: dict) -> list[Comparison]:
    if spec.compare is not None:
        return list(joint_compare(spec)(got, want, params, level, label, kwargs))
    comps = []
    for o in spec.outputs:
        if o.name not in want:
            continue
        if o.name not in got:
            comps.append(Comparison(o.name, "fail", message=f"{label} {o.name}: the subject returned no "
                                    f"{o.name!r} output (returned {sorted(got)})"))
            continue
        g, w = got[o.name], want[o.name]
        if o.kind == "float":
            scale = o.scale(kwargs, w) if o.scale else None
            comps.append(compare_float(g.float() if g.dtype == torch.bfloat16 else g, w,
                                       o.tolerance(params, level), output=o.name, scale=scale, label=label,
                                       ulp_dtype=ULP_DTYPE[level], level=level))
        elif o.kind == "index-set":
            comps.append(compare_index_sets(g, w, output=o.name, label=label))
        else:
            fmt = params.get("dialect") if o.kind == "fp8-codes" else None
            comps.append(compare_exact(g, w, output=o.name, label=label, fp8_format=fmt))
    return comps


def comparisons_row(check: str, subject_name, info, impl, case, level, comps, t, ctx, rerun, *,
                    prefix: str = "", extra: dict | None = None) -> CheckResult:
    """One result row from a case's output comparisons: the worst verdict, every output's metrics and
    bounds, the worst element, provenance of the implementation."""
    worst = max(comps, key=lambda c: VERDICT_RANK[c.verdict]) if comps else None
    if worst is None:
        return CheckResult(subject_name, case.id, case.component, check, level, "error",
                           message="no output to compare", rerun=rerun)
    msg = " | ".join(c.message for c in comps if c.verdict != "pass") or worst.message
    return CheckResult(
        subject=subject_name, case_id=case.id, component=case.component, check=check, level=level,
        verdict=worst.verdict, message=prefix + msg,
        metrics={f"{c.output}.{k}": v for c in comps for k, v in c.metrics.items()},
        bounds={f"{c.output}.{k}": v for c in comps for k, v in c.bounds.items()},
        derivation={c.output: c.derivation.get("tolerance", "") + (f"; RMS: {c.derivation['rms']}"
                                                                  if c.derivation.get("rms") else "")
                    for c in comps},
        worst=dict(worst.worst, output=worst.output), function=impl.function, backend=impl.backend,
        device=info.device, dialect=info.dialect, emulated=info.emulated,
        params=dict(case.params, **ctx, dist=case.dist), seed=case.seed, duration_s=t, rerun=rerun,
        extra=dict({"outputs": {c.output: c.verdict for c in comps}, "tags": list(case.tags),
                    "impl_note": impl.note}, **(extra or {})),
    )


def _row(subject_name, info, impl, case, level, comps, t, ctx, rerun, extra=None) -> CheckResult:
    return comparisons_row("numeric", subject_name, info, impl, case, level, comps, t, ctx, rerun,
                           extra=dict({"histogram": {c.output: c.histogram for c in comps}}, **(extra or {})))


def _own_one_shot(spec, impls, kwargs, got, params, level, label) -> tuple[list[Comparison], dict]:
    """A streamed component's second check: the subject's streamed outputs against its OWN one-shot outputs
    (``spec.stream.one_shot``, when the subject provides it), judged at the tight level (fp64 for the reference
    subject, the emulated bound otherwise), with bit-identity reported per output."""
    if spec.stream.one_shot is None:   # no one-shot component takes these inputs (StreamSpec.one_shot)
        return [], {"stream_vs_one_shot": f"{spec.name} has no one-shot component of the same inputs"}
    one = impls.get(spec.stream.one_shot)
    if one is None:
        return [], {"stream_vs_one_shot": f"{spec.stream.one_shot} not provided by this subject"}
    try:
        own = _as_outputs(spec, one.fn(**_clone(kwargs)))
    except Unsupported as e:
        return [], {"stream_vs_one_shot": f"{one.function} does not support this case: {e}"}
    tight = "fp64" if level == "fp64" else "emulated"
    comps = [dataclasses.replace(c, output=f"{c.output}~one-shot")
             for c in compare_outputs(spec, got, own, params, tight, label + f" streamed vs own one-shot "
                                      f"({spec.stream.one_shot}, {tight} bound)", kwargs)]
    return comps, {"stream_vs_one_shot": {"component": spec.stream.one_shot, "level": tight,
                                          "bit_identical": bit_identical(got, own)}}


def emulated_outputs(spec, case: Case, kwargs: dict, profile: str, cache: dict | None) -> dict:
    """The emulated serving numerics of ``profile`` on this case's inputs, computed once per run."""
    key = (case.id, profile)
    if cache is not None and key in cache:
        return cache[key]
    with golden_mode():
        out = _as_outputs(spec, spec.emulate(profile)(**_clone(kwargs)))
    if cache is not None:
        cache[key] = out
    return out


def run_numeric(subject: Subject, case: Case, *, subject_name: str | None = None, rerun: str = "",
                emulated_cache: dict | None = None) -> list[CheckResult]:
    spec = components.get(case.component)
    info = subject.info()
    name = subject_name or info.name
    impls = subject.provides()
    if case.component not in impls:
        return [CheckResult(name, case.id, case.component, "numeric", "-", "not-provided",
                            message=absent_reason(subject, case.component, name),
                            device=info.device, dialect=info.dialect, emulated=info.emulated,
                            params=dict(case.params, **context_params(info)), rerun=rerun)]
    impl = impls[case.component]
    ctx = context_params(info)
    kwargs = case.make_inputs()
    _check_finite_inputs(kwargs, case.id)
    params = dict(case.params, **ctx, inputs_absmax=_absmax(kwargs))
    t0 = time.perf_counter()
    try:
        with golden_mode():
            want = _as_outputs(spec, spec.reference(**_clone(kwargs)))
    except Exception as e:  # the golden itself failing is a harness bug: say so loudly
        raise RuntimeError(f"golden reference for {case.component} failed on case {case.id}: {e}") from e
    stream_info = None
    if spec.stream is not None:   # a malformed row is a harness bug, not the subject's: raise it here
        check_splits(case.params.get("splits", ()), kwargs[spec.stream.chunked[0]].shape[0], case.id)
    try:
        if spec.stream is not None:
            if not isinstance(impl.fn, Streamed):
                raise TypeError(f"{case.component} is a streamed component: its Impl.fn must be a "
                                f"conformance.subjects.Streamed(new_state, step), got {type(impl.fn).__name__}")
            got, stream_info = run_stream(impl.fn, spec, _clone(kwargs), case.params["splits"], case_id=case.id)
            got = _as_outputs(spec, got)
        else:
            got = _as_outputs(spec, impl.fn(**_clone(kwargs)))
    except Unsupported as e:
        return [CheckResult(name, case.id, case.component, "numeric", "-", "not-provided",
                            message=f"{impl.function} does not support this case: {e}", function=impl.function,
                            backend=impl.backend, device=info.device, dialect=info.dialect,
                            emulated=info.emulated, params=dict(case.params, **ctx), seed=case.seed, rerun=rerun)]
    except MemoryError:   # out of memory is a crash of the case (conformance.isolate), not a verdict
        raise
    except Exception as e:
        return [CheckResult(name, case.id, case.component, "numeric", "-", "error",
                            message=f"{impl.function} raised {type(e).__name__}: {e}",
                            function=impl.function, backend=impl.backend, device=info.device,
                            dialect=info.dialect, emulated=info.emulated, params=dict(case.params, **ctx),
                            seed=case.seed, rerun=rerun,
                            extra={"traceback": traceback.format_exc(limit=8)})]
    t = time.perf_counter() - t0
    level = getattr(subject, "comparison_level", lambda: "serving")()
    label = f"[{case.component} | {case.id} | {name}]"
    comps, extra = compare_outputs(spec, got, want, params, level, label, kwargs), {}
    if stream_info is not None:
        own, extra = _own_one_shot(spec, impls, kwargs, got, params, level, label)
        comps += own
        extra["stream"] = stream_info
    rows = [_row(name, info, impl, case, level, comps, t, ctx, rerun, extra)]
    profile = subject.emulation_profile()
    if profile and spec.emulate is not None:
        emu = emulated_outputs(spec, case, kwargs, profile, emulated_cache)
        rows.append(_row(name, info, impl, case, "emulated",
                         compare_outputs(spec, got, emu, params, "emulated", label + f" vs emulated:{profile}",
                                         kwargs), t, ctx, rerun, {"stream": stream_info} if stream_info else None))
    return rows


def worst_verdict(rows: list[CheckResult]) -> str:
    return max((r.verdict for r in rows), key=lambda v: VERDICT_RANK[v]) if rows else "error"


__all__ = ["run_numeric", "worst_verdict", "compare_outputs", "context_params", "emulated_outputs", "comparisons_row"]
