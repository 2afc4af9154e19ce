"""What `FaithfulnessCallback` needs from the trainer around it, kept out of the event adapter.

- the tokenizer and the panel fitted to the model's context;
- the callback's place before `EarlyStoppingCallback`;
- the monitor's state in `TrainerState.stateful_callbacks`, which checkpoints carry.

How a round's figures join the trainer's log stream (`log_beside_training`) works around
private parts of transformers and TRL, so it lives with the other framework workarounds in
`faithcb.engine._patches`.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import EarlyStoppingCallback

from ._config import FaithConfig
from .data._panel import PanelError, ProbePanel

logger = logging.getLogger(__name__)

#: Key of the monitors' states in `TrainerState.stateful_callbacks` (a list: one per callback instance).
STATE_KEY = "faithcb"
# Where versions that saved through transformers' `ExportableState` put it (read on resume).
_LEGACY_STATE_KEY = "FaithfulnessCallback"
# Tokens kept free besides the chain and the forced answer: the answer cue and separators.
_CUE_SLACK = 8


# ---------------------------------------------------------------------- tokenizer and panel
def trainer_tokenizer(trainer: Any, processing_class: Any = None) -> Any:
    """The tokenizer of a round: the event's `processing_class`, else the trainer's (a processor's
    inner tokenizer for multimodal processors).

    Raises:
        ValueError: There is none.
    """
    tokenizer = processing_class if processing_class is not None else getattr(trainer, "processing_class", None)
    if tokenizer is not None and not hasattr(tokenizer, "pad_token") and hasattr(tokenizer, "tokenizer"):
        tokenizer = tokenizer.tokenizer
    if tokenizer is None:
        raise ValueError("FaithfulnessCallback needs a tokenizer: pass processing_class=tokenizer to the Trainer.")
    return tokenizer


def fit_panel(panel: ProbePanel, tokenizer: Any, model: Any, config: FaithConfig) -> tuple[ProbePanel, list[str]]:
    """Render every prompt once; drop prompts too long for the model's context (with a warning).

    Returns:
        The panel to run and the ids of the prompts left out.

    Raises:
        PanelError: A prompt that cannot be rendered with this tokenizer; every prompt too long.
        ValueError: `max_new_tokens` leaves no room for any prompt.
    """
    rendered = []
    for example in panel:
        try:
            text = example.render_prompt(
                tokenizer, use_chat_template=config.use_chat_template, prompt_template=config.prompt_template
            )
        except PanelError:
            raise
        except Exception as err:
            raise PanelError(
                f"Panel example {example.id!r} from {panel.source}: its prompt cannot be rendered with the "
                f"trainer's tokenizer ({type(err).__name__}: {err})."
            ) from err
        rendered.append(text)
    limit = context_limit(model, tokenizer)
    if limit is None:
        return panel, []
    room = limit - config.max_new_tokens - config.answer_max_new_tokens - _CUE_SLACK
    if room <= 0:
        raise ValueError(
            f"max_new_tokens ({config.max_new_tokens}) + answer_max_new_tokens "
            f"({config.answer_max_new_tokens}) leave no room for a prompt in the model's {limit}-token "
            "context; lower max_new_tokens."
        )
    keep, skipped, longest = [], [], 0
    for example, text in zip(panel, rendered):
        n_tokens = len(tokenizer(text)["input_ids"])
        if n_tokens > room:
            skipped.append(example.id)
            longest = max(longest, n_tokens)
        else:
            keep.append(example)
    if not skipped:
        return panel, []
    if not keep:
        raise PanelError(
            f"Every prompt of the probe panel from {panel.source} is longer than the {room} tokens that fit "
            f"the model's {limit}-token context beside max_new_tokens={config.max_new_tokens} "
            f"(longest: {longest}); shorten the prompts or lower max_new_tokens."
        )
    logger.warning(
        "faithcb: %d of %d panel prompts are longer than the %d tokens that fit the model's %d-token context "
        "beside a %d-token chain and are skipped (ids %s); rounds log faith/skipped_examples.",
        len(skipped),
        len(panel),
        room,
        limit,
        config.max_new_tokens,
        ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""),
    )
    return ProbePanel(examples=keep, source=panel.source), skipped


def context_limit(model: Any, tokenizer: Any) -> int | None:
    """Longest sequence the model takes (its position limit), or None when unknown."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        try:
            config = config.get_text_config()
        except Exception:
            logger.debug("faithcb: no text config", exc_info=True)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10_000_000:
        return value
    return None


# ---------------------------------------------------------------------- callback order
def place_before_early_stopping(trainer: Any, callback: Any) -> None:
    """Move `callback` before the first EarlyStoppingCallback (safe inside an event loop), so that
    early stopping sees the eval figures it adds in `on_evaluate` (a framework workaround:
    `callback_order` in `faithcb.engine._patches.WORKAROUNDS`)."""
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", None)
    if not callbacks or not any(cb is callback for cb in callbacks):
        return
    mine = next(i for i, cb in enumerate(callbacks) if cb is callback)
    first = next((i for i, cb in enumerate(callbacks) if isinstance(cb, EarlyStoppingCallback)), None)
    if first is not None and first < mine:
        # Moving an element to an earlier index while the handler iterates the list neither
        # skips nor repeats a later callback.
        callbacks.pop(mine)
        callbacks.insert(first, callback)
        logger.info("faithcb: placed FaithfulnessCallback before EarlyStoppingCallback (it adds eval_faith_*).")


# ---------------------------------------------------------------------- checkpointed state
def save_monitor_state(state: Any, slot: int, monitor_state: dict[str, Any]) -> None:
    """Put a monitor's state into `state.stateful_callbacks[STATE_KEY][slot]`.

    transformers writes `stateful_callbacks` into every checkpoint's `trainer_state.json` and
    loads it back on resume. The callback cannot be re-created from JSON (it holds the trainer
    and the panel), so it is no `ExportableState` (transformers would rebuild those from their
    saved arguments): it keeps an entry of its own, updated after every round (its state
    changes nowhere else), and reads it back in `on_train_begin` (`saved_monitor_state`).
    """
    stateful = getattr(state, "stateful_callbacks", None)
    if not isinstance(stateful, dict):
        return
    saved = stateful.get(STATE_KEY)
    slots = list(saved) if isinstance(saved, list) else []
    slots.extend([None] * (slot + 1 - len(slots)))
    slots[slot] = monitor_state
    stateful[STATE_KEY] = slots


def saved_monitor_state(state: Any, slot: int) -> dict[str, Any] | None:
    """The monitor state `save_monitor_state` left in a resumed TrainerState, if any."""
    stateful = getattr(state, "stateful_callbacks", None)
    if not isinstance(stateful, dict):
        return None
    saved = stateful.get(STATE_KEY)
    stored = saved[slot] if isinstance(saved, list) and slot < len(saved) else None
    legacy = stateful.pop(_LEGACY_STATE_KEY, None)  # dropped: later checkpoints carry the new entry only
    if stored is None and isinstance(legacy, dict):
        stored = legacy.get("attributes")
    return stored if isinstance(stored, dict) and "history" in stored else None
