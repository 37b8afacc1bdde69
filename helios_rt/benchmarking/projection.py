"""The Helios 14B projection for an H100 from the cost model (`compile.cost`), priced with the attention
backend that would run there and with the VAE decode inside the end-to-end FPS."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .table import Row


def projection_rows(steps_list: Sequence[tuple[int, ...]] = ((1, 1, 1), (2, 2, 2))) -> tuple[list[Row], str]:
    """The 14B at 384x640, bf16, H100 projection: summary rows, and the full tables as text."""
    from ..compile import cost
    from ..compile.cost import attention_rates as rates
    from ..config import HELIOS_14B
    from ..fp8.projection import project_fp8

    chunk = cost.trace_chunk(HELIOS_14B, cost.ChunkShape(), torch.bfloat16, label="Helios 14B", vae=True)
    selection = rates.h100_selection()
    eff = rates.efficiency_for(selection.backend)
    rows, text = [], []
    for steps in steps_list:
        tag = ",".join(map(str, steps))
        ref = cost.project(chunk, efficiency=eff, steps=steps)
        fus = cost.project(chunk, efficiency=eff, steps=steps, fused=True)
        rows += [
            Row("projection", f"14B 384x640 steps {tag}: PFLOP / chunk", chunk.flops(steps) / 1e15, None, "PFLOP"),
            Row("projection", f"14B 384x640 steps {tag}: ms / chunk (fused)", fus.seconds * 1e3, None, "ms"),
            Row("projection", f"14B 384x640 steps {tag}: FPS H100 (fused)", fus.fps, None, "frames/s"),
            Row("projection", f"14B 384x640 steps {tag}: FPS H100 (reference ops)", ref.fps, None, "frames/s"),
            Row(
                "projection",
                f"14B 384x640 steps {tag}: FPS end to end, VAE included (fused, {selection.backend})",
                fus.fps_end_to_end,
                None,
                "frames/s",
            ),  # fmt: skip
        ]
        text.append(cost.format_projection(chunk, steps, efficiency=eff))
        fp8 = project_fp8(chunk, steps, eff)  # EngineConfig(precision="fp8"): the block GEMMs in e4m3
        rows.append(Row("projection", f"14B 384x640 steps {tag}: FPS end to end, VAE included (fused, fp8 GEMMs)",
                        fp8.fps_fp8_end_to_end, None, "frames/s"))  # fmt: skip
        text.append(fp8.line(steps))
    calibration = [rates.calibrate(chunk, compiled) for compiled in (True, False)]
    rows.append(Row("projection", "calibration: reference pipeline, compiled (FPS H100)", calibration[0].fps, None,
                    "frames/s"))  # fmt: skip
    rows.append(Row("projection", "paper FPS (H100, steps 1,1,1)", cost.PAPER_FPS, None, "frames/s"))
    text.append("\n".join([
        f"attention on an H100 with {', '.join(sorted(rates.H100_INSTALLED))} installed: {selection.describe()}",
        *rates.backend_lines(chunk, selected=selection.backend),
        "",
        "calibration: the reference pipeline's op sequence priced by this model (torch.compile + FA3, one step "
        "per stage, text K/V in every forward, fp32 VAE)",
        *(c.line() for c in calibration),
    ]))  # fmt: skip
    return rows, "\n\n".join(text)
