"""The engine's switches (`EngineOptions`) and the one place its framework patches are applied
and undone (`framework_patches`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import HfArgumentParser
from transformers.generation import utils as generation_utils
from transformers.integrations import sdpa_attention

from faithcb import FaithConfig
from faithcb.engine import EngineOptions, ProbeEngine
from faithcb.engine._patches import (
    COMPILED_DECODE,
    GENERATE,
    PACKED_PASS,
    REPEATED_DECODE_STEP,
    framework_patches,
)
from faithcb.synthetic import build_tiny_model


def test_options_are_frozen_documented_and_parse_from_a_command_line():
    options = EngineOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.static_decode = False
    assert all(f.metadata.get("help") for f in dataclasses.fields(EngineOptions))
    (parsed,) = HfArgumentParser(EngineOptions).parse_args_into_dataclasses(
        ["--static_decode", "false", "--text_check_every", "1", "--packed_sdpa_backends", "MATH", "FLASH_ATTENTION"]
    )
    assert parsed == EngineOptions(
        static_decode=False, text_check_every=1, packed_sdpa_backends=["MATH", "FLASH_ATTENTION"]
    )
    assert parsed.packed_sdpa_backends == ("MATH", "FLASH_ATTENTION")  # kept immutable
    assert HfArgumentParser(EngineOptions).parse_args_into_dataclasses([])[0] == options
    assert hash(parsed) != hash(options)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text_check_every": 0}, "text_check_every must be >= 1, got 0"),
        ({"text_check_every": True}, "text_check_every must be an integer"),
        ({"packed_mask_elements": 0}, "packed_mask_elements must be positive"),
        ({"packed_sdpa_backends": "MATH"}, "packed_sdpa_backends must be a list of SDPBackend names"),
        ({"packed_sdpa_backends": ["CUDNN"]}, r"unknown SDPBackend \['CUDNN'\]; known: MATH"),
    ],
)
def test_bad_options_are_refused_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineOptions(**kwargs)


def test_the_engine_takes_its_options_and_defaults_to_the_fast_path(tokenizer):
    model = build_tiny_model(tokenizer)
    assert ProbeEngine(model, tokenizer, FaithConfig()).options == EngineOptions()
    engine = ProbeEngine(model, tokenizer, FaithConfig(), options=EngineOptions(static_decode=False))
    assert not engine._own_decode_loop()
    assert ProbeEngine(model, tokenizer, FaithConfig())._own_decode_loop()


def framework_state() -> tuple:
    from torch._dynamo import eval_frame

    return (
        sdpa_attention.is_torchdynamo_compiling,
        vars(generation_utils.DeferredStopCheck)["is_supported"],
        eval_frame._stance.skip_guard_eval_unsafe,
        torch.backends.cuda.cudnn_sdp_enabled(),
    )


ALL_USES = (COMPILED_DECODE, REPEATED_DECODE_STEP, GENERATE, PACKED_PASS)


def test_framework_patches_apply_every_change_inside_the_block_and_undo_them_all():
    before = framework_state()
    cuda = torch.device("cuda")  # the patches only set flags and functions: no GPU needed
    with framework_patches(EngineOptions(), cuda, *ALL_USES):
        inside = framework_state()
        assert generation_utils.DeferredStopCheck.is_supported(cuda, None, False, False)
    assert all(a is not b and a != b for a, b in zip(inside, before))  # each of the four changed
    assert framework_state() == before
    with pytest.raises(RuntimeError, match="boom"), framework_patches(EngineOptions(), cuda, *ALL_USES):
        raise RuntimeError("boom")
    assert framework_state() == before  # undone on an exception too


def test_framework_patches_leave_everything_alone_when_switched_off_or_off_cuda():
    before = framework_state()
    off = EngineOptions(
        gqa_on_kv_heads=False, skip_repeated_guards=False, defer_stop_checks=False, packed_sdpa_backends=None
    )
    with framework_patches(off, torch.device("cuda"), *ALL_USES):
        assert framework_state() == before
    cpu = torch.device("cpu")
    with framework_patches(EngineOptions(), cpu, GENERATE, PACKED_PASS):
        assert framework_state() == before
    with pytest.raises(ValueError, match="Unknown framework patch"), framework_patches(EngineOptions(), cpu, "sdpa"):
        pass


def test_engine_settings_are_the_faithconfig_fields_the_engine_reads():
    """The engine takes its own settings object; each of its fields is the `FaithConfig` field of that name."""
    from dataclasses import fields

    from faithcb.engine import EngineSettings

    config = FaithConfig(max_new_tokens=7, answer_cues=["Result:"], compile_generation=False)
    settings = EngineSettings.from_config(config)
    assert {f.name for f in fields(EngineSettings)} <= {f.name for f in fields(FaithConfig)}
    assert (settings.max_new_tokens, settings.answer_cues, settings.compile_generation) == (7, ["Result:"], False)
