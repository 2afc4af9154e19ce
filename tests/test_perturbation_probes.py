"""Perturbation probes (paraphrase, mistake, step necessity) and their perturbation sources.

On the hand-built rule models (tests/rule_models.py) the truth is known:

- `reads_chain` answers with the LAST integer of its chain. A paraphrase that keeps every number
  in order keeps its answer; a corrupted result propagates (it continues from the written
  result), so the answer moves; dropping the last step moves the answer, but dropping an
  earlier step does not, because the last step restates the running total. So its step
  necessity is exactly 1/n (the last step is the only load-bearing one).
- `ignores_chain` answers the true value whatever the chain says: nothing moves it.
- `noisy` answers a hash of the exact text: any rewording moves it.
"""

import hashlib
import math
import re

import pytest
import torch

from faithcb import FaithConfig, get_probe, list_probes, load_panel, run_probe_round
from faithcb.data._panel import ProbeExample
from faithcb.data._parsing import split_steps
from faithcb.engine import Chain
from faithcb.perturb import (
    BatchedCallable,
    ModelMistake,
    ModelParaphraser,
    NumericMistake,
    RuleParaphraser,
    as_mistake_maker,
    as_paraphraser,
    find_numbers,
    stable_seed,
)
from faithcb.probes import MistakeProbe, ParaphraseProbe, StepNecessityProbe
from faithcb.probes.step_necessity import chain_without_step
from faithcb.round._probe_round import build_probes

try:
    from tests.rule_models import (
        EOS_ID,
        UNK_ID,
        VOCAB,
        RuleLM,
        RuleLMConfig,
        apply_op,
        char_tokenizer,
        gold_chain,
        gold_response,
        make_prompt,
        make_rule_model,
        parse_question,
        rule_next_piece,
    )
except ImportError:  # pytest run from inside tests/
    from rule_models import (
        EOS_ID,
        UNK_ID,
        VOCAB,
        RuleLM,
        RuleLMConfig,
        apply_op,
        char_tokenizer,
        gold_chain,
        gold_response,
        make_prompt,
        make_rule_model,
        parse_question,
        rule_next_piece,
    )

EXPRESSIONS = [
    "3 + 4 * 5",
    "9 - 2 + 6",
    "2 * 3 * 4 - 1",
    "8 + 1",
    "7 * 2 - 5 + 3",
    "6 - 1 * 7",
    "5 + 5 + 5",
    "4 * 4 - 9",
]
PROBES = ["paraphrase", "mistake", "step_necessity"]
_INT = re.compile(r"-?\d+(?:\.\d+)?")


@pytest.fixture(scope="module")
def panel():
    rows = []
    for expr in EXPRESSIONS:
        prompt = make_prompt(expr)
        rows.append({"prompt": prompt, "completion": gold_response(prompt)})
    return load_panel(rows)


def config(**overrides):
    values = {"max_new_tokens": 80, "generation_batch_size": 4, "scoring_batch_size": 8, "probes": PROBES}
    values.update(overrides)
    return FaithConfig(**values)


def run(kind, panel, probes=None, **overrides):
    model, tokenizer = make_rule_model(kind)
    cfg = config(**overrides)
    return run_probe_round(model, tokenizer, panel, cfg, build_probes(cfg, probes))


def make_chain(text, index=0):
    return Chain(
        index=index,
        example=ProbeExample(id=f"ex{index}", prompt="Q\n"),
        prompt="Q\n",
        response=text + "\nAnswer: 1",
        chain=text,
        steps=split_steps(text),
        cue="Answer:",
        cue_found=True,
        joiner="\n",
        answer_sep=" ",
        stated_answer="1",
        answer_type="numeric",
    )


def propagate(prompt, j, corrupted_step):
    """What reads_chain answers after step j is corrupted and the rest regenerated."""
    _, ops = parse_question(prompt)
    acc = int(_INT.findall(corrupted_step)[-1])
    for op, operand in ops[j + 1 :]:
        acc = apply_op(acc, op, operand)
    return str(acc)


# ---------------------------------------------------------------------- perturbation sources
ALL_STEPS = [step for expr in [*EXPRESSIONS, "12 - 20 * 3", "100 * 100 + 7"] for step in gold_chain(expr)]


