"""The engine's command-line options, generated from EngineConfig's fields: one table for every command.

`ENGINE_OPTIONS` names each option's EngineConfig field ("debug.kernels" inside a group), its parser,
choices (the tuples of helios_rt.config) and help; the default is the field's own. `generate`, `serve`,
`profile`, `plan` and `bench --engine-option` read this table, so they share the options without
importing each other; `engine_config(args)` turns parsed options back into the EngineConfig.

A leaf for the commands: this module imports helios_rt.config at import time and nothing else of the
package (the demo's size, torchrun's layout and the memory plan are imported when first used).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .config import (
    ATTENTION_CHOICES,
    DTYPE_CHOICES,
    GRAPH_CHOICES,
    KERNEL_CHOICES,
    PRECISION_CHOICES,
    DebugSwitches,
    EngineConfig,
    MemorySettings,
)

_GROUPS: dict[str, type] = {"memory": MemorySettings, "debug": DebugSwitches}


def positive_int(text: str) -> int:
    """An argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number > 0 (GB)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parse_steps(text: str) -> int | tuple[int, ...]:
    """`--steps 4` (per pyramid stage, or a base checkpoint's total) or `--steps 2,2,1` (per stage)."""
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"steps look like '4' or '1,1,1' (per stage), got {text!r}") from None
    if any(s < 1 for s in steps):
        raise argparse.ArgumentTypeError(f"each step count must be >= 1, got {text!r}")
    return steps[0] if len(steps) == 1 and "," not in text else steps


def _format_steps(steps: int | tuple[int, ...]) -> str:
    return str(steps) if isinstance(steps, int) else ",".join(map(str, steps))


@dataclass(frozen=True)
class Option:
    """One engine option: the EngineConfig field it sets, how the command line spells and parses it."""

    field: str  # "height", or "group.name" for a field of a group ("debug.kernels")
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    switch: bool = False  # a flag without a value (store_true)

    @property
    def dest(self) -> str:
        """The argparse destination and the flag's name: the field's own name."""
        return self.field.rpartition(".")[2]

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    @property
    def default(self) -> Any:
        """The field's default (height and width: None, the model's own size)."""
        if self.field in ("height", "width"):
            return None
        group, _, name = self.field.rpartition(".")
        owner = _GROUPS[group] if group else EngineConfig
        return owner.__dataclass_fields__[name].default

    def add_to(self, parser, **changes: Any) -> None:
        """Add this option to `parser`; `changes` replace argparse keywords (a command's own default)."""
        kwargs: dict[str, Any] = dict(default=self.default, help=self.help)
        if self.switch:
            kwargs["action"] = "store_true"
        else:
            kwargs.update(type=self.type, choices=self.choices, metavar=self.metavar)
        kwargs.update(changes)
        parser.add_argument(self.flag, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})


ENGINE_OPTIONS: tuple[Option, ...] = (
    Option("height", "frame height in pixels (default: the model's, 384; the demo's 64)", positive_int),
    Option("width", "frame width in pixels (default: the model's, 640; the demo's 64)", positive_int),
    Option("device", "auto (cuda when available), cpu, cuda or cuda:N"),
    Option("dtype", "the model's dtype; auto: bfloat16 on cuda, float32 on cpu", choices=DTYPE_CHOICES),
    Option("precision", "fp8: the block linears in e4m3 (an FP8 checkpoint from `helios-rt quantize`, "
           "or a float one quantised while loading)", choices=PRECISION_CHOICES),  # fmt: skip
    Option("steps", "steps per pyramid stage (a base checkpoint: the total), or one count per stage as "
           "2,2,1 (default: the checkpoint's)", parse_steps, metavar="N|N,N,N"),  # fmt: skip
    Option("guidance_scale", "CFG scale, >= 1 (1 disables CFG; default: the checkpoint's)", float, metavar="S"),
    Option("gpu_memory", "a GPU memory budget in GB: the decode slices and umT5's precision follow from it, "
           "as `helios-rt plan --gpu-memory` chooses them", positive_float, metavar="GB"),  # fmt: skip
    Option("memory.text_encoder_precision", "fp8: umT5's linears as e4m3 weights on the GPU (4.3 GiB instead "
           "of 10.6; default: native, or what --gpu-memory needs)", choices=PRECISION_CHOICES),  # fmt: skip
    Option("memory.decode_slice_frames", "decode each chunk N latent frames at a time (the same frames, less "
           "memory; default: the whole chunk, or what --gpu-memory needs)", positive_int, metavar="N"),  # fmt: skip
    Option("memory.offload_text_encoder", "move umT5 to host memory between prompts (frees its memory while "
           "generating; a new prompt pays the transfer)", switch=True),  # fmt: skip
    Option("debug.kernels", "the op table (auto: the Triton kernels on cuda)", choices=KERNEL_CHOICES),
    Option("debug.attention", "attention backend; auto: on a GPU the fastest that runs, timed at warm-up",
           choices=ATTENTION_CHOICES),  # fmt: skip
    Option("debug.graphs", "chunk: each chunk one planned program (one CUDA graph replay on a GPU); "
           "off: the ops run eagerly (debugging, per-op profiles)", choices=GRAPH_CHOICES),  # fmt: skip
)
OPTIONS_BY_NAME: dict[str, Option] = {o.dest: o for o in ENGINE_OPTIONS}

