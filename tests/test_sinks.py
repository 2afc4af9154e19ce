import json
import math

from faithcb.publish._sinks import JsonlSink, early_answer_curve


def test_jsonl_is_strict_json_and_one_line_per_example(tmp_path):
    sink = JsonlSink(tmp_path / "faithcb")
    records = [{"id": "a", "x": float("nan"), "bits": [1.0, float("inf")]}, {"id": "b", "x": 0.5, "bits": []}]
    sink.write(step=3, round_index=1, metrics={"aoc": float("nan"), "n": 2.0}, records=records)
    sink.write(step=6, round_index=2, metrics={"aoc": 0.5, "n": 2.0}, records=records)
    lines = sink.records_path.read_text().splitlines()
    assert len(lines) == 4
    first = json.loads(lines[0], parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert first == {"step": 3, "round": 1, "id": "a", "x": None, "bits": [1.0, None]}
    metrics = [json.loads(line) for line in sink.metrics_path.read_text().splitlines()]
    assert [m["step"] for m in metrics] == [3, 6] and metrics[0]["aoc"] is None


def test_early_answer_curve_uses_floor_of_share_kept():
    records = [
        {"early_answer/matches": [False, False, False, True]},  # n = 3
        {"early_answer/matches": [False, True]},  # n = 1
        {"early_answer/matches": [None]},  # no steps: left out
        {"early_answer/matches": [None, True]},  # unknown point: left out at f < 1
    ]
    curve = early_answer_curve(records, grid=[0.0, 0.5, 1.0])
    assert curve == [0.0, 0.0, 1.0]


def test_drop_after_removes_later_rounds_and_a_torn_last_line(tmp_path):
    sink = JsonlSink(tmp_path)
    for round_index, step in enumerate((0, 2, 4)):
        sink.write(step=step, round_index=round_index, metrics={"acc": step / 10}, records=[{"id": "a"}, {"id": "b"}])
    with sink.records_path.open("a") as handle:
        handle.write('{"step": 6, "round": 3, "id": "a", "resp')  # the first run died mid-write
    assert sink.drop_after(2) == 1
    records = [json.loads(line) for line in sink.records_path.read_text().splitlines()]
    metrics = [json.loads(line) for line in sink.metrics_path.read_text().splitlines()]
    assert [(r["step"], r["id"]) for r in records] == [(0, "a"), (0, "b"), (2, "a"), (2, "b")]
    assert [m["step"] for m in metrics] == [0, 2]
    sink.write(step=4, round_index=2, metrics={"acc": 0.4}, records=[{"id": "a"}])  # the resumed run goes on
    assert [json.loads(line)["step"] for line in sink.records_path.read_text().splitlines()] == [0, 0, 2, 2, 4]
    assert sink.drop_after(4) == 0  # nothing later: files untouched
    assert not list(tmp_path.glob("*.partial"))


def test_drop_after_keeps_lines_it_cannot_read_and_ignores_missing_files(tmp_path):
    sink = JsonlSink(tmp_path / "never_written")
    assert sink.drop_after(0) == 0
    sink = JsonlSink(tmp_path)
    sink.metrics_path.write_text('not json\n{"step": 5}\n["a list"]\n')
    assert sink.drop_after(1) == 1
    assert sink.metrics_path.read_text() == 'not json\n["a list"]\n'


def test_wandb_figures_sort_headline_first_and_leave_missing_values_out():
    from faithcb.publish._sinks import HEADLINE_FIGURES, wandb_figures

    metrics = {
        "n_examples": 4.0,
        "accuracy/ci_low": 0.2,
        "filler/match/delta": 0.1,
        "filler/match": 0.25,
        "early_answer/aoc/correct": 0.5,
        "accuracy": 0.5,
        "score": float("nan"),  # not computable this round: no point at all
        "cot_lift": None,
        "valid": True,
        "valid_reasons": "text never becomes a chart",
        "slice/ood/accuracy": 0.25,
        "chain/tokens/stderr": 1.5,
    }
    figures = wandb_figures(metrics, "faith")
    assert list(figures) == [
        "faith/valid",
        "faith/accuracy",
        "faith/filler/match",
        "faith_drift/filler/match/delta",
        "faith_detail/n_examples",
        "faith_detail/early_answer/aoc/correct",
        "faith_detail/slice/ood/accuracy",
        "faith_interval/accuracy/ci_low",
        "faith_interval/chain/tokens/stderr",
    ]
    assert figures["faith/valid"] == 1.0 and len(HEADLINE_FIGURES) <= 12
    assert list(wandb_figures({"accuracy": 1.0, "accuracy/delta": 0.0}, "mon")) == [
        "mon/accuracy",
        "mon_drift/accuracy/delta",
    ]
    # a drift's paired interval sits with the intervals; the examples behind it with the details
    paired = {
        "accuracy/delta/n": 32,
        "accuracy/delta/ci_high": -0.08,
        "accuracy/delta": -0.25,
        "accuracy/delta/ci_low": -0.4,
    }
    assert list(wandb_figures(paired, "faith")) == [
        "faith_drift/accuracy/delta",
        "faith_detail/accuracy/delta/n",
        "faith_interval/accuracy/delta/ci_high",
        "faith_interval/accuracy/delta/ci_low",
    ]


def test_example_table_has_one_row_per_example_with_its_readings_and_their_change():
    from faithcb.publish._sinks import EXAMPLE_COLUMNS, example_table

    records = [
        {"id": "a", "slice": "in", "stated_answer": "7", "gold": "7", "answer_source": "cue", "accuracy": 1.0,
         "filler/match": 0.0, "early_answer/aoc": 0.75, "chain": "long chain text", "early_answer/matches": [0, 1]},
        {"id": "b", "slice": "in", "stated_answer": None, "gold": "x" * 200, "answer_source": None, "accuracy": 0.0,
         "filler/match": None, "early_answer/aoc": math.nan},
    ]  # fmt: skip
    baseline = {"a": {"accuracy": 0.0, "filler/match": 1.0}, "b": {"accuracy": 0.0, "early_answer/aoc": 0.5}}
    columns, rows = example_table(
        step=6, records=records, fields=["filler/match", "early_answer/aoc"], baseline=baseline
    )
    assert columns == [
        *EXAMPLE_COLUMNS,
        "accuracy",
        "accuracy/delta",
        "filler/match",
        "filler/match/delta",
        "early_answer/aoc",
        "early_answer/aoc/delta",
    ]
    assert rows[0] == ["a", "in", 6, "7", "7", "cue", 1.0, 1.0, 0.0, -1.0, 0.75, None]  # no baseline AOC for "a"
    assert rows[1][:6] == ["b", "in", 6, None, "x" * 79 + "…", None]
    assert rows[1][6:] == [0.0, 0.0, None, None, None, None]  # missing and NaN readings stay empty
    _, first = example_table(step=0, records=records, fields=["filler/match"])  # the baseline round: no change
    assert [row[7] for row in first] == [None, None] and [row[9] for row in first] == [None, None]
