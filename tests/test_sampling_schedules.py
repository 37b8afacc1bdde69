"""Schedules, DMD / Euler / UniPC steps against diffusers' HeliosDMDScheduler and HeliosScheduler."""

from __future__ import annotations

import json

import pytest
import torch

from helios_rt.sampling import (
    ScheduleConfig,
    UniPCState,
    base_sigmas,
    dmd_stage_plan,
    dmd_step,
    euler_step,
    helios_stage_plan,
    ori_start_sigma,
    unipc_step,
)

pytestmark = pytest.mark.oracle
diffusers = pytest.importorskip("diffusers")

DMD = {"_class_name": "HeliosDMDScheduler", "_diffusers_version": "0.42.1"}
DMD_DYN = {**DMD, "use_dynamic_shifting": True}
HELIOS = {"_class_name": "HeliosScheduler", "_diffusers_version": "0.42.1"}


def _exact(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours.double() - ref.double()).abs()
    assert diff.max().item() == 0.0, f"{what}: {int((diff > 0).sum())} entries differ, max {diff.max().item()}"


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str, atol: float = 1e-6) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, f"{what}: {ours.shape}/{ours.dtype} vs {ref.shape}"
    diff = (ours.double() - ref.double()).abs()
    bad = diff > atol
    assert not bad.any(), f"{what}: {int(bad.sum())} of {diff.numel()} differ, max {diff.max().item()}"


def _reference(cls_name: str, raw: dict):
    return getattr(diffusers, cls_name).from_config(raw)


