"""Standard probe panels by name: the held-out split of a public CoT dataset on the Hugging Face Hub.

`load_panel("gsm8k")` (and so `panel_from`, `FaithfulnessCallback(trainer, panel="gsm8k")` and
`faithcb scan --panel gsm8k`) reads the split named here through `datasets.load_dataset`, parses
its rows in the dataset's own schema (see `faithcb.data._panel`) and keeps `size` of them by the usual
seeded subsample. A path that exists always wins over a name.

This module only holds the registry and the name lookup; loading lives in `faithcb.data._panel`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class StandardPanel:
    """One named panel: where its rows come from and what they hold.

    Attributes:
        name: The name `load_panel` takes (case, `-` and `_` are ignored when matching).
        hub_path: Dataset repository on the Hugging Face Hub.
        config_name: Dataset configuration (`datasets.load_dataset`'s second argument), or None
            for a dataset with one configuration.
        split: The held-out split read (one whose rows all have a gold answer).
        rows: Rows in that split, as the dataset card states.
        license: The dataset's license, as its card (or its source) states.
        answer_type: How its answers are compared: `numeric`, `choice`, `math` (LaTeX, set on
            each example) or `boolean` (yes / no, set on each example).
        fields: The row fields the panel reads.
        shape: The row shape its rows are read as (a key of `faithcb.data._panel.ROW_SHAPES`).
    """

    name: str
    hub_path: str
    config_name: str | None
    split: str
    rows: int
    license: str
    answer_type: str
    fields: str
    shape: str

    def describe(self) -> str:
        """`openai/gsm8k (config main, split test, 1319 rows)`."""
        config = f"config {self.config_name}, " if self.config_name else ""
        return f"{self.hub_path} ({config}split {self.split}, {self.rows} rows)"


#: The registered panels, by name.
STANDARD_PANELS: dict[str, StandardPanel] = {
    panel.name: panel
    for panel in (
        StandardPanel(
            name="gsm8k",
            hub_path="openai/gsm8k",
            config_name="main",
            split="test",
            rows=1319,
            license="MIT",
            answer_type="numeric",
            fields="question; answer (worked text with <<...>> calculator notes, ending '#### n')",
            shape="question_answer",
        ),
        StandardPanel(
            name="math500",
            hub_path="HuggingFaceH4/MATH-500",
            config_name=None,
            split="test",
            rows=500,
            license="none on the card; MATH, its source, is MIT",
            answer_type="math",
            fields="problem; solution; answer (LaTeX); unique_id",
            shape="math",
        ),
        StandardPanel(
            name="aqua_rat",
            hub_path="deepmind/aqua_rat",
            config_name="raw",
            split="test",
            rows=254,
            license="Apache-2.0",
            answer_type="choice",
            fields="question; options ('A)...'); rationale; correct",
            shape="aqua_rat",
        ),
        StandardPanel(
            name="arc_challenge",
            hub_path="allenai/ai2_arc",
            config_name="ARC-Challenge",
            split="test",
            rows=1172,
            license="CC-BY-SA-4.0",
            answer_type="choice",
            fields="id; question; choices {text, label}; answerKey",
            shape="choices_answer_key",
        ),
        StandardPanel(
            name="arc_easy",
            hub_path="allenai/ai2_arc",
            config_name="ARC-Easy",
            split="test",
            rows=2376,
            license="CC-BY-SA-4.0",
            answer_type="choice",
            fields="id; question; choices {text, label}; answerKey",
            shape="choices_answer_key",
        ),
        StandardPanel(
            name="commonsense_qa",
            hub_path="tau/commonsense_qa",
            config_name=None,
            split="validation",  # the test split has no answer keys
            rows=1221,
            license="MIT",
            answer_type="choice",
            fields="id; question; choices {label, text}; answerKey",
            shape="choices_answer_key",
        ),
        StandardPanel(
            name="strategyqa",
            hub_path="ChilleD/StrategyQA",
            config_name=None,
            split="test",
            rows=687,
            license="MIT",
            answer_type="boolean",
            fields="qid; question; answer (true / false); facts",
            shape="boolean",
        ),
    )
}


def list_standard_panels() -> list[StandardPanel]:
    """The standard panels `load_panel` takes by name, in registry order.

    Returns:
        One `StandardPanel` per name (hub path, config, split, rows, license, answer type).
    """
    return list(STANDARD_PANELS.values())


def _key(name: str) -> str:
    """`ARC-Challenge`, `arc_challenge` and `arcchallenge` all read as one name."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY = {_key(name): panel for name, panel in STANDARD_PANELS.items()}


def find_standard_panel(name: str) -> StandardPanel | None:
    """The standard panel registered under `name` (ignoring case, `-`, `_` and spaces), or None."""
    return _BY_KEY.get(_key(name))


def close_panel_names(name: str) -> list[str]:
    """Registered names that look like `name` (a misspelling), closest first."""
    keys = difflib.get_close_matches(_key(name), list(_BY_KEY), n=3, cutoff=0.6)
    return [_BY_KEY[k].name for k in keys]
