"""Pyramid sampling against diffusers' HeliosPyramidPipeline.

The strongest check drives the real pipeline (tiny transformer, VAE decode stubbed, latent output)
and our planned loop with the same seed, comparing every transformer call's inputs and the final
latents bit for bit: noise draws and their order, downsampling, transitions, block noise, DMD
tables, mu and the history windows all have to agree.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from helios_rt.sampling import (
    HistoryLayout,
    HistoryMemory,
    ScheduleConfig,
    UniPCState,
    augment_image_latents,
    augment_video_latents,
    block_noise_factor,
    cfg_combine,
    cfg_zero_star,
    chunk_noise,
    dmd_stage_plan,
    dmd_step,
    downsample_noise,
    euler_step,
    optimized_scale,
    plan_pyramid,
    sample_block_noise,
    split_cond_uncond,
    stage_hw,
    stage_mu,
    stage_transition,
    transition_coefficients,
    unipc_step,
    zero_init_steps,
)

pytestmark = pytest.mark.oracle
diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.helios.pipeline_helios_pyramid import calculate_shift  # noqa: E402

C, H, W, CHUNK = 4, 8, 16, 9
SCHED = {"_class_name": "HeliosDMDScheduler", "use_dynamic_shifting": True, "gamma": 0.25}


def _max_diff(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    d = (a.double() - b.double()).abs()
    assert d.max().item() == 0.0, f"{what}: {int((d > 0).sum())} of {d.numel()} differ, max {d.max().item()}"


def build_pipeline(sched: dict = SCHED, zero_star: bool = False):
    """A HeliosPyramidPipeline on tiny components; records every transformer call's inputs."""
    torch.manual_seed(0)
    tr = diffusers.HeliosTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=C, text_dim=16, freq_dim=16,
        ffn_dim=16, num_layers=1, rope_dim=(2, 2, 4), is_amplify_history=True,
    ).eval()  # fmt: skip
    vae = diffusers.AutoencoderKLWan(
        base_dim=4, z_dim=C, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * C, latents_std=[1.0] * C
    )
    # the loop decodes every chunk; the latents are what is compared, so decoding is stubbed out
    vae.decode = lambda z, return_dict=False: (torch.zeros(z.shape[0], 3, 4 * z.shape[2] - 3, 1, 1),)
    scheduler = getattr(diffusers, sched["_class_name"]).from_config(sched)
    distilled = sched["_class_name"] == "HeliosDMDScheduler"
    pipe = diffusers.HeliosPyramidPipeline(
        None, None, vae, scheduler, tr, is_distilled=distilled, is_cfg_zero_star=zero_star
    )
    pipe.set_progress_bar_config(disable=True)
    calls: list[dict] = []
    forward = tr.forward

    def spy(**kw):
        calls.append({k: v.clone() for k, v in kw.items() if torch.is_tensor(v)})
        return forward(**kw)

    tr.forward = spy
    return pipe, forward, calls


