"""Read back what a W&B offline run really wrote to disk.

With ``WANDB_MODE=offline`` every run is recorded in a transaction log
``<dir>/wandb/offline-run-<stamp>-<id>/run-<id>.wandb``. wandb 0.31 ships no
Python reader for it (the old ``wandb.sdk.internal.datastore`` is gone; the
log is written by the Go ``wandb-core`` service), so this module decodes it
directly. The format is the leveldb log format with a W&B file header:

* a 7-byte file header: ident ``b":W&B"``, magic ``0xBEE1`` (uint16,
  little-endian) and version ``0`` (uint8);
* then leveldb log chunks in 32 KiB blocks counted from the start of the
  file (the file header takes the first 7 bytes of block 0). Each chunk has
  a 7-byte header: checksum (uint32 LE, plain zlib/IEEE CRC-32 of the type
  byte followed by the data, unmasked), length (uint16 LE), type (uint8:
  FULL=1, FIRST=2, MIDDLE=3, LAST=4), then the data. Fewer than 7 bytes
  left in a block are zero padding;
* every reassembled payload is a serialized
  ``wandb.proto.wandb_internal_pb2.Record``.

History, summary and config items carry either ``key`` (a single flat key)
or ``nested_key`` (a path), plus ``value_json``. Logged media such as a
``wandb.Table`` arrive one leaf per item (``nested_key=["tab", "_type"]``,
``["tab", "path"]``, ...); the readers below rebuild them into nested dicts,
so ``row["tab"]["_type"] == "table-file"``. Keys containing ``/`` such as
``"faith/aoc"`` are a single path element and stay flat.

Read a run only after ``run.finish()`` (or leaving ``with wandb.init(...)``):
while a run is live, wandb-core buffers the log and flushes it only every
``x_transaction_log_flush_interval`` seconds (15 by default), and the
readers raise ``ValueError`` on a file that ends inside a record.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from wandb.proto import wandb_internal_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "find_offline_runs",
    "read_config",
    "read_custom_charts",
    "read_history",
    "read_media",
    "read_media_keys",
    "read_records",
    "read_summary",
]

_Item: TypeAlias = "pb.HistoryItem | pb.SummaryItem | pb.ConfigItem"

_FILE_IDENT = b":W&B"
_FILE_MAGIC = 0xBEE1
_FILE_VERSION = 0
_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK_LEN = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def find_offline_runs(wandb_dir: str | Path, *, wait_s: float = 30.0) -> list[Path]:
    """Find the transaction logs of the offline runs under a directory.

    ``wandb.finish()`` can return before wandb-core has flushed the log (seen under load:
    missing rows, or a file ending inside a record), so each run is waited for until its
    exit record is there (at most ``wait_s`` seconds).

    Args:
        wandb_dir: The ``dir`` given to ``wandb.init`` (or ``WANDB_DIR``),
            which holds a ``wandb`` (or ``.wandb``) folder; or that folder
            itself.
        wait_s: How long to wait for each run's exit record.

    Returns:
        The ``run-*.wandb`` files of all ``offline-run-*`` directories,
        sorted by path, which is chronological to the second.
    """
    root = Path(wandb_dir)
    found: set[Path] = set()
    for base in (root / "wandb", root / ".wandb", root):
        found.update(base.glob("offline-run-*/run-*.wandb"))
    runs = sorted(found)
    for path in runs:
        wait_until_finished(path, timeout=wait_s)
    return runs


def wait_until_finished(path: str | Path, timeout: float = 30.0) -> Path:
    """Return once the run's log holds its exit record (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in read_records(path)):
                return Path(path)
        except ValueError:  # a record still being written
            pass
        if time.monotonic() > deadline:
            return Path(path)
        time.sleep(0.2)


def _check_file_header(data: bytes, path: Path) -> None:
    """Check the 7-byte W&B file header.

    Args:
        data: The whole file content.
        path: The file, for error messages.

    Raises:
        ValueError: If the header is missing or not ``:W&B``, ``0xBEE1``, 0.
    """
    if len(data) < _FILE_HEADER.size:
        raise ValueError(f"{path}: too short for a W&B log header")
    ident, magic, version = _FILE_HEADER.unpack_from(data)
    if (ident, magic, version) != (_FILE_IDENT, _FILE_MAGIC, _FILE_VERSION):
        raise ValueError(f"{path}: bad W&B log header {ident!r} {magic:#x} v{version}")


