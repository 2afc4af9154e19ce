"""Every framework workaround is registered, and what each relies on holds in the installed releases.

`faithcb.engine._patches.WORKAROUNDS` lists each change faithcb makes that no public API covers.
Each has a check here of what it relies on in transformers, torch, accelerate or TRL: an upgrade
that takes it away fails its check (then look at the workaround and the release it was checked
against) instead of silently changing a round or the trainer's logs.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from faithcb.engine._patches import WORKAROUNDS, gqa_branch_is_patchable


def gqa_on_kv_heads() -> None:
    from transformers.integrations import sdpa_attention

    assert gqa_branch_is_patchable(sdpa_attention)


def skip_repeated_guards() -> None:
    from torch._dynamo import eval_frame

    assert "skip_guard_eval_unsafe" in inspect.signature(torch.compiler.set_stance).parameters
    stance = eval_frame._stance
    assert (stance.stance, stance.backend, stance.skip_guard_eval_unsafe) == ("default", None, False)


def deferred_stop_checks() -> None:
    from transformers.generation import utils as generation_utils

    is_supported = vars(generation_utils.DeferredStopCheck)["is_supported"]
    assert isinstance(is_supported, staticmethod)
    assert next(iter(inspect.signature(is_supported.__func__).parameters)) == "device"
    assert not generation_utils.DeferredStopCheck.is_supported(torch.device("cuda"), None, False, False)
    assert generation_utils.DeferredStopCheck.is_supported(torch.device("mps"), None, False, False)


def trainer_autocast_off() -> None:
    from accelerate import Accelerator
    from accelerate.utils import operations

    assert isinstance(operations.ConvertOutputsToFp32, type)
    wrapper = operations.convert_outputs_to_fp32(lambda: None)
    assert isinstance(wrapper, operations.ConvertOutputsToFp32) or isinstance(
        getattr(wrapper, "__wrapped__", None), operations.ConvertOutputsToFp32
    )
    source = inspect.getsource(Accelerator.prepare_model)
    assert "model._original_forward = model.forward" in source and "convert_outputs_to_fp32(" in source


def trl_running_metrics() -> None:
    trl = pytest.importorskip("trl")
    for trainer_type in (trl.SFTTrainer, trl.GRPOTrainer):
        init, log = inspect.getsource(trainer_type.__init__), inspect.getsource(trainer_type.log)
        assert 'self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}' in init, trainer_type
        assert "self._metrics[mode].items()" in log and "self._metrics[mode].clear()" in log, trainer_type


def round_log_callbacks() -> None:
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler

    handler = CallbackHandler([TrainerCallback], None, None, None, None)
    assert isinstance(handler.callbacks, list)
    assert "for callback in self.callbacks:" in inspect.getsource(CallbackHandler.call_event)


def round_log_should_log() -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import CallbackHandler

    handler = CallbackHandler([], None, None, None, None)
    control = TrainerControl(should_log=True)
    handler.on_log(TrainingArguments(output_dir="unused", report_to=[]), TrainerState(), control, logs={})
    assert control.should_log is False


def callback_order() -> None:
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler

    seen = []

    class Recorder(TrainerCallback):
        def __init__(self, name: str, move_first: bool = False) -> None:
            self.name, self.move_first = name, move_first

        def on_log(self, args, state, control, **kwargs):
            seen.append(self.name)
            if self.move_first:  # what place_before_early_stopping does inside an event
                handler.callbacks.remove(self)
                handler.callbacks.insert(0, self)

    handler = CallbackHandler(
        [Recorder("a"), Recorder("b"), Recorder("c", move_first=True), Recorder("d")], *[None] * 4
    )
    handler.callbacks = [cb for cb in handler.callbacks if isinstance(cb, Recorder)]  # without the default printer
    handler.call_event("on_log", None, None, None)
    assert seen == ["a", "b", "c", "d"]
    assert "for callback in self.callbacks:" in inspect.getsource(CallbackHandler.call_event)


CHECKS = {
    check.__name__: check
    for check in (
        gqa_on_kv_heads,
        skip_repeated_guards,
        deferred_stop_checks,
        trainer_autocast_off,
        trl_running_metrics,
        round_log_callbacks,
        round_log_should_log,
        callback_order,
    )
}


def test_every_workaround_is_registered_once_with_its_release_and_function():
    names = [w.name for w in WORKAROUNDS]
    assert len(set(names)) == len(names)
    assert set(names) == set(CHECKS), "every registered workaround needs a check here (and only those)"
    for workaround in WORKAROUNDS:
        assert workaround.framework in {"transformers", "torch", "accelerate", "TRL"}, workaround
        assert all(part.isdigit() for part in workaround.checked_against.split(".")), workaround
        module, _, function = workaround.where.rpartition(".")
        assert callable(getattr(importlib.import_module(module), function)), workaround.where
        assert workaround.relies_on, workaround


@pytest.mark.parametrize("name", [w.name for w in WORKAROUNDS])
def test_what_each_workaround_relies_on_holds_in_the_installed_release(name):
    CHECKS[name]()
