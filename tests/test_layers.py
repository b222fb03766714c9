"""The package's layers point one way (issue 18, item 5), read from the source with ``ast``:

1. **no import cycle** between attnlab's modules, counting every import that runs: at the top of a module
   and inside functions (``import x``, ``from x import y``, relative ones resolved). An import under
   ``if TYPE_CHECKING:`` never runs (it names a type for mypy) and is not counted; neither is the implicit
   import of a module's parent packages;
2. **no private name across packages**: ``from attnlab.a.m import _helper`` (or ``m._helper`` on an imported
   module) from a module of another package. The packages are ``attnlab`` (the top-level modules
   ``attnlab/*.py``), ``attnlab.cli``, ``attnlab.explain``, ``attnlab.bench``, ``attnlab.report``,
   ``attnlab.notes``, ``attnlab.distributed``: what is shared becomes public in the lower module;
3. **command-line entry points in** ``attnlab/cli/`` **only**: no ``argparse``, no module-level ``def main``
   and no ``if __name__ == "__main__"`` elsewhere (``attnlab/__main__.py``, ``python -m attnlab``, excepted);
4. **imports point down the layers** (:data:`LAYERS`): the library's core (errors, masks, functional, the
   backends, the modules, ...) <- the walkthrough (``attnlab.explain``) <- the pictures, benchmarks and notes
   <- ``attnlab/__init__.py`` <- the command line.

A failure names each offending edge with its file and line. The checker itself is tested first on a small
package written to a temporary folder, so that a check that finds nothing is known to be able to find.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import attnlab

PACKAGE_ROOT = Path(attnlab.__file__).resolve().parent  # src/attnlab
ENTRY_POINT_HOME = "cli"  # the one package that may define command-line entry points
ENTRY_POINT_EXCEPTIONS = ("__main__",)  # attnlab/__main__.py: `python -m attnlab`


@dataclass(frozen=True)
class Import:
    """One import statement's target: ``importer`` imports ``module`` (and the name ``name`` from it, for a
    ``from module import name`` that names no submodule) at ``path:line``."""

    importer: str
    module: str
    name: str | None
    path: Path
    line: int

    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. attnlab.explain.steps
    path: Path
    is_package: bool  # an __init__.py

    @property
    def package(self) -> str:
        """The package this module belongs to: itself for an ``__init__.py``, else its parent."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


