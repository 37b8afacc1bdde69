"""The results of a first-light run: checks (pass, fail or skip) and figures (measured beside projected).

A check decides the exit status; a figure never does (timings vary with the machine and its load).
Both are written as one JSON file and one markdown table into the output folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str = ""


@dataclass(frozen=True)
class Figure:
    """A measurement and, where the cost model has one, its projection for the same machine."""

    name: str
    measured: float
    unit: str
    projected: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """measured / projected (for a time, > 1 is slower than projected; for a rate, < 1 is)."""
        if self.projected is None or not self.projected or not math.isfinite(self.measured):
            return None
        return self.measured / self.projected


@dataclass
class Report:
    profile: str
    machine: dict[str, str]
    checks: list[Check] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    estimate: list[str] = field(default_factory=list)  # the dry run: the GPU run's own time estimate

    @property
    def ok(self) -> bool:
        """No check failed; on a GPU run a skipped check has already been turned into a failure."""
        return all(c.status != FAIL for c in self.checks)

    def to_dict(self) -> dict:
        figures = [{**asdict(f), "ratio": f.ratio} for f in self.figures]
        return {"profile": self.profile, "ok": self.ok, "machine": self.machine, "checks": [asdict(c) for c in
                self.checks], "figures": figures, "phase_seconds": self.phase_seconds,
                "gpu_estimate": self.estimate}  # fmt: skip

    def markdown(self) -> str:
        m = self.machine
        verdict = "all checks pass" if self.ok else "CHECKS FAILED"
        lines = [
            f"# helios_rt first light ({self.profile}): {verdict}",
            "",
            ", ".join(f"{k} {v}" for k, v in m.items()),
        ]
        lines += ["", "| check | result | detail |", "|---|---|---|"]
        lines += [f"| {c.name} | {c.status} | {_cell(c.detail)} |" for c in self.checks]
        lines += [
            "",
            "| figure | measured | projected | measured / projected | unit | note |",
            "|---|---|---|---|---|---|",
        ]
        for f in self.figures:
            lines.append(f"| {f.name} | {_num(f.measured)} | {_num(f.projected)} | {_num(f.ratio)} | {f.unit} | "
                         f"{_cell(f.note)} |")  # fmt: skip
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in self.phase_seconds.items())
        estimate = ["", *self.estimate] if self.estimate else []
        return "\n".join([*lines, "", f"time per phase: {phases}", *estimate, ""])

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        js, md = out_dir / "first_light.json", out_dir / "first_light.md"
        js.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n")
        md.write_text(self.markdown())
        return js, md


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")
