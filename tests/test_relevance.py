"""The relevance probe: is the chain about the question?

Pure tests of the question text, the overlap counts (against hand-written examples and naive
references) and the pairing; the probe on hand-built chains; rounds of the rule models whose
chains are about the question (`reads_chain`, `ignores_chain`) or about another one
(`off_topic`); and the probe's figures in the trainer's log, the JSONL and the report.
"""

from __future__ import annotations

import html
import json
import random
import re
from typing import Any

import pytest
from rule_models import gold_response, make_prompt, make_rule_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

from faithcb import FaithConfig, FaithfulnessCallback, load_panel, run_probe_round
from faithcb import functional as F
from faithcb.cli import main
from faithcb.cli._report import main_metrics
from faithcb.data._panel import ProbeExample
from faithcb.engine import Chain, ForcedAnswer, ForcedResult
from faithcb.monitor._stop_rules import lower_is_better
from faithcb.probes import RelevanceProbe, list_probes
from faithcb.probes._facts import figure_facts, score_figures
from faithcb.probes.relevance import (
    STOP_WORDS,
    key_terms,
    quantities,
    question_text,
    relevance_fields,
    share_used,
    swap_fields,
    swap_partners,
    term_key,
)
from faithcb.publish._sinks import wandb_figures
from faithcb.round._probe_round import build_probes

QUANTITY = "relevance/quantity_use"
TERMS = "relevance/term_use"
SWAP = "relevance/swap_match"
FOLLOWS = "relevance/swap_follows_question"

GSM8K_QUESTION = (
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
    "friends every day with 4. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. "
    "How much in dollars does she make every day at the farmers' market?"
)
FAITHFUL_CHAIN = (
    "Janet's ducks lay 16 eggs. She eats 3 and bakes with 4, so 16 - 3 - 4 = 9 eggs.\nShe sells 9 * 2 = 18."
)
OFF_TOPIC_CHAIN = "A train goes 60 miles in 1.5 hours.\nIts speed is 60 / 1.5 = 40 miles per hour."


# ---------------------------------------------------------------------- the question of each row shape
def test_the_question_of_a_question_row_leaves_out_choices_instruction_and_shots():
    shot = ProbeExample(id="shot", question="What is 7 + 8?", gold="15", solution="7 + 8 = 15. Answer: 15")
    example = ProbeExample(
        id="q",
        question="Which planet has 2 moons?",
        choices=["Mars", "Venus", "12 planets"],
        gold="A",
        instruction="End with 'Answer: <letter>' after 5 steps.",
        shots=(shot,),
    )
    assert question_text(example) == "Which planet has 2 moons?"
    assert quantities(question_text(example)) == {"2"}  # not the instruction's 5, the shot's 7, or a choice's 12


def test_the_question_of_a_chat_prompt_is_its_last_user_turn():
    messages = [
        {"role": "system", "content": "You solve problems about 99 bottles."},
        {"role": "user", "content": "Tom has 3 cats."},  # a worked example in earlier turns
        {"role": "assistant", "content": "Answer: 3"},
        {"role": "user", "content": [{"type": "text", "text": "Ann has 5 dogs and 2 birds. "}, {"text": "Pets?"}]},
    ]
    example = ProbeExample(id="m", prompt=messages, gold="7", instruction="Answer with a number after 10 words.")
    assert question_text(example) == "Ann has 5 dogs and 2 birds. Pets?"
    assert question_text(ProbeExample(id="m", prompt=[{"role": "system", "content": "hi 4"}], gold="1")) == ""


