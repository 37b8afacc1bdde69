"""The programs of one engine: one `Program` per pyramid stage shape, sharing arena and conditioning.

`StagePrograms` is built once per engine (per resolution): the largest stage first, so that the
smaller stages reuse its arena (stages never run at the same time) and read its text K/V and
history-token buffers. Per chunk the sampler hands it the chunk's conditioning (`bind`): the text K/V
are copied in only when the prompt's `TextContext` changes (once per prompt, and per blend chunk
after a prompt switch), the history tokens once per chunk. Per step it sets latents, start,
timestep, sigmas (and the CFG-Zero* flag) and runs the stage's program.

The programs are planned for a text length (the umT5 encoders' 512 tokens by default); a prompt
given as embeddings of another length re-plans them for that length (planning runs on meta tensors
and takes well under a second for small models, seconds for the 14B one).

What stays outside the programs, for now: the pyramid's stage transitions and the chunk noise (the
block noise is drawn on the CPU generator so that the random stream matches the reference
pipeline), the history patch embedding and the text K/V (once per chunk / per prompt), and the
multistep UniPC and Euler steps of the CFG pipelines (base, mid), whose op sequence changes from
step to step with the solver order; their programs run the batch-2 forward and the CFG combine.

Cost on CPU: a program runs the same aten kernels as the eager model except attention (softmax of
materialised float32 scores from `bmm`, where eager calls SDPA's fused kernel, which has no out=
variant) plus the executor's per-op check in Python; on the demo model at 192x320 a chunk takes
about 1.9x the eager time. What programs buy is on CUDA: no allocation and one graph replay per step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..model.layout import TokenLayout
from ..model.transformer import HeliosTransformer, HistoryTokens, TextContext
from .program import Program, StepSpec

Tensor = torch.Tensor


class StagePrograms:
    """One program per stage shape `(h, w)` of the noisy latents.

    layouts: `(h, w) -> TokenLayout` of each stage; step: `StepSpec` of every stage (DMD flow step,
    or the guided prediction of a multistep solver); batch: the sampler's batch (B, not 2B);
    latent_dtype: of the latents, start point and output, one for all stages or per stage shape.
    """

    def __init__(
        self,
        model: HeliosTransformer,
        layouts: dict[tuple[int, int], TokenLayout],
        step: StepSpec,
        batch: int = 1,
        text_len: int = 512,
        latent_dtype: torch.dtype | Mapping[tuple[int, int], torch.dtype] = torch.float32,
        cuda_graph: bool | None = None,
    ) -> None:
        if not layouts:
            raise ValueError("StagePrograms needs at least one stage layout")
        self.model, self.layouts, self.step, self.batch = model, dict(layouts), step, batch
        self.latent_dtype, self.cuda_graph = latent_dtype, cuda_graph
        self._text: TextContext | None = None
        self.programs: dict[tuple[int, int], Program] = {}
        self.generation = 0  # bumped on every (re)build: whatever captured the old programs is stale
        self._build(text_len, None)

    def _build(self, text_len: int, text_lengths: tuple[int, ...] | None) -> None:
        """Plan every stage for `text_len` text tokens (`text_lengths` of them per row), largest stage
        first; raise naming the stage."""
        programs: dict[tuple[int, int], Program] = {}
        first: Program | None = None
        for hw in sorted(self.layouts, key=lambda hw: self.layouts[hw].n_tokens, reverse=True):
            try:
                dtype = self.latent_dtype if isinstance(self.latent_dtype, torch.dtype) else self.latent_dtype[hw]
                prog = Program(self.model, self.layouts[hw], self.batch, text_len, dtype,
                               self.cuda_graph, share_with=first, step=self.step,
                               text_lengths=text_lengths)  # fmt: skip
            except Exception as err:
                raise type(err)(
                    f"cannot build the static program of the {hw[0]}x{hw[1]} stage ({self.step}): {err}; "
                    "EngineConfig(programs='off') runs the stage eagerly"
                ) from err
            first = first or prog
            programs[hw] = prog
        self.programs = programs
        self.text_len, self.text_lengths = text_len, text_lengths
        self._text = None
        self.generation += 1

    # ---- per chunk -------------------------------------------------------------------------------
    def bind(self, text: TextContext, history: HistoryTokens | None) -> None:
        """The chunk's conditioning: text K/V when the prompt changed, history tokens always."""
        self.bind_text(text)
        self.bind_history(history)

    def bind_text(self, text: TextContext) -> None:
        """Copy a prompt's K/V in when it is not the bound one; re-plan for another text length or split."""
        s = text.keys[0].shape[1]
        if (s, text.lengths) != (self.text_len, self.text_lengths):
            self._build(s, text.lengths)
        if text is not self._text:
            self.largest.set_text(text)  # the other stages read the same buffers
            self._text = text  # held, so that `is` never matches a new context at a reused address

    def bind_history(self, history: HistoryTokens | None) -> None:
        if history is not None:
            self.largest.set_history(history)
        elif self.largest.io.history is not None:
            raise ValueError("the stage programs have history tokens but the chunk has none")

    # ---- per step --------------------------------------------------------------------------------
    @property
    def largest(self) -> Program:
        return next(iter(self.programs.values()))

    def __getitem__(self, hw: tuple[int, int]) -> Program:
        try:
            return self.programs[hw]
        except KeyError:
            raise KeyError(f"no program for a {hw[0]}x{hw[1]} stage; planned: {sorted(self.programs)}") from None

    def owns(self, x: Tensor) -> bool:
        """Whether `x` is one of the programs' static outputs (overwritten by the next run)."""
        return any(x is p.output for p in self.programs.values())

    def run(
        self,
        hw: tuple[int, int],
        latents: Tensor,
        timestep: Tensor,
        start: Tensor | None = None,
        sigma_t: Tensor | None = None,
        sigma_next: Tensor | None = None,
        zero_init: bool | None = None,
    ) -> Tensor:
        """One step of stage `hw`; returns the program's static output (copy it to keep it)."""
        prog = self[hw]
        prog.set_inputs(latents, start, timestep, sigma_t, sigma_next, zero_init)
        return prog.run()

    @property
    def arena_bytes(self) -> int:
        return self.largest.arena.numel()


def stage_layouts(
    hws: Sequence[tuple[int, int]], layout_of: Callable[[tuple[int, int]], TokenLayout]
) -> dict[tuple[int, int], TokenLayout]:
    return {hw: layout_of(hw) for hw in dict.fromkeys(hws)}


__all__ = ["StagePrograms", "stage_layouts"]
