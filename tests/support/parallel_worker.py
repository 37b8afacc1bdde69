"""Scenarios of tests/test_parallel.py, run by one process per rank (and once in the test process).

Small engines made from the untrained model's transformer (4 heads: sequence sizes 2 and 4 divide them) at
64x64, float32, eager (`graphs="off"`) unless a scenario says otherwise. Each rank writes what it
computed to `out/<scenario>-rank<r>.pt`; the test compares them with the one-process engine.
"""

from __future__ import annotations

import datetime
import os
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

SIZE = 64
LATENT_FRAMES = 5  # per chunk (Helios: 9): 17-frame chunks, so the VAE, most of the time here, has less to do
NUM_FRAMES = 51  # three chunks
SEED = 77
BASE_MODEL_INDEX = {"_class_name": "HeliosPipeline"}
BASE_SCHEDULER = {
    "_class_name": "HeliosScheduler",
    "stages": 1,
    "stage_range": [0.0, 1.0],
    "use_dynamic_shifting": True,
}


@dataclass(frozen=True)
class Scenario:
    """One stream: `kind` "distilled" (pyramid, no CFG) or "base" (UniPC, CFG 5.0), a task, the mesh."""

    name: str
    kind: str
    task: str  # "t2v" or "i2v"
    cfg: int = 1
    graphs: str = "off"


def build_engine(scenario: Scenario, parallel=None):
    """A tiny engine from the untrained model's transformer: as the distilled model, or as a Base one."""
    from helios_rt.config import EngineConfig
    from helios_rt.demo.untrained import UNTRAINED_MODEL_INDEX, UNTRAINED_SCHEDULER, UNTRAINED_TRANSFORMER
    from helios_rt.engine import Engine
    from helios_rt.model.text import HashPromptEncoder
    from helios_rt.model.transformer import load_transformer
    from helios_rt.model.vae import VAEConfig, WanVAE
    from helios_rt.ops import OpSet
    from helios_rt.sampling.chunk import SamplingSpec
    from support.untrained import untrained_checkpoint

    base = scenario.kind == "base"
    extra = dict(num_inference_steps=3, guidance_scale=5.0) if base else {}
    config = EngineConfig(
        height=SIZE,
        width=SIZE,
        device="cpu",
        graphs=scenario.graphs,
        latent_frames_per_chunk=LATENT_FRAMES,
        parallel=parallel,
        **extra,
    )
    device = torch.device(config.resolved_device())
    ops = OpSet(device, config.debug.kernels)
    transformer = load_transformer(untrained_checkpoint(), config.resolved_dtype(), device, ops, config.precision)
    torch.manual_seed(SEED)  # a VAE smaller than the untrained model's: the decode is most of a chunk's time here
    z_dim = UNTRAINED_TRANSFORMER.in_channels
    vae = WanVAE(VAEConfig(base_dim=4, z_dim=z_dim, dim_mult=(1, 1, 1, 1), num_res_blocks=1))
    index, scheduler = (BASE_MODEL_INDEX, BASE_SCHEDULER) if base else (UNTRAINED_MODEL_INDEX, UNTRAINED_SCHEDULER)
    spec = SamplingSpec.from_checkpoint(index, scheduler, config)
    return Engine(transformer, vae.eval(), HashPromptEncoder(UNTRAINED_TRANSFORMER.text_dim), spec, config)


def run_scenario(engine, scenario: Scenario, switch_prompt: bool = True) -> tuple[list, list]:
    """The latents and frames of three chunks; after chunk 0 the prompt switches (only where `switch_prompt`:
    in a parallel run, rank 0 alone calls set_prompt and the others must follow it)."""
    from support.pipelines import sample_image

    image = sample_image() if scenario.task == "i2v" else None
    latents, frames = [], []
    with engine.generate_stream("a fish", image=image, num_frames=NUM_FRAMES, seed=SEED) as stream:
        for chunk in stream:
            latents.append(chunk.latents.clone())
            frames.append(torch.from_numpy(chunk.frames.copy()))
            if chunk.index == 0 and switch_prompt:
                stream.set_prompt("a diver among corals")
    return latents, frames


def worker(rank: int, world: int, store: str, out: str, scenarios: list[Scenario], victim: int | None) -> None:
    """One rank: every scenario in turn, then (with `victim`) a stream during which that rank dies."""
    import torch.distributed as dist

    from helios_rt.parallel import ParallelConfig, ParallelError

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30)
    )
    out = Path(out)
    try:
        for sc in scenarios:
            engine = build_engine(sc, ParallelConfig(cfg=sc.cfg, timeout_s=30))
            latents, frames = run_scenario(engine, sc, switch_prompt=rank == 0)
            mesh = engine.parallel
            result = {"latents": latents, "frames": frames, "mesh": (mesh.cfg, mesh.sequence)}
            torch.save(result, out / f"{sc.name}-rank{rank}.pt")
        if victim is not None:
            _die_or_report(rank, victim, scenarios[0], out)
    except ParallelError as err:
        (out / f"error-rank{rank}.txt").write_text(f"{time.time()}\n{err}")
        os._exit(3)
    except BaseException:
        (out / f"crash-rank{rank}.txt").write_text(traceback.format_exc())
        os._exit(4)
    dist.destroy_process_group()


def _die_or_report(rank: int, victim: int, scenario: Scenario, out: Path) -> None:
    """The victim is killed (SIGKILL) after its first chunk; the others must raise ParallelError."""
    from helios_rt.parallel import ParallelConfig

    engine = build_engine(scenario, ParallelConfig(cfg=scenario.cfg, timeout_s=30))
    with engine.generate_stream("a fish", num_frames=NUM_FRAMES, seed=SEED) as stream:
        for chunk in stream:
            if chunk.index == 0 and rank == victim:
                (out / "killed.txt").write_text(str(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError(f"rank {rank} finished a stream although rank {victim} was killed")
