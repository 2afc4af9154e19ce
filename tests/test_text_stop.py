"""Stopping rows on their text every few steps ends them where a read after every step would."""

from __future__ import annotations

import random
from functools import partial

import pytest
import torch
from transformers.generation import utils as generation_utils

from faithcb import FaithConfig
from faithcb.engine import EngineOptions, ProbeEngine, _engine, _static_decode
from faithcb.engine._patches import deferred_stop_checks
from faithcb.engine._text_stop import TextStop, text_check_interval
from faithcb.synthetic import build_tiny_model, make_arithmetic_examples, pretrain_tiny_model


def first_met(tokens: list[int], met) -> int | None:
    """Naive reference: the first length after which the condition holds (a check every step)."""
    return next((m for m in range(1, len(tokens) + 1) if met(tokens[:m])), None)


@pytest.mark.parametrize("check_every", [1, 2, 3, 5, 8])
def test_text_stop_finds_the_first_token_after_which_the_condition_held(check_every):
    rng = random.Random(check_every)
    rows = [[rng.randrange(10) for _ in range(23)] for _ in range(12)]
    thresholds = [rng.randrange(1, 140) for _ in rows]

    def met(row, text):  # grows with the text: the digit sum reaches the row's threshold
        return sum(map(int, text)) >= thresholds[row]

    stop = TextStop(
        met, lambda tokens: "".join(map(str, tokens)), prompt_width=2, rows=len(rows), check_every=check_every
    )
    reads = []
    settle = stop.settle
    stop.settle = lambda tokens: reads.append(len(tokens[0])) or settle(tokens)
    prompt = [[0, 0]] * len(rows)
    for n in range(1, 24):  # as generate calls it: one more token per row each step
        ids = torch.tensor([p + r[:n] for p, r in zip(prompt, rows)])
        flags = stop(ids, None).tolist()
        assert flags == [row in stop.stop_at for row in range(len(rows))]  # rows stop only at a read
    assert reads == list(range(check_every, 24, check_every))  # the text is read every check_every steps
    settle(rows)  # the steps after the last read
    expected = {r: first_met(tokens, lambda t, r=r: met(r, "".join(map(str, t)))) for r, tokens in enumerate(rows)}
    assert stop.stop_at == {r: m for r, m in expected.items() if m is not None}
    assert 0 < len(stop.stop_at) < len(rows)  # some rows stop, some run to the budget
    assert len({m for m in stop.stop_at.values()}) > 2


def test_text_stop_marks_padding_rows_done_and_rejects_a_bad_interval():
    stop = TextStop(lambda row, text: False, str, prompt_width=1, rows=2, check_every=4)
    assert stop(torch.zeros((3, 2), dtype=torch.long), None).tolist() == [False, False, True]
    with pytest.raises(ValueError, match="check_every must be >= 1, got 0"):
        TextStop(lambda row, text: False, str, prompt_width=1, rows=2, check_every=0)


def test_text_check_interval_reads_every_step_off_cuda_and_rarely_past_short_budgets():
    assert text_check_interval(torch.device("cpu"), 256) == 1
    assert text_check_interval(torch.device("cuda"), 256) == EngineOptions().text_check_every > 1
    assert text_check_interval(torch.device("cuda"), 16) == 4  # forced answers: a few tokens
    assert text_check_interval(torch.device("cuda"), 3) == 1


@pytest.fixture(scope="module")
def engine(tokenizer):
    model = build_tiny_model(tokenizer, seed=4)
    pretrain_tiny_model(model, tokenizer, make_arithmetic_examples(400, seed=1), steps=40, batch_size=32)
    return ProbeEngine(model.eval(), tokenizer, FaithConfig(generation_batch_size=5))


CONTEXTS = [e["prompt"] + e["completion"][: 3 + 5 * i] for i, e in enumerate(make_arithmetic_examples(9, seed=3))]


def finished(i, text):  # rows end at different lengths
    return text.count("=") >= 1 + i % 4


def run_generate(engine, max_new_tokens=30, **kwargs):

    with torch.no_grad():
        return engine.generate(
            CONTEXTS, max_new_tokens=max_new_tokens, stop_strings=["Answer"], finished=finished, **kwargs
        )


