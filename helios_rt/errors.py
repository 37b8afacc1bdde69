"""The errors helios_rt raises on purpose, one class per kind of fix.

The kind decides who has to act: the caller's options (`UsageError`), the caller's prompt, image,
video or embeddings (`InputError`), the checkpoint (`checkpoint.CheckpointError`), or a generation
that went wrong while running (`GenerationError`, `OutputError`). The CLI turns each kind into its own
exit code (`EXIT_CODES`), so a script can tell "fix the command" from "fix the checkpoint" from
"retry" without parsing messages. All but the runtime kinds subclass `ValueError`, as a bad argument
always has in this package, so existing `except ValueError` callers keep working.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message names the file and the fix."""


class UsageError(ValueError):
    """An option or a combination of options that cannot work (device, output path, ...)."""


class InputError(ValueError):
    """A prompt, image, video or embedding the engine cannot take (shape, size, NaN, encoding)."""


class GenerationError(RuntimeError):
    """Generation itself went wrong (e.g. non-finite latents); the message names the chunk."""


class NonFiniteError(GenerationError):
    """NaN or Inf where the model needs finite numbers (weights, embeddings, a chunk's latents)."""


class StreamFailedError(GenerationError):
    """`next(stream)` after the stream failed: it says why, instead of ending as if complete."""


class OutputError(GenerationError):
    """Writing the video failed (disk full, file-size limit, permissions); what was written is kept."""


class Interrupted(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt (which SIGINT raises), so cleanup runs.

    A BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
