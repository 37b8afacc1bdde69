"""`python -m helios_rt.first_light OUT_DIR [--dry-run]`: run the checks, measure, write the report."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from .preflight import missing, preflight, preflight_table
from .profile import (
    PhaseEstimate,
    Profile,
    device_spec,
    dry_run_profile,
    estimate_lines,
    gpu_profile,
    gpu_time_estimate,
)
from .report import FAIL, Check, Figure, Report

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m helios_rt.first_light", description=__doc__)
    p.add_argument("out_dir", type=Path, help="folder for first_light.json, first_light.md and the pytest logs")
    p.add_argument("--dry-run", action="store_true", help="on CPU at the demo model's sizes (what CI runs)")
    p.add_argument(
        "--pytest-timeout", type=float, default=270.0, metavar="S", help="limit of the pytest runs (they run at once)"
    )
    return p.parse_args(argv)


def machine(profile: Profile, note: str) -> dict[str, str]:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "device": profile.device, "peak rates": note}  # fmt: skip
    if profile.device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=str(torch.version.cuda))
    return info


def _needs_interpreter(profile: Profile) -> bool:
    """A CPU run launches the Triton kernels on the interpreter, which triton reads at its first import."""
    return profile.dry_run and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def gpu_estimate(pytest_timeout: float) -> list[PhaseEstimate]:
    """The GPU profile's time estimate from its projected chunk on an H100 SXM (bf16 and FP8 GEMMs)."""
    from ..compile import cost
    from ..compile.cost import attention_rates as rates
    from ..fp8.projection import project_fp8

    g = gpu_profile()
    chunk = cost.trace_chunk(g.model, cost.ChunkShape(g.height, g.width, text_len=g.text_len), g.dtype, vae=True)
    p = project_fp8(chunk, g.steps, rates.efficiency_for("triton"))
    return gpu_time_estimate(pytest_timeout, p.bf16_seconds, p.vae_seconds, p.fp8_seconds)


def run(profile: Profile, out_dir: Path, pytest_timeout: float) -> Report:
    from .checks import head_dim_128_checks, test_checks
    from .fp8 import fp8_rows
    from .measure import measure

    spec, note = device_spec(profile.device)
    report = Report(profile.name, machine(profile, note))
    measured = []  # the bf16 engine's results, which the FP8 phase compares with

    def engine() -> tuple[list[Check], list[Figure]]:
        measured.append(measure(profile, spec))
        return measured[0].checks, measured[0].figures

    phases = [
        ("tests", lambda: (test_checks(profile, out_dir, pytest_timeout), [])),
        ("head dim 128 kernels", lambda: (head_dim_128_checks(profile), [])),
        ("engine", engine),
        ("fp8", lambda: fp8_rows(profile, measured[0] if measured else None, spec)),
    ]
    for name, phase in phases:
        t0 = time.perf_counter()
        try:
            checks, figures = phase()
        except Exception as err:  # a phase that crashes is a failed check, and the next phases still run
            checks, figures = [Check(f"{name} phase", FAIL, f"{type(err).__name__}: {err}")], []
        report.checks += checks
        report.figures += figures
        report.phase_seconds[name] = time.perf_counter() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("first light: no CUDA device here; run it on the GPU machine, or pass --dry-run to run the same "
              "script on CPU at tiny shapes", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    profile = dry_run_profile() if args.dry_run else gpu_profile()
    if _needs_interpreter(profile):  # triton may be imported already: start again with the interpreter on
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        again = sys.argv[1:] if argv is None else list(argv)  # the caller's arguments, not this process's
        os.execve(sys.executable, [sys.executable, "-m", "helios_rt.first_light", *again], env)
    reqs = preflight(args.dry_run)  # before any GPU minute is spent: everything missing, with its fix
    print(preflight_table(reqs))
    if missing(reqs):
        names = ", ".join(r.name for r in missing(reqs))
        print(f"first light: missing {names}: install what the fix column says, then run again", file=sys.stderr)
        return EXIT_USAGE
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = run(profile, args.out_dir, args.pytest_timeout)
    report.phase_seconds["total"] = time.perf_counter() - t0
    if profile.dry_run:
        report.estimate = estimate_lines(gpu_estimate(args.pytest_timeout))
    js, md = report.write(args.out_dir)
    print(report.markdown())
    print(f"first light: wrote {js} and {md}; {'all checks pass' if report.ok else 'some checks FAILED'}")
    return EXIT_OK if report.ok else EXIT_FAILED