def _iter_payloads(data: bytes, path: Path) -> list[bytes]:
    """Split a leveldb-framed W&B log into record payloads.

    Args:
        data: The whole file content.
        path: The file, for error messages.

    Returns:
        The reassembled payload of each logical record, in file order.

    Raises:
        ValueError: If the file header, a chunk header, a checksum or the
            FIRST/MIDDLE/LAST sequence is invalid, or the file ends inside a
            record.
    """
    _check_file_header(data, path)
    payloads: list[bytes] = []
    pending: list[bytes] | None = None
    pos = _FILE_HEADER.size
    while pos < len(data):
        left_in_block = _BLOCK_LEN - pos % _BLOCK_LEN
        if left_in_block < _CHUNK_HEADER.size:
            pos += left_in_block  # zero trailer of the block
            continue
        if len(data) - pos < _CHUNK_HEADER.size:
            raise ValueError(f"{path}: truncated chunk header at byte {pos}")
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if crc == 0 and length == 0 and kind == 0:
            pos += left_in_block  # zero-filled rest of a block
            continue
        start = pos + _CHUNK_HEADER.size
        end = start + length
        if end > len(data) or length > left_in_block - _CHUNK_HEADER.size:
            raise ValueError(f"{path}: chunk at byte {pos} overruns its block")
        chunk = data[start:end]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: checksum mismatch at byte {pos}")
        pos = end
        if kind == _FULL and pending is None:
            payloads.append(chunk)
        elif kind == _FIRST and pending is None:
            pending = [chunk]
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending.append(chunk)
            if kind == _LAST:
                payloads.append(b"".join(pending))
                pending = None
        else:
            raise ValueError(f"{path}: unexpected chunk type {kind} at byte {pos}")
    if pending is not None:
        raise ValueError(f"{path}: file ends inside a record")
    return payloads


def read_records(path: str | Path) -> list[pb.Record]:
    """Decode every record of a ``.wandb`` transaction log.

    Args:
        path: A ``run-*.wandb`` file.

    Returns:
        The protobuf records in the order they were written. Use
        ``record.WhichOneof("record_type")`` to tell them apart (``"run"``,
        ``"history"``, ``"summary"``, ``"config"``, ``"metric"``,
        ``"files"``, ``"exit"``, ...).

    Raises:
        ValueError: If the file is not a complete, intact W&B log.
    """
    path = Path(path)
    records = []
    for payload in _iter_payloads(path.read_bytes(), path):
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _item_path(item: _Item) -> list[str]:
    """Return the key path of a history, summary or config item.

    Args:
        item: A ``HistoryItem``, ``SummaryItem`` or ``ConfigItem``.

    Returns:
        ``nested_key`` if set, otherwise ``[key]``.
    """
    return list(item.nested_key) if item.nested_key else [item.key]


def _set_path(target: dict[str, Any], path: list[str], value: object) -> None:
    """Set ``target[path[0]][path[1]]... = value``, creating dicts as needed.

    Args:
        target: The dict to update in place.
        path: The key path, at least one element.
        value: The decoded value.
    """
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[path[-1]] = value


def _del_path(target: dict[str, Any], path: list[str]) -> None:
    """Delete ``target[path[0]][path[1]]...`` if it exists.

    Args:
        target: The dict to update in place.
        path: The key path, at least one element.
    """
    for key in path[:-1]:
        target = target.get(key)  # type: ignore[assignment]
        if not isinstance(target, dict):
            return
    target.pop(path[-1], None)


def _decode(item: _Item) -> object:
    """Decode the value of a history, summary or config item.

    Args:
        item: An item with ``value_json`` or, for history items written
            with ``x_history_value_encoding`` containing ``"typed"``, a
            typed ``value`` oneof (``none``/``boolean``/``integer``/
            ``number``/``text``/``json``).

    Returns:
        The decoded Python value (JSON ``NaN``/``Infinity`` become floats).
    """
    if item.value_json:
        return json.loads(item.value_json)
    typed = item.WhichOneof("value") if isinstance(item, pb.HistoryItem) else None
    if typed is None or typed == "none":
        return None
    if typed == "json":
        return json.loads(item.json)
    return getattr(item, typed)


