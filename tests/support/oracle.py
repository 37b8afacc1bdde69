"""Small Helios transformers built by diffusers (the oracle), saved as sharded checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class OracleCase:
    """One small transformer config and the inputs of one forward."""

    name: str
    config: dict
    batch: int
    noisy_shape: tuple[int, int, int]  # latent (T, H, W)
    history_hw: tuple[int, int] = (8, 12)
    history_frames: dict = field(default_factory=dict)  # term -> frame indices
    text_len: int = 7


BASE = dict(patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=24, freq_dim=32, ffn_dim=48)


def build_reference(config: dict, seed: int = 0):
    """A diffusers HeliosTransformer3DModel with every parameter perturbed away from its init.

    Norm weights start at one and history scales at one; perturbing them makes the comparison see
    every parameter's role.
    """
    from diffusers import HeliosTransformer3DModel

    torch.manual_seed(seed)
    model = HeliosTransformer3DModel(**{**BASE, **config}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def save_sharded(model, root: Path, max_shard_size: str = "40KB") -> Path:
    """Write a diffusers-layout checkpoint with the transformer split into several shards."""
    model.save_pretrained(root / "transformer", max_shard_size=max_shard_size)
    (root / "model_index.json").write_text('{"_class_name": "HeliosPyramidPipeline"}')
    return root


def reference_forward(model, case: OracleCase, inputs: dict) -> torch.Tensor:
    b = case.batch
    kwargs = dict(indices_hidden_states=torch.tensor([inputs["noisy_indices"]] * b))
    for term in ("short", "mid", "long"):
        if term in case.history_frames:
            kwargs[f"indices_latents_history_{term}"] = torch.tensor([case.history_frames[term]] * b)
            kwargs[f"latents_history_{term}"] = inputs[term]
    with torch.no_grad():
        return model(inputs["latents"], inputs["timestep"], inputs["text"], return_dict=False, **kwargs)[0]


def make_inputs(case: OracleCase, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = BASE["in_channels"]
    b = case.batch
    t, h, w = case.noisy_shape
    first_noisy = 1 + max((max(v) for v in case.history_frames.values()), default=-1)
    inputs = {
        "latents": torch.randn(b, c, t, h, w, generator=g),
        "timestep": torch.tensor([937.0, 412.5][:b]),
        "text": torch.randn(b, case.text_len, BASE["text_dim"], generator=g),
        "noisy_indices": tuple(range(first_noisy, first_noisy + t)),
    }
    for term, frames in case.history_frames.items():
        inputs[term] = torch.randn(b, c, len(frames), *case.history_hw, generator=g)
    return inputs
