"""`FaithfulnessCallback`: the live monitor that rides along a `Trainer` / `SFTTrainer` run."""

from __future__ import annotations

import gc
import logging
import math
import re
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import EarlyStoppingCallback, TrainerCallback
from transformers.trainer_callback import ExportableState

from ._config import FaithConfig
from ._errors import RoundBudgetExceeded
from ._panel import PanelError, ProbePanel, panel_from
from ._round import RoundResult, build_probes, merged_cost, run_probe_round, warn_on_selfcheck
from ._sinks import JsonlSink, early_answer_curve, log_wandb_round, round_line
from ._stopping import (
    DRIFT_SKIP,
    StopMonitor,
    StopRule,
    broadcast_from_main,
    format_event,
    metric_names,
    validate_rules,
)
from ._validity import invalid_reasons, invalid_warning
from .probes import Probe

logger = logging.getLogger(__name__)
#: Logger of the one console line per round.
CONSOLE_LOGGER = "faithcb.rounds"

# Tokens kept free besides the chain and the forced answer: the answer cue and separators.
_CUE_SLACK = 8
# The attributes `state()` saves and `load_state()` / transformers' restore put back.
_STATE_ATTRIBUTES = ("baseline", "baseline_step", "history", "curves", "last_round_step", "stopping", "stop_events")


