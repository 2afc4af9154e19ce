"""The Monitor on its own: rounds in; baseline, drift, validity, stop decisions and state out (no trainer)."""

from __future__ import annotations

import json
import logging
import math

import pytest

from faithcb import FaithConfig, RoundResult, StopRule
from faithcb.monitor._monitor import Monitor, apply_drift, postprocess_round, prefixed_logs
from faithcb.monitor._stop_rules import format_event
from faithcb.round._probe_round import build_probes

CONFIG = FaithConfig(every_n_steps=10)
PROBES = build_probes(CONFIG)


def readable(aoc: float, accuracy: float = 0.8, **extra: float) -> dict[str, float]:
    """A round's panel figures that pass every validity gate."""
    return {
        "n_examples": 8.0,
        "accuracy": accuracy,
        "accuracy/ci_low": accuracy - 0.2,
        "accuracy/ci_high": min(1.0, accuracy + 0.1),
        "early_answer/aoc": aoc,
        "early_answer/aoc/stderr": 0.05,
        "slice/a/accuracy": accuracy,
        "parse_fail_rate": 0.0,
        "valid": 1.0,
        **extra,
    }


def round_of(metrics: dict[str, float], seconds: float = 1.5) -> RoundResult:
    records = [{"id": "0", "early_answer/matches": [0, 1, 1]}]
    return RoundResult(metrics=metrics, records=records, seconds=seconds)


def monitor(*rules: StopRule, **kwargs) -> Monitor:
    return Monitor(CONFIG, PROBES, stop_rules=rules, slices=["a"], **kwargs)


def test_first_complete_round_is_the_baseline_and_later_rounds_drift():
    mon = monitor()
    first = mon.observe(0, round_of(readable(0.9)))
    assert first.is_baseline and first.round_index == 0 and mon.baseline_step == 0
    assert mon.baseline == {
        k: v for k, v in readable(0.9).items() if not k.endswith(("/ci_low", "/ci_high", "/stderr"))
    }
    assert not any(k.endswith("/delta") for k in first.metrics)
    second = mon.observe(10, round_of(readable(0.6, accuracy=0.5, extra_nan=math.nan), seconds=2.0))
    assert not second.is_baseline and second.round_index == 1
    assert second.metrics["early_answer/aoc/delta"] == pytest.approx(-0.3)
    assert second.metrics["accuracy/delta"] == pytest.approx(-0.3)
    assert "slice/a/accuracy/delta" not in second.metrics  # slices, intervals and drifts never drift
    assert "accuracy/ci_low/delta" not in second.metrics
    assert second.metrics["round_seconds"] == 2.0
    assert second.logs["faith/early_answer/aoc/delta"] == pytest.approx(-0.3)
    assert "faith/extra_nan" not in second.logs and "extra_nan" in second.metrics  # logs carry finite figures only
    assert second.jsonl_metrics["invalid_reasons"] == []
    assert [h["step"] for h in mon.history] == [0, 10] and [s for s, _ in mon.curves] == [0, 10]


def test_partial_round_never_becomes_the_baseline(caplog):
    mon = monitor(StopRule("early_answer/aoc", below=0.95))
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        partial = mon.observe(0, round_of(readable(0.1)), partial=True)
    assert not partial.is_baseline and mon.baseline is None and partial.metrics["round_partial"] == 1.0
    assert partial.events == []  # a partial round feeds no stop rule
    assert math.isnan(mon.eval_figures(0)["eval_faith_score"])  # nor picks a best checkpoint
    assert "is not used as the baseline" in caplog.text
    complete = mon.observe(10, round_of(readable(0.9)))
    assert complete.is_baseline and mon.baseline_step == 10


