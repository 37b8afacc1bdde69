"""Benchmarks of the runtime, and the `helios-rt bench` / `helios-rt profile` commands.

Three suites, each a plain function (the pytest-benchmark files in `bench/` call the same ones):

- `projection`: the 14B model at 384x640 on an H100 from the cost model (`compile.cost`), at one
  step per stage and at two. Runs anywhere (meta tensors).
- `cpu`: helios_rt side by side with `diffusers.HeliosPyramidPipeline` on identical small weights
  (`SideBySide`): seconds, CPU seconds, peak resident memory, aten ops dispatched and tensor
  allocations per steady-state chunk, and the latents of both, which must agree. Needs diffusers.
- `gpu`: end-to-end FPS, time to first frame, per-stage milliseconds (CUDA events) and peak memory
  of a stream (`measure_stream`), for the 14B shape with random weights (or the checkpoint in
  `HELIOS_RT_CHECKPOINT`) and for the demo model. Needs CUDA; the same code runs on CPU with
  host timers, which is how the tests cover it.

Steady state: chunk 0 is special (doubled steps for distilled checkpoints, history all zeros, first
calls), so "per chunk" numbers are means over chunks 1.., read at chunk boundaries.
"""

from .commands import add_bench_parser, add_profile_parser, main, profile_argv, run_bench, run_profile, suites_for
from .measure import OpCounter, cpu_seconds, peak_rss_bytes, ratio, release_free_memory, reset_peak_rss, rss_bytes
from .projection import projection_rows
from .side_by_side import (
    FRAMES_PER_CHUNK,
    LATENT_TOLERANCE,
    SXS_SEED,
    SideBySide,
    SideBySideResult,
    SideMeasure,
    build_reference_pipeline,
    run_cpu_suite,
)
from .stream import (
    CHECKPOINT_ENV,
    EAGER,
    EAGER_SWITCHES,
    StageTimer,
    StreamResult,
    chunk_rates,
    gpu_engines,
    graphed,
    measure_stream,
    random_engine,
    run_gpu_suite,
    summarize_ms,
)
from .table import BENCH_HEADERS, Row, format_rows, format_table, format_value, rows_json

__all__ = [
    "BENCH_HEADERS",
    "CHECKPOINT_ENV",
    "EAGER",
    "EAGER_SWITCHES",
    "FRAMES_PER_CHUNK",
    "LATENT_TOLERANCE",
    "SXS_SEED",
    "OpCounter",
    "Row",
    "SideBySide",
    "SideBySideResult",
    "SideMeasure",
    "StageTimer",
    "StreamResult",
    "add_bench_parser",
    "add_profile_parser",
    "build_reference_pipeline",
    "chunk_rates",
    "cpu_seconds",
    "format_rows",
    "format_table",
    "format_value",
    "gpu_engines",
    "graphed",
    "main",
    "measure_stream",
    "peak_rss_bytes",
    "profile_argv",
    "projection_rows",
    "random_engine",
    "ratio",
    "release_free_memory",
    "reset_peak_rss",
    "rows_json",
    "rss_bytes",
    "run_bench",
    "run_cpu_suite",
    "run_gpu_suite",
    "run_profile",
    "suites_for",
    "summarize_ms",
]
