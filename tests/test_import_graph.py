"""The package's own imports form no circle, and only the command line exits the process.

Every ``import`` statement of every module under ``adamerging_jax/`` counts, at module level or inside a
function: an import deferred into a function is still a dependency, and a circle hidden that way is still a
circle. ``from adamerging_jax.x import y`` is an edge to the module ``adamerging_jax.x.y`` when ``y`` is one,
else to ``adamerging_jax.x``; relative imports are resolved against the importing module's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "adamerging_jax"
COMMAND_LINE = "adamerging_jax.cli"


def module_files(package: Path) -> dict[str, Path]:
    """{dotted module name: file} of every ``.py`` file under ``package`` (``__init__.py`` named as its package)."""
    files = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imported_modules(module: str, path: Path, files: dict[str, Path]) -> set[str]:
    """The package's own modules that ``module`` (at ``path``) imports anywhere in its body."""
    root = module.split(".")[0]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                targets.add(submodule if submodule in files else target)
    return {target for target in targets if target.split(".")[0] == root and target in files and target != module}


def import_graph(package: Path) -> dict[str, set[str]]:
    files = module_files(package)
    return {module: imported_modules(module, path, files) for module, path in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def process_exits(path: Path) -> list[int]:
    """The lines of ``path`` that name ``SystemExit`` or call ``sys.exit`` / ``exit``."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Name) and node.id in ("SystemExit", "exit"):
            lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "exit" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            lines.append(node.lineno)
    return lines


def test_the_package_imports_no_module_in_a_circle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and "adamerging_jax.core.registry" in graph["adamerging_jax"], "the walk sees imports"
    assert circles(graph) == []


def test_library_modules_never_exit_the_process():
    exits = {module: lines for module, path in module_files(PACKAGE).items()
             if module != COMMAND_LINE and (lines := process_exits(path))}
    assert exits == {}, "library modules raise (merging.errors.MergeError); only the command line exits"
    assert process_exits(PACKAGE / "cli.py"), "the check sees the command line's exits"


def test_a_circle_through_relative_submodule_and_deferred_imports_is_found(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "from . import b\n",            # a submodule of the package → pkg.sub.b
        "pkg/sub/b.py": "def f():\n    from ..c import g\n",  # deferred, relative two levels up → pkg.c
        "pkg/c.py": "from pkg.sub import b\nimport os\n",      # `from package import submodule` → pkg.sub.b
        "pkg/d.py": "from pkg.c import name\n",                # a name, not a module → pkg.c; no circle
    }
    for name, source in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    graph = import_graph(tmp_path / "pkg")
    assert graph["pkg.sub"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.sub.b"} and graph["pkg.d"] == {"pkg.c"}
    assert circles(graph) == [["pkg.c", "pkg.sub.b"]]
    assert circles({**graph, "pkg.c": set()}) == []
