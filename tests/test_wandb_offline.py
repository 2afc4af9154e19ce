"""Round-trip a real W&B offline run through ``tests/wandb_offline.py``."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pytest
import wandb
from wandb.proto import wandb_internal_pb2 as pb

try:  # repo root on sys.path (python -m pytest, tests/ as a package)
    from tests.wandb_offline import (
        find_offline_runs,
        read_config,
        read_custom_charts,
        read_history,
        read_media,
        read_media_keys,
        read_records,
        read_summary,
    )
except ImportError:  # pytest's rootdir-less "prepend" mode puts tests/ first
    from wandb_offline import (  # type: ignore[no-redef]
        find_offline_runs,
        read_config,
        read_custom_charts,
        read_history,
        read_media,
        read_media_keys,
        read_records,
        read_summary,
    )


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolate wandb in ``tmp_path`` in offline mode.

    Args:
        tmp_path: Pytest's per-test directory.
        monkeypatch: Pytest's environment patcher.

    Returns:
        The directory to pass as ``wandb.init(dir=...)``.
    """
    for name in list(os.environ):
        if name.startswith("WANDB_"):
            monkeypatch.delenv(name)
    run_dir = tmp_path / "runs"
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": run_dir,
        "WANDB_CACHE_DIR": tmp_path / "cache",
        "WANDB_CONFIG_DIR": tmp_path / "config",
        "WANDB_DATA_DIR": tmp_path / "data",
        "WANDB_ARTIFACT_DIR": tmp_path / "artifacts",
    }
    for name, value in env.items():
        if isinstance(value, Path):
            value.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(name, str(value))
    return run_dir


def _fast_settings() -> wandb.Settings:
    """Return settings that skip the slow, irrelevant parts of a run."""
    return wandb.Settings(
        silent=True,
        console="off",
        disable_git=True,
        disable_code=True,
        save_code=False,
        x_disable_stats=True,
        x_disable_meta=True,
        x_disable_machine_info=True,
        x_save_requirements=False,
    )


def test_offline_run_round_trip(offline_wandb: Path) -> None:
    """What is logged offline is read back from the ``.wandb`` file."""
    big = "x" * 70_000  # spans 3 blocks: FIRST/MIDDLE/LAST chunks
    with wandb.init(
        mode="offline",
        dir=offline_wandb,
        project="t",
        config={"lr": 0.1, "model": {"layers": 2}, "big": big},
        settings=_fast_settings(),
    ) as run:  # finishes the run even if a log call raises
        run.define_metric("train/global_step")
        run.define_metric("*", step_metric="train/global_step", step_sync=True)
        run.log({"train/global_step": 5, "faith/aoc": 0.3})
        run.log({"train/global_step": 10, "faith/aoc": 0.4, "faith/n": 7})
        run.log({"faith/aoc": 0.5})  # no step: step_sync fills in 10
        run.log({"tab": wandb.Table(columns=["a", "b"], data=[[1, 2], [3, 4]])})
        curve = wandb.Table(columns=["x", "y"], data=[[0, 1.0], [1, 2.0]])
        run.log({"curve": wandb.plot.line(curve, "x", "y", title="c")})
        run.summary["x"] = 1

    [path] = find_offline_runs(offline_wandb)
    assert find_offline_runs(offline_wandb / "wandb") == [path]
    assert path.name == f"run-{run.id}.wandb"
    assert path.stat().st_size > 2 * 32768  # the run record spans blocks

    records = read_records(path)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[0] == "header"
    assert kinds[-1] == "exit"
    metrics = [r.metric for r in records if r.HasField("metric")]
    assert any(m.name == "train/global_step" for m in metrics)
    assert any(m.glob_name == "*" and m.step_metric == "train/global_step" and m.options.step_sync for m in metrics)

    history = read_history(path)
    assert [row["_step"] for row in history] == [0, 1, 2, 3, 4]
    assert [row.get("faith/aoc") for row in history[:3]] == [0.3, 0.4, 0.5]
    assert history[1]["faith/n"] == 7
    assert [row["train/global_step"] for row in history] == [5, 10, 10, 10, 10]
    assert history[3]["tab"]["_type"] == "table-file"
    assert history[3]["tab"]["nrows"] == 2
    assert history[3]["tab"]["ncols"] == 2
    table_file = path.parent / "files" / history[3]["tab"]["path"]
    assert table_file.is_file()

    assert read_media(path) == {"tab": "table-file", "curve_table": "table-file"}
    assert read_media_keys(path) == {"tab", "curve_table"}
    charts = read_custom_charts(path)
    assert set(charts) == {"curve"}
    assert charts["curve"]["panel_config"]["panelDefId"] == "wandb/line/v0"
    assert "curve_table" in str(charts["curve"]["panel_config"]["userQuery"])

    summary = read_summary(path)
    assert summary["x"] == 1
    assert summary["faith/aoc"] == 0.5
    assert summary["train/global_step"] == 10
    assert summary["_step"] == 4
    assert summary["tab"]["_type"] == "table-file"

    config = read_config(path)
    assert config["lr"] == 0.1
    assert config["model"] == {"layers": 2}
    assert config["big"] == big


