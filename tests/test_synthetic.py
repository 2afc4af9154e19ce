"""Tests for faithcb.synthetic: task generators, tokenizer and tiny models."""

from __future__ import annotations

import re
import string

import pytest

from faithcb.synthetic import (
    HELD_OUT_LETTER_PAIRS,
    LETTER_OPS,
    SHIFT_SLICES,
    is_held_out_composition,
    make_arithmetic_examples,
    make_letter_examples,
    make_shifted_slices,
    to_conversational,
    to_sft_dataset,
    to_text_dataset,
)

KEYS = {"prompt", "completion", "question", "answer", "chain", "steps", "slice"}


# --------------------------------------------------------------------------- helpers


def naive_left_to_right(expr: str) -> tuple[int, list[int]]:
    """Independent evaluator: the result and every intermediate result."""
    tokens = expr.split()
    acc = int(tokens[0])
    seen = []
    for op, operand in zip(tokens[1::2], tokens[2::2], strict=True):
        b = int(operand)
        if op == "+":
            acc = acc + b
        elif op == "-":
            acc = acc - b
        elif op == "*":
            acc = acc * b
        else:
            raise AssertionError(f"bad op {op}")
        seen.append(acc)
    return acc, seen


def naive_letter(op: str, word: str) -> str:
    if op == "rot1":
        return "".join("A" if c == "Z" else chr(ord(c) + 1) for c in word)
    if op == "rev":
        return "".join(reversed(word))
    if op == "swap":
        chars = list(word)
        chars[0], chars[-1] = chars[-1], chars[0]
        return "".join(chars)
    raise AssertionError(op)


@pytest.fixture(scope="module")
def tokenizer():
    from faithcb.synthetic import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer():
    from faithcb.synthetic import build_tokenizer

    return build_tokenizer(chat_template=True)


def all_task_text() -> list[str]:
    exs = (
        make_arithmetic_examples(200, seed=3, min_ops=1, max_ops=5, max_operand=20)
        + make_letter_examples(200, seed=3, min_ops=1, max_ops=4, word_length=5)
        + make_shifted_slices(20, seed=3)
    )
    return [e["prompt"] + e["completion"] for e in exs]


# --------------------------------------------------------------------------- tasks


def test_arithmetic_format_example():
    ex = make_arithmetic_examples(50, seed=0)
    for e in ex:
        assert set(e) == KEYS
        assert re.fullmatch(r"Q: \d+ [-+*] \d+ [-+*] \d+\n", e["prompt"])
        assert e["question"] == e["prompt"]
        assert e["completion"] == e["chain"] + "\nAnswer: " + e["answer"]
        assert e["chain"] == "\n".join(e["steps"])
        assert not e["completion"].endswith("\n")
        assert e["slice"] == "in_dist"
        for line in e["steps"]:
            assert re.fullmatch(r"\d+ [-+*] \d+ = \d+", line)


def test_arithmetic_determinism():
    a = make_arithmetic_examples(30, seed=7, min_ops=1, max_ops=4)
    b = make_arithmetic_examples(30, seed=7, min_ops=1, max_ops=4)
    c = make_arithmetic_examples(30, seed=8, min_ops=1, max_ops=4)
    assert a == b
    assert a != c


@pytest.mark.parametrize(("min_ops", "max_ops", "max_operand"), [(2, 2, 9), (1, 5, 30)])
def test_arithmetic_left_to_right_and_range(min_ops, max_ops, max_operand):
    for e in make_arithmetic_examples(300, seed=1, min_ops=min_ops, max_ops=max_ops, max_operand=max_operand):
        expr = e["prompt"][len("Q: ") : -1]
        tokens = expr.split()
        operands = [int(t) for t in tokens[::2]]
        assert min_ops <= len(tokens[1::2]) <= max_ops
        assert all(1 <= x <= max_operand for x in operands)
        result, intermediates = naive_left_to_right(expr)
        assert e["answer"] == str(result)
        assert all(0 <= v <= 999 for v in intermediates)
        # every step line is consistent with the running accumulator
        acc = operands[0]
        for line, value, op, operand in zip(e["steps"], intermediates, tokens[1::2], operands[1:], strict=True):
            assert line == f"{acc} {op} {operand} = {value}"
            acc = value