class FaithfulnessCallback(TrainerCallback, ExportableState):
    """Measures chain-of-thought faithfulness of the live model every N steps.

    A round lets the model reason on a fixed panel of held-out prompts, perturbs the chains
    (early answering, filler, ...), and logs `faith/...` figures through `trainer.log`, so
    they reach `log_history`, TensorBoard and every other `report_to` integration beside the
    loss, at the training step; with W&B, the round goes to the run directly, in sections of
    its own (`faith/` headline figures, `faith_drift/`, `faith_detail/`, `faith_interval/`).
    Each round also writes one line to the console (`faithcb.rounds` logger). Per-example
    records go to `<output_dir>/faithcb/rounds.jsonl`. A round runs in eval mode without gradients and then
    restores the training state exactly; an error inside a round (out-of-memory included) is
    logged and training goes on (unless `config.strict`).

    Stopping rules (`stop_rules`) end training, or raise an alert, when a figure crosses a
    threshold or drifts from the baseline round. With `config.eval_round` (on by default when
    `metric_for_best_model` names an `eval_faith_...` figure), every evaluation also adds
    `eval_faith_score` and `eval_faith_<figure>` to the eval metrics, for best-checkpoint
    selection and `EarlyStoppingCallback`. Baseline, history, curves and rule counters are
    saved with every checkpoint and restored by `resume_from_checkpoint`.

    Usage:
    ```python
    from faithcb import FaithConfig, FaithfulnessCallback, StopRule

    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_dataset)
    trainer.add_callback(
        FaithfulnessCallback(
            trainer,
            panel="heldout_cot.jsonl",
            config=FaithConfig(every_n_steps=100),
            stop_rules=[StopRule("early_answer/aoc", max_drop=0.2, patience=2)],
        )
    )
    trainer.train()
    ```

    Args:
        trainer: The `Trainer` (or `SFTTrainer`) to monitor; its `log` carries the metrics and
            its `processing_class` is the tokenizer (required).
        panel: Held-out CoT examples: a JSONL path, a `datasets.Dataset`, a list of dicts, a
            `ProbePanel` or a list of `ProbeExample`s (see `faithcb.load_panel` for the row shapes;
            every row needs a readable gold answer unless `config.allow_missing_gold`).
        config: Round settings and schedule (default `FaithConfig()`).
        probes: Probe names or instances overriding `config.probes`.
        stop_rules: `StopRule`s checked after every probe round (see `faithcb.StopRule`).

    Raises:
        ValueError: No trainer or tokenizer, a stop rule on a figure that does not exist, a
            `metric_for_best_model` naming a faith figure this monitor cannot produce.
        PanelError: Malformed, empty or duplicate panel rows; a prompt that cannot be rendered
            with the trainer's tokenizer (e.g. chat messages without a chat template); every
            prompt too long for the model's context.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> FaithfulnessCallback:
        # transformers' `_load_callback_state` (restore_callback_states_from_checkpoint=True)
        # re-creates a stateful callback as `type(cb)(**state["args"])` and sets the saved
        # attributes on the result. This callback cannot be rebuilt from JSON (it holds the
        # trainer and the panel), so that call is answered with the live instance being
        # restored: the saved attributes land on it and it keeps working.
        if not args and not kwargs:
            restoring = _instance_being_restored(cls)
            if restoring is not None:
                return restoring
        return super().__new__(cls)

    def __init__(
        self,
        trainer: Any = None,
        panel: str | Path | ProbePanel | Sequence[dict] | Any = None,
        *,
        config: FaithConfig | None = None,
        probes: Sequence[str | Probe] | None = None,
        stop_rules: Sequence[StopRule] | None = None,
    ) -> None:
        if trainer is None and panel is None and getattr(self, "_ready", False):
            return  # transformers' restore of stateful callbacks: keep this instance as it is
        if trainer is None or not hasattr(trainer, "log") or not hasattr(trainer, "state"):
            raise ValueError(
                "FaithfulnessCallback needs the Trainer it monitors as first argument "
                f"(got {type(trainer).__name__}); use FaithfulnessCallback(trainer, panel=...)."
            )
        if panel is None:
            raise ValueError("FaithfulnessCallback needs a panel of held-out CoT examples: panel=<jsonl path or rows>.")
        self.trainer = trainer
        self.config = config if config is not None else FaithConfig()
        loaded = panel_from(panel, self.config)
        logger.info("faithcb: %s", loaded.describe())
        self.probes = build_probes(self.config, probes)
        tokenizer = self._tokenizer(None)
        if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is None:
            raise ValueError(
                "The trainer's tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token "
                "(faithcb pads probe batches with the pad token, or with EOS while a round runs)."
            )
        self.panel, self.skipped_examples = self._check_panel(loaded, tokenizer, getattr(trainer, "model", None))
        prefix = self.config.log_prefix
        self.metric_names, with_interval = metric_names(self.probes, self.panel.slices)
        self.stop_rules = list(stop_rules or [])
        self._stopper = StopMonitor(
            self.stop_rules, validate_rules(self.stop_rules, self.metric_names, with_interval, prefix), prefix
        )
        self.score_key: str | None = next((k for k in ("score", "early_answer/aoc") if k in self.metric_names), None)
        self._check_best_model_metric(getattr(trainer, "args", None))

        self.baseline: dict[str, float] | None = None
        self.baseline_step: int | None = None
        self.history: list[dict[str, Any]] = []
        self.curves: list[tuple[int, list[float | None]]] = []
        self.last_round_step: int | None = None
        self.stop_events: list[dict[str, Any]] = []
        self.failures: dict[str, int] = {}
        self.last_result: RoundResult | None = None
        self._last_round_ok = False
        self._warned: set[str] = set()
        self._ready = True

    @classmethod
    def attach(
        cls,
        trainer: Any,
        panel: str | Path | ProbePanel | Sequence[dict] | Any,
        **kwargs: Any,
    ) -> FaithfulnessCallback:
        """Build the callback and insert it into `trainer`'s callbacks before `EarlyStoppingCallback`.

        `trainer.add_callback` appends at the end; a key added to the eval metrics in
        `on_evaluate` is only seen by an `EarlyStoppingCallback` that runs later. (The callback
        also moves itself there at `on_train_begin` when eval rounds are on.)

        Args:
            trainer: The trainer.
            panel: The probe panel.
            **kwargs: `config`, `probes`, `stop_rules`.

        Returns:
            The attached callback.
        """
        callback = cls(trainer, panel, **kwargs)
        callbacks = trainer.callback_handler.callbacks
        index = next((i for i, cb in enumerate(callbacks) if isinstance(cb, EarlyStoppingCallback)), len(callbacks))
        callbacks.insert(index, callback)
        return callback

    # ------------------------------------------------------------------ state
    @property
    def stopping(self) -> dict[str, Any]:
        """Patience counters of the stop rules (JSON-able; saved with checkpoints)."""
        return self._stopper.state()

    @stopping.setter
    def stopping(self, value: dict[str, Any] | None) -> None:
        self._stopper.load_state(value)

    def state(self) -> dict:
        """Resumable state (saved with checkpoints through `ExportableState`)."""
        return {
            "args": {},
            "attributes": {
                "baseline": self.baseline,
                "baseline_step": self.baseline_step,
                "history": self.history,
                "curves": [[s, c] for s, c in self.curves],
                "last_round_step": self.last_round_step,
                "stopping": self.stopping,
                "stop_events": self.stop_events,
            },
        }

    def load_state(self, state: dict) -> None:
        """Put back what `state()` saved (baseline, history, curves, stop-rule counters)."""
        attributes = state.get("attributes", state) or {}
        for name in _STATE_ATTRIBUTES:
            if name in attributes:
                setattr(self, name, attributes[name])
        self.history = [dict(h) for h in self.history or []]
        self.curves = [(int(s), list(c)) for s, c in self.curves or []]
        self.stop_events = list(self.stop_events or [])

    @classmethod
    def from_state(cls, state: dict) -> FaithfulnessCallback:
        """Not supported: the callback needs its trainer and panel; use `load_state` on an instance."""
        raise TypeError(
            "FaithfulnessCallback cannot be rebuilt from its saved state alone (it needs the trainer and the "
            "panel); create it as usual and call callback.load_state(state)."
        )

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.eval_round_enabled(args):
            self._place_before_early_stopping()
        stored = self._stored_state(state)
        self._register_state(state)
        if state.global_step > 0:  # resumed: continue the curves, never take a new baseline
            if stored is not None:
                self.load_state(stored)
                logger.info(
                    "faithcb: resumed at step %d with %d earlier probe rounds (baseline from step %s).",
                    state.global_step,
                    len(self.history),
                    self.baseline_step,
                )
            elif self.baseline is None:
                logger.warning(
                    "faithcb: training resumes at step %d but the checkpoint holds no FaithfulnessCallback state "
                    "(it was saved without this callback); the next probe round becomes the baseline, so /delta "
                    "figures measure drift from there, not from step 0.",
                    state.global_step,
                )
            if state.is_world_process_zero:
                self._drop_rounds_after(args, state.global_step)
            return control
        if self.config.baseline_round and self.baseline is None:
            self._round(args, state, model, processing_class, control=control)
        return control

    def _drop_rounds_after(self, args: Any, step: int) -> None:
        """JSONL lines of rounds after the resume step came from the abandoned run: they run again."""
        try:
            removed = JsonlSink(Path(args.output_dir) / self.config.output_subdir).drop_after(step)
        except Exception:  # an unreadable file must not end the training run
            self._warn_once("jsonl", "faithcb: could not clean the JSONL files on resume.", exc_info=True)
            return
        if removed:
            logger.info("faithcb: removed %d JSONL round(s) after step %d; they run again on resume.", removed, step)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        step = state.global_step
        if step > 0 and step % self.config.every_n_steps == 0 and step != self.last_round_step:
            self._round(args, state, model, processing_class, control=control)
        return control

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, **kwargs):
        if metrics is None or not self.eval_round_enabled(args):
            return control
        step = state.global_step
        if step != self.last_round_step:
            self._round(args, state, model, processing_class, control=control)
        figures = self.eval_figures(step, args)
        metrics.update(figures)
        finite = {k: v for k, v in figures.items() if math.isfinite(v)}
        if finite:  # evaluate() logged before on_evaluate: send the faith figures on their own
            self._log(finite)
        return control

    # ------------------------------------------------------------------ eval figures
    def eval_round_enabled(self, args: Any) -> bool:
        """Whether evaluations run (or reuse) a round and add `eval_faith_...` figures."""
        if self.config.eval_round is not None:
            return bool(self.config.eval_round)
        return _eval_name(getattr(args, "metric_for_best_model", None) or "").startswith(self._eval_prefix)

    @property
    def _eval_prefix(self) -> str:
        return f"eval_{self.config.log_prefix}_"

    def eval_key(self, key: str) -> str:
        """Eval-metric name of a figure: `early_answer/aoc` -> `eval_faith_early_answer_aoc`."""
        return self._eval_prefix + re.sub(r"[^0-9A-Za-z_.]+", "_", key)

    def eval_metric_names(self) -> list[str]:
        """Every `eval_faith_...` name an evaluation can add (figures without intervals, drifts, slices)."""
        names = {self.eval_key(k) for k in self.metric_names if _eval_eligible(k)}
        if self.score_key is not None:
            names.add(f"{self._eval_prefix}score")
        return sorted(names)

    def eval_figures(self, step: int, args: Any = None) -> dict[str, float]:
        """The `eval_faith_...` figures of the round at `step` (NaN score when it failed or was partial).

        `eval_faith_score` is `faith/score` (noise-floor corrected summary; the control probe
        always runs) when the round can produce it, else `faith/early_answer/aoc`; which one is
        `self.score_key`. It is NaN for a round that cannot be read (`faith/valid` = 0). The figure named
        by `metric_for_best_model` is always present (NaN when the round has no value), so
        transformers' best-model selection never meets a missing key.
        """
        row = None
        if self._last_round_ok and self.history and self.history[-1].get("step") == step:
            row = self.history[-1]
        out: dict[str, float] = {}
        if row is not None:
            for key, value in row.items():
                if _eval_eligible(key) and isinstance(value, (int, float)) and math.isfinite(value):
                    out[self.eval_key(key)] = float(value)
        if self.score_key is not None:
            readable = row is not None and row.get("valid", 1.0) == 1.0  # an unreadable round is never the best
            score = row.get(self.score_key) if readable else None
            ok = isinstance(score, (int, float)) and math.isfinite(score)
            out[f"{self._eval_prefix}score"] = float(score) if ok else math.nan
        wanted = _eval_name(getattr(args, "metric_for_best_model", None) or "")
        if wanted.startswith(self._eval_prefix) and wanted not in out:
            out[wanted] = math.nan
        return out

    def _check_best_model_metric(self, args: Any) -> None:
        wanted = _eval_name(getattr(args, "metric_for_best_model", None) or "")
        if not wanted.startswith(self._eval_prefix):
            return
        if self.config.eval_round is False:
            raise ValueError(
                f"metric_for_best_model={wanted!r} is a faithcb figure but FaithConfig.eval_round=False; "
                "set eval_round=True (or None) so evaluations add it."
            )
        valid = self.eval_metric_names()
        if wanted not in valid:
            raise ValueError(
                f"metric_for_best_model={wanted!r} is not a figure this monitor adds to the eval metrics; "
                f"valid: {', '.join(valid)}."
            )

    def _place_before_early_stopping(self) -> None:
        """Move this callback before the first EarlyStoppingCallback (safe inside an event loop)."""
        callbacks = getattr(getattr(self.trainer, "callback_handler", None), "callbacks", None)
        if not callbacks or not any(cb is self for cb in callbacks):
            return
        mine = next(i for i, cb in enumerate(callbacks) if cb is self)
        first = next((i for i, cb in enumerate(callbacks) if isinstance(cb, EarlyStoppingCallback)), None)
        if first is not None and first < mine:
            # Moving an element to an earlier index while the handler iterates the list neither
            # skips nor repeats a later callback.
            callbacks.pop(mine)
            callbacks.insert(first, self)
            logger.info("faithcb: placed FaithfulnessCallback before EarlyStoppingCallback (it adds eval_faith_*).")

    # ------------------------------------------------------------------ resume
    def _stored_state(self, state: Any) -> dict | None:
        """This callback's entry in a resumed TrainerState's `stateful_callbacks`, if any."""
        stored = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(stored, list):  # several instances of this class (transformers appends per save)
            callbacks = getattr(getattr(self.trainer, "callback_handler", None), "callbacks", [])
            mine = [cb for cb in callbacks if type(cb) is type(self)] or [self]
            index = next((i for i, cb in enumerate(mine) if cb is self), 0)
            stored = stored[-len(mine) :][index] if len(stored) >= len(mine) else None
        if not isinstance(stored, dict) or not isinstance(stored.get("attributes"), dict):
            return None
        if "history" not in stored["attributes"]:
            return None
        return stored

    def _register_state(self, state: Any) -> None:
        """Make sure checkpoint saving finds this callback's entry.

        A TrainerState loaded from a checkpoint made without this callback lacks it, and
        transformers' `_save_checkpoint` then fails with a KeyError on the callback's name.
        """
        stateful = getattr(state, "stateful_callbacks", None)
        if isinstance(stateful, dict) and type(self).__name__ not in stateful:
            stateful[type(self).__name__] = self.state()

    # ------------------------------------------------------------------ round
    def _tokenizer(self, processing_class: Any) -> Any:
        tokenizer = (
            processing_class if processing_class is not None else getattr(self.trainer, "processing_class", None)
        )
        if tokenizer is not None and not hasattr(tokenizer, "pad_token") and hasattr(tokenizer, "tokenizer"):
            tokenizer = tokenizer.tokenizer
        if tokenizer is None:
            raise ValueError("FaithfulnessCallback needs a tokenizer: pass processing_class=tokenizer to the Trainer.")
        return tokenizer

    def _check_panel(self, panel: ProbePanel, tokenizer: Any, model: Any) -> tuple[ProbePanel, list[str]]:
        """Render every prompt once; drop prompts too long for the model's context (with a warning)."""
        rendered = []
        for example in panel:
            try:
                text = example.render_prompt(
                    tokenizer,
                    use_chat_template=self.config.use_chat_template,
                    prompt_template=self.config.prompt_template,
                )
            except PanelError:
                raise
            except Exception as err:
                raise PanelError(
                    f"Panel example {example.id!r} from {panel.source}: its prompt cannot be rendered with the "
                    f"trainer's tokenizer ({type(err).__name__}: {err})."
                ) from err
            rendered.append(text)
        limit = _context_limit(model, tokenizer)
        if limit is None:
            return panel, []
        room = limit - self.config.max_new_tokens - self.config.answer_max_new_tokens - _CUE_SLACK
        if room <= 0:
            raise ValueError(
                f"max_new_tokens ({self.config.max_new_tokens}) + answer_max_new_tokens "
                f"({self.config.answer_max_new_tokens}) leave no room for a prompt in the model's {limit}-token "
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
                f"the model's {limit}-token context beside max_new_tokens={self.config.max_new_tokens} "
                f"(longest: {longest}); shorten the prompts or lower max_new_tokens."
            )
        logger.warning(
            "faithcb: %d of %d panel prompts are longer than the %d tokens that fit the model's %d-token context "
            "beside a %d-token chain and are skipped (ids %s); rounds log faith/skipped_examples.",
            len(skipped),
            len(panel),
            room,
            limit,
            self.config.max_new_tokens,
            ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""),
        )
        return ProbePanel(examples=keep, source=panel.source), skipped

    def _round(self, args: Any, state: Any, model: Any, processing_class: Any, *, control: Any = None) -> bool:
        """Run one probe round at the current step; returns whether it produced figures."""
        step = state.global_step
        self.last_round_step = step
        self._last_round_ok = False
        result, partial, out_of_memory = None, False, False
        try:
            result, partial = self._run_sharded(
                model if model is not None else self.trainer.model, self._tokenizer(processing_class)
            )
        except Exception as err:  # a probe must never lose the user's training run
            if self.config.strict:
                raise
            out_of_memory = _is_out_of_memory(err)
            self._report_failure(step, err, out_of_memory)
        if out_of_memory:
            _release_accelerator_memory()
        if result is None:
            self._log(
                {f"{self.config.log_prefix}/round_failed": 1.0}, args=args, state=state, metrics={"round_failed": 1.0}
            )
            if state.is_world_process_zero:
                _console().info(
                    "faithcb step %d: the probe round failed and logged no figures (see the warning).", step
                )
            return False
        self._finish_round(args, state, control, step, result, partial)
        return True

    def _report_failure(self, step: int, err: BaseException, out_of_memory: bool) -> None:
        if out_of_memory:
            cause = "out of memory"
            self.failures[cause] = self.failures.get(cause, 0) + 1
            if self.failures[cause] == 1:  # no traceback: a kept log record would pin the round's tensors
                logger.warning(
                    "faithcb: probe round at step %d ran out of accelerator memory and was skipped (%s); training "
                    "goes on. Lower FaithConfig.generation_batch_size (%s), scoring_batch_size (%s), "
                    "max_new_tokens (%s) or panel_size.",
                    step,
                    (str(err).splitlines() or [type(err).__name__])[0][:300],
                    self.config.generation_batch_size,
                    self.config.scoring_batch_size,
                    self.config.max_new_tokens,
                )
            return
        cause = f"{type(err).__name__}: {err}"
        self.failures[cause] = self.failures.get(cause, 0) + 1
        if self.failures[cause] == 1:
            logger.warning("faithcb: probe round at step %d failed and was skipped (%s).", step, cause, exc_info=True)

    def _finish_round(self, args: Any, state: Any, control: Any, step: int, result: RoundResult, partial: bool) -> None:
        prefix = self.config.log_prefix
        self.last_result = result
        metrics = dict(result.metrics)
        is_baseline = False
        if self.baseline is None:
            if partial:
                self._warn_once(
                    "partial-baseline",
                    "faithcb: the round at step %d ran past round_time_budget_s and is not used as the baseline; "
                    "the first complete round becomes it.",
                    step,
                )
            else:
                self.baseline = {k: v for k, v in metrics.items() if not k.endswith(DRIFT_SKIP)}
                self.baseline_step = step
                is_baseline = True
        else:
            for key, value in list(metrics.items()):
                base = self.baseline.get(key)
                if base is not None and not key.endswith(DRIFT_SKIP) and not key.startswith("slice/"):
                    metrics[f"{key}/delta"] = value - base
        metrics["round_seconds"] = result.seconds
        if partial:
            metrics["round_partial"] = 1.0
        if self.skipped_examples:
            metrics["skipped_examples"] = float(len(self.skipped_examples))
        logs = {
            f"{prefix}/{k}": float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and v is not None and math.isfinite(v)
        }
        round_index = len(self.history)
        reasons = invalid_reasons(result.metrics)
        self.history.append({"step": step, **metrics})
        self.curves.append((step, early_answer_curve(result.records)))
        if reasons and state.is_world_process_zero:
            logger.warning(invalid_warning(step, reasons))
        # Every rank takes the same decision (collective in distributed runs; before any main-only work).
        # An unreadable round neither counts nor resets a stop rule, except rules on its diagnostics.
        events = self._check_stop_rules(step, metrics, skip=is_baseline or partial, readable=not reasons)
        if state.is_world_process_zero:
            try:
                JsonlSink(Path(args.output_dir) / self.config.output_subdir).write(
                    step=step,
                    round_index=round_index,
                    metrics={**metrics, "invalid_reasons": reasons},
                    records=result.records,
                )
            except Exception:  # a full disk must not end the training run
                self._warn_once("jsonl", "faithcb: writing the round's JSONL failed at step %d.", step, exc_info=True)
        self._log(logs, args=args, state=state, metrics=metrics, records=result.records)
        if state.is_world_process_zero:
            _console().info(
                "%s",
                round_line(
                    step=step,
                    round_index=round_index,
                    metrics=metrics,
                    seconds=result.seconds,
                    examples=len(result.records),
                    baseline_step=self.baseline_step,
                    partial=partial,
                ),
            )
        for event in events:
            self._fire(event, state, control)
        self._check_budget(result, partial)
        self._last_round_ok = not partial

    # ------------------------------------------------------------------ stopping
    def _check_stop_rules(
        self, step: int, metrics: dict[str, float], *, skip: bool, readable: bool = True
    ) -> list[dict[str, Any]]:
        if not self.stop_rules:
            return []
        events = [] if skip else self._stopper.update(step, metrics, self.baseline, readable=readable)
        # The figures are gathered, so every rank computed the same; the main process's word is
        # broadcast anyway, so that counters and decisions can never diverge.
        decision = broadcast_from_main({"stopping": self._stopper.state(), "events": events})
        self._stopper.load_state(decision["stopping"])
        return list(decision["events"])

    def _fire(self, event: dict[str, Any], state: Any, control: Any) -> None:
        self.stop_events.append(dict(event))
        stop = event["action"] == "stop"
        text = (
            f"faithcb: {'stop' if stop else 'alert'} rule '{event['rule']}' fired at step {event['step']}: "
            f"{format_event(event)}; {'stopping training' if stop else 'training goes on'}."
        )
        logger.warning(text)
        if stop:
            for target in (control, getattr(self.trainer, "control", None)):
                if target is not None:
                    target.should_training_stop = True
        if not state.is_world_process_zero:
            return
        run = _wandb_run()
        if run is None:
            return
        prefix = self.config.log_prefix
        try:
            if stop:
                run.summary[f"{prefix}/stopped_by"] = event["rule"]
                run.summary[f"{prefix}/stopped_at_step"] = event["step"]
            else:
                import wandb

                wandb.alert(title=f"faithcb: {event['rule']}", text=text, level=wandb.AlertLevel.WARN)
        except Exception:
            logger.warning("faithcb: reporting the rule to W&B failed.", exc_info=True)

    def _check_budget(self, result: RoundResult, partial: bool) -> None:
        budget = self.config.round_time_budget_s
        if budget is None or (not partial and result.seconds <= budget):
            return
        done = len(result.records)
        fit = int(done * budget / result.seconds) if result.seconds > 0 else done
        self._warn_once(
            "budget",
            "faithcb: a probe round took %.1fs for %d of %d panel examples, over round_time_budget_s=%.1fs; about %d "
            "examples fit the budget: lower panel_size or max_new_tokens, or raise the budget.",
            result.seconds,
            done,
            len(self.panel),
            budget,
            fit,
        )

    # ------------------------------------------------------------------ helpers
    def _warn_once(self, key: str, message: str, *args: Any, exc_info: bool = False) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args, exc_info=exc_info)

    def _log(
        self,
        logs: dict[str, float],
        *,
        args: Any = None,
        state: Any = None,
        metrics: dict[str, Any] | None = None,
        records: Sequence[dict[str, Any]] = (),
    ) -> None:
        """Send a round's figures to the trainer's log stream and, for W&B, to sections of their own.

        `trainer.log` carries `logs` to `log_history` and every `report_to` integration
        (TensorBoard, MLflow, ...) except three kinds of callback, which are left out of this one
        call: transformers' console printers (`PrinterCallback` with tqdm off, `ProgressCallback`
        with tqdm on) and TRL's `RichProgressCallback`, which would print the whole dict (the
        round's own console line replaces them), and transformers' `WandbCallback` when the
        figures went to the W&B run directly (given `metrics`, on the main process, with an
        active run): that integration would log them again as `train/faith/...`.

        `CallbackHandler.on_log` clears `control.should_log`; called from `on_step_end`, that
        would drop the trainer's own loss log of this step, so the flag is put back. TRL
        trainers' `log` also drains their running `_metrics` (token accuracy, entropy, ...)
        into whatever is logged; they are set aside so they stay with the trainer's own log.
        """
        trainer = self.trainer
        skip_wandb = False
        if metrics is not None and args is not None and state is not None and _reports_to(args, "wandb"):
            if not state.is_world_process_zero:
                skip_wandb = True  # the integration logs on the main process only
            elif _wandb_run() is not None:
                skip_wandb = self._log_wandb(state.global_step, metrics, records)
        control = getattr(trainer, "control", None)
        should_log = getattr(control, "should_log", None)
        running = getattr(trainer, "_metrics", None)
        swap = isinstance(running, dict)
        if swap:
            trainer._metrics = defaultdict(lambda: defaultdict(list), {mode: defaultdict(list) for mode in running})
        handler = getattr(trainer, "callback_handler", None)
        every = getattr(handler, "callbacks", None)
        if isinstance(every, list):
            # A new list for this call: the event loop that called us iterates the original one.
            handler.callbacks = [cb for cb in every if not _kept_out_of_round_logs(cb, skip_wandb)]
        try:
            trainer.log(logs)
        finally:
            if isinstance(every, list):
                handler.callbacks = every
            if swap:
                trainer._metrics = running
        control = getattr(trainer, "control", None)
        if should_log is not None and control is not None:
            control.should_log = should_log

    def _log_wandb(self, step: int, metrics: dict[str, Any], records: Sequence[dict[str, Any]]) -> bool:
        """Log a round to the active W&B run in sections of its own (see `faithcb._sinks`)."""
        try:
            return log_wandb_round(
                step=step,
                metrics=metrics,
                records=records,
                curves=self.curves,
                num_samples=self.config.num_sample_chains,
                prefix=self.config.log_prefix,
                media=self.config.wandb_media and bool(records),
            )
        except Exception:  # W&B is a convenience; never lose the run over it (the integration gets them)
            self._warn_once("wandb", "faithcb: logging the round to W&B failed at step %d.", step, exc_info=True)
            return False

    def _run_sharded(self, model: Any, tokenizer: Any) -> tuple[RoundResult, bool]:
        """Run this rank's shard of the panel and gather every rank's records.

        In a distributed run the ranks first agree on the outcome: when the round failed on any
        rank, every rank raises (so all skip the round together instead of some waiting in
        `gather_object`). Records are then put back in panel order by example id, which drops
        the padding duplicates of `split_between_processes` wherever they sit.

        Returns:
            The round and whether it is partial (ended by the time budget).
        """
        from accelerate import PartialState
        from accelerate.utils import gather_object

        from ._aggregate import aggregate_records

        start = time.perf_counter()
        examples = list(self.panel)
        state = PartialState()
        wrapped = getattr(self.trainer, "model_wrapped", None)  # FSDP1 root / DeepSpeed engine
        if state.num_processes <= 1:
            try:
                return run_probe_round(
                    model, tokenizer, examples, self.config, self.probes, wrapped_model=wrapped
                ), False
            except RoundBudgetExceeded as err:
                return self._partial_result(err.records, err.seconds or time.perf_counter() - start), True
        local, partial, error = None, False, None
        with state.split_between_processes(examples, apply_padding=True) as shard:
            try:
                local = run_probe_round(model, tokenizer, shard, self.config, self.probes, wrapped_model=wrapped)
            except RoundBudgetExceeded as err:
                local = RoundResult(metrics={}, records=list(err.records), seconds=err.seconds or 0.0)
                partial = True
            except Exception as err:
                error = err
        outcome = None if error is None else f"{type(error).__name__}: {error}"
        statuses = gather_object([(state.process_index, outcome, partial)])
        failed = [(rank, cause) for rank, cause, _ in statuses if cause is not None]
        if failed:
            if error is not None:
                raise error
            raise RuntimeError(f"the probe round failed on rank {failed[0][0]} ({failed[0][1]})")
        partial = any(flag for _, _, flag in statuses)
        gathered = gather_object(local.records)
        timings = gather_object([(local.seconds, local.metrics)])
        seconds = max(t for t, _ in timings)
        by_id: dict[Any, dict[str, Any]] = {}
        for record in gathered:
            by_id.setdefault(record.get("id"), record)
        records = [by_id[e.id] for e in examples if e.id in by_id]
        if partial:
            return self._partial_result(records, seconds), True
        metrics = aggregate_records(records, self.probes)
        metrics.update(merged_cost([m for _, m in timings], len(records)))  # every rank's tokens
        if state.process_index == 0:  # one warning per round, after the gather
            warn_on_selfcheck(metrics, self.config)
        return RoundResult(metrics=metrics, records=records, seconds=seconds, calls=local.calls), False

    def _partial_result(self, records: Sequence[dict[str, Any]], seconds: float) -> RoundResult:
        from ._aggregate import aggregate_records

        if not records:
            raise RoundBudgetExceeded(
                f"the probe round ran past round_time_budget_s={self.config.round_time_budget_s}s before any "
                "example was complete",
                seconds=seconds,
            )
        records = list(records)
        return RoundResult(metrics=aggregate_records(records, self.probes), records=records, seconds=seconds)


