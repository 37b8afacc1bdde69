"""The engine's bounded-memory decode: `EngineConfig(decode_slice_frames=N)` hands over the frames of
the whole-chunk decode (up to float32 rounding), from the Python API and the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from helios_rt import Engine, EngineConfig
from helios_rt.cli import build_parser


def _frames(engine: Engine):
    return [c.frames for c in engine.generate_stream("a cat", num_frames=33, seed=3)]


def test_sliced_decode_hands_over_the_whole_chunk_frames(make_tiny_engine):
    whole = _frames(make_tiny_engine())
    sliced = _frames(make_tiny_engine(decode_slice_frames=2))
    assert [f.shape for f in sliced] == [f.shape for f in whole] and len(whole) == 1
    for a, b in zip(sliced, whole, strict=True):
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        # one uint8 level where float32 rounding moves a value across a .5 boundary, and rarely
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_decode_slices_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="decode_slice_frames"):
        EngineConfig(decode_slice_frames=bad)


def test_the_cli_passes_decode_slices_through():
    from helios_rt.cli import _engine_config

    args = build_parser().parse_args(["generate", "--model", "demo", "--prompt", "x", "--decode-slice-frames", "3"])
    assert _engine_config(args).decode_slice_frames == 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--model", "demo", "--prompt", "x", "--decode-slice-frames", "0"])
