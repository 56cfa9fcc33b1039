"""The package's shape (issue 15): no private name imported from another module, no import circle;
the speed benchmark (recover_lora_bench) beside the library, which imports it only for its command."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PKGS = ("recover_lora", "recover_lora_bench")
FILES = [p for pkg in PKGS for p in (SRC / pkg).rglob("*.py")]


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(imported module, names, line, at module level) of every import of the two packages, relative
    or absolute, at any depth of the file."""
    mod = _module(path)
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[:len(pkg) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PKGS:
            target = node.module
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PKGS:
                    yield a.name, [], node.lineno, id(node) in top
            continue
        else:
            continue
        yield target, [a.name for a in node.names], node.lineno, id(node) in top


def test_no_private_name_is_imported_from_another_module():
    bad = [f"{p.relative_to(SRC)}:{line} imports {n} from {target}"
           for p in FILES for target, names, line, _ in _imports(p)
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_the_library_imports_the_bench_only_in_its_command_when_it_runs():
    uses = [(p.relative_to(SRC).as_posix(), top) for p in (SRC / "recover_lora").rglob("*.py")
            for target, _, _, top in _imports(p) if target.split(".")[0] == "recover_lora_bench"]
    assert uses and set(uses) == {("recover_lora/commands.py", False)}, uses


def test_no_import_circle():
    mods = {_module(p): p for p in FILES}
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        for target, names, _, _ in _imports(p):
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


def test_every_top_level_name_resolves():
    """``from recover_lora import X`` works for every advertised X (their homes move with the code),
    and no subpackage shadows one of them (``recover_lora.train`` is the function)."""
    import importlib
    import inspect

    import recover_lora

    for name in recover_lora.__all__:
        assert getattr(recover_lora, name) is not None, name
    importlib.import_module("recover_lora.training.loop")  # a subpackage imported first must not shadow it
    assert inspect.isfunction(recover_lora.train) and inspect.isfunction(recover_lora.measure)
