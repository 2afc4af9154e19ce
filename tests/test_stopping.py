"""Stop rules: their arithmetic, and real Trainer runs in which faithfulness drifts and a rule fires."""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
from pathlib import Path

import pytest
from rule_models import gold_response, make_prompt, make_rule_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

from faithcb import FaithConfig, FaithfulnessCallback, StopRule, load_panel, run_probe_round
from faithcb.monitor._stop_rules import (
    StopMonitor,
    broadcast_from_main,
    metric_names,
    normalize_metric,
    read_rule,
    validate_rules,
)

datasets = pytest.importorskip("datasets")

EXPRESSIONS = ["3 + 4 * 5", "9 - 2 + 6", "2 * 3 * 4 - 1", "8 + 1 * 2", "7 * 2 - 5 + 3", "6 - 1 * 7"]
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "early_stopping.py"
RULE_CONFIG = {
    "every_n_steps": 1,
    "max_new_tokens": 60,
    "answer_max_new_tokens": 6,
    "probes": ["early_answer", "filler"],
}


def rule_panel():
    return [{"prompt": make_prompt(e), "completion": gold_response(make_prompt(e))} for e in EXPRESSIONS]


class SwitchRule(TrainerCallback):
    """Hand-built drift: from step `at` on, the rule model stops reading its chain."""

    def __init__(self, at: int, to: str = "ignores_chain") -> None:
        self.at, self.to = at, to

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            model.config.rule = self.to


def rule_trainer(tmp_path, *, callbacks=(), max_steps=20, with_eval=False, **kwargs):
    """A plain Trainer around a rule model (its loss is constant; its faithfulness is known)."""
    model, tok = make_rule_model("reads_chain")
    texts = [row["prompt"] + row["completion"] + tok.eos_token for row in rule_panel()]
    train = datasets.Dataset.from_dict({"text": texts}).map(
        lambda batch: tok(batch["text"]), batched=True, remove_columns=["text"]
    )
    settings = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": max_steps,
        "per_device_train_batch_size": 2,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
    }
    settings.update(kwargs)
    return Trainer(
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=train,
        eval_dataset=train if with_eval else None,
        processing_class=tok,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        callbacks=list(callbacks),
    )


def finished_run(path, timeout=30.0):
    """The run's log once wandb-core has written its exit record."""
    from wandb_offline import wait_until_finished

    return wait_until_finished(path, timeout)


# ---------------------------------------------------------------------------------------- rules
def test_stop_rule_fails_fast_on_bad_fields():
    with pytest.raises(ValueError, match="exactly one of below, above, max_drop"):
        StopRule("early_answer/aoc")
    with pytest.raises(ValueError, match="exactly one"):
        StopRule("early_answer/aoc", below=0.2, max_drop=0.1)
    with pytest.raises(ValueError, match="patience"):
        StopRule("early_answer/aoc", below=0.2, patience=0)
    with pytest.raises(ValueError, match="min_steps"):
        StopRule("early_answer/aoc", below=0.2, min_steps=-1)
    with pytest.raises(ValueError, match="action"):
        StopRule("early_answer/aoc", below=0.2, action="pause")
    with pytest.raises(ValueError, match="mode"):
        StopRule("early_answer/aoc", max_drop=0.2, mode="up")
    with pytest.raises(ValueError, match="max_drop must be >= 0"):
        StopRule("early_answer/aoc", max_drop=-0.1)
    with pytest.raises(ValueError, match="finite"):
        StopRule("early_answer/aoc", below=math.nan)


def test_stop_rule_from_string():
    rule = StopRule.from_string("faith/early_answer/aoc:max_drop=0.2,patience=2,use_interval=true,action=alert")
    assert rule == StopRule("faith/early_answer/aoc", max_drop=0.2, patience=2, use_interval=True, action="alert")
    assert StopRule.from_string("filler/match:above=0.5").above == 0.5
    with pytest.raises(ValueError, match="looks like"):
        StopRule.from_string("filler/match above 0.5")
    with pytest.raises(ValueError, match="unknown or malformed setting 'treshold=1'"):
        StopRule.from_string("filler/match:treshold=1")