@pytest.mark.parametrize("raw", [DMD, DMD_DYN, {**DMD, "shift": 3.0}, {**DMD, "gamma": 0.25}], ids=str)
@pytest.mark.parametrize("amplify", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_dmd_tables_match_reference(raw, amplify, steps, stage):
    cfg = ScheduleConfig.from_dict(raw)
    ref = _reference("HeliosDMDScheduler", raw)
    mu = 0.83 if cfg.use_dynamic_shifting else None
    ref.set_timesteps(steps, stage, mu=mu, is_amplify_first_chunk=amplify)
    plan = dmd_stage_plan(cfg, steps, stage, mu=mu, amplify=amplify)
    assert plan.num_steps == (2 * steps if amplify else steps)
    _exact(plan.timesteps, ref.timesteps, "timesteps")
    _exact(plan.sigmas, ref.sigmas, "sigmas")
    assert plan.model_timesteps.dtype == torch.int64
    _exact(plan.model_timesteps, ref.timesteps.to(torch.int64), "model timesteps")
    assert ori_start_sigma(cfg, stage) == ref.ori_start_sigmas[stage]


@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_dmd_single_stage_tables(shift):
    raw = {**DMD, "stages": 1, "stage_range": [0, 1], "shift": shift}
    ref = _reference("HeliosDMDScheduler", raw)
    ref.set_timesteps(3, None)
    plan = dmd_stage_plan(ScheduleConfig.from_dict(raw), 3, None)
    _exact(plan.timesteps, ref.timesteps, "timesteps")
    _exact(plan.sigmas, ref.sigmas, "sigmas")


def _dmd_reference_steps(ref, timesteps, x, start, outputs):
    for i, (t, v) in enumerate(zip(timesteps, outputs, strict=True)):
        x = ref.step(
            v,
            t,
            x,
            return_dict=False,
            cur_sampling_step=i,
            dmd_noisy_tensor=start,
            dmd_sigmas=ref.sigmas,
            dmd_timesteps=ref.timesteps,
            all_timesteps=timesteps,
        )[0]
    return x


@pytest.mark.parametrize("raw", [DMD, DMD_DYN], ids=["static", "dynamic"])
@pytest.mark.parametrize("stage", [0, 2])
def test_dmd_step_sequence_matches_reference(raw, stage):
    cfg = ScheduleConfig.from_dict(raw)
    ref = _reference("HeliosDMDScheduler", raw)
    ref.set_timesteps(3, stage, mu=1.1, is_amplify_first_chunk=True)
    plan = dmd_stage_plan(cfg, 3, stage, mu=1.1, amplify=True)
    g = torch.Generator().manual_seed(stage)
    shape = (2, 4, 3, 6, 10)
    start = torch.randn(shape, generator=g)
    outputs = [torch.randn(shape, generator=g) for _ in range(plan.num_steps)]
    expected = _dmd_reference_steps(ref, ref.timesteps, start.clone(), start, outputs)
    x, out = start.clone(), torch.empty(shape)
    for i, v in enumerate(outputs):
        # per-step scalars as 1-element tensors (graph-safe path), result through out=
        x = dmd_step(v, x, start, plan.sigma_t[i : i + 1], plan.sigma_next[i : i + 1], out=out).clone()
    _exact(x, expected, "DMD sequence")


def test_dmd_step_bf16_flow_rounds_like_reference():
    raw = DMD
    ref = _reference("HeliosDMDScheduler", raw)
    ref.set_timesteps(2, 1)
    plan = dmd_stage_plan(ScheduleConfig.from_dict(raw), 2, 1)
    g = torch.Generator().manual_seed(3)
    start = torch.randn(1, 4, 2, 4, 4, generator=g)
    outputs = [torch.randn(start.shape, generator=g).bfloat16() for _ in range(2)]
    x = start.clone()
    for i, v in enumerate(outputs):
        x = dmd_step(v, x, start, float(plan.sigma_t[i]), float(plan.sigma_next[i]))
    expected = _dmd_reference_steps(ref, ref.timesteps, start.clone(), start, outputs)
    assert expected.dtype == torch.bfloat16 and x.dtype == torch.float32  # last step: x0 in the flow's dtype
    _exact(x, expected.float(), "bf16 DMD sequence")


def _unipc_reference(ref, x, outputs):
    for t, v in zip(ref.timesteps, outputs, strict=True):
        x = ref.step(v, t, x, return_dict=False)[0]
    return x


UNIPC_CASES = {
    "default": {},
    "dynamic": {"use_dynamic_shifting": True},
    "order1": {"solver_order": 1},
    "order3": {"solver_order": 3},
    "bh1-no-lower-final": {"solver_type": "bh1", "lower_order_final": False},
    "disable-corrector": {"disable_corrector": [0, 2]},
    "not-flow-sigmas": {"use_flow_sigmas": False},
    "midpoint-alias": {"solver_type": "midpoint", "time_shift_type": "linear", "use_dynamic_shifting": True},
}


@pytest.mark.parametrize("case", list(UNIPC_CASES))
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_unipc_sequence_matches_reference(case, stage):
    raw = {**HELIOS, "scheduler_type": "unipc", **UNIPC_CASES[case]}
    cfg = ScheduleConfig.from_dict(raw)
    ref = _reference("HeliosScheduler", raw)
    ref.set_timesteps(6, stage, mu=0.9)
    plan = helios_stage_plan(cfg, 6, stage, mu=0.9)
    _exact(plan.timesteps, ref.timesteps, "timesteps")
    _exact(plan.sigmas, ref.sigmas, "sigmas")
    g = torch.Generator().manual_seed(10 + stage)
    shape = (1, 4, 3, 5, 7)
    x = torch.randn(shape, generator=g)
    outputs = [torch.randn(shape, generator=g) for _ in range(plan.num_steps)]
    expected = _unipc_reference(ref, x.clone(), outputs)
    state = UniPCState(cfg.solver_order, shape, torch.float32)
    ours, out = x.clone(), torch.empty(shape)
    for step, v in zip(plan.unipc, outputs, strict=True):
        ours = unipc_step(v, ours, state, step, out=out).clone()
    _close(ours, expected, f"UniPC {case} stage {stage}")


def test_unipc_base_pipeline_schedule():
    """The base pipeline: one stage, explicit sigmas, dynamic shift with mu; float64 latents."""
    raw = {**HELIOS, "stages": 1, "stage_range": [0, 1], "use_dynamic_shifting": True}
    cfg = ScheduleConfig.from_dict(raw)
    ref = _reference("HeliosScheduler", raw)
    ref.set_timesteps(8, sigmas=base_sigmas(8), mu=1.05)
    plan = helios_stage_plan(cfg, 8, sigmas=base_sigmas(8), mu=1.05, dtype=torch.float64, int_model_timesteps=False)
    _exact(plan.timesteps, ref.timesteps, "timesteps")
    _exact(plan.model_timesteps, ref.timesteps, "model timesteps")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 2, 4, 6, generator=g, dtype=torch.float64)
    outputs = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(8)]
    expected = _unipc_reference(ref, x.clone(), outputs)
    state = UniPCState(cfg.solver_order, tuple(x.shape), torch.float64)
    for step, v in zip(plan.unipc, outputs, strict=True):
        x = unipc_step(v, x, state, step)
    _close(x, expected, "UniPC base float64", atol=1e-12)


