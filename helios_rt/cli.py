"""`helios-rt`: the command line. `generate` streams a video to an mp4 as its chunks arrive.

Every failure is one line on stderr naming the problem and the fix, and an exit code that says whose
fix it is (a traceback only with `--debug`):

| code | meaning |
|---|---|
| 0 | done |
| 1 | an unexpected error (a bug: rerun with --debug and report the traceback) |
| 2 | usage: an option, a combination of options, the output path, the device |
| 3 | input: the prompt, prompt embeddings, image or video |
| 4 | checkpoint: missing, malformed or non-finite weights and configs |
| 5 | runtime: generation or writing failed (e.g. non-finite latents, disk full); frames written are kept |
| 130, 143 | stopped by SIGINT (Ctrl-C) or SIGTERM; frames written are kept |

Options are checked before any weight is read, so a bad option costs a second, not a model load.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import DTYPE_CHOICES
from .options import PLAN_OPTIONS, add_engine_arguments, engine_config, positive_int

EXIT_INTERNAL, EXIT_USAGE, EXIT_INPUT, EXIT_CHECKPOINT, EXIT_RUNTIME = 1, 2, 3, 4, 5


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="helios-rt", description="Helios video generation runtime")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a video and write it to an mp4 as it is made")
    gen.add_argument("--model", required=True, help="'demo' (built-in, bouncing shapes) or a Helios checkpoint folder")
    gen.add_argument("--prompt", default=None, help="the text (or pass --prompt-embeds)")
    gen.add_argument("--prompt-embeds", type=Path, default=None,
                     help="a .safetensors file with prompt_embeds [1, S, text_dim] (and optionally "
                     "negative_prompt_embeds), instead of --prompt")  # fmt: skip
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--image", type=Path, default=None, help="image-to-video: the first frame")
    gen.add_argument("--video", type=Path, default=None, help="video-to-video: the video to continue")
    gen.add_argument("--num-frames", type=positive_int, default=99)
    gen.add_argument("--seed", type=_seed, default=0)
    add_engine_arguments(gen)
    gen.add_argument("--fps", type=positive_int, default=24, help="the frame rate written into the mp4")
    gen.add_argument("--out", type=Path, default=Path("out.mp4"))
    gen.add_argument("--verbose", action="store_true",  # fmt: skip
                     help="print the cold start by phase: load, text encoder, plan, warm-up, capture, first chunk")
    gen.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="tracebacks on errors")
    from .benchmarking import add_bench_parser, add_profile_parser
    from .quantize import add_quantize_parser

    _add_plan_parser(sub)
    add_quantize_parser(sub)
    add_bench_parser(sub)
    add_profile_parser(sub)
    from .serve.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


# the CLI's EngineConfig (tests and older callers import it from here)
_engine_config = engine_config


def _add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """`plan`: the engine options that change a chunk's memory, from the same table, and the plan's own."""
    from .compile.report import __doc__ as plan_doc
    from .compile.report import run_plan

    p = subparsers.add_parser(
        "plan",
        help="plan the memory of every chunk kind at a resolution and say which GPUs it fits (no weights loaded)",
        description=plan_doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="helios-14b", help="'helios-14b', 'tiny' or a checkpoint folder")
    add_engine_arguments(p, PLAN_OPTIONS, height={"default": 384}, width={"default": 640},
                         dtype={"default": "bf16", "choices": DTYPE_CHOICES[1:]},
                         text_encoder_precision={"default": "native"})  # fmt: skip
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--text-len", type=positive_int, default=512)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_plan)
    return p


class Failure(Exception):
    """A failure the CLI reports as one line with `code`; `__cause__` is the original error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@contextmanager
def failing_as(code: int, os_error_code: int | None = None, anything: bool = False) -> Iterator[None]:
    """Report errors of one phase of a command with its exit code (typed errors keep their own).

    A ValueError or TypeError means the phase's kind of mistake (an option while parsing, an input
    while reading it); OSError may have its own code (reading a checkpoint: its files); `anything`
    makes every error the phase's own (while generating, all of them are runtime errors).
    """
    from .checkpoint import CheckpointError
    from .errors import GenerationError, InputError, UsageError

    typed = {CheckpointError: EXIT_CHECKPOINT, UsageError: EXIT_USAGE, InputError: EXIT_INPUT}
    try:
        yield
    except Failure:
        raise
    except Exception as err:
        kind = next((c for t, c in typed.items() if isinstance(err, t)), None)
        if kind is None and isinstance(err, GenerationError):
            kind = EXIT_RUNTIME
        if kind is None and isinstance(err, OSError) and os_error_code is not None:
            kind = os_error_code
        if kind is None and (anything or isinstance(err, (ValueError, TypeError, OSError))):
            kind = code
        if kind is None:
            raise
        raise Failure(kind, str(err) or type(err).__name__) from err