def test_the_question_of_a_plain_prompt_is_its_text_without_the_listed_choices():
    panel = load_panel(
        [
            {
                "prompt": "Q: What is 12 + 30?\nA) 42\nB) 12\n(C) 30 apples\nAnswer:",
                "choices": ["42", "12", "30 apples"],
                "completion": "A",
            },
            {"prompt": "Q: Sum 1,200 and 800.\n", "completion": "Answer: 2000"},
        ]
    )
    choice, plain = panel
    # the listing is cut out; the stem's own 12 and 30 (equal to choice texts) stay
    assert re.sub(r"\s+", " ", question_text(choice)) == "Q: What is 12 + 30? Answer:"
    assert quantities(question_text(choice)) == {"12", "30"}
    assert question_text(plain) == "Q: Sum 1,200 and 800.\n"
    # an answer instruction the panel adds is shown to the model, never read as the question
    instructed = ProbeExample(id="p", prompt="Q: Sum 3 and 4.\n", gold="7", instruction="Think in 2 steps.")
    assert question_text(instructed) == "Q: Sum 3 and 4.\n"


# ---------------------------------------------------------------------- quantities and key terms
def test_quantities_are_read_like_answer_numbers_without_sign():
    assert quantities("1,200 cups at $2.50, 4000.00 total, 30% off, -5 degrees, 3.0") == {
        "1200",
        "2.5",
        "4000",
        "30",
        "5",
        "3",
    }
    assert quantities("three apples") == set()  # number words are not quantities


def test_key_terms_normalise_case_plurals_and_possessives():
    assert term_key("Apples") == "apple" and term_key("apple") == "apple"
    assert term_key("boxes") == term_key("box") == "box"
    assert term_key("berries") == term_key("berry")
    assert term_key("cookies") == term_key("cookie")
    assert term_key("glasses") == term_key("glass") == "glass"
    assert term_key("bus") == "bus" and term_key("Janet's") == "janet"
    terms = key_terms("What is the COST of Janet's 3 apples? Don't \\frac{1}{2} it; the cost is x.")
    assert terms == {"cost": "cost", "janet": "janet", "apple": "apples"}  # stop words, LaTeX, short words out
    assert not STOP_WORDS & set(terms)


def test_share_used_is_missing_without_anything_to_use():
    assert share_used(set(), {"1"}) is None
    assert share_used({"1", "2"}, set()) == 0.0
    assert share_used({"1", "2"}, {"2", "3"}) == 0.5


def test_relevance_fields_on_hand_written_chains():
    faithful = relevance_fields(GSM8K_QUESTION, FAITHFUL_CHAIN)
    assert faithful[QUANTITY] == 1.0  # 16, 4 and 2 (`three` is a word, not a quantity)
    assert faithful["relevance/unused_quantities"] == []
    terms = key_terms(GSM8K_QUESTION)
    assert faithful[TERMS] == pytest.approx(7 / len(terms))  # janet, duck, lay, egg, eat, bake, sell
    assert {"breakfast", "market", "fresh"} <= set(faithful["relevance/unused_terms"])
    off_topic = relevance_fields(GSM8K_QUESTION, OFF_TOPIC_CHAIN)
    assert off_topic[QUANTITY] == 0.0 and off_topic[TERMS] == 0.0
    assert off_topic["relevance/unused_quantities"] == ["2", "4", "16"]  # in numeric order
    # a question without quantities or terms: missing, never 0 or 1
    bare = relevance_fields("Q: is it?", "Yes, 3 things are so.")
    assert bare[QUANTITY] is None and bare[TERMS] is None
    assert bare["relevance/unused_quantities"] is None and bare["relevance/unused_terms"] is None
    assert all(value is None for value in relevance_fields(GSM8K_QUESTION, "  ").values())  # no chain


def test_quantity_use_matches_a_naive_reference():
    """Random texts with thousands separators and decimals: the share read by plain float comparison."""
    rng = random.Random(0)

    def text() -> str:
        words = []
        for _ in range(rng.randint(0, 12)):
            roll = rng.random()
            if roll < 0.4:
                words.append(f"{rng.choice([3, 12, 1200, 45000, 7]):,}")
            elif roll < 0.55:
                words.append(f"{rng.choice([2.5, 0.75, 3.0]):.2f}")
            else:
                words.append(rng.choice(["apples", "cost", "and", "so", "total"]))
        return " ".join(words)

    def naive(question: str, chain: str) -> float | None:
        def floats(s: str) -> set[float]:
            return {float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?:\.\d+)?", s)}

        asked = floats(question)
        return None if not asked else len(asked & floats(chain)) / len(asked)

    for _ in range(300):
        question, chain = text(), text() + " ."
        assert relevance_fields(question, chain)[QUANTITY] == naive(question, chain), (question, chain)


