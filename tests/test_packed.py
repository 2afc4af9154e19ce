"""Packed prefix scoring (one sequence + 4-D mask per example) equals separate passes."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from trainer_helpers import pretrain_until

from faithcb import FaithConfig, load_panel, run_probe_round
from faithcb.engine import EngineOptions, ProbeEngine
from faithcb.engine._packed import Branch, PackedRow, _layout, common_prefix, packing_supported, score_packed
from faithcb.engine._patches import PACKED_PASS, framework_patches
from faithcb.synthetic import build_tiny_model, make_arithmetic_examples, pretrain_tiny_model, to_sft_dataset


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def trained(request, tokenizer):
    model = build_tiny_model(tokenizer, arch=request.param, seed=3)
    pretrain_tiny_model(model, tokenizer, make_arithmetic_examples(600, seed=1), steps=100, batch_size=32)
    return model.eval()


def assert_same_record(a, b):
    """Equal records; information-gain log-probs to 1e-3 bit (batch shapes change the last bits
    of a matmul, so rounding both sides could split a value at a boundary)."""
    assert set(a) == set(b)
    for key in a:
        x, y = a[key], b[key]
        if key.startswith("info_gain/") and isinstance(x, (float, list)):
            assert x == pytest.approx(y, abs=1e-3, nan_ok=True), key
        else:
            assert x == y, key


def test_packed_round_equals_separate_passes(trained, tokenizer):
    assert packing_supported(trained, tokenizer.pad_token_id)
    panel = load_panel(to_sft_dataset(make_arithmetic_examples(8, seed=7)))
    results = {}
    for packed in (False, True):
        config = FaithConfig(max_new_tokens=40, packed_scoring=packed, generation_batch_size=4)
        results[packed] = run_probe_round(trained, tokenizer, panel, config)
    assert any(r["steps"] for r in results[True].records)  # the chains have steps to cut
    for a, b in zip(results[False].records, results[True].records):
        assert_same_record(a, b)
    for key, value in results[False].metrics.items():
        if key.startswith("cost/"):  # what each path pays in tokens: packing reads fewer
            continue
        assert results[True].metrics[key] == pytest.approx(value, abs=1e-3), key
    assert results[True].metrics["cost/prefilled_tokens"] < results[False].metrics["cost/prefilled_tokens"]
    # the packed path replaces per-prefix answer decodes by a few packed passes
    assert results[True].calls["generate"] < results[False].calls["generate"]


def test_score_packed_log_probs_match_plain_forward(tokenizer):
    model = build_tiny_model(tokenizer, seed=5).eval()
    base = tokenizer("Q: 3 + 4\n3 + 4 = 7", add_special_tokens=False)["input_ids"]
    own = tokenizer("\nAnswer: 7", add_special_tokens=False)["input_ids"]
    rows = [PackedRow(base=base, branches=[Branch(key=k, shared=k, own=own, n_answer=2) for k in (4, 9, len(base))])]
    with torch.no_grad():
        got = score_packed(model, rows, pad_id=tokenizer.pad_token_id, max_new_tokens=1, is_finished=None, eos_ids=[])
        for k in (4, 9, len(base)):
            ids = torch.tensor([base[:k] + own])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            expected = sum(float(logprobs[len(ids[0]) - 3 + t, own[-2 + t]]) for t in range(2)) / math.log(2)
            assert got[k] == pytest.approx(expected, abs=1e-4)


def test_models_without_4d_mask_support_fall_back(tokenizer):
    from rule_models import gold_response, make_prompt, make_rule_model

    model, tok = make_rule_model("reads_chain")
    assert not packing_supported(model, tok.pad_token_id)
    prompt = make_prompt("3 + 4 * 5")
    result = run_probe_round(
        model, tok, load_panel([{"prompt": prompt, "completion": gold_response(prompt)}]), FaithConfig()
    )
    assert result.metrics["early_answer/aoc"] == 1.0


@pytest.mark.parametrize("forced", [False, True])
def test_static_shape_decoding_gives_the_eager_records(trained, tokenizer, forced, monkeypatch):
    """The static-shape path of `compile_generation` (static KV cache, batches padded to a fixed
    size and width; compiled on CUDA only) on CPU: same chains, answers and figures as eager
    `generate` decoding, with or without the forced answers going through it too."""
    from faithcb.engine import _engine

    seen = []  # (max_new_tokens, static_shapes) of every generate call
    original = _engine.ProbeEngine.generate

    def generate(self, contexts, **kwargs):
        seen.append((kwargs["max_new_tokens"], kwargs.get("static_shapes", False)))
        return original(self, contexts, **kwargs)

    monkeypatch.setattr(_engine.ProbeEngine, "generate", generate)
    shapes = []  # (rows, prompt width, new tokens) of every static-cache decode (the engine's own loop)
    own_loop = _engine.static_greedy_decode

    caches = []  # the static cache each decode ran in

    def record_shape(model, ids, mask, **kwargs):
        shapes.append((*ids.shape, kwargs["max_new_tokens"]))
        caches.append(kwargs["cache"])
        return own_loop(model, ids, mask, **kwargs)

    monkeypatch.setattr(_engine, "static_greedy_decode", record_shape)
    panel = load_panel(to_sft_dataset(make_arithmetic_examples(6, seed=8)))
    common = {"max_new_tokens": 40, "generation_batch_size": 4, "scoring_batch_size": 8, "prompt_bucket": 16}
    common["packed_scoring"] = False  # every forced answer is decoded by generate
    eager = run_probe_round(  # the baseline decodes in `generate`
        trained,
        tokenizer,
        panel,
        FaithConfig(**common, compile_generation=False),
        engine_options=EngineOptions(static_decode=False),
    )
    assert not shapes
    static_config = FaithConfig(**common, compile_generation=True, compile_forced_answers=forced)
    seen.clear()
    static = run_probe_round(trained, tokenizer, panel, static_config)
    answer_calls = {is_static for budget, is_static in seen if budget == static_config.answer_max_new_tokens}
    assert answer_calls == {forced}  # forced answers took the static path exactly when asked
    assert {is_static for budget, is_static in seen if budget == static_config.max_new_tokens} == {True}
    # chains and regenerated chains share one shape: one compilation per run on CUDA
    chain_shapes = {shape for shape in shapes if shape[2] == static_config.max_new_tokens}
    assert len(chain_shapes) == 1 and len([s for s in shapes if s[2] == static_config.max_new_tokens]) >= 3
    # every decode of a shape runs in one static cache (a CUDA graph reads it at fixed addresses)
    caches_by_shape = {shape: {id(c) for s, c in zip(shapes, caches) if s == shape} for shape in shapes}
    assert all(len(ids) == 1 for ids in caches_by_shape.values()), caches_by_shape
    assert any(r["steps"] for r in eager.records)
    for a, b in zip(eager.records, static.records, strict=True):
        assert_same_record(a, b)
    for key, value in eager.metrics.items():
        if not key.startswith("cost/"):  # what each path pays in tokens
            assert static.metrics[key] == pytest.approx(value, abs=1e-3), key


LONG_PANEL = {"n": 6, "seed": 9, "min_ops": 3, "max_ops": 4}
LONG_ROUND = {"max_new_tokens": 64, "generation_batch_size": 4, "filler_token": " ...."}


@pytest.fixture(scope="module")
def long_chain_model(tokenizer):
    """A tiny Llama that writes 3-4 step chains (long enough for variants the default packing
    skips): pre-trained until every chain of the test's panel is longer than 20 tokens."""
    panel = load_panel(to_sft_dataset(make_arithmetic_examples(**LONG_PANEL)))

    def ready(model):
        records = run_probe_round(model, tokenizer, panel, FaithConfig(**LONG_ROUND, probes=[])).records
        return None if min(r["chain/tokens"] for r in records) > 20 else "chains longer than 20 tokens"

    model = build_tiny_model(tokenizer, seed=4)
    data = make_arithmetic_examples(400, seed=1) + make_arithmetic_examples(400, seed=2, min_ops=3, max_ops=4)
    return pretrain_until(model, tokenizer, data, ready, steps=300, batch_size=16)


