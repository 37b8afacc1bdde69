"""The Helios 14B projection for an H100 from the cost model (`compile.cost`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .table import Row


def projection_rows(steps_list: Sequence[tuple[int, ...]] = ((1, 1, 1), (2, 2, 2))) -> tuple[list[Row], str]:
    """The 14B at 384x640, bf16, H100 projection: summary rows, and the full tables as text."""
    from ..compile import cost
    from ..config import HELIOS_14B

    chunk = cost.trace_chunk(HELIOS_14B, cost.ChunkShape(), torch.bfloat16, label="Helios 14B", vae=True)
    rows, text = [], []
    for steps in steps_list:
        tag = ",".join(map(str, steps))
        ref = cost.project(chunk, steps=steps)
        fus = cost.project(chunk, steps=steps, fused=True)
        rows += [
            Row("projection", f"14B 384x640 steps {tag}: PFLOP / chunk", chunk.flops(steps) / 1e15, None, "PFLOP"),
            Row("projection", f"14B 384x640 steps {tag}: ms / chunk (fused)", fus.seconds * 1e3, None, "ms"),
            Row("projection", f"14B 384x640 steps {tag}: FPS H100 (fused)", fus.fps, None, "frames/s"),
            Row("projection", f"14B 384x640 steps {tag}: FPS H100 (reference ops)", ref.fps, None, "frames/s"),
        ]
        if fus.vae_rows:
            rows.append(Row("projection", f"14B 384x640 steps {tag}: FPS with VAE (fused)", fus.fps_with_vae, None,
                            "frames/s"))  # fmt: skip
        text.append(cost.format_projection(chunk, steps))
    rows.append(Row("projection", "paper FPS (H100)", cost.PAPER_FPS, None, "frames/s"))
    return rows, "\n\n".join(text)
