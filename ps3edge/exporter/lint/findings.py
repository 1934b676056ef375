"""The lint's results: one `Finding` per problem, a `LintReport` of them, their order by severity,
and `group_findings`, which folds the ones that differ only in names for display."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

SEVERITIES = ("error", "warning")


@dataclass
class Finding:
    severity: str          # "error" | "warning"
    check: str             # see the package docstring (ps3edge/exporter/lint/__init__.py)
    node: str              # node name, or the tensor / graph element concerned
    op: str                # op type, or "graph" / "input" / "output"
    message: str           # one line
    stage: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LintReport:
    trt_version: str
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    largest_tensor: int = 0        # elements of the largest tensor at the profile max

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"trt_version": self.trt_version, "ok": self.ok, "errors": len(self.errors),
                "warnings": len(self.warnings), "largest_tensor": self.largest_tensor,
                "notes": list(self.notes), "findings": [f.to_dict() for f in self.findings]}


def sort_findings(report: LintReport) -> None:
    """Errors first, then warnings; the order of the checks kept within each (a stable sort)."""
    order = {s: i for i, s in enumerate(SEVERITIES)}
    report.findings.sort(key=lambda f: order.get(f.severity, 9))


def group_findings(findings: list[Finding]) -> list[tuple[Finding, int]]:
    """Fold findings that differ only in node and tensor names (one per block, say): the first of
    each group and how many there are, in order."""
    groups: dict[tuple, list] = {}
    for f in findings:
        key = (f.severity, f.stage, f.check, f.op, re.sub(r"'[^']*'", "''", f.message))
        groups.setdefault(key, [f, 0])[1] += 1
    return [(f, n) for f, n in groups.values()]
