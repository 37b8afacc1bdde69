"""The demo's training script learns: a few steps of each phase on one batch lower its loss.

CI never trains the demo (that is `scripts/train_demo.py`, about 90 minutes on two cores); this runs
each phase's loop on a tiny frame and a fixed batch, so a broken loss, optimizer or data path shows.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo.py"


@pytest.fixture(scope="module")
def train_demo():
    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _falls(losses: list[float]) -> bool:
    return float(np.mean(losses[-3:])) < 0.9 * float(np.mean(losses[:3]))


@pytest.mark.parametrize("phase", ["vae", "vae_long"])
def test_vae_phases_lower_the_reconstruction_error(train_demo, phase):
    """Both autoencoder phases (cropped clips, then whole frames), each with its batch of single frames."""
    torch.manual_seed(0)
    recipe = train_demo.Recipe(
        height=32, width=32, vae_steps=12, vae_long_steps=12, vae_frames=5, vae_long_frames=5, vae_crop=16,
        vae_long_crop=32, single_batch=2, vae_lr=1e-3,
    )  # fmt: skip
    vae = train_demo.build_vae()
    losses = train_demo.train_vae(vae, recipe, np.random.default_rng(0), log=lambda _: None, phase=phase, fixed_batch=True)
    assert _falls(losses), losses


def test_single_frames_are_learned_beside_the_clips(train_demo, monkeypatch):
    """Every step autoencodes the clips (cropped) and a batch of single frames: the first latent frame's path."""
    seen = []
    real = train_demo._autoencoded
    monkeypatch.setattr(train_demo, "_autoencoded", lambda vae, batch, w: seen.append(batch.shape) or real(vae, batch, w))
    recipe = train_demo.Recipe(height=32, width=32, vae_steps=2, vae_frames=5, vae_crop=16, single_batch=3)
    train_demo.train_vae(train_demo.build_vae(), recipe, np.random.default_rng(0), log=lambda _: None)
    assert seen == [(2, 3, 5, 16, 16), (3, 3, 1, 32, 32)] * 2


def test_object_latents_pack_frames_as_the_vae_does(train_demo):
    """Frame 0 is latent frame 0; frames 1-4 are latent frame 1, 5-8 frame 2; 4x4 pixels a latent pixel, grown by one."""
    mask = torch.zeros(1, 1, 9, 32, 32, dtype=torch.bool)
    mask[0, 0, 0, 0, 0] = True  # frame 0, top left
    mask[0, 0, 6, 17, 30] = True  # frame 6: latent frame 2, latent pixel (4, 7)
    packed = train_demo.object_latents(mask)
    assert packed.shape == (1, 1, 3, 8, 8)
    expected = torch.zeros_like(packed)
    expected[0, 0, 0, :2, :2] = True
    expected[0, 0, 2, 3:6, 6:8] = True
    assert torch.equal(packed, expected)


def test_transformer_phase_lowers_the_flow_matching_loss(train_demo):
    torch.manual_seed(0)
    recipe = train_demo.Recipe(height=32, width=32, dit_steps=12, dit_batch=2, dit_lr=3e-3, trajectories=2)
    rng = np.random.default_rng(0)
    latents = torch.randn(2, recipe.chunks_per_trajectory, 16, train_demo.LATENT_FRAMES, 4, 4)
    masks = torch.zeros(2, recipe.chunks_per_trajectory, 1, train_demo.LATENT_FRAMES, 4, 4, dtype=torch.bool)
    captions = [[train_demo.scenes.caption("red", "circle", "blue")] * recipe.chunks_per_trajectory] * 2
    batches = train_demo.ChunkBatches(latents, masks, captions, recipe)
    model = train_demo.build_transformer()
    gen = torch.Generator().manual_seed(0)
    losses = train_demo.train_transformer(model, batches, recipe, rng, gen, log=lambda _: None, fixed_batch=True)
    assert _falls(losses), losses


def test_object_latents_weigh_more_in_flow_matching(train_demo):
    recipe = train_demo.Recipe(trajectories=1, dit_object_weight=4.0, dit_first_frame_weight=1.0)
    latents = torch.zeros(1, 4, 16, 9, 2, 2)
    masks = torch.zeros(1, 4, 1, 9, 2, 2, dtype=torch.bool)
    masks[0, 1, 0, 3, 1, 0] = True
    _, weight, *_ = train_demo.ChunkBatches(latents, masks, [["a"] * 4], recipe).example(0, 1, drop=False)
    assert weight.shape == (1, 9, 2, 2)
    assert weight[0, 3, 1, 0] == 4.0 and weight.sum() == 4.0 + 35


