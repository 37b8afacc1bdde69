"""The built-in `demo` model: a small Helios trained on bouncing shapes, shipped in the package.

`Engine.from_pretrained("demo")` and `helios-rt generate --model demo` load `DEMO_CHECKPOINT`, a
diffusers-layout folder like any Helios checkpoint (no download): a 4-block Helios transformer and a
Wan VAE at 64x64, trained by `scripts/train_demo.py` on the scenes of `helios_rt.demo.scenes`. Its
prompts are captions such as "a red circle on a blue background" (`scenes.caption`); it draws the
shape in those colours, continues its motion from one chunk to the next through the history, and
changes colour when the prompt does.

The checkpoint is a Base-style one (`HeliosPipeline`, UniPC with classifier-free guidance): the demo's
own sampling defaults below make it draw well and play in real time on a laptop CPU.
"""

from __future__ import annotations

from pathlib import Path

from . import untrained

DEMO_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
DEMO_HEIGHT, DEMO_WIDTH = 192, 320  # transitional: the untrained model's size until the switch
DEMO_STEPS = 6  # UniPC steps per chunk
DEMO_GUIDANCE = 4.0
DEMO_PROMPT = "a red circle on a blue background"


def is_demo(model: str | Path) -> bool:
    """Whether a `--model` / `from_pretrained` argument names the built-in demo."""
    return str(model) == "demo"


def resolve_model(model: str | Path) -> Path:
    """The checkpoint folder a model argument names: the demo's, or the path itself."""
    return DEMO_CHECKPOINT if is_demo(model) else Path(model)


# ---- transitional: the untrained model under its old names, until the engine loads the demo as a folder
DEMO_MODEL_INDEX, DEMO_SCHEDULER = untrained.UNTRAINED_MODEL_INDEX, untrained.UNTRAINED_SCHEDULER
DEMO_SEED, DEMO_VAE = untrained.UNTRAINED_SEED, untrained.UNTRAINED_VAE
DEMO_TRANSFORMER = untrained.UNTRAINED_TRANSFORMER
seeded_ = untrained.seeded_


def build_demo_modules(config):
    import torch

    from ..fp8 import quantize_blocks_
    from ..model.transformer import HeliosTransformer, keeps_fp32
    from ..model.vae import WanVAE
    from ..ops import OpSet

    device = torch.device(config.resolved_device())
    dtype, vae_dtype = config.resolved_dtype(), config.resolved_dtype("vae_dtype")
    transformer = seeded_(HeliosTransformer(DEMO_TRANSFORMER, OpSet(device, config.kernels)), DEMO_SEED)
    for name, p in transformer.named_parameters():
        p.data = p.data.to(device, torch.float32 if keeps_fp32(name) else dtype)
    if config.precision == "fp8":
        quantize_blocks_(transformer)
    vae = seeded_(WanVAE(DEMO_VAE), DEMO_SEED + 1)
    vae._init_latent_stats()
    return transformer.eval(), vae.to(device, vae_dtype).eval()


def build_demo_engine(config):
    from ..engine import Engine
    from ..model.text import HashPromptEncoder
    from ..sampling.chunk import SamplingSpec

    transformer, vae = build_demo_modules(config)
    spec = SamplingSpec.from_checkpoint(DEMO_MODEL_INDEX, DEMO_SCHEDULER, config)
    return Engine(transformer, vae, HashPromptEncoder(DEMO_TRANSFORMER.text_dim), spec, config)
