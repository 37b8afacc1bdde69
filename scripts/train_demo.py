"""Train the built-in `demo` checkpoint on procedural bouncing-shape video (no download).

    cd scripts && python train_demo.py all --work /tmp/demo-work --out ../helios_rt/demo/checkpoint

Three steps, deterministic from `--seed` on a given machine and thread count:
1. the Wan VAE at the demo's size (two down-sampling stages, see `VAE`), as an autoencoder with the
   object's pixels weighted, on whole chunks cropped and then whole, with single frames beside them
   (phases vae, vae_long);
2. a dataset of trajectories cut into 33-frame chunks, each encoded on its own as the runtime decodes
   it, with the caption of every chunk (colours or shape may switch at a chunk boundary, so the model
   learns that the prompt, not the history, decides what the object looks like);
3. the Helios transformer, flow matching on a chunk given its history windows (long/mid/short, built by
   the runtime's own `HistoryMemory`, half their frames mixed a little toward noise) and its caption,
   dropped 10% of the time for guidance, the latent pixels the object touches and the chunk's first
   latent frame weighted.

The models are diffusers' `AutoencoderKLWan` and `HeliosTransformer3DModel` (a test dependency, used
here as a trainer; the runtime never imports it), saved in the diffusers layout the runtime loads.
Run it from outside the repository root (the repository's `kernels/` folder would shadow the PyPI
`kernels` package that transformers imports), e.g. `cd scripts && python train_demo.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from helios_rt.demo import scenes
from helios_rt.model.text import HashPromptEncoder
from helios_rt.sampling.history import HistoryLayout, HistoryMemory

CHUNK_FRAMES = 33  # pixel frames of one chunk (9 latent frames)
LATENT_FRAMES = 9


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the weights besides the seed."""

    height: int = 64
    width: int = 64
    # The autoencoder learns on whole chunks (clips of 13 frames leave the causal caches of a chunk's later
    # latent frames untrained: they decode garbage), first on 32x32 crops (a quarter of the cost a step;
    # the convolutions do not know where a crop was cut), then on whole frames.
    vae_steps: int = 1200
    vae_batch: int = 2
    vae_frames: int = 33
    vae_crop: int = 32
    vae_long_steps: int = 500
    vae_long_frames: int = 33
    vae_long_batch: int = 1
    vae_long_crop: int = 64
    vae_lr: float = 3e-4
    # Each step also learns a batch of single frames: a chunk's first frame alone makes its first latent
    # frame, and learned as 1 frame in 33 the encoder kept too little of it (every chunk began flat).
    single_batch: int = 8
    object_weight: float = 20.0  # the object is a few % of a frame: unweighted, only the background is learned
    trajectories: int = 500
    chunks_per_trajectory: int = 4
    dit_steps: int = 6000
    dit_batch: int = 8
    dit_lr: float = 6e-4
    # Latent pixels the object touches count 8 times in flow matching: at 4 the object faded out mid-chunk in a
    # third of a wider sample's boundaries (the background is most of every frame, so most of the loss).
    dit_object_weight: float = 8.0
    # A chunk's first latent frame encodes one pixel frame alone: its normalised latents have 0.67 the spread of
    # the rest (1.07), so at one sigma it is the noisiest to predict, and it is the frame a boundary shows.
    # Unweighted, the generated first frame of a chunk was textured noise or a moved object.
    dit_first_frame_weight: float = 3.0
    caption_dropout: float = 0.1
    switch_colour: float = 0.3  # chance the object's colour changes at a chunk boundary
    switch_background: float = 0.1
    switch_shape: float = 0.1
    sigma_shift: float = 3.0
    # Helios' frame-aware corruption, mild: each history frame that exists is, with this chance, mixed toward
    # noise by a sigma drawn from [0, history_sigma]. The runtime's history is what it generated, not what the
    # encoder made; a model that trusts its history exactly jumps at a boundary when that history is off.
    history_corrupt: float = 0.5
    history_sigma: float = 0.15


