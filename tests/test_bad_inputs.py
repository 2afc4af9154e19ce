"""The catalogue of bad inputs in docs/reliability.md: each gets a clear message, none loses the run.

Already covered elsewhere (see docs/reliability.md): malformed, missing-field, empty and
duplicate panel rows (tests/test_panel.py), answers with commas, units and unicode
(tests/test_parsing.py), `every_n_steps <= 0` and unknown probes (tests/test_callback.py).
"""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from rule_models import gold_response, make_prompt, make_rule_model
from transformers import Trainer, TrainingArguments

from faithcb import (
    FaithConfig,
    FaithfulnessCallback,
    PanelError,
    Probe,
    RoundBudgetExceeded,
    StopRule,
    get_probe,
    list_probes,
    load_panel,
    register_probe,
    run_probe_round,
)
from faithcb.synthetic import build_tiny_model, to_sft_dataset

FAST = {"max_new_tokens": 12, "answer_max_new_tokens": 4, "probes": ["early_answer", "filler"]}


def make_trainer(tmp_path, tokenizer, model=None, **kwargs):
    settings = {"output_dir": str(tmp_path / "out"), "report_to": "none", "use_cpu": True, "disable_tqdm": True}
    settings.update(kwargs)
    return Trainer(
        model=model if model is not None else build_tiny_model(tokenizer),
        args=TrainingArguments(**settings),
        processing_class=tokenizer,
    )


def faith_logs(trainer, key):
    return [e for e in trainer.state.log_history if key in e]


# ---------------------------------------------------------------------------------------- panel / tokenizer
def test_prompts_longer_than_the_context_are_skipped(tmp_path, tokenizer, arithmetic, caplog):
    model = build_tiny_model(tokenizer, max_position_embeddings=64)  # room: 64 - 12 - 4 - 8 = 40 tokens
    long_row = {"id": "long", "prompt": "Q: " + "1 + " * 30 + "1\n", "completion": "2"}
    rows = [*to_sft_dataset(arithmetic[:3]), long_row]
    trainer = make_trainer(tmp_path, tokenizer, model)
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        callback = FaithfulnessCallback(trainer, rows, config=FaithConfig(**FAST))
    assert callback.skipped_examples == ["long"] and len(callback.panel) == 3
    assert "1 of 4 panel prompts are longer than the 40 tokens" in caplog.text and "ids long" in caplog.text
    assert callback._round(trainer.args, trainer.state, model, tokenizer)
    assert callback.history[0]["skipped_examples"] == 1.0 and callback.history[0]["n_examples"] == 3.0
    assert faith_logs(trainer, "faith/skipped_examples")[0]["faith/skipped_examples"] == 1.0
    with pytest.raises(PanelError, match=r"Every prompt .* longer than the 40 tokens .* \(longest: \d+\)"):
        FaithfulnessCallback(trainer, rows[3:], config=FaithConfig(**FAST))
    with pytest.raises(ValueError, match="leave no room for a prompt in the model's 64-token context"):
        FaithfulnessCallback(trainer, rows[:3], config=FaithConfig(max_new_tokens=60))


def test_chat_messages_without_chat_template_fail_at_start_up(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "Q: 1 + 2"}, {"role": "assistant", "content": "Answer: 3"}]}]
    with pytest.raises(PanelError, match="has chat messages but the tokenizer has no chat template"):
        FaithfulnessCallback(make_trainer(tmp_path, tokenizer), rows, config=FaithConfig(**FAST))
    with pytest.raises(PanelError, match="use_chat_template=True but the tokenizer has no chat template"):
        FaithfulnessCallback(
            make_trainer(tmp_path, tokenizer),
            [{"question": "1 + 2", "answer": "3"}],
            config=FaithConfig(use_chat_template=True, **FAST),
        )


