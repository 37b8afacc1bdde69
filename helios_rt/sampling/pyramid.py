"""The pyramid of the Helios chunk sampler: stage-0 noise, stage transitions, block noise, the plan.

A chunk is denoised at 1/4, 1/2 and full latent resolution (for 3 stages). Stage 0 starts from the
chunk's Gaussian noise, bilinearly downsampled; each later stage starts from the previous stage's
result, nearest-upsampled 2x and re-noised with noise that is correlated inside each 2x2 patch
("block noise"), which removes the block artifacts a nearest upsample would leave.

Random draws follow the reference pipeline's order and devices exactly (chunk noise, then one block
noise per transition, all from one explicit `torch.Generator`), so a seed gives the same chunk as
diffusers. `plan_pyramid` gathers every host-side number of a chunk (schedules, mu, alpha/beta,
sizes) so the chunk loop only launches tensor work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .schedules import ScheduleConfig, StagePlan, calculate_shift, dmd_stage_plan, helios_stage_plan, ori_start_sigma

Tensor = torch.Tensor


def normal_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str | None) -> Tensor:
    """float32 standard normal drawn on the generator's device, then moved: diffusers' randn_tensor stream."""
    z = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return z.to(device) if device is not None else z


def chunk_noise(
    batch: int, channels: int, frames: int, height: int, width: int, generator: torch.Generator, device=None
) -> Tensor:
    """The chunk's full-resolution start noise `[B, C, T, H, W]` float32 (one randn, as prepare_latents)."""
    return normal_noise((batch, channels, frames, height, width), generator, device)


