"""A compiled stage: one transformer forward plus the sampler's flow step, over static buffers.

A `Program` is built for one (stage layout, batch, dtype, device, `StepSpec`). It owns:
- static inputs: `latents`, `start` (the stage's start point) `[B, C, T, H, W]`, `timestep` `[F]`
  float32, `sigma_t` / `sigma_next` `[1]` float64 (tensors, not Python floats, so a graph replay reads
  new values), `zero_init` `[1]` bool (CFG-Zero*: this step's prediction is `cond * 0.0`), the history
  tokens `[F, n_hist, D]` and per block the text K/V `[F, S, H, Dh]`, where the forward batch F is B,
  or 2B with classifier-free guidance (`[cond; uncond]`, as `sampling.guidance.split_cond_uncond`);
- the static output `output`: the next latents `[B, C, T, H, W]` (`ops.flow_step`'s result) for a
  DMD step (`StepSpec.flow_step`), else the (guided) flow prediction in the model dtype, which the
  caller's multistep solver (UniPC, Euler) consumes;
- constants computed once: the RoPE tables and the timestep-0 modulation of history tokens;
- the arena, whose layout comes from planning the program on meta tensors (`workspace.plan_program`).

With guidance the program runs the batch-2 forward on `cat([latents, latents])` and `ops.cfg_combine`
(for CFG-Zero* also the zero-init prediction `cond * 0.0`, selected by `torch.where` on the static
`zero_init` flag, so one op sequence serves both kinds of step).

`run()` executes the program through the workspace's `Executor`: every intermediate is a view of the
arena, every op is checked against the plan. On CUDA the first `run()` warms up on a side stream,
captures a CUDA graph and every later `run()` replays it; on CPU (or with `cuda_graph=False`) it runs
eagerly. Set inputs with `set_inputs` / `set_text` / `set_history` (in-place copies into the static
buffers), then read `output`.

The program runs the reference ops (`OpSet(device, "reference")`) with `ArenaOps`' attention: the Triton
kernels allocate through `torch.empty` and could be planned the same way, but they cannot run on meta
tensors until they are registered as custom ops with fake (meta) implementations.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch

from ..model.layout import TokenLayout, rope_tables
from ..model.transformer import HeliosTransformer, HistoryTokens, TextContext, normalize_text_lengths
from ..ops import OpSet
from .workspace import ArenaOps, Executor, ProgramPlan, allocate_arena, plan_program

Tensor = torch.Tensor
META = torch.device("meta")


@dataclass(frozen=True)
class StepSpec:
    """What a program computes after the forward.

    flow_step: the DMD flow step into the next latents (the forward stays in the patch layout);
    otherwise the output is the flow prediction `[B, C, T, H, W]` in the model dtype.
    guidance_scale: classifier-free guidance over a batch-2 forward when > 1 (None or 1: no CFG);
    cfg_zero_star: CFG-Zero* combine and zero-init steps (the `zero_init` input).
    """

    flow_step: bool = True
    guidance_scale: float | None = None
    cfg_zero_star: bool = False

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale > 1.0

    def forward_batch(self, batch: int) -> int:
        return 2 * batch if self.guided else batch


DMD = StepSpec()


@dataclass
class StaticIO:
    """The tensors a program reads and writes; their storage never changes after construction."""

    latents: Tensor
    start: Tensor
    timestep: Tensor
    sigma_t: Tensor
    sigma_next: Tensor
    history: Tensor | None
    text_keys: list[Tensor]
    text_values: list[Tensor]
    rope_cos: Tensor
    rope_sin: Tensor
    history_mod: Tensor
    output: Tensor
    zero_init: Tensor | None = None
    text_lengths: tuple[int, ...] | None = None  # per forward row, its prompt's own keys (TextContext)

    def to_meta(self) -> StaticIO:
        def meta(x):
            if isinstance(x, list):
                return [meta(t) for t in x]
            if x is None or not isinstance(x, Tensor):
                return x
            return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=META)

        return StaticIO(**{f.name: meta(getattr(self, f.name)) for f in fields(self)})


def meta_model(model: HeliosTransformer) -> HeliosTransformer:
    """An empty copy of `model` on the meta device with the same parameter dtypes."""
    with torch.device(META):
        copy = HeliosTransformer(model.config, model.ops)
    params = dict(model.named_parameters())
    for name, p in copy.named_parameters():
        p.data = torch.empty_like(params[name], device=META)
    return copy.eval()


@contextmanager
def _ops_of(model: HeliosTransformer, ops) -> Iterator[None]:
    saved = model.ops
    model.ops = ops
    try:
        yield
    finally:
        model.ops = saved


def _step(model: HeliosTransformer, ops: ArenaOps, layout: TokenLayout, io: StaticIO, spec: StepSpec = DMD) -> None:
    """The program: one forward (batch 2 with CFG, then the combine), then the flow step into `io.output`.

    The same ops, in the same order, as `sampling.chunk.ChunkSampler._predict` + `_step` (DMD).
    """
    history = HistoryTokens(io.history) if io.history is not None else None
    text = TextContext(io.text_keys, io.text_values, io.text_lengths)
    x = torch.cat([io.latents, io.latents]) if spec.guided else io.latents
    with _ops_of(model, ops):
        v = model(x, io.timestep, text, layout, (io.rope_cos, io.rope_sin), history, io.history_mod,
                  unpatchify=not spec.flow_step)  # fmt: skip
    if spec.guided:
        combined = ops.cfg_combine(v, spec.guidance_scale, spec.cfg_zero_star)
        if spec.cfg_zero_star:  # the reference's zero-init step: `cond * 0.0` (signed zeros, NaN kept)
            combined = torch.where(io.zero_init, v[: io.latents.shape[0]] * 0.0, combined)
        v = combined
    if spec.flow_step:
        ops.flow_step(v, io.latents, io.start, io.sigma_t, io.sigma_next, model.config.patch_size, out=io.output)
    else:
        io.output.copy_(v)


def make_io(
    model: HeliosTransformer,
    layout: TokenLayout,
    batch: int = 1,
    text_len: int = 512,
    latent_dtype: torch.dtype = torch.float32,
    spec: StepSpec = DMD,
    text_lengths: tuple[int, ...] | None = None,
) -> StaticIO:
    """Zeroed static buffers and the constants of a program, on the model's device (meta works too).

    text_lengths: per forward row, the keys its prompt owns (a program is planned for one split)."""
    cfg, b, dev = model.config, batch, model.proj_out.weight.device
    f = spec.forward_batch(batch)
    grid = zip(layout.noisy_grid, cfg.patch_size, strict=True)
    latent_shape = (b, cfg.in_channels, *(g * p for g, p in grid))
    kv_shape = (f, text_len, cfg.num_attention_heads, cfg.attention_head_dim)
    zeros = functools.partial(torch.zeros, device=dev)
    cos, sin = rope_tables(cfg, layout, dev)
    return StaticIO(
        latents=zeros(latent_shape, dtype=latent_dtype),
        start=zeros(latent_shape, dtype=latent_dtype),
        timestep=zeros(f, dtype=torch.float32),
        sigma_t=zeros(1, dtype=torch.float64),
        sigma_next=zeros(1, dtype=torch.float64),
        history=zeros(f, layout.n_hist, cfg.dim, dtype=model.dtype) if layout.n_hist else None,
        text_keys=[zeros(kv_shape, dtype=model.dtype) for _ in range(cfg.num_layers)],
        text_values=[zeros(kv_shape, dtype=model.dtype) for _ in range(cfg.num_layers)],
        rope_cos=cos,
        rope_sin=sin,
        history_mod=model.history_modulation(),
        output=zeros(latent_shape, dtype=latent_dtype if spec.flow_step else model.dtype),
        zero_init=zeros(1, dtype=torch.bool) if spec.guided and spec.cfg_zero_star else None,
        text_lengths=normalize_text_lengths(text_lengths, f, text_len),
    )


def plan_step(
    model: HeliosTransformer,
    layout: TokenLayout,
    io: StaticIO,
    attention: str = "math",
    alignment: int = 256,
    spec: StepSpec = DMD,
    meta: HeliosTransformer | None = None,
) -> ProgramPlan:
    """Plan `_step` on meta copies of `model` and `io` (any device: nothing is read or computed).

    meta: a `meta_model(model)` to reuse (building one per plan costs more than the plan itself).
    """
    ops = ArenaOps(OpSet("cpu", "reference"), attention)
    if meta is None:
        meta = model if model.proj_out.weight.device == META else meta_model(model)
    return plan_program(_step, meta, ops, layout, io.to_meta(), alignment=alignment, spec=spec)


class Program:
    """One stage's forward + flow step for a fixed layout, batch, dtype and device; `run()` allocates nothing.

    model: the transformer (its dtype is the program's); text_len: tokens of the prompt K/V;
    text_lengths: per forward row, how many of them are its own (None: all; see `TextContext`);
    step: what follows the forward (default: the DMD flow step, no guidance; see `StepSpec`);
    latent_dtype: dtype of the latents, start point and output (the sampler keeps float32);
    cuda_graph: capture and replay a CUDA graph (default: on CUDA devices); share_with: another
    program of the same model and batch (e.g. another pyramid stage) whose text K/V and history-token
    buffers this one reads too, so `set_text` / `set_history` on either updates both, and whose
    arena it reuses when large enough (programs that never run at the same time; build the
    largest stage first).
    """

    def __init__(
        self,
        model: HeliosTransformer,
        layout: TokenLayout,
        batch: int = 1,
        text_len: int = 512,
        latent_dtype: torch.dtype = torch.float32,
        cuda_graph: bool | None = None,
        share_with: Program | None = None,
        step: StepSpec = DMD,
        text_lengths: tuple[int, ...] | None = None,
    ) -> None:
        device = model.proj_out.weight.device
        self.model, self.layout, self.batch, self.device, self.step = model, layout, batch, device, step
        self.cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA model; the model is on {device}")
        self.text_len = text_len
        self.io = make_io(model, layout, batch, text_len, latent_dtype, step, text_lengths)
        self.text_lengths = self.io.text_lengths
        if share_with is not None:
            self._share_conditioning(share_with)
        self.ops = ArenaOps(OpSet(device, "reference"), "math")
        self.meta = share_with.meta if share_with is not None and share_with.model is model else meta_model(model)
        self.plan = plan_step(model, layout, self.io, "math", spec=step, meta=self.meta)
        shared = share_with.arena if share_with is not None else None
        fits = shared is not None and shared.numel() >= self.plan.arena_bytes
        self.arena = shared if fits else allocate_arena(self.plan, device)
        self._graph = None

    def _share_conditioning(self, other: Program) -> None:
        mine, theirs = self.io, other.io
        same = other.model is self.model and [t.shape for t in mine.text_keys] == [t.shape for t in theirs.text_keys]
        same = same and mine.text_lengths == theirs.text_lengths
        hist = None if mine.history is None else tuple(mine.history.shape)
        if not same or hist != (None if theirs.history is None else tuple(theirs.history.shape)):
            raise ValueError("share_with: the programs must have the same model, batch, text length and history tokens")
        mine.text_keys, mine.text_values, mine.history = theirs.text_keys, theirs.text_values, theirs.history

    # ---- inputs ----------------------------------------------------------------------------------
    @property
    def output(self) -> Tensor:
        return self.io.output

    def set_text(self, text: TextContext) -> None:
        """Copy a prompt's per-block K/V (batch 1 is broadcast) into the static text buffers."""
        if len(text.keys) != len(self.io.text_keys):
            raise ValueError(f"text has K/V for {len(text.keys)} blocks, the model has {len(self.io.text_keys)}")
        if text.lengths != self.io.text_lengths:
            raise ValueError(
                f"text rows own {text.lengths} keys but the program was planned for {self.io.text_lengths}; "
                "build a program for this split (StagePrograms.bind_text re-plans)"
            )
        for dst, src in zip(self.io.text_keys + self.io.text_values, text.keys + text.values, strict=True):
            _copy_into(dst, src, "text K/V")

    def set_history(self, history: HistoryTokens | Tensor) -> None:
        """Copy the patch-embedded history tokens `[B or 1, n_hist, D]` into the static buffer.

        With guidance the buffer holds them for the cond and the uncond half (`[2B, n_hist, D]`).
        """
        if self.io.history is None:
            raise ValueError("this program's layout has no history tokens")
        tokens = history.tokens if isinstance(history, HistoryTokens) else history
        dst = self.io.history
        if self.step.guided and tokens.shape[0] == self.batch and dst.shape[0] == 2 * self.batch:
            _copy_into(dst[: self.batch], tokens, "history")
            _copy_into(dst[self.batch :], tokens, "history")
        else:
            _copy_into(dst, tokens, "history")

    def set_inputs(
        self,
        latents: Tensor | None = None,
        start: Tensor | None = None,
        timestep: Tensor | float | None = None,
        sigma_t: Tensor | float | None = None,
        sigma_next: Tensor | float | None = None,
        zero_init: Tensor | bool | None = None,
    ) -> None:
        """Copy the per-step inputs into the static buffers (Python numbers fill, tensors broadcast)."""
        if zero_init is not None and self.io.zero_init is None:
            raise ValueError("zero_init: this program has no CFG-Zero* step (StepSpec.cfg_zero_star)")
        for name, value in (("latents", latents), ("start", start), ("timestep", timestep),
                            ("sigma_t", sigma_t), ("sigma_next", sigma_next),
                            ("zero_init", zero_init)):  # fmt: skip
            if isinstance(value, (bool, int, float)):
                getattr(self.io, name).fill_(value)
            elif value is not None:
                _copy_into(getattr(self.io, name), value, name)

    # ---- running ---------------------------------------------------------------------------------
    def execute(self, record_ranges: bool = False) -> Executor:
        """Run the program once eagerly through the workspace; returns the executor (for its checks)."""
        executor = Executor(self.plan, self.arena, record_ranges)
        with torch.no_grad(), executor:
            _step(self.model, self.ops, self.layout, self.io, self.step)
        return executor

    def run(self) -> Tensor:
        """One forward + flow step; returns the static `output` (overwritten by the next run)."""
        if not self.cuda_graph:
            self.execute()
        else:
            if self._graph is None:
                self._graph = self._capture()
            self._graph.replay()
        return self.io.output

    def _capture(self):
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.execute()  # warm-up: lazy initialisation happens outside the capture
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.execute()
        return graph


def _copy_into(dst: Tensor, src: Tensor, what: str) -> None:
    try:
        dst.copy_(src.expand_as(dst))
    except RuntimeError as err:
        raise ValueError(
            f"{what}: cannot copy a {list(src.shape)} tensor into the static {list(dst.shape)} buffer"
        ) from err


__all__ = ["DMD", "Program", "StaticIO", "StepSpec", "make_io", "meta_model", "plan_step"]
