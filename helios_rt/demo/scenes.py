"""The demo model's world: one flat shape moving at constant velocity, bouncing off the frame's edges.

The demo checkpoint is trained on these scenes (`scripts/train_demo.py`), and the tests that check what
it draws read the same palette and geometry. A scene is described by a caption made of the words that
name it, "a red circle on a blue background": any object colour, any other background colour and any
shape of the lists below make a valid prompt.

Pixels are float32 in [-1, 1], `[3, T, H, W]`, the VAE's input convention. Trajectories are exact
(positions in pixels, reflections at the edges), so a clip can be cut into chunks anywhere and continue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

# Saturated, well separated colours: each is the nearest palette entry to itself by a wide margin.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 50),
    "blue": (35, 60, 225),
    "yellow": (235, 215, 30),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
RADIUS = 10.0  # pixels: half the square's side, the circle's radius, the triangle's circumradius
SPEED = (0.5, 1.5)  # pixels per frame


def caption(obj: str, shape: str, background: str) -> str:
    """The caption of a scene; the demo's prompts are exactly these."""
    return f"a {obj} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str]:
    """(object colour, shape, background colour) of a caption made by `caption`."""
    words = text.lower().split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(f"{text!r} is not a demo caption; write e.g. {caption('red', 'circle', 'blue')!r}")
    obj, shape, background = words[1], words[2], words[5]
    for word, known in ((obj, COLOURS), (shape, SHAPES), (background, COLOURS)):
        if word not in known:
            raise ValueError(f"{word!r} is not a demo word; the demo knows {', '.join(known)}")
    return obj, shape, background


@dataclass(frozen=True)
class Scene:
    """One object's state at a frame: where it is, where it goes, what it looks like."""

    obj: str
    shape: str
    background: str
    x: float
    y: float
    vx: float
    vy: float

    @property
    def caption(self) -> str:
        return caption(self.obj, self.shape, self.background)


def random_scene(rng: np.random.Generator, height: int, width: int) -> Scene:
    """A scene drawn uniformly: colours (object differs from background), shape, position, velocity."""
    names = list(COLOURS)
    obj, background = rng.choice(len(names), size=2, replace=False)
    speed, angle = rng.uniform(*SPEED), rng.uniform(0, 2 * math.pi)
    return Scene(
        names[obj],
        SHAPES[rng.integers(len(SHAPES))],
        names[background],
        float(rng.uniform(RADIUS, width - RADIUS)),
        float(rng.uniform(RADIUS, height - RADIUS)),
        speed * math.cos(angle),
        speed * math.sin(angle),
    )


def step(scene: Scene, height: int, width: int) -> Scene:
    """Advance one frame; the object's box reflects off the frame's edges."""
    x, vx = _bounce(scene.x + scene.vx, scene.vx, RADIUS, width - RADIUS)
    y, vy = _bounce(scene.y + scene.vy, scene.vy, RADIUS, height - RADIUS)
    return replace(scene, x=x, y=y, vx=vx, vy=vy)


def _bounce(p: float, v: float, lo: float, hi: float) -> tuple[float, float]:
    if p < lo:
        return 2 * lo - p, -v
    if p > hi:
        return 2 * hi - p, -v
    return p, v


def _coverage(scene: Scene, height: int, width: int, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel the object covers, `[H, W]` in [0, 1] (supersampled edges)."""
    s = supersample
    ys = (np.arange(height * s) + 0.5) / s
    xs = (np.arange(width * s) + 0.5) / s
    dx, dy = xs[None, :] - scene.x, ys[:, None] - scene.y
    if scene.shape == "circle":
        inside = dx**2 + dy**2 <= RADIUS**2
    elif scene.shape == "square":
        inside = (np.abs(dx) <= RADIUS) & (np.abs(dy) <= RADIUS)
    else:  # upward triangle inscribed in the circle of radius RADIUS
        top, base = -RADIUS, RADIUS / 2
        half = (dy - top) / (base - top) * RADIUS * math.sqrt(3) / 2
        inside = (dy >= top) & (dy <= base) & (np.abs(dx) <= half)
    return inside.reshape(height, s, width, s).mean(axis=(1, 3))


def render(scene: Scene, height: int, width: int) -> np.ndarray:
    """One frame, float32 `[3, H, W]` in [-1, 1]."""
    alpha = _coverage(scene, height, width)[None]
    obj = np.asarray(COLOURS[scene.obj], np.float32)[:, None, None]
    bg = np.asarray(COLOURS[scene.background], np.float32)[:, None, None]
    return ((alpha * obj + (1 - alpha) * bg) / 127.5 - 1).astype(np.float32)


def clip(scene: Scene, frames: int, height: int, width: int) -> tuple[torch.Tensor, Scene]:
    """`frames` frames starting at `scene` as `[3, T, H, W]`, and the scene of the frame after the last."""
    out = np.empty((3, frames, height, width), np.float32)
    for t in range(frames):
        out[:, t] = render(scene, height, width)
        scene = step(scene, height, width)
    return torch.from_numpy(out), scene


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette name closest to an RGB triple (0..255)."""
    names = list(COLOURS)
    dist = [float(np.sum((np.asarray(COLOURS[n], np.float64) - rgb) ** 2)) for n in names]
    return names[int(np.argmin(dist))]