def test_long_variants_decode_in_rows_of_their_own_or_within_a_row_budget(long_chain_model, tokenizer, monkeypatch):
    """Long variants (step removals, paraphrases, filler, mistakes) get the packed tree decode in
    rows of their own by default, nested ones (the paraphrased chain cut after each step) as
    branches of one row; `packed_row_max_tokens > 0` packs them into the example's row instead
    while it fits; `compile_forced_answers` (static shapes) keeps them on `generate`. Every
    layout gives the records of separate passes."""
    from faithcb.engine import _engine

    # per round: forced answers left to `generate`, long variants, the rows they took
    unpacked, long_variants, solo = [], [], []
    original_forced, original_rows = _engine.ProbeEngine._forced_answers, _engine.ProbeEngine._long_variant_rows

    def forced_answers(self, chains, requests, texts, continued):
        unpacked[-1] += len(requests)
        return original_forced(self, chains, requests, texts, continued)

    def long_variant_rows(self, variants, draft):
        rows = original_rows(self, variants, draft)
        long_variants[-1] += len(variants)
        solo[-1] += len(rows)
        return rows

    monkeypatch.setattr(_engine.ProbeEngine, "_forced_answers", forced_answers)
    monkeypatch.setattr(_engine.ProbeEngine, "_long_variant_rows", long_variant_rows)

    def run(**overrides):
        unpacked.append(0)
        long_variants.append(0)
        solo.append(0)
        config = FaithConfig(**LONG_ROUND, **overrides)
        result = run_probe_round(long_chain_model, tokenizer, panel, config)
        return result, unpacked[-1], solo[-1]

    panel = load_panel(to_sft_dataset(make_arithmetic_examples(**LONG_PANEL)))
    plain, plain_unpacked, _ = run(packed_scoring=False)
    short, short_unpacked, short_solo = run()
    long, long_unpacked, long_solo = run(packed_row_max_tokens=2048)
    tight, tight_unpacked, tight_solo = run(packed_row_max_tokens=1)
    static, static_unpacked, static_solo = run(compile_generation=True, compile_forced_answers=True)
    no_drafts, _, _ = run(draft_answers=False)
    assert min(r["chain/tokens"] for r in plain.records) > 20
    for result in (short, long, tight, static, no_drafts):
        for a, b in zip(plain.records, result.records, strict=True):
            assert_same_record(a, b)
    short_long, _, tight_long, static_long = long_variants[1:5]
    assert plain_unpacked > short_long > 0 and short_unpacked == 0  # long variants: rows of their own
    assert 0 < short_solo < short_long  # nested ones (paraphrased prefixes) share rows
    assert long_solo == 0 and long_unpacked == 0  # they joined the example rows
    # no room in any row: every one alone
    assert tight_solo == tight_long == plain_unpacked and tight_unpacked == 0
    assert static_solo == static_long == 0 and static_unpacked == short_long  # the compiled decode keeps them
    assert short.calls["generate"] < static.calls["generate"]
    # the answers the model stated after its full chain, checked as drafts, save decode steps
    assert short.calls["decode_steps"] < no_drafts.calls["decode_steps"]


