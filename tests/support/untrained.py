"""The untrained model as a checkpoint folder, written once per test process: for plumbing tests.

The built-in `demo` is a trained Base-style checkpoint at 64x64; most tests need a model whose weights
do not matter but whose structure is the distilled real-time one (pyramid stages, a doubled first
chunk), at any size. `helios_rt.demo.untrained` writes that model as a folder; it is loaded like any
checkpoint.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from helios_rt import Engine, EngineConfig
from helios_rt.demo.untrained import write_untrained_checkpoint


@functools.lru_cache(maxsize=1)
def untrained_checkpoint() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="helios-rt-untrained-"))
    atexit.register(shutil.rmtree, folder, True)
    return write_untrained_checkpoint(folder)


def untrained_engine(config: EngineConfig | None = None) -> Engine:
    return Engine.from_pretrained(untrained_checkpoint(), config or EngineConfig())