def _instance_being_restored(cls: type) -> Any:
    """The callback that transformers' `_load_callback_state` is restoring, read from its frame."""
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return None
        local = frame.f_locals
        candidate = local.get("callback")
        if (
            isinstance(candidate, cls)
            and getattr(candidate, "_ready", False)
            and (frame.f_code.co_name == "_load_callback_state" or "callback_data" in local)
        ):
            return candidate
        frame = frame.f_back
    return None


def _eval_name(metric: str) -> str:
    return metric if not metric or metric.startswith("eval_") else f"eval_{metric}"


def _eval_eligible(key: str) -> bool:
    return key != "step" and key != "round_partial" and not key.endswith(DRIFT_SKIP) and not key.startswith("slice/")


def _context_limit(model: Any, tokenizer: Any) -> int | None:
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


def _is_out_of_memory(err: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(err, oom_type):
        return True
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def _release_accelerator_memory() -> None:
    """Free what a failed round left behind (its tensors die with the exception's frames)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _wandb_run() -> Any:
    """The active W&B run, without importing wandb when nothing imported it."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def _kept_out_of_round_logs(callback: Any, skip_wandb: bool) -> bool:
    """Callbacks that must not see a round's logs: console printers (and W&B when logged directly)."""
    from transformers import PrinterCallback, ProgressCallback
    from transformers.integrations import WandbCallback

    if isinstance(callback, (PrinterCallback, ProgressCallback)) or type(callback).__name__ == "RichProgressCallback":
        return True
    return skip_wandb and isinstance(callback, WandbCallback)


class _ConsoleHandler(logging.StreamHandler):
    """Writes through `tqdm.write` so that a line never cuts through a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def _console() -> logging.Logger:
    """The logger of the one-line round summaries (`faithcb.rounds`, INFO).

    The lines are shown by default: unless a level was set on `faithcb` or `faithcb.rounds`,
    the logger takes INFO; where logging is not configured at all (no handler on it or any
    parent, root included), it gets a stderr handler of its own, as transformers does for its
    logger. `logging.getLogger("faithcb.rounds").setLevel(logging.WARNING)` silences them.
    """
    console = logging.getLogger(CONSOLE_LOGGER)
    if console.level == logging.NOTSET and logging.getLogger("faithcb").level == logging.NOTSET:
        console.setLevel(logging.INFO)
    if not console.hasHandlers():
        handler = _ConsoleHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        console.addHandler(handler)
        console.propagate = False
    return console


def _reports_to(args: Any, name: str) -> bool:
    report_to = getattr(args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [report_to]
    return name in report_to or "all" in report_to