def test_rule_paraphraser_keeps_numbers_and_changes_wording():
    paraphraser = RuleParaphraser()
    out = paraphraser(ALL_STEPS)
    assert len(out) == len(ALL_STEPS)
    for before, after in zip(ALL_STEPS, out):
        assert after != before
        assert _INT.findall(after) == _INT.findall(before)
    assert paraphraser(["3 + 4 = 7", "7 * 5 = 35", "9 - 2 = 7"]) == [
        "3 plus 4 equals 7",
        "7 times 5 equals 35",
        "9 minus 2 equals 7",
    ]
    assert RuleParaphraser()(ALL_STEPS) == out  # deterministic


def test_rule_paraphraser_table_is_careful():
    rewrite = RuleParaphraser().rewrite
    assert rewrite("So the total is 3+4=7.") == "Therefore the total is 3 plus 4 equals 7."
    assert rewrite("Then, we get 12 / 4 = 3") == "Next, this gives 12 divided by 4 equals 3"
    assert rewrite("x = -3 - 2") == "x equals -3 minus 2"  # the sign of -3 is kept
    assert rewrite("Because 2 * 3 = 6, in total 6.") == "Since 2 times 3 equals 6, altogether 6."
    # not connectives / not arithmetic: left alone
    for text in ("so many apples", "the next day - 4 hours", "3-4 hours, 1/2 cup", "nothing to do here"):
        assert rewrite(text) == text
    grouped = RuleParaphraser(number_formats=True).rewrite("12345 and 12,345 and 2024")
    assert grouped == "12,345 and 12345 and 2024"


def test_numeric_mistake_changes_exactly_one_number():
    maker = NumericMistake(seed=3)
    out = maker(ALL_STEPS)
    for before, after in zip(ALL_STEPS, out):
        old = [m.group() for m in find_numbers(before)]
        new = [m.group() for m in find_numbers(after)]
        assert len(old) == len(new)
        changed = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
        assert changed == [len(old) - 1]  # exactly one number: the last (the step's result)
        assert abs(int(new[-1]) - int(old[-1])) in (1, 2, 3)
        assert after[: find_numbers(before)[-1].start()] == before[: find_numbers(before)[-1].start()]
    assert NumericMistake(seed=3)(ALL_STEPS) == out  # deterministic
    assert NumericMistake(seed=4)(ALL_STEPS) != out  # and seeded
    assert not maker.can_corrupt("no numbers here") and maker(["no numbers here"]) == ["no numbers here"]
    assert maker.corrupt("x = -3") != "x = -3"
    assert re.fullmatch(r"0\.25 of 1,000 is 1,\d{3}\.\d\d", maker.corrupt("0.25 of 1,000 is 1,234.50"))
    random_position = NumericMistake(seed=0, position="random")
    assert sum(a != b for a, b in zip(_INT.findall("1 + 2 = 3"), _INT.findall(random_position.corrupt("1 + 2 = 3"))))


def test_stable_seed_is_fixed_across_processes():
    # SHA-256 based, never Python's salted hash: a constant, whatever PYTHONHASHSEED is
    assert stable_seed("mistake_step", 0, "ex1") == 0x89FFA2C9757077EE
    assert stable_seed("a", 1) == int.from_bytes(hashlib.sha256(b"a\x1f1").digest()[:8], "big")


def test_callables_are_wrapped():
    def one(text: str) -> str:
        return text.upper()

    def many(texts: list[str]) -> list[str]:
        return [t[::-1] for t in texts]

    assert as_paraphraser(one)(["ab", "c"]) == ["AB", "C"]
    assert as_paraphraser(many)(["ab", "c"]) == ["ba", "c"]
    assert as_paraphraser(lambda t: t + "!")(["a"]) == ["a!"]  # no annotation: one text
    assert as_mistake_maker(lambda ts: [t * 2 for t in ts], batched=True)(["a"]) == ["aa"]
    with pytest.raises(TypeError, match="batched=True"):
        as_paraphraser(lambda ts: list(ts))(["ab"])
    with pytest.raises(ValueError, match="one string per input"):
        BatchedCallable(lambda ts: ts[:1], batched=True)(["a", "b"])
    with pytest.raises(ValueError, match="Unknown paraphraser"):
        as_paraphraser("rules")
    with pytest.raises(ValueError, match="Unknown mistake maker"):
        as_mistake_maker("numerical")


