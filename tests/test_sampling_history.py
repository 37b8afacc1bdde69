"""The fixed-size history against the pipeline's growing `torch.cat` history and its index tensors.

End-to-end agreement with HeliosPyramidPipeline (T2V, I2V, V2V) is in test_sampling_pyramid.py;
here the update rule is checked over many chunk sizes against a model of the pipeline's slicing.
"""

from __future__ import annotations

import pytest
import torch

from helios_rt.sampling import HistoryLayout, HistoryMemory, augment_video_latents

B, C, H, W = 2, 3, 4, 6


def _pipeline_windows(history: torch.Tensor, prefix: torch.Tensor | None, sizes, keep: bool):
    """The pipeline's slicing: last sum(sizes) frames split (long, mid, short); short gets the prefix."""
    sizes = list(sizes) if keep else [sizes[0], sizes[1], sizes[2] + 1]
    long, mid, short = history[:, :, -sum(sizes) :].split(sizes, dim=2)
    return (torch.cat([prefix, short], dim=2) if keep else short), mid, long


def _model_run(layout: HistoryLayout, chunks: list[torch.Tensor]):
    """Our memory and a growing-history model fed the same chunks; yields both after every push."""
    mem = HistoryMemory(layout, B, C, H, W)
    history = torch.zeros(B, C, layout.rolling, H, W)
    prefix = torch.zeros(B, C, 1, H, W)
    ptr = mem.buffer.data_ptr()
    for k, chunk in enumerate(chunks):
        mem.push(chunk)
        if k == 0:
            prefix = chunk[:, :, 0:1]
        history = torch.cat([history, chunk], dim=2)
        assert mem.buffer.data_ptr() == ptr
        yield mem, _pipeline_windows(history, prefix, layout.sizes, layout.keep_first_frame)


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("chunk_frames", [9, 1, 3, 7, 19, 20, 25])
def test_push_matches_growing_history(keep, chunk_frames):
    layout = HistoryLayout((16, 2, 1), chunk_frames, keep_first_frame=keep)
    g = torch.Generator().manual_seed(chunk_frames)
    chunks = [torch.randn(B, C, chunk_frames, H, W, generator=g) for _ in range(5)]
    for n, (mem, expected) in enumerate(_model_run(layout, chunks)):
        for name, ours, ref in zip(("short", "mid", "long"), mem.windows(), expected, strict=True):
            assert ours.data_ptr() >= mem.buffer.data_ptr()  # a view into the one buffer
            assert torch.equal(ours, ref), f"after chunk {n}: window {name} differs"


def test_windows_are_views_and_frame_count_is_constant():
    layout = HistoryLayout()
    mem = HistoryMemory(layout, B, C, H, W)
    assert mem.buffer.shape == (B, C, 20, H, W)
    assert [w.shape[2] for w in mem.windows()] == [2, 2, 16]
    for w in mem.windows():
        assert w._base is mem.buffer
    mem.short[:, :, 1].fill_(3.0)
    assert mem.buffer[:, :, 19].eq(3.0).all()


def test_indices_are_the_pipelines():
    ours = HistoryLayout((16, 2, 1), 9, True).indices()
    assert ours["indices_latents_history_short"].tolist() == [[0, 19]]
    assert ours["indices_latents_history_long"].tolist() == [list(range(1, 17))]
    assert ours["indices_latents_history_mid"].tolist() == [[17, 18]]
    assert ours["indices_hidden_states"].tolist() == [list(range(20, 29))]
    assert all(t.dtype == torch.int64 for t in ours.values())
    no_prefix = HistoryLayout((16, 2, 1), 9, False).indices()
    assert no_prefix["indices_latents_history_short"].tolist() == [[18, 19]]
    assert no_prefix["indices_hidden_states"].tolist() == [list(range(20, 29))]


def test_sizes_are_sorted_like_the_pipeline():
    assert HistoryLayout((1, 16, 2)).sizes == (16, 2, 1)


def test_prefix_rules():
    layout = HistoryLayout((4, 2, 1), 3)
    mem = HistoryMemory(layout, B, C, H, W)
    first, second = torch.ones(B, C, 3, H, W), torch.full((B, C, 3, H, W), 2.0)
    mem.push(first)
    mem.push(second)
    assert mem.prefix.eq(1.0).all()  # only the first chunk sets it
    mem.push(torch.full((B, C, 3, H, W), 5.0), set_prefix=True)  # the pipeline's is_skip_first_chunk
    assert mem.prefix.eq(5.0).all()


def test_image_and_video_initialisation():
    layout = HistoryLayout((4, 2, 1), 3)
    image, fake = torch.full((B, C, 1, H, W), 7.0), torch.full((B, C, 1, H, W), 8.0)
    mem = HistoryMemory(layout, B, C, H, W)
    mem.init_image(image, fake)
    short, mid, long = mem.windows()
    assert short[:, :, 0].eq(7.0).all() and short[:, :, 1].eq(8.0).all()
    assert mid.eq(0).all() and long.eq(0).all()
    mem.push(torch.zeros(B, C, 3, H, W))
    assert mem.prefix.eq(7.0).all()  # an image prefix is kept
    for frames in (2, 7, 12):
        video = torch.arange(frames, dtype=torch.float32).view(1, 1, frames, 1, 1).expand(B, C, frames, H, W)
        mem = HistoryMemory(layout, B, C, H, W)
        mem.init_video(image, video)
        history = torch.cat([torch.zeros(B, C, 7, H, W), video], dim=2)
        for ours, ref in zip(mem.windows(), _pipeline_windows(history, image, layout.sizes, True), strict=True):
            assert torch.equal(ours, ref), f"video of {frames} frames"


def test_bad_history_inputs():
    with pytest.raises(ValueError, match="sizes"):
        HistoryLayout((16, 2))
    with pytest.raises(ValueError, match="chunk_frames"):
        HistoryLayout(chunk_frames=0)
    mem = HistoryMemory(HistoryLayout(), B, C, H, W)
    with pytest.raises(ValueError, match="expected 9"):
        mem.push(torch.zeros(B, C, 8, H, W))
    with pytest.raises(ValueError, match=r"expected \[2, 3, T, 4, 6\]"):
        mem.push(torch.zeros(B, C, 9, H, W + 1))
    with pytest.raises(ValueError, match="no prefix"):
        _ = HistoryMemory(HistoryLayout(keep_first_frame=False), B, C, H, W).prefix
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="multiple of 9"):
        augment_video_latents(torch.zeros(1, C, 1, H, W), torch.zeros(1, C, 10, H, W), g)
    with pytest.raises(ValueError, match="sigma range"):
        augment_video_latents(torch.zeros(1, C, 1, H, W), torch.zeros(1, C, 9, H, W), g, image_sigma=(0.2, 0.1))
