"""End-to-end (issue 5): a DSV4 checkpoint served through ``vllm.LLM`` in this process against the golden model
(conformance.checks.e2e). Without ``--checkpoint`` the tiny checkpoint (bf16) is written and served; with
``--checkpoint PATH`` that folder is served and the golden streams it one layer at a time. vLLM runs on the
platform's device (vLLM's CPU build: the CPU; ROCm / CUDA builds: GPU 0); the per-layer and logits rows are
judged only where the replay's numerics are derived for that platform and checkpoint, "not-run" (measured,
not judged) elsewhere. Runs once per subject; subjects other than ``vllm`` get a "not-provided" row unless they
expose ``e2e(out_dir[, checkpoint=PATH]) -> list[CheckResult]``.
"""

import inspect
import traceback

from conformance.plugin import record
from conformance.results import CheckResult


def V_RELEASES():
    from conformance.checks.e2e_vllm import VALIDATED

    return VALIDATED


def test_e2e(conformance_subject_only, conformance_run):
    spec = conformance_subject_only
    subj = conformance_run.subject(spec)
    info = subj.info()
    out_dir = conformance_run.out / "e2e"
    ckpt = conformance_run.checkpoint
    hook = getattr(subj, "e2e", None)

    def row(verdict, message, case="e2e/checkpoint" if ckpt else "e2e/tiny"):
        return CheckResult(spec, case, "model", "e2e", "golden", verdict, device=info.device, dialect=info.dialect,
                           emulated=info.emulated, message=message,
                           params={"checkpoint": ckpt} if ckpt else {})
    if hook is not None:
        takes_ckpt = "checkpoint" in inspect.signature(hook).parameters
        if ckpt and not takes_ckpt:
            rows = [row("not-provided", f"subject {spec}'s e2e hook takes no checkpoint: --checkpoint {ckpt} "
                                        "cannot be served by it")]
        else:
            rows = hook(out_dir, checkpoint=ckpt) if ckpt else hook(out_dir)
    elif getattr(subj, "e2e_serve", None) is not None:
        from conformance.checks.e2e import run_e2e_served

        rows = run_e2e_served(spec, subj, info, out_dir=out_dir, checkpoint=ckpt)
    elif spec == "vllm":
        from conformance.checks.e2e import run_e2e

        try:
            rows = run_e2e(spec, info, out_dir=out_dir, checkpoint=ckpt,
                           golden_checkpoint=conformance_run.golden_checkpoint)
        except Exception as e:  # vLLM could not start or serve: one row, the traceback kept in extra
            from conformance.checks.e2e_vllm import validated_release

            first = (str(e).strip().splitlines() or [""])[0]
            what = f"vLLM could not serve {'--checkpoint ' + ckpt if ckpt else 'the tiny checkpoint'}: " \
                   f"{type(e).__name__}: {first}"
            rel, known = validated_release()
            # on a release the e2e path (its shims) was never validated against, a failure to serve says nothing
            # about the numerics: not-run with the release named, never an error row a comparison could read
            r = row("error", what, case="e2e/serve") if known else row(
                "not-run", f"vLLM {rel}: e2e not run: the e2e path is validated on vLLM "
                           f"{', '.join(V_RELEASES())} only; {what}", case="e2e/serve")
            r.extra["traceback"] = traceback.format_exc()
            rows = [r]
    else:
        why = f"subject {spec} serves no whole model (no e2e hook)"
        if ckpt:
            why += f"; --checkpoint {ckpt} is not used for it"
        rows = [row("not-provided", why)]
    record(conformance_run, rows)
