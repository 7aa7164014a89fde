"""The package's imports point one way: no cycle among ``sm3_dist``'s modules, and the kernel layer imports
nothing above it.

The graph is read from the source (``ast``), not from ``sys.modules``: every ``import``/``from ... import``
anywhere in a module (inside functions too), relative imports resolved, ``from package import name`` counted as
an import of the submodule where ``name`` is one, and the string targets of ``importlib.import_module(...)``.
The modules are the files under ``sm3_dist/`` (the core; ``launch``/``integrations``/``tools`` sit above it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sm3_dist"
OUTSIDE_THE_CORE = ("launch", "integrations", "tools")
"""Subpackages of ``sm3_dist`` that live beside the core folder (pyproject.toml's package-dir): graph nodes of
their own, ``sm3_dist.launch`` and so on, never mistaken for the package's ``__init__``."""


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = ["sm3_dist", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``path`` (module ``name``) imports, by any of the forms above."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        if not target.startswith("sm3_dist"):
            return
        full = target
        while target and target not in modules:  # "sm3_dist.kernels.math.single_block" -> the module
            target = target.rpartition(".")[0]
        if target == "sm3_dist" and full.split(".")[1:2] and full.split(".")[1] in OUTSIDE_THE_CORE:
            target = ".".join(full.split(".")[:2])  # sm3_dist.launch/.integrations/.tools: above the core
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in modules else base)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and node.args[0].value.startswith("sm3_dist")
        ):
            add(node.args[0].value)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the list of its modules (first repeated at the end), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "sm3_dist.kernels.dispatch" in graph and "sm3_dist.optimizer" in graph
    assert "sm3_dist.kernels.registry" in graph["sm3_dist.kernels.dispatch"]
    # a lazy importlib target and a function-level import are edges too
    assert "sm3_dist.kernels.cuda" in graph["sm3_dist.kernels.registry"]
    assert "sm3_dist.kernels.cpu.native_step" in graph["sm3_dist.kernels.registry"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


KERNEL_MODULES = ("sm3_dist.kernels.math", "sm3_dist.kernels.rule", "sm3_dist.kernels.cpu", "sm3_dist.kernels.cuda")
ABOVE_THE_KERNELS = ("sm3_dist.kernels.registry", "sm3_dist.kernels.dispatch", "sm3_dist.functional")
BELOW_THE_KERNELS = ("sm3_dist.layout",)


def test_kernels_import_nothing_above_them():
    """A kernel (cpu/, cuda/) and the math it shares import only the math, the rule, each other's own package and
    the layout primitives: never the registry, the dispatch or the optimizer layer."""
    graph = import_graph()
    for name, targets in graph.items():
        if not name.startswith(KERNEL_MODULES) or name.endswith(".__main__"):
            continue  # a __main__ is a command (python -m ...), imported by nothing: the application layer
        own = ".".join(name.split(".")[:3])
        allowed = ("sm3_dist.kernels.math", "sm3_dist.kernels.rule", own, *BELOW_THE_KERNELS)
        bad = sorted(t for t in targets if not t.startswith(allowed) or t.startswith(ABOVE_THE_KERNELS))
        assert not bad, f"{name} imports {bad}, above the kernel layer"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


@pytest.mark.parametrize(
    "files, cycle",
    [
        (  # a function-level import closing the loop
            {"a.py": "from sm3_dist import b\n", "b.py": "def f():\n    from sm3_dist.a import x\n"},
            ["sm3_dist.a", "sm3_dist.b", "sm3_dist.a"],
        ),
        (  # a relative import and an importlib target
            {
                "k/__init__.py": "",
                "k/x.py": "from .y import z\n",
                "k/y.py": "import importlib\nimportlib.import_module('sm3_dist.k.x')\n",
            },
            ["sm3_dist.k.x", "sm3_dist.k.y", "sm3_dist.k.x"],
        ),
        ({"a.py": "from sm3_dist import b\n", "b.py": "import torch\n"}, None),
    ],
    ids=["function-level", "relative+importlib", "no-cycle"],
)
def test_a_planted_cycle_is_named(tmp_path, files, cycle):
    _write(tmp_path, {"__init__.py": "", **files})
    assert find_cycle(import_graph(tmp_path)) == cycle