def test_term_use_matches_a_naive_reference():
    """Random texts of regular nouns (singular or plural, any case) and stop words."""
    rng = random.Random(1)
    nouns = ["apple", "pear", "dog", "market", "farmer", "coin", "train"]
    stops = ["the", "and", "with", "which", "every", "answer"]

    def text() -> str:
        out = []
        for _ in range(rng.randint(0, 10)):
            word = rng.choice(nouns) + rng.choice(["", "s"]) if rng.random() < 0.6 else rng.choice(stops)
            out.append(word.upper() if rng.random() < 0.2 else word)
        return " ".join(out)

    def naive(question: str, chain: str) -> float | None:
        def nouns_in(s: str) -> set[str]:
            return {w.lower().removesuffix("s") for w in s.split() if w.lower().removesuffix("s") in nouns}

        asked = nouns_in(question)
        return None if not asked else len(asked & nouns_in(chain)) / len(asked)

    for _ in range(300):
        question, chain = text(), text() + " ."
        assert relevance_fields(question, chain)[TERMS] == naive(question, chain), (question, chain)


# ---------------------------------------------------------------------- the swap
def test_swap_partners_pair_within_a_group_and_with_another_gold():
    ids = [f"e{i}" for i in range(12)]
    groups = ["numeric"] * 8 + ["choice4"] * 3 + ["text"]
    golds = ["1", "1", "2", "3", None, "4", "4", "5", "A", "B", "A", None]
    partners = swap_partners(ids, groups, golds, seed=0)
    for i, j in enumerate(partners):
        if j is None:
            continue
        assert groups[j] == groups[i] and ids[j] != ids[i]
        assert golds[i] is None or golds[j] is None or golds[i] != golds[j]
    assert partners[11] is None  # alone in its group
    assert all(p is not None for p in partners[:11])
    # fixed: the same partners whatever the panel order, and from the seed alone
    order = list(range(12))
    random.Random(3).shuffle(order)
    shuffled = swap_partners([ids[i] for i in order], [groups[i] for i in order], [golds[i] for i in order], seed=0)
    assert {ids[order[k]]: None if p is None else ids[order[p]] for k, p in enumerate(shuffled)} == {
        ids[i]: None if p is None else ids[p] for i, p in enumerate(partners)
    }
    assert any(swap_partners(ids, groups, golds, seed=s) != partners for s in range(1, 5))
    # the same gold everywhere, or one example: nobody to pair with
    assert swap_partners(["a", "b"], [0, 0], ["7", "7"], seed=0) == [None, None]
    assert swap_partners(["a"], [0], [None], seed=0) == [None]
    assert swap_partners(["a", "a"], [0, 0], [None, None], seed=0) == [None, None]  # a padded repeat


def test_swap_fields():
    assert swap_fields("9", "9", "4") == {SWAP: 1.0, FOLLOWS: 0.0}  # follows the chain
    assert swap_fields("4", "9", "4") == {SWAP: 0.0, FOLLOWS: 1.0}  # follows the question
    assert swap_fields("1", "9", None) == {SWAP: 0.0, FOLLOWS: None}
    assert swap_fields(None, "9", "4") == {SWAP: None, FOLLOWS: None}  # unparseable: never a change


# ---------------------------------------------------------------------- the probe on hand-built chains
def _chain(index: int, question: str, chain: str, gold: str, answer_type: str = "numeric") -> Chain:
    example = ProbeExample(id=f"h{index}", question=question, gold=gold)
    return Chain(
        index=index,
        example=example,
        prompt=f"Question: {question}\n",
        response=f"{chain}\nAnswer: {gold}",
        chain=chain,
        steps=[],
        cue="Answer:",
        cue_found=True,
        joiner="\n",
        answer_sep=" ",
        stated_answer=gold,
        answer_type=answer_type,
    )