class OurSampler:
    """Our sampler: plans on the host, tensor steps, fixed-size history; records transformer inputs."""

    def __init__(self, forward, cfg: ScheduleConfig, text, negative=None, scale=1.0, zero_star=False):
        self.forward, self.cfg, self.text, self.negative = forward, cfg, text, negative
        self.scale, self.zero_star, self.calls = scale, zero_star, []

    def predict(self, kw: dict, stage: int, i: int, num_steps: int) -> torch.Tensor:
        texts = [self.text] if self.negative is None else [self.text, self.negative]
        preds = []
        for text in texts:  # the pipeline runs cond and uncond as two forwards
            kw = {**kw, "encoder_hidden_states": text}
            self.calls.append({k: v.clone() for k, v in kw.items()})
            preds.append(self.forward(**kw, return_dict=False)[0])
        if self.negative is None:
            return preds[0]
        if self.zero_star:
            zero = zero_init_steps(stage, num_steps)[i]  # 0-dim bool tensor: the graph-safe form
            return cfg_zero_star(preds[0], preds[1], self.scale, zero=zero)
        return cfg_combine(preds[0], preds[1], self.scale)

    def step(self, stage, i, v, x, start, state):
        if stage.kind == "dmd":
            return dmd_step(v, x, start, stage.sigma_t[i], stage.sigma_next[i])
        if stage.kind == "unipc":
            return unipc_step(v, x, state, stage.unipc[i])
        return euler_step(v, x, stage.sigma_t[i], stage.sigma_next[i])

    def run(self, steps, chunks, seed, amplify=False, image=None, video=None) -> torch.Tensor:
        cfg, gen = self.cfg, torch.Generator().manual_seed(seed)
        layout = HistoryLayout((16, 2, 1), CHUNK, keep_first_frame=True)
        mem = HistoryMemory(layout, 1, C, H, W)
        if image is not None:
            mem.init_image(*augment_image_latents(*image, gen))
        if video is not None:
            mem.init_video(*augment_video_latents(*video, gen, chunk_frames=CHUNK))
        names = ("latents_history_short", "latents_history_mid", "latents_history_long")
        fixed = {**layout.indices(), **dict(zip(names, mem.windows(), strict=True))}
        outs = []
        for k in range(chunks):
            plan = plan_pyramid(cfg, steps, CHUNK, H, W, patch=(1, 2, 2), amplify_first_chunk=amplify and k == 0)
            x = downsample_noise(chunk_noise(1, C, CHUNK, H, W, gen), cfg.stages)
            for s, stage in enumerate(plan.stages):
                if s:
                    h, w = plan.hw[s]
                    noise = sample_block_noise(1, C, CHUNK, h, w, cfg.gamma, plan.patch, gen)
                    x = stage_transition(x, noise, *plan.alpha_beta[s])
                start, state = x, UniPCState(cfg.solver_order, tuple(x.shape), x.dtype)
                for i in range(stage.num_steps):
                    kw = dict(hidden_states=x, timestep=stage.model_timesteps[i : i + 1], **fixed)
                    v = self.predict(kw, s, i, stage.num_steps)
                    x = self.step(stage, i, v, x, start, state)
            mem.push(x)
            outs.append(x)
        return torch.cat(outs, dim=2)


def compare_runs(
    steps, chunks, seed, amplify, sched=SCHED, image=None, video=None, pipe_kwargs=None, scale=1.0, zero_star=False
):
    pipe, forward, ref_calls = build_pipeline(sched, zero_star)
    g = torch.Generator().manual_seed(99)
    text, negative = torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    negative = negative if scale > 1 else None
    ref = pipe(
        prompt_embeds=text, negative_prompt_embeds=negative, height=8 * H, width=8 * W, num_frames=33 * chunks,
        guidance_scale=scale, generator=torch.Generator().manual_seed(seed),
        pyramid_num_inference_steps_list=list(steps), is_amplify_first_chunk=amplify, output_type="latent",
        return_dict=False, **(pipe_kwargs or {}),
    )[0]  # fmt: skip
    ours = OurSampler(forward, ScheduleConfig.from_dict(sched), text, negative, scale, zero_star)
    with torch.no_grad():
        latents = ours.run(steps, chunks, seed, amplify, image, video)
    assert len(ours.calls) == len(ref_calls)
    for n, (a, b) in enumerate(zip(ours.calls, ref_calls, strict=True)):
        assert a.keys() == b.keys()
        for key in a:
            _max_diff(a[key], b[key], f"call {n} {key}")
    _max_diff(latents, ref[:, :, -latents.shape[2] :], "generated latents")


