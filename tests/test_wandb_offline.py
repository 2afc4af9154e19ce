"""Round-trip a real W&B offline run through ``tests/wandb_offline.py``."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import wandb
from transformers import TrainerCallback
from wandb.proto import wandb_internal_pb2 as pb

try:  # repo root on sys.path (python -m pytest, tests/ as a package)
    from tests.wandb_offline import (
        find_offline_runs,
        read_config,
        read_custom_charts,
        read_history,
        read_media,
        read_media_keys,
        read_metric_definitions,
        read_records,
        read_summary,
        read_table,
        read_tables,
    )
except ImportError:  # pytest's rootdir-less "prepend" mode puts tests/ first
    from wandb_offline import (  # type: ignore[no-redef]
        find_offline_runs,
        read_config,
        read_custom_charts,
        read_history,
        read_media,
        read_media_keys,
        read_metric_definitions,
        read_records,
        read_summary,
        read_table,
        read_tables,
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


# ---------------------------------------------------------------------- the monitor's W&B layout
class _Recorder(TrainerCallback):
    """Stands in for TensorBoard / MLflow: an integration that reads every `on_log`."""

    def __init__(self) -> None:
        self.keys: list[set[str]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.keys.append(set(logs or {}))


def _rule_trainer(tmp_path: Path, **settings: Any) -> Any:
    """A 4-step Trainer around a rule model (known chains) with the callback's default probes, every 2 steps."""
    datasets = pytest.importorskip("datasets")
    from rule_models import gold_response, make_prompt, make_rule_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from faithcb import FaithConfig, FaithfulnessCallback

    model, tok = make_rule_model("reads_chain")
    panel = [{"prompt": make_prompt(e), "completion": gold_response(make_prompt(e))} for e in _EXPRESSIONS]
    train = datasets.Dataset.from_dict({"text": [r["prompt"] + r["completion"] + tok.eos_token for r in panel]})
    train = train.map(lambda batch: tok(batch["text"]), batched=True, remove_columns=["text"])
    callbacks = settings.pop("callbacks", [])
    args = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        **settings,
    }
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=train,
        processing_class=tok,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        callbacks=callbacks,
    )
    config = FaithConfig(every_n_steps=2, max_new_tokens=60, answer_max_new_tokens=6)
    trainer.add_callback(FaithfulnessCallback(trainer, panel, config=config))
    return trainer


_EXPRESSIONS = ["3 + 4 * 5", "9 - 2 + 6", "2 * 3 * 4 - 1", "8 + 1 * 2"]