def monitor(*rules):
    names = {"early_answer/aoc", "filler/match", "accuracy", "info_gain/total_bits"}
    with_interval = names
    return StopMonitor(list(rules), validate_rules(rules, names, with_interval))


def test_threshold_patience_reset_and_min_steps():
    mon = monitor(StopRule("accuracy", below=0.5, patience=2, min_steps=10))
    assert mon.update(5, {"accuracy": 0.1}, None) == []  # before min_steps: ignored
    assert mon.counters == [0]
    assert mon.update(10, {"accuracy": 0.1}, None) == []
    assert mon.update(20, {"accuracy": 0.9}, None) == []  # recovered: counter reset
    assert mon.update(30, {"accuracy": 0.4}, None) == []
    assert mon.update(40, {}, None) == []  # missing figure: neither counts nor resets
    assert mon.counters == [1]
    (event,) = mon.update(50, {"accuracy": 0.2}, None)
    assert event["step"] == 50 and event["value"] == 0.2 and event["rounds"] == 2 and event["threshold"] == 0.5
    assert event["rule"] == "faith/accuracy < 0.5 for 2 rounds from step 10"
    assert mon.update(60, {"accuracy": 0.2}, None) == []  # fires once until the figure recovers
    mon.update(70, {"accuracy": 0.9}, None)
    mon.update(80, {"accuracy": 0.2}, None)
    assert len(mon.update(90, {"accuracy": 0.2}, None)) == 1  # re-armed


def test_max_drop_follows_the_good_direction():
    baseline = {"early_answer/aoc": 0.8, "filler/match": 0.1}
    mon = monitor(StopRule("early_answer/aoc", max_drop=0.3), StopRule("filler/match", max_drop=0.3))
    assert mon.update(1, {"early_answer/aoc": 0.55, "filler/match": 0.35}, baseline) == []
    events = mon.update(2, {"early_answer/aoc": 0.45, "filler/match": 0.45}, baseline)
    assert [e["metric"] for e in events] == ["faith/early_answer/aoc", "faith/filler/match"]
    assert events[0]["threshold"] == pytest.approx(0.5) and events[1]["threshold"] == pytest.approx(0.4)
    assert "dropped more than 0.3 below" in events[0]["rule"] and "rose more than 0.3 above" in events[1]["rule"]
    # mode overrides the default direction; no baseline value: no reading
    rule = StopRule("filler/match", max_drop=0.3, mode="max")
    assert read_rule(rule, "filler/match", {"filler/match": 0.0}, {"filler/match": 0.5}).violated
    assert read_rule(rule, "filler/match", {"filler/match": 0.0}, {}) is None


def test_use_interval_needs_the_whole_interval_outside():
    rule = StopRule("early_answer/aoc", max_drop=0.2, use_interval=True)
    base = {"early_answer/aoc": 0.8}
    wide = {"early_answer/aoc": 0.5, "early_answer/aoc/stderr": 0.1}  # 0.5 +- 0.196: high 0.696 > 0.6
    narrow = {"early_answer/aoc": 0.5, "early_answer/aoc/stderr": 0.02}
    assert not read_rule(rule, "early_answer/aoc", wide, base).violated
    assert read_rule(rule, "early_answer/aoc", narrow, base).violated
    rate = StopRule("filler/match", above=0.5, use_interval=True)
    assert not read_rule(
        rate, "filler/match", {"filler/match": 0.7, "filler/match/ci_low": 0.4, "filler/match/ci_high": 0.9}, {}
    ).violated
    assert read_rule(
        rate, "filler/match", {"filler/match": 0.9, "filler/match/ci_low": 0.6, "filler/match/ci_high": 1.0}, {}
    ).violated
    assert not read_rule(StopRule("filler/match", above=0.5), "filler/match", {"filler/match": 0.5}, {}).violated