def test_arithmetic_known_example():
    # find an example whose left-to-right result differs from precedence evaluation
    for e in make_arithmetic_examples(200, seed=0):
        expr = e["prompt"][3:-1]
        if eval(expr) != naive_left_to_right(expr)[0]:
            assert e["answer"] == str(naive_left_to_right(expr)[0])
            break
    else:
        pytest.fail("no precedence-sensitive example drawn")


def test_exclude_gives_disjoint_sets():
    train = make_arithmetic_examples(200, seed=0)
    prompts = {e["prompt"] for e in train}
    test = make_arithmetic_examples(100, seed=1, exclude=prompts)
    assert not prompts & {e["prompt"] for e in test}
    with pytest.raises(ValueError, match="exclude"):
        make_arithmetic_examples(
            5, min_ops=1, max_ops=1, max_operand=1, exclude={"Q: 1 + 1\n", "Q: 1 - 1\n", "Q: 1 * 1\n"}
        )


def test_letter_examples_correct():
    exs = make_letter_examples(300, seed=2, min_ops=1, max_ops=4, word_length=5)
    assert exs == make_letter_examples(300, seed=2, min_ops=1, max_ops=4, word_length=5)
    for e in exs:
        assert set(e) == KEYS
        *ops, word = e["prompt"][len("Q: ") : -1].split(" ")
        assert 1 <= len(ops) <= 4
        assert set(ops) <= set(LETTER_OPS)
        assert len(word) == 5
        assert set(word) <= set(string.ascii_uppercase)
        lines = []
        for op in ops:
            new = naive_letter(op, word)
            lines.append(f"{op} {word} = {new}")
            word = new
        assert e["steps"] == lines
        assert e["answer"] == word
        assert e["completion"] == "\n".join(lines) + f"\nAnswer: {word}"


def test_letter_format_example():
    e = make_letter_examples(1, seed=0)[0]
    assert re.fullmatch(r"Q: (rot1|rev|swap) (rot1|rev|swap) [A-Z]{4}\n", e["prompt"])


def test_letter_compositions():
    seen = make_letter_examples(200, seed=0, compositions="seen")
    held = make_letter_examples(200, seed=0, compositions="held_out")
    for e in seen:
        assert not is_held_out_composition(e["prompt"][3:-1].split()[:-1])
    for e in held:
        ops = e["prompt"][3:-1].split()[:-1]
        assert tuple(ops) in HELD_OUT_LETTER_PAIRS


def test_shifted_slices():
    exs = make_shifted_slices(10, seed=0)
    assert exs == make_shifted_slices(10, seed=0)
    by_slice: dict[str, list[dict]] = {}
    for e in exs:
        by_slice.setdefault(e["slice"], []).append(e)
    assert tuple(by_slice) == SHIFT_SLICES
    assert all(len(v) == 10 for v in by_slice.values())
    assert all(len(e["steps"]) == 2 for e in by_slice["in_dist"])
    assert all(len(e["steps"]) == 4 for e in by_slice["length_shift"])
    for e in by_slice["format_shift"]:
        assert e["prompt"].startswith("Q: compute ")
        assert naive_left_to_right(e["prompt"][len("Q: compute ") : -1])[0] == int(e["answer"])
    for e in by_slice["composition_shift"]:
        assert is_held_out_composition(e["prompt"][3:-1].split()[:-1])
    only = make_shifted_slices(3, seed=0, slices=["length_shift"])
    assert [e["slice"] for e in only] == ["length_shift"] * 3


