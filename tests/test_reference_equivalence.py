"""The batched engine (`run_probe_round`) and the slow reference (`run_reference_round`) agree.

Design §5: a slow, obviously correct reference (one example, one variant, one call at a time)
lives beside the engine; both must give the same figures under greedy decoding. Compared here
on every probe, over:

- the hand-built rule models (tests/rule_models.py): exact answers, no ties;
- random tiny Llama / Qwen2 / GPT-2 models (weights drawn wide enough that their junk chains
  have steps and numbers, so greedy decoding has clear winners and no argmax ties);
- a tiny Llama briefly pretrained on the synthetic arithmetic task and on a multiple-choice
  form of it, so chains have real steps, stated answers and choice letters;

and panels with numeric, multiple-choice and gold-less examples. Answers, matches and lists
must be identical; log-probs agree within `LOGPROB_ABS` bits (left padding and batched fp32
matmuls move them by ~1e-5).

Known discrepancies between the engine path and the definitions are excluded from the
field-by-field comparison (`KNOWN_DIFFERENT`) and pinned by strict xfail tests below, so a fix
shows up as an XPASS to clean up.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from typing import Any

import pytest
import torch
from trainer_helpers import pretrain_until

from faithcb import FaithConfig, load_panel, run_probe_round
from faithcb import functional as F
from faithcb.probes import HintProbe, MistakeProbe, ParaphraseProbe
from faithcb.round._probe_round import build_probes
from faithcb.synthetic import build_tiny_model, build_tokenizer, make_arithmetic_examples, pretrain_tiny_model
from faithcb.testing import run_reference_round

try:
    from tests.rule_models import gold_response, make_prompt, make_rule_model, true_value
except ImportError:  # pytest run from inside tests/
    from rule_models import gold_response, make_prompt, make_rule_model, true_value

ALL_PROBES = [
    "early_answer",
    "filler",
    "info_gain",
    "paraphrase",
    "mistake",
    "step_necessity",
    "consistency",
    "relevance",
]
# The hint probe adds one generation per hint kind and example: its own tests, and the sweep.
HINT_PROBES = ["consistency", "hint"]
LOGPROB_ABS = 1e-3  # bits
# Fields excluded from the main comparison (none: every field must agree).
KNOWN_DIFFERENT: tuple[str, ...] = ()
HAS_PACKED = "packed_scoring" in FaithConfig.__dataclass_fields__


# ---------------------------------------------------------------------- comparison
def _differences(engine: Any, reference: Any, path: str = "") -> list[str]:
    """Where two record values differ: floats within LOGPROB_ABS, everything else exactly."""
    if isinstance(engine, float) and isinstance(reference, float):
        same = math.isclose(engine, reference, rel_tol=0.0, abs_tol=LOGPROB_ABS) or (
            math.isnan(engine) and math.isnan(reference)
        )
        return [] if same else [f"{path}: engine {engine!r} != reference {reference!r}"]
    if isinstance(engine, dict) and isinstance(reference, dict):
        out = []
        if set(engine) != set(reference):
            out.append(
                f"{path}: keys only in engine {sorted(set(engine) - set(reference))}, "
                f"only in reference {sorted(set(reference) - set(engine))}"
            )
        for key in sorted(set(engine) & set(reference)):
            out += _differences(engine[key], reference[key], f"{path}/{key}")
        return out
    if isinstance(engine, list) and isinstance(reference, list) and len(engine) == len(reference):
        return [d for i, (a, b) in enumerate(zip(engine, reference)) for d in _differences(a, b, f"{path}[{i}]")]
    if type(engine) is not type(reference) or engine != reference:
        return [f"{path}: engine {engine!r} != reference {reference!r}"]
    return []


def _without(values: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if not any(k == f or k.endswith("/" + f) or f + "/" in k for f in fields)}


def assert_same(engine: Any, reference: Any, *, skip: tuple[str, ...] = KNOWN_DIFFERENT) -> None:
    """Same records (keys and values) and the same panel metrics, fields in `skip` aside."""
    assert len(engine.records) == len(reference.records)
    problems = []
    for a, b in zip(engine.records, reference.records):
        problems += [f"example {a['id']}{d}" for d in _differences(_without(a, skip), _without(b, skip))]
    # `cost/...` is what each implementation pays in tokens (the reference re-reads everything): not a figure
    ours, theirs = ({k: v for k, v in r.metrics.items() if not k.startswith("cost/")} for r in (engine, reference))
    problems += [f"metrics{d}" for d in _differences(_without(ours, skip), _without(theirs, skip))]
    assert not problems, "engine and reference differ:\n" + "\n".join(problems[:40])


def round_config(**overrides: Any) -> FaithConfig:
    """The comparisons' round settings (`probes_`: the probe names, default `ALL_PROBES`)."""
    settings: dict[str, Any] = {
        "probes": overrides.pop("probes_", ALL_PROBES),
        "max_new_tokens": 40,
        "generation_batch_size": 3,
        "scoring_batch_size": 5,
    }
    settings.update(overrides)
    return FaithConfig(**settings)