_HEADER = b":W&B\xe1\xbe\x00"


def _frame(kind: int, data: bytes) -> bytes:
    """Frame one leveldb log chunk the way wandb-core does."""
    crc = zlib.crc32(data, zlib.crc32(bytes([kind])))
    return struct.pack("<IHB", crc, len(data), kind) + data


def _write_log(payloads: list[bytes]) -> bytes:
    """Write payloads as a leveldb log with 32 KiB blocks and a W&B header."""
    out = bytearray(_HEADER)
    for payload in payloads:
        rest, first = payload, True
        while True:
            left = 32768 - len(out) % 32768
            if left < 7:
                out += bytes(left)
                continue
            piece, rest = rest[: left - 7], rest[left - 7 :]
            kind = (1 if not rest else 2) if first else 4 if not rest else 3
            out += _frame(kind, piece)
            first = False
            if not rest:
                break
    return bytes(out)


def test_read_records_framing_and_typed_values(tmp_path: Path) -> None:
    """Chunks split over blocks, block padding and typed values decode."""
    # Sizes chosen so that record 1 leaves 3 bytes of zero padding in block
    # 0, record 3 leaves exactly one chunk header in block 1 (record 4 then
    # starts with an empty FIRST chunk) and record 4 spans blocks 2-4.
    sizes = [32718, 3, 32684, 70_000, 10]
    payloads = []
    for num, size in enumerate(sizes, start=1):
        record = pb.Record(num=num)
        item = record.history.item.add(nested_key=["m", "v"])
        item.text = "y" * size  # typed form only, no value_json
        record.history.item.add(key="_step", value_json=str(num))
        payloads.append(record.SerializeToString())
    path = tmp_path / "run-x.wandb"
    data = _write_log(payloads)
    assert data[32765:32768] == bytes(3)
    assert data[65529:65536] == _frame(2, b"")
    path.write_bytes(data)

    assert [r.num for r in read_records(path)] == [1, 2, 3, 4, 5]
    history = read_history(path)
    assert [row["_step"] for row in history] == [1, 2, 3, 4, 5]
    assert [len(row["m"]["v"]) for row in history] == sizes


def test_read_records_rejects_corruption(tmp_path: Path) -> None:
    """Bad headers, checksums and torn records raise instead of passing."""
    record = pb.Record(num=1)
    good = _HEADER + _frame(1, record.SerializeToString())
    path = tmp_path / "run-x.wandb"

    path.write_bytes(good)
    assert [r.num for r in read_records(path)] == [1]

    path.write_bytes(b":W&X" + good[4:])
    with pytest.raises(ValueError, match="header"):
        read_records(path)

    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ValueError, match="checksum"):
        read_records(path)

    path.write_bytes(good[:7] + _frame(2, b"\x08"))
    with pytest.raises(ValueError, match="ends inside"):
        read_records(path)