def test_nested_long_variants_share_a_row_and_others_keep_their_own(tokenizer, monkeypatch):
    """Longest first: a long variant whose context is a longer one's base plus a few tokens of its
    own joins that row; one that departs early and goes on for long starts its own row."""
    from faithcb.engine._engine import ProbeEngine
    from faithcb.engine._requests import ForcedAnswer

    engine = ProbeEngine(build_tiny_model(tokenizer), tokenizer, FaithConfig())
    # steps of 32 tokens: past the prompt, no variant is short enough (`_fits`) for another's row
    prompt, cue = [5, 6, 7], [8, 9]
    prefix = [[*prompt, *range(10, 10 + 32 * k), *cue] for k in (1, 2, 3)]  # a chain cut after each step
    other = [*prompt, *range(200, 320), *cue]  # the longest
    contexts = [prefix[0], other, prefix[2], prefix[1]]
    example_row = [*prompt, *range(500, 600)]  # the example's own chain: each departs from it after the prompt
    variants = [(ForcedAnswer(0, f"v{i}"), c, common_prefix(c, example_row)) for i, c in enumerate(contexts)]
    rows = engine._long_variant_rows(variants, draft=[7, 8])
    assert [[b.key.chain_text for b in row.branches] for row in rows] == [["v1"], ["v2", "v3", "v0"]]
    nested = rows[1]
    assert nested.base == prefix[2][:-1]
    for branch, context in zip(nested.branches, [prefix[2], prefix[1], prefix[0]]):
        # the branch's tokens after the base prefix it sees are its context's, then the draft
        assert nested.base[: branch.shared] + branch.own == [*context, 7, 8] and branch.n_draft == 2
    assert [b.shared for b in nested.branches] == [len(prefix[2]) - 1, len(prompt) + 64, len(prompt) + 32]
    # without a row budget's room (`packed_row_max_tokens`), every variant keeps a row of its own
    tight = ProbeEngine(build_tiny_model(tokenizer), tokenizer, FaithConfig(packed_row_max_tokens=1))
    assert [len(row.branches) for row in tight._long_variant_rows(variants, draft=[])] == [1, 1, 1, 1]
    # the benchmark's candidate: a row each
    one_per_row = ProbeEngine(engine.model, tokenizer, engine.config, options=EngineOptions(nest_long_variants=False))
    assert [len(row.branches) for row in one_per_row._long_variant_rows(variants, draft=[])] == [1, 1, 1, 1]


