"""The package's imports run one way: no package imports one that imports it back (read from the source, so a
lazy import inside a function counts too)."""

import ast
from pathlib import Path

import hf_prune

ROOT = Path(hf_prune.__file__).parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = ("hf_prune",) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{alias.name}" for alias in node.names]
            found.update(name for name in submodules if name in modules)
            if not all(name in modules for name in submodules):
                found.add(target)
    return {name for name in found if name in modules}


def unit(module: str) -> str:
    """The unit imports are checked between: a top-level module or package, and each method's own folder."""
    parts = module.split(".")
    return ".".join(parts[:3] if len(parts) > 2 and parts[1] == "methods" else parts[:2])


def unit_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        for target in _imported(module, path, modules):
            if unit(target) != unit(module):
                graph.setdefault(unit(module), set()).add(unit(target))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one unit (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in list(graph):
        if node not in index:
            visit(node)
    return groups


def test_no_package_imports_back_up():
    assert cycles(unit_graph()) == []


def test_the_cycle_check_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_shared_machinery_never_imports_a_method():
    graph = unit_graph()
    shared = ("hf_prune.pruning", "hf_prune.calibration", "hf_prune.surgery", "hf_prune.adapters")
    for name in shared:
        assert not {t for t in graph.get(name, ()) if t.startswith("hf_prune.methods")}, name
    assert "hf_prune.registry" not in {t for m, ts in graph.items() if m.startswith("hf_prune.methods") for t in ts}
