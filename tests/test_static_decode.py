"""The engine's own static-cache greedy loop (`faithcb/engine/_static_decode.py`): the tokens of
transformers' `generate`, host reads every `check_every` steps, and `generate` kept wherever the
loop cannot vouch for that."""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from faithcb import FaithConfig, load_panel, run_probe_round
from faithcb.engine import EngineOptions, ProbeEngine, _patches, _static_decode
from faithcb.engine._packed import _cache_name
from faithcb.engine._static_decode import new_static_cache, static_decode_supported, static_greedy_decode
from faithcb.engine._text_stop import TextStop
from faithcb.synthetic import build_tiny_model, make_arithmetic_examples, pretrain_tiny_model, to_sft_dataset


@pytest.fixture(scope="module", params=[("llama", "sdpa"), ("qwen2", "eager"), ("gpt2", "sdpa"), ("gpt2", "eager")])
def trained(request, tokenizer):
    arch, attention = request.param
    model = build_tiny_model(tokenizer, arch=arch, seed=3, attn_implementation=attention)
    pretrain_tiny_model(model, tokenizer, make_arithmetic_examples(600, seed=1), steps=100, batch_size=32)
    return model.eval()


def tiny_qwen2(tokenizer, **overrides) -> Qwen2ForCausalLM:
    """A tiny random Qwen2 (2 layers, 4 query heads on 2 key/value heads) with `overrides` on
    its config (`build_tiny_model` has no grouped-query or sliding-window layers)."""
    config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**{**config, **overrides})).eval()


def contexts(n: int = 7) -> list[str]:
    """Prompts of different lengths (left padding differs per row), some cut mid-chain."""
    examples = make_arithmetic_examples(n, seed=5)
    return [e["prompt"] + e["completion"][: 3 * i] for i, e in enumerate(examples)]


@pytest.mark.parametrize("static_shapes", [True, False])
@pytest.mark.parametrize("finished", [None, "cue"])
def test_own_loop_gives_the_tokens_of_generate(trained, tokenizer, monkeypatch, finished, static_shapes):
    """Same texts and token counts as `generate`: rows that end with EOS, rows cut by a text
    condition, rows that run to the budget, and padding rows (static-shape path); off that path
    each batch decodes eagerly in a cache of its own shape."""
    condition = (lambda i, text: "Answer" in text) if finished else None
    engine = ProbeEngine(trained, tokenizer, FaithConfig(generation_batch_size=4, compile_generation=static_shapes))
    assert engine._own_decode_loop()
    calls = []  # (batch shape, cache passed in, compiled) of every own-loop decode
    original = _static_decode.static_greedy_decode

    def counted(model, ids, mask, **kwargs):
        calls.append((tuple(ids.shape), kwargs["cache"], kwargs["compiled"]))
        return original(model, ids, mask, **kwargs)

    monkeypatch.setattr("faithcb.engine._engine.static_greedy_decode", counted)
    kwargs = {"max_new_tokens": 48, "static_shapes": static_shapes, "min_width": 48 if static_shapes else 0}
    kwargs["finished"] = condition
    with torch.no_grad():
        own = engine.generate(contexts(), **kwargs)
        assert len(calls) == 2  # 7 contexts in batches of 4
        engine = ProbeEngine(engine.model, tokenizer, engine.config, options=EngineOptions(static_decode=False))
        assert not engine._own_decode_loop()
        reference = engine.generate(contexts(), **kwargs)
    assert len(calls) == 2
    assert own == reference
    assert len({n for _, n in own}) > 1  # rows end at different steps
    assert not any(compiled for _, _, compiled in calls)  # compiled on CUDA only
    if static_shapes:  # one padded shape, one cache kept for the round
        assert calls[0][:2] == calls[1][:2] and calls[0][1] is not None
    else:  # the batches' own shapes (3 rows last), a new cache each
        assert [shape[0] for shape, _, _ in calls] == [4, 3]
        assert [cache for _, cache, _ in calls] == [None, None]


