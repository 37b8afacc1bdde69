"""Traces of a Helios forward, its pieces and one whole chunk, on META tensors."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ...config import ModelConfig
from ...model.layout import TokenLayout, build_layout
from ...model.transformer import HeliosTransformer, HistoryTokens, TextContext, keeps_fp32
from ...ops import OpSet
from .tracer import CostTracer, Trace, _model_ops

Tensor = torch.Tensor


META = torch.device("meta")


@functools.lru_cache(maxsize=4)
def meta_transformer(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> HeliosTransformer:
    """The transformer on the meta device, in `dtype` except the float32-kept parameters (as loaded)."""
    ops = OpSet("cpu", "reference")
    with torch.device("meta"):
        model = HeliosTransformer(config, ops)
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
    return model.eval()


def _empty(*shape: int, dtype: torch.dtype) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=META)


def noisy_latent_shape(config: ModelConfig, layout: TokenLayout) -> tuple[int, int, int]:
    return tuple(g * p for g, p in zip(layout.noisy_grid, config.patch_size, strict=True))


def trace_forward(
    config: ModelConfig,
    layout: TokenLayout,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    text_len: int = 512,
    label: str = "forward",
    unpatchify: bool = False,
) -> Trace:
    """One transformer forward on meta tensors, as a compiled stage runs it.

    Constants are inputs, not work: the prompt's per-block text K/V (`TextContext`), the RoPE tables,
    the patch-embedded history (computed once per chunk: see `trace_history_embedding`) and the
    timestep-0 history modulation. Latents and timesteps are float32 as the sampler holds them;
    `unpatchify=False` returns the patch layout that the fused sampler step reads.
    """
    model = meta_transformer(config, dtype)
    d, h, dh = config.dim, config.num_attention_heads, config.attention_head_dim
    latents = _empty(batch, config.in_channels, *noisy_latent_shape(config, layout), dtype=torch.float32)
    kv = _empty(batch, text_len, h, dh, dtype=dtype)
    text = TextContext([kv] * config.num_layers, [kv] * config.num_layers)
    history = HistoryTokens(_empty(batch, layout.n_hist, d, dtype=dtype)) if layout.n_hist else None
    rope = (
        _empty(layout.n_tokens, dh // 2, dtype=torch.float32),
        _empty(layout.n_tokens, dh // 2, dtype=torch.float32),
    )
    with CostTracer(model.ops) as tracer, _model_ops(model, tracer.ops):
        model(latents, _empty(batch, dtype=torch.float32), text, layout, rope, history,
              _empty(1, 6, d, dtype=dtype), unpatchify=unpatchify)  # fmt: skip
    return tracer.trace(label)


def trace_history_embedding(
    config: ModelConfig, layout: TokenLayout, batch: int = 1, dtype: torch.dtype = torch.bfloat16
) -> Trace:
    """Patch embedding of the history latents (once per chunk: the history changes between chunks)."""
    model = meta_transformer(config, dtype)
    hh, hw = layout.history_latent_hw or (0, 0)
    latents = {s.name: _empty(batch, config.in_channels, len(s.frame_indices), hh, hw, dtype=torch.float32)
               for s in layout.history}  # fmt: skip
    with CostTracer(model.ops) as tracer:
        if layout.history:
            model.embed_history(layout, latents.get("short"), latents.get("mid"), latents.get("long"))
    return tracer.trace("history patch embedding")


def trace_text_encoding(
    config: ModelConfig, batch: int = 1, dtype: torch.dtype = torch.bfloat16, text_len: int = 512
) -> Trace:
    """Per prompt (not per chunk): text projection and every block's cross-attention K and V."""
    model = meta_transformer(config, dtype)
    with CostTracer(model.ops) as tracer, _model_ops(model, tracer.ops):
        model.encode_text(_empty(batch, text_len, config.text_dim, dtype=dtype))
    return tracer.trace("text K/V (per prompt)")