def test_first_readable_round_replaces_an_unreadable_baseline_once(caplog):
    mon = monitor(StopRule("early_answer/aoc", max_drop=0.2))
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        babbling = mon.observe(0, round_of(readable(0.9, parse_fail_rate=0.9)))
        again = mon.observe(10, round_of(readable(0.8, parse_fail_rate=0.9)))
        first_readable = mon.observe(20, round_of(readable(0.5)))
        later = mon.observe(30, round_of(readable(0.2)))
        unreadable_later = mon.observe(40, round_of(readable(0.9, parse_fail_rate=0.9)))
        readable_again = mon.observe(50, round_of(readable(0.45)))
    assert babbling.invalid_reasons and babbling.is_baseline  # provisional
    assert again.metrics["early_answer/aoc/delta"] == pytest.approx(-0.1) and again.invalid_reasons
    assert first_readable.is_baseline and mon.baseline_step == 20 and first_readable.events == []
    assert not any(k.endswith("/delta") for k in first_readable.metrics)
    assert later.metrics["early_answer/aoc/delta"] == pytest.approx(-0.3)  # from the first readable round
    assert [e["step"] for e in later.events] == [30] and later.events[0]["baseline"] == 0.5
    assert not unreadable_later.is_baseline and not readable_again.is_baseline  # replaced once, then kept
    assert readable_again.metrics["early_answer/aoc/delta"] == pytest.approx(-0.05)
    assert "baseline round (step 0) cannot be read" in caplog.text
    assert caplog.text.count("replaces the unreadable round of step 0 as the baseline") == 1
    # the replacement survives a save and a resume
    resumed = monitor(StopRule("early_answer/aoc", max_drop=0.2)).load_state(json.loads(json.dumps(mon.to_state())))
    assert resumed.baseline_step == 20 and resumed.baseline_readable
    assert not resumed.observe(60, round_of(readable(0.5))).is_baseline


def test_a_readable_baseline_is_never_replaced():
    mon = monitor()
    assert mon.observe(0, round_of(readable(0.9))).is_baseline
    assert not mon.observe(10, round_of(readable(0.9, parse_fail_rate=0.9))).is_baseline
    assert not mon.observe(20, round_of(readable(0.4))).is_baseline and mon.baseline_step == 0


def test_stop_rule_counts_only_readable_non_baseline_rounds():
    rule = StopRule("early_answer/aoc", max_drop=0.2, patience=2)
    mon = monitor(rule)
    assert mon.observe(0, round_of(readable(0.3))).events == []  # the baseline never counts
    assert mon.observe(10, round_of(readable(0.05))).events == []  # 1st violation
    unreadable = mon.observe(20, round_of(readable(0.0, parse_fail_rate=0.9)))
    assert unreadable.invalid_reasons and unreadable.events == []  # neither counts nor resets
    assert mon.stopper.counters == [1]
    events = mon.observe(30, round_of(readable(0.0))).events
    assert [(e["step"], e["action"], e["metric"]) for e in events] == [(30, "stop", "faith/early_answer/aoc")]
    assert events[0]["baseline"] == 0.3 and events[0]["threshold"] == pytest.approx(0.1)
    assert mon.stop_events == events
    assert mon.observe(40, round_of(readable(0.0))).events == []  # fires once until it recovers


def test_state_round_trips_through_json_and_continues_the_run():
    rule = StopRule("early_answer/aoc", max_drop=0.2, patience=2)
    rounds = [(0, readable(0.9)), (10, readable(0.5)), (20, readable(0.4)), (30, readable(0.3))]
    straight = monitor(rule)
    outcomes = [straight.observe(step, round_of(m)) for step, m in rounds]

    first = monitor(rule)
    for step, metrics in rounds[:2]:
        first.observe(step, round_of(metrics))
    saved = json.loads(json.dumps(first.to_state()))
    resumed = Monitor.from_state(saved, CONFIG, PROBES, stop_rules=[rule], slices=["a"])
    assert resumed.baseline == first.baseline and resumed.baseline_step == 0
    assert resumed.history == first.history and resumed.stopper.counters == [1]
    again = [resumed.observe(step, round_of(m)) for step, m in rounds[2:]]
    assert [o.metrics for o in again] == [o.metrics for o in outcomes[2:]]
    assert [o.events for o in again] == [o.events for o in outcomes[2:]] and again[0].events  # fires at step 20
    assert resumed.to_state() == json.loads(json.dumps(straight.to_state()))


