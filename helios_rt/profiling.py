"""NVTX ranges that make a Nsight Systems timeline read like the design: load, compile, capture, chunk,
stage, step, decode.

Ranges cost nothing unless they are on: `HELIOS_RT_NVTX=1` in the environment, or `set_enabled(True)`
(the `helios-rt profile` command does this), and the `nvtx` package is importable. When off, entering
a range is one attribute check; the `nvtx` module is not even imported.

    with nvtx_range("stage 2", color="green"):
        ...

    @nvtx_range("decode")
    def decode(...): ...

Every range lives in the NVTX domain `helios_rt`, so the timeline groups them apart from PyTorch's own.
`nsys_command` builds the Nsight Systems command line that records one profile of a generation,
starting at the range `CAPTURE_RANGE` (the caller opens it around the chunks worth looking at).
"""

from __future__ import annotations

import functools
import os
import shlex
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

ENV_VAR = "HELIOS_RT_NVTX"
DOMAIN = "helios_rt"
CAPTURE_RANGE = "profile"  # the range `helios-rt profile` opens around the chunks it records

F = TypeVar("F", bound=Callable[..., Any])

_UNSET: Any = object()
_nvtx_module: Any = _UNSET  # the imported `nvtx` module, None when it is absent; imported on first use


def _env_enabled() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


_enabled: bool = _env_enabled()


def _nvtx() -> Any:
    """The `nvtx` module, or None when it is not installed (looked up once)."""
    global _nvtx_module
    if _nvtx_module is _UNSET:
        try:
            import nvtx
        except ImportError:
            nvtx = None
        _nvtx_module = nvtx
    return _nvtx_module


def available() -> bool:
    """Whether the `nvtx` package can be imported."""
    return _nvtx() is not None


def enabled() -> bool:
    """Whether ranges are emitted now: switched on and the `nvtx` package present."""
    return _enabled and _nvtx() is not None


def set_enabled(on: bool | None) -> None:
    """Switch ranges on or off for this process; None goes back to the `HELIOS_RT_NVTX` environment variable."""
    global _enabled
    _enabled = _env_enabled() if on is None else bool(on)


class nvtx_range:  # noqa: N801  (used like a function: `with nvtx_range(...)`, `@nvtx_range(...)`)
    """An NVTX push/pop range in the `helios_rt` domain; a context manager and a decorator.

    The on/off decision is taken on entry, so a decorator written at import time follows later
    `set_enabled` calls. Re-entrant: a decorated function may recurse, and one instance may be
    entered again before it exits (each entry remembers whether it pushed).
    """

    __slots__ = ("name", "color", "_pushed")

    def __init__(self, name: str, color: str | int | None = None) -> None:
        self.name = name
        self.color = color
        self._pushed: list[bool] = []

    def __enter__(self) -> nvtx_range:
        if _enabled:
            mod = _nvtx()
            if mod is not None:
                if self.color is None:
                    mod.push_range(message=self.name, domain=DOMAIN)
                else:
                    mod.push_range(message=self.name, color=self.color, domain=DOMAIN)
                self._pushed.append(True)
                return self
        self._pushed.append(False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pushed.pop():
            _nvtx().pop_range(domain=DOMAIN)

    def __call__(self, fn: F) -> F:
        name, color = self.name, self.color

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not _enabled:
                return fn(*args, **kwargs)
            with nvtx_range(name, color):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


def mark(name: str, color: str | int | None = None) -> None:
    """An instantaneous NVTX marker (no-op when ranges are off)."""
    if _enabled and _nvtx() is not None:
        kwargs = {} if color is None else {"color": color}
        _nvtx().mark(message=name, domain=DOMAIN, **kwargs)


def nsys_command(
    argv: Sequence[str],
    output: str = "helios_rt_profile",
    capture_range: str | None = CAPTURE_RANGE,
    trace: Sequence[str] = ("cuda", "nvtx", "osrt"),
    cuda_graph_trace: str = "node",
    nsys: str = "nsys",
) -> str:
    """The Nsight Systems command line that profiles `helios-rt <argv>` with the ranges on.

    argv: the generation's arguments, e.g. `["generate", "--model", "ckpt", "--prompt", "a fish"]`
    (a leading `helios-rt` is accepted). Recording starts when the range `capture_range` opens in the
    `helios_rt` domain and stops when it closes (None records the whole run). The application gets
    `HELIOS_RT_NVTX=1`, and `NSYS_NVTX_PROFILER_REGISTER_ONLY=0` so that the capture range matches a
    range whose name is not an NVTX registered string. `cuda_graph_trace="node"` shows the kernels
    inside a replayed CUDA graph ("graph" shows one span per replay, with less overhead).
    """
    args = list(argv)
    if args and os.path.basename(args[0]) in ("helios-rt", "helios_rt"):
        args = args[1:]
    if not args:
        raise ValueError("nsys_command needs the helios-rt arguments to profile, e.g. ['generate', '--model', ...]")
    env = [f"{ENV_VAR}=1"]
    cmd = [nsys, "profile", "-t", ",".join(trace)]
    if capture_range is not None:
        cmd += ["--capture-range=nvtx", f"--nvtx-capture={capture_range}@{DOMAIN}", "--capture-range-end=stop"]
        env.append("NSYS_NVTX_PROFILER_REGISTER_ONLY=0")
    cmd += [f"--cuda-graph-trace={cuda_graph_trace}", f"--env-var={','.join(env)}", "-o", output,
            "--force-overwrite=true", "helios-rt", *args]  # fmt: skip
    return shlex.join(cmd)


__all__ = [
    "CAPTURE_RANGE",
    "DOMAIN",
    "ENV_VAR",
    "available",
    "enabled",
    "mark",
    "nsys_command",
    "nvtx_range",
    "set_enabled",
]