def test_use_interval_max_drop_reads_the_paired_drift_interval_where_there_is_one():
    base = {"early_answer/aoc": 0.8, "filler/match": 0.1}
    aoc = StopRule("early_answer/aoc", max_drop=0.2, use_interval=True)  # higher is better
    wide = {"early_answer/aoc": 0.5, "early_answer/aoc/stderr": 0.1}  # alone: not violated (see above)
    tight = {**wide, "early_answer/aoc/delta/ci_low": -0.35, "early_answer/aoc/delta/ci_high": -0.25}
    reading = read_rule(aoc, "early_answer/aoc", tight, base)
    assert reading.violated and (reading.drift_low, reading.drift_high) == (-0.35, -0.25)
    assert reading.low is None and reading.baseline == 0.8
    straddles = {**wide, "early_answer/aoc/delta/ci_low": -0.35, "early_answer/aoc/delta/ci_high": -0.15}
    assert not read_rule(aoc, "early_answer/aoc", straddles, base).violated
    assert not read_rule(aoc, "early_answer/aoc", wide, base).violated  # no paired interval: the old reading
    filler = StopRule("filler/match", max_drop=0.2, use_interval=True)  # lower is better: a rise is bad
    rose = {"filler/match": 0.5, "filler/match/delta/ci_low": 0.25, "filler/match/delta/ci_high": 0.6}
    assert read_rule(filler, "filler/match", rose, base).violated
    assert not read_rule(filler, "filler/match", {**rose, "filler/match/delta/ci_low": 0.15}, base).violated
    # without use_interval, or for a threshold rule, the paired interval is not read
    assert not read_rule(StopRule("early_answer/aoc", max_drop=0.35), "early_answer/aoc", tight, base).violated
    below = read_rule(StopRule("early_answer/aoc", below=0.6, use_interval=True), "early_answer/aoc", tight, base)
    assert not below.violated and below.drift_low is None


def test_monitor_state_round_trips_by_description():
    first = monitor(StopRule("accuracy", below=0.5, patience=3), StopRule("filler/match", above=0.5))
    first.update(1, {"accuracy": 0.1, "filler/match": 0.9}, None)
    state = first.state()
    again = monitor(StopRule("filler/match", above=0.5), StopRule("accuracy", below=0.5, patience=3))
    again.load_state(state)
    assert again.counters == [1, 1] and again.fired == [True, False]


def test_metric_names_cover_a_real_round():
    model, tok = make_rule_model("reads_chain")
    config = FaithConfig(max_new_tokens=60, answer_max_new_tokens=6)
    rows = [dict(r, slice="a" if i % 2 else "b") for i, r in enumerate(rule_panel())]
    result = run_probe_round(model, tok, load_panel(rows), config)
    from faithcb.round._probe_round import build_probes

    names, with_interval = metric_names(build_probes(config), ["b", "a"])
    assert set(result.metrics) <= names
    assert {"score", "early_answer/aoc/adj", "accuracy/delta", "round_seconds", "slice/a/accuracy"} <= names
    assert "early_answer/aoc" in with_interval and "filler/match" in with_interval
    assert "score" not in with_interval and "cot_lift" not in with_interval


