"""Tests of the code base's shape: imports between the top-level files point one way, down the
README's reading order (no circle, no project import hidden inside a function), and the README's
file map lists every file with its current size."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p.stem for p in ROOT.glob("*.py"))


def project_imports(module):
    """{imported project module: [(line, nested in a function or class?)]} of one top-level file."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    found = {}

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [a.name.split(".")[0] for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module.split(".")[0]]
            for name in names:
                if name in FILES and name != module:
                    found.setdefault(name, []).append((child.lineno, nested))
            visit(child, nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.If)))
    visit(tree, False)
    return found


def find_circle(graph):
    """A list of modules that import each other in a circle, or None. graph: {module: {imports}}."""
    state = {}

    def walk(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                circle = walk(nxt, path + [nxt])
                if circle:
                    return circle
        state[node] = "done"
        return None
    for start in sorted(graph):
        if start not in state:
            circle = walk(start, [start])
            if circle:
                return circle
    return None


def readme_file_map():
    """[(file stem, line count stated)] from the README's table 'Files, in reading order'."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Files, in reading order", 1)[1].split("\n## ", 1)[0]
    return [(name, int(n)) for name, n in re.findall(r"^\| `(\w+)\.py` \| (\d+) \|", section, re.M)]


def test_the_circle_finder_finds_circles_and_only_circles():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]


def test_no_top_level_file_imports_in_a_circle():
    graph = {m: set(project_imports(m)) for m in FILES}
    assert find_circle(graph) is None, f"import circle: {' -> '.join(find_circle(graph))}"


def test_no_project_import_is_hidden_inside_a_function():
    hidden = [f"{m}.py:{line} imports {name}" for m in FILES for name, where in project_imports(m).items()
              for line, nested in where if nested]
    assert not hidden, "an import inside a function or block (to dodge a circle?): " + "; ".join(hidden)


def test_imports_point_down_the_readme_reading_order():
    order = [name for name, _ in readme_file_map()]
    assert sorted(order) == FILES, "the README's file map must list every top-level .py file once"
    upward = [f"{m}.py imports {name}.py, which the README puts after it" for m in FILES
              for name in project_imports(m) if order.index(name) > order.index(m)]
    assert not upward, "; ".join(upward)


@pytest.mark.parametrize("name, stated", readme_file_map())
def test_readme_file_map_line_counts_are_current(name, stated):
    actual = len((ROOT / f"{name}.py").read_text().splitlines())
    assert abs(actual - stated) <= max(10, 0.1 * actual), f"{name}.py has {actual} lines; the README says {stated}"