def _apply(
    target: dict[str, Any],
    updates: Iterable[_Item],
    removes: Iterable[_Item] = (),
) -> None:
    """Apply the update and remove items of a summary or config record.

    Args:
        target: The dict to update in place.
        updates: Items with a key path and ``value_json``.
        removes: Items with a key path to delete.
    """
    for item in updates:
        _set_path(target, _item_path(item), _decode(item))
    for item in removes:
        _del_path(target, _item_path(item))


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Read the history rows of a run, one dict per ``run.log`` commit.

    Args:
        path: A ``run-*.wandb`` file.

    Returns:
        One dict per history record, keys mapped to their JSON-decoded
        values, including ``_step``, ``_timestamp`` and ``_runtime``. Media
        values are nested dicts with a ``_type`` (e.g. ``"table-file"``).
    """
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            _apply(row, record.history.item)
            rows.append(row)
    return rows


def read_summary(path: str | Path) -> dict[str, Any]:
    """Read the final summary of a run.

    Args:
        path: A ``run-*.wandb`` file.

    Returns:
        The summary records merged in order (later values win, removals
        applied), with JSON-decoded values. Includes W&B's own keys such as
        ``_step``, ``_runtime`` and ``_wandb``.
    """
    summary: dict[str, Any] = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "summary":
            _apply(summary, record.summary.update, record.summary.remove)
    return summary


def read_config(path: str | Path) -> dict[str, Any]:
    """Read the final config of a run.

    Args:
        path: A ``run-*.wandb`` file.

    Returns:
        The config given to ``wandb.init`` (carried by the run record)
        updated by every later config record, JSON-decoded. Includes
        W&B's ``_wandb`` entry (e.g. ``_wandb["visualize"]`` for charts).
    """
    config: dict[str, Any] = {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _apply(config, record.run.config.update, record.run.config.remove)
        elif kind == "config":
            _apply(config, record.config.update, record.config.remove)
    return config


def read_media(path: str | Path) -> dict[str, str]:
    """Find the logged media (tables, images, ...) of a run.

    Args:
        path: A ``run-*.wandb`` file.

    Returns:
        Each top-level history key whose value was a media reference, mapped
        to its ``_type`` of its latest logging (e.g. ``{"tab": "table-file"}``).
        ``wandb.plot.line(...)`` logged under ``"curve"`` shows up as the
        table ``"curve_table"``; see :func:`read_custom_charts` for the chart.
    """
    media: dict[str, str] = {}
    for row in read_history(path):
        for key, value in row.items():
            if isinstance(value, dict) and isinstance(value.get("_type"), str):
                media[key] = value["_type"]
    return media


def read_media_keys(path: str | Path) -> set[str]:
    """Return the history keys that held media references.

    Args:
        path: A ``run-*.wandb`` file.

    Returns:
        The keys of :func:`read_media`.
    """
    return set(read_media(path))


def read_custom_charts(path: str | Path) -> dict[str, dict[str, Any]]:
    """Return the custom charts (``wandb.plot.*``) a run defined.

    Args:
        path: A ``run-*.wandb`` file.

    Returns:
        Chart key mapped to its spec from config ``_wandb.visualize``, e.g.
        ``{"curve": {"panel_type": "Vega2", "panel_config": {"panelDefId":
        "wandb/line/v0", ...}}}``. The chart's data table key is in
        ``panel_config.userQuery`` (``"<key>_table"`` for ``wandb.plot``).
    """
    wandb_cfg = read_config(path).get("_wandb", {})
    charts = wandb_cfg.get("visualize", {}) if isinstance(wandb_cfg, dict) else {}
    return dict(charts) if isinstance(charts, dict) else {}


def read_metric_definitions(path: str | Path) -> list[tuple[str, str]]:
    """Return the ``define_metric`` calls of a run, in order.

    Args:
        path: A ``run-*.wandb`` file.

    Returns:
        ``(name or glob, step_metric)`` per metric record; ``name`` is the
        key, or the glob (e.g. ``"faith/*"``) for a glob definition.
    """
    out = []
    for record in read_records(path):
        if record.HasField("metric"):
            metric = record.metric
            out.append((metric.name or metric.glob_name, metric.step_metric))
    return out


def read_tables(path: str | Path, key: str) -> list[dict[str, Any]]:
    """Return every table logged under ``key``, in log order, each as its table file's JSON
    (``{"columns": [...], "data": [[...], ...]}``) with the history row's ``_step`` added.

    Args:
        path: A ``run-*.wandb`` file.
        key: The history key of the table.
    """
    path = Path(path)
    tables = []
    for row in read_history(path):
        ref = row.get(key)
        if isinstance(ref, dict) and ref.get("path"):
            table = json.loads((path.parent / "files" / ref["path"]).read_text())
            tables.append({**table, "_step": row.get("_step")})
    return tables


def read_table(path: str | Path, key: str) -> dict[str, Any]:
    """Return the last logged table under ``key`` as ``{"columns": [...], "data": [[...], ...]}``.

    Args:
        path: A ``run-*.wandb`` file.
        key: The history key of the table (``"<chart>_table"`` for ``wandb.plot``).

    Returns:
        The table file's JSON, read from the run's ``files`` folder.
    """
    path = Path(path)
    refs = [row[key] for row in read_history(path) if isinstance(row.get(key), dict)]
    if not refs:
        raise KeyError(f"no table logged under {key!r} in {path}")
    return json.loads((path.parent / "files" / refs[-1]["path"]).read_text())
