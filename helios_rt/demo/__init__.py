"""The built-in `demo` model: a small Helios trained on bouncing shapes, shipped in the package.

`Engine.from_pretrained("demo")` and `helios-rt generate --model demo` load `DEMO_CHECKPOINT`, a
diffusers-layout folder like any Helios checkpoint (no download): a 4-block Helios transformer and a
Wan VAE with two down-sampling stages (4x in space and time) at 64x64, trained by
`scripts/train_demo.py` on the scenes of `helios_rt.demo.scenes`. Its prompts are captions such as
"a red circle on a blue background" (`scenes.caption`): it draws the object (a blob more than the
shape) in those colours, mostly continues its motion from one chunk to the next through the history,
and changes colour when the prompt does (tests/test_demo_model.py).

The checkpoint is a Base-style one (`HeliosPipeline`, UniPC with classifier-free guidance). Where an
EngineConfig leaves size, steps or guidance at EngineConfig's defaults (which are the 14B model's),
the demo runs at its own (`demo_config`): the size it was trained at, and few enough steps to play in
real time on a laptop CPU.
"""

from __future__ import annotations

from pathlib import Path

from ..config import EngineConfig

DEMO_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
DEMO_HEIGHT, DEMO_WIDTH = 64, 64  # the size it was trained at
DEMO_STEPS = 12  # UniPC steps per chunk: at 10 (guidance 2) one test boundary jumps 9.4 px (scripts/eval_demo.py)
DEMO_GUIDANCE = 2.0  # of 1.5, 2, 3, 4 at 12 steps: 58 of 72 wider-sample boundaries within 8 px (3: 54; 4 and 1.5 jump)
DEMO_PROMPT = "a red circle on a blue background"


def is_demo(model: str | Path) -> bool:
    """Whether a `--model` / `from_pretrained` argument names the built-in demo."""
    return str(model) == "demo"


def resolve_model(model: str | Path) -> Path:
    """The checkpoint folder a model argument names: the demo's, or the path itself."""
    return DEMO_CHECKPOINT if is_demo(model) else Path(model)


def demo_config(config: EngineConfig) -> EngineConfig:
    """The demo's size, steps and guidance where `config` leaves EngineConfig's defaults."""
    own = {"height": DEMO_HEIGHT, "width": DEMO_WIDTH, "steps": DEMO_STEPS, "guidance_scale": DEMO_GUIDANCE}
    default = EngineConfig()
    changes = {name: value for name, value in own.items() if getattr(config, name) == getattr(default, name)}
    return config.replace(**changes) if changes else config
