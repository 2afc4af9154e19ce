"""`FaithfulnessCallback`: the live monitor that rides along a `Trainer` / `SFTTrainer` run.

A thin adapter from transformers' callback events to a `Monitor` (`faithcb._monitor`), which
owns the run's rounds: baseline, history, drift, stop decisions and their state. The round
itself runs in `faithcb._execution` (sharded over ranks, aggregated once), its figures go out
through `faithcb._publish` (JSONL, the trainer's log stream, W&B, the console), and the rest of
what the trainer asks of a callback is in `faithcb._trainer_glue`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import EarlyStoppingCallback, TrainerCallback

from ._config import FaithConfig
from ._trainer_glue import (
    fit_panel,
    place_before_early_stopping,
    save_monitor_state,
    saved_monitor_state,
    trainer_tokenizer,
)
from .data._panel import ProbePanel, panel_from
from .data._prompt_shape import kept_as_written, pinned_choice, settle_prompt_shape, shaped_panel
from .monitor._monitor import Monitor, eval_name
from .monitor._stop_rules import StopRule
from .monitor._summary import SUMMARY_FILE, SUMMARY_LOGGER, RunSummary, summarize_run
from .probes import Probe
from .publish._model_card import install_card_section, refresh_card_section
from .publish._publisher import RoundPublisher, console, wandb_run
from .round._probe_round import RoundResult, build_probes
from .round._sharded import is_out_of_memory, release_accelerator_memory, run_sharded_round

logger = logging.getLogger(__name__)


class FaithfulnessCallback(TrainerCallback):
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
    saved with every checkpoint (in `trainer_state.json`, under `stateful_callbacks["faithcb"]`)
    and read back by `resume_from_checkpoint`.

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

    def __init__(
        self,
        trainer: Any = None,
        panel: str | Path | ProbePanel | Sequence[dict] | Any = None,
        *,
        config: FaithConfig | None = None,
        probes: Sequence[str | Probe] | None = None,
        stop_rules: Sequence[StopRule] | None = None,
    ) -> None:
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
        tokenizer = trainer_tokenizer(trainer)
        if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is None:
            raise ValueError(
                "The trainer's tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token "
                "(faithcb pads probe batches with the pad token, or with EOS while a round runs)."
            )
        self.panel, self.skipped_examples = fit_panel(loaded, tokenizer, getattr(trainer, "model", None), self.config)
        self.stop_rules = list(stop_rules or [])
        self.monitor = Monitor(
            self.config,
            self.probes,
            stop_rules=self.stop_rules,
            slices=self.panel.slices,
            skipped_examples=len(self.skipped_examples),
            panel_size=len(self.panel),
        )
        self.monitor.check_best_model_metric(_best_metric(getattr(trainer, "args", None)))
        self.publisher = RoundPublisher(trainer, self.config, self.monitor)
        self.has_chat_template = getattr(tokenizer, "chat_template", None) is not None
        self.trial_probes = build_probes(self.config, [])  # the core and control probes: what readability needs
        # the model card the trainer writes (create_model_card, push_to_hub) carries the run's section
        install_card_section(trainer, self.config.log_prefix, self.model_card_section)

    @property
    def shaped_panel(self) -> ProbePanel:
        """The panel in the run's prompt shape (as written until the shape is chosen)."""
        return shaped_panel(self.panel, self.monitor.prompt_shape, self.config)

    @classmethod
    def attach(cls, trainer: Any, panel: Any, **kwargs: Any) -> FaithfulnessCallback:
        """Build the callback and insert it into `trainer`'s callbacks before `EarlyStoppingCallback`.

        `trainer.add_callback` appends at the end; a key added to the eval metrics in
        `on_evaluate` is only seen by an `EarlyStoppingCallback` that runs later. (The callback
        also moves itself there at `on_train_begin` when eval rounds are on.) `kwargs`: `config`,
        `probes`, `stop_rules`.
        """
        callback = cls(trainer, panel, **kwargs)
        callbacks = trainer.callback_handler.callbacks
        index = next((i for i, cb in enumerate(callbacks) if isinstance(cb, EarlyStoppingCallback)), len(callbacks))
        callbacks.insert(index, callback)
        return callback

    # ------------------------------------------------------------------ the monitor's state
    baseline = property(lambda self: self.monitor.baseline, doc="Figures of the baseline round (None before it).")
    baseline_step = property(lambda self: self.monitor.baseline_step, doc="Step of the baseline round.")
    history = property(lambda self: self.monitor.history, doc="One dict of figures per round, with its step.")
    curves = property(lambda self: self.monitor.curves, doc="(step, early-answering curve) per round.")
    last_round_step = property(lambda self: self.monitor.last_round_step, doc="Step of the latest round.")
    stop_events = property(lambda self: self.monitor.stop_events, doc="Stop and alert rules that fired.")
    stopping = property(lambda self: self.monitor.stopper.state(), doc="Patience counters of the stop rules.")
    failures = property(lambda self: self.monitor.failures, doc="Failed rounds counted by cause.")
    score_key = property(lambda self: self.monitor.score_key, doc="The figure behind `eval_faith_score`.")

    def state(self) -> dict[str, Any]:
        """Resumable state: baseline, history, curves, stop-rule counters and events (JSON-able)."""
        return self.monitor.to_state()

    def load_state(self, state: dict[str, Any]) -> None:
        """Put back what `state()` saved."""
        attributes = state.get("attributes", state) if isinstance(state, dict) else None  # earlier versions
        self.monitor.load_state(attributes or {})

    @classmethod
    def from_state(cls, state: dict) -> FaithfulnessCallback:
        """Not supported: the callback needs its trainer and panel; use `load_state` on an instance."""
        raise TypeError(
            "FaithfulnessCallback cannot be rebuilt from its saved state alone (it needs the trainer and the "
            "panel); create it as usual and call callback.load_state(state) (or faithcb._monitor.Monitor.from_state)."
        )

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.eval_round_enabled(args):
            place_before_early_stopping(self.trainer, self)
        if state.global_step > 0:  # resumed: continue the curves, never take a new baseline
            self._resume(args, state)
            if self.monitor.prompt_shape is None:  # a state saved without a shape: the panel as written
                self.monitor.set_prompt_shape(pinned_choice(self.config) or kept_as_written(), main=False)
        else:
            self._probes_begin(model, processing_class, state)
        if state.global_step == 0 and self.config.baseline_round and self.baseline is None:
            self._round(args, state, model, processing_class, control=control)
        if self.monitor.prompt_shape is None:  # decided before any training step, kept for the run
            self._settle_shape(model, processing_class, state)
        self._save_state(state)
        return control

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.monitor.due(state.global_step):
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
            self.publisher.log(finite)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        """The end-of-run summary: one block through the `faithcb.summary` logger, `summary.json`
        beside the JSONL files, and a refreshed faithfulness section in a model card already
        written to `output_dir`. A failure here is logged and never reaches the training run."""
        if not state.is_world_process_zero:
            return control
        try:
            summary = self.summary(args, state)
            console(SUMMARY_LOGGER).info("%s", summary.text())
            folder = Path(args.output_dir) / self.config.output_subdir
            folder.mkdir(parents=True, exist_ok=True)
            (folder / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
        except Exception:
            logger.warning("faithcb: the end-of-run summary failed.", exc_info=True)
        refresh_card_section(self.trainer, self.config.log_prefix, self.model_card_section)
        return control

    def summary(self, args: Any = None, state: Any = None) -> RunSummary:
        """The run summed up so far (`faithcb.monitor._summary.summarize_run` over the monitor's history):
        rounds, validity of the last one, headline figures baseline -> last with their paired
        drift intervals, the rules that fired, the most faithful checkpoint kept, where the files are.

        Args:
            args: The `TrainingArguments` (default: the trainer's).
            state: The `TrainerState` (default: the trainer's).
        """
        args = args if args is not None else getattr(self.trainer, "args", None)
        state = state if state is not None else getattr(self.trainer, "state", None)
        output_dir = Path(getattr(args, "output_dir", None) or ".")
        best_model = None
        metric = _best_metric(args) or ""
        best_path = getattr(state, "best_model_checkpoint", None)
        if best_path and eval_name(metric).startswith(self.monitor.eval_prefix):  # chosen on a faith figure
            best_model = {
                "path": best_path,
                "metric": metric,
                "value": getattr(state, "best_metric", None),
                "step": _checkpoint_step(best_path),
            }
        folder = output_dir / self.config.output_subdir
        files = {
            "figures and records": f"{folder} (metrics.jsonl, rounds.jsonl, {SUMMARY_FILE})",
            "report": f"faithcb report {output_dir}",
        }
        run = wandb_run()
        where = (getattr(run, "url", None) or getattr(run, "dir", None)) if run is not None else None
        if where:
            files["W&B run"] = str(where)
        return summarize_run(
            self.monitor.history,
            baseline_step=self.monitor.baseline_step,
            stop_events=self.monitor.stop_events,
            failed_steps=self.monitor.failed_steps,
            score_key=self.monitor.score_key,
            best_model=best_model,
            checkpoints=_saved_checkpoints(output_dir),
            files=files,
            panel=self._panel_words(),
            end_step=getattr(state, "global_step", None),
            max_steps=getattr(state, "max_steps", None) or None,
        )

    def model_card_section(self) -> str | None:
        """The model card's faithfulness section (markdown; None before the first round)."""
        if not self.monitor.history:
            return None
        summary = self.summary()
        summary.files = {}  # local paths mean nothing on the Hub: the checkpoint by its folder name
        if summary.best is not None and summary.best.path:
            summary.best.path = Path(summary.best.path).name
        return summary.markdown()

    def _panel_words(self) -> str:
        source = str(self.panel.source)
        name = Path(source).name if "/" in source or "\\" in source else source  # no local folders on a card
        probes = ", ".join(getattr(p, "name", type(p).__name__) for p in self.probes)
        every = self.config.every_n_steps
        text = f"{name}, {len(self.panel)} examples; probes: {probes}; a round every {every} step"
        text += "s" if every != 1 else ""
        if self.monitor.prompt_shape is not None:
            text += f"; prompt shape: {self.monitor.prompt_shape.shape.name}"
        return text

    def _probes_begin(self, model: Any, processing_class: Any, state: Any) -> None:
        """The probes' `on_train_begin` (e.g. a frozen copy of the model before fine-tuning); a
        failure is logged like a failed round and never ends the run (unless `config.strict`)."""
        live = model if model is not None else self.trainer.model
        tokenizer = trainer_tokenizer(self.trainer, processing_class)
        for probe in self.probes:
            try:
                probe.on_train_begin(live, tokenizer)
            except Exception as err:
                if self.config.strict:
                    raise
                self.monitor.record_failure(state.global_step, err, out_of_memory=is_out_of_memory(err))

    # ------------------------------------------------------------------ eval figures
    def eval_round_enabled(self, args: Any) -> bool:
        """Whether evaluations run (or reuse) a round and add `eval_faith_...` figures."""
        return self.monitor.eval_round_enabled(_best_metric(args))

    def eval_key(self, key: str) -> str:
        """Eval-metric name of a figure: `early_answer/aoc` -> `eval_faith_early_answer_aoc`."""
        return self.monitor.eval_key(key)

    def eval_metric_names(self) -> list[str]:
        """Every `eval_faith_...` name an evaluation can add (figures without intervals, drifts, slices)."""
        return self.monitor.eval_metric_names()

    def eval_figures(self, step: int, args: Any = None) -> dict[str, float]:
        """The `eval_faith_...` figures of the round at `step`.

        `eval_faith_score` is `faith/score` (noise-floor corrected summary; the control probe
        always runs) when the round can produce it, else `faith/early_answer/aoc`; which one is
        `self.score_key`. It is NaN for a round that failed, was partial or cannot be read
        (`faith/valid` = 0). The figure named by `metric_for_best_model` is always present (NaN
        when the round has no value), so transformers' best-model selection never meets a missing key.
        """
        return self.monitor.eval_figures(step, _best_metric(args))

    # ------------------------------------------------------------------ rounds
    def _round(self, args: Any, state: Any, model: Any, processing_class: Any, *, control: Any = None) -> bool:
        """Run one probe round at the current step; returns whether it produced figures."""
        step = state.global_step
        self.monitor.begin(step)
        result, partial, out_of_memory = None, False, False
        try:
            model = model if model is not None else self.trainer.model
            tokenizer = trainer_tokenizer(self.trainer, processing_class)
            if self.monitor.prompt_shape is None and state.global_step == 0:
                result, partial = self._settle_shape(model, tokenizer, state, baseline=True)
            else:
                result, partial = self._run_sharded(model, tokenizer)
        except Exception as err:  # a probe must never lose the user's training run
            if self.config.strict:
                raise
            out_of_memory = is_out_of_memory(err)
            self.monitor.record_failure(step, err, out_of_memory=out_of_memory)
        if out_of_memory:  # outside the except block: the round's tensors died with its frames
            release_accelerator_memory()
        if result is None:
            self.monitor.skip(step)
            self.publisher.failed(step, args, state)
        else:
            outcome = self.monitor.observe(step, result, partial=partial, main=state.is_world_process_zero)
            self.publisher.round(outcome, result, args, state)
            for event in outcome.events:
                self._fire(event, state, control)
        self._save_state(state)
        return result is not None

    def _run_sharded(
        self, model: Any, tokenizer: Any, panel: ProbePanel | None = None, probes: Sequence[Probe] | None = None
    ) -> tuple[RoundResult, bool]:
        """This rank's shard of the panel (default: in the run's prompt shape), gathered; returns
        the round and whether it is partial."""
        wrapped = getattr(self.trainer, "model_wrapped", None)  # FSDP1 root / DeepSpeed engine
        panel = panel if panel is not None else self.shaped_panel
        probes = probes if probes is not None else self.probes
        return run_sharded_round(model, tokenizer, panel, self.config, probes, wrapped_model=wrapped)

    def _settle_shape(
        self, model: Any, tokenizer: Any, state: Any, *, baseline: bool = False
    ) -> tuple[RoundResult | None, bool]:
        """Choose the run's prompt shape (`FaithConfig.prompt_shape`): with `baseline`, the
        baseline round is the try of the panel as written and is run again in the chosen shape;
        else trial rounds only. A failure leaves the panel as written (a shape never changes
        during a run) and is raised to the caller's round handling."""
        model = model if model is not None else self.trainer.model
        tokenizer = trainer_tokenizer(self.trainer, tokenizer)
        partial = False

        def run(panel: ProbePanel, full: bool) -> RoundResult:
            nonlocal partial
            result, partial = self._run_sharded(model, tokenizer, panel, None if full else self.trial_probes)
            return result

        main = state.is_world_process_zero
        try:
            choice, result = settle_prompt_shape(
                run, self.panel, self.config, has_chat_template=self.has_chat_template, baseline=baseline
            )
        except Exception as err:
            # the error's text may differ between ranks (which rank failed); the saved state may not,
            # so the reason names its type (the error itself is logged by `record_failure`)
            reason = f"choosing a prompt shape failed ({type(err).__name__})"
            self.monitor.set_prompt_shape(pinned_choice(self.config) or kept_as_written(reason), main=main)
            if baseline:
                raise
            self.monitor.record_failure(state.global_step, err)
            return None, False
        self.monitor.set_prompt_shape(choice, state.global_step, main=main)
        return result, partial

    def _fire(self, event: dict[str, Any], state: Any, control: Any) -> None:
        if self.publisher.rule(event, main=state.is_world_process_zero):  # a stop rule: every rank stops
            for target in (control, getattr(self.trainer, "control", None)):
                if target is not None:
                    target.should_training_stop = True

    # ------------------------------------------------------------------ resume
    def _resume(self, args: Any, state: Any) -> None:
        stored = saved_monitor_state(state, self._slot())
        if stored is not None:
            self.monitor.load_state(stored)
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
            self.publisher.drop_rounds_after(args, state.global_step)

    def _slot(self) -> int:
        """This instance's place among the trainer's FaithfulnessCallbacks (each saves its own state)."""
        callbacks = getattr(getattr(self.trainer, "callback_handler", None), "callbacks", None) or []
        mine = [cb for cb in callbacks if isinstance(cb, FaithfulnessCallback)]
        return next((i for i, cb in enumerate(mine) if cb is self), 0)

    def _save_state(self, state: Any) -> None:
        save_monitor_state(state, self._slot(), self.monitor.to_state())


def _best_metric(args: Any) -> str | None:
    return getattr(args, "metric_for_best_model", None)


def _checkpoint_step(path: str | Path) -> int | None:
    name = Path(path).name
    return int(name.split("-", 1)[1]) if name.startswith("checkpoint-") and name.split("-", 1)[1].isdigit() else None


def _saved_checkpoints(output_dir: Path) -> dict[int, str]:
    """The `checkpoint-N` folders in `output_dir` by step (those that save_total_limit kept)."""
    if not output_dir.is_dir():
        return {}
    found = {}
    for path in output_dir.iterdir():
        step = _checkpoint_step(path)
        if step is not None and path.is_dir():
            found[step] = str(path)
    return found
