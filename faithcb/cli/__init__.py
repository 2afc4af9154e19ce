"""The `faithcb` command (`_main`) and the modules behind its subcommands.

- `_scan`: `faithcb scan`, every checkpoint of a finished run probed;
- `_report`: `faithcb report`, PNG figures and one offline HTML page;
- `_audit`: `faithcb audit-data`, post-conclusion tails in SFT traces;
- `_check_model`: `faithcb check-model`, does a model take the engine's fast paths exactly;
- `_check_panel`: `faithcb check-panel` and `faithcb.check_panel`, can a baseline round be read.

The commands' Python entry points are importable from here: `main`, `scan_checkpoints`,
`find_checkpoints`, `postprocess_round` (scan), `write_report` (report), `audit_traces`
(audit-data), `check_model` (check-model), `check_panel` (check-panel), with their errors.
They load on first use, so `import faithcb` (which needs `check_panel` only) does not load
every command.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "AuditError",
    "CliError",
    "ModelCheck",
    "PanelCheck",
    "ReportError",
    "ScanError",
    "audit_traces",
    "check_model",
    "check_panel",
    "find_checkpoints",
    "main",
    "postprocess_round",
    "scan_checkpoints",
    "write_report",
]


def __getattr__(name: str) -> Any:
    """`faithcb.cli.X` is `X` of the command's module (`_main`), loaded on first use."""
    if not name.startswith("__"):
        _main = importlib.import_module(f"{__name__}._main")
        if hasattr(_main, name):
            return getattr(_main, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