# ---- one chunk ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkShape:
    """What fixes the shapes of a chunk: resolution, chunk and history sizes, batch, text length."""

    height: int = 384
    width: int = 640
    latent_frames: int = 9
    history_sizes: tuple[int, int, int] = (16, 2, 1)  # long, mid, short (+ the prefix frame)
    keep_first_frame: bool = True
    stages: int = 3
    batch: int = 1
    text_len: int = 512
    vae_scale: int = 8  # pixels per latent, spatially
    frames_per_latent: int = 4  # pixel frames per latent frame after the first

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae_scale, self.width // self.vae_scale

    @property
    def pixel_frames(self) -> int:
        return 1 + self.frames_per_latent * (self.latent_frames - 1)


def stage_layouts(config: ModelConfig, shape: ChunkShape) -> list[TokenLayout]:
    """The token layout of every pyramid stage, with the sampler's frame indices."""
    from ...sampling.history import HistoryLayout
    from ...sampling.pyramid import stage_hw

    idx = {k: tuple(v[0].tolist()) for k, v in HistoryLayout(shape.history_sizes, shape.latent_frames,
                                                               shape.keep_first_frame).indices().items()}  # fmt: skip
    history = {"short": idx["indices_latents_history_short"], "mid": idx["indices_latents_history_mid"],
               "long": idx["indices_latents_history_long"]}  # fmt: skip
    return [
        build_layout(config, (shape.latent_frames, *hw), idx["indices_hidden_states"], shape.latent_hw, history)
        for hw in stage_hw(*shape.latent_hw, shape.stages)
    ]


@dataclass
class StageCost:
    index: int
    layout: TokenLayout
    forward: Trace  # one transformer forward
    step: Trace  # the sampler step after each forward
    transition: Trace | None  # into this stage (block noise, upsample and mix), once per chunk

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.layout.noisy_grid[1:]


@dataclass
class ChunkCost:
    """Traces of one chunk's work; step counts are applied when it is projected or totalled."""

    label: str
    config: ModelConfig
    shape: ChunkShape
    dtype: torch.dtype
    stages: list[StageCost]
    per_chunk: Trace  # start noise and its downsampling, history patch embedding
    per_prompt: Trace  # text K/V: not part of a chunk
    vae: Trace | None = None  # decode of the chunk's latents (an estimate), when traced

    def pieces(self, steps: Sequence[int], fused: bool = False) -> list[tuple[str, Trace, int]]:
        """(group, trace, times per chunk) of everything a chunk runs, with `steps[s]` steps in stage s."""
        if len(steps) != len(self.stages):
            raise ValueError(f"steps={tuple(steps)}: one step count per stage ({len(self.stages)} stages)")
        f = (lambda t: t.fused()) if fused else (lambda t: t)
        out = []
        for st, n in zip(self.stages, steps, strict=True):
            name = f"stage {st.index}"
            out.append((name, f(st.forward), n))
            out.append((name, f(st.step), n))
            if st.transition is not None:
                out.append((name, f(st.transition), 1))
        out.append(("per chunk", f(self.per_chunk), 1))
        return out

    def flops(self, steps: Sequence[int], kind: str | None = None) -> int:
        """FLOPs of one chunk's transformer and sampler work (no VAE)."""
        return sum(t.flops(kind) * n for _, t, n in self.pieces(steps))

    def bytes(self, steps: Sequence[int], kind: str | None = None, fused: bool = False) -> int:
        return sum(t.bytes(kind) * n for _, t, n in self.pieces(steps, fused))


def _trace_sampler_step(config: ModelConfig, layout: TokenLayout, batch: int, dtype: torch.dtype) -> Trace:
    c = config.in_channels
    p = config.patch_size
    latent = noisy_latent_shape(config, layout)
    v = _empty(batch, layout.n_noisy, config.out_dim * math.prod(p), dtype=dtype)
    x = _empty(batch, c, *latent, dtype=torch.float32)
    start = _empty(batch, c, *latent, dtype=torch.float32)
    sigma = _empty(1, dtype=torch.float32)
    with CostTracer() as tracer:
        tracer.ops.flow_step(v, x, start, sigma, sigma, p)
    return tracer.trace("sampler step")