def test_training_run_puts_the_monitor_in_sections_of_its_own(tmp_path, wandb_env) -> None:
    """A Trainer run with the callback: headline figures under faith/ (defined and logged first),
    drifts and details in sections of their own, on train/global_step beside the loss, and no
    second copy under train/faith/; log_history and the other integrations still get faith/."""
    from faithcb.publish._sinks import HEADLINE_FIGURES

    recorder = _Recorder()
    trainer = _rule_trainer(tmp_path, report_to="wandb", callbacks=[recorder])
    trainer.train()
    wandb.finish()
    [path] = find_offline_runs(wandb_env)
    history = read_history(path)

    # one row per round, on the trainer's step axis, beside the loss
    faith_rows = [row for row in history if "faith/accuracy" in row]
    assert [row["train/global_step"] for row in faith_rows] == [0, 2, 4]
    assert [row["train/global_step"] for row in history if "train/loss" in row] == [1, 2, 3, 4]
    keys = {key for row in history for key in row}
    assert not any(key.startswith("train/faith") for key in keys)  # no second copy through the integration
    sections = {key.split("/")[0] for key in keys if key.startswith("faith")}
    assert sections == {"faith", "faith_drift", "faith_detail", "faith_interval"}

    # the faith/ section: at most a dozen headline figures, plus the curve family and the samples
    headline = sorted(k.split("/", 1)[1] for k in keys if k.startswith("faith/") and k not in read_media_keys(path))
    assert set(headline) <= set(HEADLINE_FIGURES) and len(headline) <= 12
    assert set(headline) >= set(HEADLINE_FIGURES) - {"valid"}  # every default probe reports its headline
    assert {"faith/early_answer_curves_table", "faith/samples"} <= read_media_keys(path)
    assert all(k.endswith("/delta") for k in keys if k.startswith("faith_drift/"))
    assert all(k.endswith(("/ci_low", "/ci_high", "/stderr")) for k in keys if k.startswith("faith_interval/"))
    detail = {k.split("/", 1)[1] for k in keys if k.startswith("faith_detail/")}
    assert {"early_answer/aoc/correct", "round_seconds", "early_answer/curve@0.5", "noise_floor"} <= detail
    assert {"faith_interval/accuracy/ci_low", "faith_interval/early_answer/aoc/stderr"} <= set(faith_rows[0])
    assert "faith_drift/accuracy/delta" in faith_rows[1] and "faith_drift/accuracy/delta" not in faith_rows[0]

    # order: the headline keys are the first the run defines, before the sections' globs
    definitions = read_metric_definitions(path)
    names = [name for name, _ in definitions]
    first_glob = names.index("faith/*")
    defined_head = [n for n in names[:first_glob] if n.startswith("faith/")]
    assert defined_head == [f"faith/{k}" for k in HEADLINE_FIGURES if k in headline]
    assert {"faith_drift/*", "faith_detail/*", "faith_interval/*"} <= set(names)
    assert all(step == "train/global_step" for name, step in definitions if name.startswith("faith"))
    # (a history record keeps its items in W&B's order, not the logged dict's: the order is the definitions')

    # the trainer's own log stream keeps the figures (log_history, other integrations)
    logged = [e for e in trainer.state.log_history if "faith/accuracy" in e]
    assert [e["step"] for e in logged] == [0, 2, 4] and "faith/accuracy/ci_low" in logged[0]
    assert sum("faith/accuracy" in k for k in recorder.keys) == 3


def test_missing_points_stay_missing(wandb_env) -> None:
    """A figure a round could not compute and a curve point no example gives are absent, not 0."""
    from faithcb.publish._sinks import early_answer_curve, log_wandb_round

    records = [
        {"id": "a", "early_answer/matches": [None, True], "chain": "x"},  # only the f = 1 point is known
        {"id": "b", "early_answer/matches": [False, None, True], "chain": "y"},  # f = 0.5 .. 0.9 unknown
    ]
    curve = early_answer_curve(records)
    assert curve[0] == 0.0 and curve[5] is None and curve[-1] == 1.0
    wandb.init(project="t", settings=_fast_settings())
    metrics = {"accuracy": 0.5, "filler/match": float("nan"), "cot_lift": None, "accuracy/delta": 0.1}
    assert log_wandb_round(step=3, metrics=metrics, records=records, curves=[(3, curve)], num_samples=2, prefix="faith")
    wandb.finish()
    [path] = find_offline_runs(wandb_env)
    [row] = [r for r in read_history(path) if "faith/accuracy" in r]
    assert row["train/global_step"] == 3 and row["faith_drift/accuracy/delta"] == 0.1
    assert "faith/filler/match" not in row and "faith/cot_lift" not in row
    table = read_table(path, "faith/early_answer_curves_table")
    x, y = table["columns"].index("step"), table["columns"].index("lineVal")
    points = {round(r[x], 2): r[y] for r in table["data"]}
    assert set(points) == {0.0, 0.1, 0.2, 0.3, 0.4, 1.0}  # no row at the unknown points
    assert points[0.0] == 0.0 and points[1.0] == 1.0


