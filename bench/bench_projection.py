"""The H100 projection of Helios 14B at 384x640 (bf16, batch 1) from the cost model, on any machine.

Timed: tracing one chunk of the 14B model on meta tensors (every aten op of the three stage forwards,
the sampler steps, the transitions, the start noise, the history embedding, the text K/V and the VAE
decode). Printed: the projection table at one step per stage (the real-time setting) and at two, with
the efficiency assumptions; `benchmark.extra_info` keeps the key numbers for `--benchmark-compare`.

    pytest bench/bench_projection.py --benchmark-only -s
"""

from __future__ import annotations

import torch

from helios_rt.compile import cost
from helios_rt.config import HELIOS_14B

STEPS = {"1step": (1, 1, 1), "2step": (2, 2, 2)}


def _extra(chunk: cost.ChunkCost, steps: tuple[int, ...]) -> dict[str, float]:
    ref = cost.project(chunk, steps=steps)
    fus = cost.project(chunk, steps=steps, fused=True)
    info = {
        "pflop": chunk.flops(steps) / 1e15,
        "gb_reference": ref.total(attr="bytes") / 1e9,
        "gb_fused": fus.total(attr="bytes") / 1e9,
        "ms_reference": ref.seconds * 1e3,
        "ms_fused": fus.seconds * 1e3,
        "fps_reference": ref.fps,
        "fps_fused": fus.fps,
    }
    if fus.vae_rows:
        info["fps_fused_with_vae"] = fus.fps_with_vae
        info["fps_reference_with_vae"] = ref.fps_with_vae
    for st in chunk.stages:
        info[f"stage{st.index}_tflop_per_forward"] = st.forward.flops() / 1e12
        info[f"stage{st.index}_ms_fused"] = fus.total(f"stage {st.index}") * 1e3
    return info


def test_projection_14b_384x640(benchmark, capsys) -> None:
    chunk = benchmark.pedantic(
        cost.trace_chunk,
        args=(HELIOS_14B, cost.ChunkShape(), torch.bfloat16),
        kwargs={"label": "Helios 14B", "vae": True},
        rounds=1,
        iterations=1,
    )
    benchmark.extra_info["ops_traced"] = sum(len(st.forward.ops) for st in chunk.stages)
    benchmark.extra_info["paper_fps"] = cost.PAPER_FPS
    for key, steps in STEPS.items():
        for name, value in _extra(chunk, steps).items():
            benchmark.extra_info[f"{key}_{name}"] = round(value, 4)
    with capsys.disabled():
        for steps in STEPS.values():
            print("\n" + cost.format_projection(chunk, steps))
    # HELIOS.md: ~0.55 PFLOP per chunk at one step per stage, ~1.10 at two
    assert 0.52 <= benchmark.extra_info["1step_pflop"] <= 0.58
    assert 1.04 <= benchmark.extra_info["2step_pflop"] <= 1.16
