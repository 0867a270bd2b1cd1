"""End-to-end (issue 5): the tiny DSV4 checkpoint (bf16) served through vllm.LLM on the CPU against the golden
model (conformance.checks.e2e). Runs once per subject; subjects other than ``vllm`` get a "not-provided"
row unless they expose ``e2e(out_dir) -> list[CheckResult]``.
"""

from conformance.plugin import record
from conformance.results import CheckResult


def test_e2e(conformance_subject_only, conformance_run):
    spec = conformance_subject_only
    subj = conformance_run.subject(spec)
    info = subj.info()
    out_dir = conformance_run.out / "e2e"
    hook = getattr(subj, "e2e", None)
    if hook is not None:
        rows = hook(out_dir)
    elif spec == "vllm":
        import torch

        if torch.cuda.is_available():
            rows = [CheckResult(spec, "e2e/tiny", "model", "e2e", "golden", "not-run", device=info.device,
                                dialect=info.dialect, message="the e2e run serves the bf16 tiny checkpoint on "
                                "vLLM's CPU build; on a GPU machine it is not wired yet")]
        else:
            from conformance.checks.e2e import run_e2e

            rows = run_e2e(spec, info, out_dir=out_dir)
    else:
        rows = [CheckResult(spec, "e2e/tiny", "model", "e2e", "golden", "not-provided", device=info.device,
                            dialect=info.dialect, emulated=info.emulated,
                            message=f"subject {spec} serves no whole model (no e2e hook)")]
    record(conformance_run, rows)