def test_a_chunks_first_latent_frame_weighs_more_in_flow_matching(train_demo):
    """The first latent frame's weight multiplies the object's: 3 x 4 where the object is, 3 elsewhere."""
    recipe = train_demo.Recipe(trajectories=1, dit_object_weight=4.0, dit_first_frame_weight=3.0)
    masks = torch.zeros(1, 4, 1, 9, 2, 2, dtype=torch.bool)
    masks[0, 2, 0, 0, 0, 1] = True
    _, weight, *_ = train_demo.ChunkBatches(torch.zeros(1, 4, 16, 9, 2, 2), masks, [["a"] * 4], recipe).example(0, 2, drop=False)
    assert weight[0, 0, 0, 1] == 12.0 and weight[0, 0].sum() == 12.0 + 3 * 3
    assert torch.equal(weight[0, 1:], torch.ones(8, 2, 2))


def test_history_of_an_example_is_the_chunks_before_it(train_demo):
    """Chunk k trains on the windows the runtime would hold after chunks 0..k-1 (zeros before any)."""
    recipe = train_demo.Recipe(trajectories=1)
    latents = torch.arange(4 * 16 * 9 * 2 * 2, dtype=torch.float32).view(1, 4, 16, 9, 2, 2)
    batches = train_demo.ChunkBatches(latents, torch.zeros(1, 4, 1, 9, 2, 2, dtype=torch.bool), [["a"] * 4], recipe)
    _, _, _, short, mid, long = batches.example(0, 0, drop=False)
    assert not short.any() and not mid.any() and not long.any()
    x0, _, _, short, mid, _ = batches.example(0, 2, drop=False)
    assert torch.equal(x0, latents[0, 2])
    assert torch.equal(short[:, 0], latents[0, 0, :, 0])  # the prefix: the video's first latent frame
    assert torch.equal(short[:, 1], latents[0, 1, :, -1])  # the newest frame: chunk 1's last
    assert torch.equal(mid, latents[0, 1, :, -3:-1])


def test_flow_matching_loss_is_weighted_by_the_object(train_demo):
    """Every latent pixel the object's: the first step's loss scales with dit_object_weight."""
    first = {}
    for weight in (1.0, 3.0):
        recipe = train_demo.Recipe(dit_steps=1, dit_batch=2, trajectories=1, dit_object_weight=weight)
        latents = torch.randn(1, 4, 16, 9, 4, 4, generator=torch.Generator().manual_seed(0))
        masks = torch.ones(1, 4, 1, 9, 4, 4, dtype=torch.bool)
        batches = train_demo.ChunkBatches(latents, masks, [["a"] * 4], recipe)
        torch.manual_seed(0)
        model = train_demo.build_transformer()
        gen = torch.Generator().manual_seed(0)
        first[weight] = train_demo.train_transformer(model, batches, recipe, np.random.default_rng(0), gen, log=lambda _: None)[0]
    assert first[3.0] == pytest.approx(3 * first[1.0], rel=1e-5)


def test_the_autoencoder_starts_per_frame(train_demo):
    """Started by per_frame_, a chunk's later frames decode from their own latent frame alone: changing
    frames 1-4 changes nothing past frame 4, and a latent frame's 4 frames start equal."""
    torch.manual_seed(0)
    vae = train_demo.per_frame_(train_demo.build_vae()).eval()
    recipe = train_demo.Recipe(height=32, width=32)
    rng = np.random.default_rng(0)
    clip = train_demo.random_clip(rng, recipe, 9)[None]
    other = clip.clone()
    other[:, :, 1:5] = train_demo.random_clip(rng, recipe, 4)[None]
    with torch.no_grad():
        a, b = (vae.decode(vae.encode(x).latent_dist.mean).sample for x in (clip, other))
    assert not torch.equal(a[:, :, 1:5], b[:, :, 1:5])
    assert torch.equal(a[:, :, 5:], b[:, :, 5:])
    assert torch.equal(a[:, :, 0], b[:, :, 0])
    assert all(torch.equal(a[:, :, 5], a[:, :, t]) for t in (6, 7, 8))


def test_history_corruption_mixes_existing_frames_toward_noise(train_demo):
    """Frame-aware corruption touches whole frames that exist, by at most history_sigma; zero frames (history
    not yet made) stay zero, and history_corrupt 0 leaves the windows as the runtime holds them."""
    window = torch.ones(32, 16, 6, 16, 16)
    window[:, :, :2] = 0  # the first two frames do not exist yet
    recipe = train_demo.Recipe(history_corrupt=0.5, history_sigma=0.15)
    out = train_demo.corrupted(window, np.random.default_rng(0), recipe)
    assert not out[:, :, :2].any()
    changed = (out != window).transpose(1, 2).flatten(2)  # [B, T, values]
    assert torch.equal(changed.any(dim=2), changed.all(dim=2))  # a frame is corrupted whole or not at all
    share = changed[:, 2:].any(dim=2).float().mean()
    assert 0.35 < share < 0.65
    # (1 - s) * 1 + s * noise averages to 1 - s over a frame's 4096 values (noise's mean is within 0.01 of 0)
    kept = out[:, :, 2:].mean(dim=(1, 3, 4))
    assert kept.min() > 1 - recipe.history_sigma - 0.01 and kept.max() < 1 + 0.01
    untouched = train_demo.corrupted(window, np.random.default_rng(0), train_demo.Recipe(history_corrupt=0.0))
    assert torch.equal(untouched, window)