TRANSFORMER = dict(
    # 2x2 latent pixels a token: 64 tokens a latent frame. Not 4x4: a token of 4x4x16 = 256 values from a
    # 128-wide model cannot carry the noise it must give back (the loss stalled at 0.68, the video was noise)
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=64,
    freq_dim=64,
    ffn_dim=512,
    num_layers=4,
    rope_dim=(12, 10, 10),
    is_amplify_history=True,
)
# Two down-sampling stages (4x in space and time), not Wan's three: at 8x a 64x64 frame is 8x8 latent
# pixels and this small autoencoder blurs the 20-pixel object away; at 4x it keeps its colour and place.
# It starts per frame (`per_frame_`).
VAE = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 4],
    num_res_blocks=1,
    temperal_downsample=[True, True],
    scale_factor_spatial=4,
)
SCHEDULER = {
    "_class_name": "HeliosScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "stages": 1,
    "use_dynamic_shifting": True,
    "time_shift_type": "exponential",
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": math.log(3.0),
    "max_shift": math.log(3.0),
}
MODEL_INDEX = {"_class_name": "HeliosPipeline", "is_distilled": False, "is_cfg_zero_star": False}


# ----------------------------------------------------------------------------- data


def random_clip(rng: np.random.Generator, recipe: Recipe, frames: int) -> torch.Tensor:
    scene = scenes.random_scene(rng, recipe.height, recipe.width)
    return scenes.clip(scene, frames, recipe.height, recipe.width)[0]


def trajectory(rng: np.random.Generator, recipe: Recipe) -> tuple[list[torch.Tensor], list[str]]:
    """Consecutive chunks of one object's motion; its look may switch at a chunk boundary."""
    scene = scenes.random_scene(rng, recipe.height, recipe.width)
    chunks, captions = [], []
    for c in range(recipe.chunks_per_trajectory):
        if c:
            scene = _switched(rng, recipe, scene)
        captions.append(scene.caption)
        pixels, scene = scenes.clip(scene, CHUNK_FRAMES, recipe.height, recipe.width)
        chunks.append(pixels)
    return chunks, captions


def _switched(rng: np.random.Generator, recipe: Recipe, scene: scenes.Scene) -> scenes.Scene:
    names = list(scenes.COLOURS)
    if rng.random() < recipe.switch_colour:
        scene = replace(scene, obj=str(rng.choice([n for n in names if n not in (scene.obj, scene.background)])))
    if rng.random() < recipe.switch_background:
        scene = replace(scene, background=str(rng.choice([n for n in names if n not in (scene.obj, scene.background)])))
    if rng.random() < recipe.switch_shape:
        scene = replace(scene, shape=str(rng.choice([s for s in scenes.SHAPES if s != scene.shape])))
    return scene


# ----------------------------------------------------------------------------- VAE


def build_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(**VAE)


@torch.no_grad()
def per_frame_(vae):
    """Start the autoencoder as a per-frame one (in place): every causal convolution sees the current
    frame only, a temporal down-sampling keeps the newest of its frames, a temporal up-sampling repeats
    its frame. The past frames' taps start at zero and learn like any weight.

    From the usual random start the causal caches carry each frame's error into the next: trained for
    2100 steps, the error grew from 0.03 (pixel MSE) at a chunk's first frame to 0.4 at its last, the
    object staying where the first frame had it. Started per frame, a chunk is 9 pictures, each as
    easy as the first frame (which single frames learn in a few hundred steps), and what the motion
    within 4 frames adds is learned on top. Video VAEs are started from image VAEs this way.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    for module in vae.modules():
        if isinstance(module, WanResample) and hasattr(module, "time_conv"):
            weight, bias = module.time_conv.weight, module.time_conv.bias  # [out, in, 3, 1, 1]
            weight.zero_(), bias.zero_()
            frames_out = weight.shape[0] // weight.shape[1]  # upsampling makes 2 frames from 1
            weight[:, :, -1, 0, 0] = torch.eye(weight.shape[1]).repeat(frames_out, 1)
        elif isinstance(module, WanCausalConv3d) and module.kernel_size[0] > 1:
            module.weight[:, :, :-1] = 0
    return vae


def train_vae(
    vae, recipe: Recipe, rng: np.random.Generator, log=print, phase: str = "vae", fixed_batch: bool = False
) -> list[float]:
    """Autoencoder training on random clips, the object's pixels weighted; returns every step's loss.

    phase: which of the recipe's `<phase>_steps`, `_frames`, `_batch`, `_crop` to train with ("vae":
    crops, a fast start; "vae_long": whole frames). Each step's loss is the clips' plus a batch of single
    frames' (`single_batch`), each a mean over its pixels, so the first latent frame learns as much as the
    rest of a chunk. The object is a few % of a frame: unweighted, the autoencoder reaches its plateau
    by drawing the background alone (`object_weights`). fixed_batch: draw one batch and learn it again
    every step (the smoke test's way to see the loss fall in a few steps).
    """
    steps, frames, size, crop = (getattr(recipe, f"{phase}_{what}") for what in ("steps", "frames", "batch", "crop"))
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.vae_lr, total_steps=max(steps, 2), pct_start=0.05)
    losses, batches = [], None
    vae.train()
    for step in range(steps):
        if batches is None or not fixed_batch:
            clips = torch.stack([_cropped(rng, random_clip(rng, recipe, frames), crop) for _ in range(size)])
            batches = clips, torch.stack([random_clip(rng, recipe, 1) for _ in range(recipe.single_batch)])
        fits, kls = zip(*(_autoencoded(vae, batch, recipe.object_weight) for batch in batches), strict=True)
        loss = sum(fits) + 1e-5 * sum(kls)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(sum(fits).detach()))
        if step % 50 == 0 or step == steps - 1:
            clip_fit, single_fit = (float(f.detach()) for f in fits)
            log(f"{phase} step {step} loss {np.mean(losses[-50:]):.5f} (clips {clip_fit:.4f}, first frames {single_fit:.4f})")
    return losses


def _autoencoded(vae, batch: torch.Tensor, object_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(object-weighted reconstruction error, KL to the unit Gaussian) of one batch of clips."""
    posterior = vae.encode(batch).latent_dist
    recon = vae.decode(posterior.mean).sample
    fit = (object_weights(batch, object_weight) * (recon - batch) ** 2).mean()
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1 - posterior.logvar).mean()
    return fit, kl