def test_bad_prompt_template_fails_at_start_up(tmp_path, tokenizer):
    with pytest.raises(PanelError, match=r"Panel example '0' .* cannot be rendered .*KeyError: 'q'"):
        FaithfulnessCallback(
            make_trainer(tmp_path, tokenizer),
            [{"question": "1 + 2", "answer": "3"}],
            config=FaithConfig(prompt_template="Q: {q}\n", **FAST),
        )


def test_trainer_without_tokenizer_fails_at_start_up(tmp_path, tokenizer, arithmetic):
    trainer = Trainer(model=build_tiny_model(tokenizer), args=TrainingArguments(str(tmp_path), report_to="none"))
    with pytest.raises(ValueError, match="needs a tokenizer: pass processing_class"):
        FaithfulnessCallback(trainer, to_sft_dataset(arithmetic[:2]))


def test_tokenizer_without_pad_token(tmp_path, tokenizer, arithmetic):
    model = build_tiny_model(tokenizer)
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token is None
    result = run_probe_round(model, no_pad, load_panel(to_sft_dataset(arithmetic[:2])), FaithConfig(**FAST))
    assert result.metrics["n_examples"] == 2.0
    assert no_pad.pad_token is None  # EOS stood in during the round only
    neither = copy.deepcopy(no_pad)
    neither.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        FaithfulnessCallback(make_trainer(tmp_path, neither, model), to_sft_dataset(arithmetic[:2]))


def test_empty_chains_leave_chain_figures_missing():
    """A model that answers at once ("Answer: 5"): accuracy is measured, chain probes are left out."""
    model, tok = make_rule_model("reads_chain")
    rows = [{"prompt": "Q: 5\n", "completion": "Answer: 5"}, {"prompt": "Q: 7\n", "completion": "Answer: 7"}]
    result = run_probe_round(model, tok, load_panel(rows), FaithConfig(max_new_tokens=20))  # all six probes
    assert [r["chain"] for r in result.records] == ["", ""]
    assert result.metrics["accuracy"] == 1.0 and result.metrics["chain/steps"] == 0.0
    for key in ("early_answer/aoc", "filler/match", "paraphrase/match", "mistake/match", "info_gain/total_bits"):
        assert key not in result.metrics  # missing, never zero
    mixed = [*rows, {"prompt": make_prompt("3 + 4"), "completion": gold_response(make_prompt("3 + 4"))}]
    result = run_probe_round(model, tok, load_panel(mixed), FaithConfig(max_new_tokens=20))
    assert result.metrics["early_answer/aoc"] == 1.0 and result.metrics["early_answer/aoc/stderr"] == 0.0


# ---------------------------------------------------------------------------------------- settings
def test_stop_rule_on_a_missing_metric_lists_valid_names(tmp_path, tokenizer, arithmetic):
    trainer = make_trainer(tmp_path, tokenizer)
    with pytest.raises(ValueError, match=r"'faith/early_answer/auc' is not a figure.*early_answer/aoc.*filler/match"):
        FaithfulnessCallback(
            trainer,
            to_sft_dataset(arithmetic[:2]),
            config=FaithConfig(**FAST),
            stop_rules=[StopRule("faith/early_answer/auc", max_drop=0.2)],
        )
    with pytest.raises(ValueError, match="'mistake/match' is not a figure"):  # probe not configured
        FaithfulnessCallback(
            trainer,
            to_sft_dataset(arithmetic[:2]),
            config=FaithConfig(**FAST),
            stop_rules=[StopRule("mistake/match", above=0.5)],
        )
    with pytest.raises(ValueError, match="stop_rules must hold StopRule"):
        FaithfulnessCallback(trainer, to_sft_dataset(arithmetic[:2]), config=FaithConfig(**FAST), stop_rules=["x"])