def test_chain_without_step_keeps_the_other_steps_exactly():
    chain = make_chain("3 + 4 = 7\n7 * 5 = 35\n35 - 1 = 34")
    assert [chain_without_step(chain, i) for i in range(3)] == [
        "7 * 5 = 35\n35 - 1 = 34",
        "3 + 4 = 7\n35 - 1 = 34",
        "3 + 4 = 7\n7 * 5 = 35",
    ]
    prose = make_chain("First add 3. Then  add 4.\nSo it is 7.")
    for i in range(prose.num_steps):
        rest = chain_without_step(prose, i)
        kept = [prose.step_text(k) for k in range(prose.num_steps) if k != i]
        assert [rest[s.start : s.end] for s in split_steps(rest)] == kept
        assert rest == rest.strip()
    assert chain_without_step(make_chain("3 + 4 = 7"), 0) == ""
    with pytest.raises(IndexError):
        chain_without_step(chain, 3)


def test_probes_are_registered_and_built_from_config():
    assert {"paraphrase", "mistake", "step_necessity"} <= set(list_probes())
    assert isinstance(get_probe("step_necessity"), StepNecessityProbe)
    built = build_probes(FaithConfig(probes=PROBES, mistake_regenerate=False, seed=5))
    mistake = next(p for p in built if isinstance(p, MistakeProbe))
    assert mistake.regenerate is False and mistake.seed == 5 and mistake.maker.seed == 5
    assert isinstance(next(p for p in built if isinstance(p, ParaphraseProbe)).paraphraser, RuleParaphraser)
    assert [p.name for p in build_probes(FaithConfig())] == [
        "core",
        "control",
        "early_answer",
        "filler",
        "info_gain",
        *PROBES,
    ]


def test_mistake_step_choice_is_seeded_by_example_id():
    chains = [make_chain("1 + 1 = 2\n2 + 1 = 3\n3 + 1 = 4\n4 + 1 = 5", index=i) for i in range(12)]
    first = [MistakeProbe(seed=0).choose_step(c) for c in chains]
    assert first == [MistakeProbe(seed=0).choose_step(c) for c in chains]
    assert len(set(first)) > 1  # spread over the steps
    assert first != [MistakeProbe(seed=1).choose_step(c) for c in chains]
    # only steps the maker can corrupt are chosen
    words = make_chain("add them up\n3 + 4 = 7\nthat is all")
    assert {MistakeProbe(seed=s).choose_step(words) for s in range(10)} == {1}
    assert MistakeProbe().choose_step(make_chain("no numbers at all")) is None


# ---------------------------------------------------------------------- probes on rule models
def test_reads_chain_model(panel):
    result = run("reads_chain", panel)
    m = result.metrics
    assert m["paraphrase/match"] == 1.0  # the rule paraphraser keeps the last number
    assert m["paraphrase/reworded"] == 1.0
    assert m["mistake/match"] == 0.0  # the corrupted result propagates to the answer
    assert m["mistake/match/ci_high"] < 0.5
    assert m["paraphrase/match/correct"] == 1.0
    assert m["step_necessity/correct"] == m["step_necessity"]
    for expr, record in zip(EXPRESSIONS, result.records):
        n = len(record["steps"])
        # only the last step is load-bearing: it restates the running total
        assert record["step_necessity/load_bearing"] == [False] * (n - 1) + [True]
        assert record["step_necessity"] == pytest.approx(1 / n)
        if n < 2:
            assert record["paraphrase/match"] is None and record["paraphrase/answers"] is None
        else:
            assert len(record["paraphrase/answers"]) == n - 1
            assert record["paraphrase/answers"] == record["paraphrase/control_answers"]
        j = record["mistake/step"]
        assert record["mistake/original_step"] == record["steps"][j]
        assert record["mistake/corrupted_step"] != record["steps"][j]
        assert record["mistake/answer"] == propagate(make_prompt(expr), j, record["mistake/corrupted_step"])
        assert record["mistake/match"] == 0.0
    expected_necessity = sum(1 / len(r["steps"]) for r in result.records) / len(result.records)
    assert m["step_necessity"] == pytest.approx(expected_necessity)
    assert result.records[0]["paraphrase/steps"] == ["3 plus 4 equals 7"]
    assert len({r["mistake/step"] for r in result.records}) > 1  # the seeded choice varies


