"""Compare two runs (or a run and a baseline): what got worse, what got better, what changed backend.

Rows are matched by (subject, case id, check, level). A row is

* **worse** when its verdict ranks worse (``results.VERDICTS`` order: pass < xfail < degraded < xpass <
  fail < catastrophic < error < not-provided ...), or when, at the same verdict, a metric moved past its
  threshold in the bad direction;
* **better** when its verdict ranks better, or a metric moved past its threshold in the good direction and
  none in the bad one;
* **backend-changed** when the function or backend that ran differs (independent of worse / better);
* **provided-changed** when one side has a verdict and the other none ("not-provided", "needs-gpu", "not-run":
  a component one vLLM release binds and another does not): neither worse nor better, since nothing was
  judged on the unjudged side (``gate`` still counts a judged baseline row turned unjudged as a regression);
* **new** / **missing** when only one side has it. A ``crashed`` case has a single row (level ``-``) that
  stands for every level of that (subject, case, check): each row the other side has there is worse (or,
  the other way round, better) against it, never "missing".

Thresholds are written ``<metric>:<sign><amount>[%]``:

* ``calc_diff:+20%``: calc_diff may grow by up to 20 % of the first run's value (growth is bad);
* ``worst_over_bound:+0.5``: may grow by up to 0.5 (absolute);
* ``cosine:-0.01%``: a metric where a drop is bad.

The metric name matches a row's metric key exactly or as its last dotted part (``calc_diff`` matches
``dequant.calc_diff`` and ``out.calc_diff``). A metric without a threshold never makes a row worse or better.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .results import VERDICT_RANK
from .store import Run, key_str, row_key

# verdicts that judge nothing: a row with one of them is never better or worse than a judged row
UNJUDGED = frozenset({"not-provided", "needs-gpu", "not-run"})

THRESHOLD_RE = re.compile(r"^(?P<metric>[A-Za-z_][\w.\-]*):(?P<sign>[+-])(?P<amount>[0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?)"
                          r"(?P<pct>%)?$")
THRESHOLD_HELP = ("a threshold is <metric>:+<amount>[%] (growth is bad) or <metric>:-<amount>[%] (a drop is bad), "
                  "for example calc_diff:+20%, worst_over_bound:+0.5, cosine:-0.01%")


class ThresholdError(ValueError):
    pass


@dataclass(frozen=True)
class Threshold:
    metric: str
    direction: int        # +1: an increase is bad; -1: a decrease is bad
    amount: float
    relative: bool
    spec: str = ""

    def matches(self, key: str) -> bool:
        return key == self.metric or key.endswith("." + self.metric)

    def allowed(self, a: float) -> float:
        """How far the value may move in the bad direction from ``a``."""
        return abs(a) * self.amount if self.relative else self.amount

    def judge(self, a, b) -> tuple[str, str] | None:
        """('worse'|'better', reason) when b moved past the threshold from a, else None."""
        a, b = _num(a), _num(b)
        if a is None or b is None or (math.isnan(a) and math.isnan(b)):
            return None
        if math.isnan(b) and not math.isnan(a):
            return "worse", f"{self.metric} {a:.4g} -> nan"
        if math.isnan(a):
            return "better", f"{self.metric} nan -> {b:.4g}"
        if a == b:
            return None
        delta = (b - a) * self.direction          # > 0: moved in the bad direction
        if math.isinf(delta):
            return ("worse" if delta > 0 else "better"), f"{self.metric} {a:.4g} -> {b:.4g}"
        lim = self.allowed(a)
        change = (f"{(b - a) / abs(a) * 100:+.1f}%" if a not in (0, 0.0) and math.isfinite(a) else f"{b - a:+.3g}")
        if delta > lim:
            return "worse", f"{self.metric} {a:.4g} -> {b:.4g} ({change}, allowed {self.spec})"
        if -delta > lim:
            return "better", f"{self.metric} {a:.4g} -> {b:.4g} ({change})"
        return None


def _num(v):
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)   # "inf", "nan" as the results writer stores them
        except ValueError:
            return None
    return None


def parse_threshold(spec: str) -> Threshold:
    s = (spec or "").strip()
    if ":" not in s:
        raise ThresholdError(f"threshold {spec!r}: missing ':' between metric and amount; {THRESHOLD_HELP}")
    metric, _, rest = s.partition(":")
    if not metric:
        raise ThresholdError(f"threshold {spec!r}: no metric name before ':'; {THRESHOLD_HELP}")
    if not rest or rest[0] not in "+-":
        raise ThresholdError(f"threshold {spec!r}: the amount must start with + (growth is bad) or - "
                             f"(a drop is bad); {THRESHOLD_HELP}")
    m = THRESHOLD_RE.match(s)
    if not m:
        raise ThresholdError(f"threshold {spec!r}: cannot read {rest!r} as an amount; {THRESHOLD_HELP}")
    amount = float(m.group("amount"))
    pct = bool(m.group("pct"))
    return Threshold(metric, +1 if m.group("sign") == "+" else -1, amount / 100 if pct else amount, pct, s)


# Thresholds compare and gate apply unless told otherwise (--no-default-thresholds); a --threshold on the same
# metric replaces its default. Every case is seeded and deterministic: an unchanged build reproduces each metric
# exactly (bitwise on the CPU), so any growth is a change of the implementation. The margins leave room for a
# legitimate change of evaluation order (same rounding steps, re-associated), which changes the pattern of the
# rounding errors but not their distribution:
# * calc_diff:+20%  - calc_diff is a sum of n squared errors over the output; with independent errors its
#   relative spread is sqrt(2/n): 4.5 % at n = 1,000 elements (the smallest outputs of most cases), so +20 % is
#   about 4.5 sigma there. Below ~100 elements (sqrt(2/n) > 14 %) a re-association alone can pass it.
# * worst_over_bound:+50% - the largest |error| / bound over n elements: for n = 1,000 Gaussian errors the max is
#   about 3.2 sigma with a spread of about 0.4 sigma (12 %), so +50 % is about 4 spreads.
DEFAULT_THRESHOLDS = ("calc_diff:+20%", "worst_over_bound:+50%")


def parse_thresholds(specs, *, defaults: bool = False) -> list[Threshold]:
    """Parse ``metric:(+|-)amount[%]`` specs; with ``defaults`` the DEFAULT_THRESHOLDS are added for every
    metric the specs do not name."""
    out = [parse_threshold(s) for s in specs or []]
    seen = {}
    for t in out:
        if t.metric in seen:
            raise ThresholdError(f"threshold for {t.metric!r} given twice ({seen[t.metric]!r} and {t.spec!r})")
        seen[t.metric] = t.spec
    if defaults:
        out += [t for t in map(parse_threshold, DEFAULT_THRESHOLDS) if t.metric not in seen]
    return out


@dataclass
class Change:
    key: tuple
    a: dict | None
    b: dict | None
    reasons: list = field(default_factory=list)

    @property
    def subject(self):
        return self.key[0]

    @property
    def case_id(self):
        return self.key[1]

    @property
    def level(self):
        return self.key[3]

    def to_json(self) -> dict:
        def slim(r):
            if r is None:
                return None
            return {k: r.get(k) for k in ("verdict", "message", "metrics", "bounds", "function", "backend",
                                          "device", "dialect", "component")}
        return {"key": key_str(self.key), "subject": self.key[0], "case_id": self.key[1], "check": self.key[2],
                "level": self.key[3], "a": slim(self.a), "b": slim(self.b), "reasons": self.reasons}


@dataclass
class Comparison:
    a: Run
    b: Run
    thresholds: list
    worse: list = field(default_factory=list)
    better: list = field(default_factory=list)
    backend_changed: list = field(default_factory=list)
    new: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    provided_changed: list = field(default_factory=list)
    unchanged: int = 0

    @property
    def counts(self) -> dict:
        return {"worse": len(self.worse), "better": len(self.better), "backend-changed": len(self.backend_changed),
                "provided-changed": len(self.provided_changed), "new": len(self.new), "missing": len(self.missing),
                "unchanged": self.unchanged}

    def to_json(self) -> dict:
        return {"a": self.a.label(), "b": self.b.label(), "thresholds": [t.spec for t in self.thresholds],
                "counts": self.counts, **{k: [c.to_json() for c in getattr(self, k.replace("-", "_"))]
                                          for k in ("worse", "better", "backend-changed", "provided-changed", "new",
                                                    "missing")}}


def compare(a: Run, b: Run, thresholds: list[Threshold] | None = None) -> Comparison:
    thresholds = list(thresholds or [])
    ka, kb = a.by_key, b.by_key
    res = Comparison(a, b, thresholds)
    # a crashed case has one row (level "-") where it would have had one per level: it stands for them all
    crashed_a, crashed_b = _crashed(ka), _crashed(kb)
    cases_a, cases_b = {k[:3] for k in ka}, {k[:3] for k in kb}
    for k in sorted(set(ka) | set(kb)):
        ra, rb = ka.get(k), kb.get(k)
        if ra is None:
            if k[:3] in crashed_a and rb["verdict"] != "crashed":
                res.better.append(Change(k, crashed_a[k[:3]], rb, [f"verdict crashed -> {rb['verdict']}"]))
            elif not (rb["verdict"] == "crashed" and k[:3] in cases_a):
                res.new.append(Change(k, None, rb, [f"new: {rb['verdict']}"]))
            continue
        if rb is None:
            if k[:3] in crashed_b and ra["verdict"] != "crashed":
                cr = crashed_b[k[:3]]
                what = (cr.get("extra") or {}).get("crash", {}).get("what") or "the case crashed"
                res.worse.append(Change(k, ra, cr, [f"verdict {ra['verdict']} -> crashed ({what})"]))
            elif not (ra["verdict"] == "crashed" and k[:3] in cases_b):
                res.missing.append(Change(k, ra, None, [f"missing (was {ra['verdict']})"]))
            continue
        va, vb = VERDICT_RANK.get(ra["verdict"], 0), VERDICT_RANK.get(rb["verdict"], 0)
        worse, better = [], []
        if (ra["verdict"] in UNJUDGED) != (rb["verdict"] in UNJUDGED):
            why_b = f" ({rb.get('message', '')})" if rb["verdict"] in UNJUDGED and rb.get("message") else ""
            res.provided_changed.append(Change(k, ra, rb, [f"verdict {ra['verdict']} -> {rb['verdict']}{why_b}"]))
            continue
        if vb > va:
            worse.append(f"verdict {ra['verdict']} -> {rb['verdict']}")
        elif vb < va:
            better.append(f"verdict {ra['verdict']} -> {rb['verdict']}")
        ma, mb = ra.get("metrics") or {}, rb.get("metrics") or {}
        for name in sorted(set(ma) & set(mb)):
            for t in thresholds:
                if t.matches(name):
                    j = t.judge(ma[name], mb[name])
                    if j:
                        (worse if j[0] == "worse" else better).append(j[1].replace(t.metric, name, 1))
        changed = False
        if worse:
            res.worse.append(Change(k, ra, rb, worse))
            changed = True
        elif better:
            res.better.append(Change(k, ra, rb, better))
            changed = True
        fa, fb = (ra.get("function"), ra.get("backend")), (rb.get("function"), rb.get("backend"))
        if fa != fb:
            res.backend_changed.append(Change(k, ra, rb, [f"{fa[0]} [{fa[1]}] -> {fb[0]} [{fb[1]}]"]))
            changed = True
        if not changed:
            res.unchanged += 1
    return res


def _crashed(rows: dict) -> dict:
    """(subject, case_id, check) -> its crashed row."""
    return {k[:3]: r for k, r in rows.items() if r.get("verdict") == "crashed"}


def format_text(c: Comparison, limit: int = 50) -> str:
    lines = [f"A: {c.a.label()}", f"B: {c.b.label()}"]
    if c.thresholds:
        lines.append("thresholds: " + ", ".join(t.spec for t in c.thresholds))
    lines.append("  ".join(f"{k}: {v}" for k, v in c.counts.items()))
    for title, items in (("WORSE", c.worse), ("BETTER", c.better), ("BACKEND CHANGED", c.backend_changed),
                         ("PROVIDED CHANGED", c.provided_changed), ("NEW", c.new), ("MISSING", c.missing)):
        if not items:
            continue
        lines.append(f"\n{title} ({len(items)})")
        for ch in items[:limit]:
            lines.append(f"  {ch.subject} {ch.case_id} [{ch.key[2]}/{ch.level}]: {'; '.join(ch.reasons)}")
        if len(items) > limit:
            lines.append(f"  ... {len(items) - limit} more (see the HTML page)")
    return "\n".join(lines) + "\n"


__all__ = ["Threshold", "ThresholdError", "parse_threshold", "parse_thresholds", "compare", "Comparison",
           "Change", "format_text", "row_key"]