def _naive_long_variant_rows(engine, variants, draft):
    """`_long_variant_rows` without its shortcuts: every row's base scanned for every variant."""
    rows = []
    for request, context, _ in sorted(variants, key=lambda variant: len(variant[1]), reverse=True):
        for row in rows:
            shared = common_prefix(context, row.base)
            branch = Branch(key=request, shared=shared, own=context[shared:])
            if shared and branch.own and engine._fits(row, branch):
                row.branches.append(branch)
                break
        else:
            branch = Branch(key=request, shared=len(context) - 1, own=context[-1:])
            rows.append(PackedRow(base=context[:-1], branches=[branch]))
        branch.own, branch.n_draft = branch.own + draft, len(draft)
    return rows


@pytest.mark.parametrize("steps", [2, 14, 60])
@pytest.mark.parametrize("row_budget", [0, 700])
def test_long_variant_rows_match_a_naive_reference(tokenizer, steps, row_budget):
    """Step removals (each departing from the example's chain at its own step), nested
    paraphrased prefixes and a filler: the rows of `_long_variant_rows`, whose pairs that
    depart from the chain at different tokens skip the scan, are those of scanning every pair."""
    from faithcb.engine._engine import ProbeEngine
    from faithcb.engine._requests import ForcedAnswer

    engine = ProbeEngine(build_tiny_model(tokenizer), tokenizer, FaithConfig(packed_row_max_tokens=row_budget))
    generator = torch.Generator().manual_seed(steps)

    def tokens(n):
        return torch.randint(20, 1000, (n,), generator=generator).tolist()

    prompt, cue = tokens(40), [3, 4]
    chain = [tokens(int(torch.randint(6, 20, (1,), generator=generator))) for _ in range(steps)]
    reworded = [tokens(len(step) + 2) for step in chain]

    def joined(parts):
        return [token for part in parts for token in part]

    example_row = prompt + joined(chain)
    contexts = [prompt + joined(chain[:k] + chain[k + 1 :]) + cue for k in range(steps)]  # step removals
    contexts += [prompt + joined(reworded[:k]) + cue for k in range(1, steps)]  # paraphrased prefixes
    contexts.append(prompt + [5] * len(joined(chain)) + cue)  # filler
    variants = [(ForcedAnswer(0, f"v{i}"), c, common_prefix(c, example_row)) for i, c in enumerate(contexts)]

    def layout(rows):
        return [(row.base, [(b.key, b.shared, b.own, b.n_draft) for b in row.branches]) for row in rows]

    got = engine._long_variant_rows(variants, draft=[7, 8])
    assert layout(got) == layout(_naive_long_variant_rows(engine, variants, [7, 8]))
    assert sum(len(row.branches) for row in got) == len(variants)
    if steps > 2 and row_budget == 0:  # the paraphrased prefixes share one row
        assert len(got) < len(variants) and max(len(row.branches) for row in got) >= steps - 1