def generate(args: argparse.Namespace) -> int:
    from .interrupts import GracefulStop
    from .parallel.launch import follow, writes_output

    with failing_as(EXIT_USAGE):
        config = _check_options(args)
    with failing_as(EXIT_INPUT):
        inputs = _read_inputs(args)
    with GracefulStop() as stop:
        started = time.perf_counter()
        with failing_as(EXIT_USAGE, os_error_code=EXIT_CHECKPOINT):
            from .engine import Engine

            engine = Engine.from_pretrained(args.model, config)
        with failing_as(EXIT_INPUT):
            stream = engine.generate_stream(num_frames=args.num_frames, seed=args.seed, **inputs)
        if not writes_output():  # ranks 1..N-1 of a torchrun launch: compute their share, write nothing
            with failing_as(EXIT_RUNTIME, anything=True):
                return follow(stream)
        return _write(args, stream, stop, started)


def _check_options(args: argparse.Namespace):
    """Everything about the command that can be wrong, before a file is read or a weight loaded."""
    from .guards import check_device, check_output_path
    from .parallel.launch import writes_output

    if (args.prompt is None) == (args.prompt_embeds is None):
        raise _usage("pass exactly one of --prompt TEXT and --prompt-embeds FILE.safetensors")
    if args.image is not None and args.video is not None:
        raise _usage("pass --image (image-to-video) or --video (video-to-video), not both")
    if writes_output():  # under torchrun only rank 0 touches the output file
        check_output_path(args.out)
    _check_prompt_cleaning(args)
    config = _engine_config(args)
    check_device(config.resolved_device())
    config.resolved_overlap()  # the decode overlap needs CUDA: refused here rather than after the load
    return config


def _check_prompt_cleaning(args: argparse.Namespace) -> None:
    """A text prompt for a checkpoint's umT5 encoder is cleaned with ftfy: if missing, fail here, not after the load."""
    if args.prompt is None or args.model == "demo" or not (Path(args.model) / "text_encoder").is_dir():
        return
    from .model.text import require_ftfy

    try:
        require_ftfy()
    except ImportError as err:
        raise _usage(str(err)) from None


def _usage(message: str) -> Exception:
    from .errors import UsageError

    return UsageError(message)


def _read_inputs(args: argparse.Namespace) -> dict:
    """The prompt (checked), its embeddings, image and video, as `generate_stream` keywords."""
    from .model.text import validate_prompt
    from .prompt_file import read_prompt_embeds
    from .video import VideoFile, read_image

    inputs = dict(prompt=args.prompt, negative_prompt=args.negative_prompt)
    if args.prompt is not None:
        validate_prompt(args.prompt)
    if args.negative_prompt:
        validate_prompt(args.negative_prompt, "negative_prompt")
    if args.prompt_embeds is not None:
        inputs["prompt_embeds"], inputs["negative_prompt_embeds"] = read_prompt_embeds(args.prompt_embeds)
    inputs["image"] = read_image(args.image) if args.image else None
    inputs["video"] = VideoFile(args.video) if args.video else None  # checked now, decoded frame by frame later
    return inputs


def _write(args: argparse.Namespace, stream, stop, started: float) -> int:
    """Write the chunks as they come; a signal or a write error stops at a chunk boundary, keeping the file."""
    from .errors import OutputError
    from .interrupts import exit_code, signal_of
    from .video import Mp4Writer

    progress = _Progress(args.num_frames)
    with failing_as(EXIT_RUNTIME, anything=True), stream, Mp4Writer(args.out, fps=args.fps) as writer:
        try:
            for chunk in stream:
                with stop.deferred():  # a signal waits until the chunk is whole on disk
                    writer.write(chunk.video_frames)
                if chunk.index == 0:  # after the warm-up, which may have timed the attention backends
                    _announce_first_chunk(args, stream)
                progress.update(writer.frames_written)
        except Exception as err:
            if isinstance(err, OutputError):  # its message says what was kept
                raise
            raise Failure(EXIT_RUNTIME, f"{err}; kept {writer.frames_written} frames in {args.out}") from err
        except BaseException as err:
            signum = signal_of(err)
            if signum is None:
                raise
            name = "SIGINT" if err.__class__ is KeyboardInterrupt else "SIGTERM"
            progress.done(f"helios-rt: stopped by {name}: kept {writer.frames_written} frames in {args.out}")
            return exit_code(signum)
    progress.done(
        f"wrote {writer.frames_written} frames to {args.out} in {time.perf_counter() - started:.1f} s "
        f"({_stream_rates(stream)})"
    )
    return 0


