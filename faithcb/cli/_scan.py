"""Scan saved checkpoints of a run that was not instrumented, with the callback's own probes.

`faithcb scan` (see `faithcb.cli`) loads each `checkpoint-N` folder of a training run (or an
explicit list of model folders), runs one probe round per checkpoint through the same code
path as `FaithfulnessCallback` (`run_probe_round` on the fixed panel, then the same `Monitor`:
`/delta` against the first checkpoint, validity, `faith/` prefix), and writes the same JSONL
files (`rounds.jsonl`, `metrics.jsonl`) and, if asked, a W&B run whose x-axis is the
checkpoint step.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._config import FaithConfig
from .._errors import FaithcbError, RoundBudgetExceeded
from ..data._panel import ProbeExample, ProbePanel, panel_from
from ..data._prompt_shape import kept_as_written, settle_prompt_shape, shaped_panel
from ..monitor._monitor import Monitor, RoundOutcome
from ..monitor._monitor import postprocess_round as postprocess_round  # public as faithcb.cli.postprocess_round
from ..monitor._summary import SUMMARY_FILE, RunSummary, summarize_run
from ..probes._facts import summary_keys
from ..publish._sinks import JsonlSink, define_wandb_sections, wandb_figures, wandb_media
from ..round._probe_round import build_probes, finish_round, run_probe_round
from ..round._sharded import release_accelerator_memory

logger = logging.getLogger(__name__)

#: Default output folder of a scan, under the run folder.
SCAN_SUBDIR = "faithcb_scan"
#: W&B x-axis of a scan.
STEP_KEY = "checkpoint/step"

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ScanError(FaithcbError, ValueError):
    """A scan cannot start or go on: a bad path, a folder without checkpoints, a bad checkpoint."""


# ---------------------------------------------------------------------- checkpoints
@dataclass(frozen=True)
class Checkpoint:
    """One model folder to scan.

    Attributes:
        step: Its training step (from `checkpoint-N`, else its position in the list).
        path: The folder (`save_pretrained` output).
    """

    step: int
    path: Path


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def _checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def find_checkpoints(paths: Sequence[str | Path]) -> list[Checkpoint]:
    """The checkpoints a scan visits, in order.

    One run folder (a Trainer `output_dir`) gives its `checkpoint-*` subfolders sorted by step.
    One model folder without checkpoint subfolders, or several folders, are taken as given,
    in the given order; the step of each is parsed from a `checkpoint-N` name, else it is the
    folder's position in the list.

    Args:
        paths: A run folder, or model folders.

    Returns:
        The checkpoints (at least one).

    Raises:
        ScanError: A path that does not exist or is not a folder, a run folder without
            checkpoints, a checkpoint without `config.json`.
    """
    if not paths:
        raise ScanError("Give a run folder or at least one model folder to scan.")
    folders = [Path(p) for p in paths]
    for folder in folders:
        if not folder.exists():
            raise ScanError(f"No such file or folder: {folder}")
        if not folder.is_dir():
            raise ScanError(f"Not a folder: {folder} (give a run folder or model folders)")
    if len(folders) == 1:
        run = folders[0]
        found = [(step, p) for p in run.iterdir() if p.is_dir() and (step := _checkpoint_step(p)) is not None]
        if found:
            checkpoints = [Checkpoint(step, p) for step, p in sorted(found, key=lambda sp: (sp[0], sp[1].name))]
        elif _is_model_dir(run):
            checkpoints = [Checkpoint(_checkpoint_step(run) or 0, run)]
        else:
            raise ScanError(f"No checkpoint-* folders (and no config.json) in {run}: nothing to scan.")
    else:
        checkpoints = [
            Checkpoint(step if (step := _checkpoint_step(p)) is not None else i, p) for i, p in enumerate(folders)
        ]
    for ckpt in checkpoints:
        if not _is_model_dir(ckpt.path):
            raise ScanError(f"Not a model folder (no config.json): {ckpt.path}")
    steps = [c.step for c in checkpoints]
    if len(set(steps)) != len(steps):
        logger.warning("faithcb scan: several checkpoints share a step (%s); their points overlap.", steps)
    return checkpoints


# ---------------------------------------------------------------------- loading
def resolve_device(device: str = "auto") -> str:
    """`auto` -> `cuda` when available, else `cpu`; any other value is passed through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: str | Path, *, device: str = "auto", dtype: str = "auto") -> Any:
    """Load a causal LM with `AutoModelForCausalLM.from_pretrained`, in eval mode on `device`.

    Args:
        path: A `save_pretrained` folder.
        device: `auto`, `cpu`, `cuda`, `cuda:1`, ...
        dtype: `auto` (the checkpoint's own dtype) or a torch dtype name (`float32`, `bfloat16`).

    Raises:
        ScanError: The folder cannot be loaded as a causal LM.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype: Any = "auto"
    if dtype != "auto":
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ScanError(f"Unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16.")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ScanError(f"Cannot load a causal LM from {path}: {_one_line(err)}") from err
    model.to(resolve_device(device))
    model.eval()
    return model


def load_tokenizer(path: str | Path) -> Any:
    """Load a tokenizer with `AutoTokenizer.from_pretrained`.

    Raises:
        ScanError: The folder holds no loadable tokenizer.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise ScanError(f"Tokenizer path not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ScanError(f"Cannot load a tokenizer from {path}: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------- W&B
def wandb_mode() -> str:
    """W&B mode: `WANDB_MODE` when set, else `online` with credentials and `offline` without."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import netrc

    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return "offline"
    return "online" if any(h.startswith("api.wandb.ai") for h in hosts) else "offline"


def _start_wandb(*, project: str | None, name: str | None, config: dict[str, Any], prefix: str) -> Any:
    try:
        import wandb
    except ImportError as err:
        raise ScanError("--wandb needs the wandb package: pip install 'faithcb[wandb]'.") from err
    run = wandb.init(
        project=project or os.environ.get("WANDB_PROJECT") or "faithcb",
        name=name,
        job_type="faithcb-scan",
        config=config,
        mode=wandb_mode(),
    )
    run.define_metric(STEP_KEY)
    return run


# ---------------------------------------------------------------------- the scan
@dataclass
class ScanResult:
    """What a scan produced.

    Attributes:
        out_dir: Folder of `rounds.jsonl`, `metrics.jsonl` and `scan.json`.
        history: One dict per checkpoint: `step`, `checkpoint` and the round's figures.
        wandb_dir: Local folder of the W&B run, or None.
        summary: The scan summed up (rounds, validity of the last, headline figures from the first
            checkpoint to the last with their paired drift intervals, the most faithful checkpoint);
            also in `<out_dir>/summary.json`.
    """

    out_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    wandb_dir: str | None = None
    summary: RunSummary | None = None


def scan_checkpoints(
    checkpoints: Sequence[Checkpoint],
    panel: ProbePanel | str | Path | Sequence[Mapping[str, Any] | ProbeExample] | Any,
    config: FaithConfig | None = None,
    *,
    out_dir: str | Path,
    tokenizer: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    use_wandb: bool = False,
    wandb_project: str | None = None,
    wandb_name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ScanResult:
    """Run one probe round per checkpoint and write what the callback would have written.

    The first checkpoint is the baseline of every `/delta`. The per-example records and panel
    figures go to `<out_dir>/rounds.jsonl` and `<out_dir>/metrics.jsonl` (`step` = checkpoint
    step, `round` = position in the scan); `<out_dir>/scan.json` lists the checkpoints and the
    settings.

    Args:
        checkpoints: From `find_checkpoints`.
        panel: The probe panel, in any form the callback takes: a JSONL path, a list of dicts, a
            `datasets.Dataset`, a `ProbePanel` or a list of `ProbeExample`s (see `faithcb.load_panel`);
            `config.panel_size` subsamples it once, `config.allow_missing_gold` keeps gold-less rows.
        config: Round settings (default `FaithConfig()`).
        out_dir: Output folder.
        tokenizer: Tokenizer folder for checkpoints that hold none (and used for all when given).
        device: Where the model runs (`auto`: CUDA if available).
        dtype: `auto` or a torch dtype name.
        use_wandb: Also log to a W&B run (mode from `WANDB_MODE`; offline without credentials),
            with `checkpoint/step` as the x-axis of every `faith/*` key.
        wandb_project: W&B project (default `WANDB_PROJECT`, else `faithcb`).
        wandb_name: W&B run name.
        overwrite: Replace an earlier scan's files in `out_dir` instead of refusing.
        progress: Show a progress bar over checkpoints on stderr.

    Returns:
        The output folder, the per-checkpoint figures and the W&B run folder.

    Raises:
        ScanError: Bad checkpoints or tokenizer, or `out_dir` already holds results.
        PanelError: A malformed panel.
    """
    config = config if config is not None else FaithConfig()
    if not checkpoints:
        raise ScanError("No checkpoints to scan.")
    panel = panel_from(panel, config)
    logger.info("faithcb scan: %s", panel.describe())
    out = Path(out_dir)
    sink = _empty_sink(out, overwrite)
    shared_tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else None
    if shared_tokenizer is None:
        missing = [str(c.path) for c in checkpoints if not _has_tokenizer(c.path)]
        if missing:
            raise ScanError(f"Checkpoint {missing[0]} holds no tokenizer files; pass --tokenizer PATH.")
    probes = build_probes(config)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "checkpoints": [{"step": c.step, "path": str(c.path)} for c in checkpoints],
        "panel": panel.source,
        "panel_size": len(panel),
        "tokenizer": str(tokenizer) if tokenizer is not None else None,
        "device": resolve_device(device),
        "dtype": dtype,
        "config": config.to_dict(),
    }
    (out / "scan.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    run = None
    if use_wandb:
        run = _start_wandb(
            project=wandb_project,
            name=wandb_name,
            config={"faithcb": config.to_dict(), "scan": manifest},
            prefix=config.log_prefix,
        )
    result = ScanResult(out_dir=out)
    monitor = Monitor(config, probes, slices=panel.slices, panel_size=len(panel))
    from tqdm import tqdm

    bar = tqdm(checkpoints, desc="faithcb scan", unit="ckpt", file=sys.stderr, disable=not progress, leave=True)
    exit_code = 1
    try:
        for ckpt in bar:
            bar.set_postfix_str(f"step {ckpt.step}")
            tok = shared_tokenizer if shared_tokenizer is not None else load_tokenizer(ckpt.path)
            model = load_model(ckpt.path, device=device, dtype=dtype)
            partial = False
            try:
                round_result = _scan_round(model, tok, panel, config, probes, monitor, ckpt.step)
            except RoundBudgetExceeded as err:  # as the callback: figures of the examples that finished
                if monitor.prompt_shape is None:
                    monitor.set_prompt_shape(kept_as_written(f"the first round ran out of time ({_one_line(err)})"))
                if not err.records:
                    raise ScanError(f"Checkpoint {ckpt.path}: {_one_line(err)}") from err
                seconds = err.seconds or 0.0
                round_result, partial = finish_round(err.records, probes, config, seconds=seconds, partial=True), True
            finally:
                del model
                release_accelerator_memory()
            outcome = monitor.observe(ckpt.step, round_result, partial=partial)
            sink.write(
                step=ckpt.step,
                round_index=outcome.round_index,
                metrics=outcome.jsonl_metrics,
                records=round_result.records,
            )
            result.history.append({"step": ckpt.step, "checkpoint": str(ckpt.path), **outcome.metrics})
            if run is not None:
                _log_wandb(run, outcome, round_result.records, monitor, config)
            logger.info(
                "faithcb scan: checkpoint %s (step %d): %d examples in %.1fs (%s)",
                ckpt.path,
                ckpt.step,
                len(round_result.records),
                round_result.seconds,
                ", ".join(
                    f"{k}={outcome.metrics[k]:.3f}" for k in summary_keys() if outcome.metrics.get(k) is not None
                ),
            )
        result.summary = _summary(result, monitor, checkpoints, panel, out)
        exit_code = 0
    finally:
        bar.close()
        if run is not None:
            if wandb_mode() != "disabled" and getattr(run, "dir", None):
                result.wandb_dir = str(Path(run.dir).parent)
            run.finish(exit_code=exit_code)
    return result


def _summary(
    result: ScanResult, monitor: Monitor, checkpoints: Sequence[Checkpoint], panel: ProbePanel, out: Path
) -> RunSummary | None:
    """The scan's summary, also written to `<out>/summary.json`; None (with a warning) when it fails:
    the rounds are on disk already."""
    try:
        summary = summarize_run(
            result.history,
            baseline_step=monitor.baseline_step,
            score_key=monitor.score_key,
            checkpoints={c.step: str(c.path) for c in checkpoints},
            files={"figures and records": f"{out} (metrics.jsonl, rounds.jsonl, {SUMMARY_FILE})"},
            panel=f"{panel.source}, {len(panel)} examples",
            step_label="checkpoint step",
        )
        (out / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    except Exception:
        logger.warning("faithcb scan: summing the scan up failed.", exc_info=True)
        return None
    return summary


def _scan_round(
    model: Any,
    tokenizer: Any,
    panel: ProbePanel,
    config: FaithConfig,
    probes: Sequence[Any],
    monitor: Monitor,
    step: int,
) -> Any:
    """One checkpoint's round in the run's prompt shape; the first checkpoint chooses the shape
    as the callback's baseline round does (`FaithConfig.prompt_shape`)."""
    if monitor.prompt_shape is not None:
        return run_probe_round(model, tokenizer, shaped_panel(panel, monitor.prompt_shape, config), config, probes)
    trial = build_probes(config, [])

    def run(shaped: ProbePanel, full: bool) -> Any:
        return run_probe_round(model, tokenizer, shaped, config, probes if full else trial)

    has_template = getattr(tokenizer, "chat_template", None) is not None
    choice, result = settle_prompt_shape(run, panel, config, has_chat_template=has_template)
    monitor.set_prompt_shape(choice, step)
    return result


def _empty_sink(out: Path, overwrite: bool) -> JsonlSink:
    """The scan's JSONL files in `out`, refusing (or with `overwrite`, removing) an earlier scan's."""
    sink = JsonlSink(out)
    if out.exists() and not out.is_dir():
        raise ScanError(f"Output path exists and is not a folder: {out}")
    existing = [p for p in (sink.metrics_path, sink.records_path) if p.exists()]
    if existing and not overwrite:
        raise ScanError(f"{out} already holds results ({existing[0].name}); pass --overwrite or choose another --out.")
    for path in [*existing, out / SUMMARY_FILE]:
        path.unlink(missing_ok=True)
    return sink


def _log_wandb(
    run: Any, outcome: RoundOutcome, records: list[dict[str, Any]], monitor: Monitor, config: FaithConfig
) -> None:
    """One checkpoint's round in the callback's W&B sections, at `checkpoint/step`."""
    figures = wandb_figures(outcome.metrics, config.log_prefix)
    define_wandb_sections(run, figures, config.log_prefix, STEP_KEY)
    payload: dict[str, Any] = {STEP_KEY: outcome.step, **figures}
    if config.wandb_media:
        try:
            payload.update(
                wandb_media(
                    step=outcome.step,
                    records=records,
                    curves=monitor.curves,
                    num_samples=config.num_sample_chains,
                    prefix=config.log_prefix,
                    curve_label="checkpoint",
                    example_fields=list(monitor.example_fields),
                    baseline_examples=None if outcome.is_baseline else monitor.baseline_examples,
                )
            )
        except Exception:  # media are a convenience; never lose the scan over them
            logger.warning("faithcb scan: W&B media failed at step %d.", outcome.step, exc_info=True)
    run.log(payload)