@pytest.mark.parametrize(
    "kind, zero_star",
    [("unipc", True), ("unipc", False), ("euler", True)],
    ids=["unipc-zero-star", "unipc-cfg", "euler"],
)
def test_mid_pipeline_with_guidance_matches(kind, zero_star):
    """Helios-Mid's path: HeliosScheduler per stage, two forwards per step, CFG-Zero* with zero-init."""
    sched = {"_class_name": "HeliosScheduler", "scheduler_type": kind, "gamma": 0.25, "use_dynamic_shifting": True}
    compare_runs((3, 2, 2), chunks=2, seed=5, amplify=True, sched=sched, scale=5.0, zero_star=zero_star)


@pytest.mark.parametrize(
    "steps, amplify, sched",
    [((1, 1, 1), True, SCHED), ((2, 1, 1), False, {**SCHED, "use_dynamic_shifting": False})],
    ids=["t2v-amplified-dynamic", "t2v-static"],
)
def test_text_to_video_matches_pipeline(steps, amplify, sched):
    compare_runs(steps, chunks=3, seed=7, amplify=amplify, sched=sched)


def test_image_to_video_matches_pipeline():
    g = torch.Generator().manual_seed(1)
    image, fake = torch.randn(1, C, 1, H, W, generator=g), torch.randn(1, C, 1, H, W, generator=g)
    kw = dict(image_latents=image, fake_image_latents=fake)
    compare_runs((1, 1, 1), chunks=2, seed=3, amplify=True, image=(image, fake), pipe_kwargs=kw)


@pytest.mark.parametrize("video_chunks", [1, 3])
def test_video_to_video_matches_pipeline(video_chunks):
    g = torch.Generator().manual_seed(2)
    first, video = torch.randn(1, C, 1, H, W, generator=g), torch.randn(1, C, CHUNK * video_chunks, H, W, generator=g)
    kw = dict(image_latents=first, video_latents=video, add_noise_to_image_latents=False)
    compare_runs((1, 1, 1), chunks=2, seed=4, amplify=False, video=(first, video), pipe_kwargs=kw)


# ------------------------------------------------------------------ pieces


def _stand_in(gamma: float):
    """What HeliosPyramidPipeline.sample_block_noise reads from `self`."""
    return types.SimpleNamespace(scheduler=types.SimpleNamespace(config=types.SimpleNamespace(gamma=gamma)))


@pytest.mark.parametrize("shape", [(1, 4, 9, 4, 6), (2, 3, 2, 10, 14)])
@pytest.mark.parametrize("gamma", [0.25, 0.1])
def test_block_noise_matches_pipeline_and_consumes_the_same_randoms(shape, gamma):
    ref_gen, our_gen = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    ref = diffusers.HeliosPyramidPipeline.sample_block_noise(_stand_in(gamma), *shape, (1, 2, 2), "cpu", ref_gen)
    ours = sample_block_noise(*shape, gamma, (1, 2, 2), our_gen, device="cpu", factor=block_noise_factor(gamma))
    _max_diff(ours, ref, "block noise")
    assert torch.equal(ref_gen.get_state(), our_gen.get_state())