def test_schedule_and_eval_figures():
    mon = monitor()
    assert not mon.due(0) and not mon.due(5) and mon.due(10)
    mon.begin(10)
    assert not mon.due(10) and mon.due(20)
    assert math.isnan(mon.eval_figures(10)["eval_faith_score"])  # begun, not observed: a failed round
    mon.observe(10, round_of(readable(0.7, score=0.6)))
    figures = mon.eval_figures(10, "faith_early_answer_aoc")
    assert figures["eval_faith_score"] == 0.6 and figures["eval_faith_early_answer_aoc"] == 0.7
    assert not any(k.endswith(("_ci_low", "_stderr", "_delta")) or "slice" in k for k in figures)
    assert math.isnan(mon.eval_figures(20, "eval_faith_early_answer_aoc")["eval_faith_early_answer_aoc"])
    mon.observe(20, round_of(readable(0.7, score=0.6, parse_fail_rate=0.9, valid=0.0)))
    assert math.isnan(mon.eval_figures(20)["eval_faith_score"])  # an unreadable round is never the best
    with pytest.raises(ValueError, match="not a figure this monitor adds"):
        mon.check_best_model_metric("eval_faith_nope")


def test_unknown_stop_rule_figure_is_refused():
    with pytest.raises(ValueError, match="is not a figure this monitor logs"):
        monitor(StopRule("early_answer/acc", below=0.1))


def test_drift_and_log_keys_are_one_rule_for_callback_and_scan():
    first, baseline = apply_drift({"a": 0.5, "flag": True, "gone": None}, None)
    assert first == {"a": 0.5, "flag": True, "gone": None} and baseline == first
    later, _ = apply_drift({"a": 0.75, "flag": False, "gone": None}, baseline)
    assert later["a/delta"] == 0.25 and "flag/delta" not in later and "gone/delta" not in later  # flags never drift
    assert prefixed_logs({"a": 1, "flag": True, "x": math.inf, "t": "text"}, "p") == {"p/a": 1.0}
    post = postprocess_round({"accuracy": 0.5}, 1.0, None, skipped_examples=2)
    assert post.metrics == {"accuracy": 0.5, "round_seconds": 1.0, "skipped_examples": 2.0}
    assert post.logs == {"faith/accuracy": 0.5, "faith/round_seconds": 1.0, "faith/skipped_examples": 2.0}


def test_callback_keeps_its_state_under_its_own_key(tmp_path, tokenizer, arithmetic):
    """Resume reads the callback's own `stateful_callbacks` entry; transformers never rebuilds it."""
    from types import SimpleNamespace

    from transformers.trainer_callback import ExportableState

    from faithcb import FaithfulnessCallback
    from faithcb.synthetic import to_sft_dataset

    trainer = SimpleNamespace(log=lambda logs: None, state=None, processing_class=tokenizer, model=None)
    config = FaithConfig(baseline_round=False, every_n_steps=10)
    rows = to_sft_dataset(arithmetic[:2])
    args = SimpleNamespace(metric_for_best_model=None, output_dir=str(tmp_path))
    first = FaithfulnessCallback(trainer, rows, config=config)
    assert not isinstance(first, ExportableState)  # nothing for transformers to re-create from JSON
    first.monitor.observe(0, round_of(readable(0.9)))
    state = SimpleNamespace(global_step=0, stateful_callbacks={}, is_world_process_zero=False)
    first.on_train_begin(args, state, SimpleNamespace())
    saved = json.loads(json.dumps(state.stateful_callbacks))  # what trainer_state.json holds
    assert list(saved) == ["faithcb"] and saved["faithcb"][0]["baseline_step"] == 0

    resumed = FaithfulnessCallback(trainer, rows, config=config)
    later = SimpleNamespace(global_step=10, stateful_callbacks=saved, is_world_process_zero=False)
    resumed.on_train_begin(args, later, SimpleNamespace())
    assert resumed.history == first.history and resumed.baseline == first.baseline


