"""The faithfulness section of the model card a trainer writes (`<output_dir>/README.md`).

transformers' `Trainer.create_model_card` and TRL's (`BaseTrainer.create_model_card`) both
write `README.md` from scratch every time they are called: `push_to_hub` calls it after the
callbacks' `on_push_begin`, TRL trainers call it before every checkpoint save, and a script
may call it after training. Text a callback event added to the file would be gone at the next
write, so the section is added by the trainer's own `create_model_card`: the callback wraps it
on the trainer instance (`install_card_section`), and after each write the section, built from
the run as it stands, is put into the file between two HTML comments (replacing an earlier one,
never duplicating it). At the end of training, a card already in `output_dir` that carries the
section gets it refreshed (`refresh_card_section`), since TRL wrote it at the last checkpoint.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The model card's file name in `output_dir` (what transformers and TRL write).
CARD_FILE = "README.md"


def card_markers(prefix: str = "faith") -> tuple[str, str]:
    """The HTML comments around the section (one pair per log prefix, so two monitors of one run
    keep a section each)."""
    return f"<!-- faithcb:begin {prefix} -->", f"<!-- faithcb:end {prefix} -->"


def with_card_section(card: str, section: str, prefix: str = "faith") -> str:
    """The card text with `section` between its markers: in place of an earlier section, else
    appended after a blank line."""
    begin, end = card_markers(prefix)
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    start = card.find(begin)
    stop = card.find(end, start + len(begin)) if start >= 0 else -1
    if start >= 0 and stop >= 0:
        tail = card[stop + len(end) :]
        return card[:start] + block.rstrip("\n") + tail
    return card.rstrip("\n") + "\n\n" + block if card.strip() else block


def has_card_section(card: str, prefix: str = "faith") -> bool:
    """Whether the card carries this prefix's section."""
    begin, end = card_markers(prefix)
    return begin in card and end in card


def write_card_section(card_path: str | Path, section: str, prefix: str = "faith") -> Path:
    """Put `section` into the card file (which must exist); returns its path."""
    path = Path(card_path)
    text = path.read_text(encoding="utf-8")
    path.write_text(with_card_section(text, section, prefix), encoding="utf-8")
    return path


def install_card_section(trainer: Any, prefix: str, section: Callable[[], str | None]) -> None:
    """Make `trainer.create_model_card` add a faithfulness section to the card it writes.

    The trainer's method (a bound method, or the wrapper an earlier monitor installed) is
    replaced on the instance by a wrapper that calls it, then, on the main process, puts
    `section()` into `<output_dir>/README.md`. A `section()` of None (no round yet) leaves the
    card as written. A failure is logged and never reaches the caller: the card is a convenience.

    Args:
        trainer: A `transformers.Trainer` (TRL trainers included).
        prefix: The monitor's log prefix (each prefix keeps one section).
        section: Builds the section's markdown from the run as it stands.
    """
    original = getattr(trainer, "create_model_card", None)
    if not callable(original):
        return
    sections = getattr(original, "faithcb_sections", None)
    if isinstance(sections, dict):  # an earlier monitor of this trainer wrapped it already
        sections[prefix] = section
        return
    sections = {prefix: section}

    @functools.wraps(original)
    def create_model_card(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if _is_main(trainer):
            for key, make in list(sections.items()):
                add_section(trainer, key, make)
        return result

    create_model_card.faithcb_sections = sections  # type: ignore[attr-defined]
    trainer.create_model_card = create_model_card


def add_section(trainer: Any, prefix: str, section: Callable[[], str | None], *, only_if_present: bool = False) -> None:
    """Put `section()` into the trainer's card file, if there is one; never raises.

    Args:
        trainer: The trainer (its `args.output_dir` holds the card).
        prefix: The monitor's log prefix.
        section: Builds the section's markdown (None: nothing to add).
        only_if_present: Only refresh a section the card already carries.
    """
    try:
        path = Path(trainer.args.output_dir) / CARD_FILE
        if not path.is_file():
            return
        if only_if_present and not has_card_section(path.read_text(encoding="utf-8"), prefix):
            return
        text = section()
        if text:
            write_card_section(path, text, prefix)
    except Exception:
        logger.warning("faithcb: adding the faithfulness section to the model card failed.", exc_info=True)


def refresh_card_section(trainer: Any, prefix: str, section: Callable[[], str | None]) -> None:
    """Bring the section of a card already in `output_dir` up to date (main process; never raises)."""
    if _is_main(trainer):
        add_section(trainer, prefix, section, only_if_present=True)


def _is_main(trainer: Any) -> bool:
    check = getattr(trainer, "is_world_process_zero", None)
    try:
        return bool(check()) if callable(check) else True
    except Exception:
        return True
