"""The compiler of a chunk: plan it into one arena, run it there, capture it.

A chunk is `ChunkSampler.run_chunk` (sampling/chunk.py, its only definition, with its kinds `ChunkKind`
and `stream_kinds` and its state `ChunkState`: the patch embedding of the history windows, every stage
and step, the copy of the result into the output, the in-place history update), run with whatever
op table the engine chose: the PyTorch references, the Triton kernels (registered as `helios_rt::`
custom ops with fake implementations, so they trace like any aten op), the flash-attn backends, the
FP8 GEMMs. The same body runs four ways, per `ChunkKind` (`stream_kinds` says which kinds a stream runs):

1. **eager** (`EagerChunk`, `graphs="off"`): the body on the stream's own history, its noise drawn when
   the sampler asks, every intermediate from the caching allocator: debugging and per-op profiles.
2. **plan** (`ChunkProgram.plan`): the body runs once on meta copies of the model (`meta_model`), the
   sampler and the state under the planner's dispatch mode (`workspace.plan_program`); every
   intermediate becomes a buffer of one arena placed by the C++ planner. A host read of a tensor
   value, a random draw or an op that cannot write into a given buffer fails here, on any machine,
   naming the op.
3. **run** (`ChunkProgram.run`): the body runs on the real state under the `Executor`, which hands each
   allocating op its view of the arena and checks the op sequence against the plan: a steady-state
   chunk allocates nothing.
4. **capture** (`ChunkProgram.capture`, CUDA): the same executed body recorded as one CUDA graph per
   kind, at warm-up only; a chunk's run replays it and runs no Python.

All kinds share one arena (they never run at the same time; it is sized for the largest plan) and
one graph memory pool. The buffers that outlive a chunk are not in the arena (`ChunkState`): the
history memory, the noise (refilled from the stream's generator before each run, so a graph never
bakes in its capture's random numbers), the output, the text K/V and the history modulation.

Which graph a chunk replays is a host decision: the first chunk of a distilled model takes the
amplified plan (more steps), and a chunk whose history has no prefix frame yet writes one.
A stream owns its own `HistoryMemory`; `attach()` moves that state into the program's buffer (and
the previous owner's back out), so several streams of one engine take turns on one program.

On several ranks the chunk's collectives (the Ulysses all-to-alls, the output all-gather) are
captured inside the graph, not kept outside it: a forward of the 14B model holds two all-to-alls in
each of its 40 blocks, so graphs cut at each collective would be ~80 pieces per forward (times every
step of a chunk), each with Python and a host launch between them: the overhead the one-graph chunk
exists to remove. NCCL supports capture once its communicators exist (the eager warm-up run before
each capture makes them). The capture uses `capture_error_mode="thread_local"`: in the default
"global" mode a CUDA call that is illegal during capture, made from *any* thread, invalidates it,
and NCCL's watchdog thread queries events while the capture runs. Captured collectives are not
queued to that watchdog, so the timeout of a replayed chunk is the host's
(`parallel.group.wait_within`, used by the stream's waits).

Every entry point runs under `device_scope(self.device)`, and graphs are captured on a stream of
the program's own device (torch's default capture stream is made once, on whatever device was
current at the first capture in the process).

A prompt is a copy into the static text K/V (`set_text`). Text of another shape (embeddings of
another length, or CFG halves of unequal length) needs other plans: `replan(text)` is that explicit
call, and it refuses to run while a graph is being captured.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..fp8 import quantize_blocks_
from ..model.transformer import HeliosTransformer, TextContext, keeps_fp32
from ..ops import OpSet
from ..overlap import device_scope
from ..profiling import nvtx_range
from ..sampling.chunk import STEADY, ChunkKind, ChunkSampler, ChunkState, stream_kinds
from ..sampling.history import HistoryMemory
from ..sampling.noise import GeneratorNoise, StaticNoise
from .plan_cache import PlanCache, key_fields, plan_key
from .workspace import Executor, ProgramPlan, allocate_arena, plan_program

Tensor = torch.Tensor
META = torch.device("meta")


@dataclass(frozen=True)
class TextShape:
    """The shape of a prompt's K/V the plans were made for: tokens, and per row its own (or None)."""

    tokens: int
    lengths: tuple[int, ...] | None = None

    @classmethod
    def of(cls, text: TextContext) -> TextShape:
        return cls(text.keys[0].shape[1], text.lengths)