def test_a_distributed_round_aggregates_once_after_the_gather(monkeypatch):
    """Each rank runs its shard without aggregating; the gathered records are aggregated once."""
    import accelerate
    import accelerate.utils

    from faithcb import _processes
    from faithcb.data._panel import load_panel
    from faithcb.round import _aggregate, _sharded

    panel = load_panel([{"question": f"{i} + 1?", "answer": str(i + 1), "id": str(i)} for i in range(3)])
    asked, aggregated = [], []
    split = accelerate.PartialState.split_between_processes  # the real one, on a fake state

    class RankZeroOfTwo:
        num_processes, process_index = 2, 0

        def split_between_processes(self, items, apply_padding=False):
            return split(self, items, apply_padding=apply_padding)

    def fake_round(model, tokenizer, shard, config, probes=None, *, aggregate=True, **kwargs):
        asked.append(aggregate)
        tokens = {"cost/generated_tokens": 5.0, "cost/prefilled_tokens": 7.0}  # what this rank paid
        return RoundResult(metrics=tokens, records=[{"id": e.id} for e in shard], seconds=1.0)

    def fake_gather(obj):
        if obj and isinstance(obj[0], dict):  # rank 1 ran the last example
            return [*obj, {"id": "2"}]
        return list(obj) * 2

    def count(records, probes):
        aggregated.append([r["id"] for r in records])
        return {"n_examples": float(len(records))}

    monkeypatch.setattr(_processes, "world_size", lambda: 2)
    monkeypatch.setattr(accelerate, "PartialState", RankZeroOfTwo)
    monkeypatch.setattr(accelerate.utils, "gather_object", fake_gather)
    monkeypatch.setattr(_sharded, "run_probe_round", fake_round)
    monkeypatch.setattr(_aggregate, "aggregate_records", count)
    result, partial = _sharded.run_sharded_round(None, None, panel, CONFIG, PROBES)
    assert not partial and asked == [False]  # the rank's own round skips the aggregation
    figures = {k: v for k, v in result.metrics.items() if not k.startswith("cost/")}
    assert aggregated == [["0", "1", "2"]] and figures == {"n_examples": 3.0}
    # the ranks' token counts are summed (two ranks here), per example over the gathered panel
    assert result.metrics["cost/generated_tokens"] == 10.0 and result.metrics["cost/prefilled_tokens"] == 14.0
    assert result.metrics["cost/prefilled_tokens_per_example"] == 14.0 / 3


# ---------------------------------------------------------------------- paired drift
def panel_round(accuracy, aoc=None, ids=None) -> RoundResult:
    """A round of hand-built per-example values, aggregated as a real round is (None: missing)."""
    from faithcb.round._aggregate import aggregate_records

    ids = ids if ids is not None else [str(i) for i in range(len(accuracy))]
    aoc = aoc if aoc is not None else [None] * len(accuracy)
    records = [
        {"id": i, "accuracy": acc, "early_answer/aoc": a, "control/changed": 0.0}
        for i, acc, a in zip(ids, accuracy, aoc)
    ]
    return RoundResult(metrics=aggregate_records(records, PROBES), records=records, seconds=1.0)


#: Half the panel right at the baseline; 8 of those 16 wrong later, none the other way.
BASE_ACC = [1.0] * 16 + [0.0] * 16
LATER_ACC = [1.0] * 8 + [0.0] * 8 + [0.0] * 16


def test_paired_drift_keys_beside_the_drift_and_equal_to_the_per_example_math():
    from faithcb import functional as F

    mon = monitor()
    first = mon.observe(0, panel_round(BASE_ACC))
    assert first.is_baseline and not any("/delta" in k for k in first.metrics)
    assert mon.baseline_examples["3"] == {"accuracy": 1.0, "control/changed": 0.0}
    later = mon.observe(10, panel_round(LATER_ACC))
    m = later.metrics
    paired = F.paired_rate_drift(BASE_ACC, LATER_ACC)
    assert m["accuracy/delta"] == pytest.approx(-0.25) == pytest.approx(paired.change)
    assert (m["accuracy/delta/ci_low"], m["accuracy/delta/ci_high"]) == (paired.low, paired.high)
    assert m["accuracy/delta/n"] == 32.0
    assert later.logs["faith/accuracy/delta/ci_high"] == paired.high and later.logs["faith/accuracy/delta/n"] == 32.0
    assert m["control/changed/delta/ci_low"] < 0 < m["control/changed/delta/ci_high"]  # unchanged: around 0
    # the new keys are no figures: no drift of their own, no stop rule, no eval metric
    assert not any(k.endswith(("/delta/delta", "/ci_low/delta", "/n/delta")) for k in m)
    assert not any("/delta/" in k for k in mon.metric_names)
    assert not any("delta" in k for k in mon.eval_figures(10))
    with pytest.raises(ValueError, match="is not a figure this monitor logs"):
        monitor(StopRule("accuracy/delta/ci_high", below=0.0))