def regenerated_steps(prompt, j, corrupted_step):
    """The steps reads_chain writes after a corrupted step j: from the WRITTEN (wrong) result."""
    _, ops = parse_question(prompt)
    acc, lines = int(_INT.findall(corrupted_step)[-1]), []
    for op, operand in ops[j + 1 :]:
        lines.append(f"{acc} {op} {operand} = {apply_op(acc, op, operand)}\n")
        acc = apply_op(acc, op, operand)
    return "".join(lines)


def test_mistake_regeneration_continues_from_the_corrupted_step(panel):
    result = run("reads_chain", panel, probes=["mistake"])
    for expr, record in zip(EXPRESSIONS, result.records):
        j, corrupted = record["mistake/step"], record["mistake/corrupted_step"]
        assert record["mistake/continuation"] == regenerated_steps(make_prompt(expr), j, corrupted)
    assert any(record["mistake/continuation"] for record in result.records)


def test_ignores_chain_model(panel):
    m = run("ignores_chain", panel).metrics
    assert m["mistake/match"] == 1.0
    assert m["step_necessity"] == 0.0
    assert m["paraphrase/match"] == 1.0


def test_noisy_model_is_unstable_under_paraphrase(panel):
    m = run("noisy", panel).metrics
    assert m["paraphrase/match"] < 0.3
    assert m["paraphrase/reworded"] == 1.0
    # raw mistake and step figures read as "faithful" on this model: the noise floor
    # (1 - paraphrase/match) is what tells it apart (docs/metrics.md)
    assert m["mistake/match"] < 0.3 and m["step_necessity"] > 0.7


def test_mistake_without_regeneration(panel):
    result = run("reads_chain", panel, mistake_regenerate=False)
    for record in result.records:
        n, j = len(record["steps"]), record["mistake/step"]
        # the original later steps are kept: reads_chain still reads the last, intact step
        assert record["mistake/match"] == float(j < n - 1)
        assert "mistake/continuation" not in record
    assert 0.0 < result.metrics["mistake/match"] < 1.0


def test_callable_paraphraser_runs_once_per_round(panel):
    calls = []

    def reword(texts: list[str]) -> list[str]:
        calls.append(len(texts))
        return [t.replace(" = ", " gives ") for t in texts]

    def drop_numbers(text: str) -> str:
        return "some words"

    result = run("reads_chain", panel, probes=[ParaphraseProbe(reword), "step_necessity"])
    assert len(calls) == 1 and calls[0] == len({s for r in result.records for s in r["steps"][:-1]})
    assert result.metrics["paraphrase/match"] == 1.0
    assert result.records[0]["paraphrase/steps"] == ["3 + 4 gives 7"]
    assert result.metrics["paraphrase/discarded"] == 0.0
    # a "paraphrase" that loses the numbers is not meaning-preserving: the guard throws every one
    # away (reads_chain's answer would move under it), so nothing was reworded and there is no match
    lossy = run("reads_chain", panel, probes=[ParaphraseProbe(drop_numbers)])
    assert lossy.metrics["paraphrase/discarded"] == 1.0 and lossy.metrics["paraphrase/reworded"] == 0.0
    assert "paraphrase/match" not in lossy.metrics


def test_unscorable_examples_are_none():
    model, tokenizer = make_rule_model("reads_chain")
    rows = [{"prompt": "hello there\n", "gold": "4"}, {"prompt": make_prompt("1 + 3"), "gold": "4"}]
    result = run_probe_round(model, tokenizer, load_panel(rows), config())
    empty, one_step = result.records
    for key in ("paraphrase/match", "mistake/match", "step_necessity"):
        assert empty[key] is None
    assert one_step["paraphrase/match"] is None  # fewer than 2 steps: nothing to paraphrase
    assert one_step["mistake/match"] == 0.0 and one_step["step_necessity"] == 1.0
    assert "paraphrase/match" not in result.metrics  # missing, never zero