def test_dataset_converters():
    exs = make_arithmetic_examples(3, seed=0)
    sft = to_sft_dataset(exs, eos_token="</s>")
    assert sft[0] == {"prompt": exs[0]["prompt"], "completion": exs[0]["completion"] + "</s>"}
    assert to_sft_dataset(exs)[1]["completion"] == exs[1]["completion"]
    assert to_text_dataset(exs)[0] == {"text": exs[0]["prompt"] + exs[0]["completion"]}
    assert to_text_dataset(exs, eos_token="</s>")[0]["text"].endswith("</s>")
    conv = to_conversational(exs)[0]["messages"]
    assert conv == [
        {"role": "user", "content": exs[0]["prompt"].strip()},
        {"role": "assistant", "content": exs[0]["completion"]},
    ]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n": -1}, "n"),
        ({"n": 1, "min_ops": 0}, "min_ops"),
        ({"n": 1, "min_ops": 3, "max_ops": 2}, "max_ops"),
        ({"n": 1, "max_operand": 0}, "max_operand"),
        ({"n": 1, "prompt_template": "no placeholder"}, "prompt_template"),
    ],
)
def test_arithmetic_bad_args(kwargs, name):
    n = kwargs.pop("n")
    with pytest.raises(ValueError, match=rf"^{name} "):
        make_arithmetic_examples(n, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n": -2}, "n"),
        ({"n": 1, "min_ops": 0}, "min_ops"),
        ({"n": 1, "min_ops": 2, "max_ops": 1}, "max_ops"),
        ({"n": 1, "word_length": 0}, "word_length"),
        ({"n": 1, "compositions": "nope"}, "compositions"),
    ],
)
def test_letter_bad_args(kwargs, name):
    n = kwargs.pop("n")
    with pytest.raises(ValueError, match=rf"^{name} "):
        make_letter_examples(n, **kwargs)


def test_shifted_bad_args():
    with pytest.raises(ValueError, match="n_per_slice"):
        make_shifted_slices(-1)
    with pytest.raises(ValueError, match="slices"):
        make_shifted_slices(1, slices=["nope"])
    with pytest.raises(TypeError, match="n"):
        make_arithmetic_examples(1.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tokenizer):
    texts = [*all_task_text(), " ... ...", "  two  spaces\n\nnewlines\n", string.printable[:-5]]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == text
    batch = tokenizer(texts[:5])["input_ids"]
    assert tokenizer.batch_decode(batch) == texts[:5]


def test_tokenizer_digits_single_tokens(tokenizer):
    ids = tokenizer.encode("123 + 45 = 168", add_special_tokens=False)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert [t for t in tokens if any(c.isdigit() for c in t)] == list("12345168")
    for d in string.digits:
        assert len(tokenizer.encode(d, add_special_tokens=False)) == 1


def test_tokenizer_specials_and_defaults(tokenizer):
    assert tokenizer.bos_token == "<s>"
    assert tokenizer.eos_token == "</s>"
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.unk_token == "<unk>"
    assert tokenizer.padding_side == "left"
    assert tokenizer.model_max_length == 512
    # no automatic BOS/EOS
    assert tokenizer("Q: 1 + 2\n")["input_ids"] == tokenizer.encode("Q: 1 + 2\n", add_special_tokens=False)
    eos_ids = tokenizer.encode("Answer: 3</s>", add_special_tokens=False)
    assert eos_ids[-1] == tokenizer.eos_token_id
    padded = tokenizer(["1", "1 + 2"], padding=True)
    assert padded["input_ids"][0][0] == tokenizer.pad_token_id
    assert padded["attention_mask"][0][0] == 0


def test_tokenizer_deterministic_with_merges():
    from faithcb.synthetic import build_tokenizer

    texts = all_task_text()
    a = build_tokenizer(texts, vocab_size=130)
    b = build_tokenizer(texts, vocab_size=130)
    assert a.get_vocab() == b.get_vocab()
    assert 96 < len(a) <= 134
    for text in texts[:50]:
        assert a.decode(a.encode(text, add_special_tokens=False)) == text
    assert "1" in a.convert_ids_to_tokens(a.encode("12", add_special_tokens=False))
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(texts, vocab_size=50)


def test_chat_template(chat_tokenizer):
    msgs = to_conversational(make_arithmetic_examples(1, seed=0))[0]["messages"]
    prompt = chat_tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"<|user|>\n{msgs[0]['content']}\n<|assistant|>\n"
    no_gen = chat_tokenizer.apply_chat_template(msgs[:1], tokenize=False)
    assert no_gen == f"<|user|>\n{msgs[0]['content']}\n"
    full = chat_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert full == prompt + msgs[1]["content"] + "</s>"
    ids = chat_tokenizer.encode(full, add_special_tokens=False)
    assert chat_tokenizer.decode(ids) == full
    marker_id = chat_tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert marker_id in ids
    assert chat_tokenizer.convert_tokens_to_ids("<|user|>") in ids
    out = chat_tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert chat_tokenizer.decode(masked) == msgs[1]["content"] + "</s>"


