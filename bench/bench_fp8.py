"""The FP8 numeric gate, printed: per-layer error, 3-chunk latent drift and frame PSNR against the bf16
engine on the oracle configs; per-layer error of a 14B-shaped block with random weights, per token
and per 128-block; and the FP8 row of the H100 projection (end to end, VAE included).

Bounds (helios_rt/fp8/gate.py): per layer <= 2u + u^2 = 0.129, latent drift <= 2u = 0.125, PSNR >=
24.1 dB, u = 2^-4 the unit roundoff of e4m3.

    python -m pytest bench/bench_fp8.py --benchmark-only -s
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helios_rt import Engine, EngineConfig
from helios_rt.config import HELIOS_14B, DebugSwitches
from helios_rt.fp8 import block_linear_names, quantize_blocks_
from helios_rt.fp8.format import dequantize, quantize_blocks, quantize_rows
from helios_rt.fp8.gate import (
    FRAME_PSNR_MIN,
    LATENT_DRIFT_BOUND,
    LAYER_REL_BOUND,
    GateResult,
    layer_errors,
    psnr,
    relative_error,
)
from helios_rt.model.transformer import Block
from helios_rt.ops import OpSet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.pipelines import HEIGHT, WIDTH, build_pipeline, prompt_embeds, save_pipeline  # noqa: E402


def _stream(engine: Engine, chunks: int = 3) -> list:
    with engine.generate_stream(prompt_embeds=prompt_embeds(1), negative_prompt_embeds=prompt_embeds(2),
                                num_frames=33 * chunks, seed=5) as s:  # fmt: skip
        return [(c.latents.clone(), c.frames.copy()) for c in s]


@pytest.mark.parametrize("kind", ["distilled", "base"])
def test_gate_on_the_oracle_configs(benchmark, kind: str, tmp_path) -> None:
    folder = save_pipeline(build_pipeline(kind), tmp_path / kind)
    cfg = EngineConfig(device="cpu", dtype="bfloat16", height=HEIGHT, width=WIDTH,
                       debug=DebugSwitches(vae_dtype="float32"))
    if kind == "base":
        cfg = cfg.replace(steps=4)  # a base checkpoint: the total
    ref_engine = Engine.from_pretrained(folder, cfg)
    fp8_engine = Engine.from_pretrained(folder, cfg.replace(precision="fp8"))
    ref: list = []
    errors = layer_errors(ref_engine.transformer, fp8_engine.transformer, lambda: ref.extend(_stream(ref_engine)))
    fp8 = benchmark.pedantic(_stream, args=(fp8_engine,), rounds=1, iterations=1)
    worst = max(errors, key=errors.get)
    drift = [relative_error(a[0], b[0]) for a, b in zip(fp8, ref, strict=True)]
    frame_psnr = min(psnr(a[1], b[1]) for a, b in zip(fp8, ref, strict=True))
    result = GateResult(worst, errors[worst], sum(errors.values()) / len(errors), drift[-1], frame_psnr)
    print(
        f"\n{kind}: per-layer worst {result.worst_layer_error:.4f} ({worst}), mean {result.mean_layer_error:.4f} "
        f"(bound {LAYER_REL_BOUND:.3f}); latent drift per chunk {[round(d, 4) for d in drift]} "
        f"(bound {LATENT_DRIFT_BOUND}); frame PSNR min {frame_psnr:.2f} dB (bound {FRAME_PSNR_MIN:.1f})"
    )
    benchmark.extra_info.update(
        worst_layer=result.worst_layer_error, mean_layer=result.mean_layer_error, drift=drift, psnr_min=frame_psnr
    )
    assert result.passes()


def _block_14b(seed: int = 0) -> Block:
    """A 14B block with random weights of trained scale: std 1/sqrt(fan_in), biases 0.02, norms near one."""
    g = torch.Generator().manual_seed(seed)
    block = Block(HELIOS_14B)
    with torch.no_grad():
        for name, p in block.named_parameters():
            fan_in = p.shape[-1] if p.ndim > 1 else 1
            std = fan_in**-0.5 if p.ndim > 1 else (0.02 if name.endswith("bias") else 0.1)
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name else 0.0))
    return block.eval()


def _block_inputs(n_hist: int, n_noisy: int, text_len: int, seed: int = 1):
    """Hidden states with per-channel magnitudes spread over 30x (the outlier channels of trained DiTs)."""
    g = torch.Generator().manual_seed(seed)
    c = HELIOS_14B
    d, dh = c.dim, c.attention_head_dim
    n = n_hist + n_noisy
    x = torch.randn(1, n, d, generator=g) * torch.logspace(-0.75, 0.75, d)[torch.randperm(d, generator=g)]
    mod = torch.randn(1, 2, 6, d, generator=g) * 0.1
    angles = torch.rand(n, dh // 2, generator=g) * 6.28
    text = torch.randn(1, text_len, d, generator=g) * 0.5  # the projected prompt that the text K/V come from
    return x, mod, (angles.cos(), angles.sin()), text


def test_gate_on_a_14b_block(benchmark) -> None:
    block = _block_14b()
    fp8 = quantize_blocks_(_wrap(_block_14b()))
    ops = OpSet("cpu", "reference")
    x, mod, rope, text = _block_inputs(32, 32, 64)
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(_m, args, _out) -> None:  # returns None: a value would replace the layer's output
            inputs.setdefault(name, args[0])

        return hook

    hooks = [block.get_submodule(n).register_forward_hook(keep_input(n)) for n in _names(block)]

    def run():
        with torch.no_grad():
            block(x.clone(), mod, rope, *block.text_kv(text, ops), 32, ops)

    errors = benchmark.pedantic(layer_errors, args=(_wrap(block), fp8, run), rounds=1, iterations=1)
    for h in hooks:
        h.remove()
    print("\n14B block (32 history + 32 noisy tokens, 64 text tokens), relative L2 error per linear:")
    print(f"{'linear':28} {'fp8 per token':>14} {'emulated/token':>15} {'per 128-block':>14}")
    for name in _names(block):
        lin = block.get_submodule(name)
        w = fp8.get_submodule(f"blocks.0.{name}")
        exact = inputs[name].double() @ lin.weight.double().T + lin.bias.double()
        wd = dequantize(w.weight, w.weight_scale[:, None])
        per_token = dequantize(*quantize_rows(inputs[name])) @ wd.T + lin.bias.double()
        per_block = dequantize(*quantize_blocks(inputs[name])) @ wd.T + lin.bias.double()
        e_tok, e_blk = relative_error(per_token, exact), relative_error(per_block, exact)
        print(f"{name:28} {errors[f'blocks.0.{name}']:14.4f} {e_tok:15.4f} {e_blk:14.4f}")
        benchmark.extra_info[name] = {"per_token": e_tok, "per_block": e_blk}
    assert max(errors.values()) <= LAYER_REL_BOUND


def _names(block: Block) -> list[str]:
    return [n.removeprefix("blocks.0.") for n in block_linear_names(_wrap(block))]


def _wrap(block: Block) -> nn.Module:
    """A module whose `blocks` holds `block` (what the FP8 helpers walk)."""
    holder = nn.Module()
    holder.blocks = nn.ModuleList([block])
    return holder


def test_fp8_projection_row(benchmark) -> None:
    from helios_rt.compile import cost
    from helios_rt.fp8.projection import project_fp8

    chunk = benchmark.pedantic(cost.trace_chunk, args=(HELIOS_14B, cost.ChunkShape(), torch.bfloat16),
                               kwargs={"label": "Helios 14B", "vae": True}, rounds=1, iterations=1)  # fmt: skip
    print()
    for steps in ((1, 1, 1), (2, 2, 2)):
        p = project_fp8(chunk, steps)
        print(p.line(steps))
        benchmark.extra_info[f"fps_fp8_{'_'.join(map(str, steps))}"] = p.fps_fp8_end_to_end
        assert p.fp8_seconds < p.bf16_seconds
