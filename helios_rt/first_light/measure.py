"""The measured half of first light: a random-weight engine of the profile's model, timed stream by
stream, and the attention and largest GEMM of the last pyramid stage timed alone, each figure beside
the cost model's projection for the same machine.

Random weights (made on the device, no checkpoint) cost what trained ones cost: the timings do not
depend on the values. Streams: cold (the engine's first: warm-up runs and graph captures included),
warm (after `Engine.warmup()`), and an eager engine without overlap timed stage by stage.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import benchmarking as hb
from ..compile import cost
from ..compile.cost import attention_rates
from ..compile.report import plan_engine
from ..config import DebugSwitches, EngineConfig
from .profile import Profile
from .report import FAIL, PASS, SKIP, Check, Figure

Tensor = torch.Tensor


def engine_config(profile: Profile) -> EngineConfig:
    dtype = str(profile.dtype).removeprefix("torch.")
    return EngineConfig(height=profile.height, width=profile.width, device=profile.device, dtype=dtype,
                        steps=profile.steps, debug=DebugSwitches(attention=profile.attention))  # fmt: skip


def prompt_embeds(profile: Profile) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, profile.text_len, profile.model.text_dim, generator=g)


@dataclass(frozen=True)
class ProjectionInputs:
    """What the projection prices, from what the engine selected.

    op_table: the backend of the engine's non-attention ops ("triton" or "reference": `EngineConfig.kernels`
    as `OpSet` resolves it on the engine's device); attention: the attention backend the engine selected
    (`Engine.attention.backend`); fused: price each op-table call as one kernel (the Triton path);
    efficiency: the cost model's assumptions with attention at that backend's rate.
    """

    op_table: str
    attention: str
    fused: bool
    efficiency: cost.Efficiency


def projection_inputs(config: EngineConfig, selected_attention: str, spec: cost.DeviceSpec = cost.H100_SXM
                      ) -> ProjectionInputs:  # fmt: skip
    """The projection's inputs for an engine of `config` that selected `selected_attention`: the op table
    keyed on `kernels` (OpSet's rule: "auto" is Triton on CUDA, the reference elsewhere), never on the
    attention backend (FA3 with the Triton op table is fused; Triton attention says nothing of the rest)."""
    cuda = config.resolved_device().startswith("cuda")
    kernels = config.debug.kernels
    op_table = "triton" if kernels == "triton" or (kernels == "auto" and cuda) else "reference"
    eff = attention_rates.efficiency_for(selected_attention, spec)
    return ProjectionInputs(op_table, selected_attention, op_table == "triton", eff)


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
    return max((o for o in trace.priced if o.kind == kind), key=lambda o: o.flops)


def _tflops(op: cost.OpCost, ms: float) -> float:
    return op.flops / (ms * 1e-3) / 1e12


def attention_figure(profile: Profile, forward: cost.Trace, ops, spec: cost.DeviceSpec, stage: int,
                     inputs: ProjectionInputs) -> Figure:  # fmt: skip
    """The op table's attention alone at the stage's largest attention shape, beside the cost model's rate
    for the backend the engine selected."""
    device, att = torch.device(profile.device), largest(forward, cost.ATTENTION)
    (b, lq, h, d), (_, lk, _, _) = att.inputs[0][0], att.inputs[1][0]  # the op table's [B, L, H, D]
    g, dtype = torch.Generator(device).manual_seed(0), getattr(torch, att.dtype)
    q = torch.randn(b, lq, h, d, device=device, generator=g, dtype=dtype)
    k, v = (torch.randn(b, lk, h, d, device=device, generator=g, dtype=dtype) for _ in range(2))
    out = torch.empty_like(q)
    ms = time_ms(lambda: ops.attention(q, k, v, out=out), device, profile.timing_iters)
    name = f"attention TFLOP/s, stage {stage} [B {b}, L {lq}x{lk}, H {h}, Dh {d}] {att.dtype}"
    projected = _tflops(att, cost.op_seconds(att, spec, inputs.efficiency) * 1e3)
    return Figure(name, _tflops(att, ms), "TFLOP/s", projected, f"{inputs.attention} kernel, {ms:.3f} ms")


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
    vae_s = proj.vae_seconds
    steady_s = cost.steady_chunk_seconds(proj.seconds, vae_s)  # both lanes share the GPU's SMs
    ttff_s = first_proj.seconds + vae_s
    how = "transformer + VAE: both lanes on one GPU" + (" (decode overlapped: hides host gaps only)" if overlap else "")
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


def steady_allocations(allocated: list[int]) -> list[int]:
    """The allocated bytes of the steady chunks: chunk 0 warms up, and the last chunk is handed over with no
    successor launched (with overlap, chunk k is handed over after chunk k+1 was launched, whose state is
    then alive), so only chunks 1..n-2 are compared, and exactly."""
    return allocated[1:-1]


def replay_checks(graphed: list[Tensor], eager: list[Tensor], allocated: list[int]) -> tuple[list[Check], Figure]:
    """Memory flat across the steady chunks (CUDA), and how far the graphed chunks are from eager ones."""
    common = zip(graphed, eager, strict=False)  # the chunks both runs made
    diff = max((a.float() - b.float()).abs().max().item() for a, b in common)
    note = f"chunks 0..{min(len(graphed), len(eager)) - 1}, same weights, seed and embeddings; 0 = bit-equal"
    figure = Figure("graph replay vs eager engine: max |latents difference|", diff, "", None, note)
    name = "memory flat over the measured model's steady chunks"
    if not allocated:
        return [Check(name, SKIP, "no CUDA: nothing allocated")], figure
    steady = steady_allocations(allocated)
    detail = f"allocated bytes per chunk: {allocated}; compared: chunks 1..{len(allocated) - 2}"
    if len(steady) < 2:  # flat needs two steady chunks to compare
        return [Check(name, SKIP, f"too few chunks: {detail}")], figure
    flat = len(set(steady)) == 1
    return [Check(name, PASS if flat else FAIL, detail)], figure


def memory_figure(profile: Profile, inputs: ProjectionInputs, peak_gb: float, precision: str = "native") -> Figure:
    """Peak memory beside the plan of the same op table and attention backend (and precision)."""
    plan = plan_engine(profile.model, profile.height, profile.width, profile.dtype, text_len=profile.text_len,
                       kernels=inputs.op_table, attention=inputs.attention, text_encoder=None,
                       precision=precision)  # fmt: skip
    tag = "" if precision == "native" else f"{precision.upper()} "
    return Figure(f"{tag}peak memory (torch.cuda.max_memory_allocated) vs the plan", peak_gb, "GB",
                  plan.total_bytes / 1e9, f"plan: weights + state + arena + VAE decode, no text encoder; "
                  f"{inputs.op_table} ops, {inputs.attention} attention")  # fmt: skip


@dataclass
class Measured:
    """The bf16 engine's results, and its warm stream's latents (the FP8 gate's reference: same weights, seed
    and embeddings)."""

    figures: list[Figure]
    checks: list[Check]
    latents: list[Tensor]
    inputs: ProjectionInputs
    chunk: cost.PlannedChunk


def measure(profile: Profile, spec: cost.DeviceSpec) -> Measured:
    """Every figure of the bf16 run, and the checks that come out of the measured engine."""
    config = engine_config(profile)
    embeds = prompt_embeds(profile)
    engine = hb.random_engine(profile.model, config, profile.vae)
    inputs = projection_inputs(engine.config, engine.attention.backend, spec)
    overlap = bool(engine.config.resolved_overlap())
    shape = cost.ChunkShape(profile.height, profile.width, text_len=profile.text_len)
    chunk = cost.planned_chunk(profile.model, shape, profile.dtype, kernels=inputs.op_table,
                               attention=inputs.attention, steps=tuple(profile.steps), label="first light")  # fmt: skip
    proj = cost.project(chunk, spec, inputs.efficiency)
    first_proj = cost.project(chunk, spec, inputs.efficiency, first=True)  # the amplified first chunk's plan
    cold = hb.measure_stream(engine, 1, prompt_embeds=embeds, stages=False, kind="cold")  # its TTFF only
    engine.warmup()
    graphed = Recorded(engine)
    warm = hb.measure_stream(graphed, profile.chunks, prompt_embeds=embeds, stages=False)
    last = len(profile.steps) - 1
    figures = [attention_figure(profile, chunk.stage(last), engine.transformer.ops, spec, last, inputs),
               gemm_figure(profile, chunk.stage(last), spec, last)]  # fmt: skip
    engine.close()
    del engine
    hb.stream._free_cuda()
    eager = config.replace(debug=dataclasses.replace(config.debug, **hb.EAGER_SWITCHES))
    eager_engine = hb.random_engine(profile.model, eager, profile.vae)
    if profile.eager_warmup:
        hb.measure_stream(eager_engine, 1, prompt_embeds=embeds, stages=False)  # caches, autotuning
    eager = Recorded(eager_engine)
    stages = hb.measure_stream(eager, profile.stage_chunks, prompt_embeds=embeds, stages=True, kind="stages")
    eager_engine.close()
    del eager_engine
    hb.stream._free_cuda()
    checks, diff = replay_checks(graphed.latents, eager.latents, graphed.allocated)
    figures = stream_figures(profile, proj, first_proj, cold, warm, stages, overlap) + figures
    figures += [memory_figure(profile, inputs, warm.peak_memory_gb), diff]
    return Measured(figures, checks, graphed.latents, inputs, chunk)