def _cropped(rng: np.random.Generator, clip: torch.Tensor, size: int) -> torch.Tensor:
    """A random `size` x `size` window of a `[3, T, H, W]` clip (the clip itself when it is that size)."""
    h, w = clip.shape[-2:]
    top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
    return clip[..., top : top + size, left : left + size]


def object_weights(clips: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights `[B, 1, T, H, W]`: `weight` on the object's pixels (`object_mask`), else 1."""
    return 1 + (weight - 1) * object_mask(clips).float()


def object_mask(clips: torch.Tensor) -> torch.Tensor:
    """`[B, 1, T, H, W]`: True where a pixel differs from its clip's background, the clip's per-channel
    median (most of every frame is background)."""
    background = clips.flatten(2).median(dim=2).values[:, :, None, None, None]
    return (clips - background).abs().sum(dim=1, keepdim=True) > 0.1


@torch.no_grad()
def encode_dataset(vae, recipe: Recipe, rng: np.random.Generator, log=print):
    """Latents `[N, chunks, 16, 9, h, w]` (unnormalised posterior means), the latent pixels each chunk's
    object touches (`object_latents`, same shape with 1 channel) and captions `[N][chunks]`."""
    vae.eval()
    latents, masks, captions = [], [], []
    for i in range(recipe.trajectories):
        chunks, caps = trajectory(rng, recipe)
        pixels = torch.stack(chunks)
        latents.append(vae.encode(pixels).latent_dist.mean)
        masks.append(object_latents(object_mask(pixels)))
        captions.append(caps)
        if i % 100 == 0:
            log(f"encoded {i}/{recipe.trajectories} trajectories")
    return torch.stack(latents), torch.stack(masks), captions


def object_latents(mask: torch.Tensor) -> torch.Tensor:
    """Pixel mask `[B, 1, 1 + 4n, H, W]` to the latent pixels it touches, `[B, 1, 1 + n, H/4, W/4]`, grown by
    one latent pixel: the first frame is the first latent frame, then 4 frames make one, as the VAE packs."""
    m = mask.float()
    first, rest = m[:, :, :1], m[:, :, 1:]
    rest = rest.unflatten(2, (-1, 4)).amax(dim=3)
    packed = F.max_pool3d(torch.cat([first, rest], dim=2), (1, 4, 4))
    return F.max_pool3d(packed, (1, 3, 3), stride=1, padding=(0, 1, 1)).bool()


# ----------------------------------------------------------------------------- transformer


def build_transformer():
    from diffusers import HeliosTransformer3DModel

    return HeliosTransformer3DModel(**TRANSFORMER)


class ChunkBatches:
    """Training examples: a trajectory's chunk k as target, its chunks before k as history."""

    def __init__(self, latents: torch.Tensor, masks: torch.Tensor, captions: list[list[str]], recipe: Recipe) -> None:
        self.latents, self.masks, self.captions, self.recipe = latents, masks, captions, recipe
        self.layout = HistoryLayout((16, 2, 1), LATENT_FRAMES, keep_first_frame=True)
        self.text = HashPromptEncoder(TRANSFORMER["text_dim"], positional=True)
        self._embeds: dict[str, torch.Tensor] = {}
        self.indices = self.layout.indices()

    def embed(self, caption: str) -> torch.Tensor:
        if caption not in self._embeds:
            self._embeds[caption] = self.text.encode([caption])[0]
        return self._embeds[caption]

    def example(self, n: int, k: int, drop: bool):
        _, c, t, h, w = self.latents.shape[1:]
        memory = HistoryMemory(self.layout, 1, c, h, w)
        for j in range(k):
            memory.push(self.latents[n, j : j + 1])
        short, mid, long = (x[0].clone() for x in memory.windows())
        text = self.embed("" if drop else self.captions[n][k])
        weight = 1 + (self.recipe.dit_object_weight - 1) * self.masks[n, k].float()
        weight[:, 0] *= self.recipe.dit_first_frame_weight
        return self.latents[n, k], weight, text, short, mid, long

    def sample(self, rng: np.random.Generator, batch: int):
        items = [
            self.example(
                int(rng.integers(len(self.latents))),
                int(rng.integers(self.latents.shape[1])),
                bool(rng.random() < self.recipe.caption_dropout),
            )
            for _ in range(batch)
        ]
        x0, weight, text, short, mid, long = (torch.stack(parts) for parts in zip(*items, strict=True))
        short, mid, long = (corrupted(window, rng, self.recipe) for window in (short, mid, long))
        indices = {k: v.expand(batch, -1) for k, v in self.indices.items()}
        return x0, weight, text, short, mid, long, indices


def corrupted(window: torch.Tensor, rng: np.random.Generator, recipe: Recipe) -> torch.Tensor:
    """History windows `[B, C, T, H, W]` with some frames mixed toward noise, `(1 - s) x + s noise`, s per frame.

    Frames of zeros are history that does not exist yet (the runtime's marker); they stay zero.
    """
    b, _, t = window.shape[:3]
    exists = window.abs().amax(dim=(1, 3, 4)) > 0
    hit = torch.from_numpy(rng.random((b, t)) < recipe.history_corrupt) & exists
    sigma = torch.from_numpy(rng.uniform(0.0, recipe.history_sigma, (b, t)).astype(np.float32)) * hit
    noise = torch.from_numpy(rng.standard_normal(window.shape).astype(np.float32))
    sigma = sigma.view(b, 1, t, 1, 1)
    return (1 - sigma) * window + sigma * noise


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The exponential time shift the runtime's scheduler applies (mu = log(shift))."""
    return shift / (shift + (1 / u - 1))


def train_transformer(model, batches: ChunkBatches, recipe: Recipe, rng, gen, log=print, fixed_batch=False, save=None):
    """Flow matching: x_t = (1 - s) x0 + s noise, target noise - x0, timestep s * 1000.

    save: called with the model every 500 steps (a snapshot to look at while it trains).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.dit_lr, weight_decay=0.01)
    steps = max(recipe.dit_steps, 2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.dit_lr, total_steps=steps, pct_start=0.03)
    losses, batch = [], None
    model.train()
    for step in range(recipe.dit_steps):
        if batch is None or not fixed_batch:
            batch = batches.sample(rng, recipe.dit_batch)
        x0, weight, text, short, mid, long, indices = batch
        u = torch.rand(x0.shape[0], generator=gen).clamp(1e-3, 1 - 1e-3)
        sigma = shifted_sigmas(u, recipe.sigma_shift).view(-1, 1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - sigma) * x0 + sigma * noise
        pred = model(
            xt,
            timestep=sigma.flatten() * 1000,
            encoder_hidden_states=text,
            latents_history_short=short,
            latents_history_mid=mid,
            latents_history_long=long,
            return_dict=False,
            **indices,
        )[0]
        loss = (weight * (pred - (noise - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == recipe.dit_steps - 1:
            log(f"transformer step {step} loss {np.mean(losses[-50:]):.5f}")
        if save is not None and step % 500 == 499:
            save(model)
    return losses


# ----------------------------------------------------------------------------- checkpoint


def save_checkpoint(out: Path, vae, transformer, mean: torch.Tensor, std: torch.Tensor, meta: dict) -> None:
    """The diffusers layout the runtime loads; the latent statistics go into the VAE's config."""
    vae.register_to_config(latents_mean=[float(v) for v in mean], latents_std=[float(v) for v in std])
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out / "vae")
    transformer.save_pretrained(out / "transformer")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
    (out / "text_encoder").mkdir(exist_ok=True)
    encoder = {"_class_name": "HashPromptEncoder", "text_dim": TRANSFORMER["text_dim"], "positional": True}
    (out / "text_encoder" / "config.json").write_text(json.dumps(encoder, indent=2) + "\n")
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


