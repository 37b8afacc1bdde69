"""The measured half of first light: a random-weight engine of the profile's model, timed stream by
stream, and the attention and largest GEMM of the last pyramid stage timed alone, each figure beside
the cost model's projection for the same machine.

Random weights (made on the device, no checkpoint) cost what trained ones cost: the timings do not
depend on the values. Streams: cold (the engine's first: warm-up runs and graph captures included),
warm (after `Engine.warmup()`), and an eager engine without overlap timed stage by stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .. import benchmarking as hb
from ..compile import cost
from ..compile.report import plan_engine
from ..config import EngineConfig
from .profile import Profile
from .report import FAIL, PASS, SKIP, Check, Figure

Tensor = torch.Tensor


def engine_config(profile: Profile) -> EngineConfig:
    dtype = str(profile.dtype).removeprefix("torch.")
    return EngineConfig(height=profile.height, width=profile.width, device=profile.device, dtype=dtype,
                        pyramid_steps=profile.steps)  # fmt: skip


def prompt_embeds(profile: Profile) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, profile.text_len, profile.model.text_dim, generator=g)


class Recorded:
    """An engine as `benchmarking.measure_stream` sees it, keeping each chunk's latents (on the host
    already) and the allocated bytes when the chunk was handed over (the allocator's host-side count: no
    device synchronize, so the timed stream is not disturbed)."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.latents: list[Tensor] = []
        self.allocated: list[int] = []

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def generate_stream(self, *args, **kwargs) -> _RecordedStream:
        return _RecordedStream(self._engine.generate_stream(*args, **kwargs), self)


class _RecordedStream:
    def __init__(self, stream, recorded: Recorded) -> None:
        self._stream, self._recorded = stream, recorded

    def __enter__(self) -> _RecordedStream:
        self._stream.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._stream.__exit__(*exc)

    def __iter__(self):
        cuda = self._recorded.device.type == "cuda"
        for chunk in self._stream:
            self._recorded.latents.append(chunk.latents)
            if cuda:
                self._recorded.allocated.append(torch.cuda.memory_allocated(self._recorded.device))
            yield chunk

    @property
    def handover_times(self) -> list[float]:
        return self._stream.handover_times