@pytest.mark.parametrize("decoding", ["own_loop", "own_loop_deferred_reads", "generate"])
@pytest.mark.parametrize("check_every", [3, 7])
def test_engine_generate_reading_every_few_steps_equals_every_step(engine, monkeypatch, check_every, decoding):
    """In the engine's own decode loop (its reads waited for, or checked one interval late as on
    CUDA) and in `generate` alike."""
    own_loop = decoding != "generate"
    engine = ProbeEngine(engine.model, engine.tokenizer, engine.config, options=EngineOptions(static_decode=own_loop))
    assert engine._own_decode_loop() is own_loop
    if decoding == "own_loop_deferred_reads":
        deferred = partial(_static_decode.static_greedy_decode, defer_reads=True)
        monkeypatch.setattr(_engine, "static_greedy_decode", deferred)
    reads = []
    settle = TextStop.settle
    monkeypatch.setattr(TextStop, "settle", lambda self, tokens: reads.append(1) or settle(self, tokens))
    every_step = run_generate(engine)
    reads_every_step, reads[:] = len(reads), []
    monkeypatch.setattr(_engine, "text_check_interval", lambda device, max_new_tokens, every: check_every)
    assert run_generate(engine) == every_step
    assert len(reads) < reads_every_step / 2  # fewer reads of the text (each one waits for a GPU)
    assert run_generate(engine, static_shapes=True) == every_step  # with padding rows, a static cache
    lengths = [n for _, n in every_step]
    assert len(set(lengths)) > 2 and max(lengths) < 30  # rows really stop at different steps


def test_engine_generate_reads_the_steps_after_the_last_read(engine, monkeypatch):
    """Budgets that end between two reads: a row whose text met its condition in the last,
    unread steps is still cut where it first met it."""
    every_step = {n: run_generate(engine, max_new_tokens=n) for n in range(5, 17)}
    monkeypatch.setattr(_engine, "text_check_interval", lambda device, max_new_tokens, every: 4)
    for n, expected in every_step.items():
        assert run_generate(engine, max_new_tokens=n) == expected, n
    # some row met its condition in the unread steps (n - n % 4, n] of some budget n
    met = [m for i, (text, m) in enumerate(every_step[16]) if m < 16 and finished(i, text)]
    assert any(n - n % 4 < m <= n for n in every_step for m in met)


class _HostEvent:
    """`torch.Event` stand-in on CPU, where every copy has finished when it returns."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args):
        pass

    def synchronize(self):
        pass


def test_deferred_stop_flag_gives_the_same_rows(engine, monkeypatch):
    """transformers' one-step-late stop flag (what `deferred_stop_checks` enables on CUDA),
    exercised on CPU: the extra step it runs is undone, rows end at the same tokens."""
    # greedy rows decode in `generate`
    engine = ProbeEngine(engine.model, engine.tokenizer, engine.config, options=EngineOptions(static_decode=False))
    every_step = run_generate(engine)
    check = generation_utils.DeferredStopCheck
    runs = []
    original_init = check.__init__

    def counting_init(self, *args, **kwargs):
        runs.append(1)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(generation_utils.torch, "Event", _HostEvent)
    monkeypatch.setattr(check, "is_supported", staticmethod(lambda *args, **kwargs: True))
    monkeypatch.setattr(check, "__init__", counting_init)
    monkeypatch.setattr(_engine, "text_check_interval", lambda device, max_new_tokens, every: 4)
    assert run_generate(engine) == every_step
    assert runs  # the deferred check did run


def test_deferred_stop_checks_enables_cuda_only_inside_the_block():
    check = generation_utils.DeferredStopCheck
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not check.is_supported(cuda, None, False, False)  # transformers' own rule: MPS only
    with deferred_stop_checks(cuda):
        assert check.is_supported(cuda, None, False, False)
        assert not check.is_supported(cuda, None, False, is_assistant=True)  # never for assisted decoding
        uncroppable = type("Cache", (), {"is_croppable": False})()
        assert not check.is_supported(cuda, uncroppable, True, False)  # a returned cache it cannot undo
        assert check.is_supported(cuda, uncroppable, False, False)  # a cache dropped anyway
        assert not check.is_supported(cpu, None, False, False)
    assert not check.is_supported(cuda, None, False, False)  # restored
    with deferred_stop_checks(cpu):  # a CPU round leaves transformers alone
        assert not check.is_supported(cuda, None, False, False)


def test_rows_read_after_their_eos_are_not_decoded_again():
    """A row that ended (EOS, then padding) without meeting the condition keeps its text: one
    read after its EOS settles it. The rows stop where they stop without the shortcut."""
    eos, pad = 9, 8
    rows = [[1, 2, 3, 4, 5, 6, 7, 1], [1, eos, pad, pad, pad, pad, pad, pad], [2, 2, eos, pad, pad, pad, pad, pad]]

    def met(row, text):
        return "5" in text  # row 0 meets it at its 5th token; the others never

    def run(eos_ids):
        decoded = []

        def decode(tokens):
            decoded.append(tuple(tokens))
            return "".join(str(t) for t in tokens if t not in (eos, pad))

        stop = TextStop(met, decode, prompt_width=0, rows=len(rows), check_every=1, eos_ids=eos_ids)
        for n in range(1, 9):
            stop(torch.tensor([r[:n] for r in rows]), None)
        return stop.stop_at, len(decoded)

    stop_at, reads = run(())
    assert run([eos]) == (stop_at, reads - 6 - 5)  # row 1 read at steps 2-8 once, row 2 at 3-8 once
    assert stop_at == {0: 5}
