"""GPU (and CPU) stream timings: time to first frame, FPS, lane and stage milliseconds, peak memory."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import DebugSwitches
from .table import Row

Tensor = torch.Tensor


def chunk_rates(chunk_ends: Sequence[float], frames_per_chunk: int, start: float = 0.0) -> dict[str, float]:
    """Time to first frame, steady-state and end-to-end FPS from the times chunks reached the host.

    chunk_ends: seconds (any clock) at which each chunk's frames were available, in order; start: the
    time the generation was requested. Steady state is chunks 1.. (it needs two chunks).
    """
    if not chunk_ends:
        raise ValueError("chunk_rates needs at least one chunk")
    if any(b < a for a, b in zip([start, *chunk_ends[:-1]], chunk_ends, strict=True)):
        raise ValueError(f"chunk end times must not decrease and follow the start: {start}, {list(chunk_ends)}")
    n = len(chunk_ends)
    total = chunk_ends[-1] - start
    out = {
        "ttff_s": chunk_ends[0] - start,
        "e2e_fps": n * frames_per_chunk / total if total > 0 else float("inf"),
        "steady_fps": float("nan"),
        "steady_chunk_s": float("nan"),
    }
    if n >= 2:
        span = chunk_ends[-1] - chunk_ends[0]
        out["steady_chunk_s"] = span / (n - 1)
        out["steady_fps"] = (n - 1) * frames_per_chunk / span if span > 0 else float("inf")
    return out


def summarize_ms(samples: dict[str, list[float]], skip_first: bool = True) -> dict[str, float]:
    """Mean milliseconds per key over the steady-state chunks (the first is dropped when there are more)."""
    out = {}
    for key, values in samples.items():
        vals = values[1:] if skip_first and len(values) > 1 else values
        out[key] = sum(vals) / len(vals) if vals else float("nan")
    return out


class _HostTimer:
    def __init__(self) -> None:
        self.pending: list[tuple[str, float, float]] = []

    def start(self) -> float:
        return time.perf_counter()

    def stop(self, key: str, token: float) -> None:
        self.pending.append((key, token, time.perf_counter()))

    def collect(self) -> list[tuple[str, float]]:
        out = [(k, (b - a) * 1e3) for k, a, b in self.pending]
        self.pending.clear()
        return out


class _CudaTimer:
    """CUDA events on the current stream; read after a synchronize, never in between."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, Any, Any]] = []

    def start(self):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def stop(self, key: str, token) -> None:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.pending.append((key, token, e))

    def collect(self) -> list[tuple[str, float]]:
        torch.cuda.synchronize()
        out = [(k, a.elapsed_time(b)) for k, a, b in self.pending]
        self.pending.clear()
        return out


class StageTimer:
    """Per-chunk milliseconds of each pyramid stage, stage transition and VAE decode of an engine.

    Times the sections the sampler names (`ChunkSampler.section`: "stage s", "transition s",
    "denoise", and the stream's "decode") through its public `section_hook`; CUDA events on a CUDA
    engine, host timers otherwise. `end_chunk()` files the timings of one chunk (on CUDA after a
    device synchronize, which is why a timed stream does not overlap its decode). An engine that
    replays chunk graphs runs no Python inside a chunk, so it is refused.
    """

    def __init__(self, engine) -> None:
        if graphed(engine):
            raise ValueError(
                "per-stage timing needs an engine without chunk graphs (EngineConfig(graphs='off')): "
                "a replayed graph runs no Python, so there is nothing to time per stage"
            )
        if engine.sampler.section_hook is not None:
            raise ValueError("the engine's sections are timed already (one StageTimer per engine)")
        self.engine = engine
        self.timer = _CudaTimer() if engine.device.type == "cuda" else _HostTimer()
        self.samples: dict[str, list[float]] = {}
        engine.sampler.section_hook = self._timed

    @contextlib.contextmanager
    def _timed(self, name: str):
        token = self.timer.start()
        yield
        self.timer.stop(name, token)

    def end_chunk(self) -> None:
        chunk: dict[str, float] = {}
        for key, ms in self.timer.collect():
            chunk[key] = chunk.get(key, 0.0) + ms
        for key, ms in chunk.items():
            self.samples.setdefault(key, []).append(ms)

    def close(self) -> None:
        if self.engine.sampler is not None and self.engine.sampler.section_hook == self._timed:
            self.engine.sampler.section_hook = None

    def __enter__(self) -> StageTimer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def graphed(engine) -> bool:
    """Whether the engine replays one CUDA graph per chunk."""
    program = getattr(engine, "chunk_program", None)
    return program is not None and program.cuda_graph


