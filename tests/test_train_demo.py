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


def test_vae_and_decoder_phases_lower_the_reconstruction_error(train_demo):
    torch.manual_seed(0)
    recipe = train_demo.Recipe(height=32, width=32, vae_steps=12, decoder_steps=12, vae_batch=2, vae_lr=1e-3)
    vae = train_demo.build_vae()
    losses = train_demo.train_vae(vae, recipe, np.random.default_rng(0), log=lambda _: None, fixed_batch=True)
    assert _falls(losses), losses
    encoder = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith("encoder.")}
    decoder = train_demo.train_vae(
        vae, recipe, np.random.default_rng(1), log=lambda _: None, fixed_batch=True, decoder_only=True
    )
    assert _falls(decoder), decoder
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in encoder.items()), "the decoder phase moved the encoder"


def test_transformer_phase_lowers_the_flow_matching_loss(train_demo):
    torch.manual_seed(0)
    recipe = train_demo.Recipe(height=32, width=32, dit_steps=12, dit_batch=2, dit_lr=3e-3, trajectories=2)
    rng = np.random.default_rng(0)
    latents = torch.randn(2, recipe.chunks_per_trajectory, 16, train_demo.LATENT_FRAMES, 4, 4)
    captions = [[train_demo.scenes.caption("red", "circle", "blue")] * recipe.chunks_per_trajectory] * 2
    batches = train_demo.ChunkBatches(latents, captions, recipe)
    model = train_demo.build_transformer()
    gen = torch.Generator().manual_seed(0)
    losses = train_demo.train_transformer(model, batches, recipe, rng, gen, log=lambda _: None, fixed_batch=True)
    assert _falls(losses), losses


def test_history_of_an_example_is_the_chunks_before_it(train_demo):
    """Chunk k trains on the windows the runtime would hold after chunks 0..k-1 (zeros before any)."""
    recipe = train_demo.Recipe(trajectories=1)
    latents = torch.arange(4 * 16 * 9 * 2 * 2, dtype=torch.float32).view(1, 4, 16, 9, 2, 2)
    batches = train_demo.ChunkBatches(latents, [["a"] * 4], recipe)
    _, _, short, mid, long = batches.example(0, 0, drop=False)
    assert not short.any() and not mid.any() and not long.any()
    x0, _, short, mid, _ = batches.example(0, 2, drop=False)
    assert torch.equal(x0, latents[0, 2])
    assert torch.equal(short[:, 0], latents[0, 0, :, 0])  # the prefix: the video's first latent frame
    assert torch.equal(short[:, 1], latents[0, 1, :, -1])  # the newest frame: chunk 1's last
    assert torch.equal(mid, latents[0, 1, :, -3:-1])