PHASES = ("vae", "vae_long", "encode", "transformer", "assemble")
# The autoencoder's phases: the folder each starts from (None: a new model) and the one it writes.
VAE_PHASES: dict[str, tuple[str | None, str]] = {
    "vae": (None, "vae_short"),
    "vae_long": ("vae_short", "vae"),
}


def run_phase(phase: str, work: Path, out: Path, recipe: Recipe, seed: int, log=print) -> None:
    """One phase; each reads what the ones before it wrote in `work`."""
    offset = PHASES.index(phase)  # each phase draws from its own stream
    rng, gen = np.random.default_rng([seed, offset]), torch.Generator().manual_seed(seed * 10 + offset)
    torch.manual_seed(seed * 10 + offset)
    work.mkdir(parents=True, exist_ok=True)
    if phase in VAE_PHASES:
        start, saved = VAE_PHASES[phase]
        vae = per_frame_(build_vae()) if start is None else _load_vae(work / start)
        losses = train_vae(vae, recipe, rng, log, phase)
        vae.save_pretrained(work / saved)
        _write_losses(work / f"{phase}_losses.json", losses)
    elif phase == "encode":
        vae = _load_vae(work / "vae")
        latents, masks, captions = encode_dataset(vae, recipe, rng, log)
        mean = latents.mean(dim=(0, 1, 3, 4, 5))
        std = latents.std(dim=(0, 1, 3, 4, 5)).clamp_min(1e-3)
        torch.save({"latents": latents, "masks": masks, "captions": captions, "mean": mean, "std": std}, work / "dataset.pt")
        log(f"latent mean {[round(v, 4) for v in mean.tolist()]} std {[round(v, 4) for v in std.tolist()]}")
    elif phase == "transformer":
        data = torch.load(work / "dataset.pt")
        shape = (1, 1, -1, 1, 1, 1)
        normalised = (data["latents"] - data["mean"].view(shape)) / data["std"].view(shape)
        model = build_transformer()
        batches = ChunkBatches(normalised, data["masks"], data["captions"], recipe)
        snapshot = lambda m: m.save_pretrained(work / "transformer_snapshot")  # noqa: E731
        losses = train_transformer(model, batches, recipe, rng, gen, log, save=snapshot)
        model.save_pretrained(work / "transformer")
        _write_losses(work / "transformer_losses.json", losses)
    else:
        data = torch.load(work / "dataset.pt")
        meta = {
            "seed": seed,
            "recipe": vars(recipe),
            "torch": torch.__version__,
            "final": {
                name: float(np.mean(json.loads((work / f"{name}_losses.json").read_text())[-100:]))
                for name in (*VAE_PHASES, "transformer")
            },
        }
        transformer = _load_transformer(work / "transformer")
        save_checkpoint(out, _load_vae(work / "vae"), transformer, data["mean"], data["std"], meta)
        log(f"saved {out}: {json.dumps(meta)}")


def _load_vae(path: Path):
    return _loaded(build_vae(), path)


def _load_transformer(path: Path):
    return _loaded(build_transformer(), path)


def _loaded(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Weights saved by a phase, into a module built from this script's config (no accelerate needed)."""
    from safetensors.torch import load_file

    module.load_state_dict(load_file(path / "diffusion_pytorch_model.safetensors"), strict=True)
    return module


def _write_losses(path: Path, losses: list[float]) -> None:
    path.write_text(json.dumps([round(v, 6) for v in losses]) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=PHASES + ("all",))
    parser.add_argument("--work", type=Path, required=True, help="folder for the phases' intermediate files")
    parser.add_argument("--out", type=Path, default=Path("helios_rt/demo/checkpoint"))
    parser.add_argument("--seed", type=int, default=20261206)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (part of what makes a run repeat)")
    for name, value in vars(Recipe()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    recipe = Recipe(**{k: getattr(args, k) for k in vars(Recipe())})
    torch.set_num_threads(args.threads)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.0f} s] {args.phase}: {msg}", flush=True)

    for phase in PHASES if args.phase == "all" else (args.phase,):
        run_phase(phase, args.work, args.out, recipe, args.seed, log)


if __name__ == "__main__":
    main()