def _trace_transition(config: ModelConfig, layout: TokenLayout, batch: int) -> Trace:
    """Block noise at the stage's size (drawn on CPU: the real function, tiny) and the stage transition."""
    from ...sampling.pyramid import sample_block_noise

    c = config.in_channels
    t, h, w = noisy_latent_shape(config, layout)
    gen = torch.Generator().manual_seed(0)
    with CostTracer() as tracer:
        noise = sample_block_noise(batch, c, t, h, w, 1 / 3, config.patch_size, gen)
        x = torch.zeros(batch, c, t, h // 2, w // 2)
        tracer.ops.stage_transition(x, noise, 1.0, 1.0)
    return tracer.trace("stage transition")


def _trace_chunk_start(config: ModelConfig, shape: ChunkShape) -> Trace:
    from ...sampling.pyramid import chunk_noise, downsample_noise

    gen = torch.Generator().manual_seed(0)
    with CostTracer() as tracer:
        noise = chunk_noise(shape.batch, config.in_channels, shape.latent_frames, *shape.latent_hw, gen)
        downsample_noise(noise, shape.stages)
    return tracer.trace("start noise")


def trace_vae_decode(shape: ChunkShape, dtype: torch.dtype = torch.bfloat16) -> Trace:
    """The Wan 2.1 VAE decode of one chunk's latents, default config, on meta tensors (an estimate)."""
    from ...model.vae import VAEConfig, WanVAE

    with torch.device("meta"):
        vae = WanVAE(VAEConfig())
    vae = vae.to(dtype)
    z = _empty(shape.batch, vae.config.z_dim, shape.latent_frames, *shape.latent_hw, dtype=torch.float32)
    with CostTracer() as tracer:
        vae.decode(z, normalized=True)
    return tracer.trace("VAE decode")


def trace_chunk(
    config: ModelConfig,
    shape: ChunkShape | None = None,
    dtype: torch.dtype = torch.bfloat16,
    label: str = "",
    vae: bool = False,
) -> ChunkCost:
    """Trace every piece of one chunk: per stage a forward, a sampler step and the transition into it;
    per chunk the start noise and the history embedding; per prompt the text K/V; optionally the VAE."""
    shape = shape or ChunkShape()
    layouts = stage_layouts(config, shape)
    stages = []
    for s, layout in enumerate(layouts):
        fwd = trace_forward(config, layout, shape.batch, dtype, shape.text_len, label=f"stage {s} forward")
        step = _trace_sampler_step(config, layout, shape.batch, dtype)
        transition = _trace_transition(config, layout, shape.batch) if s else None
        stages.append(StageCost(s, layout, fwd, step, transition))
    start = _trace_chunk_start(config, shape)
    hist = trace_history_embedding(config, layouts[-1], shape.batch, dtype)
    hist = _shift(hist, len(start.scopes))
    per_chunk = Trace("per chunk", start.ops + hist.ops, start.scopes + hist.scopes)
    prompt = trace_text_encoding(config, shape.batch, dtype, shape.text_len)
    vae_trace = trace_vae_decode(shape, dtype) if vae else None
    return ChunkCost(label, config, shape, dtype, stages, per_chunk, prompt, vae_trace)


def _shift(t: Trace, by: int) -> Trace:
    """Renumber a trace's op calls so that it can be concatenated after `by` calls of another."""
    if not by:
        return t
    ops = [o if o.call < 0 else replace(o, call=o.call + by) for o in t.ops]
    return Trace(t.label, ops, [replace(s, call=s.call + by) for s in t.scopes])