def test_tokenizer_save_load(chat_tokenizer, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    chat_tokenizer.save_pretrained(tmp_path)
    text = all_task_text()[0]
    for cls in (AutoTokenizer, PreTrainedTokenizerFast):
        loaded = cls.from_pretrained(tmp_path)
        assert loaded.get_vocab() == chat_tokenizer.get_vocab()
        assert loaded.padding_side == "left"
        assert loaded.eos_token == "</s>" and loaded.pad_token == "<pad>"
        assert loaded("Q: 1\n")["input_ids"] == chat_tokenizer("Q: 1\n")["input_ids"]
        assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
        msgs = [{"role": "user", "content": "hi"}]
        assert loaded.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True
        ) == chat_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_tiny_model_forward_and_generate(tokenizer, arch):
    import torch

    from faithcb.synthetic import build_tiny_model

    model = build_tiny_model(tokenizer, arch=arch, dropout=0.1)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.tie_word_embeddings
    dropout_attr = "attn_pdrop" if arch == "gpt2" else "attention_dropout"
    assert getattr(model.config, dropout_attr) == 0.1
    assert not model.training
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.bos_token_id == tokenizer.bos_token_id
    assert sum(p.numel() for p in model.parameters()) < 500_000
    enc = tokenizer(["Q: 1 + 2 * 3\n", "Q: 4 - 1\n"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, enc["input_ids"].shape[1], len(tokenizer))
    model.eval()
    with torch.no_grad():
        batched = model.generate(
            **enc,
            max_new_tokens=3,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
        single = model.generate(
            **tokenizer(["Q: 4 - 1\n"], return_tensors="pt"),
            max_new_tokens=3,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
    seqs = batched.sequences
    assert seqs.shape[0] == 2 and seqs.shape[1] <= enc["input_ids"].shape[1] + 3
    # left padding does not change the (shorter) second prompt's logits
    for step_b, step_s in zip(batched.logits, single.logits, strict=True):
        torch.testing.assert_close(step_b[1], step_s[0], atol=1e-5, rtol=1e-5)


def test_tiny_model_seeded(tokenizer):
    import torch

    from faithcb.synthetic import build_tiny_model

    a = build_tiny_model(tokenizer, seed=1)
    b = build_tiny_model(tokenizer, seed=1)
    c = build_tiny_model(tokenizer, seed=2)
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


def test_tiny_model_bad_args(tokenizer):
    from faithcb.synthetic import build_tiny_model

    with pytest.raises(ValueError, match="arch") as info:
        build_tiny_model(tokenizer, arch="bert")
    assert "llama" in str(info.value) and "gpt2" in str(info.value)
    with pytest.raises(ValueError, match="hidden_size"):
        build_tiny_model(tokenizer, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_layers"):
        build_tiny_model(tokenizer, num_layers=0)
    with pytest.raises(ValueError, match="dropout"):
        build_tiny_model(tokenizer, dropout=1.5)


def test_pretrain_reduces_loss(tokenizer):
    import torch

    from faithcb.synthetic import build_tiny_model, pretrain_tiny_model

    torch.manual_seed(0)
    examples = make_arithmetic_examples(64, seed=0)
    model = build_tiny_model(tokenizer, hidden_size=32, intermediate_size=64, num_layers=1)
    texts = [e["prompt"] + e["completion"] + tokenizer.eos_token for e in examples[:16]]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)

    def loss() -> float:
        with torch.no_grad():
            return model(**enc, labels=labels).loss.item()

    before = loss()
    out = pretrain_tiny_model(model, tokenizer, examples, steps=15, batch_size=8, lr=1e-2)
    assert out is model
    assert not model.training
    assert loss() < before
    with pytest.raises(ValueError, match="examples"):
        pretrain_tiny_model(model, tokenizer, [], steps=1)
    with pytest.raises(ValueError, match="batch_size"):
        pretrain_tiny_model(model, tokenizer, examples, steps=1, batch_size=0)