@dataclass
class StreamResult:
    """One measured stream. kind: "cold" (the engine's first stream: warm-up runs and graph captures
    included), "warm" (after `Engine.warmup()`), or "stages" (an engine without chunk graphs or
    overlap, timed stage by stage)."""

    label: str
    device: str
    resolution: str
    chunks: int
    frames_per_chunk: int
    ttff_s: float
    steady_fps: float
    e2e_fps: float
    steady_chunk_s: float
    kind: str = "warm"
    lane_ms: dict[str, float] = field(default_factory=dict)  # per chunk, from the stream's own events
    stage_ms: dict[str, float] = field(default_factory=dict)
    peak_memory_gb: float = float("nan")
    load_s: float = float("nan")

    def rows(self, suite: str = "gpu") -> list[Row]:
        tag = f"{self.label} {self.resolution}"
        if self.kind == "cold":
            return [Row(suite, f"{tag}: time to first frame, cold (warm-up + capture)", self.ttff_s, None, "s")]
        if self.kind == "stages":
            rows = [Row(suite, f"{tag}, eager + no overlap: seconds / chunk", self.steady_chunk_s, None, "s")]
            return rows + [
                Row(suite, f"{tag}, eager + no overlap: {k}", v, None, "ms") for k, v in self.stage_ms.items()
            ]
        rows = [
            Row(suite, f"{tag}: load", self.load_s, None, "s"),
            Row(suite, f"{tag}: time to first frame", self.ttff_s, None, "s"),
            Row(suite, f"{tag}: steady-state FPS", self.steady_fps, None, "frames/s"),
            Row(suite, f"{tag}: end-to-end FPS ({self.chunks} chunks)", self.e2e_fps, None, "frames/s"),
            Row(suite, f"{tag}: seconds / chunk", self.steady_chunk_s, None, "s"),
        ]
        rows += [Row(suite, f"{tag}: {k} ms / chunk", v, None, "ms") for k, v in self.lane_ms.items()]
        rows += [Row(suite, f"{tag}: {k}", v, None, "ms") for k, v in self.stage_ms.items()]
        rows.append(Row(suite, f"{tag}: peak memory", self.peak_memory_gb, None, "GB"))
        return rows

    def extra_info(self) -> dict[str, float]:
        info = {k: v for k, v in asdict(self).items() if isinstance(v, (int, float))}
        info.update({f"ms_{k.replace(' ', '_')}": v for k, v in {**self.lane_ms, **self.stage_ms}.items()})
        return {k: round(float(v), 6) for k, v in info.items()}


def measure_stream(
    engine,
    chunks: int = 4,
    label: str = "",
    prompt: str | None = "a fish",
    prompt_embeds: Tensor | None = None,
    stages: bool | None = None,
    kind: str = "warm",
) -> StreamResult:
    """Generate `chunks` chunks and time them: TTFF, FPS (chunks reach the host), lane/stage ms, memory.

    stages: also time each stage with `StageTimer` (default: when the engine replays no chunk graph).
    The lane milliseconds (transformer, decode) are the stream's own per-chunk timings.
    """
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    cuda = engine.device.type == "cuda"
    fpc = engine.vae.config.num_frames(engine.history_layout.chunk_frames)
    if cuda:
        torch.cuda.synchronize(engine.device)
        torch.cuda.reset_peak_memory_stats(engine.device)
    stages = not graphed(engine) if stages is None else stages
    timer = StageTimer(engine) if stages else None
    lanes: dict[str, list[float]] = {}
    try:
        start = time.perf_counter()
        kwargs = {"prompt_embeds": prompt_embeds} if prompt_embeds is not None else {"prompt": prompt}
        with engine.generate_stream(num_frames=fpc * chunks, seed=0, **kwargs) as stream:
            for chunk in stream:  # a chunk's frames are on the host when it is handed out
                if timer is not None:
                    timer.end_chunk()
                for key, seconds in chunk.timings.items():
                    lanes.setdefault(key.removesuffix("_s"), []).append(seconds * 1e3)
    finally:
        if timer is not None:
            timer.close()
    rates = chunk_rates(stream.handover_times, fpc, start)
    peak = torch.cuda.max_memory_allocated(engine.device) / 1e9 if cuda else float("nan")
    return StreamResult(
        label=label,
        device=str(engine.device),
        resolution=f"{engine.config.height}x{engine.config.width}",
        chunks=chunks,
        frames_per_chunk=fpc,
        ttff_s=rates["ttff_s"],
        steady_fps=rates["steady_fps"],
        e2e_fps=rates["e2e_fps"],
        steady_chunk_s=rates["steady_chunk_s"],
        kind=kind,
        lane_ms=summarize_ms(lanes),
        stage_ms=summarize_ms(timer.samples) if timer is not None else {},
        peak_memory_gb=peak,
    )


CHECKPOINT_ENV = "HELIOS_RT_CHECKPOINT"


