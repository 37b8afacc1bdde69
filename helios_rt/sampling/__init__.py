"""helios_rt.sampling: the Helios samplers, planned on the host and stepped on the device.

- schedules: scheduler configs, per-stage sigma/timestep plans, DMD / Euler / UniPC steps
- pyramid: chunk noise, stage-0 downsampling, stage transitions with block noise, the chunk plan
- guidance: CFG and CFG-Zero*
- history: the fixed-size latent memory and the I2V/V2V conditioning noise
"""

from .guidance import cfg_combine, cfg_zero_star, optimized_scale, split_cond_uncond, zero_init_steps
from .history import HistoryLayout, HistoryMemory, augment_image_latents, augment_video_latents
from .pyramid import (
    PyramidPlan,
    block_noise_factor,
    chunk_noise,
    downsample_noise,
    normal_noise,
    plan_pyramid,
    sample_block_noise,
    stage_hw,
    stage_mu,
    stage_transition,
    transition_coefficients,
)
from .schedules import (
    ScheduleConfig,
    StagePlan,
    UniPCState,
    UniPCStepPlan,
    base_sigmas,
    calculate_shift,
    dmd_stage_plan,
    dmd_step,
    euler_step,
    helios_stage_plan,
    ori_start_sigma,
    unipc_step,
)

__all__ = [
    "HistoryLayout",
    "HistoryMemory",
    "PyramidPlan",
    "ScheduleConfig",
    "StagePlan",
    "UniPCState",
    "UniPCStepPlan",
    "augment_image_latents",
    "augment_video_latents",
    "base_sigmas",
    "block_noise_factor",
    "calculate_shift",
    "cfg_combine",
    "cfg_zero_star",
    "chunk_noise",
    "dmd_stage_plan",
    "dmd_step",
    "downsample_noise",
    "euler_step",
    "helios_stage_plan",
    "normal_noise",
    "optimized_scale",
    "ori_start_sigma",
    "plan_pyramid",
    "sample_block_noise",
    "split_cond_uncond",
    "stage_hw",
    "stage_mu",
    "stage_transition",
    "transition_coefficients",
    "unipc_step",
    "zero_init_steps",
]
