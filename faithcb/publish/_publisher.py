"""Where a training run's rounds go: the JSONL files, the trainer's log stream, W&B, the console.

`RoundPublisher` takes what the `Monitor` made of a round and sends it on; every sink is a
convenience that must never end the training run, so each failure is logged once and the
others go on.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._config import FaithConfig
from ..engine._patches import log_beside_training
from ..monitor._monitor import Monitor, RoundOutcome
from ..monitor._stop_rules import format_event
from ..round._probe_round import RoundResult
from ._sinks import JsonlSink, log_wandb_round, round_line

logger = logging.getLogger(__name__)
#: Logger of the one console line per round.
CONSOLE_LOGGER = "faithcb.rounds"


class RoundPublisher:
    """Sends a training run's rounds to the JSONL files, the trainer's log stream, W&B and the console.

    Args:
        trainer: The trainer whose `log` carries the figures.
        config: Round settings (log prefix, output folder, W&B media).
        monitor: The run's monitor (early-answering curves, warn-once bookkeeping).
    """

    def __init__(self, trainer: Any, config: FaithConfig, monitor: Monitor) -> None:
        self.trainer = trainer
        self.config = config
        self.monitor = monitor

    def jsonl(self, args: Any) -> JsonlSink:
        """The run's JSONL files (`<output_dir>/<output_subdir>`)."""
        return JsonlSink(Path(args.output_dir) / self.config.output_subdir)

    def round(self, outcome: RoundOutcome, result: RoundResult, args: Any, state: Any) -> None:
        """A round's figures to the JSONL files (main process), the log stream and the console line."""
        main = state.is_world_process_zero
        if main:
            try:
                self.jsonl(args).write(
                    step=outcome.step,
                    round_index=outcome.round_index,
                    metrics=outcome.jsonl_metrics,
                    records=result.records,
                )
            except Exception:  # a full disk must not end the training run
                self.monitor.warn_once(
                    "jsonl", "faithcb: writing the round's JSONL failed at step %d.", outcome.step, exc_info=True
                )
        self.log(outcome.logs, args=args, state=state, metrics=outcome.metrics, records=result.records)
        if main:
            line = round_line(
                step=outcome.step,
                round_index=outcome.round_index,
                metrics=outcome.metrics,
                seconds=result.seconds,
                examples=len(result.records),
                baseline_step=self.monitor.baseline_step,
                partial=outcome.partial,
            )
            console().info("%s", line)

    def failed(self, step: int, args: Any, state: Any) -> None:
        """A failed round: `<prefix>/round_failed` = 1 in the log stream and a console line."""
        failed = {"round_failed": 1.0}
        self.log({f"{self.config.log_prefix}/round_failed": 1.0}, args=args, state=state, metrics=failed)
        if state.is_world_process_zero:
            console().info("faithcb step %d: the probe round failed and logged no figures (see the warning).", step)

    def log(
        self,
        logs: dict[str, float],
        *,
        args: Any = None,
        state: Any = None,
        metrics: dict[str, Any] | None = None,
        records: Sequence[dict[str, Any]] = (),
    ) -> None:
        """Send figures to the trainer's log stream; a round's (`metrics` given) to W&B sections of its own.

        With W&B in `report_to` and an active run, the round goes to the run directly (headline,
        drift, detail and interval sections, media) and transformers' `WandbCallback` is left
        out of this one `trainer.log` call, which would log the figures again as `train/faith/...`.
        """
        leave_out_wandb = False
        if metrics is not None and args is not None and state is not None and reports_to(args, "wandb"):
            if not state.is_world_process_zero:
                leave_out_wandb = True  # the integration logs on the main process only
            elif wandb_run() is not None:
                leave_out_wandb = self._log_wandb(state.global_step, metrics, records)
        log_beside_training(self.trainer, logs, leave_out_wandb=leave_out_wandb)

    def _log_wandb(self, step: int, metrics: dict[str, Any], records: Sequence[dict[str, Any]]) -> bool:
        try:
            return log_wandb_round(
                step=step,
                metrics=metrics,
                records=records,
                curves=self.monitor.curves,
                num_samples=self.config.num_sample_chains,
                prefix=self.config.log_prefix,
                media=self.config.wandb_media and bool(records),
                example_fields=list(self.monitor.example_fields),
                # the baseline round's own table shows no change against itself
                baseline_examples=None if self.monitor.baseline_step == step else self.monitor.baseline_examples,
            )
        except Exception:  # W&B is a convenience; never lose the run over it (the integration gets them)
            self.monitor.warn_once("wandb", "faithcb: logging the round to W&B failed at step %d.", step, exc_info=True)
            return False

    def rule(self, event: dict[str, Any], *, main: bool) -> bool:
        """Announce a fired rule (a warning; on the main process, W&B); returns whether it stops training."""
        stop = event["action"] == "stop"
        text = (
            f"faithcb: {'stop' if stop else 'alert'} rule '{event['rule']}' fired at step {event['step']}: "
            f"{format_event(event)}; {'stopping training' if stop else 'training goes on'}."
        )
        logger.warning(text)
        if main:
            report_rule_to_wandb(event, text, self.config.log_prefix)
        return stop

    def drop_rounds_after(self, args: Any, step: int) -> None:
        """On resume: JSONL lines of rounds after `step` came from the abandoned run; they run again."""
        try:
            removed = self.jsonl(args).drop_after(step)
        except Exception:  # an unreadable file must not end the training run
            self.monitor.warn_once("jsonl", "faithcb: could not clean the JSONL files on resume.", exc_info=True)
            return
        if removed:
            logger.info("faithcb: removed %d JSONL round(s) after step %d; they run again on resume.", removed, step)