def find_modules(root: Path) -> dict[str, Module]:
    """Every module under ``root`` (a package folder), by dotted name."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = Module(".".join(parts), path, is_package)
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``) bodies."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module name of a ``from ... import`` (relative ones resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: Module, modules: dict[str, Module], top: str) -> list[Import]:
    """Every import of a module of package ``top`` that runs, wherever it is in ``module``'s file."""
    tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
    skipped = _type_checking_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == top or alias.name.startswith(f"{top}."):
                    found.append(Import(module.name, _deepest(alias.name, modules), None, module.path, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            if source != top and not source.startswith(f"{top}."):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules:  # from package import submodule
                    found.append(Import(module.name, sub, None, module.path, node.lineno))
                else:
                    found.append(Import(module.name, _deepest(source, modules), alias.name, module.path,
                                        node.lineno))
    return found


def _deepest(dotted: str, modules: dict[str, Module]) -> str:
    """The module a dotted name stands for (its longest prefix that is a module)."""
    parts = dotted.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) or dotted


def import_graph(modules: dict[str, Module], top: str) -> dict[str, list[Import]]:
    """Module -> its imports of other modules of the package (self-imports dropped)."""
    return {name: [i for i in imports_of(m, modules, top) if i.module != name and i.module in modules]
            for name, m in modules.items()}


def cycles(graph: dict[str, list[Import]]) -> list[list[Import]]:
    """One cycle (as its edges, in order) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the package is ~100 modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for edge in graph.get(v, []):
            w = edge.module
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return [_one_cycle(graph, component) for component in components]


def _one_cycle(graph: dict[str, list[Import]], component: set[str]) -> list[Import]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(component)
    parent: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for edge in graph[v]:
                w = edge.module
                if w not in component:
                    continue
                if w == start:
                    path = [edge]
                    while path[0].importer != start:
                        path.insert(0, parent[path[0].importer])
                    return path
                if w not in parent:
                    parent[w] = edge
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start} in its component")  # Tarjan said there was one


def describe(cycle: list[Import]) -> str:
    return cycle[0].importer + "".join(f"\n    -> {e.module}  ({e.where()}: "
                                       f"{'from ' + e.module + ' import ' + e.name if e.name else 'import'})"
                                       for e in cycle)


def private_imports(modules: dict[str, Module], graph: dict[str, list[Import]], top: str) -> list[str]:
    """``_name`` imported (or read off an imported module) from a module of another package."""
    found = []
    for name, module in modules.items():
        for edge in graph[name]:
            target = modules[edge.module]
            private = edge.name if edge.name and _is_private(edge.name) else (
                edge.module.rpartition(".")[2] if edge.name is None and _is_private(edge.module.rpartition(".")[2])
                else None)
            if private and target.package != module.package:
                found.append(f"{name} ({edge.where()}) imports {private} from {edge.module} "
                             f"(package {module.package} -> {target.package})")
        found += _private_attributes(module, modules, top)
    return found


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_attributes(module: Module, modules: dict[str, Module], top: str) -> list[str]:
    """``alias._name`` where ``alias`` is bound in this file to an attnlab module of another package."""
    tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in modules:
                    bound[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = f"{source}.{alias.name}"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _is_private(node.attr):
            target = bound.get(node.value.id)
            if target is not None and modules[target].package != module.package:
                found.append(f"{module.name} ({module.path.name}:{node.lineno}) reads {node.value.id}.{node.attr} "
                             f"of {target} (package {module.package} -> {modules[target].package})")
    return found


def entry_points(modules: dict[str, Module], top: str) -> list[str]:
    """argparse, a module-level ``def main`` or ``if __name__ == "__main__"`` outside ``top.cli``."""
    found = []
    for name, module in modules.items():
        if name.startswith(f"{top}.{ENTRY_POINT_HOME}.") or name == f"{top}.{ENTRY_POINT_HOME}" or \
                name in {f"{top}.{e}" for e in ENTRY_POINT_EXCEPTIONS}:
            continue
        tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "argparse" for a in node.names) or \
                    isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "argparse":
                found.append(f"{name} ({module.path.name}:{node.lineno}) imports argparse")
            elif isinstance(node, ast.If) and _is_main_guard(node.test):
                found.append(f"{name} ({module.path.name}:{node.lineno}) has if __name__ == \"__main__\"")
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "main":
                found.append(f"{name} ({module.path.name}:{node.lineno}) defines main()")
    return found


def _is_main_guard(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, *test.comparators]
    return any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and \
        any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides)


# --------------------------------------------------------------------------------------------------
# The checker, on a package planted with one of each problem
# --------------------------------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "pkg"


def test_the_checker_finds_a_cycle_through_function_level_and_relative_imports(tmp_path):
    root = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low.py": "def f():\n    from pkg.ui import page  # upward, inside a function\n    return page\n",
        "pkg/mid.py": "from .low import f\n",  # relative
        "pkg/ui/__init__.py": "",
        "pkg/ui/page.py": "from ..mid import f\n",  # relative, two levels
        "pkg/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.ui.page import f\n",
        "pkg/ok.py": "import pkg.low\n",
    })
    modules = find_modules(root)
    graph = import_graph(modules, "pkg")
    found = cycles(graph)
    assert len(found) == 1
    assert [e.importer for e in found[0]] == ["pkg.low", "pkg.ui.page", "pkg.mid"]  # the shortest, from its first
    assert [e.module for e in found[0]] == ["pkg.ui.page", "pkg.mid", "pkg.low"]
    assert "low.py:2" in describe(found[0])
    assert not [e for e in graph["pkg.typed"]]  # under TYPE_CHECKING: never runs, not an edge
    assert [e.module for e in graph["pkg.ok"]] == ["pkg.low"]


def test_the_checker_finds_private_names_across_packages_and_entry_points(tmp_path):
    root = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/core.py": "def _helper():\n    pass\n",
        "pkg/same.py": "from pkg.core import _helper\n",  # same package (the root one): allowed
        "pkg/a/__init__.py": "",
        "pkg/a/x.py": "def _inner():\n    pass\n",
        "pkg/a/y.py": "from pkg.a.x import _inner\n",  # same package: allowed
        "pkg/b/__init__.py": "",
        "pkg/b/z.py": ("from pkg.core import _helper\nfrom pkg.a import x\n"
                       "def main():\n    return x._inner()\n"),
        "pkg/b/w.py": "import argparse\nif __name__ == '__main__':\n    pass\n",
        "pkg/cli/__init__.py": "import argparse\ndef main():\n    pass\n",
        "pkg/__main__.py": "if __name__ == '__main__':\n    pass\n",
    })
    modules = find_modules(root)
    graph = import_graph(modules, "pkg")
    private = private_imports(modules, graph, "pkg")
    assert len(private) == 2, private
    assert "pkg.b.z (z.py:1) imports _helper from pkg.core (package pkg.b -> pkg)" in private
    assert any("reads x._inner of pkg.a.x" in p for p in private)
    found = entry_points(modules, "pkg")
    assert sorted(found) == ["pkg.b.w (w.py:1) imports argparse", "pkg.b.w (w.py:2) has if __name__ == \"__main__\"",
                             "pkg.b.z (z.py:3) defines main()"]


# --------------------------------------------------------------------------------------------------
# attnlab
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def attnlab_modules() -> dict[str, Module]:
    return find_modules(PACKAGE_ROOT)


@pytest.fixture(scope="module")
def attnlab_graph(attnlab_modules: dict[str, Module]) -> dict[str, list[Import]]:
    return import_graph(attnlab_modules, "attnlab")


def test_layer_of():
    assert [layer_of(m) for m in ("attnlab.errors", "attnlab.modules", "attnlab.distributed.ring",
                                  "attnlab.explain", "attnlab.explain.steps", "attnlab.maps", "attnlab.bench.decode",
                                  "attnlab", "attnlab.cli.bench", "attnlab.__main__")] == [0, 0, 0, 1, 1, 2, 2, 3, 4, 4]


def test_the_walk_sees_the_whole_package(attnlab_modules, attnlab_graph):
    """Not an empty walk: the modules every layer is made of are there, with imports found inside functions."""
    for name in ("attnlab", "attnlab.errors", "attnlab.modules", "attnlab.explain.steps", "attnlab.cli",
                 "attnlab.cli.bench", "attnlab.bench.decode", "attnlab.report.html"):
        assert name in attnlab_modules
    assert len(attnlab_modules) >= 60
    # cli.bench imports the decode benchmark's command-line part inside run(): a function-level edge
    assert "attnlab.cli.bench_decode" in {e.module for e in attnlab_graph["attnlab.cli.bench"]}


def test_no_import_cycle(attnlab_graph):
    found = cycles(attnlab_graph)
    assert not found, f"{len(found)} import cycle(s) in src/attnlab (one per group of modules):\n" + "\n".join(
        describe(c) for c in found)


def test_no_private_name_imported_across_packages(attnlab_modules, attnlab_graph):
    found = private_imports(attnlab_modules, attnlab_graph, "attnlab")
    assert not found, ("private names used across packages (make them public in the lower module):\n  "
                       + "\n  ".join(found))


def test_command_line_entry_points_live_in_cli_only(attnlab_modules):
    found = entry_points(attnlab_modules, "attnlab")
    assert not found, "command-line entry points outside attnlab/cli/:\n  " + "\n  ".join(found)


# The layers, lowest first (a module belongs to the first whose prefix it has; the rest are the library's
# core: errors, masks, functional, backends, flash, modules, cache, the variants, the pretrained models,
# attnlab.distributed). An import may go to the same layer or a lower one, never up.
LAYERS = (
    ("core", ()),
    ("walkthrough", ("attnlab.explain",)),
    ("pictures, benchmarks, notes", ("attnlab.maps", "attnlab.heatmap", "attnlab.report", "attnlab.bench",
                                     "attnlab.notes")),
    ("the package's top (attnlab/__init__.py)", ("attnlab",)),
    ("command line", ("attnlab.cli", "attnlab.__main__")),
)


def layer_of(module: str) -> int:
    """The index in LAYERS of ``module``'s layer (the package ``attnlab`` itself is its own layer)."""
    for i, (_, prefixes) in reversed(list(enumerate(LAYERS))):
        if any(module == p or (p != "attnlab" and module.startswith(f"{p}.")) for p in prefixes):
            return i
    return 0


def test_imports_point_down_the_layers(attnlab_graph):
    """core <- walkthrough <- pictures, benchmarks, notes <- attnlab/__init__.py <- command line."""
    upward = [f"{e.importer} ({LAYERS[layer_of(e.importer)][0]}, {e.where()}) imports {e.module} "
              f"({LAYERS[layer_of(e.module)][0]})"
              for edges in attnlab_graph.values() for e in edges if layer_of(e.module) > layer_of(e.importer)]
    assert not upward, "imports that point up the layers:\n  " + "\n  ".join(upward)


def test_errors_is_the_bottom_layer(attnlab_graph):
    """attnlab.errors imports nothing of attnlab, so every module may import it."""
    assert attnlab_graph["attnlab.errors"] == []
