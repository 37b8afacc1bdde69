"""The pass/fail half of first light: the gpu-marked tests, the kernel tests on the device, and the
head-dim-128 kernels against their references.

The GPU path's behaviour (replay equal to eager, decode overlap, no device sync, flat memory) is
already specified by the gpu-marked tests (tests/test_gpu_chunk_graph.py); first light runs them in a
pytest subprocess and reports each behaviour from its tests' results, so a check here and a test there
cannot disagree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from .profile import Profile
from .report import FAIL, PASS, SKIP, Check

# behaviour -> the test functions (in tests/test_gpu_chunk_graph.py) that check it
BEHAVIOURS = {
    "graph replay == eager (bit-equal, reference and Triton ops)": "test_chunk_graph_replay_equals_the_eager_engine",
    "decode of chunk k overlaps compute of chunk k+1 (stream events)": "test_decode_of_chunk_k_overlaps_compute",
    "no synchronising call in the steady state (sync debug mode: error)":
        "test_steady_state_chunks_issue_no_device_synchronize",
    "memory flat over 50 chunks": "test_memory_is_constant_over_50_chunks",
    "a replayed chunk allocates nothing; intermediates in the arena (allocator snapshot, addresses)":
        "test_a_replayed_chunk_allocates_nothing_and_its_intermediates_live_in_the_arena",
    "lane and stage timings are timed CUDA events": "test_lane_and_stage_timings_are_cuda_events",
    "a prompt switch lands in the latents at the announced chunk":
        "test_set_prompt_switches_the_latents_at_the_announced_chunk",
}
KERNEL_TESTS = (
    "test_kernels_attention.py", "test_kernels_norm.py", "test_kernels_sampler.py", "test_fp8_kernels.py",
)


def tests_dir() -> Path:
    """The checkout's tests/ folder (first light runs from a checkout: `pip install --no-deps -e .`)."""
    path = Path(__file__).resolve().parents[2] / "tests"
    if not (path / "conftest.py").is_file():
        raise FileNotFoundError(
            f"{path} holds no test suite: first light runs the tests of a checkout; install the package "
            "with `pip install --no-deps -e .` from the repository and run it there"
        )
    return path


def gpu_test_files(tests: Path) -> list[Path]:
    """The test files that hold gpu-marked tests (found by their source, without importing them)."""
    return sorted(p for p in tests.glob("test_*.py") if "mark.gpu" in p.read_text())


def pytest_command(tests: Path, junit: Path, files: list[Path], marker: str | None) -> list[str]:
    """pytest on `files` only: collecting the whole suite would import the oracle's and the video tests'
    packages (diffusers, av), which a bare GPU machine may lack."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           f"--rootdir={tests.parent}"]  # fmt: skip
    return [*cmd, *(["-m", marker] if marker else []), *map(str, files)]


def run_pytests(runs: list[tuple[list[str], Path]], timeout_s: float) -> list[tuple[int, str]]:
    """Run pytest subprocesses at once (on a GPU machine they are bound by Triton's compilation on the
    CPU cores), each logging to its file; returns each exit code (-1: timed out) and summary line."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    procs = []
    for cmd, log in runs:
        with log.open("w") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
    deadline, results = time.monotonic() + timeout_s, []
    for proc, (_, log) in zip(procs, runs, strict=True):
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            results.append((-1, f"timed out after {timeout_s:.0f} s (see {log.name})"))
            continue
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        results.append((rc, lines[-1] if lines else "(no output)"))
    return results


