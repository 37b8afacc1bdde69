"""`helios-rt serve`: live video in the browser, with prompts switched while it plays.

`create_app(engine, ServeConfig(...))` builds the aiohttp application (page, WebSocket, stats) so an
application can run or mount it; `helios-rt serve --model demo` runs it from the command line.
Needs the `serve` extra (`pip install "helios_rt[serve]"`, which installs aiohttp).
"""

from __future__ import annotations

from .config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str):
    # aiohttp is an optional extra: `import helios_rt.serve` (and the CLI's parser) works without it,
    # and the first use of the server says how to install it.
    if name == "create_app":
        from ._require import require_aiohttp

        require_aiohttp()
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'helios_rt.serve' has no attribute {name!r}")
