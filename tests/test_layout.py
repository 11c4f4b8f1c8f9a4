"""Tests of the code base's shape. The core is the top-level files; everything else is in folders by role. Imports
between modules point one way: no circle between modules, nor between a folder and a file (a folder importing a core
file that imports the folder back is a circle); no project import hidden inside a function; the core's library files
import no folder (the three programs, train.py, generate.py and eval.py, may choose what to run from one); the core's
imports point down the README's reading order; the README's file map lists every core file and folder with its size."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS_SKIPPED = {"tests", "docs"}
PROGRAMS = {"train", "generate", "eval"}


def project_modules(root):
    """{module name ("data", "synthetic.tasks"; a folder's __init__.py is the folder): its file} under root."""
    found = {p.stem: p for p in root.glob("*.py")}
    for p in sorted(root.glob("*/*.py")):
        if p.parent.name not in FOLDERS_SKIPPED and not p.parent.name.startswith("."):
            found[p.parent.name if p.stem == "__init__" else f"{p.parent.name}.{p.stem}"] = p
    return found


def project_imports(path, modules):
    """{imported project module: [(line, nested in a function, class or block?)]} of one file."""
    found = {}

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            for name in names:
                hit = max((m for m in modules if name == m or name.startswith(m + ".")), key=len, default=None)
                if hit:
                    found.setdefault(hit, []).append((child.lineno, nested))
            visit(child, nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.If)))
    visit(ast.parse(path.read_text()), False)
    return found


def import_graph(root):
    """{module: {the project modules it imports}}, and {module: {(line, nested)}} for the nested check."""
    modules = project_modules(root)
    imports = {m: project_imports(p, modules) for m, p in modules.items()}
    return {m: set(found) - {m} for m, found in imports.items()}, imports


def unit(module):
    """What a circle is counted between: a core file, or a whole folder."""
    return module.split(".")[0]


def find_circle(graph):
    """A list of nodes that import each other in a circle, or None. graph: {node: {imports}}."""
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


def circles(root):
    """The first circle between modules, then the first between core files and whole folders (None: none)."""
    graph, _ = import_graph(root)
    units = {}
    for m, deps in graph.items():
        units.setdefault(unit(m), set()).update(unit(d) for d in deps if unit(d) != unit(m))
    return find_circle(graph), find_circle(units)


def readme_file_map():
    """[(core file stem or folder name, line count stated)] from the README's file map, in its order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Files", 1)[1].split("\n## ", 1)[0]
    return [(name, int(n)) for name, n in re.findall(r"^(\w+)(?:\.py|/)\s+(\d+)\s", section, re.M)]


def test_the_circle_finder_finds_circles_and_only_circles():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"x": {"y"}, "y": {"y"}}) == ["y", "y"]


def test_a_folder_that_imports_a_file_that_imports_the_folder_back_is_a_circle(tmp_path):
    """A tree whose modules import each other in no circle, but whose folder does: core.py imports pkg.a, and
    pkg/b.py imports core. That is one more import than the layout allows, and the check must say so."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "core.py").write_text("from pkg.a import x\n")
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "b.py").write_text("import core\n")
    assert circles(tmp_path) == (None, ["core", "pkg", "core"])
    (tmp_path / "pkg" / "b.py").write_text("x = 2\n")
    assert circles(tmp_path) == (None, None)


def test_no_module_and_no_folder_imports_in_a_circle():
    between_modules, between_folders = circles(ROOT)
    assert between_modules is None, f"import circle: {' -> '.join(between_modules)}"
    assert between_folders is None, f"import circle between a folder and a file: {' -> '.join(between_folders)}"


def test_no_project_import_is_hidden_inside_a_function():
    _, imports = import_graph(ROOT)
    hidden = [f"{m} line {line} imports {name}" for m, found in imports.items() for name, where in found.items()
              for line, nested in where if nested and name != m]
    assert not hidden, "an import inside a function or block (to dodge a circle?): " + "; ".join(hidden)


def test_core_library_files_import_no_folder():
    graph, _ = import_graph(ROOT)
    into = [f"{m} imports {d}" for m, deps in graph.items() if "." not in m and m not in PROGRAMS
            for d in deps if "." in d or (ROOT / d).is_dir()]
    assert not into, "a core library file depends on an extension: " + "; ".join(into)


def test_core_imports_point_down_the_readme_reading_order():
    graph, _ = import_graph(ROOT)
    core = sorted(p.stem for p in ROOT.glob("*.py"))
    order = [name for name, _ in readme_file_map() if name in core]
    assert sorted(order) == core, "the README's file map must list every top-level .py file once"
    upward = [f"{m}.py imports {d}.py, which the README puts after it" for m in core for d in graph[m]
              if d in core and order.index(d) > order.index(m)]
    assert not upward, "; ".join(upward)


def test_readme_file_map_names_every_folder():
    folders = sorted({unit(m) for m in project_modules(ROOT) if "." in m})
    assert sorted(name for name, _ in readme_file_map() if name in folders) == folders


@pytest.mark.parametrize("name, stated", readme_file_map())
def test_readme_file_map_line_counts_are_current(name, stated):
    files = [ROOT / f"{name}.py"] if (ROOT / f"{name}.py").is_file() else sorted((ROOT / name).glob("*.py"))
    actual = sum(len(p.read_text().splitlines()) for p in files)
    assert files and abs(actual - stated) <= max(10, 0.05 * actual), f"{name} has {actual} lines; the README says {stated}"
