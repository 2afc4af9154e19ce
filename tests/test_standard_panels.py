"""Rows in the standard datasets' own schemas, and standard panels by name.

Each adapter is checked on a hand-written fixture in that dataset's exact schema
(`tests/fixtures/standard_panels/<name>.jsonl`), read as JSONL and as a `datasets.Dataset`;
named loading is checked against a mocked `datasets.load_dataset` (nothing is downloaded).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

import faithcb
from faithcb import FaithConfig, PanelError, list_standard_panels, load_panel
from faithcb.data._panel import EXAMPLE_ANSWER_TYPES, ROW_SHAPES, panel_from
from faithcb.data._standard_panels import STANDARD_PANELS, find_standard_panel

FIXTURES = Path(__file__).parent / "fixtures" / "standard_panels"
REQUIRED_NAMES = {"gsm8k", "math500", "aqua_rat", "arc_challenge", "commonsense_qa", "strategyqa"}


def fixture_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def both_sources(name: str):
    """The fixture as a JSONL path and as a `datasets.Dataset` (when datasets is installed)."""
    sources = [FIXTURES / f"{name}.jsonl"]
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets comes with the test extra
        return sources
    return [*sources, datasets.Dataset.from_list(fixture_rows(name))]


# ------------------------------------------------------------------------------------ adapters
@pytest.mark.parametrize("source_kind", [0, 1], ids=["jsonl", "dataset"])
def test_gsm8k_rows_keep_their_gold_and_show_the_worked_answer_without_calculator_notes(source_kind):
    rows = fixture_rows("gsm8k")
    panel = load_panel(both_sources("gsm8k")[source_kind])
    assert [e.shape for e in panel] == ["question_answer"] * 2
    assert [e.gold for e in panel] == ["14", "168"]
    assert [e.id for e in panel] == ["0", "1"]  # GSM8K rows have no id field: their position
    for example, row in zip(panel, rows):
        assert "<<" in row["answer"] and "<<" not in example.solution and ">>" not in example.solution
        assert example.solution == re.sub(r"<<[^>]*>>", "", row["answer"])
        assert example.answer_type is None
    assert panel[0].solution.startswith("In the morning she sells 48/2 = 24 muffins.\n")
    shots = load_panel(FIXTURES / "gsm8k.jsonl", num_fewshot=1)
    prompt = shots[0].render_prompt(None, use_chat_template=False, prompt_template="Question: {question}\n")
    assert prompt == f"Question: {rows[0]['question']}\n{panel[0].solution}\n\nQuestion: {rows[1]['question']}\n"


@pytest.mark.parametrize("source_kind", [0, 1], ids=["jsonl", "dataset"])
def test_math500_rows_are_math_examples_with_latex_golds(source_kind):
    rows = fixture_rows("math500")
    panel = load_panel(both_sources("math500")[source_kind])
    assert [e.shape for e in panel] == ["math", "math"]
    assert [e.gold for e in panel] == ["\\frac{14}{3}", "2"]
    assert [e.id for e in panel] == [r["unique_id"] for r in rows]
    assert [e.question for e in panel] == [r["problem"] for r in rows]
    assert [e.solution for e in panel] == [r["solution"] for r in rows]
    assert [e.answer_type for e in panel] == ["math", "math"]
    assert panel.summary()["answer_types"] == {"math": 2}
    assert "answer types:  2 math (set by their rows)" in panel.describe()
    assert "2 MATH (problem + solution + answer)" in panel.describe()
    shot = load_panel(rows, num_fewshot=1)[0].render_prompt(
        None, use_chat_template=False, prompt_template="{question}\n"
    )
    assert shot.startswith(f"{rows[0]['problem']}\n{rows[0]['solution']}\n\n")


def test_a_math_row_without_answer_reads_the_boxed_answer_of_its_solution():
    row = {k: v for k, v in fixture_rows("math500")[0].items() if k != "answer"}
    example = load_panel([row])[0]
    assert (example.gold, example.gold_from) == ("\\frac{14}{3}", "'\\\\boxed{'")  # nested braces kept whole
    with pytest.raises(PanelError, match=r"list row 0: no gold answer: the row has no 'answer', no 'solution'"):
        load_panel([{"problem": "What is 1 + 1?", "unique_id": "x"}])
    assert load_panel([{"question": "q", "answer": "so $\\boxed{\\frac{1}{2}}$."}])[0].gold == "\\frac{1}{2}"


@pytest.mark.parametrize("source_kind", [0, 1], ids=["jsonl", "dataset"])
def test_aqua_rat_rows_are_multiple_choice_with_the_rationale_as_worked_answer(source_kind):
    rows = fixture_rows("aqua_rat")
    panel = load_panel(both_sources("aqua_rat")[source_kind])
    assert [e.shape for e in panel] == ["aqua_rat", "aqua_rat"]
    assert [e.gold for e in panel] == [r["correct"] for r in rows]
    assert panel[0].choices == ["60", "80", "90", "100", "120"]  # the labels are not repeated in the text
    assert panel[1].choices[2] == "$10.50"
    assert [e.solution for e in panel] == [r["rationale"] for r in rows]
    rendered = panel[0].render_prompt(None, use_chat_template=False, prompt_template="{question}\n")
    assert rendered == rows[0]["question"] + "\nA) 60\nB) 80\nC) 90\nD) 100\nE) 120\n"
    assert panel.summary()["answer_types"] == {"choice": 2}


@pytest.mark.parametrize("source_kind", [0, 1], ids=["jsonl", "dataset"])
def test_arc_rows_map_their_labels_to_letters_whatever_their_count(source_kind):
    rows = fixture_rows("arc_challenge")
    panel = load_panel(both_sources("arc_challenge")[source_kind])
    assert [e.shape for e in panel] == ["choices_answer_key"] * 4
    assert [e.id for e in panel] == [r["id"] for r in rows]
    # "1".."4" labels read by position; 3 and 5 choices are kept as they are
    assert [e.gold for e in panel] == ["B", "A", "B", "E"]
    assert [len(e.choices) for e in panel] == [4, 4, 3, 5]
    assert [e.choices for e in panel] == [r["choices"]["text"] for r in rows]
    assert [e.solution for e in panel] == [None] * 4  # ARC has no worked answer
    text = panel.describe()
    assert "row shapes:    4 ARC / CommonsenseQA (choices {text,label} + answerKey)" in text
    assert "multiple choice: 4 of 4" in text and "4 choice labels" in text


@pytest.mark.parametrize("source_kind", [0, 1], ids=["jsonl", "dataset"])
def test_commonsense_qa_rows_read_their_answer_key(source_kind):
    rows = fixture_rows("commonsense_qa")
    panel = load_panel(both_sources("commonsense_qa")[source_kind])
    assert [e.shape for e in panel] == ["choices_answer_key"] * 2
    assert [e.gold for e in panel] == [r["answerKey"] for r in rows]
    assert [e.id for e in panel] == [r["id"] for r in rows]
    assert panel[1].choices == rows[1]["choices"]["text"]


def test_commonsense_qa_test_rows_without_answer_key_have_no_gold():
    unlabelled = {**fixture_rows("commonsense_qa")[0], "answerKey": ""}  # the hub's test split
    with pytest.raises(PanelError, match=r"list row 0: no gold answer: 'answerKey' is empty"):
        load_panel([unlabelled])
    example = load_panel([unlabelled], allow_missing_gold=True)[0]
    assert (example.gold, len(example.choices)) == (None, 5)


@pytest.mark.parametrize("source_kind", [0, 1], ids=["jsonl", "dataset"])
def test_strategyqa_rows_are_boolean_with_yes_no_golds(source_kind):
    rows = fixture_rows("strategyqa")
    panel = load_panel(both_sources("strategyqa")[source_kind])
    assert [e.shape for e in panel] == ["boolean", "boolean"]
    assert [e.gold for e in panel] == ["yes", "no"]
    assert [e.id for e in panel] == [r["qid"] for r in rows]
    assert [e.answer_type for e in panel] == ["boolean", "boolean"]
    assert [e.gold_from for e in panel] == ["boolean answer"] * 2
    assert panel[0].solution == "Hamsters are small rodents. Owls hunt small rodents.\nAnswer: yes"
    text = panel.describe()
    assert "2 StrategyQA (question + boolean answer)" in text
    assert "gold answers:  2 of 2 (2 boolean answers read as yes / no)" in text
    assert "answer types:  2 boolean (set by their rows)" in text


def test_strategyqa_facts_as_one_text_and_rows_without_facts():
    row = fixture_rows("strategyqa")[1]
    assert load_panel([{**row, "facts": "Penguins cannot fly."}])[0].solution == "Penguins cannot fly.\nAnswer: no"
    bare = load_panel([{"question": "Is ice cold?", "answer": True}])[0]
    assert (bare.gold, bare.answer_type, bare.solution) == ("yes", "boolean", None)
    with pytest.raises(PanelError, match=r"row 0: 'facts' must be text or a list of texts, got int"):
        load_panel([{**row, "facts": 3}])


# ----------------------------------------------------------------------- per-example answer types
def test_a_rows_own_answer_type_is_kept_checked_and_reported():
    rows = [
        {"id": "a", "question": "Is the sky blue?", "answer": "Yes", "answer_type": "boolean"},
        {"id": "b", "question": "2 + 2?", "answer": "#### 4"},
        {"id": "c", "question": "Simplify 2/4.", "answer": "\\frac{1}{2}", "answer_type": "math"},
    ]
    panel = load_panel(rows)
    assert [(e.gold, e.answer_type) for e in panel] == [("yes", "boolean"), ("4", None), ("\\frac{1}{2}", "math")]
    summary = panel.summary()
    assert (summary["answer_types"], summary["own_answer_types"]) == ({"boolean": 1, "numeric": 1, "math": 1}, 2)
    assert "(2 set by their rows, the rest as answer_type='auto' reads them)" in panel.describe()
    with pytest.raises(PanelError, match=r"row 0: 'answer_type' must be one of numeric, choice, boolean, math, text"):
        load_panel([{**rows[0], "answer_type": "yes/no"}])
    with pytest.raises(PanelError, match=r"row 0: gold answer 'maybe' is not yes or no, but the row's answer_type"):
        load_panel([{**rows[0], "answer": "maybe"}])
    with pytest.raises(PanelError, match=r"row 0: the row's answer_type='choice' but the row has no 'choices'"):
        load_panel([{**rows[0], "answer_type": "choice"}])


def test_the_panels_answer_type_checks_rows_without_a_type_of_their_own():
    strategy = fixture_rows("strategyqa")
    assert [e.gold for e in load_panel(strategy, answer_type="numeric")] == ["yes", "no"]  # their own type wins
    assert len(load_panel(fixture_rows("math500"), answer_type="math")) == 2
    with pytest.raises(PanelError, match=r"row 0: gold answer 'maybe' is not yes or no, but answer_type='boolean'"):
        load_panel([{"question": "q", "answer": "maybe"}], answer_type="boolean")
    assert load_panel([{"question": "q", "answer": "No"}], answer_type="boolean")[0].gold == "No"
    with pytest.raises(PanelError, match=r"answer_type must be one of auto, numeric, choice, boolean, math, text"):
        load_panel(strategy, answer_type="bool")


# ------------------------------------------------------------------------------------ bad rows
def test_bad_rows_in_the_standard_schemas_are_named_by_file_and_line(tmp_path):
    arc = fixture_rows("arc_challenge")[0]
    aqua = fixture_rows("aqua_rat")[0]
    rows = [
        arc,  # line 1: fine
        {**arc, "id": "k", "answerKey": "E"},  # line 2: not a label
        {**arc, "id": "t", "choices": {"text": ["x", "y"], "label": ["A", "B", "C"]}},  # line 3
        {**aqua, "correct": "F"},  # line 4: not an option's label
        {**aqua, "options": ["21", "22", "23"]},  # line 5: options without labels
        {**arc, "id": "one", "choices": {"text": ["x"], "label": ["A"]}, "answerKey": "A"},  # line 6
        {"prompt": "p", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "A"},  # line 7
    ]
    with pytest.raises(PanelError) as info:
        load_panel(write_jsonl(tmp_path / "std.jsonl", rows))
    message = str(info.value)
    assert "std.jsonl has 6 bad rows:" in message
    expected = {
        2: r"answerKey 'E' is not one of the choice labels \(A, B, C, D\)",
        3: r"'choices' has 2 texts but 3 labels",
        4: r"'correct' must be one of the options' labels \(A, B, C, D, E\), got 'F'",
        5: r"every option must start with its label in order \(A\), B\), C\)\)",
        6: r"'choices' must hold 2 to 10 options, got 1",
        7: r"'choices' as \{'text': \[...\], 'label': \[...\]\} \(ARC / CommonsenseQA\) goes with 'question'",
    }
    for line_no, reason in expected.items():
        assert re.search(rf"std\.jsonl:{line_no}: {reason}", message), (line_no, message)
    assert "std.jsonl:1:" not in message


def test_bad_standard_rows_in_a_dataset_are_named_by_index():
    datasets = pytest.importorskip("datasets")
    rows = fixture_rows("arc_challenge")[:2]
    rows[1] = {**rows[1], "answerKey": "5"}
    with pytest.raises(
        PanelError, match=r"Dataset row 1: answerKey '5' is not one of the choice labels \(1, 2, 3, 4\)"
    ):
        load_panel(datasets.Dataset.from_list(rows))


# --------------------------------------------------------------------------------- named panels
def test_the_registry_names_every_required_panel_with_its_facts():
    panels = list_standard_panels()
    assert faithcb.list_standard_panels is list_standard_panels and "list_standard_panels" in faithcb.__all__
    assert {p.name for p in panels} >= REQUIRED_NAMES
    for panel in panels:
        assert panel.shape in ROW_SHAPES and panel.answer_type in EXAMPLE_ANSWER_TYPES, panel
        assert panel.rows > 0 and panel.split and panel.license and panel.fields, panel
        assert (FIXTURES / f"{panel.name}.jsonl").is_file(), f"no schema fixture for {panel.name}"
        loaded = load_panel(FIXTURES / f"{panel.name}.jsonl")
        assert {e.shape for e in loaded} == {panel.shape}
        assert {e.answer_type for e in loaded} <= {None, panel.answer_type}
        assert set(loaded.summary()["answer_types"]) == {panel.answer_type}
        assert all(e.gold is not None for e in loaded)


@pytest.fixture
def hub(monkeypatch):
    """`datasets.load_dataset` answering each registered panel with its fixture; the calls are recorded."""
    datasets = pytest.importorskip("datasets")
    calls: list[tuple] = []
    rows_by_name: dict[str, list[dict]] = {}

    def load_dataset(path, name=None, *, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        standard = next(p for p in STANDARD_PANELS.values() if (p.hub_path, p.config_name) == (path, name))
        return datasets.Dataset.from_list(rows_by_name.get(standard.name) or fixture_rows(standard.name))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, rows_by_name


@pytest.mark.parametrize("name", sorted(STANDARD_PANELS))
def test_a_standard_panel_loads_its_held_out_split_by_name(hub, name):
    calls, _ = hub
    standard = STANDARD_PANELS[name]
    panel = load_panel(name)
    assert calls == [(standard.hub_path, standard.config_name, standard.split, {})]
    assert panel.source.startswith(f"{name} ({standard.hub_path}")
    from_fixture = load_panel(FIXTURES / f"{name}.jsonl")
    assert [(e.id, e.gold, e.shape) for e in panel] == [(e.id, e.gold, e.shape) for e in from_fixture]


def test_named_panels_ignore_case_and_separators(hub):
    calls, _ = hub
    for given, path, config in [
        ("ARC-Challenge", "allenai/ai2_arc", "ARC-Challenge"),
        ("MATH-500", "HuggingFaceH4/MATH-500", None),
        ("CommonsenseQA", "tau/commonsense_qa", None),
        ("GSM8K", "openai/gsm8k", "main"),
    ]:
        calls.clear()
        load_panel(given)
        assert calls[0][:2] == (path, config)
    assert find_standard_panel("strategy_qa").name == "strategyqa"


def test_panel_from_a_name_applies_the_configs_size_and_seed(hub):
    calls, rows_by_name = hub
    rows = [
        {
            "question": f"What is {a} + {a + 1}?",
            "answer": f"{a} + {a + 1} = <<{a}+{a + 1}={2 * a + 1}>>{2 * a + 1}\n#### {2 * a + 1}",
        }
        for a in range(30)
    ]
    rows_by_name["gsm8k"] = rows
    panel = panel_from("gsm8k", FaithConfig(panel_size=6, seed=5))
    assert [e.id for e in panel] == [e.id for e in load_panel(rows, size=6, seed=5)]
    assert len(panel) == 6 and [e.id for e in panel] != [
        e.id for e in panel_from("gsm8k", FaithConfig(panel_size=6, seed=6))
    ]
    assert len(panel_from("gsm8k", FaithConfig(panel_size=None))) == 30
    assert {c[:3] for c in calls} == {("openai/gsm8k", "main", "test")}


def test_the_callback_takes_a_standard_panel_name(hub, tokenizer, arithmetic, tmp_path):
    from trainer_helpers import tiny_lm_trainer

    from faithcb import FaithfulnessCallback
    from faithcb.synthetic import build_tiny_model

    calls, rows_by_name = hub
    rows_by_name["gsm8k"] = [{"question": e["question"], "answer": e["answer"]} for e in arithmetic[:6]]
    trainer = tiny_lm_trainer(tokenizer, tmp_path, arithmetic[8:16], build_tiny_model(tokenizer), max_steps=1)
    callback = FaithfulnessCallback(trainer, panel="gsm8k", config=FaithConfig(panel_size=4, max_new_tokens=8))
    assert len(callback.panel) == 4 and callback.panel.source.startswith("gsm8k (openai/gsm8k main")
    assert calls[0][:3] == ("openai/gsm8k", "main", "test")


def test_an_existing_path_wins_over_a_name(hub, tmp_path, monkeypatch):
    calls, _ = hub
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "gsm8k", [{"question": "local?", "answer": "7"}])
    panel = load_panel("gsm8k")
    assert ([e.gold for e in panel], panel.source, calls) == (["7"], "gsm8k", [])


def test_unknown_names_list_the_standard_panels_with_a_suggestion(tmp_path):
    with pytest.raises(PanelError) as info:
        load_panel("gsm8kk")
    message = str(info.value)
    assert "Probe panel 'gsm8kk' is neither a file nor a standard panel name. Did you mean 'gsm8k'?" in message
    assert all(name in message for name in REQUIRED_NAMES)
    with pytest.raises(PanelError, match=r"Did you mean 'strategyqa'\?"):
        load_panel("strategy")
    with pytest.raises(PanelError, match=r"'zzzz' is neither a file nor a standard panel name\. Standard panels:"):
        load_panel("zzzz")  # nothing close: no suggestion
    with pytest.raises(PanelError, match="Probe panel file not found"):  # a path keeps the file's message
        load_panel(str(tmp_path / "heldout.jsonl"))


def test_a_standard_panel_that_cannot_be_loaded_says_why_and_what_to_do(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PanelError, match=r"Cannot load the standard panel 'math500'.*ConnectionError.*JSONL export"):
        load_panel("math500")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(PanelError, match=r"'strategyqa' is read .* `datasets` library: pip install datasets"):
        load_panel("strategyqa")