def test_block_noise_at_the_singular_default_gamma(monkeypatch):
    """gamma = 1/3 (the scheduler default) makes the covariance singular by design. Our factor gives
    unit-variance noise with (almost) zero patch mean on any CPU, and the same draws as the reference:
    where the reference's float32 Cholesky factors the matrix, bit for bit (ours tries float32 first);
    where it does not (that depends on the CPU's LAPACK path), the reference's arithmetic run with our
    factor, so the random stream, the layout and the product are still checked here."""
    shape = (1, 8, 16, 64, 64)
    ours_gen = torch.Generator().manual_seed(0)
    noise = sample_block_noise(*shape, 1 / 3, (1, 2, 2), ours_gen)
    patch_mean = noise.reshape(1, 8, 16, 32, 2, 32, 2).mean(dim=(4, 6))
    # the float64 fallback's last pivot is sqrt(4e-8) = 2e-4: a patch mean of 2e-4 * z / 4, |z| < 5.5 here
    assert patch_mean.abs().max().item() < 1e-3
    assert abs(noise.var().item() - 1.0) < 0.01

    small = (1, 2, 3, 4, 6)
    ours = sample_block_noise(*small, 1 / 3, (1, 2, 2), torch.Generator().manual_seed(5))
    factor = block_noise_factor(1 / 3)
    cholesky = torch.linalg.cholesky
    try:
        cholesky(torch.eye(4) * (4 / 3) - torch.ones(4, 4) / 3 + torch.eye(4) * 1e-8)
    except RuntimeError:  # this CPU cannot factor it in float32: hand the reference our factor
        monkeypatch.setattr(torch.linalg, "cholesky", lambda a: factor.to(a.dtype))
    ref_gen = torch.Generator().manual_seed(5)
    ref = diffusers.HeliosPyramidPipeline.sample_block_noise(_stand_in(1 / 3), *small, (1, 2, 2), "cpu", ref_gen)
    assert torch.equal(ours, ref)
    assert torch.isfinite(factor).all() and torch.equal(factor, torch.tril(factor))


def test_stage_transition_matches_pipeline_arithmetic_and_out_path():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 5, 7, generator=g)
    noise = torch.randn(2, 3, 4, 10, 14, generator=g)
    cfg = ScheduleConfig.from_dict(SCHED)
    alpha, beta = transition_coefficients(cfg, 2)
    # the pipeline: fold frames into the batch, nearest interpolate, then alpha * x + beta * noise
    up = F.interpolate(x.permute(0, 2, 1, 3, 4).reshape(8, 3, 5, 7), size=(10, 14), mode="nearest")
    ref = alpha * up.reshape(2, 4, 3, 10, 14).permute(0, 2, 1, 3, 4) + beta * noise
    _max_diff(stage_transition(x, noise, alpha, beta), ref, "transition")
    out = torch.full((2, 3, 4, 10, 14), float("nan"))
    assert stage_transition(x, noise, alpha, beta, out=out) is out
    _max_diff(out, ref, "transition out=")


def test_transition_coefficients_match_pipeline_formula():
    ref = diffusers.HeliosDMDScheduler.from_config(SCHED)
    cfg = ScheduleConfig.from_dict(SCHED)
    for stage in (1, 2):
        signal = 1 - ref.ori_start_sigmas[stage]
        alpha = 1 / ((1 + 1 / ref.config.gamma) ** 0.5 * (1 - signal) + signal)
        assert transition_coefficients(cfg, stage) == (alpha, alpha * (1 - signal) / ref.config.gamma**0.5)
        # the corrected start sigma of the stage is where the transition lands: 1 - alpha * signal
        assert 1 - alpha * signal == pytest.approx(ref.start_sigmas[stage], abs=1e-12)


