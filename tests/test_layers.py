"""The package's layering, checked on the source of every module (imports at the top and inside
functions alike), so that a newcomer can read it bottom-up and a change to a command never
reaches into the models:

- each package imports only packages of the layers below its own, and none beside it;
- another package is imported through its face (`from transferkit.engine import train`), never
  through one of its modules (`transferkit.engine.trainer`);
- no two modules import each other, directly or round a longer cycle;
- the ground floor and the ONNX path import no torch;
- a function that only its own module uses is private (a leading underscore);
- no module is much over 400 lines.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "transferkit"
# Lowest first: the life of a run read from the bottom up. A package may import any package of
# a layer listed before its own, and none of its own layer. "transferkit" is the package's face.
LAYERS = [
    {"errors"},
    {"core"},  # torch-free: task specs, fields, seeding, image files, preprocessing
    {"models"},
    {"data", "balancing"},
    {"recipes"},
    {"rundir", "features"},  # the run folder; the feature cache
    {"engine", "inference"},  # training; deployment
    {"select", "runs"},  # before training; after it
    {"transferkit", "api"},  # the public face
    {"cli", "demo"},
]
TORCH_FREE = ["transferkit.errors", "transferkit.core", "transferkit.inference.onnx_run",
              "transferkit.inference.table", "transferkit"]  # fmt: skip
HEAVY = ("torch", "torchvision", "timm", "accelerate", "datasets", "torchjd", "peft")
MAX_LINES = 420  # "no module much over 400 lines"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _package(module: str) -> str:
    """`transferkit.engine.trainer` -> `engine`; the face `transferkit` -> `transferkit`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _layer(package: str) -> int:
    for index, names in enumerate(LAYERS):
        if package in names:
            return index
    raise AssertionError(f"transferkit.{package} is in no layer: add it to LAYERS")


def _imports(path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """`(module, line)` for every transferkit module `path` imports; a name imported from a
    package that is a module of its own counts as that module."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "transferkit":
                continue
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.append((full if full in MODULES else node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("transferkit")]
    return found


def _lazy_targets(path: Path) -> list[str]:
    """The modules a face exports lazily (its `_WHERE` mapping of name -> module)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_WHERE" for t in node.targets
        ):
            return sorted({ast.literal_eval(v) for v in node.value.values})
    return []


def _graph(top_level_only: bool = False) -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        edges = {module for module, _ in _imports(path, top_level_only)}
        if not top_level_only:  # a lazy face imports its modules when a name is first used
            edges |= set(_lazy_targets(path))
        graph[name] = {e for e in edges if e != name}
    return graph


IDS = {"ids": lambda p: str(p.relative_to(PACKAGE))}


@pytest.mark.parametrize("path", MODULES.values(), **IDS)
def test_imports_point_down(path):
    own = _package(_module_name(path))
    wrong = [
        f"line {line}: {module}"
        for module, line in _imports(path)
        if _package(module) != own and _layer(_package(module)) >= _layer(own)
    ]
    assert not wrong, f"transferkit.{own} (layer {_layer(own)}) imports its layer or above: {wrong}"


@pytest.mark.parametrize("path", MODULES.values(), **IDS)
def test_other_packages_are_imported_through_their_face(path):
    own = _package(_module_name(path))
    deep = [
        f"line {line}: {module}"
        for module, line in _imports(path)
        if _package(module) != own and module.count(".") > 1
    ]
    assert not deep, f"import these from the package itself (its __init__): {deep}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_round_a_cycle():
    assert _cycles(_graph()) == []


def _reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph.get(module, ())
    return seen


@pytest.mark.parametrize("start", TORCH_FREE)
def test_the_ground_floor_and_the_onnx_path_import_no_torch(start):
    graph = _graph(top_level_only=True)  # what importing the module runs
    heavy = []
    for module in sorted(_reachable(start, graph)):
        tree = ast.parse(MODULES[module].read_text())
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            heavy += [f"{module}: {n}" for n in names if n.split(".")[0] in HEAVY]
    assert not heavy, f"importing {start} imports {heavy}"