def junit_cases(junit: Path) -> dict[str, str]:
    """test id (file::name[params]) -> PASS, FAIL or SKIP, from pytest's junit XML."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            out[test_id] = FAIL
        else:
            out[test_id] = SKIP if case.find("skipped") is not None else PASS
    return out


def suite_check(name: str, cases: dict[str, str], rc: int, summary: str, skips_fail: bool) -> Check:
    """One check over a pytest run: fails on a failed test, a crash, nothing run, or (GPU) any skip."""
    failed = [t for t, s in cases.items() if s == FAIL]
    skipped = [t for t, s in cases.items() if s == SKIP]
    if failed or rc not in (0, 5) or not cases:
        detail = f"{len(failed)} failed: {', '.join(failed[:5])}" if failed else f"pytest exit {rc}: {summary}"
        return Check(name, FAIL, detail)
    if skipped:
        return Check(name, FAIL if skips_fail else SKIP, f"{len(skipped)} of {len(cases)} skipped: {summary}")
    return Check(name, PASS, summary)


def behaviour_checks(cases: dict[str, str], skips_fail: bool) -> list[Check]:
    """Each GPU behaviour from the results of the tests that specify it."""
    out = []
    for behaviour, test in BEHAVIOURS.items():
        results = [s for t, s in cases.items() if test in t]
        if not results:
            out.append(Check(behaviour, FAIL, f"no test named {test}* ran"))
        elif FAIL in results:
            out.append(Check(behaviour, FAIL, f"{results.count(FAIL)} of {len(results)} {test}* failed"))
        elif SKIP in results:
            out.append(Check(behaviour, FAIL if skips_fail else SKIP, f"{test}* skipped (needs CUDA)"))
        else:
            out.append(Check(behaviour, PASS, f"{len(results)} x {test}"))
    return out


def test_checks(profile: Profile, out_dir: Path, timeout_s: float) -> list[Check]:
    """The gpu-marked tests (and, on a GPU, the kernel test files compiled for it), as checks.

    The files with gpu-marked tests are found by their source; tests/conftest.py refuses a CUDA-only
    test without the mark, so `-m gpu` over them is `-m gpu` over the suite.
    """
    tests = tests_dir()
    suites = [("pytest -m gpu", "gpu", gpu_test_files(tests), "gpu")]
    if profile.kernel_tests:
        suites.append(("kernel tests, compiled on the device", "kernels", [tests / f for f in KERNEL_TESTS], None))
    runs = [(pytest_command(tests, out_dir / f"pytest-{tag}.xml", files, marker), out_dir / f"pytest-{tag}.log")
            for _, tag, files, marker in suites]  # fmt: skip
    checks = []
    for (name, tag, _, _), (rc, summary) in zip(suites, run_pytests(runs, timeout_s), strict=True):
        junit = out_dir / f"pytest-{tag}.xml"
        cases = junit_cases(junit) if junit.is_file() else {}
        checks.append(suite_check(name, cases, rc, summary, profile.skips_fail))
        if tag == "gpu":
            checks += behaviour_checks(cases, profile.skips_fail)
    return checks


def head_dim_128_checks(profile: Profile) -> list[Check]:
    """qk_norm_rope and attention at head dim 128 (the 14B model's) on the kernel device, against their
    PyTorch references, with the kernel tests' error bound (helios_rt.kernels.testing)."""
    from ..kernels import attention as K
    from ..kernels.testing import check_op, kernel_device, to_device, upcast
    from ..ops import reference as R

    device = kernel_device()
    b, n, heads = profile.kernel_check
    dh, hd = 128, profile.kernel_check[2] * 128
    g = torch.Generator().manual_seed(128)
    checks = []
    for dtype in profile.kernel_dtypes:
        q, k, v = (torch.randn(b, n, heads, dh, generator=g).to(dtype) for _ in range(3))
        qw, kw = (torch.rand(hd, generator=g) + 0.5 for _ in range(2))
        ang = torch.rand(n, dh // 2, generator=g) * 6.283
        args = (qw, kw, ang.cos(), ang.sin(), heads, 1e-6, 1 + torch.rand(heads, generator=g) * 9, n // 3)
        name = f"head dim 128 on {device.type}, {str(dtype).removeprefix('torch.')}, [{b}, {n}, {heads}, 128]"
        try:
            out = K.attention(*to_device((q, k, v), device))
            check_op("attention", out, R.attention(*upcast((q, k, v))), R.attention(q, k, v), dtype)
            q2, k2 = q.reshape(b, n, hd), k.reshape(b, n, hd)
            qo, ko = K.qk_norm_rope(*to_device((q2, k2, *args), device))
            ref32, naive = R.qk_norm_rope(*upcast((q2, k2)), *args), R.qk_norm_rope(q2, k2, *args)
            check_op("qk_norm_rope(q)", qo, ref32[0], naive[0], dtype)
            check_op("qk_norm_rope(k)", ko, ref32[1], naive[1], dtype)
        except AssertionError as err:
            checks.append(Check(name, FAIL, str(err).splitlines()[0]))
            continue
        checks.append(Check(name, PASS, "attention and qk_norm_rope within the kernel tests' bound"))
    return checks
