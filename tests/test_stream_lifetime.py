"""Streams that say what happened, and engines that give their memory back when closed."""

from __future__ import annotations

import pytest
from support.memory import live_tensor_bytes

from helios_rt.errors import StreamFailedError


def test_an_exception_inside_next_leaves_the_stream_failed_with_its_cause(make_tiny_engine, monkeypatch) -> None:
    engine = make_tiny_engine()
    decode = engine.vae.decode_frames
    calls = []

    def interrupted_at_the_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in a notebook, inside the chunk's decode
        return decode(*args, **kwargs)

    monkeypatch.setattr(engine.vae, "decode_frames", interrupted_at_the_second_chunk)
    stream = engine.generate_stream("a lighthouse", num_frames=99, seed=1)
    assert next(stream).index == 0
    with pytest.raises(KeyboardInterrupt):
        next(stream)
    assert isinstance(stream.failure, KeyboardInterrupt)
    for _ in range(2):  # every later call says why, none ends the video as if it were complete
        with pytest.raises(StreamFailedError, match=r"failed at chunk 1 \(KeyboardInterrupt\)") as info:
            next(stream)
        assert isinstance(info.value.__cause__, KeyboardInterrupt)
    with pytest.raises(StreamFailedError, match="failed at chunk 1"):
        list(stream)
    with pytest.raises(StreamFailedError, match="start a new one"):
        stream.set_prompt("a harbour")
    stream.close()
    with pytest.raises(StreamFailedError):
        next(stream)  # closing a failed stream does not turn it into a finished one


def test_engine_close_frees_its_memory_and_its_streams(make_tiny_engine) -> None:
    before = live_tensor_bytes()
    engine = make_tiny_engine()
    stream = engine.generate_stream("a lighthouse", num_frames=33, seed=1)
    loaded = live_tensor_bytes()
    weights = sum(p.numel() * p.element_size() for p in engine.transformer.parameters())
    assert loaded - before > weights  # the measurement sees the model
    engine.close()
    assert live_tensor_bytes() - before < 0.02 * weights, "tensors outlive Engine.close()"
    with pytest.raises(StopIteration):
        next(stream)
    with pytest.raises(RuntimeError, match="engine is closed"):
        engine.generate_stream("a harbour", num_frames=33)


def test_engine_as_a_context_manager_closes_on_exit(make_tiny_engine) -> None:
    with make_tiny_engine() as engine:
        assert engine.transformer is not None
    with pytest.raises(RuntimeError, match="engine is closed"):
        engine.generate_stream("a harbour", num_frames=33)