def stage_hw(height: int, width: int, stages: int) -> tuple[tuple[int, int], ...]:
    """Latent (H, W) of every stage, coarsest first; the full size must halve cleanly `stages - 1` times."""
    f = 2 ** (stages - 1)
    if height % f or width % f:
        raise ValueError(
            f"latent size {height}x{width} must be divisible by {f} for {stages} pyramid stages "
            f"(pixel size divisible by {8 * f}); otherwise the last stage would not return to full size"
        )
    return tuple((height // f * 2**s, width // f * 2**s) for s in range(stages))


def downsample_noise(noise: Tensor, stages: int, out: Tensor | None = None) -> Tensor:
    """Stage-0 start point: bilinear 2x downsample `stages - 1` times, each scaled by 2 to keep unit variance.

    noise: `[B, C, T, H, W]`; returns `[B, C, T, H / 2^(stages-1), W / 2^(stages-1)]`. Each frame is
    resampled on its own (frames folded into the batch), as the reference does.
    """
    if noise.dim() != 5:
        raise ValueError(f"noise must be [B, C, T, H, W], got shape {tuple(noise.shape)}")
    b, c, t, h, w = noise.shape
    stage_hw(h, w, stages)
    x = noise.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    for _ in range(stages - 1):
        h, w = h // 2, w // 2
        x = F.interpolate(x, size=(h, w), mode="bilinear") * 2
    x = x.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)
    if out is None:
        return x
    return out.copy_(x)


def transition_coefficients(cfg: ScheduleConfig, stage: int) -> tuple[float, float]:
    """alpha, beta of the transition into `stage` (>= 1): `x = alpha * upsample(x) + beta * block_noise`.

    Chosen so the re-noised latent sits at the stage's corrected start sigma with the variance the
    block noise's correlation gamma expects.
    """
    if stage < 1:
        raise ValueError(f"stage={stage}: transitions lead into stages >= 1")
    signal = 1 - ori_start_sigma(cfg, stage)
    alpha = 1 / (math.sqrt(1 + (1 / cfg.gamma)) * (1 - signal) + signal)
    return alpha, alpha * (1 - signal) / math.sqrt(cfg.gamma)


def block_noise_factor(gamma: float, patch_hw: tuple[int, int] = (2, 2), device=None) -> Tensor:
    """Lower Cholesky factor of `(1 + gamma) I - gamma 11^T + 1e-8 I`, float32 `[ph*pw, ph*pw]`.

    Constant for a config: compute once (on the host, then move). Factored in float32 like the
    reference. At gamma = 1/(n-1), n = ph*pw (1/3 for 2x2, the default) the covariance is singular
    by design (the noise has zero patch mean, so it leaves the upsampled patch means alone) and the
    1e-8 jitter vanishes in float32 (1 + 1e-8 == 1): whether float32 Cholesky factors it depends on the CPU
    (LAPACK path), for the reference as for us. Only where it fails the same matrix is factored in
    float64, where the jitter holds; the result differs from any float32 factor by O(1e-4) in the
    last column only. A gamma above 1/(n-1) is not a covariance and raises ValueError.
    """
    n = patch_hw[0] * patch_hw[1]
    if n < 2 or not 0 < gamma <= 1 / (n - 1):
        raise ValueError(f"gamma={gamma}: block-noise covariance needs 0 < gamma <= 1/(ph*pw - 1) and ph*pw >= 2")

    def cov(dtype: torch.dtype) -> Tensor:
        eye = torch.eye(n, device=device, dtype=dtype)
        return eye * (1 + gamma) - torch.ones(n, n, device=device, dtype=dtype) * gamma + eye * 1e-8

    factor, info = torch.linalg.cholesky_ex(cov(torch.float32))
    if int(info) != 0:
        factor = torch.linalg.cholesky(cov(torch.float64)).float()
    return factor


def sample_block_noise(
    batch: int,
    channels: int,
    frames: int,
    height: int,
    width: int,
    gamma: float,
    patch: tuple[int, int, int],
    generator: torch.Generator,
    device: torch.device | str | None = None,
    factor: Tensor | None = None,
) -> Tensor:
    """Noise `[B, C, T, H, W]` float32, unit variance, correlated (-gamma/(1+gamma)) inside each patch.

    Arguments as the pipeline's `sample_block_noise` (patch: the transformer's (pt, ph, pw); only ph,
    pw matter). Draws one `[blocks, ph*pw]` normal on the generator's device, moves it to `device`
    and multiplies by the Cholesky factor (`block_noise_factor`, pass it to skip recomputing), so
    the stream matches the reference for the same generator state.
    """
    factor = block_noise_factor(gamma, patch[1:], device) if factor is None else factor.to(device)
    z = normal_noise(block_normals_shape(batch, channels, frames, height, width, patch), generator, device)
    return correlate_block_noise(z, factor, (batch, channels, frames, height, width), patch)


def block_normals_shape(
    batch: int, channels: int, frames: int, height: int, width: int, patch: tuple[int, int, int]
) -> tuple[int, int]:
    """`[blocks, ph*pw]`: the standard normals one block-noise draw takes (only ph, pw of `patch` matter)."""
    _, ph, pw = patch
    if height % ph or width % pw:
        raise ValueError(f"block noise size {height}x{width} must be divisible by the patch {ph}x{pw}")
    return (batch * channels * frames * (height // ph) * (width // pw), ph * pw)


def correlate_block_noise(z: Tensor, factor: Tensor, shape: tuple[int, ...], patch: tuple[int, int, int]) -> Tensor:
    """Standard normals `[blocks, ph*pw]` -> block noise `[B, C, T, H, W]` through the Cholesky factor.

    Split from the draw so that a static program can take its normals from a buffer filled outside it.
    """
    b, c, t, h, w = shape
    _, ph, pw = patch
    noise = (z @ factor.T).view(b, c, t, h // ph, w // pw, ph, pw)
    return noise.permute(0, 1, 2, 3, 5, 4, 6).reshape(b, c, t, h, w)


def stage_transition(x: Tensor, block_noise: Tensor, alpha: float, beta: float, out: Tensor | None = None) -> Tensor:
    """Nearest 2x spatial upsample of x, then `alpha * up + beta * block_noise` (the pipeline's rounding).

    x: `[B, C, T, H, W]`; block_noise: `[B, C, T, 2H, 2W]` in the dtype the reference uses (it casts
    the noise to the transformer dtype before mixing). out: `[B, C, T, 2H, 2W]`, the result type of
    x and block_noise. The upsample is written straight into out, so only `beta * block_noise` is
    a temporary.
    """
    b, c, t, h, w = x.shape
    if tuple(block_noise.shape) != (b, c, t, 2 * h, 2 * w):
        raise ValueError(f"block_noise has shape {tuple(block_noise.shape)}, expected {(b, c, t, 2 * h, 2 * w)}")
    if out is None:
        out = torch.empty((b, c, t, 2 * h, 2 * w), dtype=torch.result_type(x, block_noise), device=x.device)
    elif tuple(out.shape) != (b, c, t, 2 * h, 2 * w) or not out.is_contiguous():
        raise ValueError(f"out must be contiguous with shape {(b, c, t, 2 * h, 2 * w)}, got {tuple(out.shape)}")
    up = out.view(b, c, t, h, 2, w, 2)
    up.copy_((x * alpha).reshape(b, c, t, h, 1, w, 1).expand_as(up))
    return out.add_(beta * block_noise)


@dataclass(frozen=True, eq=False)
class PyramidPlan:
    """Host plan of one chunk: per stage its schedule, latent size and the transition into it.

    stages[s]: StagePlan; hw[s]: latent (H, W) of stage s; alpha_beta[s]: the transition into stage
    s (None for stage 0); num_steps: total transformer forwards of one conditional branch.
    """

    config: ScheduleConfig
    stages: tuple[StagePlan, ...]
    hw: tuple[tuple[int, int], ...]
    alpha_beta: tuple[tuple[float, float] | None, ...]
    frames: int
    patch: tuple[int, int, int]

    @property
    def num_steps(self) -> int:
        return sum(s.num_steps for s in self.stages)


def stage_mu(cfg: ScheduleConfig, stage: int, frames: int, hw: tuple, patch: tuple[int, int, int]) -> float:
    """mu of `stage` as the pipeline computes it: from the token count of the latents it holds *before*
    the stage's upsample, i.e. stage s >= 1 uses the size of stage s - 1."""
    h, w = hw[max(stage - 1, 0)]
    return calculate_shift(cfg, (w * h * frames) // (patch[0] * patch[1] * patch[2]))


def plan_pyramid(
    cfg: ScheduleConfig,
    steps: tuple[int, ...],
    frames: int,
    height: int,
    width: int,
    patch: tuple[int, int, int] = (1, 2, 2),
    amplify_first_chunk: bool = False,
    dtype: torch.dtype = torch.float32,
) -> PyramidPlan:
    """Plan one chunk of the pyramid pipeline (HeliosPyramidPipeline): steps[s] steps in stage s.

    height, width: full latent size. amplify_first_chunk: the distilled pipeline's first chunk
    (doubles the steps of every DMD stage; HeliosScheduler ignores it, as the reference does).
    """
    if len(steps) != cfg.stages:
        raise ValueError(f"steps={tuple(steps)} has {len(steps)} entries, the config has {cfg.stages} stages")
    hw = stage_hw(height, width, len(steps))
    plans, ab = [], []
    for s, n in enumerate(steps):
        mu = stage_mu(cfg, s, frames, hw, patch)
        if cfg.kind == "dmd":
            plans.append(dmd_stage_plan(cfg, n, s, mu=mu, amplify=amplify_first_chunk))
        else:
            plans.append(helios_stage_plan(cfg, n, s, mu=mu, dtype=dtype))
        ab.append(transition_coefficients(cfg, s) if s else None)
    return PyramidPlan(cfg, tuple(plans), hw, tuple(ab), frames, tuple(patch))
