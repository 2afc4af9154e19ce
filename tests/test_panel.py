import json
import logging
import re

import pytest

from faithcb import FaithConfig, PanelError, load_panel
from faithcb.data._panel import MAX_LISTED_ROWS, panel_from
from faithcb.data._parsing import infer_answer_type
from faithcb.synthetic import build_tokenizer, make_arithmetic_examples, make_letter_examples


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_question_answer_rows_with_gsm8k_answers(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"question": "2+2?", "answer": "2+2=4\n#### 4"},
            {"question": "1,000+1?", "answer": "#### 1,001", "slice": "s"},
        ],
    )
    panel = load_panel(path)
    assert [e.gold for e in panel] == ["4", "1,001"]
    assert panel[1].slice == "s"
    assert panel[0].render_prompt(None, use_chat_template=None, prompt_template="Q: {question}\n") == "Q: 2+2?\n"


def test_prompt_completion_and_messages_shapes():
    rows = [
        {"prompt": "Q: 1 + 2\n", "completion": "1 + 2 = 3\nAnswer: 3"},
        {
            "prompt": [{"role": "user", "content": "1+1?"}],
            "completion": [{"role": "assistant", "content": "2\nAnswer: 2"}],
        },
        {"messages": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "so\n#### 6"}]},
    ]
    panel = load_panel(rows)
    assert [e.gold for e in panel] == ["3", "2", "6"]
    assert panel[2].prompt == [{"role": "user", "content": "3+3?"}]
    tokenizer = build_tokenizer(chat_template=True)
    rendered = panel[2].render_prompt(tokenizer, use_chat_template=None, prompt_template="{question}")
    assert "3+3?" in rendered and rendered != "3+3?"
    plain = build_tokenizer()
    with pytest.raises(PanelError, match="no chat template"):
        panel[2].render_prompt(plain, use_chat_template=None, prompt_template="{question}")
    # plain-text prompts are used verbatim, as TRL does for prompt-completion strings
    assert panel[0].render_prompt(tokenizer, use_chat_template=None, prompt_template="x") == "Q: 1 + 2\n"


def test_question_rows_use_chat_template_when_available():
    panel = load_panel([{"question": "1+1?", "answer": "2"}])
    tokenizer = build_tokenizer(chat_template=True)
    with_template = panel[0].render_prompt(tokenizer, use_chat_template=None, prompt_template="{question}\n")
    assert with_template == tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True
    )
    assert panel[0].render_prompt(tokenizer, use_chat_template=False, prompt_template="{question}\n") == "1+1?\n"


def test_multiple_choice_gold_forms():
    rows = [
        {"question": "q1", "choices": ["x", "y", "z"], "answer": "B"},
        {"question": "q2", "choices": ["x", "y", "z"], "answer": 2},
        {"question": "q3", "choices": ["x", "y", "z"], "answer": "y"},
    ]
    panel = load_panel(rows)
    assert [e.gold for e in panel] == ["B", "C", "B"]
    rendered = panel[0].render_prompt(None, use_chat_template=False, prompt_template="{question}\n")
    assert "A) x\nB) y\nC) z" in rendered
    with pytest.raises(PanelError, match=r"row 0.*not a choice"):
        load_panel([{"question": "q", "choices": ["x", "y"], "answer": "w"}])
    with pytest.raises(PanelError, match="out of range"):
        load_panel([{"question": "q", "choices": ["x", "y"], "answer": 5}])


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl", [{"question": "a", "answer": "1"}, "", '{"question": "b", "answer": ', ""]
    )
    with pytest.raises(PanelError, match=r"bad\.jsonl:3: invalid JSON"):
        load_panel(path)


def test_unreadable_panel_file_is_a_panel_error(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"question": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"))  # not UTF-8
    with pytest.raises(PanelError, match=r"Cannot read .*latin1\.jsonl"):
        load_panel(path)
    with pytest.raises(PanelError, match="Probe panel path is a folder"):
        load_panel(tmp_path)


def test_missing_field_names_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "a", "answer": "1"}, {"text": "no fields"}])
    with pytest.raises(PanelError, match=r"p\.jsonl:2: missing field.*'text'"):
        load_panel(path)
    with pytest.raises(PanelError, match="row 0: 'question' must be a non-empty string"):
        load_panel([{"question": "  "}])
    with pytest.raises(PanelError, match="needs 'role' and 'content'"):
        load_panel([{"messages": [{"content": "hi"}]}])