@dataclass
class ColdStart:
    """Seconds the program spent before steady state, by phase (cumulative; a stream diffs them).

    plan: planning or loading plans; warmup: eager runs whose result is thrown away (on CUDA the
    Triton compiles and autotuning happen in a kind's first run); capture: recording graphs.
    sources: per kind, "planned" or "cache".
    """

    plan_s: float = 0.0
    warmup_s: float = 0.0
    capture_s: float = 0.0
    warmup_runs: int = 0
    plans_loaded: int = 0
    plans_made: int = 0
    sources: dict[ChunkKind, str] = field(default_factory=dict)

    def snapshot(self) -> dict[str, float]:
        """The counters as a dict (a stream subtracts the one taken at its start)."""
        return {"plan_s": self.plan_s, "plans_loaded": self.plans_loaded, "plans_made": self.plans_made,
                "warmup_s": self.warmup_s, "warmup_runs": self.warmup_runs, "capture_s": self.capture_s}  # fmt: skip


def meta_model(
    config: ModelConfig,
    dtype: torch.dtype,
    precision: str = "native",
    ops: OpSet | None = None,
    like: HeliosTransformer | None = None,
) -> HeliosTransformer:
    """The transformer on the meta device as the loaders build it: `dtype` except the float32-kept
    parameters, then with precision="fp8" the block linears made FP8 (`quantize_blocks_`, as loading does).

    The one meta-model builder: the compiler plans on it, and the plan report and the cost model
    describe it (`meta_program`). like: a loaded model whose parameter dtypes the copy takes, whatever
    cast its builder made, so that a plan always sees the dtypes the real chunk runs with.
    """
    with torch.device(META):
        model = HeliosTransformer(config, ops)
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
    if precision == "fp8":
        quantize_blocks_(model)
    if like is not None:
        params = dict(like.named_parameters())
        for name, p in model.named_parameters():
            p.data = torch.empty_like(params[name], device=META)
    return model.eval()


def _kinds_of(sampler: ChunkSampler, history: HistoryMemory, first_chunk: bool) -> tuple[ChunkKind, ...]:
    return stream_kinds(sampler.spec.amplify_first_chunk, history.layout.keep_first_frame, history.prefix_set,
                        first_chunk)  # fmt: skip


class EagerChunk:
    """`ChunkSampler.run_chunk` on the caching allocator (`graphs="off"`): the stream's own history, no
    arena, no plan.

    The same calls as `ChunkProgram` (attach, accepts, set_text, kinds, kind, run), so the stream has
    one way to run a chunk. Nothing is static: the history is the attached stream's (not copied), the
    prompt's K/V are the caller's, the noise is drawn from the generator when the sampler asks (the
    reference's order, as `StaticNoise.fill` draws it for a program), and the output is a new tensor.
    """

    cuda_graph = False
    captured: tuple[ChunkKind, ...] = ()

    def __init__(self, sampler: ChunkSampler, batch: int = 1) -> None:
        self.sampler, self.batch = sampler, batch
        self._history: HistoryMemory | None = None
        self._text: TextContext | None = None
        self._history_mod = sampler.model.history_modulation()

    @property
    def history(self) -> HistoryMemory:
        if self._history is None:
            raise RuntimeError("EagerChunk: no history attached; call attach(history) first")
        return self._history

    def attach(self, history: HistoryMemory) -> None:
        """Run the next chunks on `history` itself (a stream's memory; nothing is copied)."""
        self._history = history

    def accepts(self, text: TextContext) -> bool:
        """Any prompt shape: nothing was planned for one."""
        return True

    def set_text(self, text: TextContext) -> None:
        self._text = text

    def kinds(self, first_chunk: bool) -> tuple[ChunkKind, ...]:
        return _kinds_of(self.sampler, self.history, first_chunk)

    def kind(self, first_chunk: bool) -> ChunkKind:
        return self.kinds(first_chunk)[0]

    @torch.no_grad()
    def run(self, kind: ChunkKind, generator: torch.Generator) -> Tensor:
        """Run one chunk of `kind`, drawing on `generator`; returns its clean latents (a new tensor)."""
        if self._text is None:
            raise RuntimeError("EagerChunk.run: no prompt bound; call set_text() first")
        sampler = self.sampler
        shape = (self.batch, sampler.model.config.in_channels, sampler.frames, *sampler.latent_hw)
        output = torch.empty(shape, dtype=torch.float32, device=sampler.device)
        noise = GeneratorNoise(generator, sampler.device)
        sampler.run_chunk(ChunkState(self.history, noise, output, self._text, self._history_mod), kind, self.batch)
        return output


