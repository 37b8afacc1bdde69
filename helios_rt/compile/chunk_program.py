"""A whole chunk as one static program: one CUDA graph replay per chunk.

The chunk program runs, on static buffers, everything a chunk does after its prompt is known: the
patch embedding of the history windows, every pyramid stage's steps (forward, CFG combine, flow /
UniPC / Euler step), the stage transitions with their block noise, and the in-place history update.
It is `ChunkSampler.sample` itself, run either through the compiled stage programs (planned arena)
or through the sampler's eager op table (the Triton kernels, which cannot be planned yet: under
capture their intermediates come from the graph's memory pool, just as fixed). Its buffers outlive
every run:

- the history memory (`history`): the chunk reads its windows and pushes its result, in place;
- the noise (`noise`, a `StaticNoise`): refilled before each run from the stream's generator, so
  the random numbers are those of the eager path (graph-safe: never baked into the graph);
- the output (`output`): the chunk's clean latents, overwritten by the next run;
- the text K/V: the stage programs' buffers, or the program's own copy without them, filled outside
  the graph when the prompt changes (a new prompt is a copy; a new text length re-captures).

Which graph a chunk replays is decided on the host by its `ChunkKind`: the first chunk of a
distilled model takes the amplified plan (more steps), and a chunk whose history has no prefix
frame yet writes one. A kind runs eagerly the first time it is seen (that run is the warm-up: plans,
RoPE tables, cuBLAS handles and caches are made outside any capture), is captured the second time
and replayed from then on; `prepare()` does both ahead of time on scratch state. All kinds share one
graph memory pool: every intermediate of a body dies inside it (its results are copied into the
static buffers above), so no graph's live memory can be overwritten by another's replay.

A stream owns its own `HistoryMemory`; `attach()` moves that state into the program's buffer (and
the previous owner's state back out), so several streams of one engine can take turns.

Without CUDA graphs (on a CPU, or `cuda_graph=False`) `run()` runs the same body eagerly: that is
how the CPU tests check the program against the eager sampler, bit for bit.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..model.transformer import TextContext
from ..profiling import nvtx_range
from ..sampling.chunk import ChunkSampler, Conditioning
from ..sampling.history import HistoryMemory
from ..sampling.noise import StaticNoise

Tensor = torch.Tensor


@dataclass(frozen=True)
class ChunkKind:
    """What makes one chunk's op sequence differ from another's (one graph per kind).

    amplified: the distilled first chunk's plan (`amplify_first_chunk`); set_prefix: the history
    push takes this chunk's first latent frame as the prefix.
    """

    amplified: bool
    set_prefix: bool


class ChunkProgram:
    """One chunk of `sampler` on static buffers.

    The sampler either runs compiled stage programs (planned arena; they must not capture graphs of
    their own) or its eager op table (e.g. the Triton kernels, which the planner cannot plan yet;
    under capture their intermediates come from the graph's memory pool, just as static).

    batch: the sampler's batch; cuda_graph: capture one graph per `ChunkKind` (default: on CUDA).
    """

    def __init__(self, sampler: ChunkSampler, batch: int = 1, cuda_graph: bool | None = None) -> None:
        if sampler.programs is not None and sampler.programs.cuda_graph:
            raise ValueError("the stage programs capture graphs of their own; compile them with cuda_graph=False")
        self.sampler, self.batch, self.device = sampler, batch, torch.device(sampler.device)
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA sampler; it runs on {self.device}")
        c, hw = sampler.model.config.in_channels, sampler.latent_hw
        self.history = HistoryMemory(sampler.history_layout, batch, c, *hw, torch.float32, self.device)
        self.noise = StaticNoise(sampler.noise_shapes(batch), self.device)
        self.output = torch.zeros((batch, c, sampler.frames, *hw), dtype=torch.float32, device=self.device)
        self.history_mod = sampler.model.history_modulation()
        self._text: TextContext | None = None  # what the body reads
        self._source: TextContext | None = None  # the caller's context last copied into `_text`
        self._graphs: dict[ChunkKind, torch.cuda.CUDAGraph] = {}
        self._warm: set[ChunkKind] = set()
        self._pool = None
        self._generation = self._programs_generation()
        self._owner: weakref.ref[HistoryMemory] | None = None

    # ---- state -----------------------------------------------------------------------------------
    def kind(self, first_chunk: bool) -> ChunkKind:
        """The kind of the next chunk of the attached history."""
        amplified = first_chunk and self.sampler.spec.amplify_first_chunk
        return ChunkKind(amplified, self.history.layout.keep_first_frame and not self.history.prefix_set)

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
        """Bind a prompt's K/V into static buffers, outside any graph (a new prompt is a new source).

        With stage programs those are the programs' buffers (a text length they were not planned for
        re-plans them); otherwise the program keeps its own copy, which the eager forward reads.
        Either way a change of length drops the captured graphs; a change of prompt is a copy.
        """
        programs = self.sampler.programs
        if programs is not None:
            programs.bind_text(text)
            self._text = text
            if self._programs_generation() != self._generation:
                self._forget_graphs()
                self._generation = self._programs_generation()
            return
        layout = [(t.shape, t.dtype) for t in text.keys + text.values]
        current = None if self._text is None else [(t.shape, t.dtype) for t in self._text.keys + self._text.values]
        if current != layout or self._text.lengths != text.lengths:
            self._text = TextContext([k.clone() for k in text.keys], [v.clone() for v in text.values], text.lengths)
            self._forget_graphs()
        elif text is not self._source:
            for dst, src in zip(self._text.keys + self._text.values, text.keys + text.values, strict=True):
                dst.copy_(src)
        self._source = text  # held, so that `is` never matches a new context at a reused address

    def _programs_generation(self) -> int:
        return self.sampler.programs.generation if self.sampler.programs is not None else 0

    def _forget_graphs(self) -> None:
        self._graphs.clear()
        self._warm.clear()

    # ---- running ---------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, kind: ChunkKind, generator: torch.Generator) -> Tensor:
        """Draw the chunk's noise on `generator` and run the chunk; returns the static `output`."""
        if self._text is None:
            raise RuntimeError("ChunkProgram.run: no prompt bound; call set_text() first")
        self.noise.fill(generator)
        if self.cuda_graph and kind in self._graphs:
            self._graphs[kind].replay()
        elif self.cuda_graph and kind in self._warm:
            self._capture(kind).replay()
        else:  # without graphs always; with them the kind's first (warm-up) run
            self._body(kind)
            self._warm.add(kind)
        self.history.prefix_set = self.history.prefix_set or kind.set_prefix
        return self.output

    def prepare(self, kinds: list[ChunkKind]) -> None:
        """Warm up and capture `kinds` ahead of the first chunk, on scratch state (the owner's is kept).

        The noise buffers are zeroed for it; the next `run()` refills them.
        """
        if self._text is None:
            raise RuntimeError("ChunkProgram.prepare: no prompt bound; call set_text() first")
        self.detach()
        for buf in self.noise.buffers:
            buf.zero_()
        with torch.no_grad():
            for kind in kinds:
                if kind not in self._warm:
                    self._body(kind)
                    self._warm.add(kind)
                if self.cuda_graph and kind not in self._graphs:
                    self._capture(kind)
        self.history.buffer.zero_()
        self.history.prefix_set = False

    def _body(self, kind: ChunkKind) -> None:
        """The chunk: history tokens, the sampler's stages and steps, the history update (no host syncs)."""
        tokens = self.sampler.embed_history(*self.history.windows())
        cond = Conditioning(self._text, tokens, self.history_mod)
        latents = self.sampler.sample(cond, self.batch, self.noise, first_chunk=kind.amplified)
        self.output.copy_(latents)
        self.history.push(self.output, set_prefix=kind.set_prefix)

    def _capture(self, kind: ChunkKind) -> torch.cuda.CUDAGraph:
        prefix_set = self.history.prefix_set  # the captured push must not change the host flag
        graph = torch.cuda.CUDAGraph()
        with nvtx_range(f"capture {kind}"), torch.cuda.graph(graph, pool=self._pool):
            self._body(kind)
        self.history.prefix_set = prefix_set
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[kind] = graph
        return graph

    @property
    def captured(self) -> tuple[ChunkKind, ...]:
        return tuple(self._graphs)


__all__ = ["ChunkKind", "ChunkProgram"]
