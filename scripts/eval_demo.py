"""Measure a demo checkpoint the way tests/test_demo_model.py does, on its captions and on a wider sample.

The tests pass or fail on six captions; choosing a recipe, a step count or a guidance scale needs a sample
they do not see. This prints, as JSON:
- `colour`: per test caption, frames (every other one of 2 chunks, seed 3) whose background and whose
  object are the colours it names;
- `test` and `wide`: chunk-boundary jumps in pixels, the motion test's measure, over the test's 12
  boundaries and over `--wide` other captions (drawn with seed 99, 4 chunks each, seeds 100 on), with
  `null` where the object is missing on one side; and a summary: boundaries within the test's bound,
  missing, drawn but farther.

    python scripts/eval_demo.py                                 # the shipped demo, its own defaults
    python scripts/eval_demo.py /tmp/dw/out --steps 10 --guidance 2.0

Run it from the repository: it reads the tests' own measures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from helios_rt import Engine, EngineConfig
from helios_rt.demo import demo_config, scenes

SHAPES = ("circle", "square", "triangle")


def load_measures(repo: Path):
    """tests/test_demo_model.py as a module: its palette readers and its chunk loop are the measure."""
    spec = importlib.util.spec_from_file_location("test_demo_model", repo / "tests" / "test_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jumps(m, video: list[np.ndarray], background: str) -> list[float | None]:
    """The motion test's `boundary_jumps`, to a tenth of a pixel."""
    return [None if j is None else round(j, 1) for j in m.boundary_jumps(video, background)]


def wide_captions(n: int) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(99)
    out = []
    while len(out) < n:
        obj, background = rng.choice(list(scenes.COLOURS), 2, replace=False)
        out.append((str(obj), str(rng.choice(SHAPES)), str(background)))
    return out


def summary(values: list[float | None], bound: float) -> dict:
    drawn = [v for v in values if v is not None]
    return {
        "boundaries": len(values),
        "within": sum(v <= bound for v in drawn),
        "missing": len(values) - len(drawn),
        "farther": sum(v > bound for v in drawn),
        "max": max(drawn, default=None),
    }


def evaluate(engine: Engine, m, wide: int) -> dict:
    colour = {}
    for obj, shape, background in m.CAPTIONS:
        video = m.chunks(engine, scenes.caption(obj, shape, background), 2, seed=3)
        frames = [frame for chunk in video for frame in chunk[::2]]
        colour[scenes.caption(obj, shape, background)] = {
            "frames": len(frames),
            "background": sum(m.background_of(f) == background for f in frames),
            "object": sum(m.object_of(f, background)[0] == obj for f in frames),
        }
    test = []
    for (obj, shape, background), seed in zip(m.CAPTIONS, (3, 4, 5, 6, 7, 8), strict=True):
        test += jumps(m, m.chunks(engine, scenes.caption(obj, shape, background), 3, seed=seed), background)
    sample = []
    for i, (obj, shape, background) in enumerate(wide_captions(wide)):
        sample += jumps(m, m.chunks(engine, scenes.caption(obj, shape, background), 4, seed=100 + i), background)
    return {
        "colour": colour,
        "test": test,
        "wide": sample,
        "test_summary": summary(test, m.JUMP_PX),
        "wide_summary": summary(sample, m.JUMP_PX),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default="demo", help="a demo-layout folder, or demo (the shipped one)")
    parser.add_argument("--steps", type=int, help="UniPC steps (default: the demo's own)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the demo's own)")
    parser.add_argument("--wide", type=int, default=12, help="captions in the wider sample (4 chunks each)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = demo_config(EngineConfig())
    if args.steps is not None:
        config = config.replace(steps=args.steps)
    if args.guidance is not None:
        config = config.replace(guidance_scale=args.guidance)
    engine = Engine.from_pretrained(args.checkpoint, config)
    m = load_measures(Path(__file__).resolve().parent.parent)
    print(json.dumps(evaluate(engine, m, args.wide), indent=1))


if __name__ == "__main__":
    main()
