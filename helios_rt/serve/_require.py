"""The one place that says how to install the server's optional dependency."""

from __future__ import annotations

import importlib.util

from ..errors import UsageError


def require_aiohttp() -> None:
    """Raise a `UsageError` with the install line when aiohttp is missing."""
    if importlib.util.find_spec("aiohttp") is None:
        raise UsageError('helios-rt serve needs aiohttp; install it with: pip install "helios_rt[serve]"')