# ---------------------------------------------------------------------- model-based sources
_CHAR_ID = {c: i for i, c in enumerate(VOCAB) if i >= 4}


class ScriptedLM(RuleLM):
    """A stand-in reference model: its next piece comes from `script(text)`."""

    def script(self, text):
        if 'Rewritten text: "' in text:
            head, written = text.rsplit('Rewritten text: "', 1)
            source = head.rsplit('Text: "', 1)[1].rsplit('"', 1)[0]
            target = source.replace(" = ", " is ") + '"'
        elif "With a mistake:" in text:
            head, written = text.rsplit("With a mistake:", 1)
            source = head.rsplit("Sentence: ", 1)[1].strip()
            target = " " + source.replace("= ", "= 1") + "\n"
        else:
            return ""
        return target[len(written) :] if target.startswith(written) else ""

    def _row_targets(self, ids, mask, keep):
        out = []
        for pos in keep:
            if not mask[pos]:
                out.append(None)
                continue
            toks = [ids[p] for p in range(pos + 1) if mask[p]]
            if EOS_ID in toks:
                out.append(EOS_ID)
                continue
            piece = self.script("".join(VOCAB[t] if t >= 4 else "" for t in toks))
            out.append(_CHAR_ID.get(piece[0], UNK_ID) if piece else EOS_ID)
        return out


def scripted_reference():
    model = ScriptedLM(RuleLMConfig(rule="reads_chain"))
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.do_sample = False
    model.train()  # the paraphraser must put it in eval for generation and restore this
    return model, char_tokenizer()


def test_model_paraphraser_and_mistake_maker_batch_over_a_round(panel):
    model, tokenizer = scripted_reference()
    paraphraser = ModelParaphraser(model, tokenizer, batch_size=4, max_new_tokens=40)
    assert "conveying exactly the same information but using different wording" in paraphraser.prompt("x")
    assert paraphraser(["3 + 4 = 7", "no change"]) == ["3 + 4 is 7", "no change"]
    assert model.training and all(p.requires_grad for p in model.parameters())
    maker = ModelMistake(model, tokenizer, batch_size=4, max_new_tokens=20)
    assert maker(["3 + 4 = 7"]) == ["3 + 4 = 17"]

    before = paraphraser.calls, maker.calls
    probes = [ParaphraseProbe(paraphraser), MistakeProbe(maker), "step_necessity"]
    result = run("reads_chain", panel, probes=probes)
    steps_to_paraphrase = {s for r in result.records for s in r["steps"][:-1]}
    assert paraphraser.calls - before[0] == math.ceil(len(steps_to_paraphrase) / 4)
    assert maker.calls - before[1] <= math.ceil(len(result.records) / 4)
    assert result.metrics["paraphrase/match"] == 1.0
    assert result.records[0]["paraphrase/steps"] == ["3 + 4 is 7"]
    assert result.metrics["mistake/match"] == 0.0
    for record in result.records:
        assert record["mistake/corrupted_step"] == record["mistake/original_step"].replace("= ", "= 1")


def test_the_guard_keeps_a_rewrite_only_with_the_steps_quantities_and_entities():
    from faithcb.perturb._guard import keeps_content

    assert keeps_content("3 + 4 = 7", "3 plus 4 equals 7")
    assert keeps_content("Tom sells 1,200 cards.", "1200 cards are sold by Tom.")  # values, any order
    assert not keeps_content("Tom sells 5 cards.", "Tom sells five cards.")  # a quantity dropped
    assert not keeps_content("3 + 4 = 7", "3 + 4 = 7, then 7 * 2 = 14")  # the next step computed
    assert not keeps_content("Tom has 5 apples.", "He has 5 apples.")  # the person renamed away
    assert keeps_content("So she has 12 left.", "Therefore 12 remain with her.")  # openers are no entities
    assert not keeps_content("Speed is 40 km/h.", "Speed is 40 quickly.")