def test_validation_errors_name_the_valid_figures():
    names, with_interval = {"early_answer/aoc", "cot_lift", "accuracy/delta"}, {"early_answer/aoc"}
    with pytest.raises(ValueError, match=r"'faith/early_answer/acc' is not a figure.*early_answer/aoc"):
        validate_rules([StopRule("faith/early_answer/acc", below=0.1)], names, with_interval)
    with pytest.raises(ValueError, match="carries no interval"):
        validate_rules([StopRule("cot_lift", below=0.1, use_interval=True)], names, with_interval)
    with pytest.raises(ValueError, match="already compares with the baseline"):
        validate_rules([StopRule("accuracy/delta", max_drop=0.1)], names, with_interval)
    assert validate_rules([StopRule("train/faith/early_answer/aoc", below=0.1)], names, with_interval) == [
        "early_answer/aoc"
    ]
    # names as W&B shows them: the faith/ headline section and the faith_drift/, faith_detail/, faith_interval/ sections
    rules = [StopRule("faith_drift/accuracy/delta", below=-0.1), StopRule("faith/cot_lift", below=0.0)]
    assert validate_rules(rules, names, with_interval) == ["accuracy/delta", "cot_lift"]
    assert normalize_metric("faith_detail/early_answer/aoc/correct") == "early_answer/aoc/correct"
    assert normalize_metric("faith_interval/accuracy/ci_low") == "accuracy/ci_low"
    assert normalize_metric("faith_details/x") == "faith_details/x"  # not a section of the monitor


def test_paired_drift_of_a_real_round_sequence():
    """Rule models on the same panel: the baseline reads its chain, the later round ignores it
    (its answer no longer moves with the chain: filler/match 0 -> 1, AOC 1 -> 0 on every
    example), or answers by a hash of its context (noisy: its answer still moves with any edit,
    so filler/match stays at 0). The paired intervals are those of the records, example by example."""
    from faithcb import functional as F
    from faithcb.monitor._monitor import Monitor
    from faithcb.round._probe_round import build_probes

    config = FaithConfig(**RULE_CONFIG)
    probes = build_probes(config)
    panel = load_panel(rule_panel())

    def round_of(kind):
        model, tok = make_rule_model(kind)
        return run_probe_round(model, tok, panel, config, probes)

    rules = [
        StopRule("filler/match", max_drop=0.3, use_interval=True),
        StopRule("early_answer/aoc", max_drop=0.5, use_interval=True),
    ]
    baseline = round_of("reads_chain")
    outcomes = {}
    for kind in ("ignores_chain", "noisy"):
        monitor = Monitor(config, probes, stop_rules=rules)
        monitor.observe(0, baseline)
        later = round_of(kind)
        outcomes[kind] = (monitor.observe(1, later), later)
    by_id = {r["id"]: r for r in baseline.records}

    ignoring, later = outcomes["ignores_chain"]
    records = later.records
    m = ignoring.metrics
    for key, paired in (("filler/match", F.paired_rate_drift), ("early_answer/aoc", F.paired_mean_drift)):
        was = [by_id[r["id"]].get(key) for r in records]
        now = [r.get(key) for r in records]
        drift = paired(was, now)
        assert drift.n == len(EXPRESSIONS) and m[f"{key}/delta/n"] == drift.n
        assert (m[f"{key}/delta/ci_low"], m[f"{key}/delta/ci_high"]) == (drift.low, drift.high)
    assert m["filler/match/delta"] == 1.0 and m["filler/match/delta/ci_low"] > 0.3
    assert m["early_answer/aoc/delta"] == -1.0 and m["early_answer/aoc/delta/ci_high"] == -1.0  # all moved alike
    assert [e["metric"] for e in ignoring.events] == ["faith/filler/match", "faith/early_answer/aoc"]
    assert all(e["drift_ci_low"] is not None and e["ci_low"] is None for e in ignoring.events)

    noisy, _ = outcomes["noisy"]
    assert noisy.metrics["filler/match"] == 0.0 and noisy.metrics["filler/match/delta"] == 0.0
    assert noisy.metrics["filler/match/delta/ci_low"] < 0.0 < noisy.metrics["filler/match/delta/ci_high"]
    assert "faith/filler/match" not in [e["metric"] for e in noisy.events]


# ---------------------------------------------------------------------------------------- distributed
def test_broadcast_from_main_uses_accelerate_in_distributed_runs(monkeypatch):
    import accelerate.utils

    from faithcb import _processes

    calls = []

    def fake_broadcast(box, from_process=0):
        calls.append(from_process)
        box[0] = {"from": "main"}
        return box

    monkeypatch.setattr(_processes, "world_size", lambda: 2)
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", fake_broadcast)
    assert broadcast_from_main({"from": "rank 1"}) == {"from": "main"}
    assert calls == [0]


