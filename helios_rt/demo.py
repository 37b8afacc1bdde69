"""The built-in `demo` model: small Helios-architecture weights made deterministically on the fly.

The demo weights are NOT a trained model: its videos are structured noise. It exists so that the
whole runtime (prompt encoding, pyramid sampling, history, VAE decode, mp4 streaming) runs end to
end on a laptop CPU with no download, and so that tests and benchmarks have a model that every
machine can build in a second.
"""

from __future__ import annotations

import torch

from .config import EngineConfig, ModelConfig
from .fp8 import quantize_blocks_
from .model.text import HashPromptEncoder
from .model.transformer import HeliosTransformer, keeps_fp32
from .model.vae import VAEConfig, WanVAE
from .ops import OpSet
from .sampling.chunk import SamplingSpec

DEMO_HEIGHT, DEMO_WIDTH = 192, 320
DEMO_SEED = 20260303

DEMO_TRANSFORMER = ModelConfig(
    num_attention_heads=4,
    attention_head_dim=32,
    text_dim=64,
    freq_dim=64,
    ffn_dim=256,
    num_layers=4,
    rope_dim=(12, 10, 10),
    is_amplify_history=True,
)
DEMO_VAE = VAEConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1)
DEMO_MODEL_INDEX = {"_class_name": "HeliosPyramidPipeline", "is_distilled": True, "is_cfg_zero_star": False}
DEMO_SCHEDULER = {"_class_name": "HeliosDMDScheduler", "use_dynamic_shifting": True}


def _seeded(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-initialise every parameter from one seed so the demo is the same on every machine."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5)
            if name.endswith(("norm_q.weight", "norm_k.weight")) or ".norm2." in name:
                p.add_(1.0)  # norm gains near one, as trained models have
    return module


def build_demo_modules(config: EngineConfig) -> tuple[HeliosTransformer, WanVAE]:
    device = torch.device(config.resolved_device())
    dtype, vae_dtype = config.resolved_dtype(), config.resolved_dtype("vae_dtype")
    transformer = _seeded(HeliosTransformer(DEMO_TRANSFORMER, OpSet(device, config.kernels)), DEMO_SEED)
    for name, p in transformer.named_parameters():
        p.data = p.data.to(device, torch.float32 if keeps_fp32(name) else dtype)
    if config.precision == "fp8":  # quantised from the float weights, as loading a float checkpoint does
        quantize_blocks_(transformer)
    vae = _seeded(WanVAE(DEMO_VAE), DEMO_SEED + 1)
    vae._init_latent_stats()
    return transformer.eval(), vae.to(device, vae_dtype).eval()


def build_demo_engine(config: EngineConfig):
    from .engine import Engine

    transformer, vae = build_demo_modules(config)
    spec = SamplingSpec.from_checkpoint(DEMO_MODEL_INDEX, DEMO_SCHEDULER, config)
    return Engine(transformer, vae, HashPromptEncoder(DEMO_TRANSFORMER.text_dim), spec, config)
