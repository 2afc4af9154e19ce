"""`FaithfulnessCallback`: the live monitor that rides along a `Trainer` / `SFTTrainer` run."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ._config import FaithConfig
from ._panel import ProbePanel, load_panel
from ._round import RoundResult, build_probes, run_probe_round
from ._sinks import JsonlSink, early_answer_curve, log_wandb_media
from .probes import Probe

logger = logging.getLogger(__name__)

_DRIFT_SKIP = ("/ci_low", "/ci_high", "/stderr", "/delta")


class FaithfulnessCallback(TrainerCallback, ExportableState):
    """Measures chain-of-thought faithfulness of the live model every N steps.

    A round lets the model reason on a fixed panel of held-out prompts, perturbs the chains
    (early answering, filler, ...), and logs `faith/...` figures through `trainer.log`, so
    they reach `log_history`, W&B, TensorBoard and every other `report_to` integration beside
    the loss, at the training step. Per-example records go to
    `<output_dir>/faithcb/rounds.jsonl`. A round runs in eval mode without gradients and then
    restores the training state exactly; an error inside a round is logged and training goes
    on (unless `config.strict`).

    Usage:
    ```python
    from faithcb import FaithConfig, FaithfulnessCallback

    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_dataset)
    trainer.add_callback(
        FaithfulnessCallback(trainer, panel="heldout_cot.jsonl", config=FaithConfig(every_n_steps=100))
    )
    trainer.train()
    ```

    Args:
        trainer: The `Trainer` (or `SFTTrainer`) to monitor; its `log` carries the metrics.
        panel: Held-out CoT examples: a JSONL path, a `datasets.Dataset`, a list of dicts or a
            `ProbePanel` (see `faithcb.load_panel` for the row shapes).
        config: Round settings and schedule (default `FaithConfig()`).
        probes: Probe names or instances overriding `config.probes`.
    """

    def __init__(
        self,
        trainer: Any,
        panel: str | Path | ProbePanel | Sequence[dict] | Any,
        *,
        config: FaithConfig | None = None,
        probes: Sequence[str | Probe] | None = None,
    ) -> None:
        if not hasattr(trainer, "log") or not hasattr(trainer, "state"):
            raise ValueError(
                "FaithfulnessCallback needs the Trainer it monitors as first argument "
                f"(got {type(trainer).__name__}); use FaithfulnessCallback(trainer, panel=...)."
            )
        self.trainer = trainer
        self.config = config if config is not None else FaithConfig()
        self.panel = load_panel(panel, size=self.config.panel_size, seed=self.config.seed)
        self.probes = build_probes(self.config, probes)
        self.baseline: dict[str, float] | None = None
        self.history: list[dict[str, Any]] = []
        self.curves: list[tuple[int, list[float | None]]] = []
        self.last_round_step: int | None = None
        self.failures: dict[str, int] = {}
        self.last_result: RoundResult | None = None

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        """Resumable state (saved with checkpoints through `ExportableState`)."""
        return {
            "args": {},
            "attributes": {
                "baseline": self.baseline,
                "history": self.history,
                "curves": [[s, c] for s, c in self.curves],
                "last_round_step": self.last_round_step,
            },
        }

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.config.baseline_round and self.baseline is None and state.global_step == 0:
            self._round(args, state, model, processing_class)
        return control

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        step = state.global_step
        if step > 0 and step % self.config.every_n_steps == 0 and step != self.last_round_step:
            self._round(args, state, model, processing_class)
        return control

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

    def _round(self, args: Any, state: Any, model: Any, processing_class: Any) -> None:
        step = state.global_step
        self.last_round_step = step
        try:
            result = self._run_sharded(
                model if model is not None else self.trainer.model, self._tokenizer(processing_class)
            )
        except Exception as err:  # a probe must never lose the user's training run
            if self.config.strict:
                raise
            cause = f"{type(err).__name__}: {err}"
            self.failures[cause] = self.failures.get(cause, 0) + 1
            if self.failures[cause] == 1:
                logger.warning(
                    "faithcb: probe round at step %d failed and was skipped (%s).", step, cause, exc_info=True
                )
            self._log({f"{self.config.log_prefix}/round_failed": 1.0})
            return
        self.last_result = result
        metrics = dict(result.metrics)
        if self.baseline is None:
            self.baseline = {k: v for k, v in metrics.items() if not k.endswith(_DRIFT_SKIP)}
        else:
            for key, value in list(metrics.items()):
                base = self.baseline.get(key)
                if base is not None and not key.endswith(_DRIFT_SKIP) and not key.startswith("slice/"):
                    metrics[f"{key}/delta"] = value - base
        metrics["round_seconds"] = result.seconds
        prefix = self.config.log_prefix
        logs = {f"{prefix}/{k}": float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        round_index = len(self.history)
        self.history.append({"step": step, **metrics})
        curve = early_answer_curve(result.records)
        self.curves.append((step, curve))
        if state.is_world_process_zero:
            JsonlSink(Path(args.output_dir) / self.config.output_subdir).write(
                step=step, round_index=round_index, metrics=metrics, records=result.records
            )
        self._log(logs)
        if state.is_world_process_zero and self.config.wandb_media and _reports_to(args, "wandb"):
            try:
                log_wandb_media(
                    step=step,
                    records=result.records,
                    curves=self.curves,
                    num_samples=self.config.num_sample_chains,
                    prefix=prefix,
                )
            except Exception:  # media are a convenience; never lose the run over them
                logger.warning("faithcb: logging W&B media failed at step %d.", step, exc_info=True)
        logger.info(
            "faithcb round %d at step %d: %d examples in %.1fs (%s)",
            round_index,
            step,
            len(result.records),
            result.seconds,
            ", ".join(
                f"{k}={metrics[k]:.3f}" for k in ("accuracy", "early_answer/aoc", "filler/match") if k in metrics
            ),
        )

    def _log(self, logs: dict[str, float]) -> None:
        """Send logs through `trainer.log` (log_history + every report_to integration).

        `CallbackHandler.on_log` clears `control.should_log`; called from `on_step_end`, that
        would drop the trainer's own loss log of this step, so the flag is put back.
        """
        control = getattr(self.trainer, "control", None)
        should_log = getattr(control, "should_log", None)
        self.trainer.log(logs)
        control = getattr(self.trainer, "control", None)
        if should_log is not None and control is not None:
            control.should_log = should_log

    def _run_sharded(self, model: Any, tokenizer: Any) -> RoundResult:
        """Run this rank's shard of the panel and gather every rank's records."""
        from accelerate import PartialState
        from accelerate.utils import gather_object

        from ._aggregate import aggregate_records

        examples = list(self.panel)
        distributed = PartialState().num_processes > 1
        if not distributed:
            return run_probe_round(model, tokenizer, examples, self.config, self.probes)
        with PartialState().split_between_processes(examples, apply_padding=True) as shard:
            local = run_probe_round(model, tokenizer, shard, self.config, self.probes)
        records = gather_object(local.records)[: len(examples)]
        seconds = max(gather_object([local.seconds]))
        return RoundResult(
            metrics=aggregate_records(records, self.probes), records=records, seconds=seconds, calls=local.calls
        )


def _reports_to(args: Any, name: str) -> bool:
    report_to = getattr(args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [report_to]
    return name in report_to or "all" in report_to
