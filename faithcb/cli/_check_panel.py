"""Pre-flight: can a panel be read on this model before any training?

`check_panel` runs what the callback's baseline round runs (the prompt shape chosen as the run
would choose it, then one round) and says how the model's answers were read: per cue, by the
fallback, not at all; which prompt shape it would pick; three responses with what was read
from each; and a verdict (readable, or what to change).

Usage:
    from faithcb import check_panel

    report = check_panel(model, tokenizer, "heldout_cot.jsonl")
    print(report.summary())

or, from the shell, `faithcb check-panel MODEL_DIR PANEL` (exit status 0: readable, 3: not).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._config import FaithConfig
from ..data._panel import panel_from
from ..data._prompt_shape import ShapeChoice, round_reads, settle_prompt_shape, tries_summary
from ..round._probe_round import build_probes, run_probe_round

__all__ = ["PanelCheck", "check_panel"]

#: Responses shown in the report.
SAMPLES = 3


@dataclass
class PanelCheck:
    """What `check_panel` found.

    Attributes:
        source: Where the panel came from.
        examples: Examples in the round.
        choice: The prompt shape the run would use, and every shape tried.
        read_by: How the stated answers were read: a cue (as configured), `after </think>`,
            `fallback` (the last number, label or yes / no of a response without a cue) or
            `unread`, with counts.
        metrics: The round's panel figures.
        readable: Whether the round reads (`faithcb.data._prompt_shape.round_reads`).
        reasons: Why it does not read, each with what to change (empty when it does).
        samples: Up to three responses: prompt, response, what was read and how.
        seconds: Wall time of the check.
    """

    source: str
    examples: int
    choice: ShapeChoice
    read_by: dict[str, int]
    metrics: dict[str, float]
    readable: bool
    reasons: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """The report as text (what `faithcb check-panel` prints)."""
        n = max(self.examples, 1)
        lines = [f"Panel {self.source}: {self.examples} examples, round in {self.seconds:.1f}s"]
        lines.append(f"Prompt shape: {self.choice.shape.name} ({self.choice.shape.describe()})")
        if self.choice.tries:
            lines.append(f"  tried: {tries_summary(self.choice.tries)}")
        lines.append("Stated answers read:")
        for how, count in self.read_by.items():
            lines.append(f"  {how:<20} {count:>4}  ({100 * count / n:.0f}%)")
        for sample in self.samples:
            lines.append(f"--- example {sample['id']} (gold {sample['gold']!r})")
            lines.append(f"  prompt ends:  {_tail(sample['prompt'], 120)!r}")
            lines.append(f"  response:     {_tail(sample['response'], 300)!r}")
            lines.append(f"  read:         {sample['stated_answer']!r} ({sample['read_by']})")
        if self.readable:
            lines.append("Verdict: READABLE: the baseline round of a run on this model and panel can be read.")
        else:
            lines.append("Verdict: NOT READABLE:")
            lines += [f"  - {reason}" for reason in self.reasons]
        return "\n".join(lines)


def _tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def read_by(records: Sequence[dict[str, Any]], cues: Sequence[str]) -> dict[str, int]:
    """How each record's stated answer was read, counted (cues as configured, matched in any case)."""
    by_lower = {c.lower(): c for c in cues}
    counts: Counter[str] = Counter()
    for record in records:
        counts[_how(record, by_lower)] += 1
    return dict(counts.most_common())


def _how(record: dict[str, Any], cues_by_lower: dict[str, str]) -> str:
    source = record.get("answer_source")
    if record.get("stated_answer") is None or source is None:
        return "unread"
    if source == "cue":
        cue = str(record.get("cue") or "")
        return repr(cues_by_lower.get(cue.lower(), cue))
    return {"after_think": "after </think>", "fallback": "fallback"}.get(source, source)


def check_panel(
    model: Any,
    tokenizer: Any,
    panel: Any,
    config: FaithConfig | None = None,
    *,
    probes: Sequence[Any] | None = None,
) -> PanelCheck:
    """One round before any training, as the callback's baseline round runs it.

    Args:
        model: The model as training will start from it.
        tokenizer: Its tokenizer.
        panel: The panel, in any form the callback takes (a JSONL path, rows, a `datasets.Dataset`,
            a standard panel's name).
        config: Round settings (default `FaithConfig()`); `prompt_shape` as the run will have it.
        probes: Probe names or instances (default `config.probes`).

    Returns:
        What was read, the shape the run would use and the verdict.
    """
    config = config if config is not None else FaithConfig()
    start = time.perf_counter()
    loaded = panel_from(panel, config)
    full, trial = build_probes(config, probes), build_probes(config, [])

    def run(shaped: Any, complete: bool) -> Any:
        return run_probe_round(model, tokenizer, shaped, config, full if complete else trial)

    has_template = getattr(tokenizer, "chat_template", None) is not None
    choice, result = settle_prompt_shape(run, loaded, config, has_chat_template=has_template)
    readable, reasons = round_reads(result.metrics, config.shape_max_parse_fail)
    if not readable and not choice.pinned:
        reasons = [*reasons, _advice(choice, config)]
    picked = _samples(result.records, {c.lower(): c for c in config.answer_cues})
    return PanelCheck(
        source=loaded.source,
        examples=len(result.records),
        choice=choice,
        read_by=read_by(result.records, config.answer_cues),
        metrics=dict(result.metrics),
        readable=readable,
        reasons=reasons,
        samples=picked,
        seconds=time.perf_counter() - start,
    )


def _advice(choice: ShapeChoice, config: FaithConfig) -> str:
    tried = ", ".join(t.shape for t in choice.tries)
    return (
        f"no prompt shape read ({tried}): look at the responses above and set answer_cues to how the model "
        f"states its answer, raise max_new_tokens (now {config.max_new_tokens}) if responses are cut before it, "
        "give rows a worked answer (shots need them), or set answer_instruction"
    )


def _samples(records: Sequence[dict[str, Any]], cues_by_lower: dict[str, str]) -> list[dict[str, Any]]:
    """Up to `SAMPLES` records for the report: unread ones first (what to fix), then the rest."""
    ordered = sorted(records, key=lambda r: r.get("stated_answer") is not None)
    return [
        {
            "id": r.get("id"),
            "gold": r.get("gold"),
            "prompt": r.get("prompt", ""),
            "response": r.get("response", ""),
            "stated_answer": r.get("stated_answer"),
            "read_by": _how(r, cues_by_lower),
        }
        for r in ordered[:SAMPLES]
    ]