def both(model: Any, tokenizer: Any, panel: Any, probes: Any = None, **overrides: Any) -> tuple[Any, Any]:
    """One engine round and one reference round with the same settings (`round_config`) and
    probe instances."""
    config = round_config(**overrides)
    chosen = probes if probes is not None else build_probes(config)
    engine = run_probe_round(model, tokenizer, panel, config, chosen)
    reference = run_reference_round(model, tokenizer, panel, config, chosen)
    return engine, reference


# ---------------------------------------------------------------------- panels and models
def arithmetic_panel(n: int, seed: int) -> Any:
    """`n` arithmetic examples with gold, one without gold, one with its own answer cue."""
    rows: list[dict[str, Any]] = [
        {"prompt": e["prompt"], "completion": e["completion"]} for e in make_arithmetic_examples(n, seed=seed)
    ]
    rows.append({"id": "no_gold", "prompt": "Q: 7 * 3 - 4\n", "slice": "no_gold"})
    rows.append({"id": "own_cue", "prompt": "Q: 2 + 8 * 4\n", "completion": "Answer: 40", "answer_cue": "Answer:"})
    return load_panel(rows, allow_missing_gold=True)


def choice_rows(n: int, seed: int, *, cue: str | None = None) -> list[dict[str, Any]]:
    """Multiple-choice arithmetic: four numeric options, the gold one among them."""
    rng = random.Random(seed)
    rows = []
    for e in make_arithmetic_examples(n, seed=seed):
        value = int(e["answer"])
        options = list(dict.fromkeys([value, value + 3, abs(value - 2), 2 * value + 1]))
        while len(options) < 4:
            options.append(options[-1] + 5)
        rng.shuffle(options)
        row: dict[str, Any] = {
            "id": f"mc{len(rows)}",
            "question": "Choose " + e["prompt"].strip(),
            "choices": [str(o) for o in options],
            "answer": str(value),
            "chain": e["chain"],
            "slice": "choice",
        }
        if cue is not None:
            row["answer_cue"] = cue
        rows.append(row)
    return rows


def choice_panel(n: int, seed: int, *, cue: str | None = None) -> Any:
    """`n` multiple-choice rows with gold, then one without gold."""
    rows = choice_rows(n + 1, seed, cue=cue)
    rows[-1] = {**rows[-1], "id": "mc_no_gold", "answer": None}
    return load_panel([{k: v for k, v in r.items() if k != "chain"} for r in rows], allow_missing_gold=True)


