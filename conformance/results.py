"""The results table: one row per (subject, case, level), appended as each case finishes.

Rows are JSON lines under ``<out>/results/``; every process (pytest-xdist worker) writes its own file so
a crash keeps what finished and writers never interleave. ``load(out)`` returns the pandas table the
report, ``compare``, ``gate`` and ``bisect`` read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1

# Verdict tiers, ordered from best to worst. "not-provided" / "needs-gpu" / "not-run" are never passes.
# "crashed": the case started and its process died, raised MemoryError or ran past --case-timeout
# (conformance.isolate); worse than any judged failure.
VERDICTS = ("pass", "xfail", "degraded", "xpass", "fail", "catastrophic", "error", "crashed",
            "not-provided", "needs-gpu", "not-run")
FAILING = {"fail", "catastrophic", "error", "xpass", "crashed"}
VERDICT_RANK = {v: i for i, v in enumerate(VERDICTS)}
# Severity for "worst of" summaries (report cells, counts): a judged failure outranks a row that judged nothing.
SEVERITY = ("pass", "not-run", "needs-gpu", "not-provided", "xfail", "degraded", "xpass", "fail", "catastrophic",
            "error", "crashed")
SEVERITY_RANK = {v: i for i, v in enumerate(SEVERITY)}


@dataclass
class CheckResult:
    subject: str
    case_id: str
    component: str
    check: str                       # numeric | dialect | routing | graph | e2e
    level: str                       # golden | emulated | eager | bytes | ...
    verdict: str
    message: str = ""
    metrics: dict = field(default_factory=dict)   # name -> measured value
    bounds: dict = field(default_factory=dict)    # name -> allowed value (same keys as metrics)
    derivation: dict = field(default_factory=dict)  # name -> why this bound
    worst: dict = field(default_factory=dict)     # index, got, want, and for FP8 s/e/m + dialect
    function: str = ""               # the implementation that ran (e.g. vllm.x.y / torch.ops._C.z)
    backend: str = ""                # compiled | triton | triton-interpreter | torch | aiter | reference
    device: str = ""                 # e.g. "cpu (emulated gfx942 numerics)", "NVIDIA H100 80GB HBM3"
    dialect: str = ""                # FP8 dialect of the subject (float8_e4m3fn / float8_e4m3fnuz / none)
    emulated: bool = False
    params: dict = field(default_factory=dict)
    seed: int | None = None
    duration_s: float = 0.0
    rerun: str = ""
    extra: dict = field(default_factory=dict)     # histograms, per-token diagnostics, dialect maps
    schema: int = SCHEMA_VERSION
    time: float = field(default_factory=time.time)

    def __post_init__(self):
        if self.verdict not in VERDICT_RANK:
            raise ValueError(f"unknown verdict {self.verdict!r}; known: {VERDICTS}")

    @property
    def failed(self) -> bool:
        return self.verdict in FAILING

    def to_json(self) -> str:
        return json.dumps(_clean(dataclasses.asdict(self)), sort_keys=True)


def _clean(o):
    """JSON-safe: NaN/Inf as strings (JSON has no NaN), tensors/numpy scalars as Python numbers."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if hasattr(o, "item") and getattr(o, "ndim", 1) == 0:
        o = o.item()
    if hasattr(o, "tolist"):
        return _clean(o.tolist())
    if isinstance(o, float) and not math.isfinite(o):
        return repr(o)
    return o


class ResultWriter:
    """Appends rows to ``<out>/results/<worker>.jsonl``, flushing after every row."""

    def __init__(self, out: str | Path, worker: str | None = None):
        self.dir = Path(out) / "results"
        self.dir.mkdir(parents=True, exist_ok=True)
        worker = worker or os.environ.get("PYTEST_XDIST_WORKER", "main")
        self.path = self.dir / f"{worker}-{os.getpid()}.jsonl"

    def write(self, r: CheckResult) -> None:
        with open(self.path, "a") as f:
            f.write(r.to_json() + "\n")
            f.flush()


def load_rows(out: str | Path) -> list[dict]:
    rows = []
    for p in sorted((Path(out) / "results").glob("*.jsonl")):
        for line in p.read_text().splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def load(out: str | Path):
    import pandas as pd

    rows = load_rows(out)
    cols = [f.name for f in dataclasses.fields(CheckResult)]
    return pd.DataFrame(rows, columns=cols)