def test_common_prefix_matches_a_naive_reference():
    def naive(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    generator = torch.Generator().manual_seed(0)
    for length in (0, 1, 63, 64, 65, 130, 300):
        a = torch.randint(0, 5, (length,), generator=generator).tolist()
        for cut in {0, 1, length // 2, 63, 64, 65, 128, length - 1, length}:
            if 0 <= cut <= length:
                for b in (a[:cut], [*a[:cut], 9, *a[cut + 1 :]], [*a, 1, 2]):
                    assert common_prefix(a, b) == naive(a, b) == common_prefix(b, a)


@pytest.mark.parametrize("draft", ["none", "right", "wrong_second", "wrong_first", "too_long"])
def test_draft_tokens_never_change_a_greedy_answer(tokenizer, monkeypatch, draft):
    """A forced branch's draft is checked in the first pass: accepted tokens skip decode steps,
    and the first departure resumes the plain greedy decode (speculative decoding)."""
    from faithcb.engine import _packed

    model = build_tiny_model(tokenizer, seed=6).eval()
    context = tokenizer("Q: 3 + 4\n3 + 4 = 7\nAnswer:", add_special_tokens=False)["input_ids"]
    calls = []
    original = _packed._forward
    monkeypatch.setattr(_packed, "_forward", lambda *a, **k: calls.append(1) or original(*a, **k))

    def decode(draft_tokens):
        calls.clear()
        branch = Branch(key="k", shared=len(context) - 1, own=context[-1:] + draft_tokens, n_draft=len(draft_tokens))
        with torch.no_grad():
            out = score_packed(
                model,
                [PackedRow(base=context[:-1], branches=[branch])],
                pad_id=tokenizer.pad_token_id,
                max_new_tokens=4,
                is_finished=lambda key, tokens: False,
                eos_ids=[],
            )
        return out["k"], len(calls)

    greedy, plain_calls = decode([])
    assert len(greedy) == 4 and plain_calls == 4  # one prefill + three decode steps
    other = next(t for t in range(5, 50) if t not in greedy)
    drafts = {
        "none": ([], 4),
        "right": (greedy[:3], 1),  # three accepted + the arg-max after them: done in the prefill
        "wrong_second": ([greedy[0], other], 3),  # one accepted, the departure kept, two steps left
        "wrong_first": ([other, greedy[1]], 4),
        "too_long": ([*greedy, other, other], 1),  # never more than max_new_tokens
    }
    tokens, expected_calls = drafts[draft]
    assert decode(tokens) == (greedy, expected_calls)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_rows_of_one_sequence_skip_the_mask_and_give_the_masked_answers(tokenizer, monkeypatch, family):
    """A batch whose rows are each one sequence (long variants in rows of their own) runs with
    the model's causal attention instead of a 4-D mask: right padding keeps every read position
    exact, so answers and log-probs equal those of the masked layout
    (`EngineOptions(causal_single_rows=False)`). A batch with a packed row, or a model with
    sliding-window layers, keeps the mask."""
    from faithcb.engine import _packed
    from faithcb.synthetic import build_family_model

    model = build_family_model(tokenizer, family, sliding_window=4, seed=2).eval()
    texts = ["Q: 3 + 4\n3 + 4 = 7\nAnswer:", "Q: 12 - 5 * 2\n12 - 5 = 7\n7 * 2 = 14\nAnswer:", "Q: 1\nA"]
    answer = tokenizer(" 7", add_special_tokens=False)["input_ids"]

    def rows(packed_row: bool = False) -> list[PackedRow]:
        out = []
        for i, text in enumerate(texts):  # rows of different lengths: padded
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(PackedRow(base=ids[:-1], branches=[Branch(key=i, shared=len(ids) - 1, own=ids[-1:])]))
        full = out[0].base + out[0].branches[0].own  # a teacher-forced answer after a whole context
        out.append(
            PackedRow(base=full, branches=[Branch(key="lp", shared=len(full), own=answer, n_answer=len(answer))])
        )
        if packed_row:  # a second branch departing earlier: this row needs the mask
            out[1].branches.append(Branch(key="early", shared=3, own=out[1].base[3:5]))
        return out

    masks = []
    forward = _packed._forward

    def spy(model, ids, pos, mask, *args, **kwargs):
        masks.append(mask)
        return forward(model, ids, pos, mask, *args, **kwargs)

    monkeypatch.setattr(_packed, "_forward", spy)

    def run(batch, **options):
        masks.clear()
        with torch.no_grad():
            out = score_packed(
                model,
                batch,
                pad_id=tokenizer.pad_token_id,
                max_new_tokens=3,
                is_finished=lambda *_: False,
                eos_ids=[],
                options=EngineOptions(**options),
            )
        return out, masks[0]  # the prefill's mask

    causal, causal_mask = run(rows())
    masked, masked_mask = run(rows(), causal_single_rows=False)
    assert (causal_mask is None) == (family != "mistral") and masked_mask is not None
    assert len(causal) == len(texts) + 1 and all(len(causal[i]) == 3 for i in range(len(texts)))
    assert {k: v for k, v in causal.items() if k != "lp"} == {k: v for k, v in masked.items() if k != "lp"}
    assert causal["lp"] == pytest.approx(masked["lp"], abs=1e-4)
    _, mixed_mask = run(rows(packed_row=True))
    assert mixed_mask is not None


def test_handed_off_stragglers_finish_with_the_tokens_of_one_batch(tokenizer):
    """A batch that stops decoding once at most `hand_off` answers are left gives those
    branches back unfinished; resumed in rows of their own they end with the same tokens."""
    from faithcb.engine._packed import straggler_row

    model = build_tiny_model(tokenizer, seed=7).eval()
    texts = ["Q: 3 + 4\nAnswer:", "Q: 12 - 5\n12 - 5 = 7\nAnswer:", "Q: 2 * 9\nAnswer: 1", "Q: 1\nA"]
    budgets = {i: 2 + 2 * i for i in range(len(texts))}  # answers of 2, 4, 6 and 8 tokens

    def rows():
        out = []
        for i, text in enumerate(texts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(PackedRow(base=ids[:-1], branches=[Branch(key=i, shared=len(ids) - 1, own=ids[-1:])]))
        return out

    def run(batch, hand_off):
        with torch.no_grad():
            return score_packed(
                model,
                batch,
                pad_id=tokenizer.pad_token_id,
                max_new_tokens=8,
                is_finished=lambda key, tokens: len(tokens) >= budgets[key],
                eos_ids=[],
                hand_off=hand_off,
            )

    whole = run(rows(), 0)
    assert [len(whole[i]) for i in range(len(texts))] == [2, 4, 6, 8]
    for hand_off in (1, 2, 4):
        batch = rows()
        first = run(batch, hand_off)
        left = [(row, row.branches[0]) for row in batch if not row.branches[0].done]
        assert len(left) == hand_off and not any(b.key in first for _, b in left)
        second = run([straggler_row(row, branch) for row, branch in left], 0)
        assert {**first, **second} == whole


def test_drafts_spare_every_decode_step_when_the_answer_ignores_the_chain(tokenizer):
    """A model that answers 7 whatever its chain says (the post-hoc regime faithcb watches for):
    every forced answer equals the stated one, so with drafts no variant needs a decode step."""
    panel = load_panel(to_sft_dataset(make_arithmetic_examples(**LONG_PANEL)))
    config = FaithConfig(max_new_tokens=64, generation_batch_size=4)

    def ready(model):  # pre-trained until it answers 7 after every chain and every cut of one
        result = run_probe_round(model, tokenizer, panel, FaithConfig(**{**vars(config), "probes": ["early_answer"]}))
        answers = {r["stated_answer"] for r in result.records} | {
            a for r in result.records for a in r["early_answer/answers"]
        }
        return None if answers == {"7"} else f"the answer 7 everywhere (answers: {sorted(map(str, answers))})"

    data = make_arithmetic_examples(400, seed=1, min_ops=3, max_ops=4)
    data = [{**e, "completion": e["completion"].rsplit("Answer:", 1)[0] + "Answer: 7"} for e in data]
    model = pretrain_until(build_tiny_model(tokenizer, seed=4), tokenizer, data, ready, steps=150, batch_size=16)
    drafted = run_probe_round(model, tokenizer, panel, config)
    plain = run_probe_round(model, tokenizer, panel, FaithConfig(**{**vars(config), "draft_answers": False}))
    assert {r["stated_answer"] for r in drafted.records} == {"7"}
    assert drafted.metrics["early_answer/aoc"] == 0.0  # the chain never changes the answer
    for a, b in zip(plain.records, drafted.records, strict=True):
        assert_same_record(a, b)
    assert drafted.calls["decode_steps"] == 0 < plain.calls["decode_steps"]


def test_layout_mask_matches_a_naive_reference():
    """The device-built mask equals one written out token by token: a base token sees the base
    up to itself, a branch token its shared base prefix and its own tokens up to itself, and
    padding only itself."""
    rng = torch.Generator().manual_seed(0)

    def randint(low, high):
        return int(torch.randint(low, high, (1,), generator=rng))

    rows = []
    for _ in range(4):
        base = [randint(4, 50) for _ in range(randint(3, 12))]
        branches = [
            Branch(key=i, shared=randint(1, len(base) + 1), own=[randint(4, 50) for _ in range(randint(1, 5))])
            for i in range(randint(0, 4))
        ]
        rows.append(PackedRow(base=base, branches=branches))
    ids, pos, mask, spans = _layout(rows, torch.device("cpu"), torch.float32, pad_id=2)
    width = max(row.length for row in rows)
    assert ids.shape == pos.shape == (len(rows), width) and mask.shape == (len(rows), 1, width, width)
    for r, row in enumerate(rows):
        expected = torch.zeros(width, width, dtype=torch.bool)
        tokens, positions = list(row.base), list(range(len(row.base)))
        for t in range(len(row.base)):
            expected[t, : t + 1] = True
        for branch, (start, end) in zip(row.branches, spans[r]):
            assert end - start == len(branch.own)
            tokens += branch.own
            positions += range(branch.shared, branch.shared + len(branch.own))
            for t in range(start, end):
                expected[t, : branch.shared] = True
                expected[t, start : t + 1] = True
        for t in range(len(tokens), width):
            expected[t, t] = True
        assert torch.equal(mask[r, 0] == 0, expected)
        assert ids[r, : len(tokens)].tolist() == tokens and set(ids[r, len(tokens) :].tolist()) <= {2}
        assert pos[r, : len(tokens)].tolist() == positions


def test_packed_passes_leave_cudnn_attention_out_on_cuda_only():

    before = torch.backends.cuda.cudnn_sdp_enabled()
    options = EngineOptions()
    with framework_patches(options, torch.device("cpu"), PACKED_PASS):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with framework_patches(options, torch.device("cuda"), PACKED_PASS):  # sets the dispatch flags; needs no GPU
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_packing_check_logs_why_it_turns_packing_off(tokenizer, caplog):
    model = build_tiny_model(tokenizer, seed=5).eval()

    def broken_forward(*args, **kwargs):
        raise RuntimeError("no 4-D masks here")

    model.forward = broken_forward
    with caplog.at_level(logging.WARNING, logger="faithcb"):
        assert not packing_supported(model, tokenizer.pad_token_id)
    assert "Packed scoring is off" in caplog.text and "no 4-D masks here" in caplog.text


def test_engine_encodes_many_texts_as_it_encodes_each(tokenizer):
    from faithcb.engine._engine import ProbeEngine

    engine = ProbeEngine(build_tiny_model(tokenizer, seed=5), tokenizer, FaithConfig())
    texts = ["Q: 3 + 4\n", tokenizer.bos_token + "Q: 5 * 6\nA:", "", " 12 apples\n"]
    assert engine.encode_many(texts) == [engine.encode(t) for t in texts]
    assert engine.encode_many(texts, continuation=True) == [engine.encode_continuation(t) for t in texts]
    assert engine.encode_many([]) == []


def test_engine_encodes_each_distinct_text_once(tokenizer, monkeypatch):
    """A round asks for many identical contexts; each is tokenized once, and every caller gets
    its own list."""
    from faithcb.engine._engine import ProbeEngine

    engine = ProbeEngine(build_tiny_model(tokenizer, seed=5), tokenizer, FaithConfig())
    texts = ["Q: 3 + 4\n", "Q: 5 * 6\nA:", "Q: 3 + 4\n", tokenizer.bos_token + "Q: 1\n", "Q: 3 + 4\n"]
    want = [engine.encode(t) for t in texts]
    asked: list[str] = []
    encode = type(tokenizer).__call__

    def counting(self, batch, **kwargs):
        asked.extend(batch)
        return encode(self, batch, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    got = engine.encode_many(texts)
    assert got == want
    assert sorted(asked) == sorted(set(texts))
    got[0].append(-1)
    assert got[2] == want[2]


def test_choice_picks_read_on_the_host_agree_with_torch_argmax():
    from faithcb.engine._packed import _group_argmax

    rng = torch.Generator().manual_seed(1)
    sizes = [4, 2, 5, 1, 3]
    # few distinct values, so ties are common: the first maximum wins, as with torch.argmax
    values = torch.randint(0, 3, (sum(sizes),), generator=rng).float()
    expected = [int(group.argmax()) for group in values.split(sizes)]
    assert _group_argmax(values.tolist(), sizes) == expected


def test_static_shape_chain_generation_takes_an_empty_shard(tokenizer):
    """A rank whose panel shard is empty generates no chains on the static-shape path either."""

    engine = ProbeEngine(build_tiny_model(tokenizer, seed=1).eval(), tokenizer, FaithConfig(compile_generation=True))
    assert engine.generate_chains([], []) == []
