"""helios_rt.sampling: the Helios samplers, planned on the host and stepped on the device.

- schedules: scheduler configs, per-stage sigma/timestep plans, DMD / Euler / UniPC steps
- pyramid: chunk noise, stage-0 downsampling, stage transitions with block noise, the chunk plan
- guidance: CFG and CFG-Zero*
- history: the fixed-size latent memory and the I2V/V2V conditioning noise
- overrides: the checkpoint's sampling values (history sizes, chunk length, ...) and expert overrides

Names are imported on first use (PEP 562), so that `helios_rt.config` can hold a `SamplingOverrides`
without `import helios_rt` importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES: dict[str, str] = {
    "CHECKPOINT_VALUES": "overrides",
    "HistoryLayout": "history",
    "HistoryMemory": "history",
    "PyramidPlan": "pyramid",
    "SamplingOverrides": "overrides",
    "ScheduleConfig": "schedules",
    "StagePlan": "schedules",
    "UniPCState": "schedules",
    "UniPCStepPlan": "schedules",
    "augment_image_latents": "history",
    "augment_video_latents": "history",
    "base_sigmas": "schedules",
    "block_noise_factor": "pyramid",
    "calculate_shift": "schedules",
    "cfg_combine": "guidance",
    "cfg_zero_star": "guidance",
    "chunk_noise": "pyramid",
    "dmd_stage_plan": "schedules",
    "dmd_step": "schedules",
    "downsample_noise": "pyramid",
    "euler_step": "schedules",
    "helios_stage_plan": "schedules",
    "normal_noise": "pyramid",
    "optimized_scale": "guidance",
    "ori_start_sigma": "schedules",
    "plan_pyramid": "pyramid",
    "sample_block_noise": "pyramid",
    "split_cond_uncond": "guidance",
    "stage_hw": "pyramid",
    "stage_mu": "pyramid",
    "stage_transition": "pyramid",
    "transition_coefficients": "pyramid",
    "unipc_step": "schedules",
    "zero_init_steps": "guidance",
}

_SUBMODULES = frozenset({"chunk", "guidance", "history", "noise", "overrides", "pyramid", "schedules"})
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # `helios_rt.sampling.schedules` as an attribute, as before
        return importlib.import_module(f"{__name__}.{name}")
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'helios_rt.sampling' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
