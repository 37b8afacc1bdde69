"""The sampling values a checkpoint was trained with, and explicit overrides of them for experts.

A Helios checkpoint is trained with a fixed history memory (16 long, 2 mid, 1 short latent frames), a
chunk of 9 latent frames, the first frame kept as the prefix, one CFG-Zero* step and, when distilled,
an amplified first chunk. Another value samples a model outside what it learned (the result is
garbage, not an error), so these are not user options: `SamplingOverrides` names them for the
experiments that need them, and leaves every one at None, the checkpoint's value.

This module is a leaf (no torch, no other helios_rt module): `config.EngineConfig` holds one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# What the released Helios checkpoints (Distilled, Mid, Base) were trained with.
CHECKPOINT_VALUES: dict[str, Any] = {
    "history_sizes": (16, 2, 1),  # long, mid, short latent frames
    "latent_frames_per_chunk": 9,
    "keep_first_frame": True,  # the first frame of the video is kept as the history's prefix
    "zero_init_steps": 1,  # CFG-Zero*: steps at the start of stage 0 whose prediction is zeroed
}


def _fail(name: str, value: Any, constraint: str) -> None:
    raise ValueError(f"SamplingOverrides.{name}={value!r}: {constraint}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingOverrides:
    """Values fixed by the checkpoint's training; None keeps the checkpoint's (`CHECKPOINT_VALUES`).

    amplify_first_chunk: None = on for distilled pyramid checkpoints (doubled steps on the first
    chunk), off otherwise; True is refused for any other checkpoint when the engine loads.
    """

    history_sizes: tuple[int, int, int] | None = None
    latent_frames_per_chunk: int | None = None
    keep_first_frame: bool | None = None
    zero_init_steps: int | None = None
    amplify_first_chunk: bool | None = None

    def __post_init__(self) -> None:
        sizes = self.history_sizes
        if sizes is not None:
            sizes = tuple(sizes)
            object.__setattr__(self, "history_sizes", sizes)
            if len(sizes) != 3 or not all(_is_int(s) and s >= 1 for s in sizes):
                _fail("history_sizes", sizes, "three sizes >= 1 (long, mid, short latent frames)")
        n = self.latent_frames_per_chunk
        if n is not None and not (_is_int(n) and n >= 1):
            _fail("latent_frames_per_chunk", n, "must be an integer >= 1")
        z = self.zero_init_steps
        if z is not None and not (_is_int(z) and z >= 0):
            _fail("zero_init_steps", z, "must be an integer >= 0")
        for name in ("keep_first_frame", "amplify_first_chunk"):
            if getattr(self, name) not in (None, True, False):
                _fail(name, getattr(self, name), "use None (the checkpoint's), True or False")

    def value(self, name: str) -> Any:
        """The override of `name`, or the checkpoint's value where it is None."""
        value = getattr(self, name)
        return CHECKPOINT_VALUES[name] if value is None else value
