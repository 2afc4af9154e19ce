"""Audit SFT training traces for post-conclusion tails (He et al. 2026).

For each trace with a known final answer, the model under audit is forced to answer after
every prefix of the trace's chain (engine `ForcedAnswer` requests, batched through
`ProbeEngine.run` inside `probe_mode`). The *settle point* `t` is the least k such that the
forced answer after k steps equals the trace's final answer for every longer prefix
(`faithcb.functional.settle_point`); the *tail* `(n - t)/n` is the share of steps written
after the answer was already fixed. Traces with long tails teach a model to keep writing
after it has concluded (He et al. 2026, "Diagnosing Harmful Continuation in Answer-Correct
Long-CoT Training Traces").

Outputs (`faithcb audit-data`, see `faithcb.cli`):

- `summary.json`: counts and the distribution of tail fractions; `tail_fraction_hist.png`.
- `audit.jsonl`: one line per row (status, n, t, tail, forced answers).
- `trimmed.jsonl`: the same rows, chains cut after step t, answer line kept.
- `random_trim.jsonl`: a length-matched control: the same number of steps removed at
  random (seeded) positions, answer line kept.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import functional as F
from .._config import FaithConfig
from .._errors import FaithcbError
from ..data._jsonl import iter_jsonl
from ..data._panel import PanelError, ProbeExample, _example_from_row, _text_of
from ..data._parsing import Step, extract_answer, parse_response
from ..engine import Chain, ForcedAnswer, ProbeEngine, probe_mode
from ..probes import same_answer
from ._scan import ScanError, load_model, load_tokenizer

logger = logging.getLogger(__name__)


class AuditError(FaithcbError, ValueError):
    """The data or model of an audit is missing, unreadable or malformed."""


# ---------------------------------------------------------------------- traces
@dataclass
class Trace:
    """One data row and the reasoning trace it carries.

    Attributes:
        index: Row position in the file (0-based, blank lines not counted).
        line_no: Line number in the file.
        row: The row as read.
        example: The row as a probe example (prompt, gold, choices).
        completion: The trace text (completion, worked answer or last assistant message), or
            None when the row has none.
    """

    index: int
    line_no: int
    row: dict[str, Any]
    example: ProbeExample
    completion: str | None


def read_traces(path: str | Path) -> list[Trace]:
    """Rows of an SFT JSONL file in any shape `load_panel` accepts.

    Raises:
        AuditError: Missing or unreadable file, invalid JSON, a malformed row (file:line), no rows.
    """
    traces: list[Trace] = []
    for line_no, row in iter_jsonl(path, AuditError, what="Data file"):
        try:
            example = _example_from_row(row, index=len(traces), where=f"{path}:{line_no}")
        except PanelError as err:
            raise AuditError(str(err)) from err
        traces.append(Trace(len(traces), line_no, row, example, trace_text(row)))
    if not traces:
        raise AuditError(f"{path} holds no rows.")
    return traces


def _last_assistant(messages: Any) -> int | None:
    if not isinstance(messages, list):
        return None
    return max(
        (i for i, m in enumerate(messages) if isinstance(m, Mapping) and m.get("role") == "assistant"), default=None
    )


def trace_text(row: Mapping[str, Any]) -> str | None:
    """The reasoning trace of a row: completion, worked answer, or last assistant message."""
    if "messages" in row:
        i = _last_assistant(row["messages"])
        return _text_of(row["messages"][i]["content"]) if i is not None else None
    if "prompt" in row:
        completion = row.get("completion")
        if isinstance(completion, str):
            return completion
        if isinstance(completion, list) and completion:
            i = _last_assistant(completion)
            return _text_of(completion[i if i is not None else -1]["content"])
        return None
    answer = row.get("answer")
    return answer if isinstance(answer, str) else None


def with_trace_text(row: Mapping[str, Any], text: str) -> dict[str, Any]:
    """A copy of `row` whose trace (see `trace_text`) is replaced by `text`; other fields kept."""
    out = copy.deepcopy(dict(row))

    def set_content(message: dict[str, Any]) -> None:
        if isinstance(message.get("content"), list):
            message["content"] = [{"type": "text", "text": text}]
        else:
            message["content"] = text

    if "messages" in out:
        set_content(out["messages"][_last_assistant(out["messages"])])
    elif "prompt" in out:
        if isinstance(out.get("completion"), str):
            out["completion"] = text
        else:
            i = _last_assistant(out["completion"])
            set_content(out["completion"][i if i is not None else -1])
    else:
        out["answer"] = text
    return out


# ---------------------------------------------------------------------- trimming
def join_steps(chain: str, steps: Sequence[Step], keep: Sequence[int]) -> str:
    """The chain with only the steps `keep` (indices, in order), each preceded by the text that
    separated it from the step before it in the original (so lines stay lines)."""
    parts = []
    for j, i in enumerate(keep):
        if j > 0:
            parts.append(chain[steps[i - 1].end : steps[i].start])
        parts.append(chain[steps[i].start : steps[i].end])
    return "".join(parts)


def replace_chain(completion: str, chain: str, new_chain: str) -> str:
    """`completion` with its chain text replaced; the text after the chain (answer line) kept.

    With an empty new chain, the whitespace that joined the chain to the answer is dropped too
    (unless the chain sat inside other text, e.g. `<think>` tags).
    """
    offset = completion.find(chain)
    if offset < 0:
        raise ValueError("chain is not a substring of the completion")
    head, tail = completion[:offset], completion[offset + len(chain) :]
    if not new_chain and not head.strip():
        return head + tail.lstrip()
    return head + new_chain + tail


def random_keep(n: int, remove: int, rng: random.Random) -> list[int]:
    """Indices of the steps kept when `remove` of `n` steps are removed at random positions."""
    removed = set(rng.sample(range(n), remove))
    return [i for i in range(n) if i not in removed]


# ---------------------------------------------------------------------- the audit
@dataclass
class AuditResult:
    """What an audit produced.

    Attributes:
        out_dir: The output folder.
        summary: The content of `summary.json`.
        rows: The content of `audit.jsonl`.
        files: The files written, by name.
    """

    out_dir: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def _audit_config(config: FaithConfig | None, cue: str | None) -> FaithConfig:
    config = dataclasses.replace(config) if config is not None else FaithConfig()
    if cue is not None:
        if not cue.strip():
            raise AuditError("--cue must contain a visible character.")
        config.answer_cues = [cue]
        config.default_answer_cue = cue
    return config


def _chain_of(engine: ProbeEngine, trace: Trace, position: int, config: FaithConfig) -> tuple[Chain | None, str]:
    """Parse a trace into an engine Chain (from the trace itself, not from generated text)."""
    if trace.completion is None or not trace.completion.strip():
        return None, "no reasoning trace (completion / worked answer / assistant message)"
    example = trace.example
    cues = [example.answer_cue] if example.answer_cue else list(config.answer_cues)
    parsed = parse_response(trace.completion, cues)
    if parsed.cue is None or not (parsed.answer_text or "").strip():
        return None, "no answer line after an answer cue"
    # The trace's own answer is the reference (and sets the answer type), whatever `gold` says.
    final_raw = parsed.answer_text.strip().split("\n", 1)[0].strip()
    if example.choices is None:
        example = dataclasses.replace(example, gold=final_raw)
    prompt = example.render_prompt(
        engine.tokenizer, use_chat_template=config.use_chat_template, prompt_template=config.prompt_template
    )
    n_tokens = len(engine.encode_continuation(trace.completion))
    chain = engine.parse_chain(position, example, prompt, trace.completion, n_tokens)
    if chain.stated_answer is None:
        return None, "answer line not parseable"
    if chain.num_steps == 0:
        return None, "no reasoning steps before the answer"
    if trace.completion.find(chain.chain) < 0:
        return None, "chain not found in the trace text"
    return chain, ""


def _audit_batch(
    engine: ProbeEngine, traces: Sequence[Trace], config: FaithConfig, seed: int
) -> list[tuple[dict[str, Any], str | None, str | None]]:
    """Audit a batch of traces: per trace (audit row, trimmed text, random-trim text)."""
    parsed = [_chain_of(engine, trace, i, config) for i, trace in enumerate(traces)]
    chains = [c for c, _ in parsed if c is not None]
    # Engine requests are keyed by Chain.index: renumber the parsed chains 0..len-1.
    for position, chain in enumerate(chains):
        chain.index = position
    requests = [ForcedAnswer(c.index, c.prefix(k)) for c in chains for k in range(c.num_steps + 1)]
    results = engine.run(chains, requests) if requests else {}
    out = []
    for trace, (chain, reason) in zip(traces, parsed):
        row: dict[str, Any] = {"index": trace.index, "line": trace.line_no, "id": trace.example.id}
        if chain is None:
            out.append(({**row, "status": "skipped", "reason": reason}, None, None))
            continue
        final = chain.stated_answer
        forced = [results[ForcedAnswer(chain.index, chain.prefix(k))] for k in range(chain.num_steps + 1)]
        matches = [same_answer(r, final) for r in forced]
        n = chain.num_steps
        gold = trace.row.get("gold")
        answer_correct = None
        if gold is not None:
            answer_correct = extract_answer(str(gold), chain.answer_type, chain.num_choices) == final
        row.update(
            {
                "steps": n,
                "final_answer": final,
                "answer_correct": answer_correct,
                "forced_answers": [r.answer for r in forced],
                "matches": matches,
            }
        )
        if matches[-1] is not True:
            # The model does not reach the trace's answer even after the whole chain: no
            # settle point, nothing to trim.
            row.update({"status": "unsettled", "settle_step": None, "tail_fraction": None, "removed_steps": 0})
            out.append((row, None, None))
            continue
        t = F.settle_point(matches)
        remove = n - t
        trimmed_chain = join_steps(chain.chain, chain.steps, list(range(t)))
        rng = random.Random(f"faithcb-audit:{seed}:{trace.index}")
        keep = random_keep(n, remove, rng)
        random_chain = join_steps(chain.chain, chain.steps, keep)
        row.update(
            {
                "status": "settled",
                "settle_step": t,
                "tail_fraction": F.tail_fraction(matches),
                "removed_steps": remove,
                "random_removed": [i for i in range(n) if i not in set(keep)],
            }
        )
        out.append(
            (
                row,
                replace_chain(trace.completion or "", chain.chain, trimmed_chain),
                replace_chain(trace.completion or "", chain.chain, random_chain),
            )
        )
    return out


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    pos = q * (len(sorted_values) - 1)
    low, high = math.floor(pos), math.ceil(pos)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def summarize_audit(rows: Sequence[dict[str, Any]], bins: int = 10) -> dict[str, Any]:
    """Counts and the distribution of tail fractions over the settled traces."""
    tails = sorted(float(r["tail_fraction"]) for r in rows if r.get("status") == "settled")
    settled = [r for r in rows if r.get("status") == "settled"]
    reasons: dict[str, int] = {}
    for r in rows:
        if r.get("status") == "skipped":
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    steps_total = sum(r["steps"] for r in settled)
    removed_total = sum(r["removed_steps"] for r in settled)
    edges = [i / bins for i in range(bins + 1)]
    counts = [0] * bins
    for value in tails:
        counts[min(bins - 1, int(value * bins))] += 1
    correct = [r["answer_correct"] for r in rows if r.get("answer_correct") is not None]

    def rounded(value: float) -> float | None:
        return None if not math.isfinite(value) else round(value, 6)

    return {
        "rows": len(rows),
        "audited": sum(1 for r in rows if r.get("status") in ("settled", "unsettled")),
        "settled": len(settled),
        "unsettled": sum(1 for r in rows if r.get("status") == "unsettled"),
        "skipped": sum(reasons.values()),
        "skipped_reasons": reasons,
        "answer_correct": {"known": len(correct), "correct": sum(correct)},
        "tail_fraction": {
            "mean": rounded(statistics.fmean(tails)) if tails else None,
            "median": rounded(_quantile(tails, 0.5)),
            "p25": rounded(_quantile(tails, 0.25)),
            "p75": rounded(_quantile(tails, 0.75)),
            "p90": rounded(_quantile(tails, 0.9)),
            "share_positive": rounded(sum(1 for v in tails if v > 0) / len(tails)) if tails else None,
            "share_at_least_half": rounded(sum(1 for v in tails if v >= 0.5) / len(tails)) if tails else None,
            "histogram": {"edges": edges, "counts": counts},
        },
        "steps": {
            "total": steps_total,
            "removed": removed_total,
            "removed_share": rounded(removed_total / steps_total) if steps_total else None,
        },
    }


def plot_tail_histogram(summary: Mapping[str, Any], path: Path) -> Path | None:
    """Histogram of the tail fractions (None when matplotlib is missing or nothing settled)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        logger.warning("faithcb audit: matplotlib is not installed; no histogram (pip install 'faithcb[report]').")
        return None
    tail = summary["tail_fraction"]
    edges, counts = tail["histogram"]["edges"], tail["histogram"]["counts"]
    fig = Figure(figsize=(7.0, 4.0), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color="tab:blue", edgecolor="white", label="traces")
    if tail["mean"] is not None:
        ax.axvline(tail["mean"], color="tab:red", linestyle="--", label=f"mean {tail['mean']:.2f}")
        ax.axvline(tail["median"], color="tab:orange", linestyle=":", label=f"median {tail['median']:.2f}")
    ax.set_xlim(-0.02, 1.02)  # a mean or median line at 0 stays visible
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("post-conclusion tail fraction (n - t) / n")
    ax.set_ylabel("traces")
    ax.set_title(
        f"Steps written after the answer had settled: {summary['settled']} settled traces\n"
        f"({summary['unsettled']} unsettled, {summary['skipped']} skipped)",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def audit_traces(
    data: str | Path,
    model: str | Path,
    *,
    out_dir: str | Path,
    cue: str | None = None,
    tokenizer: str | Path | None = None,
    config: FaithConfig | None = None,
    seed: int = 0,
    max_rows: int | None = None,
    batch_rows: int = 32,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
) -> AuditResult:
    """Find each trace's settle point and write the summary, the trimmed data and its control.

    Args:
        data: JSONL of SFT rows (prompt/completion, question/answer with a worked solution,
            messages; other fields are kept in the outputs).
        model: Folder of the model that judges when the answer is settled.
        out_dir: Output folder.
        cue: The answer cue of the traces (default: `config.answer_cues`).
        tokenizer: Tokenizer folder (default: the model folder).
        config: Answer reading settings (`answer_max_new_tokens`, `answer_type`,
            `prompt_template`, `use_chat_template`, batch sizes).
        seed: Seed of the random-trim control.
        max_rows: Audit only the first rows (the outputs then hold only those rows).
        batch_rows: Rows per engine call.
        device: Where the model runs (`auto`: CUDA if available).
        dtype: `auto` or a torch dtype name.
        progress: Show a progress bar on stderr.

    Returns:
        Summary, per-row results and the files written.

    Raises:
        AuditError: Bad data, model or tokenizer paths; malformed rows.
    """
    if batch_rows <= 0:
        raise AuditError(f"batch_rows must be positive, got {batch_rows}.")
    config = _audit_config(config, cue)
    traces = read_traces(data)
    if max_rows is not None:
        if max_rows <= 0:
            raise AuditError(f"max_rows must be positive, got {max_rows}.")
        traces = traces[:max_rows]
    model_path = Path(model)
    if not (model_path / "config.json").is_file():
        raise AuditError(f"Not a model folder (no config.json): {model_path}")
    try:
        tok = load_tokenizer(tokenizer if tokenizer is not None else model_path)
        lm = load_model(model_path, device=device, dtype=dtype)
    except ScanError as err:
        hint = "" if tokenizer is not None else " (pass --tokenizer PATH)"
        raise AuditError(f"{err}{hint}") from err
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AuditError(f"Output path exists and is not a folder: {out}")
    out.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    results: list[tuple[dict[str, Any], str | None, str | None]] = []
    with (
        probe_mode(lm, tok),
        tqdm(total=len(traces), desc="faithcb audit", unit="row", file=sys.stderr, disable=not progress) as bar,
    ):
        engine = ProbeEngine(lm, tok, config)
        for start in range(0, len(traces), batch_rows):
            batch = traces[start : start + batch_rows]
            try:
                results.extend(_audit_batch(engine, batch, config, seed))
            except PanelError as err:
                raise AuditError(str(err)) from err
            bar.update(len(batch))

    rows = [r for r, _, _ in results]
    summary = summarize_audit(rows)
    summary.update({"data": str(data), "model": str(model_path), "answer_cues": config.answer_cues, "seed": seed})
    files = {name: out / name for name in ("summary.json", "audit.jsonl", "trimmed.jsonl", "random_trim.jsonl")}
    with files["audit.jsonl"].open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    with (
        files["trimmed.jsonl"].open("w", encoding="utf-8") as trimmed,
        files["random_trim.jsonl"].open("w", encoding="utf-8") as control,
    ):
        for trace, (_, cut, rand) in zip(traces, results):
            trimmed.write(json.dumps(with_trace_text(trace.row, cut) if cut is not None else trace.row) + "\n")
            control.write(json.dumps(with_trace_text(trace.row, rand) if rand is not None else trace.row) + "\n")
    files["summary.json"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    hist = plot_tail_histogram(summary, out / "tail_fraction_hist.png")
    if hist is not None:
        files["tail_fraction_hist.png"] = hist
    logger.info(
        "faithcb audit: %d rows, %d settled (mean tail %s), outputs in %s",
        summary["rows"],
        summary["settled"],
        summary["tail_fraction"]["mean"],
        out,
    )
    return AuditResult(out_dir=out, summary=summary, rows=rows, files=files)