def test_plan_uses_the_pipelines_mu_per_stage():
    cfg = ScheduleConfig.from_dict(SCHED)
    plan = plan_pyramid(cfg, (1, 2, 3), CHUNK, 48, 80)
    assert plan.hw == ((12, 20), (24, 40), (48, 80)) and plan.num_steps == 6
    ref = diffusers.HeliosDMDScheduler.from_config(SCHED)
    for s, seq_hw in enumerate([(12, 20), (12, 20), (24, 40)]):  # stage s >= 1 reads the previous size
        mu = calculate_shift(CHUNK * seq_hw[0] * seq_hw[1] // 4)
        assert stage_mu(cfg, s, CHUNK, plan.hw, (1, 2, 2)) == mu
        ref.set_timesteps((1, 2, 3)[s], s, mu=mu)
        _max_diff(plan.stages[s].timesteps, ref.timesteps, f"stage {s} timesteps")
        _max_diff(plan.stages[s].sigmas, ref.sigmas, f"stage {s} sigmas")
    assert dmd_stage_plan(cfg, 1, 0, mu=1.0).num_steps == 1


def test_downsample_noise_out_path_and_shape():
    noise = torch.randn(1, 2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    out = torch.empty(1, 2, 3, 4, 6)
    assert downsample_noise(noise, 3, out=out) is out
    _max_diff(out, downsample_noise(noise, 3), "downsample out=")
    assert downsample_noise(noise, 1).shape == noise.shape


def test_bad_pyramid_inputs():
    cfg = ScheduleConfig.from_dict(SCHED)
    with pytest.raises(ValueError, match="divisible by 4 .*pixel size divisible by 32"):
        stage_hw(10, 16, 3)
    with pytest.raises(ValueError, match="out must be contiguous"):
        stage_transition(
            torch.zeros(1, 1, 1, 2, 2), torch.zeros(1, 1, 1, 4, 4), 1.0, 1.0, out=torch.zeros(1, 1, 1, 4, 8)[..., ::2]
        )
    with pytest.raises(ValueError, match="3 stages"):
        plan_pyramid(cfg, (1, 1), CHUNK, 8, 8)
    with pytest.raises(ValueError, match="gamma=0.5"):
        block_noise_factor(0.5)
    with pytest.raises(ValueError, match="block_noise has shape"):
        stage_transition(torch.zeros(1, 1, 1, 2, 2), torch.zeros(1, 1, 1, 2, 2), 1.0, 1.0)
    with pytest.raises(ValueError, match="stage=0"):
        transition_coefficients(cfg, 0)
    with pytest.raises(ValueError, match="B, C, T, H, W"):
        downsample_noise(torch.zeros(4, 8, 8), 3)


# ------------------------------------------------------------------ guidance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cfg_zero_star_matches_pipeline(dtype):
    from diffusers.pipelines.helios.pipeline_helios_pyramid import optimized_scale as ref_scale

    g = torch.Generator().manual_seed(8)
    pred = torch.randn(4, 3, 2, 5, 7, generator=g).to(dtype)
    cond, uncond = split_cond_uncond(pred)
    assert cond.data_ptr() == pred.data_ptr() and cond.shape[0] == 2  # views, [cond; uncond]
    alpha = ref_scale(cond.reshape(2, -1), uncond.reshape(2, -1))
    _max_diff(optimized_scale(cond, uncond), alpha, "optimized_scale")
    a = alpha.view(2, 1, 1, 1, 1).to(dtype)
    ref = uncond * a + 5.0 * (cond - uncond * a)
    out = torch.empty_like(cond)
    assert cfg_zero_star(cond, uncond, 5.0, zero=torch.tensor(False), out=out) is out
    _max_diff(out, ref, "CFG-Zero*")
    _max_diff(cfg_zero_star(cond, uncond, 5.0, zero=False), ref, "CFG-Zero* bool flag")
    zeroed = cfg_zero_star(cond, uncond, 5.0, zero=torch.tensor(True))
    assert zeroed.dtype == dtype and torch.equal(zeroed, cond * 0.0)
    _max_diff(cfg_combine(cond, uncond, 5.0), uncond + 5.0 * (cond - uncond), "CFG")


def test_zero_init_steps_follow_the_pipeline_rule():
    for stage, zero_steps, use in [(0, 1, True), (0, 0, True), (1, 1, True), (0, 2, False)]:
        expected = [(stage == 0 and i <= zero_steps) and use for i in range(4)]
        assert zero_init_steps(stage, 4, zero_steps, use).tolist() == expected


def test_bad_guidance_inputs():
    with pytest.raises(ValueError, match="odd batch"):
        split_cond_uncond(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="must match"):
        cfg_combine(torch.zeros(2, 3), torch.zeros(2, 4), 5.0)
    with pytest.raises(ValueError, match="out has shape"):
        cfg_zero_star(torch.zeros(2, 3), torch.zeros(2, 3), 5.0, out=torch.zeros(3))
