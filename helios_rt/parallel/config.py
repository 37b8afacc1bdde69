"""`ParallelConfig`: how the ranks of one generation split the work (no torch import: config only).

A generation on N ranks is one mesh of `cfg x sequence` ranks. `sequence` ranks share every forward
by tokens (Ulysses: each holds a slice of the history and of the noisy tokens, and trades heads for
tokens around the self-attention), so it must divide the head count. `cfg` is 1, or 2 to put the
conditional and the unconditional half of a CFG batch on two rank groups (Base and Mid checkpoints).
Rank `r` is CFG half `r // sequence`, sequence shard `r % sequence`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelConfig:
    """The parallel layout; None leaves a size to `resolve` (CFG halves first when the model guides).

    timeout_s bounds every collective: a rank that died or hangs ends the others with an error after
    at most this long (a dead peer's closed connection ends them at once). It applies when helios_rt
    creates the process group (under torchrun); a group the application made keeps its own timeout.
    """

    sequence: int | None = None
    cfg: int | None = None
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.sequence is not None and (not _is_int(self.sequence) or self.sequence < 1):
            raise ValueError(f"ParallelConfig.sequence={self.sequence!r}: must be a positive integer or None")
        if self.cfg not in (None, 1, 2) or isinstance(self.cfg, bool):
            raise ValueError(f"ParallelConfig.cfg={self.cfg!r}: must be 1, 2 (the two CFG halves) or None")
        if not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ValueError(f"ParallelConfig.timeout_s={self.timeout_s!r}: must be a positive number of seconds")

    def resolve(self, world: int, heads: int, uses_cfg: bool) -> tuple[int, int]:
        """(cfg, sequence) for `world` ranks, or a ValueError that names the sizes that would work."""
        cfg = self.cfg if self.cfg is not None else _default_cfg(world, heads, uses_cfg, self.sequence)
        if cfg == 2 and not uses_cfg:
            raise ValueError(
                "ParallelConfig.cfg=2 splits the two halves of a CFG batch, but this model samples without "
                "guidance (guidance_scale 1.0): use cfg=1"
            )
        sequence = self.sequence if self.sequence is not None else world // cfg
        if cfg * sequence != world:
            raise ValueError(
                f"ParallelConfig(cfg={cfg}, sequence={sequence}) needs {cfg * sequence} ranks, but the process "
                f"group has {world}: launch {cfg * sequence} processes or change the sizes"
            )
        if heads % sequence:
            fits = [n for n in range(1, heads + 1) if heads % n == 0]
            raise ValueError(
                f"sequence parallelism over {sequence} ranks needs a head count divisible by {sequence}; the "
                f"model has {heads} heads: use a sequence size in {fits}"
            )
        return cfg, sequence

    def replace(self, **changes) -> ParallelConfig:
        return dataclasses.replace(self, **changes)


def _default_cfg(world: int, heads: int, uses_cfg: bool, sequence: int | None) -> int:
    """CFG halves on two rank groups when the model guides and the rest still divides the heads: the
    halves exchange one output per step, where sequence shards exchange activations in every block."""
    if not uses_cfg or world % 2:
        return 1
    if sequence is not None:
        return 2 if 2 * sequence == world else 1
    return 2 if heads % (world // 2) == 0 else 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