def random_engine(model_config=None, config=None, vae_config=None, seed: int = 0):
    """An engine of the given architecture (default: Helios 14B) with random weights, made on the device.

    The transformer is built on the meta device and materialised on the target device (the 14B
    model's 28 GB never pass through host memory); weights ~ N(0, 1/fan_in), norm gains one. The
    VAE is the Wan 2.1 layout unless `vae_config` says otherwise. No text encoder: pass
    `prompt_embeds` to `generate_stream`.
    """
    from ..config import HELIOS_14B, EngineConfig
    from ..demo.untrained import UNTRAINED_MODEL_INDEX, UNTRAINED_SCHEDULER
    from ..engine import Engine
    from ..model.transformer import HeliosTransformer, keeps_fp32
    from ..model.vae import VAEConfig, WanVAE
    from ..ops import OpSet
    from ..sampling.chunk import SamplingSpec

    model_config = model_config or HELIOS_14B
    config = config or EngineConfig()
    device = torch.device(config.resolved_device())
    dtype, vae_dtype = config.resolved_dtype(), config.resolved_dtype("vae_dtype")
    with torch.device("meta"):
        transformer = HeliosTransformer(model_config, OpSet(device, config.debug.kernels))
    for name, p in transformer.named_parameters():  # dtypes as loaded, set while still free (meta)
        p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
    transformer = transformer.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
            elif name.endswith("weight") and "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    torch.manual_seed(seed)
    vae = WanVAE(vae_config or VAEConfig()).to(device, vae_dtype).eval()
    spec = SamplingSpec.from_checkpoint(UNTRAINED_MODEL_INDEX, UNTRAINED_SCHEDULER, config)  # distilled
    return Engine(transformer.eval(), vae, None, spec, config)


def gpu_engines(chunks: int = 4) -> list[tuple[str, Callable[..., Any], dict]]:
    """(label, engine factory, generate kwargs) of the GPU suite: the 14B shape and the demo model.

    A factory takes EngineConfig overrides (the suite builds a second, eager engine for stage timings).
    """
    from ..config import HELIOS_14B, EngineConfig
    from ..demo import DEMO_PROMPT
    from ..engine import Engine

    cfg14 = EngineConfig(height=384, width=640, device="cuda")
    ckpt = os.environ.get(CHECKPOINT_ENV)
    embeds = torch.randn(1, 512, HELIOS_14B.text_dim, generator=torch.Generator().manual_seed(0))
    if ckpt:
        big = (
            "helios-14b checkpoint",
            lambda **o: Engine.from_pretrained(ckpt, cfg14.replace(**o)),
            {"prompt": "a fish"},
        )
    else:
        big = (
            "helios-14b random",
            lambda **o: random_engine(HELIOS_14B, cfg14.replace(**o)),
            {"prompt_embeds": embeds},
        )
    demo_cfg = EngineConfig(device="cuda")
    demo = ("demo", lambda **o: Engine.from_pretrained("demo", demo_cfg.replace(**o)), {"prompt": DEMO_PROMPT})
    return [demo, big]


# the stage-timing engine: every stage visible to Python (`factory(**EAGER)`; on a config of your own,
# `config.replace(debug=dataclasses.replace(config.debug, **EAGER_SWITCHES))` keeps its other switches)
EAGER_SWITCHES: dict[str, Any] = {"graphs": "off", "overlap_decode": False}
EAGER: dict[str, Any] = {"debug": DebugSwitches(**EAGER_SWITCHES)}


def run_gpu_suite(chunks: int = 4, engines=None, warmup: bool = True) -> list[StreamResult]:
    """Per engine: load; a cold stream (TTFF with warm-ups and captures); `warmup()` and a warm stream;
    then, for a graphed engine, a second engine without graphs or overlap timed stage by stage.

    warmup: run `Engine.warmup()` (and one chunk for an engine without chunk graphs) before the warm
    stream. Engines are freed one after another (the 14B one takes ~30 GB).
    """
    results = []
    for label, factory, kwargs in engines or gpu_engines(chunks):
        t0 = time.perf_counter()
        engine = factory()
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        load_s = time.perf_counter() - t0
        cold = measure_stream(engine, chunks, label, stages=False, kind="cold", **kwargs)
        if warmup:
            engine.warmup()
        warm = measure_stream(engine, chunks, label, **kwargs)
        warm.load_s = load_s
        results += [cold, warm]
        if graphed(engine):
            del engine
            _free_cuda()
            engine = factory(**EAGER)
            measure_stream(engine, 1, label, **kwargs)  # kernel selection, autotuning, caches
            results.append(measure_stream(engine, chunks, label, stages=True, kind="stages", **kwargs))
        del engine
        _free_cuda()
    return results


def _free_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
