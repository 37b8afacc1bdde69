"""The cold start by phase: the demo's first stream, and the 14B plan with and without the cache.

    python -m pytest bench/bench_cold_start.py --benchmark-only -s

Each test prints its breakdown (`Stream.timings`: load with GB/s, text encoder, plan and whether it
came from the cache, warm-up runs, capture, first chunk) and files it in `extra_info`. The plan cache
lives in a tmp folder here, never the user's.

`test_load_throughput` loads a generated bf16 transformer checkpoint (HELIOS_RT_BENCH_LOAD_GB, default
1 GB, in shards of two blocks, 1.3B-shaped blocks) onto CUDA when there is one, else the CPU, and
reports GB/s of file read. The file was just written, so this is the page cache's rate, not a cold disk's.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helios_rt import Engine, EngineConfig
from helios_rt.compile.chunk_program import ChunkProgram
from helios_rt.compile.cost import ChunkShape
from helios_rt.compile.plan_cache import PlanCache
from helios_rt.compile.report import distilled_spec, plan_chunk
from helios_rt.config import HELIOS_14B, DebugSwitches, ModelConfig
from helios_rt.model.transformer import HeliosTransformer, load_transformer
from helios_rt.ops import OpSet

DEMO = EngineConfig(device="cpu", dtype="float32", debug=DebugSwitches(kernels="reference", graphs="chunk"))


def _cold_stream(cache_dir: str, monkeypatch) -> dict[str, float]:
    monkeypatch.setenv("HELIOS_RT_CACHE_DIR", cache_dir)
    monkeypatch.setenv("HELIOS_RT_PLAN_CACHE", "1")
    engine = Engine.from_pretrained("demo", DEMO)
    with engine.generate_stream("a coral reef", num_frames=66, seed=0) as stream:
        list(stream)
    return stream.timings


@pytest.mark.parametrize("cache", ["cold cache", "warm cache"])
def test_demo_cold_start(benchmark, tmp_path_factory, monkeypatch, cache) -> None:
    folder = str(tmp_path_factory.getbasetemp() / "plans")
    if cache == "warm cache":
        _cold_stream(folder, monkeypatch)  # fills it
    else:
        monkeypatch.setenv("HELIOS_RT_CACHE_DIR", str(tmp_path_factory.mktemp("empty")))
        folder = str(tmp_path_factory.mktemp("cold"))
    timings = benchmark.pedantic(lambda: _cold_stream(folder, monkeypatch), rounds=1, iterations=1)
    benchmark.extra_info.update(timings)
    print(f"\ndemo {DEMO.height}x{DEMO.width}, {cache}: " + ", ".join(f"{k} {v:.3g}" for k, v in timings.items()))


def _plan_14b(cache: PlanCache | None) -> ChunkProgram:
    """The 14B chunk at 384x640 bf16 on meta tensors (the CUDA op table), its three kinds planned."""
    shape = ChunkShape(height=384, width=640, batch=1, text_len=512)
    program = plan_chunk(HELIOS_14B, shape, torch.bfloat16, OpSet.for_planning("auto"), distilled_spec(shape.stages))
    if cache is None:
        return program
    fresh = ChunkProgram(program.sampler, shape.batch, program.text_shape, cuda_graph=False, plan_cache=cache)
    for kind in program.plans:
        fresh.plan(kind)
    return fresh


def test_plan_14b_with_and_without_the_cache(benchmark, tmp_path) -> None:
    """Planning the three 14B kinds, then loading them from a cache filled by a first planning."""
    start = time.perf_counter()
    program = _plan_14b(None)
    planned_s = time.perf_counter() - start
    cache = PlanCache(tmp_path)
    fresh = ChunkProgram(program.sampler, program.batch, program.text_shape, cuda_graph=False, plan_cache=cache)
    for kind in program.plans:
        fresh.plan(kind)  # planned again, and stored
    stored = ChunkProgram(program.sampler, program.batch, program.text_shape, cuda_graph=False, plan_cache=cache)

    def load() -> float:
        stored.plans.clear()
        for kind in program.plans:
            stored.plan(kind)
        return stored.cold.plan_s

    benchmark.pedantic(load, rounds=1, iterations=1)
    loaded_s = benchmark.stats.stats.mean
    assert stored.cold.plans_loaded == len(program.plans) and all(
        stored.plans[k].steps == program.plans[k].steps for k in program.plans
    )
    size = sum(cache.path(p.stem).stat().st_size for p in cache.folder.glob("*.json"))
    benchmark.extra_info.update(planned_s=planned_s, loaded_s=loaded_s, cache_mb=size / 1e6)
    print(
        f"\n14B 384x640 bf16, {len(program.plans)} kinds: planned {planned_s:.1f} s (meta model and state included), "
        f"loaded from the cache {loaded_s:.2f} s ({size / 1e6:.1f} MB of JSON)"
    )


# 1.3B-shaped blocks (width 1536, ffn 8960): about 92 MB of bf16 each.
LOAD_CONFIG = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, rope_dim=(44, 42, 42))


def _write_checkpoint(root: Path, gigabytes: float) -> int:
    """A random bf16 transformer checkpoint of about `gigabytes`, two blocks a shard; returns its tensor bytes."""
    probe = ModelConfig(**LOAD_CONFIG, num_layers=1)
    with torch.device("meta"):
        block_bytes = sum(t.numel() * 2 for t in HeliosTransformer(probe).blocks[0].state_dict().values())
    config = ModelConfig(**LOAD_CONFIG, num_layers=max(1, round(gigabytes * 1e9 / block_bytes)))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in HeliosTransformer(config).state_dict().items()}
    folder = root / "transformer"
    folder.mkdir(parents=True)
    shard_of = {k: int(k.split(".")[1]) // 2 + 1 if k.startswith("blocks.") else 0 for k in shapes}
    n = max(shard_of.values()) + 1
    names = {i: f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)}
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        shard = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items() if shard_of[k] == i}
        save_file(shard, folder / names[i])
    index = {"metadata": {}, "weight_map": {k: names[i] for k, i in shard_of.items()}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    (root / "model_index.json").write_text('{"_class_name": "HeliosPyramidPipeline"}')
    return sum(s.numel() * 2 for s in shapes.values())


def test_load_throughput(benchmark, tmp_path) -> None:
    """load_transformer's GB/s over a generated checkpoint: one tensor at a time through the staging buffers."""
    gigabytes = float(os.environ.get("HELIOS_RT_BENCH_LOAD_GB", "1"))
    nbytes = _write_checkpoint(tmp_path, gigabytes)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def load() -> None:
        model = load_transformer(tmp_path, dtype=torch.bfloat16, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        del model

    benchmark.pedantic(load, rounds=2, iterations=1)
    best = benchmark.stats.stats.min
    benchmark.extra_info.update(load_gb=nbytes / 1e9, load_s=best, load_gb_per_s=nbytes / 1e9 / best, device=device)
    print(
        f"\nload {nbytes / 1e9:.2f} GB of bf16 onto {device}: {best:.2f} s, {nbytes / 1e9 / best:.2f} GB/s "
        "(page cache warm)"
    )
