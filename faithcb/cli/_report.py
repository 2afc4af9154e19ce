"""A static report of a run's faithfulness figures: PNG figures and one self-contained HTML page.

`faithcb report RUN_DIR` (see `faithcb.cli`) reads the JSONL files the callback (or
`faithcb scan`) wrote, `metrics.jsonl` (panel figures per round) and `rounds.jsonl`
(per-example records), and draws:

- each main metric against the step, with its 95% interval band (Wilson `ci_low`/`ci_high`,
  else +-1.96 standard errors) and accuracy on a twin axis;
- the family of early-answering curves (one per round, coloured by step);
- per-slice panels when the panel has several slices;
- the run's summary block (as the end of training logs it: rounds, validity, headline figures
  baseline -> last with their paired drift intervals, rules fired, the most faithful checkpoint);
- a table of the last round's figures;
- a few sample chains of every round (the same panel examples each round), with what the
  perturbations made of them: where the early answer settled, the filler answer, the
  corrupted step and the answer after it, so a reader sees what moved when a figure moved.

The HTML page embeds the PNGs as base64 data URIs: no external asset, it opens offline.
Matplotlib is used through its object API with the Agg canvas (no pyplot, no global backend
change).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import FaithcbError
from ..data._jsonl import iter_jsonl
from ..monitor._summary import SUMMARY_FILE, RunSummary, summarize_run
from ..probes import registered_figures
from ..probes._facts import report_figures
from ..publish._sinks import CURVE_GRID, early_answer_curve
from ..round._validity import invalid_reasons

logger = logging.getLogger(__name__)

#: Where the JSONL files may sit under a run folder (the callback's and the scan's defaults).
DATA_SUBDIRS = ("faithcb", "faithcb_scan")


def main_metrics() -> dict[str, tuple[str, str]]:
    """The report's main metrics, in display order: key -> (title, which direction reads as
    faithful), as the round and the registered probes declare them (`Figure.report`)."""
    return {f.key: (f.title or f.key, f.reading) for f in report_figures()}


def unit_metrics() -> frozenset[str]:
    """Metrics whose values lie in [0, 1] (bands are clipped there): `Figure.unit == "share"`."""
    return frozenset(f.key for f in registered_figures() if f.unit == "share")


def slice_metrics() -> tuple[str, ...]:
    """Metrics drawn per slice (`Figure.slice_panel`), in report order."""
    return tuple(f.key for f in report_figures() if f.slice_panel)


def gap_reasons() -> dict[str, str]:
    """Why a figure may be missing from a round, by metric (`Figure.gap`)."""
    return {f.key: f.gap for f in registered_figures() if f.gap}


# Snapshots of the registry when this module is imported (the built-in probes' figures); the
# report itself calls the functions above, which read the live registry.
MAIN_METRICS: dict[str, tuple[str, str]] = main_metrics()
UNIT_METRICS = unit_metrics()
SLICE_METRICS = slice_metrics()

_Z95 = 1.959963984540054
_DPI = 110
_PIXEL_RATIO = 2  # PNGs are drawn at twice their shown size, so they stay sharp on high-density screens
#: Sample chains shown per round.
SAMPLE_CHAINS = 3


class ReportError(FaithcbError, ValueError):
    """The run's files are missing, unreadable or malformed."""


@dataclass
class RunData:
    """A run's figures as read from its JSONL files.

    Attributes:
        folder: Folder holding `metrics.jsonl` (and `rounds.jsonl`).
        metrics: One dict per round (`step`, `round`, figures), sorted by step.
        records: Per-example records of the kept rounds (empty without `rounds.jsonl`).
        step_label: Axis label of the step (`training step`, or `checkpoint step` for a scan).
    """

    folder: Path
    metrics: list[dict[str, Any]]
    records: list[dict[str, Any]] = field(default_factory=list)
    step_label: str = "training step"

    @property
    def steps(self) -> list[int]:
        """Steps of the rounds, in order."""
        return [int(row["step"]) for row in self.metrics]

    def series(self, key: str) -> list[float]:
        """Values of `key` per round (NaN where missing)."""
        return [_number(row.get(key)) for row in self.metrics]

    def has(self, key: str) -> bool:
        """Whether any round has a finite value of `key`."""
        return any(math.isfinite(v) for v in self.series(key))

    @property
    def slices(self) -> list[str]:
        """Slice names, from the per-slice figures (else the records), in first-seen order."""
        names: dict[str, None] = {}
        for row in self.metrics:
            for key in row:
                if key.startswith("slice/"):
                    names[key.split("/", 2)[1]] = None
        if not names:
            for record in self.records:
                names[str(record.get("slice", "all"))] = None
        return list(names)


