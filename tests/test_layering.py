"""The runtime imports no tool: the import graph of `helios_rt/` and `kernels/`, read from the source.

The runtime (engine, compile without its cost model and plan report, sampling, model, ops, kernels,
fp8 without its numeric gate, parallel, serve, and the modules they stand on) is what a user loads;
the tools (benchmarking, first light, the cost model, the plan report, the sm_90 AOT report, the FP8
gate and projection) measure and describe it, and may import it. The graph is built with `ast`, not by
importing: it sees function-level imports as well as module-level ones, on any machine.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"helios_rt": ROOT / "helios_rt", "helios_rt.kernels": ROOT / "kernels"}  # kernels/ installs there

# Module-name prefixes of the tools (a prefix matches the module and everything under it).
TOOLS = (
    "helios_rt.benchmarking",
    "helios_rt.first_light",
    "helios_rt.compile.cost",
    "helios_rt.compile.report",
    "helios_rt.kernels.report",
    "helios_rt.kernels.aot",
    "helios_rt.fp8.gate",
    "helios_rt.fp8.projection",
)
# The command line puts runtime and tools together (its option table plans `--gpu-memory` with the plan
# report): neither side, and the runtime imports none of it.
ENTRY_POINTS = ("helios_rt.cli", "helios_rt.__main__", "helios_rt.options", "helios_rt.serve.cli")


def _is(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def is_tool(module: str) -> bool:
    return _is(module, TOOLS)


def is_runtime(module: str) -> bool:
    return not is_tool(module) and not _is(module, ENTRY_POINTS)


def modules() -> dict[str, Path]:
    """Every module of the two source trees: dotted name -> file."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an `ImportFrom` names (relative levels resolved against `module`)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that `module` imports anywhere in its file (module level, functions, branches).

    `from pkg import name` counts as importing `pkg.name` when that is a module, else `pkg`.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, is_package)
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import helios_rt.x.y` names a module; trim attribute tails
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {m: imports_of(m, p, known) for m, p in found.items()}


def test_the_graph_is_read_from_both_trees() -> None:
    """The reader sees both trees, relative imports, function-level imports and `kernels/` as installed."""
    graph = import_graph()
    assert "helios_rt.engine" in graph and "helios_rt.kernels.norm" in graph
    assert "helios_rt.compile.chunk_program" in graph["helios_rt.engine"]  # `from .compile.chunk_program import`
    assert "helios_rt.kernels.aot" in graph["helios_rt.kernels.report"]  # `from .aot import` inside kernels/
    assert is_tool("helios_rt.compile.cost.planned") and not is_tool("helios_rt.compile.chunk_program")


def test_the_runtime_imports_no_tool() -> None:
    """No runtime module imports a tool module, at module level or inside a function; nor the command
    line, which imports the tools (so the runtime reaches no tool through anything)."""
    graph = import_graph()
    bad = sorted(f"{m} imports {t}" for m, deps in graph.items() if is_runtime(m) for t in deps if not is_runtime(t))
    assert not bad, (
        f"{len(bad)} runtime -> tool import(s): " + "; ".join(bad)
        + ". Move the code the runtime needs out of the tool (or the CLI), or the tool's code out of the runtime"
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: its strongly connected components of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for dep in graph.get(module, ()):
            if dep not in index:
                visit(dep)
                low[module] = min(low[module], low[dep])
            elif dep in stack:
                low[module] = min(low[module], index[dep])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


OPS_AND_KERNELS = ("helios_rt.ops", "helios_rt.kernels")


def test_no_import_cycle_passes_through_the_ops_or_the_kernels() -> None:
    """The op table's layers point one way: registry <- references <- attention backends <- OpSet, and the
    kernels register in the registry; no cycle anywhere in the tree passes through a module of either."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the finder finds
    bad = [c for c in cycles(import_graph()) if any(_is(m, OPS_AND_KERNELS) for m in c)]
    assert not bad, "import cycle(s) through helios_rt.ops or the kernels: " + "; ".join(" <-> ".join(c) for c in bad)


def test_the_op_registry_is_a_leaf() -> None:
    """`ops/registry.py` imports no module of ours, not even by name through importlib: the references and
    the kernels register in it, and the selection (`ops/opset.py`) sits above it."""
    graph = import_graph()
    assert graph["helios_rt.ops.registry"] == set()
    source = modules()["helios_rt.ops.registry"].read_text()
    assert "importlib" not in source and "__import__" not in source
    assert "helios_rt.ops.registry" in graph["helios_rt.kernels.norm"]  # the kernels register there


def test_no_import_cycles_anywhere() -> None:
    """No two modules of helios_rt/ or kernels/ import each other, directly or around a ring; function-level
    imports count (a cycle hidden in a function is still one a reader must untangle)."""
    found = cycles(import_graph())
    assert not found, f"{len(found)} import cycle(s): " + "; ".join(" <-> ".join(c) for c in found) + (
        ". Move what both sides need into a leaf module both import, or invert one import"
    )
