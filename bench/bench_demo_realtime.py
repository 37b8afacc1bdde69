"""The demo plays in real time on a CPU: a chunk is generated at least as fast as it plays.

    python -m pytest bench/bench_demo_realtime.py --benchmark-only -s

One chunk of the demo (33 frames at 24 fps plays for 1.375 s) at its own size and sampling defaults,
steady state (the stream's first chunk, which also plans, is run before timing). The bench records
the chunk time and the real-time factor (play time / generate time; >= 1 is real time) in
`extra_info`, and prints them; a regression shows as a slower benchmark, never as a failed test.
"""

from __future__ import annotations

import pytest

from helios_rt import Engine
from helios_rt.demo import DEMO_CHECKPOINT, DEMO_PROMPT
from helios_rt.video import Video

pytestmark = pytest.mark.skipif(
    not (DEMO_CHECKPOINT / "model_index.json").is_file(), reason="the demo checkpoint is not built"
)


def test_demo_chunk_realtime(benchmark):
    engine = Engine.from_pretrained("demo")
    stream = engine.generate_stream(DEMO_PROMPT, seed=0)
    chunks = iter(stream)
    first = next(chunks)
    play_s = len(first.frames) / Video.fps  # the video writer's rate, 24 fps
    benchmark.pedantic(lambda: next(chunks), rounds=5, iterations=1)
    stream.close()
    chunk_s = benchmark.stats.stats.median
    benchmark.extra_info.update(chunk_s=chunk_s, play_s=play_s, realtime_factor=play_s / chunk_s)
    print(f"\ndemo chunk: {chunk_s:.3f} s to generate, {play_s:.3f} s to play: {play_s / chunk_s:.2f}x real time")
