"""`faithcb audit-data`: settle points of SFT traces, trimmed data and a random-trim control.

Rule models with known behaviour (tests/rule_models.py) judge the traces: `reads_chain`
answers with the last number written, so it settles where the trace first states the
result; `ignores_chain` always knows the answer, so every trace settles at step 0.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest

from faithcb.cli import main
from faithcb.cli._audit import join_steps, random_keep, replace_chain, trace_text, with_trace_text
from faithcb.data._parsing import parse_response, split_steps

CHAT_TEMPLATE = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n{% endif %}{% endfor %}"
ROWS = [
    # settles after step 2 of 4: two post-conclusion steps (tail 0.5)
    {
        "prompt": "Q: 6 + 4 + 2\n",
        "completion": "6 + 4 = 10\n10 + 2 = 12\nSo it is 12.\nChecked: 12.\nAnswer: 12",
        "src": "a",
    },
    # no tail
    {"prompt": "Q: 8 * 4 + 9\n", "completion": "8 * 4 = 32\n32 + 9 = 41\nAnswer: 41"},
    # the trace's answer is wrong: the model never agrees with it -> unsettled, kept as is
    {"prompt": "Q: 6 + 4 + 2\n", "completion": "6 + 4 = 10\n10 + 2 = 12\nAnswer: 13", "gold": "12"},
    # '####' cue: the rule model cannot answer after it (all forced answers unparseable) -> unsettled, never trimmed
    {"question": "3 * 4 - 2", "answer": "3 * 4 = 12\n12 - 2 = 10. That is 10.\n#### 10"},
    # conversational row: settles after step 2 of 3
    {
        "messages": [
            {"role": "user", "content": "Q: 5 + 5 + 1"},
            {"role": "assistant", "content": "5 + 5 = 10\n10 + 1 = 11\nDone, 11.\nAnswer: 11"},
        ],
        "id": "chat",
    },
    # no answer line -> skipped
    {"prompt": "Q: 1 + 1\n", "completion": "1 + 1 = 2"},
]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steps_of(row: dict) -> list[str]:
    chain = parse_response(trace_text(row), ["Answer:", "####"]).chain
    return [chain[s.start : s.end] for s in split_steps(chain)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a shared, busy CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rule_model_dirs(tmp_path_factory):
    """Saved rule models, loadable with AutoModelForCausalLM (registered for this module only)."""
    from rule_models import auto_classes_registered, make_rule_model

    root = tmp_path_factory.mktemp("rule_models")
    dirs = {}
    for kind in ("reads_chain", "ignores_chain"):
        model, tokenizer = make_rule_model(kind)
        tokenizer.chat_template = CHAT_TEMPLATE
        model.save_pretrained(root / kind)
        tokenizer.save_pretrained(root / kind)
        dirs[kind] = root / kind
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with auto_classes_registered():  # the Auto* registries are left as they were after the module
        yield dirs, data


def test_audit_finds_the_post_conclusion_tail(rule_model_dirs, tmp_path, capsys):
    dirs, data = rule_model_dirs
    out = tmp_path / "audit"
    argv = ["audit-data", str(data), "--model", str(dirs["reads_chain"])]
    argv += ["--prompt_template", "Q: {question}\n", "--no-progress", "--seed", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "Audited 5 of 6 rows: 3 settled, 2 unsettled, 1 skipped." in stdout

    audit = read_jsonl(out / "audit.jsonl")
    assert [r["status"] for r in audit] == ["settled", "settled", "unsettled", "unsettled", "settled", "skipped"]
    assert [r.get("settle_step") for r in audit] == [2, 2, None, None, 2, None]
    assert [r.get("tail_fraction") for r in audit] == [0.5, 0.0, None, None, pytest.approx(1 / 3), None]
    assert audit[0]["matches"] == [False, False, True, True, True]
    assert audit[2]["answer_correct"] is False and audit[2]["forced_answers"][-1] == "12"
    assert audit[3]["matches"] == [None, None, None, None]  # unparseable everywhere: never "settled at 0"
    assert audit[5]["reason"] == "no answer line after an answer cue"

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rows"], summary["settled"], summary["unsettled"], summary["skipped"]) == (6, 3, 2, 1)
    assert summary["tail_fraction"]["mean"] == pytest.approx((0.5 + 0 + 1 / 3) / 3, abs=1e-5)
    assert summary["tail_fraction"]["histogram"]["counts"] == [1, 0, 0, 1, 0, 1, 0, 0, 0, 0]
    assert summary["steps"] == {"total": 9, "removed": 3, "removed_share": pytest.approx(1 / 3, abs=1e-5)}
    hist = (out / "tail_fraction_hist.png").read_bytes()
    assert hist[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", hist[16:24])[0] >= 500

    trimmed = read_jsonl(out / "trimmed.jsonl")
    control = read_jsonl(out / "random_trim.jsonl")
    assert len(trimmed) == len(control) == len(ROWS)
    for original, cut, rand in zip(ROWS, trimmed, control):
        assert set(cut) == set(rand) == set(original)  # rows keep their shape and fields
    assert trimmed[0] == {**ROWS[0], "completion": "6 + 4 = 10\n10 + 2 = 12\nAnswer: 12"}
    assert trimmed[4]["messages"][1]["content"] == "5 + 5 = 10\n10 + 1 = 11\nAnswer: 11"
    assert trimmed[4]["messages"][0] == ROWS[4]["messages"][0]
    for i in (1, 2, 3, 5):  # nothing to trim: rows unchanged
        assert trimmed[i] == ROWS[i] and control[i] == ROWS[i]
    # the control removes the same NUMBER of steps, at seeded random positions, answer line kept
    for i in (0, 4):
        kept = steps_of(control[i])
        assert len(kept) == len(steps_of(ROWS[i])) - audit[i]["removed_steps"]
        assert trace_text(control[i]).endswith(trace_text(ROWS[i]).rsplit("\n", 1)[1])
        removed = audit[i]["random_removed"]
        assert kept == [s for j, s in enumerate(steps_of(ROWS[i])) if j not in removed]

    # seeded: the same seed gives the same control
    assert main([*argv, "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "random_trim.jsonl").read_text() == (out / "random_trim.jsonl").read_text()


def test_audit_with_a_cue_and_a_model_that_ignores_the_chain(rule_model_dirs, tmp_path, capsys):
    dirs, data = rule_model_dirs
    out = tmp_path / "audit"
    argv = ["audit-data", str(data), "--model", str(dirs["ignores_chain"]), "--out", str(out), "--cue", "Answer:"]
    rc = main([*argv, "--max-rows", "5", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    audit = read_jsonl(out / "audit.jsonl")
    # with --cue 'Answer:' the '####' row has no answer line
    assert [r["status"] for r in audit] == ["settled", "settled", "unsettled", "skipped", "settled"]
    assert [r.get("tail_fraction") for r in audit] == [1.0, 1.0, None, None, 1.0]
    trimmed = read_jsonl(out / "trimmed.jsonl")
    assert len(trimmed) == 5
    assert trimmed[0]["completion"] == "Answer: 12" and trimmed[1]["completion"] == "Answer: 41"
    assert trimmed[4]["messages"][1]["content"] == "Answer: 11"
    # removing every step at random removes every step too
    assert read_jsonl(out / "random_trim.jsonl") == trimmed


def test_audit_on_the_synthetic_kit(tmp_path, tokenizer, capsys):
    """End to end with a tiny pre-trained model and the synthetic task's own traces."""
    from faithcb.synthetic import build_tiny_model, make_arithmetic_examples, pretrain_tiny_model, to_sft_dataset

    model = pretrain_tiny_model(
        build_tiny_model(tokenizer), tokenizer, make_arithmetic_examples(300, seed=1), steps=60, batch_size=16, lr=1e-2
    )
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = to_sft_dataset(make_arithmetic_examples(8, seed=9))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["audit-data", str(data), "--model", str(tmp_path / "model"), "--cue", "Answer:"]
    assert main([*argv, "--answer_max_new_tokens", "4", "--batch-rows", "3", "--no-progress"]) == 0
    out = tmp_path / "train_audit"  # default: next to the data
    audit = read_jsonl(out / "audit.jsonl")
    assert len(audit) == len(rows) and all(r["status"] in ("settled", "unsettled") for r in audit)
    assert all(len(r["forced_answers"]) == r["steps"] + 1 == 3 for r in audit)
    trimmed = read_jsonl(out / "trimmed.jsonl")
    for row, cut, result in zip(rows, trimmed, audit):
        assert cut["prompt"] == row["prompt"]
        assert cut["completion"].endswith(row["completion"].rsplit("\n", 1)[1])
        assert len(steps_of(cut)) == result["steps"] - result["removed_steps"]
    assert json.loads((out / "summary.json").read_text())["rows"] == len(rows)


