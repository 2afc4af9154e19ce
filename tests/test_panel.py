import json

import pytest

from faithcb import PanelError, load_panel
from faithcb.synthetic import build_tokenizer


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
