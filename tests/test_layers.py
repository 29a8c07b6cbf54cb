"""The import structure: imports run one way through the layers, no module is part of an import circle, and an
import inside a function is there only to keep an optional dependency optional (and says so).

Layers, lowest first (docs/architecture.md):

    data_pipes  ->  train.nets  ->  distill, train.quant  ->  train.export  ->  train (the assembly)  ->  commands

A module may import any lower layer and its own component; never a higher layer, nor a sibling component of its
layer (distill and train.quant know nothing of each other). Imports are read from the source (AST), so an import
hidden inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data_pipes", "train", "distill", "bench")
SHIPPED = ("data_pipes", "train", "distill")  # what pyproject.toml installs: the function-import rule applies here

# (module prefix, rank, component): the longest matching prefix places a module.
LAYERS = (
    ("data_pipes", 0, "data"),
    ("train.nets", 1, "model"),
    ("distill", 2, "distill"),
    ("train.quant", 2, "quant"),
    ("train.export", 3, "export"),
    ("train", 4, "assembly"),
    ("train.__main__", 5, "commands"),
    ("train.zoo", 5, "commands"),
    ("train.compare", 5, "commands"),
    ("bench", 6, "bench"),
)
# Imported inside functions on purpose: optional extras (int8: torchao, ExecuTorch) and matplotlib, whose import
# costs about a second that only a chart needs.
OPTIONAL = {"executorch", "torchao", "matplotlib"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module of the project (a submodule when `from pkg import submodule`)
    line: int
    in_function: bool
    says_optional: bool


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))
            if "__pycache__" not in p.parts}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module `name` refers to, or None for third-party code."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _function_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(node) for node in ast.walk(fn) if node is not fn)
    return inside


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    """Every import statement of `module`, with the project module it reaches (third-party imports too, with
    their top-level name as target, so the function-import rule can see them)."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    inside = _function_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                  else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        text = " ".join(lines[node.lineno - 2:node.end_lineno]).lower()  # the statement and the line above it
        for name in names:
            target = _resolve(name, modules) or name.split(".")[0]
            yield Import(module, target, node.lineno, id(node) in inside, "optional" in text)


def place(module: str) -> tuple[int, str] | None:
    matches = [(prefix, rank, component) for prefix, rank, component in LAYERS
               if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        return None
    _, rank, component = max(matches, key=lambda m: len(m[0]))
    return rank, component


def layer_violations(imports: list[Import], modules: dict[str, Path]) -> list[str]:
    out = []
    for imp in imports:
        if imp.target not in modules:
            continue
        (rank, component), (to_rank, to_component) = place(imp.source), place(imp.target)
        if to_rank > rank or (to_rank == rank and to_component != component):
            out.append(f"{imp.source}:{imp.line} imports {imp.target}: layer '{component}' (rank {rank}) may not "
                       f"import layer '{to_component}' (rank {to_rank})")
    return out


def circles(imports: list[Import], modules: dict[str, Path]) -> list[list[str]]:
    """The modules that reach themselves through imports, grouped by circle (sorted)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if imp.target in modules:
            graph[imp.source].add(imp.target)

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        return seen

    reachable = {m: reach(m) for m in graph}
    groups = {tuple(sorted(n for n in reachable[m] if m in reachable[n])) for m in graph if m in reachable[m]}
    return sorted(list(g) for g in groups)


def hidden_imports(imports: list[Import], shipped: tuple[str, ...]) -> list[str]:
    return [f"{imp.source}:{imp.line} imports {imp.target} inside a function: import it at the top (only an optional "
            f"dependency, {sorted(OPTIONAL)}, may wait, with a comment saying it is optional)"
            for imp in imports
            if imp.in_function and imp.source.split(".")[0] in shipped
            and not (imp.target.split(".")[0] in OPTIONAL and imp.says_optional)]


def analyse(root: Path, packages: tuple[str, ...] = PACKAGES, shipped: tuple[str, ...] = SHIPPED):
    modules = project_modules(root, packages)
    imports = [imp for module, path in modules.items() for imp in imports_of(module, path, modules)]
    return modules, imports


@pytest.fixture(scope="module")
def project():
    return analyse(REPO)


def test_every_module_has_a_layer(project):
    modules, _ = project
    assert [m for m in modules if place(m) is None] == []


def test_imports_run_one_way_through_the_layers(project):
    modules, imports = project
    assert layer_violations(imports, modules) == []


def test_no_module_is_part_of_an_import_circle_counting_imports_inside_functions(project):
    modules, imports = project
    assert circles(imports, modules) == []


def test_imports_inside_functions_only_keep_optional_dependencies_optional(project):
    _, imports = project
    assert hidden_imports(imports, SHIPPED) == []


def test_the_checks_catch_an_upward_import_a_circle_and_a_hidden_import(tmp_path):
    files = {
        "data_pipes/__init__.py": "",
        "data_pipes/low.py": "from train.nets import loader\n",  # upward: data may not know the model layer
        "train/__init__.py": "",
        "train/nets/__init__.py": "",
        "train/nets/loader.py": "import train.nets.other\n",
        "train/nets/other.py": "def f():\n    import train.nets.loader\n    import numpy\n",  # circle, hidden
        "distill/__init__.py": "from train.quant import x\n",  # a sibling component of the same layer
        "train/quant/__init__.py": "",
        "train/quant/x.py": "def g():\n    import torchao  # optional: the int8 extra\n",  # allowed
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules, imports = analyse(tmp_path, ("data_pipes", "train", "distill"), ("data_pipes", "train", "distill"))
    violations = layer_violations(imports, modules)
    assert any(v.startswith("data_pipes.low:1 imports train.nets.loader") for v in violations)
    assert any(v.startswith("distill:1 imports train.quant.x") for v in violations)
    assert circles(imports, modules) == [["train.nets.loader", "train.nets.other"]]
    hidden = hidden_imports(imports, ("data_pipes", "train", "distill"))
    assert [h.split(" inside")[0] for h in hidden] == ["train.nets.other:2 imports train.nets.loader",
                                                       "train.nets.other:3 imports numpy"]
