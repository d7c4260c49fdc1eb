"""The shape of the code a newcomer carries on: small functions, no import cycles, a library that logs.

Read from the source with ``ast``, nothing imported: these hold for every module in the library.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("onnxprune", "passes")
MAX_FUNCTION_LINES = 100


def library_files() -> list[Path]:
    return sorted(p for package in LIBRARY for p in (ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def long_functions(path: Path) -> list[str]:
    tree = parse(path)
    return [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]


def module_level_imports(path: Path, known: set[str]) -> set[str]:
    """The library modules ``path`` imports when it is imported (not inside functions or TYPE_CHECKING blocks)."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(parse(path).body)
    return {name for name in found if name in known}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path of module names, or None."""
    state: dict[str, str] = {}

    def walk(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [node, nxt] if nxt in trail else [node, nxt]
            if nxt not in state and (cycle := walk(nxt, trail + [node])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start, [])):
            return cycle
    return None


def test_no_library_function_is_over_a_hundred_lines():
    offenders = [entry for path in library_files() for entry in long_functions(path)]
    assert not offenders, "split these functions:\n" + "\n".join(offenders)


def test_library_modules_import_each_other_without_a_cycle():
    files = library_files()
    known = {module_name(p) for p in files}
    graph = {module_name(p): module_level_imports(p, known) - {module_name(p)} for p in files}
    # a package's __init__ imported on the way to its submodule is not an edge back
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_library_code_logs_instead_of_printing():
    printing = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in library_files()
                if path.name not in ("cli.py", "__main__.py")  # the command line is where output is printed
                for node in ast.walk(parse(path))
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert not printing, "use logging in the library: " + ", ".join(printing)


def test_cycle_finder_finds_a_cycle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"a"}}) is not None
