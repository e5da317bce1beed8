"""The project's packages import in one direction (README "Where things live"): no two modules import each other,
directly or round a longer loop, and the layers hold: the model package imports neither the app nor training (it is
what the Hub folder carries), and the app and training do not import each other.

Read from the source with `ast`, so every import counts: inside functions and under TYPE_CHECKING too (a cycle
hidden there is still a cycle).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("modeling_cnn_lstm", "cxr_common", "cxr_app", "train")
# package -> the project packages it may import: the model (shipped to the Hub) and the shared layer (atomic writes,
# the report's schema and renderer) import nothing of the project; the app and training may import both, never
# each other.
LAYERS = {
    "modeling_cnn_lstm": set(),
    "cxr_common": set(),
    "cxr_app": {"modeling_cnn_lstm", "cxr_common"},
    "train": {"modeling_cnn_lstm", "cxr_common"},
}


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages (a package by its `__init__.py`)."""
    modules = {}
    for path in sorted(path for package in PACKAGES for path in (root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `module` imports anywhere in its file (a name imported from a package counts as its
    submodule when there is one, else as the package)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(f"{target}."):  # a package's own __init__
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_names(root)
    return {module: imported_modules(module, path, modules) for module, path in modules.items()}


def test_modules_import_each_other_in_one_direction_only():
    graph = import_graph(REPO_ROOT)
    assert "train.corpus.split" in graph and "train.corpus.options" in graph["train.corpus.split"]  # it reads them
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        raise AssertionError(f"import cycle: {' -> '.join(error.args[1])}") from None


def test_a_hidden_cycle_is_found(tmp_path: Path):
    """The check itself: a cycle through a function-level relative import fails it."""
    package = tmp_path / "train" / "corpus"
    package.mkdir(parents=True)
    (tmp_path / "train" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import thing\n")
    (package / "b.py").write_text("def thing():\n    from . import a\n")
    graph = import_graph(tmp_path)
    assert graph["train.corpus.a"] == {"train.corpus.b"} and graph["train.corpus.b"] == {"train.corpus.a"}
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter(graph).prepare()


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imported in sorted(graph.items()):
        package = module.split(".")[0]
        wrong = sorted(name for name in imported if name.split(".")[0] not in LAYERS[package] | {package})
        if wrong:
            found.append(f"{module} imports {wrong}: {package} may import only {sorted(LAYERS[package])}")
    return found


def test_layers_model_then_app_or_training():
    graph = import_graph(REPO_ROOT)
    assert layer_violations(graph) == []
    shared = [module for module in graph if module.startswith("cxr_common")]
    users = {module.split(".")[0] for module, imported in graph.items() if set(imported) & set(shared)}
    assert users == {"cxr_app", "train"}  # the shared layer is used by both sides, and by nothing else


def test_a_shared_module_importing_training_is_found(tmp_path: Path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "train" / "steps.py").write_text("")
    (tmp_path / "cxr_common" / "report.py").write_text("from train import steps\n")
    assert layer_violations(import_graph(tmp_path)) == [
        "cxr_common.report imports ['train', 'train.steps']: cxr_common may import only []"
    ]


def test_a_model_module_importing_the_app_is_found(tmp_path: Path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "cxr_app" / "demo.py").write_text("from modeling_cnn_lstm import x\n")
    (tmp_path / "modeling_cnn_lstm" / "x.py").write_text("def f():\n    import cxr_app.demo\n")
    assert layer_violations(import_graph(tmp_path)) == [
        "modeling_cnn_lstm.x imports ['cxr_app.demo']: modeling_cnn_lstm may import only []"
    ]
