"""The end-of-run summary (a pure function over a run's history), its log block at the end of a
real Trainer run, `summary.json`, and the faithfulness section of the model card the trainer writes."""

from __future__ import annotations

import json
import logging

import pytest
from test_stopping import RULE_CONFIG, SwitchRule, rule_panel, rule_trainer

from faithcb import FaithConfig, FaithfulnessCallback, StopRule
from faithcb.monitor._summary import SUMMARY_FILE, SUMMARY_LOGGER, RunSummary, summarize_run
from faithcb.publish._model_card import CARD_FILE, card_markers, install_card_section, with_card_section

datasets = pytest.importorskip("datasets")


def row(step, **figures):
    """A history row of a readable round (six examples, every answer parsed)."""
    return {"step": step, "n_examples": 6, "valid": 1.0, "parse_fail_rate": 0.0, **figures}


HISTORY = [
    row(0, score=0.9, accuracy=0.5, **{"early_answer/aoc": 0.8}),
    row(10, score=0.7, accuracy=0.6, **{"score/delta": -0.2, "early_answer/aoc": 0.9, "early_answer/aoc/delta": 0.1}),
    row(
        20,
        score=0.3,
        accuracy=0.75,
        **{
            "score/delta": -0.6,
            "accuracy/delta": 0.25,
            "accuracy/delta/ci_low": 0.05,
            "accuracy/delta/ci_high": 0.4,
            "accuracy/delta/n": 6.0,
            "early_answer/aoc": 0.2,
            "early_answer/aoc/delta": -0.6,
            "early_answer/aoc/delta/ci_low": -0.9,
            "early_answer/aoc/delta/ci_high": -0.3,
            "early_answer/aoc/delta/n": 6.0,
        },
    ),
]
EVENTS = [{"step": 20, "rule": "faith/early_answer/aoc dropped", "action": "stop", "metric": "faith/early_answer/aoc"}]


def test_summary_figures_baseline_to_last_with_the_paired_drift_interval():
    summary = summarize_run(HISTORY, stop_events=EVENTS, failed_steps=[30], end_step=20, max_steps=100)
    assert (summary.rounds, summary.first_step, summary.last_step) == (3, 0, 20)
    assert summary.baseline_step == 0  # found without being told: the baseline round logs no /delta
    assert summary.figures_step == 20 and summary.last_reasons == []
    aoc = next(f for f in summary.figures if f.key == "early_answer/aoc")
    assert (aoc.baseline, aoc.last, aoc.delta, aoc.ci_low, aoc.ci_high, aoc.pairs) == (0.8, 0.2, -0.6, -0.9, -0.3, 6)
    assert aoc.reading == "higher = more faithful"
    assert [f.key for f in summary.figures] == ["score", "accuracy", "early_answer/aoc"]  # headline order
    text = summary.text()
    assert text.startswith("faithcb summary: 3 rounds (steps 0-20, baseline at step 0); 1 failed and skipped (step 30)")
    assert "early_answer/aoc  0.800 -> 0.200  -0.600 [-0.900, -0.300]" in text
    assert "score             0.900 -> 0.300  -0.600  (higher" in text  # no paired interval: none shown
    assert "step 20: stop 'faith/early_answer/aoc dropped'" in text
    assert "training ended at step 20 of 100 (stopped by the stop rule that fired at step 20)" in text
    assert "  last round (step 20): valid" in text


def test_an_unreadable_last_round_is_named_and_the_figures_come_from_the_last_readable_one():
    unreadable = row(30, score=0.0, parse_fail_rate=0.9, **{"score/delta": -0.9})
    partial = row(40, score=0.95, round_partial=1.0, **{"score/delta": 0.05})
    summary = summarize_run([*HISTORY, partial, unreadable], stop_events=[])
    assert summary.figures_step == 20  # neither the partial nor the unreadable round
    assert summary.partial_steps == [40] and summary.unreadable_steps == [30]
    assert summary.last_reasons and "could not be parsed" in summary.last_reasons[0]
    lines = summary.lines()
    assert "1 partial: time budget (step 40); 1 unreadable (step 30)" in lines[0]
    assert lines[1].startswith("  last round (step 30): NOT VALID (faith/valid = 0): 90% of stated answers")
    assert "  rules fired: none" in lines


