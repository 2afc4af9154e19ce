"""The prompt shape: chosen once at the baseline, in a fixed order, kept for the run; check_panel."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
from rule_models import gold_response, make_prompt, make_rule_model

from faithcb import FaithConfig, FaithfulnessCallback, check_panel, load_panel
from faithcb.data._prompt_shape import (
    AS_WRITTEN,
    PromptShape,
    ShapeChoice,
    apply_shape,
    candidate_shapes,
    choose_prompt_shape,
)

EXPRESSIONS = ["3 + 4 * 5", "2 * 6 - 1", "9 - 4 + 2", "7 + 1 * 3", "5 * 2 + 8", "8 - 3 * 2"]
#: A short, cheap round: the rule model writes a two-step chain in ~25 characters.
SMALL = {"max_new_tokens": 40, "answer_max_new_tokens": 4, "probes": [], "generation_batch_size": 8}


def rule_rows(worked: bool = True) -> list[dict]:
    """Rule-model rows: the prompt, and a worked completion (`Answer: N` after the chain) or a bare gold."""
    rows = []
    for i, expr in enumerate(EXPRESSIONS):
        prompt = make_prompt(expr)
        response = gold_response(prompt)
        completion = response if worked else response.rsplit("Answer:", 1)[1].strip()
        rows.append({"id": f"r{i}", "prompt": prompt, "completion": completion})
    return rows


def readable(parse_fail: float = 0.0) -> dict:
    return {"n_examples": 6.0, "parse_fail_rate": parse_fail, "chain/with_steps": 1.0, "noise_floor/coverage": 1.0}


UNREADABLE = {"n_examples": 6.0, "parse_fail_rate": 1.0}


# ---------------------------------------------------------------------- pure
def test_shapes_are_tried_in_a_fixed_order_base_models_shots_first():
    panel = load_panel(rule_rows())
    chat = candidate_shapes(panel, shots=3, has_chat_template=True)
    base = candidate_shapes(panel, shots=3, has_chat_template=False)
    assert [s.name for s in chat] == ["as_written", "instruction", "fewshot", "instruction+fewshot"]
    assert [s.name for s in base] == ["as_written", "fewshot", "instruction", "instruction+fewshot"]
    # rows whose answer is only the gold show no worked answer: no shapes with shots
    bare = load_panel(rule_rows(worked=False))
    assert [s.name for s in candidate_shapes(bare, shots=3, has_chat_template=True)] == ["as_written", "instruction"]
    # 6 worked rows: 5 shots besides the example itself, not 6
    assert len(candidate_shapes(panel, shots=5, has_chat_template=True)) == 4
    assert [s.name for s in candidate_shapes(panel, shots=6, has_chat_template=True)] == ["as_written", "instruction"]


def test_apply_shape_writes_the_instruction_where_each_row_shape_takes_it(chat_tokenizer):
    rows = [
        {"id": "q", "question": "How many?", "choices": ["1", "2"], "answer": "B"},
        {"id": "c", "messages": [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "#### 2"}]},
        {"id": "p", "prompt": "Q: how many?\nAnswer:", "completion": " 2"},
    ]
    shaped = apply_shape(load_panel(rows), PromptShape(instruction=True), instruction="End with 'Answer: {answer}'.")
    render = {
        e.id: e.render_prompt(chat_tokenizer, use_chat_template=False, prompt_template="{question}\n") for e in shaped
    }
    # after the choices, with the placeholder of the row's answer type
    assert render["q"] == "How many?\nA) 1\nB) 2\nEnd with 'Answer: <letter>'.\n"
    assert "How many?\nEnd with 'Answer: <number>'." in render["c"]  # the end of the last user turn
    # before a plain-text prompt: its own trailing cue stays last
    assert render["p"] == "End with 'Answer: <number>'.\n\nQ: how many?\nAnswer:"


def test_shots_leave_the_example_itself_out_and_every_example_is_still_probed():
    panel = load_panel(rule_rows())
    shaped = apply_shape(panel, PromptShape(shots=2), instruction="x")
    assert [e.id for e in shaped] == [e.id for e in panel]
    for example in shaped:
        assert len(example.shots) == 2 and example.id not in {s.id for s in example.shots}
    text = shaped[0].render_prompt(None, use_chat_template=False, prompt_template="{question}\n")
    # the first two worked rows other than the example, each followed by a blank line, then its prompt
    assert text == "".join(make_prompt(e) + gold_response(make_prompt(e)) + "\n\n" for e in EXPRESSIONS[1:3]) + (
        make_prompt(EXPRESSIONS[0])
    )


def test_first_shape_that_reads_is_kept_and_the_baseline_is_not_run_twice():
    panel = load_panel(rule_rows())
    asked = []

    def trial(shape):
        asked.append(shape.name)
        return readable(0.1) if shape.name == "fewshot" else UNREADABLE

    choice = choose_prompt_shape(trial, panel, shots=2, has_chat_template=True, max_parse_fail=0.2, first=UNREADABLE)
    assert choice.shape == PromptShape(shots=2) and choice.readable
    assert asked == ["instruction", "fewshot"]  # as written was the baseline round itself
    assert [t.shape for t in choice.tries] == ["as_written", "instruction", "fewshot"]
    assert [t.reads for t in choice.tries] == [False, False, True]


def test_a_readable_round_with_too_many_unread_answers_tries_the_next_shape():
    panel = load_panel(rule_rows())
    choice = choose_prompt_shape(
        lambda shape: readable(0.0), panel, shots=2, has_chat_template=True, max_parse_fail=0.2, first=readable(0.4)
    )
    assert choice.shape.name == "instruction"
    assert "40% of stated answers could not be read" in choice.tries[0].reasons[0]


def test_no_shape_reads_keeps_the_panel_as_written_and_says_so():
    panel = load_panel(rule_rows())
    choice = choose_prompt_shape(lambda s: UNREADABLE, panel, shots=2, has_chat_template=True, max_parse_fail=0.2)
    assert choice.shape == AS_WRITTEN and not choice.readable and len(choice.tries) == 4
    assert ShapeChoice.from_state(json.loads(json.dumps(choice.to_state()))) == choice


def test_a_bad_prompt_shape_setting_is_refused():
    with pytest.raises(ValueError, match="prompt_shape must be auto or one of as_written, instruction"):
        FaithConfig(prompt_shape="shots")
    with pytest.raises(ValueError, match="shape_max_parse_fail must be between 0 and 1"):
        FaithConfig(shape_max_parse_fail=1.5)
    with pytest.raises(ValueError, match="shape_fewshot must be positive"):
        FaithConfig(shape_fewshot=0)


# ---------------------------------------------------------------------- with a model
def _callback(model, tokenizer, tmp_path, **settings):
    trainer = SimpleNamespace(log=lambda logs: None, state=None, processing_class=tokenizer, model=model)
    config = FaithConfig(**{**SMALL, **settings})
    callback = FaithfulnessCallback(trainer, rule_rows(), config=config)
    args = SimpleNamespace(metric_for_best_model=None, output_dir=str(tmp_path), report_to=[])
    state = SimpleNamespace(global_step=0, stateful_callbacks={}, is_world_process_zero=True)
    return callback, args, state


def test_the_baseline_round_reads_in_the_shape_chosen_before_training(tmp_path, caplog):
    """A model that states its answer only when told to: as written its step-0 round cannot be
    read; the monitor tries the instruction, keeps it, and the baseline round is readable."""
    model, tokenizer = make_rule_model("needs_instruction")
    callback, args, state = _callback(model, tokenizer, tmp_path)
    with caplog.at_level(logging.INFO, logger="faithcb"):
        callback.on_train_begin(args, state, SimpleNamespace())
    choice = callback.monitor.prompt_shape
    assert choice.shape.name == "instruction" and choice.readable
    # the rule model's tokenizer has no chat template: shots are tried before the instruction
    assert [(t.shape, t.reads) for t in choice.tries] == [
        ("as_written", False),
        ("fewshot", False),
        ("instruction", True),
    ]
    assert choice.tries[0].parse_fail_rate == 1.0
    assert callback.baseline_step == 0 and callback.monitor.baseline_readable
    assert callback.history[0]["valid"] == 1.0 and callback.history[0]["parse_fail_rate"] == 0.0
    assert any("prompt shape instruction" in r.getMessage() for r in caplog.records)
    line = json.loads((tmp_path / "faithcb" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["prompt_shape"] == "instruction"
    # saved with the state; a resumed run keeps the shape and never tries again
    saved = json.loads(json.dumps(state.stateful_callbacks))
    resumed, _, _ = _callback(model, tokenizer, tmp_path)
    resumed.on_train_begin(
        args, SimpleNamespace(global_step=5, stateful_callbacks=saved, is_world_process_zero=True), None
    )
    assert resumed.monitor.prompt_shape == choice
    assert "Answer: <number>" in resumed.shaped_panel[0].render_prompt(
        tokenizer, use_chat_template=False, prompt_template=""
    )


def test_a_base_model_reads_with_worked_shots(tmp_path):
    model, tokenizer = make_rule_model("needs_shots")  # no chat template: shots are tried first
    callback, args, state = _callback(model, tokenizer, tmp_path, shape_fewshot=2)
    callback.on_train_begin(args, state, SimpleNamespace())
    assert callback.monitor.prompt_shape.shape == PromptShape(shots=2)
    assert callback.history[0]["valid"] == 1.0


def test_a_pinned_shape_is_used_as_is(tmp_path):
    model, tokenizer = make_rule_model("reads_chain")
    callback, args, state = _callback(model, tokenizer, tmp_path, prompt_shape="instruction")
    callback.on_train_begin(args, state, SimpleNamespace())
    choice = callback.monitor.prompt_shape
    assert choice.pinned and choice.tries == [] and choice.shape.name == "instruction"
    assert callback.history[0]["valid"] == 1.0


def test_no_readable_shape_warns_once_with_every_try(tmp_path, caplog):
    model, tokenizer = make_rule_model("needs_shots")
    trainer = SimpleNamespace(log=lambda logs: None, state=None, processing_class=tokenizer, model=model)
    callback = FaithfulnessCallback(trainer, rule_rows(worked=False), config=FaithConfig(**SMALL))
    args = SimpleNamespace(metric_for_best_model=None, output_dir=str(tmp_path), report_to=[])
    state = SimpleNamespace(global_step=0, stateful_callbacks={}, is_world_process_zero=True)
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        callback.on_train_begin(args, state, SimpleNamespace())
    warnings = [r.getMessage() for r in caplog.records if "no prompt shape" in r.getMessage()]
    assert len(warnings) == 1
    assert "as_written: 100% unread" in warnings[0] and "instruction: 100% unread" in warnings[0]
    assert "faithcb check-panel" in warnings[0]
    assert callback.monitor.prompt_shape.shape == AS_WRITTEN and not callback.monitor.prompt_shape.readable


def test_check_panel_reports_what_was_read_and_a_verdict():
    model, tokenizer = make_rule_model("needs_instruction")
    report = check_panel(model, tokenizer, rule_rows(), FaithConfig(**SMALL))
    assert report.readable and report.choice.shape.name == "instruction"
    assert report.read_by == {"'Answer:'": 6}
    assert len(report.samples) == 3 and report.samples[0]["stated_answer"] is not None
    text = report.summary()
    assert "Prompt shape: instruction" in text and "Verdict: READABLE" in text and "as_written: 100% unread" in text

    unreadable = check_panel(model, tokenizer, rule_rows(), FaithConfig(**SMALL, prompt_shape="as_written"))
    assert not unreadable.readable and unreadable.read_by == {"unread": 6}
    assert "Verdict: NOT READABLE" in unreadable.summary()


def test_check_panel_command_exit_codes(monkeypatch, capsys, tmp_path):
    from faithcb.cli import _scan, main

    for kind, flags, code in (("needs_instruction", [], 0), ("needs_instruction", ["--prompt_shape", "as_written"], 3)):
        model, tokenizer = make_rule_model(kind)
        monkeypatch.setattr(_scan, "load_model", lambda path, model=model, **_: model)
        monkeypatch.setattr(_scan, "load_tokenizer", lambda path, tokenizer=tokenizer: tokenizer)
        panel = tmp_path / "panel.jsonl"
        panel.write_text("".join(json.dumps(r) + "\n" for r in rule_rows()))
        small = ["--max_new_tokens", "40", "--answer_max_new_tokens", "4", "--probes", "early_answer"]
        assert main(["check-panel", "model_dir", str(panel), *small, *flags]) == code
        assert "Verdict:" in capsys.readouterr().out


def test_a_round_whose_answers_read_keeps_its_panel_whatever_else_fails():
    """Only unreadable answers make the monitor try other shapes: a self-check below its gate is a
    property of the model another prompt would not mend (and could hide)."""
    panel = load_panel(rule_rows())
    asked = []
    selfcheck_fails = {**readable(0.0), "selfcheck/forced_full_equals_stated": 0.4}
    choice = choose_prompt_shape(
        lambda shape: asked.append(shape) or readable(0.0),
        panel,
        shots=2,
        has_chat_template=True,
        max_parse_fail=0.2,
        first=selfcheck_fails,
    )
    assert asked == [] and choice.shape == AS_WRITTEN and not choice.readable
    assert "reproduces the stated one in only 40%" in choice.tries[0].reasons[0]
    # unreadable forced answers do call for another shape
    forced_fail = {**readable(0.0), "forced_parse_fail_rate": 0.8}
    choice = choose_prompt_shape(
        lambda shape: readable(0.0), panel, shots=2, has_chat_template=True, max_parse_fail=0.2, first=forced_fail
    )
    assert choice.shape.name == "instruction"
