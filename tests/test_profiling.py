"""NVTX ranges: nesting and push/pop order against a mocked `nvtx` module, the disabled path, the nsys command."""

from __future__ import annotations

import shlex
import time

import pytest

from helios_rt import profiling
from helios_rt.profiling import DOMAIN, nsys_command, nvtx_range


class FakeNvtx:
    """Records push/pop/mark calls and checks that pops match pushes."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.depth = 0

    def push_range(self, message=None, color="blue", domain=None, **_):
        self.depth += 1
        self.events.append(("push", message, color, domain))

    def pop_range(self, domain=None):
        assert self.depth > 0, "pop without push"
        self.depth -= 1
        self.events.append(("pop", domain))

    def mark(self, message=None, color=None, domain=None, **_):
        self.events.append(("mark", message, domain))


class Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"the nvtx module was used ({name}) while ranges are disabled")


@pytest.fixture
def fake(monkeypatch):
    mod = FakeNvtx()
    monkeypatch.setattr(profiling, "_nvtx_module", mod)
    monkeypatch.setattr(profiling, "_enabled", True)
    return mod


def test_ranges_nest_and_pop_in_order(fake) -> None:
    with nvtx_range("chunk 0"):
        with nvtx_range("stage 0", color="green"), nvtx_range("step 0"):
            assert fake.depth == 3
        with nvtx_range("stage 1"):
            pass
    assert fake.depth == 0
    assert [e[:2] for e in fake.events] == [
        ("push", "chunk 0"), ("push", "stage 0"), ("push", "step 0"), ("pop", DOMAIN), ("pop", DOMAIN),
        ("push", "stage 1"), ("pop", DOMAIN), ("pop", DOMAIN),
    ]  # fmt: skip
    pushes = [e for e in fake.events if e[0] == "push"]
    assert all(e[3] == DOMAIN for e in pushes)
    assert pushes[1][2] == "green"
    assert pushes[0][2] == "blue"  # no color given: nvtx's own default


def test_range_pops_on_exception(fake) -> None:
    with pytest.raises(RuntimeError), nvtx_range("decode"):
        raise RuntimeError("boom")
    assert fake.depth == 0 and fake.events[-1] == ("pop", DOMAIN)


def test_decorator_recursion_and_reuse(fake) -> None:
    @nvtx_range("step")
    def step(n: int) -> int:
        assert fake.depth == 3 - n
        return 0 if n == 0 else 1 + step(n - 1)

    assert step(2) == 2
    assert fake.depth == 0
    assert [e[0] for e in fake.events] == ["push"] * 3 + ["pop"] * 3
    r = nvtx_range("same instance")
    with r, r:  # one instance entered twice before exiting
        assert fake.depth == 2
    assert fake.depth == 0


def test_decorator_follows_later_switch(fake) -> None:
    @nvtx_range("load")
    def load() -> str:
        return "ok"

    profiling.set_enabled(False)
    assert load() == "ok" and fake.events == []
    profiling.set_enabled(True)
    assert load() == "ok" and [e[0] for e in fake.events] == ["push", "pop"]


def test_disabled_is_a_noop(monkeypatch) -> None:
    monkeypatch.setattr(profiling, "_nvtx_module", Untouchable())
    monkeypatch.setattr(profiling, "_enabled", False)

    @nvtx_range("f")
    def f(x):
        return x + 1

    with nvtx_range("a"), nvtx_range("b", color="red"):
        assert f(1) == 2
    profiling.mark("m")
    assert not profiling.enabled()


def test_absent_module_is_a_noop(monkeypatch) -> None:
    monkeypatch.setattr(profiling, "_nvtx_module", None)
    monkeypatch.setattr(profiling, "_enabled", True)
    with nvtx_range("a"):
        pass
    profiling.mark("m")
    assert not profiling.enabled() and not profiling.available()


def test_environment_switch(monkeypatch, fake) -> None:
    monkeypatch.setenv(profiling.ENV_VAR, "1")
    profiling.set_enabled(None)
    assert profiling.enabled()
    monkeypatch.setenv(profiling.ENV_VAR, "0")
    profiling.set_enabled(None)
    assert not profiling.enabled()
    monkeypatch.delenv(profiling.ENV_VAR)
    profiling.set_enabled(None)
    assert not profiling.enabled()


def test_mark(fake) -> None:
    profiling.mark("first frame")
    assert fake.events == [("mark", "first frame", DOMAIN)]


def test_disabled_overhead_is_small(monkeypatch) -> None:
    monkeypatch.setattr(profiling, "_enabled", False)
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        with nvtx_range("x"):
            pass
    per = (time.perf_counter() - t0) / n
    assert per < 20e-6, f"{per * 1e6:.2f} us per disabled range"


def test_nsys_command() -> None:
    argv = ["generate", "--model", "/ckpt/Helios Distilled", "--prompt", "a fish", "--num-frames", "99"]
    cmd = nsys_command(argv, output="out/prof")
    parts = shlex.split(cmd)
    assert parts[:4] == ["nsys", "profile", "-t", "cuda,nvtx,osrt"]
    assert "--capture-range=nvtx" in parts
    assert f"--nvtx-capture={profiling.CAPTURE_RANGE}@{DOMAIN}" in parts
    assert "--capture-range-end=stop" in parts
    assert "--cuda-graph-trace=node" in parts
    env = next(p for p in parts if p.startswith("--env-var="))
    assert "HELIOS_RT_NVTX=1" in env and "NSYS_NVTX_PROFILER_REGISTER_ONLY=0" in env
    assert parts[parts.index("-o") + 1] == "out/prof"
    i = parts.index("helios-rt")
    assert parts[i + 1 :] == argv  # the path with a space survives quoting
    assert nsys_command(["helios-rt", *argv], output="out/prof") == cmd


def test_nsys_command_whole_run_and_errors() -> None:
    parts = shlex.split(nsys_command(["generate", "--model", "demo"], capture_range=None, trace=("cuda", "nvtx")))
    assert not any(p.startswith("--capture-range") or p.startswith("--nvtx-capture") for p in parts)
    assert parts[3] == "cuda,nvtx"
    with pytest.raises(ValueError):
        nsys_command([])