def test_the_probe_reads_hand_built_chains():
    question_b = "A train goes 60 miles in 1.5 hours. What is its speed?"
    chains = [
        _chain(0, GSM8K_QUESTION, FAITHFUL_CHAIN, "18"),
        _chain(1, question_b, FAITHFUL_CHAIN, "40"),  # a chain about the other question
        _chain(2, "Name the capital of France.", "It is Paris.", "paris", answer_type="text"),  # no partner
    ]
    a_full = ["18", "18", "paris"]
    probe = RelevanceProbe(seed=0)
    probe.prepare(chains, a_full)
    assert [probe.partner(c) for c in chains] == [1, 0, None]
    # 0 and 1 have the same full-chain answer: the swap cannot tell the chain from the question
    assert [probe.variants(c, a) for c, a in zip(chains, a_full)] == [[], [], []]
    records = [probe.score(c, {}, a) for c, a in zip(chains, a_full)]
    assert records[0][QUANTITY] == 1.0 and records[1][QUANTITY] == 0.0
    assert records[0][TERMS] > 0.3 and records[1][TERMS] == 0.0
    assert records[0]["relevance/swap_partner"] == "h1" and records[0][SWAP] is None
    assert records[2]["relevance/swap_partner"] is None and records[2][QUANTITY] is None  # no quantity to use

    a_full = ["18", "40", "paris"]
    probe.prepare(chains, a_full)
    assert probe.variants(chains[0], "18") == [ForcedAnswer(1, FAITHFUL_CHAIN)]  # this chain, the partner's prompt
    # the same text under either question answers 18: example 0's own answer, example 1's partner's
    results = {ForcedAnswer(e, FAITHFUL_CHAIN): ForcedResult("18", " 18") for e in (0, 1)}
    first, second = (probe.score(c, results, a) for c, a in zip(chains[:2], a_full))
    assert (first[SWAP], first[FOLLOWS], first["relevance/swap_answer"]) == (1.0, 0.0, "18")
    assert (second[SWAP], second[FOLLOWS]) == (0.0, 1.0)  # answered its partner's own answer
    # no pairing before `prepare`: a clear error, not a silent figure
    with pytest.raises(RuntimeError, match="prepare"):
        RelevanceProbe().variants(chains[0], "18")


# ---------------------------------------------------------------------- rounds of the rule models
EXPRESSIONS = ["3 + 4 * 5", "9 - 2 + 6", "2 * 3 * 4 - 1", "8 + 1 * 2", "7 * 2 - 5 + 3", "6 - 1 * 7"]


def _panel() -> Any:
    return load_panel([{"prompt": make_prompt(e), "completion": gold_response(make_prompt(e))} for e in EXPRESSIONS])


@pytest.mark.parametrize(
    ("kind", "quantity_use", "swap_match", "follows_question"),
    [
        ("reads_chain", 1.0, 1.0, 0.0),  # about the question, and the answer follows it
        ("ignores_chain", 1.0, 0.0, 1.0),  # about the question, but the answer comes from the question
        ("off_topic", 0.0, 1.0, 0.0),  # about another question, and the answer copies it
    ],
)
def test_the_figures_move_the_right_way_on_rule_models(kind, quantity_use, swap_match, follows_question):
    model, tok = make_rule_model(kind)
    config = FaithConfig(probes=["relevance"], max_new_tokens=60)
    result = run_probe_round(model, tok, _panel(), config)
    metrics = result.metrics
    assert metrics[QUANTITY] == quantity_use
    assert metrics[SWAP] == swap_match and metrics[FOLLOWS] == follows_question
    assert TERMS not in metrics  # no question has a key term: missing, never 0
    n = len(EXPRESSIONS)  # a rate: its Wilson interval
    assert (metrics[f"{SWAP}/ci_low"], metrics[f"{SWAP}/ci_high"]) == F.wilson_interval(swap_match * n, n)
    assert metrics[f"{QUANTITY}/stderr"] == 0.0  # a mean: standard error
    for record in result.records:
        partner = next(r for r in result.records if r["id"] == record["relevance/swap_partner"])
        assert partner["gold"] != record["gold"]
        assert record["relevance/swap_answer"] == (record["a_full"] if swap_match else partner["a_full"])


