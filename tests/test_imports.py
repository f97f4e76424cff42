"""The package's import graph, read from the source: packages import one way (no cycle
between packages or between modules), and no function imports a module of the project (those
imports are for optional heavy dependencies alone)."""

import ast
from pathlib import Path

import pjit_llm

ROOT = Path(pjit_llm.__file__).parent


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ("pjit_llm", *path.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text())
    return found


def imported(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        return [f"{node.module}.{a.name}" for a in node.names]
    return []


def edges() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> project modules it imports, "module: target" of every import in a function)."""
    mods = modules()

    def resolve(name):  # a.b.c may name module a.b's attribute c
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph, in_functions = {m: set() for m in mods}, []
    for name, tree in mods.items():
        inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
        for node in ast.walk(tree):
            for target in (resolve(t) for t in imported(node) if t.startswith("pjit_llm.")):
                if target and target != name:
                    graph[name].add(target)
                    if id(node) in inner:
                        in_functions.append(f"{name}: {target}")
    return graph, in_functions


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (ROOT / parts[-1]).is_dir() else module


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (as a path), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    return next((c for v in sorted(graph) if v not in state and (c := visit(v))), None)


def test_no_module_imports_itself_back_through_others():
    assert cycle(edges()[0]) is None


def test_no_package_imports_one_above_it():
    by_package: dict[str, set[str]] = {}
    for a, targets in edges()[0].items():
        by_package.setdefault(package(a), set()).update(package(b) for b in targets
                                                          if package(b) != package(a))
    assert cycle(by_package) is None


def test_functions_import_no_module_of_the_project():
    assert edges()[1] == []


def test_the_checks_find_a_cycle_and_a_function_level_import():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("def f():\n    from pjit_llm.config import Config\n")
    inner = [n for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)]
    assert [t for n in inner for t in imported(n)] == ["pjit_llm.config.Config"]


def test_only_the_family_table_reaches_a_family_package():
    """Everything outside models/ reaches a model family through models/families.py; the
    family packages are a table's entries, not a dependency of the rest of the code."""
    graph, _ = edges()
    families = {m for m in graph if m.startswith("pjit_llm.models.")
                and (ROOT / "models" / m.split(".")[2]).is_dir()}
    assert {"pjit_llm.models.llama", "pjit_llm.models.qwen3"} <= families
    reaching = sorted(f"{m} -> {t}" for m, targets in graph.items()
                      if not m.startswith("pjit_llm.models.") for t in targets if t in families)
    assert not reaching, reaching
