"""The Helios 14B projection for an H100, priced from the planned chunk (`compile.cost`): headline what a
plain install runs (no flash-attn: the backend table's choice), bf16 and FP8, 1+1+1 steps, end to end
with the VAE decode; the other attention backends as extra rows; the calibration against the paper."""

from __future__ import annotations

from .table import Row


def projection_rows(verbose: bool = True) -> tuple[list[Row], str]:
    """Summary rows, and the tables as text (`verbose`: the ten costliest ops and bytes by class)."""
    from ..compile import cost
    from ..compile.cost import attention_rates as rates

    selection = rates.h100_selection()  # a plain install: what `attention="auto"` takes on an H100
    bf16 = cost.helios_14b_chunk(attention=selection.backend)
    fp8 = cost.helios_14b_chunk("fp8", attention=selection.backend)
    p, q = cost.project(bf16), cost.project(fp8)
    fa3 = cost.project(bf16, efficiency=rates.efficiency_for("fa3"))
    fa3_fp8 = cost.project(fp8, efficiency=rates.efficiency_for("fa3"))
    calibration = rates.calibrate(bf16)
    outside = cost.bytes_outside_gemm_and_attention(bf16.steady)
    tag = "14B 384x640 steps 1,1,1"
    rows = [
        Row("projection", f"{tag}: FPS end to end, plain install ({selection.backend}), bf16", p.fps_end_to_end,
            None, "frames/s"),
        Row("projection", f"{tag}: FPS end to end, plain install ({selection.backend}), fp8", q.fps_end_to_end,
            None, "frames/s"),
        Row("projection", f"{tag}: FPS end to end, FA3 installed, bf16", fa3.fps_end_to_end, None, "frames/s"),
        Row("projection", f"{tag}: FPS end to end, FA3 installed, fp8", fa3_fp8.fps_end_to_end, None, "frames/s"),
        Row("projection", f"{tag}: steady chunk ms (transformer), bf16", p.seconds * 1e3, None, "ms"),
        Row("projection", f"{tag}: VAE decode ms", p.vae_seconds * 1e3, None, "ms"),
        Row("projection", f"{tag}: GB outside GEMMs and attention per steady chunk", outside / 1e9, None, "GB"),
        Row("projection", "calibration: reference pipeline, compiled (FPS H100)", calibration.fps, None, "frames/s"),
        Row("projection", "paper FPS (H100, steps 1,1,1)", cost.PAPER_FPS, None, "frames/s"),
    ]  # fmt: skip
    plain = f"{selection.backend} attention"
    head = [(label, x.seconds * 1e3, x.vae_seconds * 1e3, x.fps_end_to_end, note) for label, x, note in (
        ("plain install, bf16", p, plain), ("plain install, FP8", q, plain),
        ("FA3 installed, bf16", fa3, "extra row"), ("FA3 installed, FP8", fa3_fp8, "extra row"))]  # fmt: skip
    text = [
        "\n".join([f"HEADLINE: Helios 14B, 384x640, H100 SXM, steps 1+1+1, steady chunk + VAE decode on one GPU "
                   f"(paper: {cost.PAPER_FPS} FPS)", *cost.table.headline_lines(head),
                   f"bytes outside GEMMs and attention per steady chunk (bf16): {outside / 1e9:.2f} GB"]),
        cost.format_projection(bf16, verbose=verbose),
        cost.format_projection(fp8, verbose=verbose),
        "\n".join([f"attention on an H100, plain install: {selection.describe()}", *rates.backend_lines(bf16)]),
        "\n".join(["rates (H100 SXM):", *cost.projection.rate_sources(),
                   *(f"attention {r.backend}: {r.tflops:g} TFLOP/s: {r.source}"
                     for r in rates.H100_ATTENTION.values())]),
        "\n".join(["calibration: the reference pipeline's op sequence priced by this model (torch.compile + FA3, one "
                   "step per stage, text K/V in every forward, fp32 VAE, no second lane)", calibration.line()]),
    ]  # fmt: skip
    return rows, "\n\n".join(text)
