"""CPU: helios_rt side by side with `diffusers.HeliosPyramidPipeline` on identical small weights."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .measure import OpCounter, cpu_seconds, peak_rss_bytes, ratio, release_free_memory, reset_peak_rss, rss_bytes
from .table import Row

Tensor = torch.Tensor

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
    # gamma 1/3 (the default) makes the block-noise covariance singular: the reference cannot factor it on every CPU
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
        from ..config import DebugSwitches, EngineConfig
        from ..engine import Engine
        from ..sampling.overrides import SamplingOverrides

        self.pipe = build_reference_pipeline(transformer, vae)
        self._tmp = None
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="helios_rt_sxs_")
            root = self._tmp.name
        self.root = Path(root)
        self.pipe.save_pretrained(self.root, safe_serialization=True)
        self.engine = Engine.from_pretrained(
            self.root,
            with_engine_options(
                EngineConfig(
                    height=SXS_HEIGHT,
                    width=SXS_WIDTH,
                    device="cpu",
                    dtype="float32",
                    steps=SXS_STEPS,
                    sampling=SamplingOverrides(amplify_first_chunk=True),
                    debug=DebugSwitches(kernels="reference"),
                ),
                engine_overrides or {},
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


def with_engine_options(config, options: dict):
    """`config` with engine options named as on the command line (`helios-rt bench --engine-option graphs=off`),
    each set at its field in EngineConfig or one of its groups (the option table's `field`)."""
    import dataclasses

    from ..options import OPTIONS_BY_NAME

    top: dict = {}
    for name, value in options.items():
        if name not in OPTIONS_BY_NAME:
            raise ValueError(f"no engine option named {name!r}; use one of {sorted(OPTIONS_BY_NAME)}")
        group, _, field = OPTIONS_BY_NAME[name].field.rpartition(".")
        if group:
            top[group] = dataclasses.replace(top.get(group, getattr(config, group)), **{field: value})
        else:
            top[field] = value
    return config.replace(**top)


def run_cpu_suite(chunks: int = 3, rounds: int = 2, engine_overrides: dict | None = None) -> SideBySideResult:
    sxs = SideBySide(engine_overrides=engine_overrides)
    try:
        return sxs.measure(chunks=chunks, rounds=rounds)
    finally:
        sxs.close()
