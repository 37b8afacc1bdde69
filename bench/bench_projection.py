"""The H100 projection of Helios 14B at 384x640 (batch 1, 1+1+1 steps), priced from the planned chunk.

Timed: planning and pricing the 14B's first and steady chunk kinds and its VAE decode on meta tensors
(bf16; the FP8 plan is cached within the process). Printed: the headline table, the per-section table,
the ten costliest ops and the bytes by op class; `benchmark.extra_info` keeps the key numbers.

    pytest bench/bench_projection.py --benchmark-only -s
"""

from __future__ import annotations

from helios_rt.benchmarking.projection import projection_rows
from helios_rt.compile import cost


def test_projection_14b_384x640(benchmark, capsys) -> None:
    chunk = benchmark.pedantic(cost.helios_14b_chunk, rounds=1, iterations=1)
    rows, text = projection_rows(verbose=True)
    for row in rows:
        benchmark.extra_info[row.metric] = round(row.helios_rt, 4)
    benchmark.extra_info["steady_chunk_steps"] = len(chunk.steady.planned)
    with capsys.disabled():
        print("\n" + text)
    # HELIOS.md: ~0.55 PFLOP per chunk at one step per stage
    assert 0.50 <= chunk.steady.flops() / 1e15 <= 0.60