def test_trace_helpers_keep_shapes_and_layout():
    chain = "First step. Second step.\nThird = 3\nFourth"
    steps = split_steps(chain)
    assert join_steps(chain, steps, [0, 1]) == "First step. Second step."
    assert join_steps(chain, steps, [0, 2, 3]) == "First step.\nThird = 3\nFourth"
    assert join_steps(chain, steps, []) == ""
    completion = "  " + chain + "\nAnswer: 3"
    assert replace_chain(completion, chain, "First step.") == "  First step.\nAnswer: 3"
    assert replace_chain(completion, chain, "") == "  Answer: 3"  # leading text kept, joiner dropped
    think = "<think>\na\nb\n</think>\nAnswer: 3"
    assert replace_chain(think, "a\nb", "a") == "<think>\na\n</think>\nAnswer: 3"
    keep = random_keep(10, 4, random.Random(0))
    assert len(keep) == 6 and keep == sorted(keep)
    assert random_keep(3, 0, random.Random(0)) == [0, 1, 2]

    parts = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "x"}]}
    assert trace_text(parts) == "x"
    assert with_trace_text(parts, "y")["completion"] == [{"role": "assistant", "content": "y"}]
    typed = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "text", "text": "x"}]},
        ]
    }
    assert trace_text(typed) == "x"
    assert with_trace_text(typed, "y")["messages"][1]["content"] == [{"type": "text", "text": "y"}]
    question = {"question": "q", "answer": "a\n#### 1", "extra": [1]}
    assert with_trace_text(question, "#### 1") == {"question": "q", "answer": "#### 1", "extra": [1]}
    assert question["answer"] == "a\n#### 1"  # the original row is not modified