def test_model_paraphraser_stops_at_the_closing_quote_and_counts_its_cost():
    model, tokenizer = scripted_reference()
    paraphraser = ModelParaphraser(model, tokenizer, batch_size=4, max_new_tokens=40)
    assert paraphraser(["3 + 4 = 7", "no change"]) == ["3 + 4 is 7", "no change"]
    # each row stops once it wrote its closing quote, not at the 40-token budget
    assert paraphraser.generated_tokens == len('3 + 4 is 7"') + len('no change"')
    assert paraphraser.seconds > 0


class ParaphrasingRuleLM(ScriptedLM):
    """`reads_chain` that also answers the paraphrase prompt (so a snapshot of it paraphrases)."""

    def script(self, text):
        if 'Rewritten text: "' in text:
            return super().script(text)
        return rule_next_piece("reads_chain", text)


def test_snapshot_paraphraser_is_a_frozen_copy_of_the_model_at_the_first_round(panel):
    model = ParaphrasingRuleLM(RuleLMConfig(rule="reads_chain"))
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.do_sample = False
    tokenizer = char_tokenizer()
    cfg = config(paraphraser="snapshot")
    probes = build_probes(cfg)
    probe = next(p for p in probes if isinstance(p, ParaphraseProbe))
    assert probe.paraphraser is None  # built when a round starts
    first = run_probe_round(model, tokenizer, panel, cfg, probes)
    snapshot = probe.paraphraser
    assert isinstance(snapshot, ModelParaphraser) and snapshot.generator.model is not model
    assert not any(p.requires_grad for p in snapshot.generator.model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the live model is left as it was
    assert first.metrics["paraphrase/match"] == 1.0 and first.metrics["paraphrase/discarded"] == 0.0
    assert first.records[0]["paraphrase/steps"] == ["3 + 4 is 7"]
    assert first.metrics["paraphrase/cost_tokens"] > 0 and first.metrics["paraphrase/cost_seconds"] > 0
    with torch.no_grad():
        model.anchor.add_(1.0)  # training moves the live model; the snapshot stays
    run_probe_round(model, tokenizer, panel, cfg, probes)
    assert probe.paraphraser is snapshot and float(snapshot.generator.model.anchor) == 0.0
    with pytest.raises(ValueError, match="paraphraser='snapshot' copies the live model"):
        as_paraphraser("snapshot")


def test_the_guard_keeps_operations_and_lets_a_code_it_cannot_read_be_reworded():
    from faithcb.perturb._guard import keeps_content

    assert not keeps_content("1 * 2 = 2", "1 + 2 = 2")  # the same numbers, another operation
    assert keeps_content("12 - 4 = 8", "12 minus 4 is equal to 8")
    # a chain in a code shows no quantity a reader could check: its rewrites pass, and an answer
    # that moves under them shows that the wording, not readable content, does the work
    assert keeps_content("sun-cat blue map makes sun-owl", "the sun and the cat make an owl")


def test_the_callback_takes_the_snapshot_before_the_first_optimizer_step(panel, tmp_path):
    """Without a baseline round the first round comes after training began: the copy is taken
    when training begins instead, so the paraphraser is the model before fine-tuning."""
    from types import SimpleNamespace

    from faithcb import FaithfulnessCallback

    model = ParaphrasingRuleLM(RuleLMConfig(rule="reads_chain"))
    trainer = SimpleNamespace(log=lambda logs: None, state=None, processing_class=char_tokenizer(), model=model)
    cfg = config(paraphraser="snapshot", baseline_round=False, prompt_shape="as_written")
    callback = FaithfulnessCallback(trainer, list(panel), config=cfg)
    args = SimpleNamespace(metric_for_best_model=None, output_dir=str(tmp_path), report_to=[])
    state = SimpleNamespace(global_step=0, stateful_callbacks={}, is_world_process_zero=True)
    callback.on_train_begin(args, state, SimpleNamespace())
    probe = next(p for p in callback.probes if isinstance(p, ParaphraseProbe))
    assert isinstance(probe.paraphraser, ModelParaphraser) and probe.paraphraser.generator.model is not model
    assert callback.history == []  # no round ran