# The options of `helios-rt plan`: what changes the memory of a chunk (no weights are loaded).
PLAN_OPTIONS = ("height", "width", "dtype", "precision", "gpu_memory", "text_encoder_precision", "kernels",
                "attention")  # fmt: skip


def add_engine_arguments(parser, names: Iterable[str] | None = None, **changes: dict[str, Any]) -> None:
    """Add the engine options (all, or `names` in table order) to `parser` or an argument group.

    changes: option name -> argparse keywords that differ for this command (e.g. plan's dtype default)."""
    wanted = None if names is None else set(names)
    unknown = (wanted or set()) - OPTIONS_BY_NAME.keys() | changes.keys() - OPTIONS_BY_NAME.keys()
    if unknown:
        raise ValueError(f"no engine option named {sorted(unknown)}; the table has {sorted(OPTIONS_BY_NAME)}")
    for option in ENGINE_OPTIONS:
        if wanted is None or option.dest in wanted:
            option.add_to(parser, **changes.get(option.dest, {}))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of parsed engine options (those a command did not add keep their defaults).

    Height and width default to the model's size; under torchrun the parallel layout comes from the
    environment; a `--gpu-memory` budget is planned for `args.model` (`plan_memory`)."""
    top: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {name: {} for name in _GROUPS}
    for option in ENGINE_OPTIONS:
        if not hasattr(args, option.dest):
            continue
        group, _, name = option.field.rpartition(".")
        (groups[group] if group else top)[name] = getattr(args, option.dest)
    model = getattr(args, "model", None)
    height, width = _model_size(model)
    top["height"] = top.get("height") or height
    top["width"] = top.get("width") or width
    from .parallel.launch import torchrun_parallel

    config = EngineConfig(
        **{k: v for k, v in top.items() if v is not None},
        memory=MemorySettings(**groups["memory"]),
        debug=DebugSwitches(**groups["debug"]),
        parallel=torchrun_parallel(),  # N ranks under torchrun, one process otherwise
    )
    return plan_memory(config, model) if config.gpu_memory is not None else config


def _model_size(model: str | None) -> tuple[int, int]:
    if model == "demo":
        from .demo import DEMO_HEIGHT, DEMO_WIDTH

        return DEMO_HEIGHT, DEMO_WIDTH
    defaults = EngineConfig.__dataclass_fields__
    return defaults["height"].default, defaults["width"].default


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The command-line options that reproduce `args`'s engine options (those set away from the default)."""
    argv: list[str] = []
    for option in ENGINE_OPTIONS:
        value = getattr(args, option.dest, option.default)
        if value is None or value == option.default:
            continue
        if option.switch:
            argv.append(option.flag)
        else:
            argv += [option.flag, _format_steps(value) if option.dest == "steps" else str(value)]
    return argv


def engine_option(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` with KEY an engine option's name (e.g. graphs=chunk), the value parsed as the CLI parses it."""
    key, sep, raw = text.partition("=")
    option = OPTIONS_BY_NAME.get(key.replace("-", "_"))
    if not sep or option is None:
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with KEY an engine option ({', '.join(OPTIONS_BY_NAME)}), got {text!r}"
        )
    if option.switch:
        if raw not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"{key} takes true or false, got {raw!r}")
        return option.dest, raw == "true"
    value = option.type(raw) if option.type is not None else raw
    if option.choices is not None and value not in option.choices:
        raise argparse.ArgumentTypeError(f"{key}={raw!r}: use one of {', '.join(option.choices)}")
    return option.dest, value


def plan_memory(config: EngineConfig, model: str) -> EngineConfig:
    """`config` with the memory settings `helios-rt plan --gpu-memory` chooses for `model`: the engine's own
    planning (`compile.memory_plan.plan_memory`, which `Engine.from_pretrained` applies too), imported when
    first used so that this table stays a leaf."""
    from .compile.memory_plan import plan_memory as planned

    return planned(config, model)