def _announce_first_chunk(args: argparse.Namespace, stream) -> None:
    """The attention backend that runs (chosen, or timed at warm-up) and, with --verbose, the cold start."""
    print(f"\rhelios-rt: {stream.engine.attention.describe()}", file=sys.stderr)
    if getattr(args, "verbose", False):
        print(f"helios-rt: cold start: {_cold_start_line(stream.timings)}", file=sys.stderr)


def _cold_start_line(t: dict[str, float]) -> str:
    """`Stream.timings` as one line: each phase in seconds, the load's rate, where the plans came from."""
    parts = []
    if "load_s" in t:
        rate = f" ({t['load_gb_s']:.2f} GB/s)" if t.get("load_gb_s") else ""
        parts.append(f"load {t['load_s']:.2f} s{rate}")
    names = {"text_encoder_s": "text encoder", "condition_s": "image/video encode", "plan_s": "plan",
             "warmup_s": "warm-up runs", "capture_s": "capture", "first_chunk_s": "first chunk",
             "ttff_s": "first frame at"}  # fmt: skip
    for key, name in names.items():
        if key in t:
            extra = ""
            if key == "plan_s" and ("plans_loaded" in t or "plans_made" in t):
                extra = f" ({int(t.get('plans_loaded', 0))} loaded, {int(t.get('plans_made', 0))} made)"
            parts.append(f"{name} {t[key]:.2f} s{extra}")
    return ", ".join(parts)


def _stream_rates(stream) -> str:
    """Time to first frame and steady-state FPS, the two numbers a real-time user watches."""
    ttff, fps = stream.time_to_first_frame_s, stream.steady_fps
    rates = f"first frame after {ttff:.2f} s" if ttff is not None else "no frames"
    return rates + (f", then {fps:.1f} FPS" if fps is not None else "")


class _Progress:
    """A one-line progress bar on stderr (no dependency; quiet when stderr is not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done: int) -> None:
        elapsed = time.perf_counter() - self.start
        width = 30
        filled = min(width, width * done // max(self.total, 1))
        line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} frames {elapsed:6.1f} s"
        print(("\r" if self.tty else "") + line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def done(self, message: str) -> None:
        print(("\n" if self.tty else "") + message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from .errors import Interrupted

    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        return _run(args)
    except Failure as failure:
        return _report(failure.code, str(failure), failure.__cause__, debug)
    except (ValueError, FileNotFoundError) as err:  # plan, bench, profile: options and paths
        return _report(EXIT_USAGE, str(err), err, debug)
    except (KeyboardInterrupt, Interrupted, Exception) as err:
        from .interrupts import exit_code, signal_of

        signum = signal_of(err)
        if signum is not None:  # before the first chunk (while loading): nothing was written
            return _report(exit_code(signum), "stopped by a signal before any frame was written", err, debug)
        return _report(EXIT_INTERNAL, f"unexpected {type(err).__name__}: {err} (rerun with --debug)", err, debug)


def _run(args: argparse.Namespace) -> int:
    if args.command == "generate":
        return generate(args)
    if args.command == "plan":
        from .compile.report import run_plan

        return run_plan(args)
    if args.command in ("bench", "profile"):
        from .benchmarking import run_bench, run_profile

        return run_bench(args) if args.command == "bench" else run_profile(args)
    if args.command == "serve":
        return args.func(args)
    if args.command == "quantize":
        return args.func(args)
    return EXIT_INTERNAL


def _report(code: int, message: str, cause: BaseException | None, debug: bool) -> int:
    if debug and cause is not None:
        traceback.print_exception(cause, file=sys.stderr)
    print(f"helios-rt: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