def time_ms(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Mean milliseconds of `fn` after one untimed call (compilation, autotuning); CUDA events on a GPU."""
    fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) * 1e3 / iters
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / iters


def largest(trace: cost.Trace, kind: str) -> cost.OpCost:
    return max((o for o in trace.ops if o.kind == kind), key=lambda o: o.flops)


def _tflops(op: cost.OpCost, ms: float) -> float:
    return op.flops / (ms * 1e-3) / 1e12


def attention_figure(profile: Profile, forward: cost.Trace, ops, spec: cost.DeviceSpec, stage: int) -> Figure:
    """The op table's attention alone at the stage's largest attention shape, beside the cost model's rate."""
    device, att = torch.device(profile.device), largest(forward, cost.ATTENTION)
    (b, h, lq, d), (_, _, lk, _) = att.inputs[0][0], att.inputs[1][0]  # recorded in the SDPA layout
    g, dtype = torch.Generator(device).manual_seed(0), getattr(torch, att.dtype)
    q = torch.randn(b, lq, h, d, device=device, generator=g, dtype=dtype)
    k, v = (torch.randn(b, lk, h, d, device=device, generator=g, dtype=dtype) for _ in range(2))
    out = torch.empty_like(q)
    ms = time_ms(lambda: ops.attention(q, k, v, out=out), device, profile.timing_iters)
    name = f"attention TFLOP/s, stage {stage} [B {b}, L {lq}x{lk}, H {h}, Dh {d}] {att.dtype}"
    projected = _tflops(att, cost.op_seconds(att, spec) * 1e3)
    return Figure(name, _tflops(att, ms), "TFLOP/s", projected, f"{ops.backend_of('attention')} kernel, {ms:.3f} ms")


def gemm_figure(profile: Profile, forward: cost.Trace, spec: cost.DeviceSpec, stage: int) -> Figure:
    """torch.mm alone at the stage's largest GEMM ([M, K] @ [K, N] from its output and FLOPs)."""
    device, gemm = torch.device(profile.device), largest(forward, cost.GEMM)
    n = gemm.outputs[0][0][-1]
    m = torch.Size(gemm.outputs[0][0]).numel() // n
    k = gemm.flops // (2 * m * n)
    dtype = getattr(torch, gemm.dtype)
    a, w = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    c = torch.empty(m, n, device=device, dtype=dtype)
    ms = time_ms(lambda: torch.mm(a, w, out=c), device, profile.timing_iters)
    name = f"largest GEMM TFLOP/s, stage {stage} [{m}x{k}] @ [{k}x{n}] {gemm.dtype}"
    return Figure(name, _tflops(gemm, ms), "TFLOP/s", _tflops(gemm, cost.op_seconds(gemm, spec) * 1e3),
                  f"torch.mm, {ms:.3f} ms")  # fmt: skip


def stream_figures(profile, proj, first_proj, cold, warm, stages, overlap: bool) -> list[Figure]:
    """TTFF, FPS, transformer and VAE milliseconds of the measured streams beside the projection."""
    fpc, n = warm.frames_per_chunk, warm.chunks
    vae_s = proj.total(vae=True) - proj.seconds
    steady_s = max(proj.seconds, vae_s) if overlap else proj.seconds + vae_s
    ttff_s = first_proj.seconds + vae_s
    how = "decode overlapped: max(transformer, VAE)" if overlap else "transformer + VAE"
    figures = [
        Figure("time to first frame, cold (warm-up runs and graph captures)", cold.ttff_s, "s", None,
               "compilation and capture: not modelled"),
        Figure("time to first frame, warm", warm.ttff_s, "s", ttff_s, "first chunk (amplified steps) + VAE decode"),
        Figure(f"steady FPS, end to end (frames on the host, chunks 1..{n - 1})", warm.steady_fps, "frames/s",
               fpc / steady_s, how),
        Figure(f"end-to-end FPS over {n} chunks (TTFF included)", warm.e2e_fps, "frames/s",
               n * fpc / (ttff_s + (n - 1) * steady_s)),
        Figure("transformer ms per chunk (stream events)", warm.lane_ms.get("transformer", float("nan")), "ms",
               proj.seconds * 1e3, "every stage, step and transition"),
        Figure("VAE decode ms per chunk (stream events)", warm.lane_ms.get("decode", float("nan")), "ms",
               vae_s * 1e3),
    ]  # fmt: skip
    for s in range(len(profile.steps)):
        measured = stages.stage_ms.get(f"stage {s}", float("nan"))
        note = "forward + sampler step" + ("; one chunk measured: the amplified first" if stages.chunks == 1 else "")
        projected = proj.total(group=f"stage {s}") * 1e3
        figures.append(Figure(f"stage {s} ms (eager engine, {profile.steps[s]} step)", measured, "ms", projected, note))
    return figures


def replay_checks(graphed: list[Tensor], eager: list[Tensor], allocated: list[int]) -> tuple[list[Check], Figure]:
    """Memory flat across the recorded chunks (CUDA), and how far the graphed chunks are from eager ones."""
    common = zip(graphed, eager, strict=False)  # the chunks both runs made
    diff = max((a.float() - b.float()).abs().max().item() for a, b in common)
    note = f"chunks 0..{min(len(graphed), len(eager)) - 1}, same weights, seed and embeddings; 0 = bit-equal"
    figure = Figure("graph replay vs eager engine: max |latents difference|", diff, "", None, note)
    if not allocated:
        return [Check("memory flat over the measured model's chunks", SKIP, "no CUDA: nothing allocated")], figure
    detail = f"allocated bytes per chunk: {allocated}"
    if len(allocated) < 3:  # chunk 0 warms up; flat needs two later chunks to compare
        return [Check("memory flat over the measured model's chunks", SKIP, f"too few chunks: {detail}")], figure
    flat = len(set(allocated[1:])) == 1
    return [Check("memory flat over the measured model's chunks", PASS if flat else FAIL, detail)], figure


def memory_figure(profile: Profile, kernels: str, peak_gb: float) -> Figure:
    plan = plan_engine(profile.model, profile.height, profile.width, profile.dtype, text_len=profile.text_len,
                       kernels=kernels, text_encoder=None)  # fmt: skip
    return Figure("peak memory (torch.cuda.max_memory_allocated) vs the plan", peak_gb, "GB", plan.total_bytes / 1e9,
                  "plan: weights + state + arena + VAE decode, no text encoder")  # fmt: skip


def measure(profile: Profile, spec: cost.DeviceSpec) -> tuple[list[Figure], list[Check]]:
    """Every figure of the run, and the checks that come out of the measured engine."""
    config = engine_config(profile)
    embeds = prompt_embeds(profile)
    engine = hb.random_engine(profile.model, config, profile.vae)
    kernels, overlap = engine.transformer.ops.backend_of("attention"), bool(engine.config.resolved_overlap())
    chunk = cost.trace_chunk(profile.model, cost.ChunkShape(profile.height, profile.width, text_len=profile.text_len),
                             profile.dtype, label="first light", vae=True)  # fmt: skip
    fused = kernels == "triton"
    proj = cost.project(chunk, spec, steps=profile.steps, fused=fused)
    first_proj = cost.project(chunk, spec, steps=tuple(2 * s for s in profile.steps), fused=fused)
    cold = hb.measure_stream(engine, 1, prompt_embeds=embeds, stages=False, kind="cold")  # its TTFF only
    engine.warmup()
    graphed = Recorded(engine)
    warm = hb.measure_stream(graphed, profile.chunks, prompt_embeds=embeds, stages=False)
    last = len(chunk.stages) - 1
    figures = [attention_figure(profile, chunk.stages[-1].forward, engine.transformer.ops, spec, last),
               gemm_figure(profile, chunk.stages[-1].forward, spec, last)]  # fmt: skip
    engine.close()
    del engine
    hb.stream._free_cuda()
    eager_engine = hb.random_engine(profile.model, config.replace(**hb.EAGER), profile.vae)
    if profile.eager_warmup:
        hb.measure_stream(eager_engine, 1, prompt_embeds=embeds, stages=False)  # caches, autotuning
    eager = Recorded(eager_engine)
    stages = hb.measure_stream(eager, profile.stage_chunks, prompt_embeds=embeds, stages=True, kind="stages")
    eager_engine.close()
    checks, diff = replay_checks(graphed.latents, eager.latents, graphed.allocated)
    figures = stream_figures(profile, proj, first_proj, cold, warm, stages, overlap) + figures
    figures += [memory_figure(profile, kernels, warm.peak_memory_gb), diff]
    return figures, checks
