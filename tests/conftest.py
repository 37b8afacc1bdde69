"""Shared test set-up.

- Triton reads TRITON_INTERPRET when it is first imported, so it is set here, before any test module
  imports triton: on a machine without CUDA, kernels run on the interpreter against CPU tensors.
- Every CUDA-only test carries the `gpu` mark (checked at collection, `pytest_collection_modifyitems`).
- The repository root must not be importable: its `kernels/` folder (installed as
  `helios_rt.kernels`) would shadow the unrelated PyPI package `kernels`, which diffusers probes for.
  `python -m pytest` puts the working directory on sys.path, so it is taken off again.
- Shared fixtures: `tiny_config` (the small CPU EngineConfig, as a factory) and `tiny_engine` /
  `make_tiny_engine` (an engine with untrained random weights over it). Each is built in one function
  here (`tiny_engine_config`, `random_weights_engine`), so a change to EngineConfig or to the demo
  model is a one-line change for every test.
- Two tiers: `pytest -m "not slow"` is the fast tier to run between edits; plain `pytest` (CI) runs all.
  Whole files are marked slow in `SLOW_FILES` below (files other code owns are marked here rather
  than in the file).
"""

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

try:
    from hypothesis import settings
except ImportError:  # a bare GPU machine (first light) may lack the test extras; only property tests need it
    settings = None

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]
sys.modules.pop("kernels", None)

# helios_rt imports triton: only now, after TRITON_INTERPRET is set and the repository root is off sys.path
from support.untrained import untrained_engine  # noqa: E402

from helios_rt import Engine, EngineConfig  # noqa: E402

# One thread per worker under pytest-xdist (`-n 2` on CI's 2 cores: most test time is single-threaded
# Python, the Triton interpreter above all); up to two threads in a single process.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

# Property tests draw fresh examples locally; CI replays a fixed, derandomised set so a red run is reproducible.
if settings is not None:
    settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    if os.environ.get("CI") == "true":
        settings.load_profile("ci")


def _cuda_only(item) -> bool:
    """A skipif whose condition is "this machine has no CUDA" and whose reason names CUDA."""
    no_cuda = not torch.cuda.is_available()
    return any(
        m.args and isinstance(m.args[0], bool) and m.args[0] == no_cuda and "CUDA" in str(m.kwargs.get("reason", ""))
        for m in item.iter_markers("skipif")
    )


# The slow tests of files whose owners mark nothing themselves (the other files carry their own
# `pytest.mark.slow`): "file" is every test in it, "file::test" every case of a test, "file::test[id]" one.
# Measured with `pytest -n 2 --durations` on 2 cores: each costs about 8 s or more (or its file's setup does).
SLOW_TESTS = frozenset(
    {
        "test_chunk_program.py::test_compiled_chunk_on_the_triton_kernels_equals_their_eager_run",
        "test_chunk_program.py::test_a_steady_state_chunk_allocates_nothing[triton]",
        "test_chunk_program.py::test_compiled_chunk_through_a_prompt_switch_equals_the_eager_stream",
        "test_chunk_program.py::test_streams_take_turns_on_one_program",
        "test_engine.py::test_memory_stays_flat_over_40_chunks",
        "test_engine_triton.py",
        "test_engine_oracle.py",
        "test_engine_fidelity.py::test_positive_and_negative_embeddings_of_different_lengths[triton]",
        "test_engine_fidelity.py::test_a_checkpoint_that_diffusers_loads[triton]",
        "test_chunk_program.py::test_compiled_chunk_equals_the_eager_engine_bit_for_bit",
        "test_chunk_program.py::test_chunk_kinds_follow_amplification_and_the_prefix",
        "test_chunk_program.py::test_warmup_keeps_the_owners_history_and_resets_its_own",
        "test_chunk_program.py::test_graphs_dropped_mid_stream_are_captured_again",
        "test_cli_signals.py",
        "test_cli_options.py::test_a_memory_budget_follows_the_plans_choice",
        "test_cli.py::test_generate_verbose_prints_the_cold_start_by_phase",
        "test_kernels_aot.py::test_every_launch_compiles",
        "test_kernels_aot.py::test_the_report_uses_the_jit_specialisation",
        "test_kernels_aot.py::test_no_spills_and_smem_fits",
        "test_kernels_aot.py::test_report_and_jit_agree_on_registers",
    }
)


def _slow_keys(item) -> set[str]:
    """The SLOW_TESTS entries that would name `item`."""
    name = item.path.name
    return {name, f"{name}::{getattr(item, 'originalname', item.name)}", f"{name}::{item.name}"}


def _mark_slow(items) -> None:
    """Mark the SLOW_TESTS; an entry naming a test its (collected) file no longer defines stops the run,
    so a renamed test cannot slip into the fast tier unnoticed."""
    for item in items:
        if _slow_keys(item) & SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
    modules = {item.path.name: item.module for item in items if getattr(item, "module", None) is not None}
    stale = [
        entry
        for entry in sorted(SLOW_TESTS)
        if "::" in entry
        and entry.split("::")[0] in modules
        and not hasattr(modules[entry.split("::")[0]], entry.split("::")[1].split("[")[0])
    ]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW_TESTS names tests that do not exist (renamed?): {stale}")


def pytest_collection_modifyitems(config, items) -> None:
    """Every CUDA-only test carries the `gpu` mark, so that `pytest -m gpu` (and first light) selects
    them all: an unmarked one stops the run. The SLOW_TESTS get the `slow` mark (before `-m` selects)."""
    unmarked = [item.nodeid for item in items if item.get_closest_marker("gpu") is None and _cuda_only(item)]
    if unmarked:
        raise pytest.UsageError(f"CUDA-only tests without the gpu mark (add @pytest.mark.gpu): {', '.join(unmarked)}")
    _mark_slow(items)


# ---- shared fixtures --------------------------------------------------------------------------------------
def tiny_engine_config(**changes: Any) -> EngineConfig:
    """The small engine most tests run: 64x64 float32 on the CPU with the PyTorch reference ops.

    `changes` go through EngineConfig's own constructor (so a renamed field warns as it does for users).
    The one place that spells this config: when EngineConfig's fields change, only this line does.
    """
    fields = dict(height=64, width=64, device="cpu", dtype="float32", kernels="reference")
    return EngineConfig(**{**fields, **changes})


def random_weights_engine(config: EngineConfig) -> Engine:
    """An engine with untrained, seeded random weights: for tests of plumbing, shapes, scheduling and
    faults, which need a model every machine builds in a second, not a good video. The one place that
    says where those weights come from: the untrained model's checkpoint folder (support/untrained.py)."""
    return untrained_engine(config)


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., EngineConfig]:
    """`tiny_config(**changes)`: the small CPU EngineConfig, with `changes` applied."""
    return tiny_engine_config


@pytest.fixture(scope="session")
def make_tiny_engine() -> Callable[..., Engine]:
    """`make_tiny_engine(**changes)`: a fresh random-weights engine over `tiny_config(**changes)`, for a
    test that breaks, closes or reconfigures its engine."""
    return lambda **changes: random_weights_engine(tiny_engine_config(**changes))


@pytest.fixture(scope="module")
def tiny_engine() -> Engine:
    """One random-weights engine over `tiny_config()` per test module, for tests that leave it as they
    found it (module scope, as the files had it: a test that breaks an engine must not reach another file)."""
    return random_weights_engine(tiny_engine_config())
