"""A compiled stage (`Program`) against the eager model, on the three pyramid stage shapes of a small config."""

from __future__ import annotations

import functools

import pytest
import torch

from helios_rt.compile.cost import ChunkShape, stage_layouts
from helios_rt.compile.program import Program
from helios_rt.compile.workspace import PlanMismatch
from helios_rt.config import TINY
from helios_rt.model.transformer import HeliosTransformer
from helios_rt.ops import OpSet

# 3 latent frames, latents 8x16 at full resolution: stages (2x4, 4x8, 8x16) with history 4/2/1+prefix.
SHAPE = ChunkShape(height=64, width=128, latent_frames=3, history_sizes=(4, 2, 1))
TEXT_LEN = 7
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@functools.lru_cache(maxsize=2)
def tiny_model(device: str = "cpu") -> HeliosTransformer:
    torch.manual_seed(0)
    model = HeliosTransformer(TINY).eval()
    with torch.no_grad():
        for p in model.parameters():  # move every parameter off its init (norm weights are ones)
            p.add_(torch.randn_like(p) * 0.1)
    return model.to(device)


def layouts():
    return stage_layouts(TINY, SHAPE)


class Inputs:
    """Random inputs of one step; `prompt` and `history` change the conditioning too."""

    def __init__(self, model, layout, batch, seed, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        cfg = model.config
        t, h, w = (n * p for n, p in zip(layout.noisy_grid, cfg.patch_size, strict=True))
        hh, hw = layout.history_latent_hw
        rand = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
        self.latents, self.start = rand(batch, cfg.in_channels, t, h, w), rand(batch, cfg.in_channels, t, h, w)
        self.timestep = torch.tensor([999.0 - 97 * seed] * batch, device=device)
        self.sigma_t = torch.tensor([0.9 - 0.1 * seed], dtype=torch.float64, device=device)
        self.sigma_next = torch.tensor([0.5 - 0.3 * seed], dtype=torch.float64, device=device)  # < 0 on seed 2: x0
        self.text = model.encode_text(rand(batch, TEXT_LEN, cfg.text_dim))
        lat = {s.name: rand(batch, cfg.in_channels, len(s.frame_indices), hh, hw) for s in layout.history}
        self.history = model.embed_history(layout, lat["short"], lat["mid"], lat["long"])

    def feed(self, prog: Program) -> None:
        prog.set_text(self.text)
        prog.set_history(self.history)
        prog.set_inputs(self.latents, self.start, self.timestep, self.sigma_t, self.sigma_next)

    @torch.no_grad()
    def eager(self, model, layout, rope) -> torch.Tensor:
        v = model(self.latents, self.timestep, self.text, layout, rope, self.history, model.history_modulation(),
                  unpatchify=False)  # fmt: skip
        return OpSet("cpu", "reference").flow_step(
            v, self.latents, self.start, self.sigma_t, self.sigma_next, model.config.patch_size
        )


@pytest.mark.parametrize("stage,batch", [(0, 1), (1, 2), (2, 1)])
def test_program_matches_eager_over_changing_inputs(stage, batch):
    model, layout = tiny_model(), layouts()[stage]
    prog = Program(model, layout, batch=batch, text_len=TEXT_LEN)
    rope = (prog.io.rope_cos, prog.io.rope_sin)
    outputs = []
    for seed in range(3):
        inputs = Inputs(model, layout, batch, seed)
        inputs.feed(prog)
        got = prog.run()
        assert got is prog.output
        torch.testing.assert_close(got, inputs.eager(model, layout, rope), rtol=1e-5, atol=1e-5)
        outputs.append(got.clone())
    assert not torch.equal(outputs[0], outputs[1])
    inputs.feed(prog)
    assert torch.equal(prog.run(), outputs[-1])  # a replay of the same inputs is bit-identical


def test_every_intermediate_lies_in_the_arena():
    model, layout = tiny_model(), layouts()[1]
    prog = Program(model, layout, text_len=TEXT_LEN)
    Inputs(model, layout, 1, 0).feed(prog)
    ex = prog.execute(record_ranges=True)
    arena = (prog.arena.data_ptr(), prog.arena.data_ptr() + prog.arena.numel())
    io = prog.io
    external = [*model.parameters(), io.latents, io.start, io.timestep, io.sigma_t, io.sigma_next, io.history,
                *io.text_keys, *io.text_values, io.rope_cos, io.rope_sin, io.history_mod, io.output]  # fmt: skip
    spans = {(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
             for t in external}  # fmt: skip
    inside = lambda s, e, span: span[0] <= s and e <= span[1]  # noqa: E731
    in_arena = 0
    for step, op, s, e in ex.ranges:
        if inside(s, e, arena):
            in_arena += 1
        else:
            assert not prog.plan.steps[step].allocs, f"step {step} ({op}) allocated outside the arena"
            assert any(inside(s, e, span) for span in spans), f"step {step} ({op}) returned memory of unknown origin"
    assert in_arena >= prog.plan.buffers > 100


def test_changed_input_shape_raises_at_the_first_step_that_sees_it():
    model, layout = tiny_model(), layouts()[0]
    prog = Program(model, layout, text_len=TEXT_LEN)
    prog.io.text_keys[1] = torch.zeros(1, TEXT_LEN + 1, TINY.num_attention_heads, TINY.attention_head_dim)
    with pytest.raises(PlanMismatch, match=r"step \d+: planned .*float32\[1, 7, 2, 16\].* executed .*"
                       r"float32\[1, 8, 2, 16\]"):  # fmt: skip
        prog.run()


def test_stage_programs_share_conditioning_and_arena():
    model, (s0, _, s2) = tiny_model(), layouts()
    big = Program(model, s2, text_len=TEXT_LEN)
    small = Program(model, s0, text_len=TEXT_LEN, share_with=big)
    assert small.arena is big.arena and small.io.text_keys is big.io.text_keys
    inputs = Inputs(model, s0, 1, 1)
    inputs.feed(small)
    big_inputs = Inputs(model, s2, 1, 1)
    big.set_inputs(big_inputs.latents, big_inputs.start, big_inputs.timestep, big_inputs.sigma_t, big_inputs.sigma_next)
    want = inputs.eager(model, s0, (small.io.rope_cos, small.io.rope_sin))
    big.run()  # overwrites the shared arena: the small program must not depend on what was left there
    torch.testing.assert_close(small.run(), want, rtol=1e-5, atol=1e-5)


def test_static_scalars_are_tensors_and_numbers_fill_them():
    model, layout = tiny_model(), layouts()[0]
    prog = Program(model, layout, text_len=TEXT_LEN)
    ptr = prog.io.sigma_t.data_ptr()
    prog.set_inputs(timestep=500, sigma_t=0.25)
    assert prog.io.sigma_t.data_ptr() == ptr and prog.io.sigma_t.item() == 0.25
    assert prog.io.timestep.shape == (1,) and prog.io.timestep.item() == 500
    with pytest.raises(ValueError, match="latents: cannot copy"):
        prog.set_inputs(latents=torch.zeros(3))


@needs_cuda
def test_cuda_graph_replay_matches_eager_and_allocates_nothing():
    model, layout = tiny_model("cuda"), layouts()[2]
    prog = Program(model, layout, text_len=TEXT_LEN)
    assert prog.cuda_graph
    rope = (prog.io.rope_cos, prog.io.rope_sin)
    cases = [Inputs(model, layout, 1, seed, "cuda") for seed in range(3)]
    cases[0].feed(prog)
    prog.run()  # capture
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    for inputs in cases:
        inputs.feed(prog)
        got = prog.run()
        torch.cuda.synchronize()
        after = torch.cuda.memory_stats()
        for key in ("allocation.all.allocated", "allocated_bytes.all.current", "reserved_bytes.all.current"):
            assert after[key] == before[key], key
        torch.testing.assert_close(got, inputs.eager(model, layout, rope), rtol=1e-4, atol=1e-4)
