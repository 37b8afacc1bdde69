"""One chunk of Helios sampling: the pyramid (distilled or mid) or the single-resolution base loop.

`SamplingSpec` is what a checkpoint and an `EngineConfig` decide together (steps, guidance, which
pipeline); `ChunkSampler` turns noise and a history into a chunk's clean latents. Everything that
depends on Python values (schedules, layouts, RoPE tables) is planned once per shape and cached;
the step loop only runs tensors through the transformer and the step functions.

The sampler math that has a fused kernel goes through the op table (`OpSet`, the transformer's by
default), so `EngineConfig(kernels=...)` picks the backend: `flow_step` for DMD steps (it reads the
transformer's patch-layout output, so DMD stages call the model with `unpatchify=False`),
`stage_transition` for the pyramid's upsample + block noise (the noise itself is drawn here, on the
generator), and `cfg_combine` for CFG and CFG-Zero* (a zero-init step is `cond * 0.0`, planned on
the host). The op references round exactly as the functions of `schedules`/`pyramid`/`guidance`
they replace. UniPC and Euler steps stay on those PyTorch functions.

The sampler defines the math of a chunk (`run_chunk`, its only definition) and knows nothing of
compilation: `compile.chunk_program` runs `run_chunk` on meta tensors to plan it, then on a planned
arena (and under CUDA-graph capture). For that the step loop makes no host decision on tensor values
and creates no constants while it runs: `prepare()` builds every layout, RoPE table, schedule plan,
CFG-Zero* flag and the block-noise factor first (the lazily filled caches would otherwise be
allocated inside a planned run).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..model.layout import TokenLayout, build_layout, rope_tables
from ..model.transformer import HeliosTransformer, HistoryTokens, TextContext
from ..ops import OpSet
from ..profiling import nvtx_range
from .guidance import zero_init_steps
from .history import HistoryLayout, HistoryMemory
from .noise import NoiseSource
from .pyramid import (
    PyramidPlan,
    block_noise_factor,
    block_normals_shape,
    correlate_block_noise,
    downsample_noise,
    plan_pyramid,
)
from .schedules import (
    ScheduleConfig,
    StagePlan,
    UniPCState,
    base_sigmas,
    calculate_shift,
    euler_step,
    helios_stage_plan,
    unipc_step,
)

Tensor = torch.Tensor


@dataclass(frozen=True)
class SamplingSpec:
    """How a checkpoint samples a chunk, after EngineConfig overrides."""

    schedule: ScheduleConfig
    pyramid: bool  # HeliosPyramidPipeline (distilled, mid) vs HeliosPipeline (base)
    is_distilled: bool
    cfg_zero_star: bool
    steps: tuple[int, ...]  # per stage (pyramid) or (num_inference_steps,) (base)
    guidance_scale: float
    amplify_first_chunk: bool
    zero_init_steps: int = 1

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @classmethod
    def from_checkpoint(cls, model_index: dict[str, Any], scheduler: dict[str, Any], config) -> SamplingSpec:
        """Defaults: distilled = one step per stage, no CFG, doubled first chunk; others CFG 5.0."""
        pipeline = model_index.get("_class_name", "HeliosPyramidPipeline")
        if pipeline not in ("HeliosPyramidPipeline", "HeliosPipeline"):
            raise ValueError(
                f"model_index.json names pipeline {pipeline!r}; helios_rt runs HeliosPyramidPipeline "
                "and HeliosPipeline checkpoints"
            )
        schedule = ScheduleConfig.from_dict(scheduler)
        pyramid = pipeline == "HeliosPyramidPipeline"
        distilled = bool(model_index.get("is_distilled", False))
        overrides = config.sampling
        if overrides.amplify_first_chunk and not (pyramid and distilled):
            raise ValueError(
                "EngineConfig.amplify_first_chunk=True applies to distilled pyramid checkpoints only "
                "(model_index.json is_distilled=true)"
            )
        steps = checkpoint_steps(config.steps, config.steps_option, pyramid, distilled, schedule.stages)
        guidance = config.guidance_scale if config.guidance_scale is not None else (1.0 if distilled else 5.0)
        amplify = overrides.amplify_first_chunk if overrides.amplify_first_chunk is not None else distilled
        return cls(
            schedule,
            pyramid,
            distilled,
            # a pyramid pipeline's option: diffusers' base HeliosPipeline has no CFG-Zero* and ignores the key
            bool(model_index.get("is_cfg_zero_star", False)) and pyramid,
            tuple(steps),
            float(guidance),
            bool(amplify and distilled and pyramid),
            overrides.value("zero_init_steps"),
        )


def checkpoint_steps(
    steps: int | tuple[int, ...] | None, option: str, pyramid: bool, distilled: bool, stages: int
) -> tuple[int, ...]:
    """`EngineConfig.steps` for this checkpoint: one count per pyramid stage, or (total,) for a base one.

    None takes the checkpoint's (distilled: 1 per stage; mid: 20 per stage; base: 50); an int is per
    stage on a pyramid and the total on a base checkpoint. `option` is the name the steps were given
    under: the deprecated `pyramid_steps` / `num_inference_steps` keep their rule (one kind of checkpoint).
    """
    if option == "num_inference_steps" and pyramid and steps is not None:
        raise ValueError(
            "EngineConfig.num_inference_steps applies to HeliosPipeline (base) checkpoints; this one is a "
            "pyramid checkpoint: set steps (an int per stage, or one count per stage) instead"
        )
    if option == "pyramid_steps" and not pyramid and steps is not None:
        raise ValueError(
            "EngineConfig.pyramid_steps applies to pyramid checkpoints; this one is a HeliosPipeline (base): "
            "set steps (its total, an int) instead"
        )
    if steps is None:
        return ((1 if distilled else 20),) * stages if pyramid else (50,)
    if isinstance(steps, int):
        return (steps,) * stages if pyramid else (steps,)
    if pyramid and len(steps) != stages:
        raise ValueError(
            f"EngineConfig.{option}={steps} has {len(steps)} entries but the checkpoint's scheduler has {stages} "
            "stages: give one count per stage, or one int for every stage"
        )
    if not pyramid and len(steps) != 1:
        raise ValueError(
            f"EngineConfig.{option}={steps}: a HeliosPipeline (base) checkpoint has one stage; pass its total "
            "number of steps as an int"
        )
    return tuple(steps)


@dataclass(frozen=True)
class ChunkKind:
    """What makes one chunk's op sequence differ from another's (one plan and one graph per kind).

    amplified: the distilled first chunk's plan (`amplify_first_chunk`); set_prefix: the history
    push takes this chunk's first latent frame as the prefix.
    """

    amplified: bool
    set_prefix: bool


STEADY = ChunkKind(False, False)  # every chunk after the first: a stream's last kind


def stream_kinds(
    amplify_first_chunk: bool, keep_first_frame: bool, prefix_set: bool, first_chunk: bool = True
) -> tuple[ChunkKind, ...]:
    """The kinds a stream runs from its next chunk on, in order, each once: the next chunk's, then `STEADY`.

    The first chunk of a distilled model takes the amplified plan (`amplify_first_chunk`); a chunk
    whose history has no prefix frame yet (text-to-video, `keep_first_frame`) writes one, after which
    the prefix is set for good. An image or a video sets the prefix before the first chunk
    (`prefix_set`). The one place these rules live: the engine, the compiler and the plan report ask here.
    """
    next_kind = ChunkKind(first_chunk and amplify_first_chunk, keep_first_frame and not prefix_set)
    return tuple(dict.fromkeys([next_kind, STEADY]))


@dataclass
class ChunkState:
    """The buffers a chunk reads and writes that outlive it (outside a program's arena)."""

    history: HistoryMemory
    noise: NoiseSource  # a program's `StaticNoise`; eagerly, the stream's generator (`GeneratorNoise`)
    output: Tensor
    text: TextContext
    history_mod: Tensor


@dataclass
class Conditioning:
    """Per-chunk inputs of the transformer that stay fixed across its stages and steps."""

    text: TextContext  # batch B, or 2B as [cond; uncond] with CFG
    history: HistoryTokens | None
    history_mod: Tensor


class ChunkSampler:
    """Runs one chunk's stages and steps; caches layouts, RoPE tables and schedule plans per shape.

    ops: the op table of the sampler ops (default: the transformer's, so one `EngineConfig.kernels`
    choice covers both).
    """

    def __init__(
        self,
        model: HeliosTransformer,
        spec: SamplingSpec,
        history_layout: HistoryLayout,
        latent_hw: tuple[int, int],
        device: torch.device,
        ops: OpSet | None = None,
    ) -> None:
        self.model = model
        self.ops = ops if ops is not None else model.ops
        self.spec = spec
        self.history_layout = history_layout
        self.latent_hw = latent_hw
        self.device = device
        self.frames = history_layout.chunk_frames
        idx = {k: tuple(v[0].tolist()) for k, v in history_layout.indices().items()}
        self.noisy_indices = idx["indices_hidden_states"]
        self.history_indices = {
            "short": idx["indices_latents_history_short"],
            "mid": idx["indices_latents_history_mid"],
            "long": idx["indices_latents_history_long"],
        }
        self._layouts: dict[tuple[int, int], tuple[TokenLayout, tuple[Tensor, Tensor]]] = {}
        self._plans: dict[bool, Any] = {}
        self._zeroed: dict[tuple[int, int], tuple[bool, ...]] = {}
        self._block_factor: Tensor | None = None
        # public: a callable name -> context manager entered around each section (see `section`)
        self.section_hook: Callable[[str], contextlib.AbstractContextManager] | None = None

    # ---- constants -------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Build every constant a chunk reads (both chunk plans, each stage's layout and RoPE tables,
        CFG-Zero* flags, the block-noise factor), so that `run_chunk` only computes."""
        for first in (False, True):
            for s, stage in enumerate(self._stages(first)):
                self._zero_flags(s, stage.num_steps)
        hws = self.plan(False).hw if self.spec.pyramid else (self.latent_hw,)
        for hw in dict.fromkeys((*hws, self.latent_hw)):
            self.layout(hw)
        if self.spec.pyramid and self._block_factor is None:
            self.set_block_factor(block_noise_factor(self.spec.schedule.gamma, self.model.config.patch_size[1:]))

    @property
    def block_factor(self) -> Tensor | None:
        """The block-noise covariance factor, once `prepare()` (or `set_block_factor`) made it."""
        return self._block_factor

    def rope_tables(self) -> list[Tensor]:
        """Every RoPE table made so far (one cos/sin pair per stage shape): constants a chunk reads."""
        return [t for _, rope in self._layouts.values() for t in rope]

    def set_block_factor(self, factor: Tensor) -> None:
        """The block-noise covariance factor (a Cholesky of the config: factored on the host, with values)."""
        self._block_factor = factor.to(self.device)

    def section(self, name: str) -> contextlib.AbstractContextManager:
        """An NVTX range around a part of the chunk ("stage s", "transition s", "denoise"), and the
        `section_hook`'s context when one is set (benchmarks time the parts through it)."""
        if self.section_hook is None:
            return nvtx_range(name)
        stack = contextlib.ExitStack()
        stack.enter_context(nvtx_range(name))
        stack.enter_context(self.section_hook(name))
        return stack

    def _zero_flags(self, stage: int, num_steps: int) -> tuple[bool, ...]:
        """Which steps of `stage` CFG-Zero* zeroes, as host booleans (planned once, read by the loop)."""
        key = (stage, num_steps)
        if key not in self._zeroed:
            flags = zero_init_steps(stage, num_steps, self.spec.zero_init_steps)
            self._zeroed[key] = tuple(bool(f) for f in flags.tolist())
        return self._zeroed[key]

    def _stages(self, first_chunk: bool) -> tuple[StagePlan, ...]:
        plan = self.plan(first_chunk)
        return plan.stages if self.spec.pyramid else (plan,)

    def layout(self, hw: tuple[int, int]) -> tuple[TokenLayout, tuple[Tensor, Tensor]]:
        """Token layout and RoPE tables of a stage with noisy latents of size `hw` (cached)."""
        if hw not in self._layouts:
            layout = build_layout(
                self.model.config, (self.frames, *hw), self.noisy_indices, self.latent_hw, self.history_indices
            )
            self._layouts[hw] = (layout, rope_tables(self.model.config, layout, self.device))
        return self._layouts[hw]

    def plan(self, first_chunk: bool) -> PyramidPlan | StagePlan:
        """The chunk's schedule, its tables on the device (steps read their sigmas from there)."""
        amplify = self.spec.amplify_first_chunk and first_chunk
        if amplify not in self._plans:
            h, w = self.latent_hw
            if self.spec.pyramid:
                plan = plan_pyramid(
                    self.spec.schedule,
                    self.spec.steps,
                    self.frames,
                    h,
                    w,
                    self.model.config.patch_size,
                    amplify_first_chunk=amplify,
                )
                plan = replace(plan, stages=tuple(stage.to(self.device) for stage in plan.stages))
            else:
                p = self.model.config.patch_size
                mu = calculate_shift(self.spec.schedule, self.frames * h * w // (p[0] * p[1] * p[2]))
                # the base pipeline hands the transformer float timesteps (the pyramid truncates to int64)
                plan = helios_stage_plan(
                    self.spec.schedule,
                    self.spec.steps[0],
                    None,
                    mu=mu,
                    sigmas=base_sigmas(self.spec.steps[0]),
                    int_model_timesteps=False,
                ).to(self.device)
            self._plans[amplify] = plan
        return self._plans[amplify]

    def embed_history(self, short: Tensor, mid: Tensor, long: Tensor) -> HistoryTokens | None:
        layout, _ = self.layout(self.latent_hw)
        return self.model.embed_history(layout, short, mid, long)

    # ---- one chunk -------------------------------------------------------------------------------
    def noise_shapes(self, batch: int) -> list[tuple[int, ...]]:
        """The shapes of a chunk's standard-normal draws, in the order `run_chunk` takes them.

        The start noise `[B, C, frames, H, W]`, then per stage transition its block normals.
        """
        shapes = [(batch, self.model.config.in_channels, self.frames, *self.latent_hw)]
        if self.spec.pyramid:
            patch = self.model.config.patch_size
            for h, w in self.plan(False).hw[1:]:
                shapes.append(block_normals_shape(batch, shapes[0][1], self.frames, h, w, patch))
        return shapes

    @torch.no_grad()
    def run_chunk(self, state: ChunkState, kind: ChunkKind, batch: int) -> None:
        """One chunk, its only definition: the history windows' tokens, every stage (the pyramid's, or a
        base checkpoint's one) and step, the clean latents into `state.output`, the history update.

        A chunk program plans it on meta tensors, runs it on its arena and captures it; `EagerChunk` runs
        it on a stream's own state. It reads `state` only and makes no host decision on a tensor value.
        Stages and steps are one loop here, not a helper per stage, so that a reader goes from
        `next(stream)` to a kernel launcher in six direct calls (docs/ARCHITECTURE.md).
        """
        cond = Conditioning(state.text, self.embed_history(*state.history.windows()), state.history_mod)
        plan = self.plan(kind.amplified)
        pyramid = self.spec.pyramid
        stages, sizes = (plan.stages, plan.hw) if pyramid else ((plan,), (self.latent_hw,))
        latents = state.noise.chunk(self.noise_shapes(batch)[0])
        if pyramid:  # contiguous: it is also stage 0's start point, which the fused flow step reads densely
            latents = downsample_noise(latents, len(stages)).contiguous()
        for s, stage in enumerate(stages):
            if s > 0:
                with self.section(f"transition {s}"):
                    latents = self._transition(latents, plan, s, state.noise)
            start = latents if pyramid else None  # a pyramid stage's steps read its start point
            with self.section(f"stage {s}" if pyramid else "denoise"):
                layout, rope = self.layout(sizes[s])
                zeroed = self._zero_flags(s, stage.num_steps) if self.spec.cfg_zero_star and pyramid else None
                unipc = self._unipc_state(stage, latents)
                patch_layout = stage.kind == "dmd"  # flow_step unpatchifies as it loads: keep the patch layout
                for i in range(stage.num_steps):
                    with nvtx_range(f"step {i}"):
                        x = latents.to(self.model.dtype)
                        x = torch.cat([x, x]) if self.spec.uses_cfg else x
                        timestep = stage.model_timesteps[i].reshape(1).expand(x.shape[0]).to(self.device)
                        # the history is batch 1; the transformer expands it over the (CFG) batch without a copy
                        flow = self.model(x, timestep, cond.text, layout, rope, cond.history, cond.history_mod,
                                          unpatchify=not patch_layout)  # fmt: skip
                        if self.spec.uses_cfg and zeroed is not None and zeroed[i]:
                            # the reference's zero-init step: `cond * 0.0` (signed zeros, NaN kept)
                            flow = flow[:batch] * 0.0
                        elif self.spec.uses_cfg:  # [cond; uncond] as stacked (guidance.split_cond_uncond's order)
                            flow = self.ops.cfg_combine(flow, self.spec.guidance_scale, self.spec.cfg_zero_star)
                        latents = self._step(stage, i, flow, latents, start, unipc)
                if stage.kind == "dmd":
                    # the reference's last DMD step returns x0 in the model dtype, and the next stage's
                    # transition and steps run in it (exact cast: x0 was rounded to it in the step)
                    latents = latents.to(self.model.dtype)
        state.output.copy_(latents)
        state.history.push(state.output, set_prefix=kind.set_prefix)

    def _transition(self, latents: Tensor, plan: PyramidPlan, s: int, source: NoiseSource) -> Tensor:
        alpha, beta = plan.alpha_beta[s]
        b, c, t, h, w = latents.shape
        if self._block_factor is None:  # a constant of the config: factored once, not on every transition
            self.set_block_factor(block_noise_factor(self.spec.schedule.gamma, plan.patch[1:]))
        shape = (b, c, t, 2 * h, 2 * w)
        z = source.block(s, block_normals_shape(*shape, plan.patch))
        noise = correlate_block_noise(z, self._block_factor, shape, plan.patch)
        # the reference rounds the block noise to the transformer dtype before mixing it in
        return self.ops.stage_transition(latents, noise.to(self.model.dtype), alpha, beta)

    def _unipc_state(self, stage: StagePlan, latents: Tensor) -> UniPCState | None:
        """A UniPC stage's multistep memory (None for other solvers)."""
        if stage.kind != "unipc":
            return None
        return UniPCState(self.spec.schedule.solver_order, tuple(latents.shape), latents.dtype, self.device)

    def _step(
        self, stage: StagePlan, i: int, flow: Tensor, latents: Tensor, start: Tensor | None, unipc: UniPCState | None
    ) -> Tensor:
        if stage.kind == "dmd":
            # flow: patch layout; sigmas: 1-element float64 views of the plan (as dmd_step reads them)
            return self.ops.flow_step(
                flow,
                latents,
                start,
                stage.sigma_t[i : i + 1],
                stage.sigma_next[i : i + 1],
                self.model.config.patch_size,
            )
        if stage.kind == "unipc":
            return unipc_step(flow, latents, unipc, stage.unipc[i])
        return euler_step(flow, latents, stage.sigma_t[i], stage.sigma_next[i])
