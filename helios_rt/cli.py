"""`helios-rt`: the command line. `generate` streams a video to an mp4 as its chunks arrive."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {value}")
    return value


def _steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"steps per stage look like '1,1,1', got {text!r}") from None
    return steps


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The EngineConfig options every command that builds an engine takes (read by `_engine_config`)."""
    parser.add_argument("--height", type=_positive_int, default=None)
    parser.add_argument("--width", type=_positive_int, default=None)
    parser.add_argument("--steps", type=_steps, default=None, help="steps per pyramid stage, e.g. 1,1,1")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kernels", default="auto", choices=["auto", "reference", "triton"])
    parser.add_argument("--graphs", default="auto", choices=["auto", "chunk", "step", "off"],
                        help="CUDA graphs: chunk (one replay per chunk), step (one per step: finer Nsight "
                        "timelines), off (eager)")  # fmt: skip
    parser.add_argument("--fps", type=_positive_int, default=24)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="helios-rt", description="Helios video generation runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a video and write it to an mp4 as it is made")
    gen.add_argument("--model", required=True, help="'demo' (built-in, untrained) or a Helios checkpoint folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--image", type=Path, default=None, help="image-to-video: the first frame")
    gen.add_argument("--video", type=Path, default=None, help="video-to-video: the video to continue")
    gen.add_argument("--num-frames", type=_positive_int, default=99)
    gen.add_argument("--seed", type=_seed, default=0)
    add_engine_arguments(gen)
    gen.add_argument("--out", type=Path, default=Path("out.mp4"))
    from .benchmarking import add_bench_parser, add_profile_parser
    from .compile.report import add_plan_parser

    add_plan_parser(sub)
    add_bench_parser(sub)
    add_profile_parser(sub)
    return parser


def _engine_config(args: argparse.Namespace):
    from .config import EngineConfig
    from .demo import DEMO_HEIGHT, DEMO_WIDTH

    is_demo = args.model == "demo"
    height = args.height or (DEMO_HEIGHT if is_demo else 384)
    width = args.width or (DEMO_WIDTH if is_demo else 640)
    return EngineConfig(
        height=height,
        width=width,
        device=args.device,
        dtype=args.dtype,
        kernels=args.kernels,
        graphs=args.graphs,
        pyramid_steps=args.steps,
        fps=args.fps,
    )


def generate(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .video import Mp4Writer, read_image, read_video

    image = read_image(args.image) if args.image else None
    video = read_video(args.video) if args.video else None
    started = time.perf_counter()
    engine = Engine.from_pretrained(args.model, _engine_config(args))
    stream = engine.generate_stream(
        args.prompt,
        image=image,
        video=video,
        num_frames=args.num_frames,
        seed=args.seed,
        negative_prompt=args.negative_prompt,
    )
    progress = _Progress(args.num_frames)
    with Mp4Writer(args.out, fps=args.fps) as writer, stream:
        for chunk in stream:
            writer.write(chunk.video_frames)
            progress.update(writer.frames_written)
    progress.done(
        f"wrote {writer.frames_written} frames to {args.out} in {time.perf_counter() - started:.1f} s "
        f"({_stream_rates(stream)})"
    )
    return 0


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
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return generate(args)
        if args.command == "plan":
            from .compile.report import run_plan

            return run_plan(args)
        if args.command in ("bench", "profile"):
            from .benchmarking import run_bench, run_profile

            return run_bench(args) if args.command == "bench" else run_profile(args)
    except (ValueError, FileNotFoundError) as err:  # CheckpointError is a ValueError
        print(f"helios-rt: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