def test_most_faithful_checkpoint_from_the_saved_rounds_or_the_trainer():
    saved = {10: "out/checkpoint-10", 20: "out/checkpoint-20"}
    best = summarize_run(HISTORY, checkpoints=saved).best
    assert (best.step, best.path, best.metric, best.value, best.chosen_by) == (
        10,
        "out/checkpoint-10",
        "score",
        0.7,
        "rounds",
    )
    # the baseline round has the highest score but no checkpoint: never named
    assert summarize_run(HISTORY, checkpoints={}).best is None
    assert summarize_run(HISTORY, checkpoints=saved, score_key="early_answer/aoc").best.step == 10
    chosen = {"path": "out/checkpoint-20", "metric": "eval_faith_score", "value": 0.3, "step": 20}
    best = summarize_run(HISTORY, checkpoints=saved, best_model=chosen).best
    assert (best.path, best.chosen_by) == ("out/checkpoint-20", "metric_for_best_model")
    text = summarize_run(HISTORY, best_model=chosen).text()
    assert (
        "most faithful checkpoint: out/checkpoint-20 (eval_faith_score = 0.300, step 20; metric_for_best_model)" in text
    )


def test_summary_round_trips_through_json_and_renders_markdown():
    summary = summarize_run(HISTORY, stop_events=EVENTS, checkpoints={10: "c10"}, panel="p.jsonl, 6 examples")
    again = RunSummary.from_dict(json.loads(json.dumps(summary.to_dict())))
    assert again == summary
    markdown = summary.markdown()
    assert markdown.startswith("## Chain-of-thought faithfulness\n")
    assert "| `early_answer/aoc` | 0.800 | 0.200 | -0.600 [-0.900, -0.300] | higher = more faithful |" in markdown
    assert (
        "- Panel: p.jsonl, 6 examples" in markdown and "  - step 20: stop 'faith/early_answer/aoc dropped'" in markdown
    )
    with pytest.raises(ValueError, match="not a faithcb run summary"):
        RunSummary.from_dict({"rounds": 1, "nope": 2})


def test_no_rounds_and_no_events_recorded():
    summary = summarize_run([], stop_events=None)
    assert summary.lines() == ["faithcb summary: no round produced figures"]


def test_card_section_is_appended_once_and_replaced_in_place():
    card = "---\nlibrary_name: transformers\n---\n\n# model\n"
    once = with_card_section(card, "## A\nfirst\n")
    begin, end = card_markers()
    assert once.startswith(card.rstrip("\n")) and once.count(begin) == 1 and once.endswith(f"{end}\n")
    twice = with_card_section(once + "\n## Later section\n", "## A\nsecond\n")
    assert twice.count(begin) == 1 and "first" not in twice and "second" in twice
    assert twice.rstrip().endswith("## Later section")  # text after the section stays where it was
    other = with_card_section(twice, "## B\n", prefix="faith2")
    assert "second" in other and other.count("<!-- faithcb:begin") == 2


# ---------------------------------------------------------------------------------------- real runs
def drifting_run(tmp_path, **kwargs):
    """A rule model that stops reading its chain at step 2: an alert at 2, a stop at 3 (of 20)."""
    trainer = rule_trainer(tmp_path, callbacks=[SwitchRule(at=2)], **kwargs)
    rules = [
        StopRule("early_answer/aoc", max_drop=0.3, patience=2),
        StopRule("faith/filler/match", above=0.5, action="alert"),
    ]
    callback = FaithfulnessCallback(trainer, rule_panel(), config=FaithConfig(**RULE_CONFIG), stop_rules=rules)
    trainer.add_callback(callback)
    return trainer, callback