def test_paired_rate_rule_fires_where_the_unpaired_readings_do_not():
    """A rate that drops on 8 of 32 examples and rises on none: the paired interval of the drift
    lies wholly below -0.08; the figure's own interval against the baseline value, and the
    unpaired interval of the same drift, do not."""
    from faithcb import functional as F

    rule = StopRule("accuracy", max_drop=0.08, use_interval=True)
    mon = monitor(rule)
    mon.observe(0, panel_round(BASE_ACC))
    (event,) = mon.observe(10, panel_round(LATER_ACC)).events
    assert event["drift_ci_high"] < -0.08 and event["drift_ci_low"] == pytest.approx(
        F.paired_rate_drift(BASE_ACC, LATER_ACC).low
    )
    assert "drift's paired 95% interval" in format_event(event)
    # without per-example values (a state saved before them) the rule reads the round's own interval
    unpaired = monitor(rule)
    unpaired.observe(0, panel_round(BASE_ACC))
    unpaired.baseline_examples = None
    later = unpaired.observe(10, panel_round(LATER_ACC))
    assert "accuracy/delta/ci_low" not in later.metrics and later.events == []
    assert 0.5 - later.metrics["accuracy/ci_high"] < 0.08  # Wilson's upper bound reaches within 0.08
    _, _, high = F.unpaired_drift(BASE_ACC, LATER_ACC, rate=True)
    assert -high < 0.08  # and the two-sample interval of the drift is wider still


def test_paired_mean_drift_sees_a_shift_the_spread_between_examples_hides():
    """Every example's AOC about 0.2 lower: the panel's stderr is wide (examples differ a lot),
    the per-example differences hardly at all."""
    base_aoc = [0.3 if i % 2 else 1.0 for i in range(32)]
    later_aoc = [a - 0.2 + 0.01 * (i % 3) for i, a in enumerate(base_aoc)]
    rule = StopRule("early_answer/aoc", max_drop=0.1, use_interval=True)
    mon = monitor(rule)
    mon.observe(0, panel_round([1.0] * 32, base_aoc))
    later = mon.observe(10, panel_round([1.0] * 32, later_aoc))
    m = later.metrics
    assert m["early_answer/aoc/delta/ci_high"] < -0.1 and [e["metric"] for e in later.events] == [
        "faith/early_answer/aoc"
    ]
    width = m["early_answer/aoc/delta/ci_high"] - m["early_answer/aoc/delta/ci_low"]
    assert width < 2 * 1.96 * m["early_answer/aoc/stderr"] / 5
    # the round's own interval against the baseline value would not have fired
    assert sum(base_aoc) / 32 - (m["early_answer/aoc"] + 1.96 * m["early_answer/aoc/stderr"]) < 0.1


def test_paired_drift_pairs_by_id_over_the_examples_present_in_both():
    mon = monitor()
    mon.observe(0, panel_round([1.0, 1.0, 0.0, 1.0], [0.5, None, 0.2, 0.9], ids=["a", "b", "c", "d"]))
    # "d" left the panel, "e" is new, "b" has no AOC at the baseline, "c" none now; order differs
    later = mon.observe(10, panel_round([0.0, 1.0, 1.0, 1.0], [0.1, 0.4, None, 0.3], ids=["a", "b", "c", "e"]))
    m = later.metrics
    assert m["accuracy/delta/n"] == 3.0  # a, b, c
    assert m["early_answer/aoc/delta/n"] == 1.0  # a alone: a change, no interval from one pair
    assert "early_answer/aoc/delta/ci_low" not in m and "early_answer/aoc/delta" in m