def test_bad_numeric_settings():
    with pytest.raises(ValueError, match="round_time_budget_s must be positive"):
        FaithConfig(round_time_budget_s=0)
    with pytest.raises(ValueError, match="panel_size must be positive"):
        FaithConfig(panel_size=0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"every_n_steps": "10"}, r"^every_n_steps must be an integer, got '10' \(str\)$"),
        ({"every_n_steps": 2.5}, r"every_n_steps must be an integer, got 2\.5 \(float\)"),
        ({"do_sample": "yes"}, r"do_sample must be True or False, got 'yes'"),
        ({"panel_size": "32"}, r"panel_size must be an integer or None, got '32'"),
        ({"temperature": "hot"}, r"temperature must be a number, got 'hot'"),
        ({"answer_cues": "Answer:"}, r"answer_cues must be a list of strings, got 'Answer:'"),
        ({"probes": "filler"}, r"probes must be a list of probe names \(or Probe instances\), got 'filler'"),
        ({"probes": [3]}, r"probes must hold probe names or Probe instances, got 3"),
        ({"scoring_batch_size": 0}, r"scoring_batch_size must be positive or None, got 0"),
        ({"packed_row_max_tokens": -1}, r"packed_row_max_tokens must be >= 0, got -1"),
        ({"do_sample": True, "temperature": 0.0}, r"temperature must be a positive number \(greedy decoding is"),
        ({"answer_type": "number"}, r"answer_type must be one of auto, numeric, choice, boolean, math, text; got"),
        ({"stop_strings": ["", "Q:"]}, r"stop_strings must not hold an empty string"),
        ({"probes": ["filler", "filler"]}, r"probes lists 'filler' more than once"),
    ],
)
def test_faith_config_checks_types_and_ranges_when_built(settings, message):
    with pytest.raises(ValueError, match=message):
        FaithConfig(**settings)


def test_faith_config_checks_probe_names_against_the_registry():
    with pytest.raises(ValueError) as info:
        FaithConfig(probes=["early_answering", "filler", "zzz"])
    message = str(info.value)
    assert "probes: unknown probe 'early_answering' (did you mean 'early_answer'?); registered probes: " in message
    assert "unknown probe 'zzz'; registered probes:" in message  # every problem in one message
    for name in list_probes():
        assert name in message
    # several problems of different fields are reported together
    with pytest.raises(ValueError, match=r"max_new_tokens must be positive.*answer_type must be one of"):
        FaithConfig(max_new_tokens=0, answer_type="x")
    # a probe the user registers is a valid name; probe instances pass as they are
    name = "test_bad_inputs_user_probe"
    if name not in list_probes():

        @register_probe(name)
        class UserProbe(Probe):
            def variants(self, chain, a_full):
                return []

            def score(self, chain, results, a_full):
                return {}

    assert FaithConfig(probes=["early_answer", name]).probes == ["early_answer", name]
    assert isinstance(FaithConfig(probes=[get_probe("filler")]).probes[0], Probe)
    with pytest.raises(ValueError, match=r"probes lists 'filler' more than once"):
        FaithConfig(probes=["filler", get_probe("filler")])


# ---------------------------------------------------------------------------------------- panel forms
def _round_records(result):
    return [{k: v for k, v in r.items() if not k.startswith("time")} for r in result.records]


def test_run_probe_round_takes_every_panel_form_the_callback_takes(tmp_path):
    """A list of dicts, a JSONL path, a Dataset, a ProbePanel and a list of ProbeExamples give one round."""
    datasets = pytest.importorskip("datasets")
    model, tok = make_rule_model("reads_chain")
    rows = [
        {"prompt": make_prompt(x), "completion": gold_response(make_prompt(x)), "slice": s}
        for x, s in (("3 + 4", "a"), ("2 * 5 - 1", "a"), ("9 - 2", "b"))
    ]
    path = tmp_path / "panel.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = FaithConfig(max_new_tokens=20, panel_size=2, probes=["early_answer", "filler"])
    reference = run_probe_round(model, tok, load_panel(rows), config)
    assert reference.metrics["n_examples"] == 3.0 and "accuracy" in reference.metrics
    for source in (rows, path, str(path), datasets.Dataset.from_list(rows), load_panel(rows), list(load_panel(rows))):
        result = run_probe_round(model, tok, source, config)
        # every example runs (panel_size subsamples only where a run loads its panel), same records
        assert _round_records(result) == _round_records(reference), type(source).__name__
        assert result.metrics == reference.metrics
    assert run_probe_round(model, tok, [], config).records == []  # an empty shard of a distributed round