def reports_to(args: Any, name: str) -> bool:
    """Whether `TrainingArguments.report_to` names this integration (or `all`)."""
    report_to = getattr(args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [report_to]
    return name in report_to or "all" in report_to


def wandb_run() -> Any:
    """The active W&B run, without importing wandb when nothing imported it."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None) if wandb is not None else None


def report_rule_to_wandb(event: dict[str, Any], text: str, prefix: str) -> None:
    """A fired rule on the active W&B run: the run summary for a stop, `wandb.alert` for an alert."""
    run = wandb_run()
    if run is None:
        return
    try:
        if event["action"] == "stop":
            run.summary[f"{prefix}/stopped_by"] = event["rule"]
            run.summary[f"{prefix}/stopped_at_step"] = event["step"]
        else:
            import wandb

            wandb.alert(title=f"faithcb: {event['rule']}", text=text, level=wandb.AlertLevel.WARN)
    except Exception:
        logger.warning("faithcb: reporting the rule to W&B failed.", exc_info=True)


# ---------------------------------------------------------------------- console
class _ConsoleHandler(logging.StreamHandler):
    """Writes through `tqdm.write` so that a line never cuts through a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def console(name: str = CONSOLE_LOGGER) -> logging.Logger:
    """The logger of the one-line round summaries (`faithcb.rounds`, INFO), or of another console
    block of the library (`faithcb.summary`: the end-of-run summary).

    The lines are shown by default: unless a level was set on `faithcb` or on the logger itself,
    the logger takes INFO; where logging is not configured at all (no handler on it or any
    parent, root included), it gets a stderr handler of its own, as transformers does for its
    logger. `logging.getLogger("faithcb.rounds").setLevel(logging.WARNING)` silences them.
    """
    shown = logging.getLogger(name)
    if shown.level == logging.NOTSET and logging.getLogger("faithcb").level == logging.NOTSET:
        shown.setLevel(logging.INFO)
    if not shown.hasHandlers():
        handler = _ConsoleHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        shown.addHandler(handler)
        shown.propagate = False
    return shown