def test_empty_duplicate_and_missing_sources(tmp_path):
    with pytest.raises(PanelError, match="empty"):
        load_panel([])
    with pytest.raises(PanelError, match="empty"):
        load_panel(write_jsonl(tmp_path / "e.jsonl", ["", ""]))
    with pytest.raises(PanelError, match="not found"):
        load_panel(tmp_path / "nope.jsonl")
    with pytest.raises(PanelError, match=r"Duplicate example ids.*'a'"):
        load_panel([{"id": "a", "question": "x", "answer": "1"}, {"id": "a", "question": "y", "answer": "2"}])
    with pytest.raises(PanelError, match="expected an object"):
        load_panel([["not", "a", "dict"]])


def test_seeded_subsample_is_fixed_and_ordered():
    rows = [{"id": str(i), "question": f"q{i}", "answer": str(i)} for i in range(100)]
    a = load_panel(rows, size=10, seed=3)
    b = load_panel(rows, size=10, seed=3)
    c = load_panel(rows, size=10, seed=4)
    assert [e.id for e in a] == [e.id for e in b]
    assert [e.id for e in a] != [e.id for e in c]
    assert [int(e.id) for e in a] == sorted(int(e.id) for e in a)
    assert len(load_panel(rows, size=500)) == 100


def test_datasets_dataset_source():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"question": "q", "answer": "#### 3"}, {"question": "r", "answer": "#### 4"}])
    assert [e.gold for e in load_panel(ds)] == ["3", "4"]


def test_panel_from_examples_and_panels():
    panel = load_panel(
        [{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}, {"question": "c"}], allow_missing_gold=True
    )
    assert [e.id for e in load_panel(list(panel)[:2])] == ["0", "1"]
    assert [e.gold for e in load_panel(panel, size=3)] == ["1", "2", None]


# ---------------------------------------------------------------------------------------- strict golds
BAD_ROWS = [
    {"question": "2+2?", "answer": "2+2=4\n#### 4"},  # line 1: fine
    {"question": "Natalia?", "answer": "48/2 = 24\n48 + 24 = 72"},  # line 2: worked text, no cue
    {"question": "no answer"},  # line 3: no gold at all
    '{"question": "broken", ',  # line 4: not JSON
    {"question": "empty", "answer": "   "},  # line 5: empty answer
    {"question": "mc", "choices": ["x", "y"], "answer": "z"},  # line 6: not a label, index or choice
    {"prompt": "Q: 1\n", "completion": "1 = 1\nAnswer:"},  # line 7: nothing after the cue
    {"messages": [{"role": "user", "content": "hi"}]},  # line 8: no assistant turn
    {"prompt": "Q: 3\n", "completion": "Answer: 3"},  # line 9: fine
]


def test_every_bad_row_is_named_by_file_and_line_in_one_error(tmp_path):
    path = write_jsonl(tmp_path / "golds.jsonl", BAD_ROWS)
    with pytest.raises(PanelError) as info:
        load_panel(path)
    message = str(info.value)
    assert "golds.jsonl has 7 bad rows:" in message
    expected = {
        2: r"'answer' is worked text of 2 steps \('48/2 = 24\\n48 \+ 24 = 72'\) with no answer cue",
        3: r"no gold answer: the row has no 'answer' and no 'gold' field",
        4: r"invalid JSON",
        5: r"'answer' is empty",
        6: r"gold answer 'z' is not a choice label \(A, B\)",
        7: r"nothing follows the answer cue 'Answer:' in 'completion'",
        8: r"'messages' has no assistant turn",
    }
    lines = message.splitlines()
    for line_no, reason in expected.items():
        assert any(re.search(rf"golds\.jsonl:{line_no}: .*{reason}", line) for line in lines), (line_no, message)
    assert not any(re.search(r"golds\.jsonl:[19]:", line) for line in lines)
    # listed in file order, and the way out is named
    named = [int(m.group(1)) for m in re.finditer(r"golds\.jsonl:(\d+):", message)]
    assert named == sorted(named)
    assert "allow_missing_gold=True" in message


