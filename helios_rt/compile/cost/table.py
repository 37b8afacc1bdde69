"""The projection's text: per section and class, the ten costliest ops, the bytes by op class."""

from __future__ import annotations

from collections.abc import Sequence

from .op_cost import KINDS, VIEW
from .planned import PlannedChunk
from .projection import (
    H100_SXM,
    PAPER_FPS,
    DeviceSpec,
    Efficiency,
    bytes_outside_gemm_and_attention,
    op_seconds,
    project,
)  # fmt: skip
from .tracer import Trace


def top_ops(trace: Trace, n: int = 10, device: DeviceSpec = H100_SXM, eff: Efficiency | None = None
            ) -> list[tuple[str, str, int, float, float]]:  # fmt: skip
    """(op, class, calls, GB, ms) of the `n` ops (by name) that take the most projected time."""
    eff = eff or Efficiency()
    acc: dict[str, list] = {}
    for o in trace.priced:
        a = acc.setdefault(o.name, [o.kind, 0, 0.0, 0.0])
        a[1] += 1
        a[2] += o.bytes / 1e9
        a[3] += op_seconds(o, device, eff) * 1e3
    return sorted(((name, *v) for name, v in acc.items()), key=lambda r: -r[4])[:n]


def bytes_by_class(trace: Trace) -> dict[str, int]:
    """Bytes moved per op class (views excluded: they move nothing)."""
    return {k: trace.bytes(k) for k in KINDS if k != VIEW}


def verbose_lines(trace: Trace, device: DeviceSpec = H100_SXM, eff: Efficiency | None = None) -> list[str]:
    """The ten costliest ops and the bytes by class of one trace (the steady chunk)."""
    lines = [f"ten costliest ops, {trace.label}:", f"{'op':58} {'class':11} {'calls':>6} {'GB':>8} {'ms':>8}"]
    for name, kind, calls, gb, ms in top_ops(trace, 10, device, eff):
        lines.append(f"{name[:58]:58} {kind:11} {calls:6d} {gb:8.2f} {ms:8.2f}")
    lines += ["", f"bytes by op class, {trace.label} (GB):"]
    lines += [f"  {k:12} {b / 1e9:9.2f}" for k, b in bytes_by_class(trace).items()]
    lines.append(f"  bytes outside GEMMs and attention: {bytes_outside_gemm_and_attention(trace) / 1e9:.2f} GB")
    return lines


def format_projection(chunk: PlannedChunk, device: DeviceSpec = H100_SXM, efficiency: Efficiency | None = None,
                      verbose: bool = False) -> str:  # fmt: skip
    """Per section and op class of the steady chunk: TFLOP, GB and ms; the decode; end-to-end FPS."""
    p = project(chunk, device, efficiency)
    first = project(chunk, device, efficiency, first=True)
    s = chunk.shape
    lines = [
        f"{chunk.label} at {s.height}x{s.width}, {str(chunk.dtype).removeprefix('torch.')}"
        f"{' (block linears fp8)' if chunk.precision == 'fp8' else ''}, batch {s.batch}, steps {chunk.steps}, "
        f"{chunk.kernels} op table, {chunk.attention} attention, one chunk = {s.pixel_frames} frames, on {device.name}",
        f"priced: the planned steady chunk ({len(chunk.steady.planned)} steps) and the planned VAE decode "
        f"({len(chunk.vae.planned) if chunk.vae else 0} steps), op by op",
        f"rates: {p.efficiency.describe(device)}",
        "",
        f"{'group':12} {'class':11} {'TFLOP':>8} {'GB':>8} {'ms':>8}",
    ]
    groups = list(dict.fromkeys(r.group for r in p.rows + p.vae_rows))
    for g in groups:
        for kind in KINDS:
            rows = [r for r in p.rows + p.vae_rows if r.group == g and r.kind == kind and (r.bytes or r.flops)]
            if rows and kind != VIEW:
                lines.append(f"{g:12} {kind:11} {sum(r.flops for r in rows) / 1e12:8.2f} "
                             f"{sum(r.bytes for r in rows) / 1e9:8.2f} {sum(r.seconds for r in rows) * 1e3:8.2f}")
    lines += [
        "",
        f"steady chunk: transformer {p.seconds * 1e3:.0f} ms + VAE decode {p.vae_seconds * 1e3:.0f} ms (both lanes "
        f"on one GPU) -> {p.fps_end_to_end:.1f} FPS end to end; first chunk {first.seconds * 1e3:.0f} ms",
        f"bytes outside GEMMs and attention per steady chunk: "
        f"{bytes_outside_gemm_and_attention(chunk.steady) / 1e9:.2f} GB (VAE decode: "
        f"{bytes_outside_gemm_and_attention(chunk.vae) / 1e9 if chunk.vae else 0:.2f} GB)",
        f"paper: {PAPER_FPS} FPS end to end at steps 1+1+1",
    ]
    if verbose:
        lines += ["", *verbose_lines(chunk.steady, device, p.efficiency)]
        if chunk.vae is not None:
            lines += ["", *verbose_lines(chunk.vae, device, p.efficiency)]
    return "\n".join(lines)


def headline_lines(rows: Sequence[tuple[str, float, float, float, str]]) -> list[str]:
    """(label, transformer ms, VAE ms, FPS, note) rows as the headline table."""
    lines = [f"{'':44} {'transformer ms':>14} {'VAE ms':>7} {'FPS e2e':>7}"]
    lines += [f"{label:44} {t:14.0f} {v:7.0f} {fps:7.1f}  {note}" for label, t, v, fps, note in rows]
    return lines
