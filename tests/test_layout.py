"""The package's shape (issue 15): no private name imported from another module, no import circle."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "src" / "recover_lora"


def _module(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(imported module, names, line) of every relative import, at any depth of the file."""
    mod = _module(path)
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[:len(pkg) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            yield target, [a.name for a in node.names], node.lineno


def test_no_private_name_is_imported_from_another_module():
    bad = [f"{p.relative_to(PKG)}:{line} imports {n} from {target}"
           for p in PKG.rglob("*.py") for target, names, line in _imports(p)
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for target, names, _ in _imports(p):
            for t in [target] + [f"{target}.{n}" for n in names]:
                if t in mods and t != m:
                    graph[m].add(t)
    for m in graph:  # the package __init__ re-exports lazily; a module importing its parent package is not a cycle
        graph[m].discard("recover_lora")
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)
