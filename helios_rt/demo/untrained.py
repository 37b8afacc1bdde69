"""An untrained Helios-architecture model, written as a checkpoint folder: for tests, not for viewing.

Tests of the runtime's plumbing (pyramid stages, the doubled first chunk, plan reports, FP8, sequence
parallelism) need a distilled pyramid checkpoint that any machine makes in a second; what it draws does
not matter. Its weights are drawn from one seed, so it is the same on every machine, and it is loaded
like any folder (`Engine.from_pretrained(write_untrained_checkpoint(tmp))`). The demo that shows what
the runtime does is the trained one (`helios_rt.demo.DEMO_CHECKPOINT`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ModelConfig
from ..model.transformer import HeliosTransformer
from ..model.vae import VAEConfig, WanVAE
from ..ops import OpSet

UNTRAINED_HEIGHT, UNTRAINED_WIDTH = 192, 320
UNTRAINED_SEED = 20260303

UNTRAINED_TRANSFORMER = ModelConfig(
    num_attention_heads=4,
    attention_head_dim=32,
    text_dim=64,
    freq_dim=64,
    ffn_dim=256,
    num_layers=4,
    rope_dim=(12, 10, 10),
    is_amplify_history=True,
)
UNTRAINED_VAE = VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1)
UNTRAINED_MODEL_INDEX = {"_class_name": "HeliosPyramidPipeline", "is_distilled": True, "is_cfg_zero_star": False}
UNTRAINED_SCHEDULER = {"_class_name": "HeliosDMDScheduler", "use_dynamic_shifting": True}
UNTRAINED_TEXT_ENCODER = {"_class_name": "HashPromptEncoder", "text_dim": UNTRAINED_TRANSFORMER.text_dim}


def seeded_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-initialise every parameter from one seed so the model is the same on every machine."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5)
            if name.endswith(("norm_q.weight", "norm_k.weight")) or ".norm2." in name:
                p.add_(1.0)  # norm gains near one, as trained models have
    return module


def untrained_modules() -> tuple[HeliosTransformer, WanVAE]:
    """The untrained transformer and VAE, float32 on the CPU."""
    ops = OpSet(torch.device("cpu"), "reference")
    transformer = seeded_(HeliosTransformer(UNTRAINED_TRANSFORMER, ops), UNTRAINED_SEED)
    vae = seeded_(WanVAE(UNTRAINED_VAE), UNTRAINED_SEED + 1)
    return transformer, vae


def write_untrained_checkpoint(folder: str | Path) -> Path:
    """Write the untrained model as a diffusers-layout folder (a few MB) and return it."""
    root = Path(folder)
    transformer, vae = untrained_modules()
    transformer_config = {"_class_name": "HeliosTransformer3DModel", **UNTRAINED_TRANSFORMER.to_dict()}
    vae_config = {"_class_name": "AutoencoderKLWan", **dataclasses.asdict(UNTRAINED_VAE)}
    _write_component(root / "transformer", transformer, transformer_config)
    _write_component(root / "vae", vae, vae_config)
    _write_json(root / "scheduler" / "scheduler_config.json", UNTRAINED_SCHEDULER)
    _write_json(root / "text_encoder" / "config.json", UNTRAINED_TEXT_ENCODER)
    _write_json(root / "model_index.json", UNTRAINED_MODEL_INDEX)
    return root


def _write_component(folder: Path, module: torch.nn.Module, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    _write_json(folder / "config.json", config)


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, default=list) + "\n")
