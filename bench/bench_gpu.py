"""The GPU stream (skipped without CUDA): FPS, time to first frame, lane and stage ms, peak memory.

Two models: the Helios 14B shape at 384x640 (bf16; random weights, or the checkpoint folder named by
`HELIOS_RT_CHECKPOINT`) and the built-in demo model. The default engine replays one CUDA graph per
chunk and decodes on a second stream:

- cold: the engine's first stream; its time to first frame includes the eager warm-up of each chunk
  kind and the graph captures;
- warm: after `Engine.warmup()`; time to first frame from the `generate_stream` call to chunk 0's
  frames on the host, steady-state FPS over chunks 1.., the transformer and decode milliseconds of
  each chunk from the stream's own CUDA events, peak memory (`torch.cuda.max_memory_allocated`);
- stages: a second engine with `graphs="off"` and no overlap, timed stage by stage with CUDA events
  (`benchmarking.StageTimer`): where the time of a chunk goes, not how fast the graphed engine is.

    python -m pytest bench/bench_gpu.py --benchmark-only -s
"""

from __future__ import annotations

import pytest
import torch

from helios_rt import benchmarking as hb

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CHUNKS = 4
TARGET_FPS = 19.5
IDS = ["demo", "helios-14b"]


@pytest.mark.parametrize("index", [0, 1], ids=IDS)
def test_gpu_stream(benchmark, index, capsys) -> None:
    label, factory, kwargs = hb.gpu_engines(CHUNKS)[index]
    engine = factory()
    cold = hb.measure_stream(engine, CHUNKS, label, stages=False, kind="cold", **kwargs)
    engine.warmup()
    warm = benchmark.pedantic(hb.measure_stream, args=(engine, CHUNKS, label), kwargs=kwargs, rounds=1, iterations=1)
    benchmark.extra_info.update(warm.extra_info())
    benchmark.extra_info["cold_ttff_s"] = round(cold.ttff_s, 6)
    with capsys.disabled():
        print("\n" + hb.format_rows(cold.rows() + warm.rows(), title=f"GPU stream: {label}"))
        if "14b" in label:
            print(f"steady-state {warm.steady_fps:.2f} FPS against the {TARGET_FPS} FPS target")
    assert warm.steady_fps > 0 and warm.ttff_s > 0
    del engine
    torch.cuda.empty_cache()


@pytest.mark.parametrize("index", [0, 1], ids=IDS)
def test_gpu_stages(benchmark, index, capsys) -> None:
    label, factory, kwargs = hb.gpu_engines(CHUNKS)[index]
    engine = factory(**hb.EAGER)
    hb.measure_stream(engine, 1, label, **kwargs)  # kernel selection, autotuning, caches
    result = benchmark.pedantic(
        hb.measure_stream, args=(engine, CHUNKS, label), kwargs={**kwargs, "stages": True, "kind": "stages"},
        rounds=1, iterations=1,
    )  # fmt: skip
    benchmark.extra_info.update(result.extra_info())
    with capsys.disabled():
        print("\n" + hb.format_rows(result.rows(), title=f"GPU stages (eager, no overlap): {label}"))
    assert result.stage_ms and all(ms > 0 for ms in result.stage_ms.values())
    del engine
    torch.cuda.empty_cache()
