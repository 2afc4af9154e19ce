"""The `faithcb` command line: scan checkpoints, draw a report, audit SFT data.

```
faithcb scan RUN_DIR_OR_MODELS... --panel PANEL [--out DIR] [--wandb] [FaithConfig flags]
faithcb report RUN_DIR [--out DIR]
faithcb audit-data DATA.jsonl --model PATH [--out DIR] [--cue "Answer:"]
faithcb check-model MODEL_DIR [--panel PANEL] [--examples N]
faithcb check-panel MODEL_DIR PANEL [FaithConfig flags]
```

`python -m faithcb ...` is the same. Expected failures (wrong paths, folders without
checkpoints, unreadable or malformed files) end with one line on stderr and exit status 2;
an unexpected error ends with one line and status 1 (`--debug` shows the traceback).
See docs/cli.md.

The commands' Python entry points are importable from here: `scan_checkpoints`,
`find_checkpoints`, `postprocess_round` (scan), `write_report` (report), `audit_traces`
(audit-data), `check_model` (check-model), `check_panel` (check-panel), with their errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .._errors import FaithcbError
from ..round._validity import invalid_reasons
from ._audit import AuditError, audit_traces
from ._check_model import ModelCheck, check_model
from ._check_panel import PanelCheck, check_panel
from ._report import ReportError, write_report
from ._scan import ScanError, find_checkpoints, postprocess_round, scan_checkpoints

__all__ = [
    "AuditError",
    "CliError",
    "ModelCheck",
    "PanelCheck",
    "ReportError",
    "ScanError",
    "audit_traces",
    "check_model",
    "check_panel",
    "find_checkpoints",
    "main",
    "postprocess_round",
    "scan_checkpoints",
    "write_report",
]

logger = logging.getLogger(__name__)

#: FaithConfig fields that are about the training schedule or the callback, not a round.
_SCHEDULE_FIELDS = ("every_n_steps", "baseline_round", "output_subdir", "strict", "eval_round")
#: FaithConfig fields that matter when reading forced answers from traces (audit-data).
_AUDIT_FIELDS = (
    "answer_max_new_tokens",
    "answer_type",
    "use_chat_template",
    "prompt_template",
    "generation_batch_size",
    "scoring_batch_size",
    "seed",
)


class CliError(FaithcbError):
    """A user-facing error: printed as one line, exit status 2."""


ENGINE_GROUP = "advanced engine options (FaithConfig)"
ENGINE_DESCRIPTION = (
    "How the engine batches, packs and compiles a round: they change its speed and memory, not what it "
    "measures. The defaults suit most runs (docs/performance.md)."
)


def _config_flags(fields: Sequence[str] | None, exclude: Sequence[str], title: str) -> argparse.ArgumentParser:
    """A parent parser with one flag per chosen FaithConfig field (built by HfArgumentParser,
    so the flags read exactly like the ones recipes expose beside SFTConfig).

    The fields users set go in the group `title`; the engine's performance fields
    (`ENGINE_FIELDS`) in the group `ENGINE_GROUP`. Each help text ends with the default, and
    the `--no_X` flag HfArgumentParser adds for a boolean that defaults to True says only that
    it turns `--X` off (instead of repeating its help).
    """
    from transformers import HfArgumentParser

    from .._config import ENGINE_FIELDS, FaithConfig

    hints = typing.get_type_hints(FaithConfig)
    user_specs, engine_specs, defaults = [], [], {}
    for f in dataclasses.fields(FaithConfig):
        if (fields is not None and f.name not in fields) or f.name in exclude:
            continue
        kwargs: dict[str, Any] = {"metadata": f.metadata}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
            defaults[f.name] = f.default
        else:
            kwargs["default_factory"] = f.default_factory
            defaults[f.name] = f.default_factory()
        spec = (f.name, hints[f.name], dataclasses.field(**kwargs))
        (engine_specs if f.name in ENGINE_FIELDS else user_specs).append(spec)
    classes = []
    for name, specs, group in (("FaithConfigFlags", user_specs, title), ("EngineFlags", engine_specs, ENGINE_GROUP)):
        if specs:
            flags = dataclasses.make_dataclass(name, specs)
            flags._argument_group_name = group
            classes.append(flags)
    parser = HfArgumentParser(classes, add_help=False)
    for group in parser._action_groups:
        if group.title == ENGINE_GROUP:
            group.description = ENGINE_DESCRIPTION
    for action in parser._actions:
        if action.dest not in defaults or action.help in (None, argparse.SUPPRESS):
            continue
        if action.option_strings and action.option_strings[0] == f"--no_{action.dest}":
            action.help = f"Turn --{action.dest} off."
        elif defaults[action.dest] is not None and "default" not in action.help.lower():
            action.help = f"{action.help} (default: {_shown(defaults[action.dest])})"
        action.help = action.help.replace("%", "%%")  # argparse formats help with %
    parser.set_defaults(_config_fields=[name for name, _, _ in [*user_specs, *engine_specs]])
    return parser


def _shown(value: Any) -> str:
    """A default as a user would type it on the command line."""
    if isinstance(value, (list, tuple)):
        return " ".join(repr(v) if not v or " " in v or "\n" in v else v for v in map(str, value)) or "none"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _config_from(args: argparse.Namespace) -> Any:
    from .._config import FaithConfig

    values = {name: getattr(args, name) for name in args._config_fields}
    try:
        return FaithConfig(**values)
    except (TypeError, ValueError) as err:
        raise CliError(f"invalid setting: {err}") from err


def _check_model_flags(args: argparse.Namespace) -> None:
    """Refuse a `--device` torch cannot parse or does not have, before any model is loaded."""
    import torch

    if args.device == "auto":
        return
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as err:
        raise CliError(
            f"invalid setting: --device {args.device!r} is not a torch device (use auto, cpu, cuda or cuda:N)."
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"invalid setting: --device {args.device!r} but CUDA is not available; use auto or cpu.")


def _common_flags() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("output and diagnostics")
    group.add_argument("-v", "--verbose", action="store_true", help="Log progress details (INFO) to stderr.")
    group.add_argument("--debug", action="store_true", help="Show the traceback of an unexpected error.")
    return parser


def _model_flags() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("model loading")
    group.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="Tokenizer folder, for model folders that hold none (default: the model folder's own).",
    )
    group.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    group.add_argument("--dtype", default="auto", help="auto (the checkpoint's own), float32, bfloat16 or float16.")
    group.add_argument("--no-progress", action="store_true", help="No progress bar on stderr.")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The `faithcb` argument parser with its subcommands."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="faithcb",
        description="Chain-of-thought faithfulness tools: scan saved checkpoints, draw a report, audit SFT traces.",
        epilog="Run 'faithcb COMMAND --help' for a command's options. Documentation: docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"faithcb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    common = _common_flags()
    model = _model_flags()

    scan = sub.add_parser(
        "scan",
        usage="faithcb scan RUN_DIR_OR_MODELS... --panel PANEL [--out DIR] [--wandb] [options]",
        parents=[common, model, _config_flags(None, _SCHEDULE_FIELDS, "probe round settings (FaithConfig)")],
        help="Evaluate the saved checkpoints of a run with the monitor's probes.",
        description=(
            "Run one probe round per saved checkpoint (the checkpoint-* folders of a Trainer output_dir, sorted "
            "by step, or the model folders given) with the same probes and code path as FaithfulnessCallback; "
            "the first checkpoint is the baseline of every /delta. Writes rounds.jsonl and metrics.jsonl."
        ),
    )
    scan.add_argument("paths", nargs="+", metavar="RUN_DIR_OR_MODELS", help="A run folder, or model folders.")
    scan.add_argument(
        "--panel",
        required=True,
        help="Probe panel: a JSONL file or a folder written by Dataset.save_to_disk (rows as load_panel accepts; "
        "every row needs a readable gold answer unless --allow_missing_gold).",
    )
    scan.add_argument(
        "--out", metavar="DIR", help="Output folder (default: RUN_DIR/faithcb_scan, else ./faithcb_scan)."
    )
    scan.add_argument("--overwrite", action="store_true", help="Replace an earlier scan's files in the output folder.")
    scan.add_argument("--wandb", action="store_true", help="Also log to a W&B run (offline unless WANDB_MODE says).")
    scan.add_argument("--wandb-project", help="W&B project (default: $WANDB_PROJECT, else faithcb).")
    scan.add_argument("--wandb-name", help="W&B run name.")
    scan.set_defaults(func=_cmd_scan)

    report = sub.add_parser(
        "report",
        parents=[common],
        help="Draw PNG figures and a self-contained HTML page from a run's JSONL.",
        description=(
            "Read RUN_DIR/faithcb/metrics.jsonl and rounds.jsonl (or a scan output folder) and write PNG figures "
            "and report.html, with the figures embedded (opens offline)."
        ),
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="Run folder, its faithcb/ folder, or a scan output folder.")
    report.add_argument("--out", metavar="DIR", help="Output folder (default: <data folder>/report).")
    report.add_argument("--title", help="Page title.")
    report.set_defaults(func=_cmd_report)

    audit = sub.add_parser(
        "audit-data",
        usage="faithcb audit-data DATA.jsonl --model PATH [--out DIR] [--cue CUE] [options]",
        parents=[common, model, _config_flags(_AUDIT_FIELDS, (), "answer reading settings (FaithConfig)")],
        help="Find where SFT traces settle their answer; write trimmed data and a random-trim control.",
        description=(
            "For each trace with an answer line, force the model's answer after every prefix of the chain, find the "
            "settle point t (He et al. 2026) and report the post-conclusion tail (n - t)/n. Writes summary.json, "
            "tail_fraction_hist.png, audit.jsonl, trimmed.jsonl and the length-matched random_trim.jsonl."
        ),
    )
    audit.add_argument("data", metavar="DATA.jsonl", help="SFT rows: prompt/completion, question/answer or messages.")
    audit.add_argument("--model", required=True, metavar="PATH", help="Model folder that judges the settle point.")
    audit.add_argument("--out", metavar="DIR", help="Output folder (default: <DATA>_audit next to the data).")
    audit.add_argument("--cue", help="Answer cue of the traces, e.g. 'Answer:' (default: the usual cues).")
    audit.add_argument("--max-rows", type=int, help="Audit only the first N rows.")
    audit.add_argument("--batch-rows", type=int, default=32, help="Rows per engine call (default 32).")
    audit.set_defaults(func=_cmd_audit)

    check = sub.add_parser(
        "check-model",
        parents=[common, model],
        help="Check that a model's round on the engine's fast paths gives the records of plain passes.",
        description=(
            "Run one probe round with every fast path the model supports (packed scoring, the own decode loop) "
            "and one in plain passes (generate, a forward pass per variant), and compare the per-example records. "
            "Exit status 0 when they are the same, 3 when they differ."
        ),
    )
    check.add_argument("model_dir", metavar="MODEL_DIR", help="A save_pretrained folder of a causal LM.")
    check.add_argument("--panel", help="Probe panel JSONL (default: arithmetic questions of the synthetic kit).")
    check.add_argument("--examples", type=int, default=8, help="Examples of the default panel (default 8).")
    check.add_argument("--max-new-tokens", type=int, default=64, help="Token budget of a chain (default 64).")
    check.set_defaults(func=_cmd_check_model)

    check_panel_parser = sub.add_parser(
        "check-panel",
        usage="faithcb check-panel MODEL_DIR PANEL [options]",
        parents=[common, model, _config_flags(None, _SCHEDULE_FIELDS, "probe round settings (FaithConfig)")],
        help="Before training: can the baseline round of this model on this panel be read?",
        description=(
            "Run the round a training run would start with (its prompt shape chosen as the run would choose it): "
            "print how the stated answers were read (per cue, by the fallback, not at all), the prompt shape, three "
            "responses with what was read from each, and a verdict. Exit status 0 when the round can be read, 3 "
            "when it cannot."
        ),
    )
    check_panel_parser.add_argument("model_dir", metavar="MODEL_DIR", help="A save_pretrained folder of a causal LM.")
    check_panel_parser.add_argument(
        "panel", metavar="PANEL", help="Probe panel: a JSONL file, a saved dataset folder or a standard panel's name."
    )
    check_panel_parser.set_defaults(func=_cmd_check_panel)
    return parser


# ---------------------------------------------------------------------- commands
def _cmd_scan(args: argparse.Namespace) -> int:
    from ..probes._facts import summary_keys
    from ._scan import SCAN_SUBDIR, find_checkpoints, scan_checkpoints

    config = _config_from(args)
    _check_model_flags(args)
    checkpoints = find_checkpoints(args.paths)
    if args.out is not None:
        out = Path(args.out)
    elif len(args.paths) == 1 and checkpoints[0].path != Path(args.paths[0]):
        out = Path(args.paths[0]) / SCAN_SUBDIR
    else:
        out = Path(SCAN_SUBDIR)
    result = scan_checkpoints(
        checkpoints,
        args.panel,
        config,
        out_dir=out,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        use_wandb=args.wandb,
        wandb_project=args.wandb_project,
        wandb_name=args.wandb_name,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"Scanned {len(result.history)} checkpoints (steps {', '.join(str(c.step) for c in checkpoints)}).")
    last = result.history[-1]
    reasons = invalid_reasons(last)
    figures = [f"{k}={last[k]:.3f}" for k in summary_keys() if last.get(k) is not None]
    unreadable = [h["step"] for h in result.history if invalid_reasons(h)]
    if reasons:
        print("LAST CHECKPOINT CANNOT BE READ (faith/valid = 0); its figures are not shown:")
        for reason in reasons:
            print(f"  - {reason}")
    elif figures:
        print(f"Last checkpoint: {', '.join(figures)}")
    if unreadable:
        print(f"Unreadable rounds (valid = 0) at steps: {', '.join(str(s) for s in unreadable)}")
    if result.summary is not None:
        print(result.summary.text())
    print(f"Per-example records: {out / 'rounds.jsonl'}")
    print(f"Panel figures:       {out / 'metrics.jsonl'}")
    if result.wandb_dir:
        print(f"W&B run:             {result.wandb_dir}")
        if os.environ.get("WANDB_MODE", "offline") == "offline" or "offline-run" in result.wandb_dir:
            print(f"Upload later with:   wandb sync {result.wandb_dir}")
    print(f"Draw a report with:  faithcb report {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ._report import write_report

    result = write_report(args.run_dir, args.out, title=args.title)
    print(f"Report: {result.html}")
    print(f"Figures ({len(result.figures)}): {result.html.parent}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from ._audit import audit_traces

    config = _config_from(args)
    _check_model_flags(args)
    data = Path(args.data)
    out = Path(args.out) if args.out is not None else data.with_name(f"{data.stem}_audit")
    result = audit_traces(
        data,
        args.model,
        out_dir=out,
        cue=args.cue,
        tokenizer=args.tokenizer,
        config=config,
        seed=config.seed,
        max_rows=args.max_rows,
        batch_rows=args.batch_rows,
        device=args.device,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    s = result.summary
    tail = s["tail_fraction"]
    print(
        f"Audited {s['audited']} of {s['rows']} rows: {s['settled']} settled, {s['unsettled']} unsettled, "
        f"{s['skipped']} skipped."
    )
    if tail["mean"] is not None:
        print(
            f"Post-conclusion tail (n - t)/n: mean {tail['mean']:.3f}, median {tail['median']:.3f}, "
            f"p90 {tail['p90']:.3f}; {tail['share_positive']:.0%} of settled traces have a tail; "
            f"{s['steps']['removed']} of {s['steps']['total']} steps trimmed."
        )
    for name, path in result.files.items():
        print(f"  {name:<24} {path}")
    return 0


def _cmd_check_model(args: argparse.Namespace) -> int:
    from .._config import FaithConfig
    from ._check_model import check_model
    from ._scan import load_model, load_tokenizer

    if args.examples < 1 or args.max_new_tokens < 1:
        raise CliError("--examples and --max-new-tokens must be at least 1.")
    model = load_model(args.model_dir, device=args.device, dtype=args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.model_dir)
    report = check_model(
        model, tokenizer, args.panel, FaithConfig(max_new_tokens=args.max_new_tokens), examples=args.examples
    )
    print(report.summary())
    return 0 if report.records_equal else 3


def _cmd_check_panel(args: argparse.Namespace) -> int:
    from ._check_panel import check_panel
    from ._scan import load_model, load_tokenizer

    config = _config_from(args)
    _check_model_flags(args)
    model = load_model(args.model_dir, device=args.device, dtype=args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.model_dir)
    report = check_panel(model, tokenizer, args.panel, config)
    print(report.summary())
    return 0 if report.readable else 3


# ---------------------------------------------------------------------- entry point
def _quiet_libraries() -> Callable[[], None]:
    """No per-file progress bars or info chatter from transformers (our own bar shows progress).

    Returns:
        A function that puts the previous settings back (main() may run inside a larger process).
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    def restore() -> None:
        hf_logging.set_verbosity(verbosity)
        if not bars_disabled:
            hf_logging.enable_progress_bar()

    return restore


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _expected_errors() -> tuple[type[BaseException], ...]:
    from ..data._panel import PanelError
    from ._audit import AuditError
    from ._report import ReportError
    from ._scan import ScanError

    return (CliError, ScanError, ReportError, AuditError, PanelError, FileNotFoundError, NotADirectoryError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `faithcb` command line.

    Args:
        argv: Arguments (default: `sys.argv[1:]`).

    Returns:
        Exit status: 0 on success, 2 for a usage or input error, 1 for an unexpected error,
        130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    restore = _quiet_libraries() if not args.verbose else None
    prog = f"faithcb {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except _expected_errors() as err:
        if args.debug:
            raise
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if args.debug:
            raise
        print(
            f"{prog}: error: {type(err).__name__}: {_one_line(err)} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        if restore is not None:
            restore()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
