"""`helios-rt bench` and `helios-rt profile`: arguments, suites, and the printed tables."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from .. import profiling
from ..options import add_engine_arguments, engine_argv, engine_config, engine_option, positive_int
from ..profiling import nvtx_range
from .attention import attention_rows
from .projection import projection_rows
from .side_by_side import run_cpu_suite
from .stream import run_gpu_suite
from .table import Row, format_rows, format_table, rows_json

SUITES = ("auto", "cpu", "gpu", "projection")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="run the benchmarks that fit this machine and print one table",
        description="Projection (always); CPU side by side with diffusers (on CPU); GPU stream (on CUDA).",
    )
    p.add_argument("--suite", choices=SUITES, default="auto",
                   help="auto: projection + cpu without CUDA, projection + gpu with it")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--chunks", type=_at_least(2), default=3, help="chunks per measured run (>= 2)")
    p.add_argument("--rounds", type=_at_least(1), default=2, help="CPU suite: best of this many runs")
    p.add_argument("--verbose", action="store_true", help="also print the projection's per-op-class tables")
    p.add_argument("--engine-option", action="append", default=[], type=_engine_option, metavar="KEY=VALUE",
                   help="CPU suite: an engine option for helios_rt's side, e.g. graphs=chunk")  # fmt: skip
    return p


def _engine_option(text: str) -> tuple[str, object]:
    """`--engine-option KEY=VALUE`: an engine option of the CLI's table (helios_rt.options), parsed as the CLI does."""
    return engine_option(text)


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def suites_for(suite: str, cuda: bool | None = None) -> list[str]:
    """The suites `--suite` runs on this machine."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if suite == "auto":
        return ["projection", "gpu" if cuda else "cpu"]
    if suite == "gpu" and not cuda:
        raise ValueError("--suite gpu needs a CUDA device; this machine has none")
    return [suite] if suite == "projection" else ["projection", suite]


def run_bench(args: argparse.Namespace) -> int:
    try:
        suites = suites_for(args.suite)
    except ValueError as err:
        print(f"helios-rt bench: error: {err}", file=sys.stderr)
        return 2
    rows: list[Row] = []
    notes: list[str] = []
    for suite in suites:
        print(f"helios-rt bench: running the {suite} suite ...", file=sys.stderr, flush=True)
        if suite == "projection":
            proj, text = projection_rows()
            rows += proj
            if getattr(args, "verbose", False):
                notes.append(text)
        elif suite == "cpu":
            try:
                import diffusers  # noqa: F401
            except ImportError:
                print("helios-rt bench: the cpu suite needs diffusers (pip install helios_rt[dev]); skipped",
                      file=sys.stderr)  # fmt: skip
                continue
            overrides = dict(getattr(args, "engine_option", []))
            result = run_cpu_suite(chunks=args.chunks, rounds=args.rounds, engine_overrides=overrides)
            rows += result.rows()
            notes.append(f"cpu: {result.config}, {result.threads} threads, per steady-state chunk")
        else:
            for result in run_gpu_suite(chunks=args.chunks):
                rows += result.rows()
            rows += attention_rows()  # each installed attention backend at the stage-2 shape (TFLOP/s)
    if args.json:
        print(rows_json(rows))
    else:
        for note in notes:
            print(note)
        print(format_rows(rows, title="helios-rt bench"))
    return 0


# ==== `helios-rt profile` ============================================================================


def add_profile_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile",
        help="print the Nsight Systems command line and run a short generation with NVTX ranges on",
        description="Runs warm-up chunks, then the chunks inside the NVTX range "
        f"'{profiling.CAPTURE_RANGE}' that the printed nsys command records.",
    )
    p.add_argument("--model", required=True, help="'demo' or a Helios checkpoint folder")
    p.add_argument("--prompt", default="a tropical fish among corals")
    p.add_argument("--seed", type=int, default=0)
    add_engine_arguments(p)
    p.add_argument("--warmup-chunks", type=int, default=1, help="chunks before the recorded range")
    p.add_argument("--chunks", type=positive_int, default=2, help="chunks inside the recorded range")
    p.add_argument("--output", default="helios_rt_profile", help="the nsys report name")
    p.add_argument("--print-only", action="store_true", help="print the nsys command line and exit")
    return p


def profile_argv(args: argparse.Namespace) -> list[str]:
    """The `helios-rt profile ...` arguments that reproduce `args` (what nsys is told to run)."""
    argv = ["profile", "--model", str(args.model), "--prompt", args.prompt, "--seed", str(args.seed)]
    argv += engine_argv(args)
    argv += ["--warmup-chunks", str(args.warmup_chunks), "--chunks", str(args.chunks)]
    return argv


def run_profile(args: argparse.Namespace, out=None) -> int:
    from ..engine import Engine

    out = out or sys.stdout
    if args.warmup_chunks < 0:
        print("helios-rt profile: error: --warmup-chunks must be >= 0", file=sys.stderr)
        return 2
    print("Nsight Systems command line (records the chunks inside the range "
          f"'{profiling.CAPTURE_RANGE}'):", file=out)  # fmt: skip
    print("  " + profiling.nsys_command(profile_argv(args), output=args.output), file=out)
    if args.print_only:
        return 0
    if not profiling.available():
        print("helios-rt profile: the nvtx package is not installed: ranges are off (pip install nvtx)", file=out)
    previous = profiling._enabled
    profiling.set_enabled(True)
    try:
        return _profile_run(args, out, Engine, engine_config(args))
    finally:
        profiling.set_enabled(previous)


def _profile_run(args, out, engine_cls, config) -> int:
    t0 = time.perf_counter()
    with nvtx_range("load", color="blue"):
        engine = engine_cls.from_pretrained(args.model, config)
        engine.warmup()  # the chunk graphs are captured before the recorded range, not inside it
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    load_s = time.perf_counter() - t0
    fpc = engine.vae.config.num_frames(engine.config.sampling.value("latent_frames_per_chunk"))
    total = args.warmup_chunks + args.chunks
    rows = []
    with engine.generate_stream(args.prompt, num_frames=fpc * total, seed=args.seed) as stream:
        chunks = iter(stream)
        for _ in range(args.warmup_chunks):
            rows.append(_profile_row(next(chunks), "warm-up", engine))
        with nvtx_range(profiling.CAPTURE_RANGE, color="red"):
            for _ in range(args.chunks):
                rows.append(_profile_row(next(chunks), "recorded", engine))
    print(f"loaded {args.model} in {load_s:.2f} s on {engine.device} at {config.height}x{config.width}; "
          f"NVTX ranges {'on' if profiling.enabled() else 'off (no nvtx package)'}", file=out)  # fmt: skip
    print(format_table(("chunk", "phase", "transformer s", "decode s", "frames"), rows), file=out)
    return 0


def _profile_row(chunk, phase: str, engine) -> tuple:
    """A handed-over chunk's own timings (stream events: reading them needs no synchronize, which
    would serialise the decode lane with the next chunk in the recorded timeline)."""
    t = chunk.timings
    return (str(chunk.index), phase, t.get("transformer_s"), t.get("decode_s"), len(chunk.frames))


def main(argv: list[str] | None = None) -> int:
    """`python -m helios_rt.benchmarking bench|profile ...` (the same as `helios-rt bench|profile`)."""
    parser = argparse.ArgumentParser(prog="helios-rt")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    add_profile_parser(sub)
    args = parser.parse_args(argv)
    try:
        return run_bench(args) if args.command == "bench" else run_profile(args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"helios-rt: error: {err}", file=sys.stderr)
        return 2