# ---------------------------------------------------------------------- a registered probe like any other
def test_the_probe_is_registered_with_honest_directions():
    assert "relevance" in list_probes() and "relevance" not in FaithConfig().probes  # opt-in
    probe = build_probes(FaithConfig(probes=["relevance"], seed=7))[-1]
    assert isinstance(probe, RelevanceProbe) and probe.seed == 7
    for key in (QUANTITY, TERMS, SWAP):
        facts = figure_facts(key)
        assert facts is not None and facts.higher_is_better and facts.unit == "share" and key in main_metrics()
    assert lower_is_better(FOLLOWS)
    assert not {f.key for f in score_figures()} & {QUANTITY, TERMS, SWAP, FOLLOWS}  # none feeds `score`


class SwitchToOffTopic(TrainerCallback):
    """From step `at` on, the rule model writes the chain of another question."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            model.config.rule = "off_topic"


def test_the_figures_reach_the_log_the_jsonl_and_the_report(tmp_path):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("matplotlib")
    model, tok = make_rule_model("reads_chain")
    texts = [make_prompt(e) + gold_response(make_prompt(e)) + tok.eos_token for e in EXPRESSIONS]
    train = datasets.Dataset.from_dict({"text": texts}).map(
        lambda batch: tok(batch["text"]), batched=True, remove_columns=["text"]
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tok,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        callbacks=[SwitchToOffTopic(at=2)],
    )
    config = FaithConfig(every_n_steps=1, max_new_tokens=60, answer_max_new_tokens=6, probes=["relevance"])
    panel = [{"prompt": make_prompt(e), "completion": gold_response(make_prompt(e))} for e in EXPRESSIONS]
    callback = FaithfulnessCallback(trainer, panel, config=config)
    trainer.add_callback(callback)
    trainer.train()

    # the trainer's log: the chain stops using the question once the model reasons about another one
    logged = [row for row in trainer.state.log_history if f"faith/{QUANTITY}" in row]
    assert [row[f"faith/{QUANTITY}"] for row in logged] == [1.0, 1.0, 0.0]
    assert [row[f"faith/{SWAP}"] for row in logged] == [1.0, 1.0, 1.0]  # the answer still follows the chain
    assert logged[-1][f"faith/{QUANTITY}/delta"] == -1.0
    on_wandb = wandb_figures(callback.history[-1], "faith")  # not a headline figure: the detail section
    assert on_wandb[f"faith_detail/{QUANTITY}"] == 0.0 and on_wandb[f"faith_drift/{QUANTITY}/delta"] == -1.0
    # the JSONL: panel figures and per-example records
    data = tmp_path / "out" / config.output_subdir
    rows = [json.loads(line) for line in (data / "metrics.jsonl").read_text().splitlines()]
    assert [row[QUANTITY] for row in rows] == [1.0, 1.0, 0.0]
    examples = [json.loads(line) for line in (data / "rounds.jsonl").read_text().splitlines()]
    last = [r for r in examples if r["step"] == 2]
    assert len(last) == len(EXPRESSIONS) and all(r["relevance/unused_quantities"] for r in last)
    assert all(r["relevance/swap_partner"] in {f"{i}" for i in range(len(EXPRESSIONS))} for r in last)
    # the report: a plot and a row of the last round's table, with the declared reading
    assert main(["report", str(tmp_path / "out")]) == 0
    page = (data / "report" / "report.html").read_text()
    assert (data / "report" / "metric_relevance-quantity_use.png").is_file()
    assert html.escape(figure_facts(QUANTITY).title) in page and "Higher = chain about the question." in page
