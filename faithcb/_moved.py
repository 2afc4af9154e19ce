"""The modules' old import paths, from before faithcb's modules were filed in folders by part.

`from faithcb._parsing import extract_answer` in a user's script, a saved recipe or an older
doc still runs: importing an old path gives the module that now lives at the new one (the same
module object, so `monkeypatch.setattr("faithcb._round.x", ...)` patches the module that runs).
Nothing in faithcb imports an old path; they are loaded only when asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

#: old module path -> the module's path now
OLD_PATHS = {
    "faithcb._answers": "faithcb.data._answers",
    "faithcb._jsonl": "faithcb.data._jsonl",
    "faithcb._panel": "faithcb.data._panel",
    "faithcb._parsing": "faithcb.data._parsing",
    "faithcb._positions": "faithcb.data._positions",
    "faithcb._prompt_shape": "faithcb.data._prompt_shape",
    "faithcb._standard_panels": "faithcb.data._standard_panels",
    "faithcb._aggregate": "faithcb.round._aggregate",
    "faithcb._execution": "faithcb.round._sharded",
    "faithcb._round": "faithcb.round._probe_round",
    "faithcb._validity": "faithcb.round._validity",
    "faithcb._monitor": "faithcb.monitor._monitor",
    "faithcb._stopping": "faithcb.monitor._stop_rules",
    "faithcb._publish": "faithcb.publish._publisher",
    "faithcb._sinks": "faithcb.publish._sinks",
    "faithcb._audit": "faithcb.cli._audit",
    "faithcb._check_model": "faithcb.cli._check_model",
    "faithcb._check_panel": "faithcb.cli._check_panel",
    "faithcb._report": "faithcb.cli._report",
    "faithcb._scan": "faithcb.cli._scan",
    "faithcb._models": "faithcb.contrib._models",
    "faithcb.proxy": "faithcb.contrib.proxy",
}


class _OldPathLoader(importlib.abc.Loader):
    """Loads an old path as the module at its new path (imported there if it is not yet)."""

    def __init__(self, new_path: str) -> None:
        self.new_path = new_path

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.new_path)
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self.own_spec  # the import system set the old path's spec on it


class _OldPathFinder(importlib.abc.MetaPathFinder):
    """Finds the old paths in `OLD_PATHS`, and nothing else."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        new_path = OLD_PATHS.get(fullname)
        if new_path is None:
            return None
        return importlib.util.spec_from_loader(fullname, _OldPathLoader(new_path))


def install_old_paths() -> None:
    """Make the old paths importable (once per interpreter)."""
    if not any(isinstance(finder, _OldPathFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OldPathFinder())