def _saved_config(scheduler, folder) -> dict:
    scheduler.save_config(folder)  # the scheduler_config.json a checkpoint carries
    return json.loads((folder / "scheduler_config.json").read_text())


@pytest.mark.parametrize("stages", [1, 2])
def test_unused_stage_range_entries_are_ignored_as_diffusers_does(stages, tmp_path):
    """A config saved by `HeliosScheduler(stages=1)` keeps the default four `stage_range` entries;
    diffusers reads the first stages + 1 of them, and so do we (same tables, bit for bit)."""
    raw = _saved_config(diffusers.HeliosScheduler(stages=stages, use_dynamic_shifting=stages == 1), tmp_path)
    assert len(raw["stage_range"]) == 4, "the default this test is about"
    cfg = ScheduleConfig.from_dict(raw)
    assert cfg.stage_range == tuple(float(v) for v in raw["stage_range"][: stages + 1])
    for stage in range(stages):
        ref = _reference("HeliosScheduler", raw)
        if stages == 1:  # the base pipeline: one global table from explicit sigmas
            ref.set_timesteps(8, sigmas=base_sigmas(8), mu=1.05)
            plan = helios_stage_plan(cfg, 8, sigmas=base_sigmas(8), mu=1.05, dtype=torch.float64,
                                     int_model_timesteps=False)  # fmt: skip
        else:  # per-stage tables bounded by stage_range[stage] and [stage + 1]
            ref.set_timesteps(6, stage, mu=0.9)
            plan = helios_stage_plan(cfg, 6, stage, mu=0.9)
        _exact(plan.timesteps, ref.timesteps, f"timesteps (stages={stages}, stage {stage})")
        _exact(plan.sigmas, ref.sigmas, f"sigmas (stages={stages}, stage {stage})")


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("stage", [0, 2])
def test_euler_sequence_matches_reference(dynamic, stage):
    raw = {**HELIOS, "scheduler_type": "euler", "use_dynamic_shifting": dynamic}
    cfg = ScheduleConfig.from_dict(raw)
    ref = _reference("HeliosScheduler", raw)
    ref.set_timesteps(5, stage, mu=0.7)
    plan = helios_stage_plan(cfg, 5, stage, mu=0.7)
    g = torch.Generator().manual_seed(stage)
    x = torch.randn(1, 4, 2, 6, 6, generator=g)
    outputs = [torch.randn(x.shape, generator=g) for _ in range(5)]
    expected = _unipc_reference(ref, x.clone(), outputs)
    for i, v in enumerate(outputs):
        x = euler_step(v, x, plan.sigma_t[i], plan.sigma_next[i])
    _exact(x, expected, "Euler sequence")


# ------------------------------------------------------------------ config and bad inputs