@pytest.mark.parametrize("check_every", [1, 3, 4])
def test_reads_every_check_every_steps_and_stops_at_the_first_read_that_finds_every_row_ended(
    trained, tokenizer, check_every
):
    """Rows that meet their condition after 5 and 6 tokens: the loop runs up to the first read at
    or after step 6 and reads nothing in between; `stop_at` is exact whatever the interval."""
    reads = []
    needed = {0: 5, 1: 6}

    def decode(tokens):
        reads.append(len(tokens))
        return "x" * len(tokens)

    stop = TextStop(lambda row, text: len(text) >= needed[row], decode, prompt_width=0, rows=2, check_every=check_every)
    engine = ProbeEngine(trained, tokenizer, FaithConfig())
    ids, mask = engine._left_pad([engine.encode(c) for c in contexts(2)])
    with torch.no_grad():
        new = static_greedy_decode(
            trained, ids, mask, max_new_tokens=40, eos_ids=[], pad_id=0, stop=stop, check_every=check_every
        )
    steps = -(-6 // check_every) * check_every
    assert [len(row) for row in new] == [steps, steps]
    assert stop.stop_at == needed
    # whole-row reads happen only at multiples of check_every (shorter ones search for the cut)
    assert {n for n in reads if n % check_every == 0} >= set(range(check_every, steps + 1, check_every))
    assert max(reads) == steps


@pytest.mark.parametrize("needed", [{0: 5, 1: 6}, {}])
@pytest.mark.parametrize("check_every", [1, 3, 4])
def test_deferred_reads_check_the_same_reads_and_give_the_same_rows(trained, tokenizer, check_every, needed):
    """Reads checked one interval late (the CUDA default, forced here on CPU): the same reads in
    the same order, the same rows and cuts; a batch whose rows have all ended runs exactly one
    interval more on the device, one that runs to the budget no step more. Off CUDA the reads
    are waited for by default."""
    engine = ProbeEngine(trained, tokenizer, FaithConfig())
    ids, mask = engine._left_pad([engine.encode(c) for c in contexts(2)])
    runs = {}
    for defer in (False, True, None):
        reads, forwards = [], []

        def decode(tokens, reads=reads):
            reads.append(len(tokens))
            return "x" * len(tokens)

        def met(row, text):
            return row in needed and len(text) >= needed[row]

        stop = TextStop(met, decode, prompt_width=0, rows=2, check_every=check_every)
        hook = trained.register_forward_hook(lambda *args, forwards=forwards: forwards.append(1))
        try:
            with torch.no_grad():
                new = static_greedy_decode(
                    trained,
                    ids,
                    mask,
                    max_new_tokens=40,
                    eos_ids=[],
                    pad_id=0,
                    stop=stop,
                    check_every=check_every,
                    defer_reads=defer,
                )
        finally:
            hook.remove()
        runs[defer] = (new, dict(stop.stop_at), reads, len(forwards))
    waited, deferred, default = runs[False], runs[True], runs[None]
    assert deferred[:3] == waited[:3] and default == waited
    assert deferred[1] == needed
    extra = check_every if needed else 0
    assert deferred[3] == waited[3] + extra


def test_a_row_writes_padding_after_its_eos_as_in_generate(trained, tokenizer):
    engine = ProbeEngine(trained, tokenizer, FaithConfig())
    ids, mask = engine._left_pad([engine.encode(c) for c in contexts(3)])
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        new = static_greedy_decode(trained, ids, mask, max_new_tokens=64, eos_ids=[eos], pad_id=tokenizer.pad_token_id)
    ended = [row for row in new if eos in row]
    assert ended, "the trained model ends some chains within 64 tokens"
    for row in ended:
        assert set(row[row.index(eos) + 1 :]) <= {tokenizer.pad_token_id}
    if all(eos in row for row in new):  # the read after every step stops at the last row's EOS
        assert len(new[0]) == max(row.index(eos) + 1 for row in new)
    else:
        assert len(new[0]) == 64


def test_zero_budget_writes_nothing(trained, tokenizer):
    engine = ProbeEngine(trained, tokenizer, FaithConfig())
    ids, mask = engine._left_pad([engine.encode(c) for c in contexts(2)])
    assert static_greedy_decode(trained, ids, mask, max_new_tokens=0, eos_ids=[], pad_id=0) == [[], []]


def test_generate_is_kept_where_the_loop_cannot_vouch_for_its_tokens(tokenizer, monkeypatch):
    model = build_tiny_model(tokenizer, seed=1)
    assert static_decode_supported(model)
    model.generation_config.suppress_tokens = [5]  # a logits processor the loop does not run
    assert not static_decode_supported(model)
    model.generation_config.suppress_tokens = None
    sliding = tiny_qwen2(tokenizer, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    assert not static_decode_supported(sliding)  # sliding-window layers keep their own masks
    with monkeypatch.context() as patch:  # a transformers release with other static cache layers
        patch.setattr(_static_decode, "StaticLayer", type("OtherLayer", (), {}))
        assert not static_decode_supported(model)
    config = FaithConfig(compile_generation=True)
    assert ProbeEngine(model, tokenizer, config)._own_decode_loop()
    sampled = FaithConfig(compile_generation=True, do_sample=True)
    assert not ProbeEngine(model, tokenizer, sampled)._own_decode_loop()
    # sharded weights (ZeRO-3 / FSDP across ranks): every rank must step with the others
    monkeypatch.setattr("faithcb.engine._engine._synced_decoding", lambda model: True)
    assert not ProbeEngine(model, tokenizer, config)._own_decode_loop()
    assert ProbeEngine(model, tokenizer, config, weights_gathered=True)._own_decode_loop()


class _Wrapper(torch.nn.Module):
    """A wrapper that holds the model as `module` (FSDP1's root and DDP do): its forward and
    `generate` reach the model inside."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def test_the_loop_runs_the_transformers_model_inside_a_wrapper(tokenizer, monkeypatch):
    """`Trainer` hands an FSDP1 root to callbacks; the loop calls the model under it (its units'
    forwards are local while a round holds the full weights), unless the wrapper shards it and
    the weights are not gathered. A model that is not a transformers model is left to its own
    `generate` instead of failing the round."""
    model = build_tiny_model(tokenizer, seed=1)
    root = _Wrapper(_Wrapper(model))
    engine = ProbeEngine(root, tokenizer, FaithConfig())
    assert engine._decode_model() is model and engine._own_decode_loop()
    with monkeypatch.context() as patch:  # the root is the sharded one (FSDP1), not the model in it
        patch.setattr("faithcb.engine._engine._synced_decoding", lambda module: module is root)
        assert not engine._own_decode_loop()
        assert ProbeEngine(root, tokenizer, FaithConfig(), weights_gathered=True)._own_decode_loop()
    foreign = ProbeEngine(_Wrapper(torch.nn.Linear(2, 2)), tokenizer, FaithConfig())
    assert foreign._decode_model() is None and not foreign._own_decode_loop()


def test_wrapped_models_get_the_kv_cache_under_the_name_their_model_takes(tokenizer):
    """A PEFT model or an FSDP1-style root forwards `**kwargs`, which hides the name of the KV
    cache argument: the engine's passes read it off the model inside (`cache` in transformers
    5.x; `past_key_values` warns there and goes in 5.40), so a LoRA model's round passes the
    cache without the deprecation warning."""
    peft = pytest.importorskip("peft")
    model = build_tiny_model(tokenizer, seed=1)
    name = _cache_name(model)
    assert name in inspect.signature(model.forward).parameters
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).eval()
    assert _cache_name(lora) == _cache_name(_Wrapper(model)) == _cache_name(_Wrapper(lora)) == name
    panel = load_panel(to_sft_dataset(make_arithmetic_examples(3, seed=2)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_probe_round(lora, tokenizer, panel, FaithConfig(max_new_tokens=24))
    assert result.calls["forward"] > 0  # packed passes ran
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_the_kv_cache_name_is_read_once_per_forward_function(tokenizer, monkeypatch):
    from faithcb.engine import _model_layout

    model = build_tiny_model(tokenizer, seed=1)
    name = _cache_name(model)
    looked_up = []
    real_signature = inspect.signature

    def signature(function):
        looked_up.append(function)
        return real_signature(function)

    monkeypatch.setattr(_model_layout.inspect, "signature", signature)
    assert _cache_name(model) == _cache_name(build_tiny_model(tokenizer, seed=2)) == name
    assert looked_up == []  # the class's forward was looked up before
    # a forward of the instance's own (accelerate wraps `model.forward` so) is looked up once
    model.forward = functools.wraps(model.forward)(lambda *args, **kwargs: None)
    assert _cache_name(model) == _cache_name(model) == name and len(looked_up) == 1


def test_lora_models_decode_in_the_loop_through_their_base_model(tokenizer, monkeypatch):
    """A LoRA-wrapped model runs the loop on its base model (whose layers hold the adapters),
    with the tokens of `PeftModel.generate`; prompt-learning adapters keep `generate`."""
    peft = pytest.importorskip("peft")
    base = build_tiny_model(tokenizer, seed=3)
    pretrain_tiny_model(base, tokenizer, make_arithmetic_examples(300, seed=1), steps=60, batch_size=32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config).eval()
    engine = ProbeEngine(model, tokenizer, FaithConfig(generation_batch_size=4, compile_generation=True))
    assert engine._own_decode_loop() and engine._decode_model() is model.get_base_model()
    kwargs = {"max_new_tokens": 40, "static_shapes": True, "min_width": 48}
    with torch.no_grad():
        own = engine.generate(contexts(), **kwargs)
        with model.disable_adapter():
            without_adapters = engine.generate(contexts(), **kwargs)
        engine = ProbeEngine(model, tokenizer, engine.config, options=EngineOptions(static_decode=False))
        reference = engine.generate(contexts(), **kwargs)
    assert own == reference
    assert own != without_adapters  # the adapters took part
    prompt_tuning = peft.get_peft_model(
        build_tiny_model(tokenizer, seed=3), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    assert ProbeEngine(prompt_tuning, tokenizer, FaithConfig(compile_generation=True))._decode_model() is None


def test_a_decode_step_that_fails_to_compile_falls_back_to_eager_decoding(trained, tokenizer, monkeypatch, caplog):
    """Where compiling fails (no working Triton, say), the batch and every later one decode
    eagerly, with the same tokens, and the failure is logged once: slower rounds, not failed ones."""
    from torch._dynamo.exc import TorchDynamoException

    class CompileFailed(TorchDynamoException):  # as BackendCompilerFailed, whose signature varies by torch release
        pass

    from faithcb.engine import _engine

    monkeypatch.setattr(_engine, "_COMPILE_FAILED", weakref.WeakSet())  # the fixture's model is shared
    attempts = []

    def failing_compiled_call(*args, **kwargs):
        def step(**inputs):
            attempts.append(1)
            raise CompileFailed("backend='inductor' raised: Cannot find a working triton installation")

        return step

    engine = ProbeEngine(trained, tokenizer, FaithConfig(generation_batch_size=4, compile_generation=True))
    kwargs = {"max_new_tokens": 24, "static_shapes": True, "min_width": 48, "finished": lambda i, text: "=" in text}
    with torch.no_grad():
        eager = engine.generate(contexts(), **kwargs)
        monkeypatch.setattr(type(trained), "get_compiled_call", failing_compiled_call)
        monkeypatch.setattr(ProbeEngine, "_compiles", lambda self: self._decode_model() not in _engine._COMPILE_FAILED)
        with caplog.at_level("WARNING", logger="faithcb.engine._engine"):
            fallen_back = engine.generate(contexts(), **kwargs)
    assert fallen_back == eager
    assert len(attempts) == 1  # the second batch did not try again
    assert len([r for r in caplog.records if "compiling the decode step failed" in r.message]) == 1
    assert "CompileFailed" in caplog.text and "triton" in caplog.text


def gqa_model(tokenizer) -> Qwen2ForCausalLM:
    """A tiny grouped-query model: 4 query heads on 2 key/value heads, SDPA attention."""
    return tiny_qwen2(tokenizer, attn_implementation="sdpa")


def test_compiled_steps_of_a_gqa_model_attend_on_its_key_value_heads(tokenizer, monkeypatch):
    """A compiled decode step traces transformers' single-query GQA branch (no key/value head is
    copied per query head: two `expand`s fewer per layer) and gives `generate`'s tokens; the
    graph guards on the swapped check, so a compiled call without it (`gqa_on_kv_heads` off, or
    transformers' own `generate`) traces the repeating graph of its own."""
    from transformers import CompileConfig
    from transformers.integrations import sdpa_attention

    model = gqa_model(tokenizer)
    expands = []

    def recording_backend(graph_module, example_inputs):
        expands.append(sum(n.op == "call_method" and n.target == "expand" for n in graph_module.graph.nodes))
        return graph_module.forward

    model.generation_config.compile_config = CompileConfig(backend=recording_backend, mode=None)
    engine = ProbeEngine(model, tokenizer, FaithConfig())
    ids, mask = engine._left_pad(engine.encode_many(contexts(4)), width=64)
    check = sdpa_attention.is_torchdynamo_compiling
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        for on_kv_heads in (True, False, True):
            options = EngineOptions(gqa_on_kv_heads=on_kv_heads)
            got = static_greedy_decode(
                model, ids, mask, max_new_tokens=10, eos_ids=[], pad_id=0, compiled=True, options=options
            )
            assert got == want[:, ids.shape[1] :].tolist()
            assert sdpa_attention.is_torchdynamo_compiling is check
    # one graph per setting, each reused; the repeating one copies keys and values in every layer
    assert expands == [0, 2 * model.config.num_hidden_layers]


def test_the_gqa_patch_is_scoped_and_a_no_op_where_it_could_change_more_than_that_branch(monkeypatch):
    """The check is swapped only inside the block; another user of it in that module (or no
    `pack_gqa`, as in older transformers) leaves transformers untouched."""
    from transformers.integrations import sdpa_attention

    assert _patches.gqa_branch_is_patchable(sdpa_attention)
    check = sdpa_attention.is_torchdynamo_compiling
    with _patches.gqa_on_kv_heads():
        assert sdpa_attention.is_torchdynamo_compiling is not check
    assert sdpa_attention.is_torchdynamo_compiling is check

    def other_user():  # reads the check as a global, as a function of that module would
        return is_torchdynamo_compiling()  # noqa: F821

    monkeypatch.setattr(sdpa_attention, "other_user", other_user, raising=False)
    assert not _patches.gqa_branch_is_patchable(sdpa_attention)
    with _patches.gqa_on_kv_heads():
        assert sdpa_attention.is_torchdynamo_compiling is check
    monkeypatch.delattr(sdpa_attention, "other_user")
    monkeypatch.delattr(sdpa_attention, "pack_gqa")
    assert not _patches.gqa_branch_is_patchable(sdpa_attention)


def test_compiled_steps_after_a_batchs_first_skip_the_guards_that_held_there(tokenizer, monkeypatch):
    """Every guard is checked at a batch's first compiled step (a new cache, maybe new settings);
    the later steps of the batch pass the same kind of inputs and check only what tells cached
    graphs apart; the user's stance is back after the loop, and left alone if it is their own."""
    from torch._dynamo import eval_frame
    from transformers import CompileConfig

    model = gqa_model(tokenizer)
    model.generation_config.compile_config = CompileConfig(backend="eager", mode=None)
    compiled_call = model.get_compiled_call(model.generation_config.compile_config)
    skipping = []

    def recording_call(**inputs):
        skipping.append(eval_frame._stance.skip_guard_eval_unsafe)
        return compiled_call(**inputs)

    monkeypatch.setattr(model, "get_compiled_call", lambda config: recording_call)
    engine = ProbeEngine(model, tokenizer, FaithConfig())
    ids, mask = engine._left_pad(engine.encode_many(contexts(4)), width=64)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        for _ in range(2):  # two batches: each starts with every guard checked
            got = static_greedy_decode(model, ids, mask, max_new_tokens=6, eos_ids=[], pad_id=0, compiled=True)
            assert got == want[:, ids.shape[1] :].tolist()
        assert skipping == [False, True, True, True, True] * 2
        assert not eval_frame._stance.skip_guard_eval_unsafe
        skipping.clear()
        with torch.compiler.set_stance("eager_on_recompile"):  # a stance of the user's own
            static_greedy_decode(model, ids, mask, max_new_tokens=6, eos_ids=[], pad_id=0, compiled=True)
            assert eval_frame._stance.stance == "eager_on_recompile"
        assert skipping == [False] * 5
        skipping.clear()
        options = EngineOptions(skip_repeated_guards=False)
        static_greedy_decode(model, ids, mask, max_new_tokens=6, eos_ids=[], pad_id=0, compiled=True, options=options)
        assert skipping == [False] * 5


def test_batches_decode_again_in_one_reset_cache_with_the_tokens_of_a_new_one(trained, tokenizer):
    """A cache reused across batches is reset in place (its tensors keep their addresses, which
    is what a compiled step's CUDA graph reads) and gives the tokens of a fresh cache; a cache of
    another length or batch size is refused."""
    engine = ProbeEngine(trained, tokenizer, FaithConfig())
    batches = [engine._left_pad(engine.encode_many(contexts(7)[i : i + 3]), width=48) for i in (0, 3, 4)]
    kwargs = {"max_new_tokens": 12, "eos_ids": engine._eos_ids(), "pad_id": tokenizer.pad_token_id}
    cache = new_static_cache(trained, 48 + 12)
    with torch.no_grad():
        fresh = [static_greedy_decode(trained, ids, mask, **kwargs) for ids, mask in batches]
        reused = [static_greedy_decode(trained, ids, mask, cache=cache, **kwargs) for ids, mask in batches[:1]]
        addresses = [layer.keys.data_ptr() for layer in cache.layers]
        reused += [static_greedy_decode(trained, ids, mask, cache=cache, **kwargs) for ids, mask in batches[1:]]
        assert [layer.keys.data_ptr() for layer in cache.layers] == addresses
        assert reused == fresh
        ids, mask = batches[0]
        with pytest.raises(ValueError, match="holds 60 positions; this decode needs 61"):
            static_greedy_decode(trained, ids, mask, cache=cache, **{**kwargs, "max_new_tokens": 13})
        with pytest.raises(ValueError, match="sized for batches of 3 rows; this one has 2"):
            static_greedy_decode(trained, ids[:2], mask[:2], cache=cache, **kwargs)


def test_a_rounds_decode_cache_lives_until_its_last_regeneration(trained, tokenizer, monkeypatch):
    """Phase 1 (the full chains' answers) keeps the cache for phase 2's regenerations, which
    free it before the scoring passes (they get its memory)."""
    held = []  # caches alive at each packed scoring call
    packed = ProbeEngine._packed

    def spy(self, *args, **kwargs):
        held.append(len(self._decode_caches))
        return packed(self, *args, **kwargs)

    monkeypatch.setattr(ProbeEngine, "_packed", spy)
    panel = load_panel(to_sft_dataset(make_arithmetic_examples(4, seed=8)))
    with torch.no_grad():
        run_probe_round(trained, tokenizer, panel, FaithConfig(max_new_tokens=24, compile_generation=True))
    assert held == [1, 0]