def test_rank_adopts_the_main_process_decision(tmp_path, monkeypatch, caplog):
    """On a rank whose own reading says 'go on', the main process's 'stop' wins."""
    trainer = rule_trainer(tmp_path, max_steps=1)
    rule = StopRule("early_answer/aoc", max_drop=0.3)
    callback = FaithfulnessCallback(trainer, rule_panel(), config=FaithConfig(**RULE_CONFIG), stop_rules=[rule])

    def main_says_stop(decision):
        assert decision["events"] == []  # this rank saw no violation
        event = {
            "step": 1,
            "rule": "main's rule",
            "rule_index": 0,
            "action": "stop",
            "metric": "faith/early_answer/aoc",
            "value": 0.0,
            "ci_low": None,
            "ci_high": None,
            "baseline": 1.0,
            "threshold": 0.7,
            "rounds": 1,
        }
        return {
            "stopping": {"rules": callback.monitor.stopper.descriptions, "counters": [1], "fired": [True]},
            "events": [event],
        }

    monkeypatch.setattr("faithcb.monitor._monitor.broadcast_from_main", main_says_stop)
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        events = callback.monitor.check_stop_rules(1, {"early_answer/aoc": 1.0}, skip=False)
        callback._fire(events[0], trainer.state, trainer.control)
    assert trainer.control.should_training_stop
    assert callback.monitor.stopper.counters == [1]
    assert "main's rule" in caplog.text


# ---------------------------------------------------------------------------------------- real runs
def test_drift_fires_alert_then_stops_training(tmp_path, caplog, wandb_env):
    """A rule model that stops reading its chain at step 2: the alert fires at 2, the stop at 3."""
    from wandb_offline import find_offline_runs, read_records, read_summary

    trainer = rule_trainer(tmp_path, callbacks=[SwitchRule(at=2)], report_to="wandb")
    rules = [
        StopRule("early_answer/aoc", max_drop=0.3, patience=2),
        StopRule("faith/filler/match", above=0.5, action="alert"),
    ]
    callback = FaithfulnessCallback(trainer, rule_panel(), config=FaithConfig(**RULE_CONFIG), stop_rules=rules)
    trainer.add_callback(callback)
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        trainer.train()
    import wandb

    wandb.finish()
    assert trainer.state.global_step == 3  # of 20
    assert [(e["step"], e["action"]) for e in callback.stop_events] == [(2, "alert"), (3, "stop")]
    assert [h["step"] for h in callback.history] == [0, 1, 2, 3]
    assert callback.history[1]["early_answer/aoc"] == 1.0 and callback.history[3]["early_answer/aoc"] == 0.0
    lines = [r.getMessage() for r in caplog.records if "fired at step" in r.getMessage()]
    assert len(lines) == 2
    assert lines[1].startswith(
        "faithcb: stop rule 'faith/early_answer/aoc dropped more than 0.3 below its baseline for 2 rounds' "
        "fired at step 3: faith/early_answer/aoc = 0,"
    )
    assert "baseline 1" in lines[1] and "limit 0.7" in lines[1] and "stopping training" in lines[1]
    assert "alert rule 'faith/filler/match > 0.5' fired at step 2" in lines[0]
    run = finished_run(find_offline_runs(wandb_env)[0])
    summary = read_summary(run)
    assert summary["faith/stopped_by"] == callback.stop_events[1]["rule"]
    assert summary["faith/stopped_at_step"] == 3
    alerts = [r.alert for r in read_records(run) if r.WhichOneof("record_type") == "alert"]
    assert [a.title for a in alerts] == ["faithcb: faith/filler/match > 0.5"]
    assert "fired at step 2" in alerts[0].text and alerts[0].level == "WARN"