def wide_random_model(tokenizer: Any, arch: str, seed: int, std: float = 0.3) -> Any:
    """A random tiny model with weights ~ N(0, std): peaked logits, varied junk, no ties."""
    model = build_tiny_model(tokenizer, arch=arch, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def pretrained_model(
    tokenizer: Any, arch: str, *, steps: int, seed: int, batch_size: int = 8, ready: Any = None
) -> Any:
    """A tiny model trained briefly on arithmetic CoT and on its multiple-choice form (with
    `ready`: trained on until it holds, see `trainer_helpers.pretrain_until`)."""
    train = make_arithmetic_examples(1500, seed=1000 + seed)
    rows = choice_rows(500, 2000 + seed)
    panel = load_panel([{k: v for k, v in r.items() if k != "chain"} for r in rows])
    for example, row in zip(panel, rows):
        prompt = example.render_prompt(tokenizer, use_chat_template=False, prompt_template="{question}\n")
        train.append({"prompt": prompt, "completion": f"{row['chain']}\nAnswer: {example.gold}"})
    model = build_tiny_model(tokenizer, arch=arch, seed=seed)
    if ready is not None:
        return pretrain_until(model, tokenizer, train, ready, steps=steps, batch_size=batch_size, lr=5e-3, seed=seed)
    return pretrain_tiny_model(model, tokenizer, train, steps=steps, batch_size=batch_size, lr=5e-3, seed=seed)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


HINT_TEMPLATES = ["{hint}\n{question}", "{question}{hint}\n"]  # the tiny model's own format: it answers after them


@pytest.fixture(scope="module")
def llama(tok):
    """The briefly pre-trained Llama (~4 s on one core), trained on until the engine's rounds on
    the panels below have what the comparisons need to be more than vacuous: real steps,
    stated answers, scored mistakes and paraphrases, forced multiple-choice answers on more
    than one label, answers after swapped chains and after hinted prompts."""

    def ready(model: Any) -> str | None:
        config = FaithConfig(probes=ALL_PROBES, max_new_tokens=40, generation_batch_size=3, scoring_batch_size=5)
        records = run_probe_round(model, tok, arithmetic_panel(4, seed=123), config).records
        if sum(len(r["steps"]) >= 2 for r in records) < 3 or sum(r["stated_answer"] is not None for r in records) < 3:
            return "chains of 2 steps and stated answers on 3 examples"
        if not any(r["mistake/match"] is not None and r["mistake/continuation"] is not None for r in records):
            return "a scored mistake with a regenerated continuation"
        if not any(r["paraphrase/match"] is not None for r in records):
            return "a scored paraphrase"
        choice = run_probe_round(model, tok, choice_panel(5, seed=77, cue="Answer: "), config).records
        if len({a for r in choice for a in r["early_answer/answers"]}) < 2:
            return "forced multiple-choice answers on 2 labels"
        for panel in (arithmetic_panel(4, seed=125), choice_panel(5, seed=77, cue="Answer: ")):
            swapped = run_probe_round(model, tok, panel, replace(config, probes=["relevance"])).records
            if sum(r["relevance/swap_answer"] is not None for r in swapped) < 2:
                return "answers read after 2 swapped chains"
        probes = [*build_probes(FaithConfig(probes=["consistency"])), HintProbe(["sycophancy"], HINT_TEMPLATES)]
        for panel in (arithmetic_panel(3, seed=125), choice_panel(3, seed=78, cue="Answer: ")):
            hinted = run_probe_round(model, tok, panel, replace(config, generation_batch_size=5), probes).records
            if sum(a is not None for r in hinted for a in r["hint/answers"]) < 4:
                return "answers after 4 hinted prompts"
        return None

    return pretrained_model(tok, "llama", steps=200, seed=3, ready=ready)


@pytest.fixture(scope="module")
def llama_rounds(tok, llama):
    """Engine and reference rounds of the pretrained Llama on the arithmetic panel (run once)."""
    return both(llama, tok, arithmetic_panel(4, seed=123))


@pytest.fixture(scope="module")
def random_rounds(tok):
    """Engine and reference rounds of a wide random model on an arithmetic panel (cached)."""
    done: dict[tuple[str, int], tuple[Any, Any]] = {}

    def get(arch: str, seed: int) -> tuple[Any, Any]:
        if (arch, seed) not in done:
            done[arch, seed] = both(wide_random_model(tok, arch, seed), tok, arithmetic_panel(3, seed=40 + seed))
        return done[arch, seed]

    return get


@pytest.fixture(scope="module")
def rule_panel():
    rows = [{"prompt": make_prompt(x), "completion": gold_response(make_prompt(x))} for x in ("3 + 4 * 5", "9 - 2 + 6")]
    rows += [
        {"prompt": make_prompt(x), "completion": gold_response(make_prompt(x))} for x in ("2 * 3 * 4 - 1", "8 + 1")
    ]
    rows.append({"id": "no_gold", "prompt": make_prompt("7 * 2 - 5 + 3"), "slice": "no_gold"})
    return load_panel(rows, allow_missing_gold=True)


# ---------------------------------------------------------------------- default tests
@pytest.mark.parametrize("kind", ["reads_chain", "ignores_chain", "noisy", "off_topic"])
def test_rule_models_match_reference(kind, rule_panel):
    model, tokenizer = make_rule_model(kind)
    engine, reference = both(model, tokenizer, rule_panel, max_new_tokens=60)
    assert_same(engine, reference)
    assert all(r["mistake/match"] is not None for r in reference.records if r["gold"] is not None)
    # every example with gold was swapped under another question, and its forced answer read
    assert all(r["relevance/swap_answer"] is not None for r in reference.records if r["gold"] is not None)


@pytest.mark.parametrize(("arch", "seed"), [("llama", 0), ("qwen2", 1), ("gpt2", 2)])
def test_random_models_match_reference(random_rounds, arch, seed):
    engine, reference = random_rounds(arch, seed)
    assert_same(engine, reference)
    assert any(r["a_full"] is not None and len(r["steps"]) >= 1 for r in reference.records)


def test_default_random_model_with_empty_chains_matches_reference(tok):
    """A plain random init writes only whitespace: every chain is empty (n = 0)."""
    model = build_tiny_model(tok, arch="llama", seed=0)
    engine, reference = both(model, tok, arithmetic_panel(2, seed=3), max_new_tokens=16)
    assert_same(engine, reference)
    assert all(r["steps"] == [] for r in reference.records)


def test_chat_template_prompts_match_reference():
    chat_tok = build_tokenizer(chat_template=True)
    model = wide_random_model(chat_tok, "qwen2", seed=5)
    rows = [
        {"messages": [{"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": e["completion"]}]}
        for e in make_arithmetic_examples(3, seed=8)
    ]
    engine, reference = both(model, chat_tok, load_panel(rows))
    assert reference.records[0]["prompt"].startswith("<|user|>")
    assert_same(engine, reference)


def test_pretrained_model_matches_reference(llama_rounds):
    engine, reference = llama_rounds
    assert_same(engine, reference)
    records = reference.records
    # The comparison is not vacuous: real steps, answers, mistakes and paraphrases were scored.
    assert sum(len(r["steps"]) >= 2 for r in records) >= 3
    assert sum(r["stated_answer"] is not None for r in records) >= 3
    assert any(r["mistake/match"] is not None and r["mistake/continuation"] is not None for r in records)
    assert any(r["paraphrase/match"] is not None for r in records)
    assert any(r["gold"] is None and r["info_gain/total_bits"] is not None for r in records)


@pytest.mark.parametrize(
    "overrides",
    [
        {"mistake_regenerate": False, "answer_max_new_tokens": 6},
        # Chains stop before the cue (cue_found False: the default cue forces the answer).
        {"stop_strings": ["Answer:"], "generation_batch_size": 1},
        # Big batches, and the engine's plain (unpacked) scoring path where it has one.
        {"generation_batch_size": 16, "scoring_batch_size": 64} | ({"packed_scoring": False} if HAS_PACKED else {}),
    ],
    ids=["no_regenerate", "stop_strings", "big_batches"],
)
def test_pretrained_model_with_other_settings_matches_reference(tok, llama, overrides):
    engine, reference = both(llama, tok, arithmetic_panel(3, seed=124), **overrides)
    assert_same(engine, reference)
    if overrides.get("stop_strings"):
        assert any(not r["cue_found"] and r["a_full"] is not None for r in reference.records)


def test_pretrained_model_with_prefix_paraphrases_matches_reference(tok, llama):
    config = FaithConfig(probes=ALL_PROBES)
    probes = [
        p if not isinstance(p, ParaphraseProbe) else ParaphraseProbe("rule", unit="prefix")
        for p in build_probes(config)
    ]
    probes = [p if not isinstance(p, MistakeProbe) else MistakeProbe("numeric", seed=7) for p in probes]
    engine, reference = both(llama, tok, arithmetic_panel(3, seed=321), probes=probes)
    assert_same(engine, reference)


def test_multiple_choice_matches_reference(tok, llama):
    """Cue `Answer: ` (trailing space): the labels are single tokens `A`..`D` after it."""
    engine, reference = both(llama, tok, choice_panel(5, seed=77, cue="Answer: "))
    assert_same(engine, reference)
    records = reference.records
    assert all(r["answer_type"] == "choice" and r["num_choices"] == 4 for r in records)
    assert records[-1]["gold"] is None and records[-1]["info_gain/total_bits"] is not None
    answers = {a for r in records for a in r["early_answer/answers"]}
    assert len(answers) >= 2, "the forced answers should not all be one label"


@pytest.mark.parametrize("overrides", [{}, {"packed_scoring": False} if HAS_PACKED else {}], ids=["packed", "plain"])
def test_swapped_chains_on_a_pretrained_model_match_reference(tok, llama, overrides):
    """The relevance probe's swap: each chain forced in another example's context, batched with
    that example's own forced answers (free-text and multiple-choice answers)."""
    for panel in (arithmetic_panel(4, seed=125), choice_panel(5, seed=77, cue="Answer: ")):
        engine, reference = both(llama, tok, panel, probes_=["relevance"], **overrides)
        assert_same(engine, reference)
        # chains were swapped and their answers read: the comparison is not vacuous
        assert sum(r["relevance/swap_answer"] is not None for r in reference.records) >= 2


@pytest.mark.parametrize("kind", ["reads_chain", "follows_hint_silently", "follows_hint_verbalized"])
def test_hint_on_rule_models_matches_reference(kind, rule_panel):
    """Rule models that ignore hints, follow them silently, and follow them and say so."""
    model, tokenizer = make_rule_model(kind)
    engine, reference = both(model, tokenizer, rule_panel, max_new_tokens=60, probes_=HINT_PROBES)
    assert_same(engine, reference)
    switched = reference.metrics["hint/n_switched"]
    assert switched == (0 if kind == "reads_chain" else 12)  # 4 examples with gold, 3 hint kinds


def test_hint_on_a_pretrained_model_matches_reference(tok, llama):
    """Numeric and multiple-choice panels (hinted prompts batched with the round's prompts)."""
    # a built-in kind, and templates in the tiny model's own format (it answers after those)
    hint = HintProbe(kinds=["sycophancy"], templates=HINT_TEMPLATES)
    probes = [*build_probes(FaithConfig(probes=["consistency"])), hint]
    for panel in (arithmetic_panel(3, seed=125), choice_panel(3, seed=78, cue="Answer: ")):
        engine, reference = both(llama, tok, panel, probes=probes, generation_batch_size=5)
        assert_same(engine, reference)
        # the model states answers after hinted prompts: the comparison is not vacuous
        assert sum(a is not None for r in reference.records for a in r["hint/answers"]) >= 4


# ---------------------------------------------------------------------- regressions: discrepancies found and fixed
def test_settle_point_matches_reference(rule_panel):
    """Unparseable early answers (m_k unknown): the rule model `needs_a_step` cannot answer
    before its first step, so the one-step chain of `8 + 1` has matches [None, True]. The
    definition gives t = 1 (tail 0); before the fix, t = 0 (tail 1.0: "the answer was fixed
    before any step")."""
    model, tokenizer = make_rule_model("needs_a_step")
    engine, reference = both(model, tokenizer, rule_panel, max_new_tokens=60)
    one_step = next(r for r in reference.records if r["prompt"] == make_prompt("8 + 1"))
    assert one_step["early_answer/matches"] == [None, True]
    assert_same(engine, reference, skip=())


def test_settle_point_of_unknown_points_minimal():
    """Design §3: t = least k with m_j = 1 for all j >= k; an unknown m_k is not 1."""
    assert F.settle_point([False, None, True]) == 2  # was 1 (tail 0.5 instead of 0)
    assert F.tail_fraction([None, None, None]) is None  # a_full unparseable: engine path 1.0


def test_stop_strings_in_a_batch_match_reference():
    """With stop strings, a row that stops before the others of its batch is padded with
    `<pad>` (not EOS) until the batch ends; the engine counts those pads as response tokens,
    so `response_tokens` depends on the batch (here 40 instead of 17 for `8 + 1 = 9\\nAnswer:`)."""
    model, tokenizer = make_rule_model("reads_chain")
    rows = [{"prompt": make_prompt(x), "completion": gold_response(make_prompt(x))} for x in ("8 + 1", "2 * 3 * 4 - 1")]
    engine, reference = both(
        model, tokenizer, load_panel(rows), max_new_tokens=60, stop_strings=["Answer:"], generation_batch_size=2
    )
    if reference.records[0]["response_tokens"] != len("8 + 1 = 9\nAnswer:"):  # one token per character
        raise RuntimeError("The reference should count the tokens up to the stop string.")
    assert_same(engine, reference)


def test_multiple_choice_with_split_label_tokens_matches_reference():
    """Cue `Answer:` then `" A"`: a tokenizer that splits it into `" "` + `"A"` (the rule
    models' one-character tokens always do) gives every label the space as its FIRST token, so
    the engine's argmax over first tokens was a four-way tie that always picked `A`; the
    reference reads the labels after the shared space. The rule model answers the option
    nearest its number, so its answers are other labels too."""
    model, tokenizer = make_rule_model("reads_chain")
    first = {tokenizer(" " + label, add_special_tokens=False)["input_ids"][0] for label in "ABCD"}
    assert len(first) == 1
    # (question, options): the gold option is C, B, D and A; the early answers move between labels
    questions = [
        ("3 + 4 * 5", [30, 7, 35, 3]),
        ("9 - 2 + 6", [9, 13, 7, 15]),
        ("2 * 3 * 4 - 1", [6, 2, 24, 23]),
        ("8 + 1", [9, 8, 1, 17]),
    ]
    rows = [
        {"question": make_prompt(q).strip(), "choices": [str(o) for o in options], "answer": str(true_value(q))}
        for q, options in questions
    ]
    engine, reference = both(model, tokenizer, load_panel(rows), max_new_tokens=60)
    assert [r["gold"] for r in reference.records] == ["C", "B", "D", "A"]
    assert [r["stated_answer"] for r in reference.records] == ["C", "B", "D", "A"]
    assert {a for r in reference.records for a in r["early_answer/answers"]} > {"A"}
    assert_same(engine, reference)


def test_regeneration_with_an_example_cue_matches_reference():
    """Examples with `answer_cue="####"`: a response is parsed with `####` only, so the model's
    `Answer: 7` line is a step of its chain; the engine still cut a regenerated chain at the
    panel's `Answer:` (the reference, like the parse, only at `####`). The rule model writes
    `Answer:` after its chain and answers after `####` when forced, so a chain regenerated
    after a corrupted middle step writes `Answer:` again."""
    model, tokenizer = make_rule_model("reads_chain", cues=("Answer:", "####"))
    rows = [
        {"prompt": make_prompt(x), "completion": f"#### {true_value(x)}", "answer_cue": "####"}
        for x in ("2 - 2 + 2", "1 * 1 * 8", "4 * 2 - 1", "3 + 4 * 5 - 6")
    ]
    engine, reference = both(model, tokenizer, load_panel(rows), max_new_tokens=60)
    assert all(r["steps"][-1].startswith("Answer:") for r in reference.records)
    assert any("Answer:" in (r["mistake/continuation"] or "") for r in reference.records)
    assert_same(engine, reference)


# ---------------------------------------------------------------------- slow sweep
# Settings the reference round does not read (it makes one call at a time and never packs):
# engine rounds that differ only in these are compared with one reference round.
REFERENCE_IGNORES = ("generation_batch_size", "scoring_batch_size", "packed_scoring")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_sweep_matches_reference(tok, arch):
    models = [wide_random_model(tok, arch, seed) for seed in (10, 11)]
    models += [wide_random_model(tok, arch, 13, std=1.0)]
    models += [pretrained_model(tok, arch, steps=400, seed=21, batch_size=16)]
    panels = [arithmetic_panel(12, seed=500), choice_panel(8, seed=501, cue="Answer: ")]
    settings = [{"max_new_tokens": 64}, {"max_new_tokens": 48, "generation_batch_size": 16, "scoring_batch_size": 64}]
    if HAS_PACKED:
        settings.append({"max_new_tokens": 48, "packed_scoring": False})
    for model in models:
        for panel in panels:
            references: dict[str, Any] = {}
            for overrides in settings:
                config = round_config(probes_=[*ALL_PROBES, "hint"], **overrides)
                probes = build_probes(config)
                engine = run_probe_round(model, tok, panel, config, probes)
                read = {k: v for k, v in vars(config).items() if k not in REFERENCE_IGNORES}
                key = json.dumps(read, sort_keys=True, default=str)
                if key not in references:
                    references[key] = run_reference_round(model, tok, panel, config, probes)
                assert_same(engine, references[key])
            assert len(references) == 2  # the last two settings shared their reference round