def test_run_probe_round_checks_rows_as_the_callback_does(tmp_path, tokenizer, arithmetic, caplog):
    model, tok = make_rule_model("reads_chain")
    rows = [{"prompt": make_prompt("3 + 4"), "completion": gold_response(make_prompt("3 + 4"))}]
    rows += [{"prompt": make_prompt("1 + 1")}, {"prompt": make_prompt("2 + 2"), "completion": "2 + 2 = 4\nso 4"}]
    config = FaithConfig(max_new_tokens=20, probes=["early_answer"])
    with pytest.raises(
        PanelError, match=r"has 2 bad rows:\n  list row 1: no gold answer.*\n  list row 2: cannot read"
    ) as info:
        run_probe_round(model, tok, rows, config)
    assert "allow_missing_gold=True" in str(info.value)
    result = run_probe_round(
        model, tok, rows, FaithConfig(max_new_tokens=20, probes=["early_answer"], allow_missing_gold=True)
    )
    assert [r["gold"] for r in result.records] == ["7", None, None]
    assert result.metrics["accuracy"] == 1.0  # gold-less examples have no accuracy, they never count as wrong
    # the callback refuses the same rows unless the config opts in
    trainer = make_trainer(tmp_path, tokenizer)
    gold_less = [*to_sft_dataset(arithmetic[:2]), {"prompt": arithmetic[2]["prompt"]}]
    with pytest.raises(PanelError, match=r"list row 2: no gold answer: the row has no 'completion'"):
        FaithfulnessCallback(trainer, gold_less, config=FaithConfig(**FAST))
    with caplog.at_level(logging.INFO, logger="faithcb.callback"):
        callback = FaithfulnessCallback(trainer, gold_less, config=FaithConfig(allow_missing_gold=True, **FAST))
    assert "Probe panel from list: 3 examples" in caplog.text and "without gold:  1" in caplog.text
    assert [e.gold for e in callback.panel] == [arithmetic[0]["answer"], arithmetic[1]["answer"], None]


# ---------------------------------------------------------------------------------------- faults in a round
def test_out_of_memory_is_isolated_and_frees_the_cache(tmp_path, tokenizer, arithmetic, monkeypatch, caplog):
    trainer = make_trainer(tmp_path, tokenizer)
    callback = FaithfulnessCallback(trainer, to_sft_dataset(arithmetic[:2]), config=FaithConfig(**FAST))
    sizes = iter(["2.00", "4.00", "8.00"])

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {next(sizes)} GiB")

    emptied = []
    monkeypatch.setattr("faithcb.round._sharded.run_probe_round", oom)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        assert not callback._round(trainer.args, trainer.state, trainer.model, tokenizer)
        assert not callback._round(trainer.args, trainer.state, trainer.model, tokenizer)
    assert emptied == [1, 1]
    assert len(faith_logs(trainer, "faith/round_failed")) == 2 and not callback.history
    warnings = [r.getMessage() for r in caplog.records if "out of accelerator memory" in r.getMessage()]
    assert len(warnings) == 1 and "generation_batch_size (16)" in warnings[0]  # once per cause
    strict = FaithfulnessCallback(trainer, to_sft_dataset(arithmetic[:2]), config=FaithConfig(strict=True, **FAST))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        strict._round(trainer.args, trainer.state, trainer.model, tokenizer)


