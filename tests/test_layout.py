"""The package layout: every module imports on its own, the import graph has no circle, arrows run
one way (stages → algorithms → data access → basics), and no module imports another's private
(underscore) names."""
import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "snakedrp"

#: Layer of each top-level name under snakedrp; a module may import only its own layer or lower.
LAYERS = {
    "pexconfig": 0, "log": 0, "runtime": 0, "stamps": 0, "poly": 0, "yamlio": 0,
    "repo": 1,
    "meas": 2, "calib": 2, "isr": 2, "simulate": 2,
    "single_frame": 3, "coadd": 3, "multiband": 3, "validate": 3,
    "config": 4, "__main__": 5,
}


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def module_path(name: str) -> Path:
    base = ROOT.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _runtime_nodes(nodes):
    """Import statements among ``nodes`` and below, leaving out ``if TYPE_CHECKING:`` blocks
    (annotations only, never executed)."""
    for node in nodes:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _runtime_nodes(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _runtime_nodes(ast.iter_child_nodes(node))


def imports_of(name: str, known: set[str]) -> list[tuple[str, list[str]]]:
    """``(module, imported names)`` of every snakedrp module that ``name`` imports (lazy ones too)."""
    tree = ast.parse(module_path(name).read_text())
    package = name if module_path(name).name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in _runtime_nodes(tree.body):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "snakedrp"]
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target.split(".")[0] != "snakedrp":
            continue
        names = [a.name for a in node.names]
        # ``from snakedrp.meas import psf`` imports the module snakedrp.meas.psf
        modules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
        if modules:
            found += [(m, []) for m in modules]
        else:
            found.append((target, names))
    return found


def layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 99


@pytest.fixture(scope="module")
def graph():
    names = module_names()
    known = set(names)
    return {n: imports_of(n, known) for n in names if n != "snakedrp"}


def test_every_module_imports_alone():
    names = module_names()

    def try_import(name):
        run = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=ROOT)
        return name, run.returncode, run.stderr.strip().splitlines()[-1:] if run.returncode else []

    with ThreadPoolExecutor(max_workers=4) as pool:
        failed = [(n, err) for n, rc, err in pool.map(try_import, names) if rc]
    assert failed == []


def test_import_graph_has_no_circle(graph):
    edges = {n: sorted({m for m, _ in deps if m in graph and m != n}) for n, deps in graph.items()}
    state, stack, circles = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in edges[n]:
            if state.get(m) == "open":
                circles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(edges):
        if n not in state:
            visit(n)
    assert circles == [], " ; ".join(" -> ".join(c) for c in circles)


def test_no_module_imports_private_names_of_another(graph):
    offenders = [f"{n} imports {name} from {m}" for n, deps in graph.items() for m, names in deps
                 for name in names if name.startswith("_") and m != n]
    assert offenders == []


def test_arrows_run_one_way(graph):
    upward = [f"{n} (layer {layer(n)}) imports {m} (layer {layer(m)})" for n, deps in graph.items()
              for m, _ in deps if m in graph and layer(m) > layer(n)]
    assert upward == []


def test_every_top_level_name_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert sorted(tops - set(LAYERS)) == []


def test_task_api_names_import_from_the_top():
    import snakedrp
    from snakedrp import Butler, ProcessCcdTask
    from snakedrp.repo.butler import Butler as butler_class
    from snakedrp.single_frame.process_ccd import ProcessCcdTask as task_class

    assert Butler is butler_class and ProcessCcdTask is task_class
    for name in snakedrp.__all__:
        assert getattr(snakedrp, name).__name__ == name
    with pytest.raises(AttributeError):
        snakedrp.NoSuchTask
