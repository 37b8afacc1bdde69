"""SIGTERM and SIGINT as exceptions that unwind cleanly, held back while a chunk is being written.

A scheduler's time limit or `kill` sends SIGTERM, whose default action ends the process at once: the
video file is left as it was at that instant. Turned into an exception (`errors.Interrupted`, as
Python turns SIGINT into KeyboardInterrupt), it unwinds through the `with` blocks that close the
stream and the writer, and the CLI reports what it kept. A signal that arrives while a chunk is being
appended waits until the append is done, so the file never ends in half a chunk.

SIGXFSZ (a file-size limit reached) is ignored while the guard is on, so that the write returns
EFBIG as an OSError the writer reports, instead of the signal killing the process.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import Interrupted

_HANDLED = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (SIGINT 130, SIGTERM 143)."""
    return 128 + signum


class GracefulStop:
    """`with GracefulStop() as stop:` installs the handlers (main thread only); `stop.deferred()` holds them."""

    def __init__(self) -> None:
        self._depth = 0
        self._pending: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        for signum in _HANDLED:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self._depth:
            self._pending = signum
            return
        raise _exception_for(signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold SIGTERM/SIGINT until the block ends, then raise for the one that came."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self._pending is not None:
                signum, self._pending = self._pending, None
                raise _exception_for(signum)


def signal_of(err: BaseException) -> int | None:
    """The signal an exception stands for: SIGINT for KeyboardInterrupt, the signal of `Interrupted`."""
    if isinstance(err, Interrupted):
        return err.signum
    if isinstance(err, KeyboardInterrupt):
        return signal.SIGINT
    return None


def _exception_for(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signum)