def test_partial_round_over_the_time_budget(tmp_path, tokenizer, arithmetic, monkeypatch, caplog):
    """The engine ends a round over budget with RoundBudgetExceeded(records=...): figures flagged partial."""
    model = build_tiny_model(tokenizer)
    trainer = make_trainer(tmp_path, tokenizer, model)
    config = FaithConfig(round_time_budget_s=5.0, **FAST)
    rule = StopRule("n_examples", below=100, action="alert")  # would fire on any complete round
    callback = FaithfulnessCallback(trainer, to_sft_dataset(arithmetic[:4]), config=config, stop_rules=[rule])
    full = run_probe_round(model, tokenizer, list(callback.panel), config, callback.probes)

    def over_budget(*args, **kwargs):
        raise RoundBudgetExceeded("over budget", records=full.records[:2], seconds=6.0)

    monkeypatch.setattr("faithcb.round._sharded.run_probe_round", over_budget)
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        assert callback._round(trainer.args, trainer.state, model, tokenizer)
    row = callback.history[0]
    assert row["round_partial"] == 1.0 and row["n_examples"] == 2.0 and row["round_seconds"] == 6.0
    assert callback.baseline is None  # a partial round never becomes the baseline
    assert callback.stop_events == []  # nor feeds the stop rules
    assert faith_logs(trainer, "faith/round_partial")[0]["faith/n_examples"] == 2.0
    assert math.isnan(callback.eval_figures(0)["eval_faith_score"])  # nor picks a best checkpoint
    assert "not used as the baseline" in caplog.text
    assert "took 6.0s for 2 of 4 panel examples, over round_time_budget_s=5.0s; about 1 examples fit" in caplog.text
    # nothing finished before the deadline: a failed round
    monkeypatch.setattr(
        "faithcb.round._sharded.run_probe_round", lambda *a, **k: (_ for _ in ()).throw(RoundBudgetExceeded(records=[]))
    )
    assert not callback._round(trainer.args, trainer.state, model, tokenizer)
    assert len(faith_logs(trainer, "faith/round_failed")) == 1


def test_slow_complete_round_warns_with_an_estimate(tmp_path, tokenizer, arithmetic, caplog):
    """Until the engine cuts rounds short, a round over budget completes and says how many examples fit."""
    trainer = make_trainer(tmp_path, tokenizer)
    config = FaithConfig(round_time_budget_s=1e-6, **FAST)
    callback = FaithfulnessCallback(trainer, to_sft_dataset(arithmetic[:3]), config=config)
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        callback._round(trainer.args, trainer.state, trainer.model, tokenizer)
        callback._round(trainer.args, trainer.state, trainer.model, tokenizer)
    assert caplog.text.count("over round_time_budget_s") == 1
    assert "about 0 examples fit the budget" in caplog.text