def test_alert_without_wandb_is_a_warning(tmp_path, caplog):
    trainer = rule_trainer(tmp_path, callbacks=[SwitchRule(at=1)], max_steps=3)
    rule = StopRule("filler/match", above=0.5, action="alert")
    callback = FaithfulnessCallback(trainer, rule_panel(), config=FaithConfig(**RULE_CONFIG), stop_rules=[rule])
    trainer.add_callback(callback)
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        trainer.train()
    assert trainer.state.global_step == 3  # alerts never stop training
    assert [e["step"] for e in callback.stop_events] == [1]
    assert "alert rule 'faith/filler/match > 0.5' fired at step 1" in caplog.text


# ---------------------------------------------------------------------------------------- recipe
def load_recipe():
    spec = importlib.util.spec_from_file_location("faithcb_early_stopping_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_recipe_smoke_stops_early_and_says_why(tmp_path, capsys):
    """The recipe's --smoke run: real drift (SFT on filler chains) on a briefly pre-trained model."""
    pytest.importorskip("trl")
    import torch

    recipe = load_recipe()
    threads = torch.get_num_threads()
    try:
        result = recipe.main(["--smoke", "--output_dir", str(tmp_path / "smoke")])
    finally:
        torch.set_num_threads(threads)  # the smoke settings use one thread; give the suite its own back
    out = capsys.readouterr().out
    stops = [e for e in result["stop_events"] if e["action"] == "stop"]
    assert stops, out
    assert result["final_step"] == stops[0]["step"] < result["max_steps"]
    assert f"STOPPED by rule:  {stops[0]['rule']}" in out
    assert f"at step {stops[0]['step']}" in out
    baseline = result["history"][0]
    assert baseline["early_answer/aoc"] >= 0.5  # the pre-trained chains carried the answer


def test_recipe_arguments(tmp_path):
    recipe = load_recipe()
    args, faith = recipe.parse_args(["--smoke", "--max_steps", "7", "--stop_rules", "accuracy:below=0.1"])
    assert args.smoke and args.max_steps == 7 and args.pretrain_steps == recipe.SMOKE["pretrain_steps"]
    assert args.threads == 1
    assert faith.every_n_steps == recipe.SMOKE["every_n_steps"] and faith.probes == ["early_answer", "filler"]
    assert args.stop_rules == ["accuracy:below=0.1"]
    args, faith = recipe.parse_args([])
    assert args.pretrain_steps == 1500 and faith.every_n_steps == 10 and args.stop_rules == recipe.DEFAULT_RULES
    rows = recipe.corrupt([{"prompt": "Q: 1 + 2\n", "steps": ["1 + 2 = 3"], "answer": "3"}], "filler", 0)
    assert rows == [{"prompt": "Q: 1 + 2\n", "completion": "...\nAnswer: 3"}]


@pytest.mark.slow
def test_recipe_full_run_stops_on_drift(tmp_path, capsys):
    pytest.importorskip("trl")
    recipe = load_recipe()
    result = recipe.main(["--output_dir", str(tmp_path / "full")])
    stops = [e for e in result["stop_events"] if e["action"] == "stop"]
    assert stops and result["final_step"] < result["max_steps"]
    assert result["history"][0]["accuracy"] >= 0.5
    assert "STOPPED by rule" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- best checkpoint
def test_best_checkpoint_on_eval_faith_score_with_early_stopping(tmp_path, caplog):
    """metric_for_best_model=eval_faith_score + EarlyStoppingCallback: no KeyError, best checkpoint kept."""
    from transformers import EarlyStoppingCallback

    early = EarlyStoppingCallback(early_stopping_patience=2)
    trainer = rule_trainer(
        tmp_path,
        callbacks=[SwitchRule(at=3), early],  # EarlyStoppingCallback sits before the monitor added below
        max_steps=8,
        with_eval=True,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        metric_for_best_model="eval_faith_score",
        load_best_model_at_end=True,
    )
    config = FaithConfig(**dict(RULE_CONFIG, every_n_steps=100))  # rounds only at evaluations (+ baseline)
    callback = FaithfulnessCallback(trainer, rule_panel(), config=config)
    trainer.add_callback(callback)
    # the control probe always runs, so the noise-corrected score exists without the paraphrase probe
    assert callback.eval_round_enabled(trainer.args) and callback.score_key == "score"
    with caplog.at_level(logging.WARNING):
        trainer.train()
    handler = trainer.callback_handler.callbacks
    assert handler.index(callback) < handler.index(early)  # moved before EarlyStoppingCallback
    # eval rounds at steps 1..3 (the baseline round at 0 too); aoc 1, 1, then 0 once the chain is ignored
    assert [h["step"] for h in callback.history] == [0, 1, 2, 3]
    evals = [e for e in trainer.state.log_history if "eval_faith_score" in e]
    assert [(e["step"], e["eval_faith_score"]) for e in evals] == [(1, 1.0), (2, 1.0), (3, 0.0)]
    assert evals[0]["eval_faith_early_answer_aoc"] == 1.0 and "eval_faith_filler_match" in evals[0]
    assert trainer.state.global_step == 3  # early stopping saw eval_faith_score (2 evaluations without gain)
    assert trainer.state.best_metric == 1.0
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")
    best = callback.summary().best  # the end-of-run summary names the trainer's choice
    assert (best.path, best.metric, best.value) == (trainer.state.best_model_checkpoint, "eval_faith_score", 1.0)
    assert best.chosen_by == "metric_for_best_model" and best.step == 1
    assert "did not find" not in caplog.text  # EarlyStoppingCallback never missed the key


def test_eval_figures_names_and_failures(tmp_path):
    trainer = rule_trainer(tmp_path, max_steps=1, metric_for_best_model="faith_early_answer_aoc")
    callback = FaithfulnessCallback(trainer, rule_panel(), config=FaithConfig(**RULE_CONFIG))
    assert callback.eval_round_enabled(trainer.args)
    names = callback.eval_metric_names()
    assert {"eval_faith_score", "eval_faith_early_answer_aoc", "eval_faith_early_answer_curve_0.25"} <= set(names)
    assert not any(n.endswith(("_ci_low", "_stderr", "_delta")) or "slice" in n for n in names)
    # no round at this step (or a failed one): the score and the chosen metric are NaN, never missing
    figures = callback.eval_figures(5, trainer.args)
    assert set(figures) == {"eval_faith_score", "eval_faith_early_answer_aoc"}
    assert all(math.isnan(v) for v in figures.values())
    with pytest.raises(ValueError, match=r"metric_for_best_model='eval_faith_nope'.*eval_faith_score"):
        FaithfulnessCallback(rule_trainer(tmp_path, max_steps=1, metric_for_best_model="eval_faith_nope"), rule_panel())
    with pytest.raises(ValueError, match="eval_round=False"):
        FaithfulnessCallback(
            rule_trainer(tmp_path, max_steps=1, metric_for_best_model="eval_faith_score"),
            rule_panel(),
            config=FaithConfig(eval_round=False),
        )
    plain = rule_trainer(tmp_path, max_steps=1)
    assert not FaithfulnessCallback(plain, rule_panel(), config=FaithConfig(**RULE_CONFIG)).eval_round_enabled(
        plain.args
    )


def test_attach_inserts_before_early_stopping(tmp_path):
    from transformers import EarlyStoppingCallback

    trainer = rule_trainer(tmp_path, max_steps=1, callbacks=[EarlyStoppingCallback()])
    callback = FaithfulnessCallback.attach(trainer, rule_panel(), config=FaithConfig(**RULE_CONFIG))
    kinds = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert kinds.index("FaithfulnessCallback") == kinds.index("EarlyStoppingCallback") - 1
    assert trainer.callback_handler.callbacks[kinds.index("FaithfulnessCallback")] is callback