def test_gold_less_rows_need_the_explicit_opt_in(tmp_path, caplog):
    path = write_jsonl(tmp_path / "golds.jsonl", [r for i, r in enumerate(BAD_ROWS) if i not in (3, 5)])
    with caplog.at_level(logging.WARNING, logger="faithcb.data._panel"):
        panel = load_panel(path, allow_missing_gold=True)
    assert [e.gold for e in panel] == ["4", None, None, None, None, None, "3"]
    assert [e.gold_from for e in panel][:2] == ["'####'", None]  # never the worked text as a gold
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "5 probe panel rows" in warning and "golds.jsonl:2" in warning
    # a gold that is present but wrong for its row, and a line that is not JSON, are refused anyway
    with pytest.raises(PanelError, match=r"has 2 bad rows:\n.*still_bad\.jsonl:4: invalid JSON") as info:
        load_panel(write_jsonl(tmp_path / "still_bad.jsonl", BAD_ROWS), allow_missing_gold=True)
    assert "still_bad.jsonl:6: gold answer 'z'" in str(info.value)
    assert "allow_missing_gold" not in str(info.value)  # the opt-in is on: no hint to turn it on


def test_many_bad_rows_are_capped_with_a_count():
    rows = [{"question": f"q{i}"} for i in range(25)] + [{"question": "ok", "answer": "1"}]
    with pytest.raises(PanelError) as info:
        load_panel(rows)
    message = str(info.value)
    assert "The probe panel from list has 25 bad rows:" in message
    assert [int(m) for m in re.findall(r"list row (\d+):", message)] == list(range(MAX_LISTED_ROWS))
    assert f"... and {25 - MAX_LISTED_ROWS} more." in message


