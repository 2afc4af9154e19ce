import json

from faithcb._sinks import JsonlSink, early_answer_curve


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