def test_train_end_logs_the_summary_block_and_writes_summary_json(tmp_path, caplog):
    trainer, _ = drifting_run(tmp_path, save_strategy="steps", save_steps=1)
    with caplog.at_level(logging.INFO, logger=SUMMARY_LOGGER):
        trainer.train()
    blocks = [r.getMessage() for r in caplog.records if r.name == SUMMARY_LOGGER]
    assert len(blocks) == 1
    block = blocks[0]
    out = tmp_path / "out"
    assert block.startswith("faithcb summary: 4 rounds (steps 0-3, baseline at step 0)\n  last round (step 3): valid")
    assert "    early_answer/aoc" in block and "1.000 -> 0.000  -1.000 [-1.000, -1.000]" in block
    assert "step 2: alert 'faith/filler/match > 0.5'" in block
    assert "step 3: stop 'faith/early_answer/aoc dropped more than 0.3 below its baseline for 2 rounds'" in block
    assert "training ended at step 3 of 20" in block
    # faithfulness was perfect at steps 1 (and 0, which has no checkpoint): checkpoint-1 is the most faithful
    assert f"most faithful checkpoint: {out / 'checkpoint-1'} (score = 1.000, step 1; highest" in block
    assert f"figures and records: {out / 'faithcb'}" in block and f"report: faithcb report {out}" in block
    saved = RunSummary.from_dict(json.loads((out / "faithcb" / SUMMARY_FILE).read_text()))
    assert saved.text() == block
    assert [e["step"] for e in saved.events] == [2, 3]


def test_a_failing_summary_never_reaches_the_training_run(tmp_path, caplog, monkeypatch):
    import faithcb.callback as module

    def broken(*args, **kwargs):
        raise RuntimeError("summary bug")

    monkeypatch.setattr(module, "summarize_run", broken)
    trainer, _ = drifting_run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        trainer.train()
    assert trainer.state.global_step == 3
    assert "the end-of-run summary failed" in caplog.text and "summary bug" in caplog.text


def test_model_card_of_a_trainer_carries_the_faithfulness_section(tmp_path):
    """The card transformers' `create_model_card` writes (from scratch, each call) gets the section once."""
    trainer, callback = drifting_run(tmp_path, save_strategy="steps", save_steps=1)
    trainer.train()
    card_path = tmp_path / "out" / CARD_FILE
    assert not card_path.exists()  # a plain Trainer writes no card on its own
    trainer.create_model_card(model_name="tiny-rule-model")
    card = card_path.read_text()
    begin, end = card_markers()
    assert card.count(begin) == 1 and card.count(end) == 1
    assert "tiny-rule-model" in card.split(begin)[0]  # transformers' own card comes first, untouched
    section = card.split(begin)[1].split(end)[0]
    assert "## Chain-of-thought faithfulness" in section
    assert "- Panel: list, 6 examples; probes: core, control, early_answer, filler; a round every 1 step" in section
    assert "| `early_answer/aoc` | 1.000 | 0.000 | -1.000 [-1.000, -1.000] | higher = more faithful |" in section
    assert "  - step 3: stop 'faith/early_answer/aoc dropped more than 0.3" in section
    assert "- Most faithful checkpoint: checkpoint-1 (score = 1.000, step 1;" in section  # no local path
    assert str(tmp_path) not in section
    trainer.create_model_card()  # written again from scratch: still one section
    assert card_path.read_text().count(begin) == 1
    # the end of training refreshes a section the card already carries, and leaves other cards alone
    card_path.write_text(with_card_section("# card\n", "## stale\n"))
    callback.on_train_end(trainer.args, trainer.state, trainer.control)
    card = card_path.read_text()
    assert card.startswith("# card\n") and "stale" not in card and "## Chain-of-thought faithfulness" in card
    card_path.write_text("# a card of the user's own\n")
    callback.on_train_end(trainer.args, trainer.state, trainer.control)
    assert card_path.read_text() == "# a card of the user's own\n"