def test_failing_jsonl_sink_never_kills_the_round(tmp_path, tokenizer, arithmetic, monkeypatch, caplog):
    trainer = make_trainer(tmp_path, tokenizer)
    callback = FaithfulnessCallback(trainer, to_sft_dataset(arithmetic[:2]), config=FaithConfig(**FAST))

    def full_disk(self, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("faithcb.publish._sinks.JsonlSink.write", full_disk)
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        assert callback._round(trainer.args, trainer.state, trainer.model, tokenizer)
    assert faith_logs(trainer, "faith/accuracy") and "writing the round's JSONL failed" in caplog.text


def test_failed_eval_round_gives_nan_not_keyerror(tmp_path, monkeypatch):
    """A round that fails at evaluation time: eval_faith_score is NaN, training and selection go on."""
    from test_stopping import rule_panel, rule_trainer

    trainer = rule_trainer(
        tmp_path,
        max_steps=2,
        with_eval=True,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        metric_for_best_model="eval_faith_score",
        load_best_model_at_end=True,
    )
    config = FaithConfig(every_n_steps=100, max_new_tokens=60, probes=["early_answer"])
    callback = FaithfulnessCallback(trainer, rule_panel(), config=config)
    trainer.add_callback(callback)
    monkeypatch.setattr("faithcb.round._sharded.run_probe_round", lambda *a, **k: 1 / 0)
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.state.best_model_checkpoint is None  # NaN is never the best
    assert len([e for e in trainer.state.log_history if "faith/round_failed" in e]) == 3  # baseline + 2 evals


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_out_of_memory_is_isolated(tmp_path, tokenizer, arithmetic):
    """On a GPU: a round that really runs out of memory is skipped, its memory is given back."""
    from faithcb import Probe, register_probe
    from faithcb.probes._base import _REGISTRY

    if "cuda_hog" not in _REGISTRY:

        @register_probe("cuda_hog")
        class CudaHog(Probe):
            metrics = ("cuda_hog/x",)

            def variants(self, chain, a_full):
                return []

            def score(self, chain, results, a_full):
                kept = torch.ones(256, 1024, 1024, device="cuda")  # 1 GiB that the failure must free
                kept += torch.empty(1 << 46, dtype=torch.uint8, device="cuda")  # 64 TiB: out of memory
                return {}

    model = build_tiny_model(tokenizer).to("cuda")
    trainer = make_trainer(tmp_path, tokenizer, model, use_cpu=False)
    callback = FaithfulnessCallback(
        trainer, to_sft_dataset(arithmetic[:2]), config=FaithConfig(**FAST), probes=["early_answer", "cuda_hog"]
    )
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    assert not callback._round(trainer.args, trainer.state, model, tokenizer)
    assert "out of memory" in callback.failures
    assert torch.cuda.memory_allocated() == before
    assert torch.cuda.memory_reserved() - before < (256 << 20)  # the 1 GiB block went back to the driver
    assert model.training is False and faith_logs(trainer, "faith/round_failed")


def test_ranks_agree_on_a_round_that_failed_elsewhere(tmp_path, tokenizer, arithmetic, monkeypatch, caplog):
    """Rank 0's shard went fine but rank 1 ran out of memory: rank 0 skips the round too, no gather."""
    import accelerate
    import accelerate.utils

    from faithcb import _processes

    trainer = make_trainer(tmp_path, tokenizer)
    callback = FaithfulnessCallback(trainer, to_sft_dataset(arithmetic[:4]), config=FaithConfig(**FAST))

    real_split = accelerate.PartialState.split_between_processes  # used on the fake state below

    class RankZeroOfTwo:
        num_processes = 2
        process_index = 0

        def split_between_processes(self, items, apply_padding=False):
            return real_split(self, items, apply_padding=apply_padding)

    gathered = []

    def fake_gather(obj):
        gathered.append(obj)
        return [*obj, (1, "OutOfMemoryError: CUDA out of memory", False)]

    monkeypatch.setattr(_processes, "world_size", lambda: 2)
    monkeypatch.setattr(accelerate, "PartialState", RankZeroOfTwo)
    monkeypatch.setattr(accelerate.utils, "gather_object", fake_gather)
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        assert not callback._round(trainer.args, trainer.state, trainer.model, tokenizer)
    assert len(gathered) == 1  # only the status; the records were never gathered
    assert faith_logs(trainer, "faith/round_failed")
    assert "the probe round failed on rank 1 (OutOfMemoryError: CUDA out of memory)" in caplog.text


def test_round_time_budget_ends_at_a_chunk_boundary_with_finished_records():
    import time

    from rule_models import gold_response, make_prompt, make_rule_model

    from faithcb import FaithConfig, RoundBudgetExceeded, load_panel, run_probe_round

    model, tok = make_rule_model("reads_chain")
    rows = [
        {"prompt": make_prompt(f"{i} + 1"), "completion": gold_response(make_prompt(f"{i} + 1"))} for i in range(1, 7)
    ]
    config = FaithConfig(generation_batch_size=2, round_time_budget_s=1e-6, max_new_tokens=30)
    start = time.perf_counter()
    with pytest.raises(RoundBudgetExceeded, match="after 2 of 6 examples") as info:
        run_probe_round(model, tok, load_panel(rows), config)
    assert [r["id"] for r in info.value.records] == ["0", "1"]
    assert info.value.records[0]["early_answer/aoc"] == 1.0
    assert info.value.seconds <= time.perf_counter() - start
    full = run_probe_round(model, tok, load_panel(rows), FaithConfig(generation_batch_size=2, max_new_tokens=30))
    assert len(full.records) == 6
