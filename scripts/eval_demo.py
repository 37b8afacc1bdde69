"""Measure a demo checkpoint the way tests/test_demo_model.py does, on its captions and on a wider sample.

The tests pass or fail on six captions; choosing a recipe, a step count or a guidance scale needs a sample
they do not see. This prints, as JSON:
- `colour`: per test caption, frames (every other one of 2 chunks, seed 3) whose background and whose
  object are the colours it names, and whether the colour test would pass;
- `test` and `wide`: chunk-boundary jumps in pixels, the motion test's measure (`null` where the object is
  missing on one side), over the test's 12 boundaries and over `--wide` captions the tests do not use
  (distinct, drawn with seed 99; 4 chunks each, seeds 100 on); and a summary of each: boundaries within
  the test's bound, missing, drawn but farther, and whether the motion test's two asserts would hold.

    python scripts/eval_demo.py                                 # the shipped demo, its own defaults
    python scripts/eval_demo.py /tmp/dw/out --steps 10 --guidance 2.0

It needs a source checkout with the test dependencies (it loads tests/test_demo_model.py by path); any
working directory will do.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from helios_rt import Engine, EngineConfig
from helios_rt.demo import demo_config, scenes

Caption = tuple[str, str, str]


def load_measures(repo: Path) -> ModuleType:
    """tests/test_demo_model.py as a module: its palette readers, chunk loop and bounds are the measure."""
    spec = importlib.util.spec_from_file_location("test_demo_model", repo / "tests" / "test_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wide_captions(n: int, exclude: list[Caption]) -> list[Caption]:
    """`n` distinct captions, none of `exclude` (the tests' own), in an order fixed by seed 99, so that
    every run and every checkpoint meet the same sample."""
    pool = [
        (obj, shape, background)
        for obj, background in itertools.permutations(scenes.COLOURS, 2)
        for shape in scenes.SHAPES
        if (obj, shape, background) not in exclude
    ]
    if n > len(pool):
        raise ValueError(f"--wide {n}: only {len(pool)} captions are not the tests' own")
    order = np.random.default_rng(99).permutation(len(pool))
    return [pool[i] for i in order[:n]]


def summary(jumps: list[float | None], m: ModuleType) -> dict[str, float | int | bool | None]:
    """Counts of `jumps` against the motion test's bounds (on the unrounded values the test sees)."""
    drawn = [j for j in jumps if j is not None]
    missing = len(jumps) - len(drawn)
    return {
        "boundaries": len(jumps),
        "within": sum(j <= m.JUMP_PX for j in drawn),
        "missing": missing,
        "farther": sum(j > m.JUMP_PX for j in drawn),
        "max": round(max(drawn), 1) if drawn else None,
        "test_would_pass": missing <= m.MISSING_SHARE * len(jumps) and all(j <= m.JUMP_PX for j in drawn),
    }


def _rounded(jumps: list[float | None]) -> list[float | None]:
    return [None if j is None else round(j, 1) for j in jumps]


def evaluate(engine: Engine, m: ModuleType, wide: int) -> dict:
    """The figures this script prints (see the module's docstring)."""
    colour = {}
    for obj, shape, background in m.CAPTIONS:
        backgrounds, objects = m.colours_seen(engine, obj, shape, background)
        colour[scenes.caption(obj, shape, background)] = {
            "frames": len(objects),
            "background": backgrounds.count(background),
            "object": objects.count(obj),
            "test_would_pass": backgrounds.count(background) >= m.BACKGROUND_SHARE * len(backgrounds)
            and objects.count(obj) >= m.OBJECT_SHARE * len(objects),
        }
    test: list[float | None] = []
    for (obj, shape, background), seed in zip(m.CAPTIONS, (3, 4, 5, 6, 7, 8), strict=True):
        test += m.boundary_jumps(m.chunks(engine, scenes.caption(obj, shape, background), 3, seed=seed), background)
    sample: list[float | None] = []
    captions = wide_captions(wide, m.CAPTIONS)
    for i, (obj, shape, background) in enumerate(captions):
        video = m.chunks(engine, scenes.caption(obj, shape, background), 4, seed=100 + i)
        sample += m.boundary_jumps(video, background)
    return {
        "colour": colour,
        "test": _rounded(test),
        "wide_captions": [scenes.caption(*c) for c in captions],
        "wide": _rounded(sample),
        "test_summary": summary(test, m),
        "wide_summary": summary(sample, m),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default="demo", help="a demo-layout folder, or demo (the shipped one)")
    parser.add_argument("--steps", type=int, help="UniPC steps (default: the demo's own)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the demo's own)")
    parser.add_argument("--wide", type=int, default=12, help="captions in the wider sample (4 chunks each)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the figures repeat for a count)")
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
