"""The layout is the architecture: the import graph has no cycles and no import crosses a layer the wrong way.

Every import counts, including the ones inside functions (which is where cycles hide).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Each package and the project packages it may import (besides itself). The kernel is
# `tiergate` plus the wire contracts in `proto`; the runtimes stand on it; the gateway and
# training stand on the runtimes; the application layer may use everything.
ALLOWED: dict[str, frozenset[str]] = {
    "proto": frozenset(),
    "tiergate": frozenset({"proto"}),
    "edge_runtime": frozenset({"tiergate", "proto"}),
    "cloud_runtime": frozenset({"tiergate", "proto"}),
    "gateway": frozenset({"tiergate", "proto", "edge_runtime"}),
    "training": frozenset({"tiergate", "proto", "edge_runtime", "cloud_runtime"}),
    "app": frozenset({"tiergate", "proto", "edge_runtime", "cloud_runtime", "gateway", "training"}),
}
PACKAGES = tuple(ALLOWED)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = REPO_ROOT) -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            modules[_module_name(path, root)] = path
    return modules


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Dotted names each import statement of `tree` refers to (relative imports resolved)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                keep = len(base) - node.level + (1 if is_package else 0)
                prefix = ".".join(base[:keep])
                stem = f"{prefix}.{node.module}" if node.module else prefix
            else:
                stem = node.module or ""
            for alias in node.names:
                # `from pkg import mod` imports a module; `from mod import name` a name in it.
                yield f"{stem}.{alias.name}"
                yield stem


def import_graph(root: Path = REPO_ROOT) -> dict[str, set[str]]:
    """Module -> project modules it imports (anywhere in its body)."""
    modules = project_modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = set()
        for imported in _imported_names(tree, name, path.name == "__init__.py"):
            # Resolve to the longest prefix that is a project module.
            parts = imported.split(".")
            for cut in range(len(parts), 0, -1):
                candidate = ".".join(parts[:cut])
                if candidate in modules:
                    if candidate != name:
                        targets.add(candidate)
                    break
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # A package's __init__ is imported by its own modules implicitly; that is no cycle.
            if node.startswith(nxt + "."):
                continue
            if colour.get(nxt) == grey:
                return [*stack[stack.index(nxt) :], nxt]
            if colour.get(nxt) == white:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = black
        return None

    for start in sorted(graph):
        if colour[start] == white:
            found = visit(start)
            if found:
                return found
    return None


def forbidden_imports(graph: dict[str, set[str]]) -> list[str]:
    """`importer -> imported` for each import that crosses the layers the wrong way."""
    bad = []
    for module, targets in graph.items():
        package = module.split(".")[0]
        for target in sorted(targets):
            other = target.split(".")[0]
            if other != package and other not in ALLOWED[package]:
                bad.append(f"{module} -> {target}")
    return bad


def test_every_project_package_has_a_layer() -> None:
    on_disk = {p.name for p in REPO_ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert on_disk == set(PACKAGES)


def test_the_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_crosses_a_layer_the_wrong_way() -> None:
    assert forbidden_imports(import_graph()) == []


def test_the_serving_path_does_not_import_training_libraries() -> None:
    heavy = ("torch", "sklearn", "matplotlib", "transformers", "sentence_transformers", "scipy")
    modules = project_modules()
    for name, path in modules.items():
        if name.split(".")[0] not in ("tiergate", "edge_runtime", "cloud_runtime", "gateway"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {n.split(".")[0] for n in _imported_names(tree, name, path.name == "__init__.py")}
        assert not imported & set(heavy), f"{name} imports {sorted(imported & set(heavy))}"


# The checks above must be able to fail: each is run on a small tree with the fault planted.


def _plant(root: Path, files: dict[str, str]) -> None:
    for package in PACKAGES:
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").write_text('"""x"""\n', encoding="utf-8")
    for relative, text in files.items():
        (root / relative).write_text(text, encoding="utf-8")


def test_a_cycle_hidden_in_a_function_is_found(tmp_path: Path) -> None:
    _plant(
        tmp_path,
        {
            "training/build.py": "from training.calibrate import fit\n",
            "training/calibrate.py": "def fit():\n    from training.build import run\n",
        },
    )
    cycle = find_cycle(import_graph(tmp_path))
    assert cycle is not None and set(cycle) == {"training.build", "training.calibrate"}


@pytest.mark.parametrize(
    ("relative", "text", "expected"),
    [
        ("edge_runtime/model.py", "from gateway.cascade import Cascade\n", "edge_runtime.model -> gateway"),
        ("cloud_runtime/model.py", "import edge_runtime\n", "cloud_runtime.model -> edge_runtime"),
        ("edge_runtime/model.py", "from cloud_runtime import model\n", "edge_runtime.model -> cloud_runtime"),
        ("tiergate/errors.py", "def f():\n    import app\n", "tiergate.errors -> app"),
        ("gateway/x.py", "from training import data\n", "gateway.x -> training"),
    ],
)
def test_a_forbidden_import_is_reported(tmp_path: Path, relative: str, text: str, expected: str) -> None:
    _plant(tmp_path, {relative: text})
    assert any(line.startswith(expected) for line in forbidden_imports(import_graph(tmp_path)))