def _capturing(device: torch.device) -> bool:
    """Whether `device`'s current stream is capturing (not the caller's current device's)."""
    if device.type != "cuda":
        return False
    with device_scope(device):
        return torch.cuda.is_current_stream_capturing()


class ChunkProgram:
    """One chunk of `sampler`, planned into one arena and (on CUDA, at warm-up) captured per kind.

    batch: the sampler's batch; text: the shape of the prompt K/V to plan for (default: 512 tokens,
    every row its own); cuda_graph: capture graphs at `capture()` (default: on CUDA); plan_cache: where
    plans are kept across processes (`plan_cache.PlanCache`; None plans every kind in this process).
    """

    def __init__(
        self,
        sampler: ChunkSampler,
        batch: int = 1,
        text: TextShape = TextShape(512),
        cuda_graph: bool | None = None,
        plan_cache: PlanCache | None = None,
    ) -> None:
        self.sampler, self.batch, self.device = sampler, batch, torch.device(sampler.device)
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA sampler; it runs on {self.device}")
        sampler.prepare()
        self.state = self._state(sampler, text)
        self.plans: dict[ChunkKind, ProgramPlan] = {}
        self.arena: Tensor | None = None
        self._meta: tuple[ChunkSampler, ChunkState] | None = None
        self._graphs: dict[ChunkKind, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._capture_stream: torch.cuda.Stream | None = None  # made on this device at the first capture
        self._source: TextContext | None = None  # the caller's context last copied into the state
        self._owner: weakref.ref[HistoryMemory] | None = None
        self.plan_cache = plan_cache
        self._unverified: dict[ChunkKind, str] = {}  # kinds whose plan came from the cache: kind -> key
        self._deferred: set[ChunkKind] = set()  # kinds captured after their first real run (`capture(first=)`)
        self.cold = ColdStart()

    # ---- construction ----------------------------------------------------------------------------
    def _state(self, sampler: ChunkSampler, text: TextShape) -> ChunkState:
        """Zeroed static state on the sampler's device (meta for the planning copy)."""
        cfg, device = sampler.model.config, torch.device(sampler.device)
        c, hw = cfg.in_channels, sampler.latent_hw
        rows = self.batch * (2 if sampler.spec.uses_cfg else 1)
        kv = (rows, text.tokens, cfg.num_attention_heads, cfg.attention_head_dim)
        keys = [torch.zeros(kv, dtype=sampler.model.dtype, device=device) for _ in range(cfg.num_layers)]
        values = [torch.zeros(kv, dtype=sampler.model.dtype, device=device) for _ in range(cfg.num_layers)]
        return ChunkState(
            history=HistoryMemory(sampler.history_layout, self.batch, c, *hw, torch.float32, device),
            noise=StaticNoise(sampler.noise_shapes(self.batch), device),
            output=torch.zeros((self.batch, c, sampler.frames, *hw), dtype=torch.float32, device=device),
            text=TextContext(keys, values, text.lengths),
            history_mod=sampler.model.history_modulation(),
        )

    def _meta_copy(self) -> tuple[ChunkSampler, ChunkState]:
        """A meta-device sampler and state with the real ones' shapes, dtypes and constants' shapes."""
        if self._meta is None:
            real, model = self.sampler, self.sampler.model
            copy = meta_model(model.config, model.dtype, model.precision, model.ops, like=model)
            if model.parallel is not None:  # one rank of a parallel run: plan its shards and collectives
                copy.set_parallel(model.parallel)
            sampler = ChunkSampler(copy, real.spec, real.history_layout, real.latent_hw, META, ops=real.ops)
            if real.block_factor is not None:
                sampler.set_block_factor(real.block_factor)
            sampler.prepare()
            self._meta = (sampler, self._state(sampler, self.text_shape))
        return self._meta

    # ---- plans -----------------------------------------------------------------------------------
    @property
    def text_shape(self) -> TextShape:
        return TextShape.of(self.state.text)

    def plan(self, kind: ChunkKind) -> ProgramPlan:
        """The plan of `kind` (made on first use, on meta tensors); grows the arena when it needs more.

        A larger arena invalidates the graphs captured on the old one: they are dropped (and the
        refusal under capture keeps this from happening inside one).
        """
        if kind not in self.plans:
            if _capturing(self.device):
                raise RuntimeError(f"ChunkProgram: {kind} has no plan; plan every kind before capturing (capture())")
            start = time.perf_counter()
            with nvtx_range(f"plan {kind}"):
                self.plans[kind] = self._cached_plan(kind) or self._new_plan(kind)
            self.cold.plan_s += time.perf_counter() - start
            self._grow_arena()
        return self.plans[kind]

    def _key(self, kind: ChunkKind) -> str:
        return plan_key(key_fields(self.sampler, self.batch, self.text_shape, kind))

    def _cached_plan(self, kind: ChunkKind) -> ProgramPlan | None:
        """The cache's plan of `kind` (to be verified by its first run), or None. Not on several ranks:
        a rank's plan also depends on its mesh, which the key does not describe."""
        if self.plan_cache is None or self.sampler.model.parallel is not None:
            return None
        key = self._key(kind)
        plan = self.plan_cache.load(key)
        if plan is not None:
            self._unverified[kind] = key
            self.cold.sources[kind] = "cache"
            self.cold.plans_loaded += 1
        return plan

    def _new_plan(self, kind: ChunkKind) -> ProgramPlan:
        """Plan `kind` on the meta copy, and store the plan when there is a cache."""
        sampler, state = self._meta_copy()
        plan = plan_program(ChunkSampler.run_chunk, sampler, state, kind, self.batch)
        self.cold.sources[kind] = "planned"
        self.cold.plans_made += 1
        if self.plan_cache is not None and self.sampler.model.parallel is None:
            self.plan_cache.store(self._key(kind), plan)
        return plan

    def replan(self, text: TextContext) -> None:
        """Make the program take prompts shaped like `text`: new static text buffers, plans and graphs.

        Explicit, and never under capture: called by the stream when a prompt of a new shape arrives.
        """
        if _capturing(self.device):
            raise RuntimeError("ChunkProgram.replan cannot run while a CUDA graph is being captured")
        shape = TextShape.of(text)
        if shape == self.text_shape:
            return
        history = self.state.history
        self.state = self._state(self.sampler, shape)
        self.state.history = history  # the stream state lives on; only the text buffers change
        self._meta = None
        self.plans.clear()
        self._unverified.clear()
        self._deferred.clear()
        self.arena = None
        self._forget_graphs()
        self._source = None

    def accepts(self, text: TextContext) -> bool:
        """Whether `text` fits the planned text buffers (else `replan(text)` first)."""
        return TextShape.of(text) == self.text_shape and len(text.keys) == len(self.state.text.keys)

    # ---- state -----------------------------------------------------------------------------------
    @property
    def history(self) -> HistoryMemory:
        return self.state.history

    @property
    def output(self) -> Tensor:
        return self.state.output

    @property
    def noise(self) -> StaticNoise:
        return self.state.noise

    def kinds(self, first_chunk: bool) -> tuple[ChunkKind, ...]:
        """The kinds the attached history's stream runs from its next chunk on (`stream_kinds`)."""
        return _kinds_of(self.sampler, self.history, first_chunk)

    def kind(self, first_chunk: bool) -> ChunkKind:
        """The kind of the next chunk of the attached history."""
        return self.kinds(first_chunk)[0]

    def attach(self, history: HistoryMemory) -> None:
        """Make `history`'s state the program's (handing the previous owner's state back first)."""
        owner = self._owner() if self._owner is not None else None
        if owner is history:
            return
        self.detach()
        self.history.copy_from(history)
        self._owner = weakref.ref(history)

    def detach(self) -> None:
        """Copy the program's history back to its owner (if it is still alive) and forget the owner."""
        owner = self._owner() if self._owner is not None else None
        if owner is not None:
            owner.copy_from(self.history)
        self._owner = None

    def set_text(self, text: TextContext) -> None:
        """Copy a prompt's K/V into the static text buffers, outside any graph (a new prompt is a copy).

        A batch-1 K/V is broadcast over the CFG-free batch. Text of another shape is refused: call
        `replan(text)` first (an explicit, capture-free step).
        """
        if not self.accepts(text):
            raise ValueError(
                f"ChunkProgram.set_text: the prompt's K/V are shaped {TextShape.of(text)}, the program was planned "
                f"for {self.text_shape}; call replan(text) first"
            )
        if text is not self._source:
            for dst, src in zip(self.state.text.keys + self.state.text.values, text.keys + text.values, strict=True):
                dst.copy_(src.expand_as(dst))
        self._source = text  # held, so that `is` never matches a new context at a reused address

    # ---- running ---------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, kind: ChunkKind, generator: torch.Generator) -> Tensor:
        """Draw the chunk's noise on `generator` and run the chunk; returns the static `output`.

        A captured kind replays its graph; any other runs the planned body on the arena.
        """
        if self._source is None:
            raise RuntimeError("ChunkProgram.run: no prompt bound; call set_text() first")
        with device_scope(self.device):  # the noise upload's event and the replay on this device
            self.noise.fill(generator)
            if kind in self._graphs:
                self._graphs[kind].replay()
            else:
                self._execute(kind)
                if kind in self._deferred:  # that run was the warm-up; capturing records and runs nothing
                    self._deferred.discard(kind)
                    self._graphs[kind] = self._timed_capture(kind)
        self.history.prefix_set = self.history.prefix_set or kind.set_prefix
        return self.output

    def _execute(self, kind: ChunkKind) -> None:
        plan = self.plan(kind)
        key = self._unverified.pop(kind, None)
        if key is None:
            with Executor(plan, self.arena):
                self.sampler.run_chunk(self.state, kind, self.batch)
            return
        saved = self._save_state()
        try:
            with Executor(plan, self.arena):
                self.sampler.run_chunk(self.state, kind, self.batch)
        except RuntimeError as err:  # PlanMismatch above all: the cached plan is not this program's
            self._restore_state(saved)
            self.plan_cache.discard(key, f"{type(err).__name__}: {err}")
            del self.plans[kind]
            start = time.perf_counter()
            self.plans[kind] = self._new_plan(kind)
            self.cold.plan_s += time.perf_counter() - start
            self._grow_arena()
            with Executor(self.plans[kind], self.arena):
                self.sampler.run_chunk(self.state, kind, self.batch)

    def _save_state(self) -> tuple[Tensor, bool, list[Tensor]]:
        """What a chunk writes outside the arena (the history and its prefix flag; the noise, which
        it only reads, to be safe), kept while a cached plan runs for the first time."""
        return self.history.buffer.clone(), self.history.prefix_set, [b.clone() for b in self.noise.buffers]

    def _restore_state(self, saved: tuple[Tensor, bool, list[Tensor]]) -> None:
        history, prefix_set, noise = saved
        self.history.buffer.copy_(history)
        self.history.prefix_set = prefix_set
        for dst, src in zip(self.noise.buffers, noise, strict=True):
            dst.copy_(src)

    def _grow_arena(self) -> None:
        """An arena for the largest plan (graphs on a smaller one are dropped)."""
        largest = max(self.plans.values(), key=lambda p: p.arena_bytes)
        if self.arena is None or self.arena.numel() < largest.arena_bytes:
            self.arena = allocate_arena(largest, self.device)
            self._forget_graphs()

    @torch.no_grad()
    def capture(self, kinds: list[ChunkKind], first: ChunkKind | None = None) -> None:
        """Plan, warm up and capture `kinds` (the one place graphs are made), on scratch state.

        Runs before a stream's first chunk (`Engine.warmup`): every plan is made first, so the arena
        has its final size; each kind then runs once eagerly (cuBLAS handles, Triton compiles) and is
        captured. The owner's history is kept (detached first); the noise and the program's own
        history are zeroed afterwards and refilled by the next `run()`.

        first: the kind the caller runs next on its own state; it is not warmed up on scratch, its
        next `run()` is the warm-up (a result that is used, not thrown away) and is captured after it.
        """
        if self._source is None:
            raise RuntimeError("ChunkProgram.capture: no prompt bound; call set_text() first")
        for kind in kinds:
            self.plan(kind)
        if self.cuda_graph and all(kind in self._graphs or kind in self._deferred for kind in kinds):
            return  # captured already (every stream start asks): the owner's state stays attached
        scratch = [k for k in kinds if k not in self._graphs and k != first]
        if scratch:
            self.detach()
            for buf in self.noise.buffers:
                buf.zero_()
            with device_scope(self.device):
                for kind in scratch:
                    self._warm_up(kind)
                    if self.cuda_graph:
                        self._graphs[kind] = self._timed_capture(kind)
            self.history.buffer.zero_()
            self.history.prefix_set = False
        if self.cuda_graph and first is not None and first not in self._graphs:
            self._deferred.add(first)

    def _warm_up(self, kind: ChunkKind) -> None:
        """One eager run on scratch state whose result is thrown away (and, on several ranks, the
        communicators' creation); timed to the end of its device work."""
        start = time.perf_counter()
        self._execute(kind)
        self._sync()
        self.cold.warmup_s += time.perf_counter() - start
        self.cold.warmup_runs += 1

    def _timed_capture(self, kind: ChunkKind) -> torch.cuda.CUDAGraph:
        start = time.perf_counter()
        graph = self._capture(kind)
        self.cold.capture_s += time.perf_counter() - start
        return graph

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _capture(self, kind: ChunkKind) -> torch.cuda.CUDAGraph:
        """One kind's graph, on this device's capture stream, in the thread-local error mode (see the
        module docstring: NCCL's watchdog thread must not invalidate a capture that holds collectives)."""
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self.device)
        graph = torch.cuda.CUDAGraph()
        capture = torch.cuda.graph(
            graph, pool=self._pool, stream=self._capture_stream, capture_error_mode="thread_local"
        )
        with nvtx_range(f"capture {kind}"), capture:
            self._execute(kind)
        self._pool = self._pool or graph.pool()
        return graph

    def _forget_graphs(self) -> None:
        """Drop the graphs and their memory pool: a pool whose graphs are all gone is released by PyTorch, and
        capturing into its id again would trip the allocator's internal assert, so new graphs get a new pool."""
        self._graphs.clear()
        self._deferred.clear()
        self._pool = None

    @property
    def captured(self) -> tuple[ChunkKind, ...]:
        return tuple(self._graphs)

    @property
    def arena_bytes(self) -> int:
        return 0 if self.arena is None else self.arena.numel()


__all__ = ["STEADY", "ChunkKind", "ChunkProgram", "ChunkState", "ColdStart", "EagerChunk", "TextShape", "meta_model",
           "stream_kinds"]