def test_config_reads_every_value_and_ignores_bookkeeping():
    raw = {**DMD, "_use_default_values": ["gamma"], "gamma": 0.2, "stage_range": [0, 0.5, 1], "stages": 2}
    cfg = ScheduleConfig.from_dict(raw)
    assert (cfg.kind, cfg.gamma, cfg.stages, cfg.stage_range) == ("dmd", 0.2, 2, (0.0, 0.5, 1.0))
    assert cfg.time_shift_type == "linear"
    helios = ScheduleConfig.from_dict({**HELIOS, "scheduler_type": "euler", "base_shift": 0.6})
    assert ScheduleConfig.from_dict({"gamma": 0.3}, kind="dmd") == ScheduleConfig(kind="dmd", gamma=0.3)
    assert (helios.kind, helios.time_shift_type, helios.base_shift) == ("euler", "exponential", 0.6)


@pytest.mark.parametrize(
    "raw, key",
    [
        ({**DMD, "solver_order": 2}, "solver_order"),
        ({**HELIOS, "thresholding": True}, "thresholding"),
        ({**HELIOS, "predict_x0": False}, "predict_x0"),
        ({**HELIOS, "some_new_knob": 1}, "some_new_knob"),
        ({**DMD, "prediction_type": "epsilon"}, "prediction_type"),
        ({**DMD, "stages": 4}, "stage_range"),  # the default four boundaries cannot bound five stages
        ({**HELIOS, "scheduler_type": "dmd"}, "scheduler_type"),
        ({**DMD, "shift": 2.0, "use_dynamic_shifting": True}, "shift"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "_class_name"),
        ({"gamma": 0.3}, "_class_name"),
    ],
)
def test_config_rejects_math_changing_keys(raw, key):
    with pytest.raises(ValueError, match=key):
        ScheduleConfig.from_dict(raw)


def test_bad_plan_and_step_inputs():
    cfg = ScheduleConfig.from_dict(DMD_DYN)
    with pytest.raises(ValueError, match="stage=3"):
        dmd_stage_plan(cfg, 1, 3)
    with pytest.raises(ValueError, match="steps=0"):
        dmd_stage_plan(cfg, 0, 0)
    with pytest.raises(ValueError, match="mu is required"):
        dmd_stage_plan(cfg, 1, 0)
    with pytest.raises(ValueError, match="HeliosScheduler config"):
        helios_stage_plan(cfg, 1, 0)
    x = torch.zeros(1, 4, 2, 4, 4)
    with pytest.raises(ValueError, match="shapes must match"):
        dmd_step(x, x, torch.zeros(1, 4, 2, 4, 8), 0.5, 0.2)
    with pytest.raises(ValueError, match="one element"):
        dmd_step(x, x, x, torch.tensor([0.5, 0.4]), 0.2)
    with pytest.raises(ValueError, match="out has shape"):
        euler_step(x, x, 0.5, 0.2, out=torch.empty(1))


def test_plan_to_moves_every_table():
    cfg = ScheduleConfig.from_dict({**HELIOS, "solver_order": 3})
    plan = helios_stage_plan(cfg, 4, 1).to("meta")
    tensors = [plan.timesteps, plan.model_timesteps, plan.sigmas, plan.sigma_t, plan.sigma_next]
    for step in plan.unipc:
        tensors += [step.sigma, *step.cp, *step.r_p, *step.r_c]
        tensors += [t for t in (*step.cc, step.rho_c, step.rho_p) if t is not None]
    assert len(tensors) > 20 and all(t.device.type == "meta" for t in tensors)


def test_cfg_zero_star_is_a_pyramid_option() -> None:
    """diffusers' base HeliosPipeline has no CFG-Zero*: a base checkpoint that names it guides with plain CFG."""
    from helios_rt import EngineConfig
    from helios_rt.sampling.chunk import SamplingSpec

    scheduler = {"_class_name": "HeliosScheduler", "num_train_timesteps": 1000, "shift": 1.0, "stages": 1}
    index = {"is_cfg_zero_star": True, "is_distilled": False}
    base = SamplingSpec.from_checkpoint({**index, "_class_name": "HeliosPipeline"}, scheduler, EngineConfig())
    assert not base.cfg_zero_star
    pyramid = SamplingSpec.from_checkpoint(
        {**index, "_class_name": "HeliosPyramidPipeline"}, {**scheduler, "stages": 3}, EngineConfig()
    )
    assert pyramid.cfg_zero_star