class _SwitchRule(TrainerCallback):
    """From step `at` on, the rule model answers the question's true value, whatever its chain says."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            model.config.rule = "ignores_chain"


def test_per_example_table_holds_each_examples_readings_and_their_change(tmp_path, wandb_env) -> None:
    """`faith/examples`: one row per panel example each round, its readings equal to the round's
    records (rounds.jsonl) and their change against the same example in the baseline round."""
    import json

    from faithcb import FaithfulnessCallback
    from faithcb.publish._sinks import EXAMPLE_COLUMNS

    trainer = _rule_trainer(tmp_path, report_to="wandb", max_steps=2, callbacks=[_SwitchRule(at=1)])
    trainer.train()
    wandb.finish()
    [path] = find_offline_runs(wandb_env)
    [callback] = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, FaithfulnessCallback)]
    readings = list(dict.fromkeys(["accuracy", *(key for probe in callback.probes for key in probe.metrics)]))
    assert {"early_answer/aoc", "filler/match", "control/changed", "info_gain/total_bits"} <= set(readings)
    columns = [*EXAMPLE_COLUMNS, *(name for key in readings for name in (key, f"{key}/delta"))]

    lines = (tmp_path / "out" / callback.config.output_subdir / "rounds.jsonl").read_text().splitlines()
    records: dict[int, dict[str, dict]] = {}
    for line in lines:
        record = json.loads(line)
        records.setdefault(record["step"], {})[record["id"]] = record
    tables = read_tables(path, "faith/examples")
    assert len(tables) == 2 and sorted(records) == [0, 2]
    moved = 0
    for table, step in zip(tables, (0, 2)):
        assert table["columns"] == columns
        rows = [dict(zip(columns, row)) for row in table["data"]]
        assert [row["id"] for row in rows] == list(records[step]) and len(rows) == len(_EXPRESSIONS)
        for row in rows:
            record, base = records[step][row["id"]], records[0][row["id"]]
            assert row["step"] == step
            assert (row["stated_answer"], row["gold"], row["answer_source"]) == (
                record["stated_answer"],
                record["gold"],
                record["answer_source"],
            )
            for key in readings:
                assert row[key] == pytest.approx(record.get(key)), key
                if step == 0 or record.get(key) is None or base.get(key) is None:
                    assert row[f"{key}/delta"] is None, key  # the baseline round, or a value missing
                else:
                    assert row[f"{key}/delta"] == pytest.approx(record[key] - base[key]), key
                    moved += row[f"{key}/delta"] != 0
    assert moved  # the switch moved readings, e.g. filler/match 0 -> 1
    assert all(row[columns.index("filler/match/delta")] == 1.0 for row in tables[1]["data"])


def test_per_example_table_follows_wandb_media(wandb_env) -> None:
    """With media off (`FaithConfig.wandb_media=False`) the round logs its figures and no table."""
    from faithcb.publish._sinks import log_wandb_round

    records = [{"id": "a", "accuracy": 1.0, "filler/match": 0.0}, {"id": "b", "accuracy": 0.0}]
    wandb.init(project="t", settings=_fast_settings())
    for step, media in ((1, False), (2, True)):
        assert log_wandb_round(
            step=step,
            metrics={"accuracy": 0.5},
            records=records,
            curves=[],
            num_samples=0,
            prefix="faith",
            media=media,
            example_fields=["accuracy", "filler/match"],
            baseline_examples={"a": {"accuracy": 0.0, "filler/match": 0.0}},
        )
    wandb.finish()
    [path] = find_offline_runs(wandb_env)
    rows = [row for row in read_history(path) if "faith/accuracy" in row]
    assert [row["train/global_step"] for row in rows] == [1, 2]
    assert "faith/examples" not in rows[0] and "faith/samples" not in rows[1]  # no sample rows asked for
    [table] = read_tables(path, "faith/examples")
    data = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [(r["id"], r["accuracy"], r["accuracy/delta"], r["filler/match/delta"]) for r in data] == [
        ("a", 1.0, 1.0, 0.0),
        ("b", 0.0, None, None),
    ]
