"""Benchmarks of the runtime, and the `helios-rt bench` / `helios-rt profile` commands.

Three suites, each a plain function (the pytest-benchmark files in `bench/` call the same ones):

- `projection`: the 14B model at 384x640 on an H100 from the cost model (`compile.cost`), at one
  step per stage and at two. Runs anywhere (meta tensors).
- `cpu`: helios_rt side by side with `diffusers.HeliosPyramidPipeline` on identical small weights
  (`SideBySide`): seconds, CPU seconds, peak resident memory, aten ops dispatched and tensor
  allocations per steady-state chunk, and the latents of both, which must agree. Needs diffusers.
- `gpu`: end-to-end FPS, time to first frame, per-stage milliseconds (CUDA events) and peak memory
  of a stream (`measure_stream`), for the 14B shape with random weights (or the checkpoint in
  `HELIOS_RT_CHECKPOINT`) and for the demo model. Needs CUDA; the same code runs on CPU with
  host timers, which is how the tests cover it.

Steady state: chunk 0 is special (doubled steps for distilled checkpoints, history all zeros, first
calls), so "per chunk" numbers are means over chunks 1.., read at chunk boundaries.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import profiling
from .profiling import nvtx_range

Tensor = torch.Tensor

# ==== process measurements ===========================================================================


def _proc_status(key: str) -> int | None:
    """A `kB` field of /proc/self/status in bytes (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """The resident set size of this process now."""
    value = _proc_status("VmRSS")
    if value is None:  # no /proc: the high-water mark is the best we have
        return peak_rss_bytes()
    return value


def peak_rss_bytes() -> int:
    """The resident set's high-water mark (since the process started, or the last `reset_peak_rss`)."""
    value = _proc_status("VmHWM")
    if value is None:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return value


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current resident set (Linux: `5` into /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> bool:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`), so that a resident-set reading
    that follows starts from what is live, not from what an earlier run left cached in the heap."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): robust to other load on the machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class OpCounter(TorchDispatchMode):
    """Counts aten ops dispatched and the tensor storages they allocate.

    An allocation is an output tensor whose storage is none of the op's inputs' (views, in-place and
    `out=` ops allocate nothing). Buffers that kernels allocate internally (e.g. oneDNN scratch) are
    below the dispatcher and not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.allocations = 0
        self.allocated_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        inputs = {_storage_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                ptr = _storage_ptr(t)
                if ptr not in inputs and ptr != 0:
                    inputs.add(ptr)  # an op returning one new storage twice allocates once
                    self.allocations += 1
                    self.allocated_bytes += t.untyped_storage().nbytes()
        return out


def _storage_ptr(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return 0


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs (nan when theirs is zero)."""
    return ours / theirs if theirs else float("nan")


# ==== tables ==========================================================================================


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        a = abs(value)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{value:,.0f}"
        if a >= 100:
            return f"{value:.1f}"
        if a >= 1:
            return f"{value:.3g}" if a < 10 else f"{value:.2f}".rstrip("0").rstrip(".")
        return f"{value:.3g}"
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[format_value(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells, the table has {len(headers)} columns")
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    out = [] if title is None else [title]
    out += [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


@dataclass
class Row:
    """One line of the `helios-rt bench` table."""

    suite: str
    metric: str
    helios_rt: float | int | str | None
    reference: float | int | str | None = None  # diffusers, where there is one
    unit: str = ""

    @property
    def ratio(self) -> float | None:
        if isinstance(self.helios_rt, (int, float)) and isinstance(self.reference, (int, float)):
            return ratio(float(self.helios_rt), float(self.reference))
        return None


BENCH_HEADERS = ("suite", "metric", "helios_rt", "diffusers", "ratio", "unit")


def format_rows(rows: Sequence[Row], title: str | None = None) -> str:
    return format_table(
        BENCH_HEADERS, [(r.suite, r.metric, r.helios_rt, r.reference, r.ratio, r.unit) for r in rows], title
    )


def rows_json(rows: Sequence[Row]) -> str:
    return json.dumps([{**asdict(r), "ratio": r.ratio} for r in rows], indent=2, allow_nan=False, default=str)


# ==== CPU: side by side with diffusers ================================================================

# The small model of the CPU side-by-side: the oracle tests' distilled pipeline (tests/support/
# pipelines.py) made wider and deeper so that the transformer and the VAE decode both weigh on a
# chunk: transformer 12 layers x 12 heads x 32 (dim 384, ffn 1536), VAE base width 16; 64x64, one
# step per stage, float32. On 2 quiet cores diffusers spends ~25% of a chunk in the transformer and
# ~75% in the decode; `SideBySideResult.rows` print the split of each side.
SXS_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=32,
    num_layers=12,
    rope_dim=(8, 12, 12),
    is_amplify_history=True,
    in_channels=4,
    out_channels=4,
    text_dim=24,
    freq_dim=64,
    ffn_dim=1536,
)
SXS_VAE = dict(
    base_dim=16,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.1, -0.2, 0.05, 0.3],
    latents_std=[1.5, 0.8, 1.2, 2.0],
)
SXS_HEIGHT = SXS_WIDTH = 64
SXS_STEPS = (1, 1, 1)
SXS_SEED = 1234
FRAMES_PER_CHUNK = 33
LATENT_TOLERANCE = 1e-3


def _perturbed(module: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Every parameter moved off its init (norm gains of one, zero biases), as the oracle tests do."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module.eval()


def build_reference_pipeline(transformer: dict | None = None, vae: dict | None = None):
    """The diffusers `HeliosPyramidPipeline` (distilled, DMD) of the side-by-side, random weights."""
    from diffusers import AutoencoderKLWan, HeliosDMDScheduler, HeliosPyramidPipeline, HeliosTransformer3DModel

    torch.manual_seed(11)
    net = _perturbed(HeliosTransformer3DModel(**(transformer or SXS_TRANSFORMER)), 11, 0.1)
    torch.manual_seed(3)
    vae_model = _perturbed(AutoencoderKLWan(**(vae or SXS_VAE)), 3, 0.05)
    # gamma 1/3 (the default) makes the block-noise covariance singular: the reference cannot factor it on CPU
    scheduler = HeliosDMDScheduler(use_dynamic_shifting=True, gamma=0.25)
    pipe = HeliosPyramidPipeline(
        tokenizer=None, text_encoder=None, vae=vae_model, scheduler=scheduler, transformer=net, is_distilled=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class SideMeasure:
    """Per steady-state chunk, one side of the comparison."""

    seconds: float  # wall clock (best of the rounds)
    cpu_seconds: float  # user + system CPU time, all threads (best of the rounds)
    decode_seconds: float  # the VAE decode's part of `seconds`
    peak_rss_mb: float  # resident set high-water mark over a whole run (all chunks), above the start's
    ops: float  # aten ops dispatched
    allocations: float  # tensor storages allocated by those ops
    allocated_mb: float

    @property
    def decode_share(self) -> float:
        return self.decode_seconds / self.seconds if self.seconds else float("nan")


@dataclass
class SideBySideResult:
    helios_rt: SideMeasure
    diffusers: SideMeasure
    chunks: int
    max_latent_diff: float
    threads: int
    config: str = ""

    @property
    def speedup(self) -> float:
        return ratio(self.diffusers.seconds, self.helios_rt.seconds)

    @property
    def cpu_speedup(self) -> float:
        return ratio(self.diffusers.cpu_seconds, self.helios_rt.cpu_seconds)

    def rows(self) -> list[Row]:
        s, d, suite = self.helios_rt, self.diffusers, "cpu"
        return [
            Row(suite, "seconds / chunk", s.seconds, d.seconds, "s"),
            Row(suite, "CPU seconds / chunk", s.cpu_seconds, d.cpu_seconds, "s"),
            Row(suite, "  decode part", s.decode_seconds, d.decode_seconds, "s"),
            Row(suite, "  transformer + sampler part", s.seconds - s.decode_seconds, d.seconds - d.decode_seconds, "s"),
            Row(suite, f"peak RSS increase ({self.chunks}-chunk run)", s.peak_rss_mb, d.peak_rss_mb, "MB"),
            Row(suite, "aten ops / chunk", s.ops, d.ops, ""),
            Row(suite, "allocations / chunk", s.allocations, d.allocations, ""),
            Row(suite, "allocated / chunk", s.allocated_mb, d.allocated_mb, "MB"),
            Row(suite, "speedup (diffusers / helios_rt s)", self.speedup, None, "x"),
            Row(suite, "max |latent difference|", self.max_latent_diff, None, ""),
        ]

    def extra_info(self) -> dict[str, float]:
        info: dict[str, float] = {"speedup": self.speedup, "cpu_speedup": self.cpu_speedup}
        info["max_latent_diff"] = self.max_latent_diff
        info["threads"] = self.threads
        for side, m in (("helios_rt", self.helios_rt), ("diffusers", self.diffusers)):
            for key, value in asdict(m).items():
                info[f"{side}_{key}"] = value
            info[f"{side}_decode_share"] = m.decode_share
        for key in ("seconds", "cpu_seconds", "peak_rss_mb", "ops", "allocations", "allocated_mb"):
            info[f"ratio_{key}"] = ratio(getattr(self.helios_rt, key), getattr(self.diffusers, key))
        return {k: round(float(v), 6) for k, v in info.items()}


class SideBySide:
    """The same small weights as a diffusers pipeline and as a helios_rt `Engine` (via a saved folder).

    Both run text-to-video from the same prompt embeddings and seed, float32 on the CPU, one step per
    pyramid stage (the distilled real-time setting, first chunk amplified). diffusers is run with
    `output_type="latent"`: it still VAE-decodes every chunk (its loop does), but skips the final
    post-processing into frames, while helios_rt hands out uint8 frames per chunk; the comparison
    leans toward diffusers there.

    Chunk boundaries: helios_rt's stream hands out one chunk per `next()`; diffusers' loop ends each
    chunk with its VAE decode, so the end of each decode call marks a chunk (the bookkeeping after it,
    e.g. its growing `history_video` cat, falls into the next chunk, as it should).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        transformer: dict | None = None,
        vae: dict | None = None,
        engine_overrides: dict | None = None,
    ):
        from .config import EngineConfig
        from .engine import Engine

        self.pipe = build_reference_pipeline(transformer, vae)
        self._tmp = None
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="helios_rt_sxs_")
            root = self._tmp.name
        self.root = Path(root)
        self.pipe.save_pretrained(self.root, safe_serialization=True)
        self.engine = Engine.from_pretrained(
            self.root,
            EngineConfig(
                height=SXS_HEIGHT,
                width=SXS_WIDTH,
                device="cpu",
                dtype="float32",
                kernels="reference",
                pyramid_steps=SXS_STEPS,
                amplify_first_chunk=True,
                **(engine_overrides or {}),
            ),
        )
        self.engine_note = "".join(f"{k}={v}, " for k, v in (engine_overrides or {}).items())
        text_dim = self.pipe.transformer.config.text_dim
        self.prompt_embeds = torch.randn(1, 12, text_dim, generator=torch.Generator().manual_seed(1))
        self._marks: _Marks | None = None
        ref_decode = self.pipe.vae.decode

        def timed_decode(*args, **kwargs):
            t0 = time.perf_counter()
            out = ref_decode(*args, **kwargs)
            if self._marks is not None:
                self._marks.decode_s += time.perf_counter() - t0
                self._marks.mark()
            return out

        self.pipe.vae.decode = timed_decode

    def describe(self) -> str:
        t, v = self.pipe.transformer.config, self.pipe.vae.config
        return (
            f"{self.engine_note}distilled DMD, steps {SXS_STEPS}, {SXS_HEIGHT}x{SXS_WIDTH}, float32, transformer "
            f"{t.num_layers} layers x {t.num_attention_heads} heads x {t.attention_head_dim} (ffn {t.ffn_dim}), "
            f"VAE base {v.base_dim} z {v.z_dim}"
        )

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # one run of each side: latents [1, C, 9n, h, w]; `marks.mark()` is called at the end of each chunk
    def run_diffusers(self, chunks: int, marks: _Marks | None = None) -> Tensor:
        self._marks = marks
        try:
            latents = self.pipe(
                prompt_embeds=self.prompt_embeds,
                height=SXS_HEIGHT,
                width=SXS_WIDTH,
                num_frames=FRAMES_PER_CHUNK * chunks,
                pyramid_num_inference_steps_list=list(SXS_STEPS),
                is_amplify_first_chunk=True,
                guidance_scale=1.0,
                generator=torch.Generator().manual_seed(SXS_SEED),
                output_type="latent",
            ).frames
        finally:
            self._marks = None
        return latents[:, :, -9 * chunks :]

    def run_helios_rt(self, chunks: int, marks: _Marks | None = None) -> Tensor:
        out = []
        with self.engine.generate_stream(
            prompt_embeds=self.prompt_embeds, num_frames=FRAMES_PER_CHUNK * chunks, seed=SXS_SEED
        ) as stream:
            for chunk in stream:
                out.append(chunk)
                if marks is not None:
                    marks.decode_s += chunk.timings["decode_s"]
                    marks.mark()
        return torch.cat([c.latents for c in out], dim=2)

    def measure(self, chunks: int = 3, rounds: int = 2, count: bool = True, warmup: bool = False) -> SideBySideResult:
        """Interleaved runs of both sides, chunks 1.. of each averaged, the fastest of `rounds` runs;
        then one counting run of each side (ops and allocations of chunks 1..)."""
        if chunks < 2:
            raise ValueError(f"measure needs at least 2 chunks (chunk 0 is not steady state), got {chunks}")
        sides: dict[str, Callable[..., Tensor]] = {"helios_rt": self.run_helios_rt, "diffusers": self.run_diffusers}
        if warmup:  # first calls and caches mostly land in chunk 0, which is never counted
            with torch.no_grad():
                for run in sides.values():
                    run(1)
        best: dict[str, dict[str, float]] = {}
        latents: dict[str, Tensor] = {}
        for _ in range(rounds):
            for name, run in sides.items():
                marks = _Marks()
                release_free_memory()
                base = rss_bytes()
                reset_peak_rss()
                marks.mark()
                with torch.no_grad():
                    latents[name] = run(chunks, marks)
                steady = marks.steady(chunks)
                steady["peak_rss_mb"] = (peak_rss_bytes() - base) / 2**20
                if name not in best or steady["seconds"] < best[name]["seconds"]:
                    best[name] = steady  # the fastest round, all its readings (they add up)
        for name, run in sides.items() if count else ():
            marks = _Marks(OpCounter())
            with torch.no_grad(), marks.counter:
                marks.mark()
                run(chunks, marks)
            best[name].update({k: v for k, v in marks.steady(chunks).items() if k in _COUNTED})
        measures = {name: SideMeasure(**{k: best[name].get(k, float("nan")) for k in _MEASURED}) for name in sides}
        diff = (latents["helios_rt"] - latents["diffusers"]).abs().max().item()
        return SideBySideResult(
            measures["helios_rt"],
            measures["diffusers"],
            chunks,
            diff,
            torch.get_num_threads(),
            self.describe(),
        )


_COUNTED = ("ops", "allocations", "allocated_mb")
_MEASURED = ("seconds", "cpu_seconds", "decode_seconds", "peak_rss_mb", *_COUNTED)


class _Marks:
    """Cumulative readings at each chunk boundary (the first at the start of a run)."""

    def __init__(self, counter: OpCounter | None = None) -> None:
        self.counter = counter
        self.decode_s = 0.0
        self.points: list[dict[str, float]] = []

    def mark(self) -> None:
        c = self.counter
        self.points.append(
            {
                "seconds": time.perf_counter(),
                "cpu_seconds": cpu_seconds(),
                "decode_seconds": self.decode_s,
                "ops": c.ops if c else float("nan"),
                "allocations": c.allocations if c else float("nan"),
                "allocated_mb": c.allocated_bytes / 2**20 if c else float("nan"),
            }
        )

    def steady(self, chunks: int) -> dict[str, float]:
        """Mean per chunk over chunks 1.. (from the boundary after chunk 0 to the last)."""
        if len(self.points) != chunks + 1:
            raise RuntimeError(f"expected {chunks + 1} chunk boundaries, saw {len(self.points)}")
        first, last = self.points[1], self.points[-1]
        return {k: (last[k] - first[k]) / (chunks - 1) for k in first}


def run_cpu_suite(chunks: int = 3, rounds: int = 2, engine_overrides: dict | None = None) -> SideBySideResult:
    sxs = SideBySide(engine_overrides=engine_overrides)
    try:
        return sxs.measure(chunks=chunks, rounds=rounds)
    finally:
        sxs.close()


# ==== GPU: stream timings =============================================================================


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

    Wraps the engine's sampler and VAE methods (instance attributes, removed by `close`); CUDA events
    on a CUDA engine, host timers otherwise. `end_chunk()` files the timings of one chunk (on CUDA
    after a device synchronize, which is why a timed stream does not overlap its decode). An engine
    that replays chunk graphs never calls these methods after the capture, so it is refused.
    """

    def __init__(self, engine) -> None:
        if graphed(engine):
            raise ValueError(
                "per-stage timing needs an engine without chunk graphs (EngineConfig(graphs='off' or 'step')): "
                "a replayed graph runs no Python, so there is nothing to time per stage"
            )
        self.engine = engine
        self.timer = _CudaTimer() if engine.device.type == "cuda" else _HostTimer()
        self.samples: dict[str, list[float]] = {}
        sampler, vae = engine.sampler, engine.vae
        self._patched = [(sampler, "_stage_loop"), (sampler, "_transition"), (sampler, "_base_loop")]
        self._patched.append((vae, "decode_frames"))
        stage_loop, transition, base_loop, decode = (getattr(o, n) for o, n in self._patched)

        def timed(key_fn, fn):
            def wrapper(*args, **kwargs):
                token = self.timer.start()
                out = fn(*args, **kwargs)
                self.timer.stop(key_fn(args), token)
                return out

            return wrapper

        sampler._stage_loop = timed(lambda a: f"stage {a[4]}", stage_loop)
        sampler._transition = timed(lambda a: f"transition {a[2]}", transition)
        sampler._base_loop = timed(lambda a: "denoise", base_loop)
        vae.decode_frames = timed(lambda a: "decode", decode)

    def end_chunk(self) -> None:
        chunk: dict[str, float] = {}
        for key, ms in self.timer.collect():
            chunk[key] = chunk.get(key, 0.0) + ms
        for key, ms in chunk.items():
            self.samples.setdefault(key, []).append(ms)

    def close(self) -> None:
        for obj, name in self._patched:
            obj.__dict__.pop(name, None)

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
    fpc = engine.vae.config.num_frames(engine.config.latent_frames_per_chunk)
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
    from .config import HELIOS_14B, EngineConfig
    from .demo import DEMO_MODEL_INDEX, DEMO_SCHEDULER
    from .engine import Engine
    from .model.transformer import HeliosTransformer, keeps_fp32
    from .model.vae import VAEConfig, WanVAE
    from .ops import OpSet
    from .sampling.chunk import SamplingSpec

    model_config = model_config or HELIOS_14B
    config = config or EngineConfig()
    device = torch.device(config.resolved_device())
    dtype, vae_dtype = config.resolved_dtype(), config.resolved_dtype("vae_dtype")
    with torch.device("meta"):
        transformer = HeliosTransformer(model_config, OpSet(device, config.kernels))
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
    spec = SamplingSpec.from_checkpoint(DEMO_MODEL_INDEX, DEMO_SCHEDULER, config)
    return Engine(transformer.eval(), vae, None, spec, config)


def gpu_engines(chunks: int = 4) -> list[tuple[str, Callable[..., Any], dict]]:
    """(label, engine factory, generate kwargs) of the GPU suite: the 14B shape and the demo model.

    A factory takes EngineConfig overrides (the suite builds a second, eager engine for stage timings).
    """
    from .config import HELIOS_14B, EngineConfig
    from .engine import Engine

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
    demo = ("demo", lambda **o: Engine.from_pretrained("demo", demo_cfg.replace(**o)), {"prompt": "a fish"})
    return [demo, big]


EAGER = {"graphs": "off", "overlap_decode": False}  # the stage-timing engine: every stage visible to Python


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


# ==== projection =====================================================================================


def projection_rows(steps_list: Sequence[tuple[int, ...]] = ((1, 1, 1), (2, 2, 2))) -> tuple[list[Row], str]:
    """The 14B at 384x640, bf16, H100 projection: summary rows, and the full tables as text."""
    from .compile import cost
    from .config import HELIOS_14B

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


# ==== `helios-rt bench` ==============================================================================

SUITES = ("auto", "cpu", "gpu", "projection")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="run the benchmarks that fit this machine and print one table",
        description="Projection (always); CPU side by side with diffusers (on CPU); GPU stream (on CUDA).",
    )
    p.add_argument("--suite", choices=SUITES, default="auto",
                   help="auto: projection + cpu without CUDA, projection + gpu with it")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--chunks", type=_at_least(2), default=3, help="chunks per measured run (>= 2)")
    p.add_argument("--rounds", type=_at_least(1), default=2, help="CPU suite: best of this many runs")
    p.add_argument("--verbose", action="store_true", help="also print the projection's per-op-class tables")
    p.add_argument("--engine-option", action="append", default=[], type=_engine_option, metavar="KEY=VALUE",
                   help="CPU suite: an EngineConfig field for helios_rt's side, e.g. programs=off")  # fmt: skip
    return p


def _engine_option(text: str) -> tuple[str, str]:
    from .config import EngineConfig

    key, sep, value = text.partition("=")
    if not sep or key not in EngineConfig.__dataclass_fields__:
        fields = ", ".join(EngineConfig.__dataclass_fields__)
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY an EngineConfig field ({fields}), got {text!r}")
    return key, value


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def suites_for(suite: str, cuda: bool | None = None) -> list[str]:
    """The suites `--suite` runs on this machine."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if suite == "auto":
        return ["projection", "gpu" if cuda else "cpu"]
    if suite == "gpu" and not cuda:
        raise ValueError("--suite gpu needs a CUDA device; this machine has none")
    return [suite] if suite == "projection" else ["projection", suite]


def run_bench(args: argparse.Namespace) -> int:
    try:
        suites = suites_for(args.suite)
    except ValueError as err:
        print(f"helios-rt bench: error: {err}", file=sys.stderr)
        return 2
    rows: list[Row] = []
    notes: list[str] = []
    for suite in suites:
        print(f"helios-rt bench: running the {suite} suite ...", file=sys.stderr, flush=True)
        if suite == "projection":
            proj, text = projection_rows()
            rows += proj
            if getattr(args, "verbose", False):
                notes.append(text)
        elif suite == "cpu":
            try:
                import diffusers  # noqa: F401
            except ImportError:
                print("helios-rt bench: the cpu suite needs diffusers (pip install helios_rt[dev]); skipped",
                      file=sys.stderr)  # fmt: skip
                continue
            overrides = dict(getattr(args, "engine_option", []))
            result = run_cpu_suite(chunks=args.chunks, rounds=args.rounds, engine_overrides=overrides)
            rows += result.rows()
            notes.append(f"cpu: {result.config}, {result.threads} threads, per steady-state chunk")
        else:
            for result in run_gpu_suite(chunks=args.chunks):
                rows += result.rows()
    if args.json:
        print(rows_json(rows))
    else:
        for note in notes:
            print(note)
        print(format_rows(rows, title="helios-rt bench"))
    return 0


# ==== `helios-rt profile` ============================================================================


def add_profile_parser(subparsers) -> argparse.ArgumentParser:
    from .cli import _positive_int, _steps

    p = subparsers.add_parser(
        "profile",
        help="print the Nsight Systems command line and run a short generation with NVTX ranges on",
        description="Runs warm-up chunks, then the chunks inside the NVTX range "
        f"'{profiling.CAPTURE_RANGE}' that the printed nsys command records.",
    )
    p.add_argument("--model", required=True, help="'demo' or a Helios checkpoint folder")
    p.add_argument("--prompt", default="a tropical fish among corals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=_positive_int, default=None)
    p.add_argument("--width", type=_positive_int, default=None)
    p.add_argument("--steps", type=_steps, default=None, help="steps per pyramid stage, e.g. 1,1,1")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kernels", default="auto", choices=["auto", "reference", "triton"])
    p.add_argument("--graphs", default="auto", choices=["auto", "chunk", "step", "off"],
                   help="chunk: one graph replay per chunk (its kernels show under 'chunk k'); step: one per "
                   "step, so stage and step ranges show too; off: eager")  # fmt: skip
    p.add_argument("--fps", type=_positive_int, default=24)
    p.add_argument("--warmup-chunks", type=int, default=1, help="chunks before the recorded range")
    p.add_argument("--chunks", type=_positive_int, default=2, help="chunks inside the recorded range")
    p.add_argument("--output", default="helios_rt_profile", help="the nsys report name")
    p.add_argument("--print-only", action="store_true", help="print the nsys command line and exit")
    return p


def profile_argv(args: argparse.Namespace) -> list[str]:
    """The `helios-rt profile ...` arguments that reproduce `args` (what nsys is told to run)."""
    argv = ["profile", "--model", str(args.model), "--prompt", args.prompt, "--seed", str(args.seed)]
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None:
            argv += [flag, str(value)]
    if args.steps is not None:
        argv += ["--steps", ",".join(map(str, args.steps))]
    argv += ["--device", args.device, "--dtype", args.dtype, "--kernels", args.kernels, "--graphs", args.graphs]
    argv += ["--warmup-chunks", str(args.warmup_chunks), "--chunks", str(args.chunks)]
    return argv


def run_profile(args: argparse.Namespace, out=None) -> int:
    from .cli import _engine_config
    from .engine import Engine

    out = out or sys.stdout
    if args.warmup_chunks < 0:
        print("helios-rt profile: error: --warmup-chunks must be >= 0", file=sys.stderr)
        return 2
    print("Nsight Systems command line (records the chunks inside the range "
          f"'{profiling.CAPTURE_RANGE}'):", file=out)  # fmt: skip
    print("  " + profiling.nsys_command(profile_argv(args), output=args.output), file=out)
    if args.print_only:
        return 0
    if not profiling.available():
        print("helios-rt profile: the nvtx package is not installed: ranges are off (pip install nvtx)", file=out)
    previous = profiling._enabled
    profiling.set_enabled(True)
    try:
        return _profile_run(args, out, Engine, _engine_config(args))
    finally:
        profiling.set_enabled(previous)


def _profile_run(args, out, engine_cls, config) -> int:
    t0 = time.perf_counter()
    with nvtx_range("load", color="blue"):
        engine = engine_cls.from_pretrained(args.model, config)
        engine.warmup()  # the chunk graphs are captured before the recorded range, not inside it
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    load_s = time.perf_counter() - t0
    fpc = engine.vae.config.num_frames(engine.config.latent_frames_per_chunk)
    total = args.warmup_chunks + args.chunks
    rows = []
    with engine.generate_stream(args.prompt, num_frames=fpc * total, seed=args.seed) as stream:
        chunks = iter(stream)
        for _ in range(args.warmup_chunks):
            rows.append(_profile_row(next(chunks), "warm-up", engine))
        with nvtx_range(profiling.CAPTURE_RANGE, color="red"):
            for _ in range(args.chunks):
                rows.append(_profile_row(next(chunks), "recorded", engine))
    print(f"loaded {args.model} in {load_s:.2f} s on {engine.device} at {config.height}x{config.width}; "
          f"NVTX ranges {'on' if profiling.enabled() else 'off (no nvtx package)'}", file=out)  # fmt: skip
    print(format_table(("chunk", "phase", "transformer s", "decode s", "frames"), rows), file=out)
    return 0


def _profile_row(chunk, phase: str, engine) -> tuple:
    """A handed-over chunk's own timings (stream events: reading them needs no synchronize, which
    would serialise the decode lane with the next chunk in the recorded timeline)."""
    t = chunk.timings
    return (str(chunk.index), phase, t.get("transformer_s"), t.get("decode_s"), len(chunk.frames))


def main(argv: list[str] | None = None) -> int:
    """`python -m helios_rt.benchmarking bench|profile ...` (the same as `helios-rt bench|profile`)."""
    parser = argparse.ArgumentParser(prog="helios-rt")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    add_profile_parser(sub)
    args = parser.parse_args(argv)
    try:
        return run_bench(args) if args.command == "bench" else run_profile(args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"helios-rt: error: {err}", file=sys.stderr)
        return 2


__all__ = [
    "OpCounter",
    "Row",
    "SideBySide",
    "SideBySideResult",
    "StageTimer",
    "StreamResult",
    "add_bench_parser",
    "add_profile_parser",
    "chunk_rates",
    "format_rows",
    "format_table",
    "measure_stream",
    "projection_rows",
    "random_engine",
    "run_bench",
    "run_cpu_suite",
    "run_gpu_suite",
    "run_profile",
]

if __name__ == "__main__":
    sys.exit(main())
