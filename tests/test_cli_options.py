"""The engine options are generated from one table and parse to the same EngineConfig in every command."""

from __future__ import annotations

import argparse

import pytest

from helios_rt import options
from helios_rt.cli import build_parser
from helios_rt.config import DebugSwitches, EngineConfig, MemorySettings, preset

ARGV = ["--height", "64", "--width", "128", "--steps", "2,2,1", "--device", "cpu", "--dtype", "float32",
        "--kernels", "reference", "--graphs", "off", "--decode-slice-frames", "2", "--offload-text-encoder",
        "--guidance-scale", "3.5", "--text-encoder-precision", "fp8"]  # fmt: skip
EXPECTED = EngineConfig(
    height=64, width=128, steps=(2, 2, 1), device="cpu", dtype="float32", guidance_scale=3.5,
    memory=MemorySettings(text_encoder_precision="fp8", decode_slice_frames=2, offload_text_encoder=True),
    debug=DebugSwitches(kernels="reference", graphs="off"),
)  # fmt: skip
COMMANDS = {
    "generate": ["generate", "--model", "demo", "--prompt", "x"],
    "serve": ["serve", "--model", "demo"],
    "profile": ["profile", "--model", "demo"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_parses_the_engine_options_to_the_same_config(command: str) -> None:
    args = build_parser().parse_args(COMMANDS[command] + ARGV)
    assert options.engine_config(args) == EXPECTED


def test_bench_engine_options_parse_as_the_cli_parses_them() -> None:
    pairs = [options.engine_option(t) for t in ("steps=2,2,1", "graphs=off", "offload_text_encoder=true")]
    assert pairs == [("steps", (2, 2, 1)), ("graphs", "off"), ("offload_text_encoder", True)]
    args = build_parser().parse_args(["bench", "--engine-option", "kernels=reference"])
    assert args.engine_option == [("kernels", "reference")]
    for bad in ("kernels=cuda", "history_sizes=1,1,1", "steps"):
        with pytest.raises(argparse.ArgumentTypeError):
            options.engine_option(bad)


def test_every_engine_option_is_an_engine_config_field() -> None:
    for option in options.ENGINE_OPTIONS:
        group, _, name = option.field.rpartition(".")
        owner = type(getattr(EngineConfig(), group)) if group else EngineConfig
        assert name in owner.__dataclass_fields__, option.field


def test_steps_sets_a_base_checkpoints_total() -> None:
    args = build_parser().parse_args(COMMANDS["generate"] + ["--steps", "12"])
    config = options.engine_config(args)
    assert config.steps == 12 and config.steps_option == "steps"
    from helios_rt.sampling.chunk import checkpoint_steps

    assert checkpoint_steps(config.steps, config.steps_option, pyramid=False, distilled=False, stages=1) == (12,)


def test_defaults_are_the_configs_and_the_demo_keeps_its_size() -> None:
    from helios_rt.demo import DEMO_HEIGHT, DEMO_WIDTH

    config = options.engine_config(build_parser().parse_args(COMMANDS["generate"]))
    assert config == EngineConfig(height=DEMO_HEIGHT, width=DEMO_WIDTH)
    with pytest.raises(SystemExit):
        build_parser().parse_args(COMMANDS["generate"] + ["--steps", "1,0"])


def test_profile_argv_reproduces_the_engine_options() -> None:
    from helios_rt.benchmarking import profile_argv

    args = build_parser().parse_args(COMMANDS["profile"] + ARGV)
    again = build_parser().parse_args(profile_argv(args))
    assert options.engine_config(again) == EXPECTED


PLAN_ARGV = ["--model", "tiny", "--height", "64", "--width", "128", "--dtype", "fp32", "--kernels", "reference",
             "--attention", "sdpa", "--gpu-memory", "24", "--precision", "fp8", "--text-encoder-precision", "fp8",
             "--batch", "2", "--text-len", "16", "--json"]  # fmt: skip


@pytest.mark.parametrize("argv", [[], PLAN_ARGV])
def test_plan_options_from_the_table_read_as_the_reports_own_parser(argv: list[str]) -> None:
    """`helios-rt plan` takes its engine options from the table; run_plan reads the same namespace."""
    from helios_rt.compile.report import add_plan_parser

    ours = vars(build_parser().parse_args(["plan", *argv]))
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(dest="command"))
    theirs = vars(parser.parse_args(["plan", *argv]))
    assert {k: v for k, v in ours.items() if k != "debug"} == theirs


def test_a_memory_budget_follows_the_plans_choice() -> None:
    """--gpu-memory on the command line: the decode slices `helios-rt plan --gpu-memory` chooses."""
    from helios_rt.compile.report import plan_engine

    gb = 4.0  # the tiny transformer, but the Wan VAE's whole-chunk decode at 384x640 needs slices
    config = options.plan_memory(EngineConfig(device="cuda", dtype="bf16", gpu_memory=gb), "tiny")
    import torch

    plan = plan_engine(preset("tiny"), 384, 640, torch.bfloat16, text_encoder=None, gpu_memory_gb=gb)
    assert plan.decode_slice_frames is not None
    assert config.memory == MemorySettings(text_encoder_precision=plan.text_encoder_precision,
                                           decode_slice_frames=plan.decode_slice_frames, planned_for_gb=gb)  # fmt: skip
    assert config.decode_slice_frames == plan.decode_slice_frames  # what the engine reads
    with pytest.raises(ValueError, match=r"gpu_memory=0\.5: tiny at 384x640 does not fit .*`helios-rt plan"):
        options.plan_memory(EngineConfig(device="cuda", gpu_memory=0.5), "tiny")
    with pytest.raises(ValueError, match=r"gpu_memory=24 budgets a GPU; this engine runs on cpu"):
        options.plan_memory(EngineConfig(device="cpu", gpu_memory=24), "tiny")