def test_push_to_hub_uploads_the_card_with_the_section(tmp_path, monkeypatch):
    """`push_to_hub` calls the callbacks' `on_push_begin` before it writes the card: the section
    still reaches the uploaded folder (the upload itself is faked; nothing leaves the machine)."""
    import transformers.trainer as hf_trainer

    uploaded = {}

    class FakeApi:
        def upload_folder(self, *, folder_path, **kwargs):
            uploaded["card"] = (tmp_path / "out" / CARD_FILE).read_text()
            uploaded["folder"] = folder_path

    monkeypatch.setattr(hf_trainer, "hf_api", lambda: FakeApi())
    trainer, _ = drifting_run(tmp_path, max_steps=2)
    trainer.train()
    trainer.hub_model_id = "someone/tiny"  # as if init_hf_repo had run
    trainer.push_to_hub()
    assert uploaded["folder"] == str(tmp_path / "out")
    assert card_markers()[0] in uploaded["card"] and "## Chain-of-thought faithfulness" in uploaded["card"]


def test_card_wrapper_never_raises_and_wraps_once(tmp_path, caplog):
    trainer = rule_trainer(tmp_path, max_steps=1)
    calls = []
    trainer.create_model_card = lambda **kwargs: (
        calls.append(kwargs)
        or (tmp_path / "out").mkdir(exist_ok=True)
        or (tmp_path / "out" / CARD_FILE).write_text("# card\n")
    )

    def broken():
        raise RuntimeError("section bug")

    install_card_section(trainer, "faith", broken)
    install_card_section(trainer, "other", lambda: "## other\n")
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        trainer.create_model_card(model_name="x")
    assert calls == [{"model_name": "x"}]  # one wrapper, the original called once
    assert "adding the faithfulness section to the model card failed" in caplog.text
    card = (tmp_path / "out" / CARD_FILE).read_text()
    assert card.startswith("# card\n") and "## other" in card and card_markers("faith")[0] not in card


def test_trl_checkpoint_cards_carry_the_section_and_the_last_is_refreshed_at_train_end(tmp_path, tokenizer, arithmetic):
    """TRL trainers write the card before every checkpoint save: each carries the section as the
    run stood at that step."""
    trl = pytest.importorskip("trl")
    from trainer_helpers import tiny_sft_config

    from faithcb.synthetic import build_tiny_model, to_sft_dataset

    trainer = trl.SFTTrainer(
        model=build_tiny_model(tokenizer),
        args=tiny_sft_config(tmp_path, max_steps=3, save_strategy="steps", save_steps=2),
        train_dataset=datasets.Dataset.from_list(to_sft_dataset(arithmetic[8:24])),
        processing_class=tokenizer,
    )
    config = FaithConfig(every_n_steps=1, max_new_tokens=12, answer_max_new_tokens=4, probes=["early_answer"])
    callback = FaithfulnessCallback(trainer, to_sft_dataset(arithmetic[:3]), config=config)
    trainer.add_callback(callback)
    seen = []
    original = trl.SFTTrainer._save_checkpoint

    def save_checkpoint(self, model, trial):
        original(self, model, trial)  # TRL writes README.md here, then the checkpoint
        seen.append((self.state.global_step, (tmp_path / "out" / CARD_FILE).read_text()))

    trainer._save_checkpoint = save_checkpoint.__get__(trainer)
    trainer.train()
    begin = card_markers()[0]
    assert [step for step, _ in seen] == [2, 3]
    for step, card in seen:
        assert card.count(begin) == 1 and "trl" in card.split(begin)[0].lower()  # TRL's own card, then ours
        assert f"(steps 0-{step}, baseline at step 0)" in card
    final = (tmp_path / "out" / CARD_FILE).read_text()
    assert final.count(begin) == 1 and "(steps 0-3, baseline at step 0)" in final