# Where a public function may be used from: other modules, the tests, benchmarks, notebooks, docs.
READERS = [
    *PACKAGE.rglob("*.py"),
    *(PACKAGE.parent / "tests").rglob("*.py"),
    *(PACKAGE.parent / "bench").rglob("*.py"),
    *(PACKAGE.parent / "notebooks").glob("*.ipynb"),
    *(PACKAGE.parent / "docs").glob("*.md"),
    PACKAGE.parent / "README.md",
]
COMMAND_HANDLERS = re.compile(r"^run_")  # cli/: named by `set_defaults(func=...)` in the same file


@pytest.mark.parametrize("path", MODULES.values(), **IDS)
def test_a_function_only_its_module_uses_is_private(path):
    others = "\n".join(p.read_text() for p in READERS if p != path)
    lonely = [
        node.name
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.FunctionDef)
        and not node.name.startswith("_")
        and not COMMAND_HANDLERS.match(node.name)
        and not re.search(rf"\b{node.name}\b", others)
    ]
    assert not lonely, f"used only in {path.name}: give them a leading underscore: {lonely}"


@pytest.mark.parametrize("path", MODULES.values(), **IDS)
def test_modules_stay_short(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_the_checkers_see_what_they_forbid(tmp_path):
    upward = tmp_path / "x.py"
    upward.write_text("def f():\n    from transferkit.engine.trainer import train\n")
    assert _imports(upward) == [("transferkit.engine.trainer", 2)]
    assert _layer("engine") > _layer("models")
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    face = tmp_path / "face.py"
    face.write_text("_WHERE = {'x': 'transferkit.runs.export', 'y': 'transferkit.runs.export'}\n")
    assert _lazy_targets(face) == ["transferkit.runs.export"]


def test_no_source_file_is_ignored_by_git():
    """A source file that .gitignore matches never reaches a clone: `runs/` once hid the whole
    of `transferkit/runs/`'s new modules, and only a fresh clone could tell."""
    import shutil
    import subprocess

    root = PACKAGE.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout (an installed copy): nothing can be ignored here")
    files = [str(p.relative_to(root)) for folder in (PACKAGE, root / "tests", root / "bench")
             for p in folder.rglob("*.py") if "__pycache__" not in p.parts]  # fmt: skip
    found = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"], cwd=root, input="\n".join(files),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert found.stdout.split() == [], "ignored by .gitignore: fix the pattern, not the file"
    assert "transferkit/runs/evaluate.py" in files


# Imported where they are used: torchjd (with cvxpy and qpsolvers) takes about a second to
# import and torchmetrics two, a tenth of a short run (BENCHMARKS.md, "A whole run").
_SLOW_IMPORTS = """
import sys
from transferkit.engine import train
from transferkit.recipes import parse_recipe
recipe = {"model": {"backbone": "timm:test_resnet"}, "data": {"source": "imagefolder", "path": "x"},
          "tasks": {"a": {"kind": "multiclass"}, "b": {"kind": "binary"}}}
if sys.argv[1:]:
    recipe["multitask"] = {"method": sys.argv[1]}
parse_recipe(recipe)
print(" ".join(m for m in ("torchjd", "torchmetrics") if m in sys.modules))
"""


@pytest.mark.parametrize(("method", "imported"), [([], ""), (["upgrad"], "torchjd")])
def test_a_plain_run_imports_torchjd_and_torchmetrics_only_when_it_needs_them(method, imported):
    """Neither is imported by the engine and a checked recipe with the plain sum; a recipe
    that names a torchjd method imports torchjd (the check can see an import)."""
    import subprocess
    import sys

    found = subprocess.run([sys.executable, "-c", _SLOW_IMPORTS, *method], capture_output=True,
                           text=True, check=True, cwd=PACKAGE.parent)  # fmt: skip
    assert found.stdout.strip() == imported
