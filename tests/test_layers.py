"""The package's layering: each module imports only from its own layer or the layers below, so
a newcomer can read it bottom-up and a change to a command never reaches into the models."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "transferkit"
# Lowest first. A module may import from its own layer and any layer listed before it.
LAYERS = [
    {
        "errors",
        "fields",
        "seeding",
        "digits",
        "task_spec",
        "image_files",
        "preprocess",
        "predictions",
        "scores",
    },
    {"models"},
    {"data", "balancing"},
    {"recipes"},
    {"run_dir", "inference", "onnx_run", "model_card", "prediction_table"},
    {"engine"},
    {
        "sweep",
        "ensemble",
        "compare",
        "lr_find",
        "export",
        "publish",
        "wise_ft",
        "transferability",
        "calibration",
    },
    {"api", "cli", "demo"},
]
MAX_LINES = 420  # "no module much over 400 lines"


def _layer(part: str) -> int:
    for index, names in enumerate(LAYERS):
        if part in names:
            return index
    raise AssertionError(f"transferkit.{part} is in no layer: add it to LAYERS")


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def _imports(path: Path) -> list[str]:
    """Every `transferkit.X` a module imports, at the top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [n.split(".")[1] for n in names if n.startswith("transferkit.")]
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    own = _layer(path.relative_to(PACKAGE).parts[0].removesuffix(".py"))
    upward = [name for name in _imports(path) if _layer(name) > own]
    assert not upward, f"{path.name} (layer {own}) imports higher layers: {upward}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_short(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from transferkit.engine import train\n")
    assert _imports(bad) == ["engine"] and _layer("engine") > _layer("models")
