"""The package layout's rules, read from the source: no import cycles, and no upward imports from `hf_cd.cd`."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((SOURCE / "hf_cd").rglob("*.py")):
        parts = path.relative_to(SOURCE).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path], *, lazy: bool) -> set[str]:
    """The hf_cd modules ``name`` imports: at module level, or anywhere (``lazy``, function bodies too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = ast.walk(tree) if lazy else tree.body
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    # A module's own packages are initialized before it, so importing from them is no cycle.
    return {target for target in found if target in modules and not name.startswith(target + ".")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph``, or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_level_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules, lazy=False) - {name} for name, path in modules.items()}
    assert _cycle(graph) is None


def test_the_cd_package_imports_nothing_above_it():
    """`hf_cd.cd` is the method in plain PyTorch: it reads the architecture table, and nothing of training,
    recipes, the Hub or quantization, not even inside a function."""
    modules = _modules()
    above = {
        target
        for name, path in modules.items()
        if name.startswith("hf_cd.cd.")
        for target in _imports(name, path, modules, lazy=True)
        if not target.startswith("hf_cd.cd")
    }
    assert above == {"hf_cd.architectures"}


def test_training_does_not_import_the_recipe_or_the_command_line():
    assert _imports_into("hf_cd.training", ("hf_cd.recipe", "hf_cd.cli")) == set()


def _imports_into(package: str, forbidden: tuple[str, ...]) -> set[tuple[str, str]]:
    """(module, target) pairs where a module of ``package`` imports one of ``forbidden``, lazily or not."""
    modules = _modules()
    return {
        (name, target)
        for name, path in modules.items()
        if name.startswith(package + ".")
        for target in _imports(name, path, modules, lazy=True)
        if target.startswith(forbidden)
    }


def test_quantization_math_imports_no_pipeline_or_runtime():
    """`quant/algorithms` is the math: the pipelines compose it, never the other way round."""
    forbidden = ("hf_cd.quant.pipelines", "hf_cd.quant.runtimes", "hf_cd.quant.api", "hf_cd.quant.evaluate")
    assert _imports_into("hf_cd.quant.algorithms", forbidden) == set()


def test_pipelines_import_no_runtime_and_no_command():
    """A pipeline gets its parts as config objects, so it needs neither the runtimes nor the CLI."""
    forbidden = ("hf_cd.quant.runtimes", "hf_cd.quant.cli", "hf_cd.recipe", "hf_cd.cli")
    assert _imports_into("hf_cd.quant.pipelines", forbidden) == set()