@dataclass
class ReportResult:
    """Files a report wrote.

    Attributes:
        html: The self-contained HTML page.
        figures: The PNG figures, in page order.
    """

    html: Path
    figures: list[Path]


# ---------------------------------------------------------------------- reading
def locate_run_data(path: str | Path) -> Path:
    """The folder holding a run's `metrics.jsonl`.

    Looks in `path` itself (a scan's output, or the `faithcb/` folder), then in
    `path/faithcb` and `path/faithcb_scan`, then in any single subfolder that holds one.

    Raises:
        ReportError: The path does not exist, or no `metrics.jsonl` is found.
    """
    path = Path(path)
    if not path.exists():
        raise ReportError(f"No such file or folder: {path}")
    if path.is_file():
        if path.name in ("metrics.jsonl", "rounds.jsonl"):
            return path.parent
        raise ReportError(f"Expected a run folder (or its metrics.jsonl), got the file {path}")
    for folder in (path, *(path / sub for sub in DATA_SUBDIRS)):
        if (folder / "metrics.jsonl").is_file():
            return folder
    found = sorted(p.parent for p in path.glob("*/metrics.jsonl"))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ReportError(
            f"Several metrics.jsonl under {path} ({', '.join(p.name for p in found)}); give the one to report."
        )
    raise ReportError(
        f"No metrics.jsonl in {path} or {path}/faithcb: is this a faithcb run folder or a scan output folder?"
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (blank lines skipped).

    Raises:
        ReportError: The file cannot be read, a line is not JSON, or a row is not an object.
    """
    return [row for _, row in iter_jsonl(path, ReportError, objects_only=True)]


def load_run(path: str | Path) -> RunData:
    """Read a run's `metrics.jsonl` and `rounds.jsonl` (the latter optional).

    Rounds are sorted by step; when a step appears twice (a run appended to an old output
    folder), the later round wins.

    Raises:
        ReportError: Missing, unreadable or malformed files, or no rounds.
    """
    folder = locate_run_data(path)
    metrics_path = folder / "metrics.jsonl"
    rows = read_jsonl(metrics_path)
    if not rows:
        raise ReportError(f"{metrics_path} holds no rounds yet.")
    by_step: dict[int, dict[str, Any]] = {}
    for line_no, row in enumerate(rows, start=1):
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            raise ReportError(f"{metrics_path}: round {line_no} has no numeric 'step'.")
        if int(step) in by_step:
            logger.warning("faithcb report: step %d appears twice in %s; the later round is kept.", step, metrics_path)
        by_step[int(step)] = row
    metrics = [by_step[s] for s in sorted(by_step)]
    records: list[dict[str, Any]] = []
    records_path = folder / "rounds.jsonl"
    if records_path.is_file():
        kept = {(int(row["step"]), row.get("round")) for row in metrics}
        latest: dict[tuple[int, Any], dict[str, Any]] = {}
        for record in read_jsonl(records_path):
            step = record.get("step")
            if isinstance(step, (int, float)) and (int(step), record.get("round")) in kept:
                latest[(int(step), record.get("id"))] = record
        records = list(latest.values())
    else:
        logger.warning("faithcb report: no rounds.jsonl in %s; early-answering curves are left out.", folder)
    step_label = "checkpoint step" if (folder / "scan.json").is_file() else "training step"
    return RunData(folder=folder, metrics=metrics, records=records, step_label=step_label)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


# ---------------------------------------------------------------------- figures
def _figure(width: float = 7.0, height: float = 4.0) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ReportError("faithcb report needs matplotlib: pip install 'faithcb[report]'.") from err
    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=_DPI * _PIXEL_RATIO, metadata={"Software": None})
    return path


def interval(run: RunData, key: str) -> tuple[list[float], list[float]] | None:
    """Per-round 95% interval of `key`: Wilson bounds, else +-1.96 stderr; None when absent."""
    if run.has(f"{key}/ci_low") and run.has(f"{key}/ci_high"):
        return run.series(f"{key}/ci_low"), run.series(f"{key}/ci_high")
    if run.has(f"{key}/stderr"):
        values, errors = run.series(key), run.series(f"{key}/stderr")
        return [v - _Z95 * e for v, e in zip(values, errors)], [v + _Z95 * e for v, e in zip(values, errors)]
    return None


def slug(key: str) -> str:
    """File-name form of a metric key (`early_answer/aoc` -> `early_answer-aoc`)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", key).strip("-")


def plot_metric(run: RunData, key: str, path: Path) -> Path:
    """One metric against the step with its interval band, accuracy on a twin axis."""
    title, direction = main_metrics().get(key, (key, ""))
    bounded = key in unit_metrics()
    fig = _figure()
    ax = fig.add_subplot()
    steps = run.steps
    values = run.series(key)
    color = "tab:blue"
    band = interval(run, key)
    handles = []
    (line,) = ax.plot(steps, values, marker="o", color=color, label=key)
    handles.append(line)
    if band is not None:
        low, high = band
        if bounded:
            low = [max(0.0, v) if math.isfinite(v) else math.nan for v in low]
            high = [min(1.0, v) if math.isfinite(v) else math.nan for v in high]
        handles.append(ax.fill_between(steps, low, high, color=color, alpha=0.2, label="95% interval"))
    baseline = values[0]
    if math.isfinite(baseline) and len(steps) > 1:
        handles.append(ax.axhline(baseline, color="0.4", linestyle=":", linewidth=1, label="baseline (first round)"))
    ax.set_xlabel(run.step_label)
    ax.set_ylabel(key)
    if bounded:
        ax.set_ylim(-0.03, 1.03)
    ax.grid(True, alpha=0.3)
    if key != "accuracy" and run.has("accuracy"):
        twin = ax.twinx()
        (acc,) = twin.plot(
            steps, run.series("accuracy"), color="tab:orange", linestyle="--", marker=".", label="accuracy (right axis)"
        )
        twin.set_ylabel("accuracy", color="tab:orange")
        twin.set_ylim(-0.03, 1.03)
        twin.tick_params(axis="y", colors="tab:orange")
        handles.append(acc)
    ax.set_title(f"{title}\n{key}" + (f"  ({direction})" if direction else ""), fontsize=10)
    fig.legend(
        handles=handles,
        labels=[h.get_label() for h in handles],
        loc="outside lower center",
        ncols=len(handles),
        fontsize=8,
        frameon=False,
    )
    return _save(fig, path)


def early_answer_curves(run: RunData) -> list[tuple[int, list[float | None]]]:
    """Panel early-answering curve of every round that has per-example matches."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for record in run.records:
        by_step.setdefault(int(record["step"]), []).append(record)
    curves = []
    for step in sorted(by_step):
        curve = early_answer_curve(by_step[step])
        if any(v is not None for v in curve):
            curves.append((step, curve))
    return curves


def plot_early_answer_curves(run: RunData, curves: Sequence[tuple[int, list[float | None]]], path: Path) -> Path:
    """The early-answering curve family: one curve per round, coloured by step."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fig = _figure(7.0, 4.4)
    ax = fig.add_subplot()
    steps = [s for s, _ in curves]
    norm = Normalize(vmin=min(steps), vmax=max(steps) if max(steps) > min(steps) else min(steps) + 1)
    mappable = ScalarMappable(norm=norm, cmap="viridis")
    for i, (step, curve) in enumerate(curves):
        ys = [math.nan if v is None else v for v in curve]
        # Earlier rounds are drawn wider, so a later identical curve leaves them visible as a halo.
        width = 1.5 + 3.0 * (1 - i / (len(curves) - 1)) if len(curves) > 1 else 1.5
        ax.plot(CURVE_GRID, ys, marker="o", markersize=3, color=mappable.to_rgba(step), linewidth=width)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("share of the chain kept (f)")
    ax.set_ylabel("same answer as with the full chain")
    ax.set_title(
        "Early answering: answer forced after the first f of the steps\n"
        "(a curve near 1 everywhere = the answer was fixed before the reasoning)",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    colorbar = fig.colorbar(mappable, ax=ax)
    colorbar.set_label(f"{run.step_label} ({len(curves)} rounds)")
    return _save(fig, path)


def plot_slices(run: RunData, slices: Sequence[str], path: Path) -> Path | None:
    """One panel per slice: the main 0-1 metrics of that slice against the step."""
    keys = [k for k in slice_metrics() if any(run.has(f"slice/{s}/{k}") for s in slices)]
    if not keys:
        return None
    cols = min(3, len(slices))
    rows = math.ceil(len(slices) / cols)
    fig = _figure(4.2 * cols + 1.0, 3.3 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    styles = {
        "accuracy": {"color": "tab:orange", "linestyle": "--", "marker": ".", "zorder": 4},
        "early_answer/aoc": {"color": "tab:blue", "marker": "o"},
        "post_conclusion/tail_fraction": {"color": "tab:red", "marker": "s", "markersize": 4},
        "filler/match": {"color": "tab:green", "marker": "^", "markersize": 5},
    }
    for i, name in enumerate(slices):
        ax = axes[i // cols][i % cols]
        for key in keys:
            ax.plot(run.steps, run.series(f"slice/{name}/{key}"), label=key, **styles.get(key, {"marker": "o"}))
        n = next((v for v in reversed(run.series(f"slice/{name}/n_examples")) if math.isfinite(v)), None)
        ax.set_title(f"slice: {name}" + (f" ({n:.0f} examples)" if n is not None else ""), fontsize=10)
        ax.set_xlabel(run.step_label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("value")
    for j in range(len(slices), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(keys), fontsize=8)
    fig.suptitle("Per-slice figures", fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------------- HTML
def run_summary(run: RunData, report_path: Path | None = None) -> RunSummary:
    """The run's summary block: the one the callback (or the scan) left in `summary.json` when it
    covers the rounds on disk (it alone knows the rules that fired and the failed rounds), else
    one built from `metrics.jsonl` (the checkpoints of a scan's `scan.json` name the most faithful)."""
    saved = _saved_summary(run)
    if saved is None:
        checkpoints = _scan_checkpoints(run.folder)
        saved = summarize_run(
            run.metrics,
            checkpoints=checkpoints,
            step_label="checkpoint step" if checkpoints else "step",
        )
    saved.files = {"figures and records": str(run.folder)}
    if report_path is not None:
        saved.files["report"] = str(report_path)
    return saved


def _saved_summary(run: RunData) -> RunSummary | None:
    path = run.folder / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = RunSummary.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as err:
        logger.warning("faithcb report: %s cannot be read (%s); the summary is built from metrics.jsonl.", path, err)
        return None
    if summary.last_step != run.steps[-1] or summary.rounds != len(run.metrics):
        logger.warning(
            "faithcb report: %s covers other rounds than metrics.jsonl (a run that did not finish?); the summary "
            "is built from metrics.jsonl.",
            path,
        )
        return None
    return summary


def _scan_checkpoints(folder: Path) -> dict[int, str]:
    """Checkpoint folders by step from a scan's `scan.json` (empty for a training run)."""
    path = folder / "scan.json"
    if not path.is_file():
        return {}
    try:
        listed = json.loads(path.read_text(encoding="utf-8")).get("checkpoints") or []
        return {int(c["step"]): str(c["path"]) for c in listed}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        logger.warning("faithcb report: %s cannot be read; no checkpoint is named.", path)
        return {}


def round_reasons(metrics: dict[str, Any]) -> list[str]:
    """Why a logged round cannot be read: the reasons it logged, else the gates on its figures."""
    logged = metrics.get("invalid_reasons")
    if isinstance(logged, list):
        return [str(r) for r in logged]
    return invalid_reasons({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "—"
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"


def last_round_table(run: RunData) -> list[dict[str, str]]:
    """Rows of the last round's table: metric, value, 95% interval, baseline, drift."""
    last = run.metrics[-1]
    first = run.metrics[0]
    rows = []
    main, unit = main_metrics(), unit_metrics()
    for key in main:
        value = _number(last.get(key))
        if not math.isfinite(value):
            continue
        low, high = _number(last.get(f"{key}/ci_low")), _number(last.get(f"{key}/ci_high"))
        if not (math.isfinite(low) and math.isfinite(high)):
            stderr = _number(last.get(f"{key}/stderr"))
            low, high = value - _Z95 * stderr, value + _Z95 * stderr
        if key in unit and math.isfinite(low) and math.isfinite(high):
            low, high = max(0.0, low), min(1.0, high)
        delta = _number(last.get(f"{key}/delta"))
        rows.append(
            {
                "metric": key,
                "value": _fmt(value),
                "interval": f"{_fmt(low)} – {_fmt(high)}" if math.isfinite(low) and math.isfinite(high) else "—",
                "baseline": _fmt(_number(first.get(key))),
                "delta": (f"{delta:+.3f}" if math.isfinite(delta) else "—"),
                "meaning": main[key][1] or "descriptive",
            }
        )
    return rows


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; font-family: monospace; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }
figure { margin: 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #444; max-width: 770px; }
.gap { color: #8a5a00; }
.chain { border-left: 3px solid #ddd; padding-left: 0.8em; margin: 0.8em 0; }
.chain pre { background: #f7f7f7; padding: 0.5em; white-space: pre-wrap; font-size: 0.85em; }
details summary { cursor: pointer; font-weight: 600; margin: 0.4em 0; }
.meta { color: #555; font-size: 0.9em; }
.banner { background: #fff3cd; border: 1px solid #e0b400; padding: 0.6em 1em; }
pre.summary { background: #f7f7f7; padding: 0.6em 1em; font-size: 0.85em; overflow-x: auto; }
"""


def _png_width(path: Path) -> int:
    """Pixel width of a PNG (its IHDR chunk)."""
    return int.from_bytes(path.read_bytes()[16:20], "big")


def _img(path: Path, alt: str, caption: str = "") -> str:
    """A figure at its natural size (half its pixel width: the PNGs are drawn at twice that)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    width = _png_width(path) // _PIXEL_RATIO
    return (
        f'<figure><img alt="{html.escape(alt)}" width="{width}" src="data:image/png;base64,{data}">'
        f"<figcaption>{caption or html.escape(alt)}</figcaption></figure>"
    )


def metric_caption(run: RunData, key: str) -> str:
    """The line under a metric's plot: what it measures, which way reads as faithful, and why
    rounds are missing from it (HTML)."""
    title, direction = main_metrics().get(key, (key, ""))
    text = f"<code>{html.escape(key)}</code>: {html.escape(title)}."
    if direction:
        text += f" <b>{html.escape(direction.capitalize())}.</b>"
    missing = [step for step, value in zip(run.steps, run.series(key)) if not math.isfinite(value)]
    if missing:
        steps = ", ".join(str(s) for s in missing[:12]) + (" ..." if len(missing) > 12 else "")
        reason = gap_reasons().get(key, "no example of that round had what this figure needs")
        text += f" <span class='gap'>No value at {html.escape(run.step_label)} {steps}: {html.escape(reason)}.</span>"
    return text


def sample_chains(run: RunData, per_round: int = SAMPLE_CHAINS) -> list[tuple[int, list[dict[str, Any]]]]:
    """Per round, the records of the same few panel examples (the first `per_round` ids of the
    first round that has records), so a reader follows one chain across training."""
    by_step: dict[int, dict[str, dict[str, Any]]] = {}
    for record in run.records:
        by_step.setdefault(int(record["step"]), {}).setdefault(str(record.get("id")), record)
    if not by_step:
        return []
    ids = list(by_step[min(by_step)])[:per_round]
    return [(step, [by_step[step][i] for i in ids if i in by_step[step]]) for step in sorted(by_step)]


def _answer(value: Any) -> str:
    return "unparseable" if value is None else str(value)


def _chain_html(record: dict[str, Any]) -> str:
    """One sample chain and what each perturbation made of it."""
    e = html.escape
    head = (
        f"example <code>{e(str(record.get('id')))}</code> · gold <b>{e(_answer(record.get('gold')))}</b> · "
        f"stated <b>{e(_answer(record.get('stated_answer')))}</b> · "
        f"forced after the full chain <b>{e(_answer(record.get('a_full')))}</b>"
    )
    parts = [f"<div class='chain'><p class='meta'>{head}</p>"]
    parts.append(f"<pre>{e(str(record.get('response') or ''))}</pre><ul>")
    steps = record.get("steps") or []
    settle = record.get("early_answer/settle_step")
    answers = record.get("early_answer/answers")
    if answers:
        shown = " → ".join(e(_answer(a)) for a in answers)
        if settle is None:
            where = "the answer never settled on the full-chain answer"
        elif settle == 0:
            where = "the answer was fixed before any step (k = 0): the chain did not change it"
        else:
            where = f"the answer settled after step {settle} of {len(steps)}: “{e(str(steps[settle - 1]))}”"
        parts.append(f"<li><b>Early answering</b> (answer after 0..n steps: {shown}): {where}.</li>")
    if "filler/answer" in record and record.get("filler/match") is not None:
        verdict = "the same answer" if record["filler/match"] else "a different answer"
        filler = e(_answer(record["filler/answer"]))
        parts.append(f"<li><b>Filler</b> in place of the chain: {filler} ({verdict}).</li>")
    if record.get("mistake/corrupted_step") is not None:
        verdict = {1.0: "the same answer", 0.0: "a different answer"}.get(record.get("mistake/match"), "no answer")
        step = int(record.get("mistake/step") or 0) + 1
        original, corrupted = e(str(record["mistake/original_step"])), e(str(record["mistake/corrupted_step"]))
        answer = e(_answer(record.get("mistake/answer")))
        parts.append(f"<li><b>Mistake</b>: step {step} “{original}” → “{corrupted}”, answer {answer} ({verdict}).</li>")
    parts.append("</ul></div>")
    return "".join(parts)


def chains_html(run: RunData) -> str:
    """The sample-chains section: one collapsible block per round (the first and last open)."""
    rounds = sample_chains(run)
    if not rounds:
        return "<p class='meta'>No per-example records (rounds.jsonl) in this run.</p>"
    parts = []
    for i, (step, records) in enumerate(rounds):
        opened = " open" if i in (0, len(rounds) - 1) else ""
        parts.append(f"<details{opened}><summary>{html.escape(run.step_label)} {step}</summary>")
        parts.extend(_chain_html(record) for record in records)
        parts.append("</details>")
    return "\n".join(parts)


def render_html(
    run: RunData,
    metric_figures: Sequence[tuple[str, Path]],
    curves_figure: Path | None,
    slices_figure: Path | None,
    title: str,
    summary: RunSummary | None = None,
) -> str:
    """The report page with every figure embedded as a base64 PNG (and the run's summary block
    first, when given)."""
    last = run.metrics[-1]
    n_examples = _number(last.get("n_examples"))
    meta = [
        f"{len(run.metrics)} rounds, {run.step_label}s {run.steps[0]}–{run.steps[-1]}",
        f"{n_examples:.0f} panel examples per round" if math.isfinite(n_examples) else "",
        f"data: {run.folder}",
        f"written {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{html.escape(" · ".join(m for m in meta if m))}</p>',
    ]
    if summary is not None:
        parts.append("<h2>Summary</h2>")
        parts.append(f"<pre class='summary'>{html.escape(summary.text())}</pre>")
    parts.append(f"<h2>Last round (step {run.steps[-1]})</h2>")
    reasons = round_reasons(last)
    if reasons:
        parts.append(
            "<div class='banner'><b>This round cannot be read (faith/valid = 0); its figures are not shown.</b><ul>"
        )
        parts.extend(f"<li>{html.escape(reason)}</li>" for reason in reasons)
        parts.append("</ul></div>")
    else:
        parts.append(
            "<table><tr><th>metric</th><th>value</th><th>95% interval</th><th>baseline</th>"
            "<th>drift vs baseline</th><th>reading</th></tr>"
        )
        for row in last_round_table(run):
            cells = "".join(f"<td>{html.escape(row[c])}</td>" for c in ("metric", "value", "interval", "baseline"))
            parts.append(f"<tr>{cells}<td>{html.escape(row['delta'])}</td><td>{html.escape(row['meaning'])}</td></tr>")
        parts.append("</table>")
    unreadable = [str(step) for step, m in zip(run.steps, run.metrics) if round_reasons(m)]
    if unreadable:
        parts.append(
            f"<p class='banner'>Unreadable rounds (faith/valid = 0) at {run.step_label}s {', '.join(unreadable)}: "
            "their figures in the plots below are not meaningful.</p>"
        )
    parts.append(
        "<p class='meta'>Intervals: Wilson 95% for rates, ±1.96 standard errors for means. Agreement rates rise "
        "with accuracy alone; read them beside the accuracy curve (right axis).</p>"
    )
    parts.append("<h2>Metrics over training</h2><div class='grid'>")
    parts.extend(_img(path, key, metric_caption(run, key)) for key, path in metric_figures)
    parts.append("</div>")
    parts.append("<h2>Early answering</h2>")
    if curves_figure is not None:
        parts.append(
            _img(
                curves_figure,
                "early_answer/curves",
                "Per round, the share of examples whose answer after the first f of the steps equals the answer "
                "after the whole chain. <b>Lower before f = 1 = more faithful</b>: a curve near 1 everywhere means "
                "the answer was fixed before the reasoning was written.",
            )
        )
    else:
        parts.append("<p class='meta'>No per-example early-answering data (rounds.jsonl) in this run.</p>")
    if slices_figure is not None:
        parts.append("<h2>Slices</h2>")
        parts.append(_img(slices_figure, "slices"))
    parts.append("<h2>Sample chains</h2>")
    parts.append(
        "<p class='meta'>The same panel examples in every round: what the model wrote, and what the probes made "
        "of it.</p>"
    )
    parts.append(chains_html(run))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, *, title: str | None = None) -> ReportResult:
    """Draw a run's figures and write `report.html` with them embedded.

    Args:
        run_dir: A run folder (its `faithcb/` subfolder is found), a scan output folder, or
            the folder holding `metrics.jsonl`.
        out_dir: Where to write (default `<data folder>/report`).
        title: Page title (default names the run folder).

    Returns:
        The HTML page and the PNG files.

    Raises:
        ReportError: Missing, unreadable or malformed files; matplotlib not installed.
    """
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.folder / "report"
    if out.exists() and not out.is_dir():
        raise ReportError(f"Output path exists and is not a folder: {out}")
    out.mkdir(parents=True, exist_ok=True)
    _figure()  # fail early, with a clear message, when matplotlib is missing
    metric_figures = []
    for key in main_metrics():
        if run.has(key):
            metric_figures.append((key, plot_metric(run, key, out / f"metric_{slug(key)}.png")))
    curves = early_answer_curves(run)
    curves_figure = plot_early_answer_curves(run, curves, out / "early_answer_curves.png") if curves else None
    slices = run.slices
    slices_figure = plot_slices(run, slices, out / "slices.png") if len(slices) > 1 else None
    if title is None:
        name = run.folder.parent.name if run.folder.name in DATA_SUBDIRS else run.folder.name
        title = f"faithcb report: {name}"
    page = out / "report.html"
    summary = run_summary(run, page)
    page.write_text(render_html(run, metric_figures, curves_figure, slices_figure, title, summary), encoding="utf-8")
    figures = [p for _, p in metric_figures] + [p for p in (curves_figure, slices_figure) if p is not None]
    logger.info("faithcb report: %d figures and %s written.", len(figures), page)
    return ReportResult(html=page, figures=figures)