def test_saved_dataset_folder_source(tmp_path):
    """The command line's form of a `datasets.Dataset`: a folder written by `save_to_disk`."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"question": "q", "answer": "#### 3"}, {"question": "r", "answer": "so\nthen"}])
    ds.select([0]).save_to_disk(str(tmp_path / "good"))
    panel = load_panel(tmp_path / "good")
    assert ([e.gold for e in panel], panel.source) == (["3"], str(tmp_path / "good"))
    ds.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(PanelError, match=rf"{re.escape(str(tmp_path / 'bad'))} row 1: cannot read a gold answer"):
        load_panel(str(tmp_path / "bad"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(PanelError, match=r"holds a DatasetDict \(splits: test\): give one split's folder"):
        load_panel(tmp_path / "dict")


def test_bad_dataset_rows_are_named_by_index():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"question": "q", "answer": "#### 3"}, {"question": "r", "answer": "so\nthen"}])
    with pytest.raises(PanelError, match=r"Dataset row 1: cannot read a gold answer"):
        load_panel(ds)
    with pytest.raises(PanelError, match=r"DatasetDict.*one split"):
        load_panel(datasets.DatasetDict({"test": ds}))


@pytest.mark.parametrize(
    ("row", "gold", "gold_from"),
    [
        ({"question": "q", "answer": "work\n#### 1,234"}, "1,234", "'####'"),
        ({"question": "q", "answer": "work. The answer is 72."}, "72", "'The answer is'"),
        ({"question": "q", "answer": "so $x$ is \\boxed{12} here"}, "12", "'\\\\boxed{'"),
        ({"question": "q", "answer": 42}, "42", "bare answer"),
        ({"question": "q", "answer": "Paris"}, "Paris", "bare answer"),
        ({"prompt": "p", "completion": "x = 3\nFinal: 9", "answer_cue": "Final:"}, "9", "'Final:'"),
        ({"prompt": "p", "completion": "no cue here\nat all", "gold": "7"}, "7", "gold field"),
        ({"question": "q", "choices": ["x", "y", "z"], "answer": "(C) z"}, "C", "choice label"),
        ({"question": "q", "choices": ["x", "y", "z"], "answer": "why\nAnswer: B"}, "B", "'Answer:'"),
        ({"question": "q", "choices": ["x", "y"], "answer": 0}, "A", "choice index"),
    ],
)
def test_gold_forms(row, gold, gold_from):
    example = load_panel([row])[0]
    assert (example.gold, example.gold_from) == (gold, gold_from)


def test_configured_answer_cues_read_golds():
    rows = [{"prompt": "p", "completion": "2 + 2 = 4\nResult => 4"}]
    with pytest.raises(PanelError, match="worked text of 2 steps"):
        load_panel(rows)
    assert load_panel(rows, answer_cues=["Result =>"])[0].gold == "4"
    assert panel_from(rows, FaithConfig(answer_cues=["result =>"]))[0].gold == "4"  # cues match in any case
    # the default cues match in any case too: 'Final answer:' ends with the cue 'Answer:'
    assert load_panel([{"prompt": "p", "completion": "2 + 2 = 4\nFinal answer: 4"}])[0].gold == "4"


def test_a_forced_answer_type_needs_golds_of_that_type():
    rows = [{"question": "q", "answer": "#### 12 apples"}, {"question": "r", "answer": "#### Paris"}]
    assert [e.gold for e in load_panel(rows)] == ["12 apples", "Paris"]
    with pytest.raises(PanelError, match=r"list row 1: gold answer 'Paris' holds no number, but answer_type='numeric'"):
        load_panel(rows, answer_type="numeric")
    with pytest.raises(PanelError, match=r"has 2 bad rows:\n  list row 0: answer_type='choice' but the row has no"):
        panel_from(rows, FaithConfig(answer_type="choice"))
    assert load_panel([{**rows[0], "choices": ["12 apples", "3"]}], answer_type="choice")[0].gold == "A"


def test_the_kits_tasks_load_with_their_answers_as_golds():
    examples = make_arithmetic_examples(5, seed=1) + make_letter_examples(5, seed=1)
    panel = load_panel(examples)
    assert [e.gold for e in panel] == [e["answer"] for e in examples]
    assert {infer_answer_type(e.gold, None) for e in panel} == {"numeric", "text"}


def test_describe_reports_shapes_golds_types_and_slices():
    rows = [
        {"question": "2+2?", "answer": "so\n#### 4", "slice": "in_dist"},
        {"question": "3+3?", "answer": "6", "slice": "in_dist"},
        {"prompt": "Q: 1\n", "completion": "x\nAnswer: one", "slice": "shift"},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "Answer: 2"}]},
        {
            "messages": [{"role": "user", "content": "pick"}, {"role": "assistant", "content": "B"}],
            "choices": ["a", "b"],
        },
        {"question": "none", "slice": "shift"},
    ]
    panel = load_panel(rows, allow_missing_gold=True)
    summary = panel.summary()
    assert summary["examples"] == 6
    assert summary["row_shapes"] == {
        "question_answer": 3,
        "prompt_completion": 1,
        "prompt_completion_chat": 1,
        "messages": 1,
    }
    assert (summary["with_gold"], summary["without_gold"], summary["multiple_choice"]) == (5, 1, 1)
    assert summary["gold_from"] == {"'Answer:'": 2, "'####'": 1, "bare answer": 1, "choice label": 1}
    assert summary["answer_types"] == {"numeric": 3, "text": 1, "choice": 1, "none": 1}
    assert summary["slices"] == {"in_dist": 2, "shift": 2, "all": 2}
    text = panel.describe()
    assert text.splitlines()[0] == "Probe panel from list: 6 examples"
    assert "row shapes:    3 question/answer, 1 prompt-completion (TRL, text prompt), " in text
    assert "1 prompt-completion (TRL, chat prompt), 1 messages (chat)" in text
    assert "gold answers:  5 of 6 (2 read after 'Answer:', 1 read after '####', 1 bare answer, 1 choice label)" in text
    assert "without gold:  1" in text
    assert "answer types:  3 numeric, 1 text, 1 choice" in text
    assert "multiple choice: 1 of 6" in text
    assert "slices:        in_dist 2, shift 2, all 2" in text


def test_panel_from_applies_the_configs_panel_settings():
    rows = [{"id": str(i), "question": f"q{i}", "answer": str(i)} for i in range(40)] + [{"id": "x", "question": "q"}]
    with pytest.raises(PanelError, match=r"list row 40: no gold answer"):
        panel_from(rows, FaithConfig())
    config = FaithConfig(allow_missing_gold=True, panel_size=8, seed=2)
    assert [e.id for e in panel_from(rows, config)] == [
        e.id for e in load_panel(rows, size=8, seed=2, allow_missing_gold=True)
    ]
    assert len(panel_from(rows, config, subsample=False)) == 41


# ---------------------------------------------------------------------- few-shot prompts
GSM_ROWS = [
    {"id": "q1", "question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"id": "q2", "question": "A box holds 6 pens. How many pens in 2 boxes?", "answer": "6 * 2 = 12\n#### 12"},
    {"id": "q3", "question": "Sam had 10 cards and gave 4 away. How many?", "answer": "10 - 4 = 6\n#### 6"},
    {"id": "q4", "question": "Ann reads 5 pages a day for 3 days. How many?", "answer": "5 * 3 = 15\n#### 15"},
]


def test_fewshot_takes_the_first_worked_rows_as_shots_and_never_probes_them(tokenizer):
    panel = load_panel(GSM_ROWS, num_fewshot=2)
    assert [e.id for e in panel] == ["q3", "q4"]
    assert all([s.id for s in e.shots] == ["q1", "q2"] for e in panel)
    assert panel.summary()["fewshot"] == ["q1", "q2"]
    assert "few-shot:      2 worked examples before each prompt (ids q1, q2)" in panel.describe()
    prompt = panel[0].render_prompt(tokenizer, use_chat_template=None, prompt_template="Question: {question}\n")
    assert prompt == (
        "Question: Tom has 3 apples and buys 4 more. How many?\n3 + 4 = 7\n#### 7\n\n"
        "Question: A box holds 6 pens. How many pens in 2 boxes?\n6 * 2 = 12\n#### 12\n\n"
        "Question: Sam had 10 cards and gave 4 away. How many?\n"
    )
    # a subsample draws from the rest: a shot is never probed
    for seed in range(5):
        sampled = load_panel(GSM_ROWS, num_fewshot=1, size=2, seed=seed)
        assert len(sampled) == 2 and "q1" not in [e.id for e in sampled]
    # loading a panel again keeps its shots instead of taking new ones
    assert [e.id for e in load_panel(panel, num_fewshot=2)] == ["q3", "q4"]


def test_fewshot_prompts_in_chat_and_prompt_completion_shapes(chat_tokenizer, tokenizer):
    panel = load_panel(GSM_ROWS, num_fewshot=1)
    chat = panel[0].render_prompt(chat_tokenizer, use_chat_template=None, prompt_template="{question}\n")
    turns = [
        {"role": "user", "content": GSM_ROWS[0]["question"]},
        {"role": "assistant", "content": GSM_ROWS[0]["answer"]},
        {"role": "user", "content": GSM_ROWS[1]["question"]},
    ]
    assert chat == chat_tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    pairs = ((1, 2), (3, 4))
    rows = [{"prompt": f"Q: {a} + {b}\n", "completion": f"{a} + {b} = {a + b}\nAnswer: {a + b}"} for a, b in pairs]
    completion = load_panel(rows, num_fewshot=1)
    assert completion[0].render_prompt(tokenizer, use_chat_template=None, prompt_template="{question}\n") == (
        "Q: 1 + 2\n1 + 2 = 3\nAnswer: 3\n\nQ: 3 + 4\n"
    )


def test_fewshot_settings_that_cannot_work_are_refused():
    with pytest.raises(PanelError, match="num_fewshot=5 needs 5 rows with a worked answer and a gold"):
        load_panel(GSM_ROWS, num_fewshot=5)
    with pytest.raises(PanelError, match="num_fewshot=4 leaves no example"):
        load_panel(GSM_ROWS, num_fewshot=4)
    numbers_only = [{"question": "3 + 3?", "answer": 6}, {"question": "1 + 1?", "answer": 2}]
    with pytest.raises(PanelError, match="num_fewshot=1 needs 1 rows with a worked answer"):
        load_panel(numbers_only, num_fewshot=1)
    with pytest.raises(ValueError, match="num_fewshot"):
        FaithConfig(num_fewshot=-1)


def test_a_round_shows_the_shots_to_the_model(tokenizer):
    from faithcb import run_probe_round
    from faithcb.synthetic import build_tiny_model, make_arithmetic_examples, to_sft_dataset

    rows = to_sft_dataset(make_arithmetic_examples(3, seed=4))
    result = run_probe_round(build_tiny_model(tokenizer), tokenizer, rows, FaithConfig(max_new_tokens=8, num_fewshot=1))
    assert len(result.records) == 2
    shot = rows[0]["prompt"] + rows[0]["completion"] + "\n\n"
    assert all(r["prompt"] == shot + row["prompt"] for r, row in zip(result.records, rows[1:]))
