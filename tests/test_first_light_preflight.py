"""First light's preflight: each missing requirement is named in the table with its fix.

The probes are patched to simulate a bare CUDA image missing one thing at a time; one test runs the
real probes on this machine.
"""

from __future__ import annotations

import pytest

from helios_rt.first_light import preflight as pf

ALL_PRESENT = {
    "probe_c_compiler": (True, "/usr/bin/gcc"),
    "probe_python_h": (True, "/usr/include/python3.11/Python.h"),
    "probe_cuda": (True, "1 x NVIDIA H100 80GB HBM3"),
}

# (what the table calls it, which probe to break, what the fix must say)
MISSING = [
    ("C compiler (Triton)", "probe_c_compiler", "apt-get install gcc g++"),
    ("Python.h", "probe_python_h", "-dev`"),
    ("numpy", "numpy", "pip install --no-deps numpy-*.whl"),
    ("safetensors", "safetensors", "pip install --no-deps safetensors-*.whl"),
    ("pytest", "pytest", "pytest-*.whl iniconfig-*.whl pluggy-*.whl packaging-*.whl pygments-*.whl"),
    ("triton", "triton", "pip install --no-deps triton-*.whl"),
    ("helios_rt._planner", "helios_rt._planner", "pip install --no-deps --no-build-isolation -e ."),
    ("CUDA device", "probe_cuda", "run on the GPU machine"),
]


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """A machine where everything is present; `machine(thing)` takes one probe or module away."""
    for name, result in ALL_PRESENT.items():
        monkeypatch.setattr(pf, name, lambda result=result: result)
    monkeypatch.setattr(pf, "probe_module", lambda name: (True, f"{name} 1.0"))

    def take_away(thing: str) -> None:
        if thing.startswith("probe_"):
            monkeypatch.setattr(pf, thing, lambda: (False, f"simulated: no {thing}"))
        else:
            present = pf.probe_module
            monkeypatch.setattr(
                pf,
                "probe_module",
                lambda name: (False, f"No module named {name!r}") if name == thing else present(name),
            )

    return take_away


def _row(table: str, name: str) -> list[str]:
    (row,) = [line for line in table.splitlines() if line.startswith(f"| {name} |")]
    return [cell.strip() for cell in row.strip("|").split(" | ")]


def test_everything_present_is_one_table_with_no_fixes(machine) -> None:
    reqs = pf.preflight(dry_run=False)
    assert pf.missing(reqs) == []
    assert [r.name for r in reqs] == [name for name, _, _ in MISSING]
    table = pf.preflight_table(reqs)
    assert table.splitlines()[0] == "| what | found | fix |"
    assert _row(table, "numpy") == ["numpy", "numpy 1.0", ""]


@pytest.mark.parametrize(("name", "thing", "fix"), MISSING, ids=[m[0] for m in MISSING])
def test_each_missing_requirement_is_named_with_its_fix(machine, name: str, thing: str, fix: str) -> None:
    machine(thing)
    reqs = pf.preflight(dry_run=False)
    assert [r.name for r in pf.missing(reqs)] == [name]
    what, found, row_fix = _row(pf.preflight_table(reqs), name)
    assert found.startswith("MISSING: ")
    assert fix in row_fix
    assert all(_row(pf.preflight_table(reqs), r.name)[2] == "" for r in reqs if r.name != name)


def test_a_dry_run_needs_no_cuda_device(machine) -> None:
    machine("probe_cuda")
    reqs = pf.preflight(dry_run=True)
    assert pf.missing(reqs) == []
    assert _row(pf.preflight_table(reqs), "CUDA device")[1].startswith("not needed for --dry-run")


def test_several_missing_are_all_named_in_one_table(machine) -> None:
    machine("safetensors")
    machine("pytest")
    machine("probe_python_h")
    reqs = pf.preflight(dry_run=False)
    assert [r.name for r in pf.missing(reqs)] == ["Python.h", "safetensors", "pytest"]


def test_a_pipe_in_an_error_does_not_break_the_row() -> None:
    table = pf.preflight_table([pf.Requirement("triton", False, "ImportError: a | b\nc", "fix it")])
    assert _row(table, "triton") == ["triton", "MISSING: ImportError: a \\| b c", "fix it"]


def test_the_real_probes_on_this_machine() -> None:
    """This machine builds the planner and runs the suite, so everything but the GPU is present."""
    reqs = pf.preflight(dry_run=True)
    assert pf.missing(reqs) == [], pf.preflight_table(reqs)


def test_a_cc_that_is_not_on_path_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "helios-no-such-cc -O2")
    ok, found = pf.probe_c_compiler()
    assert not ok and "helios-no-such-cc" in found


def test_a_module_that_fails_to_import_is_missing_with_its_error() -> None:
    ok, found = pf.probe_module("helios_rt_no_such_module")
    assert not ok and found == "ModuleNotFoundError: No module named 'helios_rt_no_such_module'"


def test_first_light_stops_at_the_preflight_before_any_work(machine, monkeypatch, tmp_path, capsys) -> None:
    """`python -m helios_rt.first_light --dry-run` prints the table first and, with safetensors missing,
    exits 2 naming it, before a phase runs or the output folder is made."""
    from helios_rt.first_light import cli

    monkeypatch.setattr(cli, "_needs_interpreter", lambda profile: False)
    monkeypatch.setattr(cli, "run", lambda *a, **k: pytest.fail("a phase ran despite a missing requirement"))
    machine("safetensors")
    out = tmp_path / "results"
    assert cli.main([str(out), "--dry-run"]) == cli.EXIT_USAGE
    printed = capsys.readouterr()
    assert "| safetensors |" in printed.out and "missing safetensors" in printed.err
    assert not out.exists()
