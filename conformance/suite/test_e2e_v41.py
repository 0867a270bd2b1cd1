"""End-to-end on the written tiny DeepSeek-V4.1 checkpoint (e2e variant "tiny-v41", conformance.checks.e2e_v41):
the reference subject serves the golden DSV41Model (judged), emulated:<profile> the golden in that profile's V4.1
serving numerics (``serving_v41``: layers judged at the emulated level, logits / greedy measured), a plugin with
``e2e_serve_v41`` is judged like the reference (or, declaring ``e2e_v41_profile``, like emulated:<profile>); vLLM and
transformers get a "not-provided" row with the reason. Select with ``-k "e2e and v41"``."""

from conformance.plugin import record
from conformance.results import CheckResult


def test_e2e_v41(conformance_subject_only, conformance_run):
    from conformance.checks import e2e_v41 as V

    spec = conformance_subject_only
    subj = conformance_run.subject(spec)
    info = subj.info()
    out_dir = conformance_run.out / "e2e"
    hook = getattr(subj, "e2e_serve_v41", None)
    built = None if hook is not None else V.builtin_server(spec)
    if hook is not None:
        rows = V.run_e2e_v41(spec, hook, info, out_dir=out_dir, profile=getattr(subj, "e2e_v41_profile", None))
    elif built is not None:
        serve, judged, why = built
        rows = V.run_e2e_v41(spec, serve, info, out_dir=out_dir, judged=judged, why_not_judged=why,
                             profile=getattr(serve, "e2e_v41_profile", None))
    else:
        rows = [CheckResult(spec, "e2e-v41/tiny-v41", "model", "e2e", "golden", "not-provided", device=info.device,
                            dialect=info.dialect, emulated=info.emulated,
                            message=f"not provided: {V.not_provided_reason(spec)}", params={"variant": "tiny-v41"})]
    record(conformance_run, rows)