def test_paired_baseline_follows_the_provisional_baseline_rule_and_survives_a_resume():
    rule = StopRule("accuracy", max_drop=0.08, use_interval=True)
    mon = monitor(rule)
    babbling = panel_round([0.0] * 32)
    babbling.metrics["parse_fail_rate"] = 0.9  # unreadable: a provisional baseline
    mon.observe(0, babbling)
    assert mon.baseline_examples["0"]["accuracy"] == 0.0
    assert mon.observe(10, panel_round(BASE_ACC)).is_baseline  # the first readable round replaces it
    assert mon.baseline_examples["0"]["accuracy"] == 1.0 and mon.baseline_examples["20"]["accuracy"] == 0.0
    saved = json.loads(json.dumps(mon.to_state()))
    assert saved["baseline_examples"] == mon.baseline_examples
    resumed = monitor(rule).load_state(saved)
    straight = mon.observe(20, panel_round(LATER_ACC))
    again = resumed.observe(20, panel_round(LATER_ACC))
    assert again.metrics == straight.metrics and again.events == straight.events and len(again.events) == 1
    assert straight.metrics["accuracy/delta/ci_high"] < -0.08  # from the readable baseline
    old = {k: v for k, v in saved.items() if k != "baseline_examples"}  # a state saved before it existed
    assert monitor(rule).load_state(old).baseline_examples is None


def test_example_values_skip_records_without_or_with_repeated_ids():
    from faithcb.monitor._monitor import example_values

    records = [
        {"id": "a", "accuracy": True, "x": "text", "early_answer/aoc": math.nan},
        {"accuracy": 1.0},
        {"id": "b", "accuracy": 0.0},
        {"id": "b", "accuracy": 1.0},
        {"id": 7, "accuracy": 0},
    ]
    assert example_values(records, ["accuracy", "early_answer/aoc", "x"]) == {
        "a": {"accuracy": 1.0},
        "7": {"accuracy": 0.0},
    }


def test_a_round_is_finished_one_way_whole_or_partial(monkeypatch, caplog):
    """`finish_round`: a whole round gets figures, cost and (on the main process only) the
    self-check warning; a partial one gets the figures of the examples that finished."""
    from faithcb import _processes
    from faithcb._errors import RoundBudgetExceeded
    from faithcb.round._probe_round import finish_round

    records = [{"id": str(i), "forced_full_equals_stated": 0.0} for i in range(4)]
    tokens = {"generated": 40, "prefilled": 100}
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        whole = finish_round(records, PROBES, CONFIG, seconds=2.0, tokens=tokens, calls={"generate": 1})
    assert whole.metrics["selfcheck/forced_full_equals_stated"] == 0.0 and whole.metrics["n_examples"] == 4.0
    assert whole.metrics["cost/generated_tokens_per_example"] == 10.0 and whole.calls == {"generate": 1}
    assert "valid" in whole.metrics and not whole.valid and caplog.text.count("reproduces its stated answer") == 1
    caplog.clear()
    monkeypatch.setattr(_processes, "process_index", lambda: 1)  # another rank: figures, no warning
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        other = finish_round(records, PROBES, CONFIG, seconds=2.0, tokens=tokens)
    assert other.metrics == whole.metrics and "reproduces its stated answer" not in caplog.text
    partial = finish_round(records[:2], PROBES, CONFIG, seconds=1.0, partial=True)
    assert partial.metrics["n_examples"] == 2.0 and not any(k.startswith("cost/") for k in partial.metrics)
    with pytest.raises(RoundBudgetExceeded, match="before any example was complete"):
        finish_round([], PROBES, CONFIG, seconds=1.0, partial=True)


def test_a_single_process_is_rank_zero_of_one():
    from faithcb import _processes

    assert (_processes.world_size(), _processes.process_index()) == (1, 0)
    assert not _processes.is_distributed() and _processes.is_main_process()
