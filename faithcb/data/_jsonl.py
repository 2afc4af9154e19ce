"""Reading JSONL data files with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(
    path: str | Path,
    error: type[Exception],
    *,
    what: str = "JSONL file",
    objects_only: bool = False,
    bad_lines: list[str] | None = None,
) -> Iterator[tuple[int, Any]]:
    """Yield `(line_number, row)` for every non-blank line of a JSONL file, streaming.

    Args:
        path: The file.
        error: Exception type raised for every problem (e.g. `PanelError`).
        what: How messages name a missing file or a folder ("Probe panel file", ...).
        objects_only: Also refuse rows that are not JSON objects.
        bad_lines: When given, a line that is not JSON (or not an object with `objects_only`)
            is skipped and its message (`path:line: ...`) appended here instead of raised, so
            that a caller can report every bad line at once.

    Raises:
        error: The path is missing or a folder, the file cannot be read or decoded, a line is
            not JSON (or not an object with `objects_only`); the message names file and line.
    """
    path = Path(path)
    if not path.exists():
        raise error(f"{what} not found: {path}")
    if path.is_dir():
        raise error(f"{what.removesuffix(' file')} path is a folder, expected a JSONL file: {path}")
    try:
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    message = f"{path}:{line_no}: invalid JSON ({err.msg} at column {err.colno})."
                    if bad_lines is None:
                        raise error(message) from err
                    bad_lines.append(message)
                    continue
                if objects_only and not isinstance(row, dict):
                    message = f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}."
                    if bad_lines is None:
                        raise error(message)
                    bad_lines.append(message)
                    continue
                yield line_no, row
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"Cannot read {path}: {err}") from err
