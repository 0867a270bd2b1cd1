"""JUnit XML from gate outcomes, and a structural validator (what CI test publishers read).

One ``<testsuite>`` per subject; one ``<testcase>`` per (case, check, level) with ``classname`` =
``<subject>.<component>`` and ``name`` = ``<case id> [<check>/<level>]``. ``<failure>`` for a failing
verdict or a regression against the baseline, ``<error>`` for an error verdict or a crashed run,
``<skipped>`` for expected failures and for components the subject does not provide. Counts on every
suite and on the root agree with the children (``validate`` checks that).
"""

from __future__ import annotations

import socket
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TestOutcome:
    __test__ = False   # not a pytest test class

    suite: str
    classname: str
    name: str
    status: str                   # passed | failure | error | skipped
    message: str = ""
    kind: str = ""                # fail | regression | error | crash | xfail | not-provided | ...
    details: str = ""
    time_s: float = 0.0
    properties: dict = field(default_factory=dict)


def _clean(s: str) -> str:
    # XML 1.0 forbids most control characters; ElementTree would write them and break parsers
    return "".join(ch if ch in "\t\n\r" or ord(ch) >= 0x20 else f"\\x{ord(ch):02x}" for ch in str(s))


def write_junit(outcomes: list[TestOutcome], path: str | Path, *, name: str = "dsv4-conformance-gate",
                properties: dict | None = None) -> Path:
    suites = defaultdict(list)
    for o in outcomes:
        suites[o.suite].append(o)
    root = ET.Element("testsuites", name=name)
    tot = defaultdict(float)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for sname, items in suites.items():
        c = {k: sum(1 for o in items if o.status == k) for k in ("failure", "error", "skipped")}
        t = sum(o.time_s for o in items)
        s = ET.SubElement(root, "testsuite", name=_clean(sname), tests=str(len(items)), failures=str(c["failure"]),
                          errors=str(c["error"]), skipped=str(c["skipped"]), time=f"{t:.3f}", timestamp=stamp,
                          hostname=socket.gethostname())
        if properties:
            ps = ET.SubElement(s, "properties")
            for k, v in properties.items():
                ET.SubElement(ps, "property", name=_clean(k), value=_clean(v))
        for o in items:
            tc = ET.SubElement(s, "testcase", classname=_clean(o.classname), name=_clean(o.name),
                               time=f"{o.time_s:.3f}")
            if o.status in ("failure", "error"):
                e = ET.SubElement(tc, o.status, message=_clean(o.message[:1000]), type=_clean(o.kind or o.status))
                e.text = _clean(o.details or o.message)
            elif o.status == "skipped":
                ET.SubElement(tc, "skipped", message=_clean(o.message[:1000]))
            if o.status == "passed" and o.details:
                ET.SubElement(tc, "system-out").text = _clean(o.details)
        tot["tests"] += len(items)
        tot["failures"] += c["failure"]
        tot["errors"] += c["error"]
        tot["skipped"] += c["skipped"]
        tot["time"] += t
    for k in ("tests", "failures", "errors", "skipped"):
        root.set(k, str(int(tot[k])))
    root.set("time", f"{tot['time']:.3f}")
    ET.indent(root)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(p, encoding="utf-8", xml_declaration=True)
    return p


class JUnitError(ValueError):
    pass


def validate(path: str | Path) -> dict:
    """Parse and check structure and counts; returns the totals. Raises JUnitError naming the first problem."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise JUnitError(f"{path}: not well-formed XML: {e}") from None
    if root.tag != "testsuites":
        raise JUnitError(f"{path}: root is <{root.tag}>, expected <testsuites>")
    tot = defaultdict(int)
    for s in root:
        if s.tag != "testsuite":
            raise JUnitError(f"{path}: <{s.tag}> under <testsuites>")
        if not s.get("name"):
            raise JUnitError(f"{path}: a testsuite has no name")
        cases = s.findall("testcase")
        got = {"tests": len(cases), "failures": 0, "errors": 0, "skipped": 0}
        for tc in cases:
            if not tc.get("name") or not tc.get("classname"):
                raise JUnitError(f"{path}: testcase without name/classname in suite {s.get('name')}")
            float(tc.get("time", "0"))
            kids = [k.tag for k in tc if k.tag in ("failure", "error", "skipped")]
            if len(kids) > 1:
                raise JUnitError(f"{path}: testcase {tc.get('name')} has {kids}")
            for k in kids:
                got[{"failure": "failures", "error": "errors", "skipped": "skipped"}[k]] += 1
                el = tc.find(k)
                if k != "skipped" and el.get("message") is None:
                    raise JUnitError(f"{path}: <{k}> of {tc.get('name')} has no message")
        for k, v in got.items():
            if int(s.get(k, -1)) != v:
                raise JUnitError(f"{path}: suite {s.get('name')} says {k}={s.get(k)} but has {v}")
            tot[k] += v
        float(s.get("time", "0"))
    for k, v in tot.items():
        if int(root.get(k, -1)) != v:
            raise JUnitError(f"{path}: <testsuites> says {k}={root.get(k)} but its suites add up to {v}")
    return dict(tot)
