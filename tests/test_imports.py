"""No import cycle among faithcb's modules: each imports first in a fresh interpreter, and the
graph of module-level imports has no cycle (a cycle held together by import order breaks as
soon as a user imports the modules in another order)."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import faithcb

ROOT = Path(faithcb.__file__).parent


def faithcb_modules() -> list[str]:
    """Every module of the package (`__main__` runs the command line when imported: left out)."""
    names = ["faithcb"] + [info.name for info in pkgutil.walk_packages(faithcb.__path__, "faithcb.")]
    return [name for name in names if not name.endswith("__main__")]


def module_path(name: str) -> Path:
    parts = name.split(".")[1:]
    package = ROOT.joinpath(*parts)
    return package / "__init__.py" if package.is_dir() else package.with_suffix(".py")


def top_level_imports(name: str, known: set[str]) -> set[str]:
    """faithcb modules that `name` imports when it is imported (imports inside functions and
    `if TYPE_CHECKING:` blocks do not run then), with the packages each one's import
    initialises first, except those `name` itself lives in (they are initialising already)."""
    path = module_path(name)
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        statements = [node] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
        if isinstance(node, ast.Try):
            statements = [s for s in node.body if isinstance(s, (ast.Import, ast.ImportFrom))]
        for statement in statements:
            if isinstance(statement, ast.Import):
                found.update(alias.name for alias in statement.names)
                continue
            base = statement.module or ""
            if statement.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - statement.level + 1]
                base = ".".join(anchor + ([statement.module] if statement.module else []))
            submodules = {f"{base}.{alias.name}" for alias in statement.names} & known  # `from . import module`
            found.update(submodules)
            if not submodules or len(submodules) < len(statement.names):
                found.add(base)
    own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    targets = set()
    for target in found & known:
        parts = target.split(".")
        targets.add(target)
        targets.update(".".join(parts[:i]) for i in range(1, len(parts)))  # the packages it is in
    return targets - own_packages - {name, "faithcb"}


def test_module_level_imports_have_no_cycle():
    modules = faithcb_modules()
    known = set(modules)
    graph = {name: top_level_imports(name, known) for name in modules}
    assert graph["faithcb.testing.reference"] >= {
        "faithcb.round._probe_round",
        "faithcb.engine._engine",
    }  # the graph is read
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        assert name not in visiting, "import cycle: " + " -> ".join([*visiting[visiting.index(name) :], name])
        visiting.append(name)
        for target in sorted(graph[name]):
            visit(target)
        visiting.pop()
        done.add(name)

    for name in modules:
        visit(name)


#: The only faithcb modules outside `faithcb.engine` that the engine may import (settings, examples,
#: response parsing and answer reading, the positions a capped probe reads, which process this
#: is): rounds, probes and aggregation build on the engine, never the other way.
ENGINE_MAY_IMPORT = {
    "faithcb._processes",
    "faithcb.data._panel",
    "faithcb.data._parsing",
    "faithcb.data._answers",
    "faithcb.data._positions",
}


def test_the_engine_imports_nothing_that_builds_on_it():
    """Every import in `faithcb.engine`, inside functions and `TYPE_CHECKING` blocks too, stays
    in the engine or in the few modules below it (the slow reference, which runs whole rounds,
    lives in `faithcb.testing`)."""
    known = set(faithcb_modules())
    engine = sorted(name for name in known if name == "faithcb.engine" or name.startswith("faithcb.engine."))
    assert "faithcb.engine._engine" in engine
    outside = {}
    for name in engine:
        path = module_path(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                anchor = package.split(".")[: package.count(".") + 2 - node.level]
                targets = [".".join(anchor + ([node.module] if node.module else []))]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            else:
                continue
            for target in targets:
                inside = not target or target.split(".")[0] != "faithcb" or target.startswith("faithcb.engine")
                if not inside and target not in ENGINE_MAY_IMPORT:
                    outside.setdefault(name, []).append(target)
    assert not outside, f"engine modules import modules that build on the engine: {outside}"


@pytest.mark.slow  # about a minute on two cores: every module imports the whole package again
def test_every_module_imports_first_in_a_fresh_interpreter():
    """One child interpreter imports each module with no faithcb module loaded before it (the
    third-party libraries stay loaded)."""
    script = """
import importlib, sys, traceback
failures = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "faithcb" or m.startswith("faithcb.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures.append(name + ": " + traceback.format_exc(limit=1).strip().splitlines()[-1])
print("\\n".join(failures))
sys.exit(1 if failures else 0)
"""
    modules = faithcb_modules()
    proc = subprocess.run(
        [sys.executable, "-c", script, *modules], capture_output=True, text=True, timeout=300, cwd=ROOT.parent
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_old_module_paths_import_the_moved_modules():
    """Code written before the modules were filed in folders (`from faithcb._parsing import
    ...`, `monkeypatch.setattr("faithcb._round.x", ...)`) gets the very module that runs now."""
    import importlib

    from faithcb._moved import OLD_PATHS

    for old, new in OLD_PATHS.items():
        assert not module_path(old).exists(), f"{old} is a module of its own again: drop it from OLD_PATHS"
        module = importlib.import_module(old)
        assert module is importlib.import_module(new)
        assert module.__name__ == module.__spec__.name == new


def test_an_old_module_path_imports_first_in_a_fresh_interpreter():
    script = "from faithcb._stopping import StopRule; import faithcb; assert StopRule is faithcb.StopRule"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]


def every_import(name: str, known: set[str]) -> set[str]:
    """faithcb modules that `name` imports anywhere: at module level and inside functions (those
    run later, but a loop through them still ties the modules together); `if TYPE_CHECKING:`
    blocks never run and are left out."""
    path = module_path(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known  # `from . import module`
            found.update(submodules)
            if len(submodules) < len(node.names):
                found.add(base)
    return (found & known) - {name}


def test_no_import_loop_counting_imports_inside_functions():
    """No chain of imports, inside functions included, leads from a module back to itself: each
    part builds on the ones below it (data, engine, probes, round, monitor, publish, cli), and a
    setting that a part owns is checked by that part (`faithcb._config.register_checks`)."""
    modules = faithcb_modules()
    known = set(modules)
    graph = {name: every_import(name, known) for name in modules}
    assert "faithcb.data._panel" in graph["faithcb.round._probe_round"]  # the graph is read
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        assert name not in visiting, "import loop: " + " -> ".join([*visiting[visiting.index(name) :], name])
        visiting.append(name)
        for target in sorted(graph[name]):
            visit(target)
        visiting.pop()
        done.add(name)

    for name in modules:
        visit(name)
