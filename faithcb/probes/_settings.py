"""The probes' settings on `FaithConfig`, checked by the probes.

`FaithConfig` runs these checks when it is built (`faithcb.probes` registers them with
`faithcb._config.register_checks` on import), so a config that names an unknown probe or hint
kind fails at once, with every other problem of the config, while the config module imports no
probe.
"""

from __future__ import annotations

import difflib
from typing import Any

from ._base import Probe, list_probes
from .hint import HINT_TEMPLATES, check_template


def probes_type_problems(value: Any) -> list[str]:
    """`FaithConfig.probes` holds registered names or `Probe` instances, in a list."""
    got = f"got {value!r} ({type(value).__name__})"
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        return [f"probes must be a list of probe names (or Probe instances), {got}"]
    if any(not isinstance(p, (str, Probe)) for p in value):
        bad = next(p for p in value if not isinstance(p, (str, Probe)))
        return [f"probes must hold probe names or Probe instances, got {bad!r} ({type(bad).__name__})"]
    return []


def settings_problems(config: Any) -> list[str]:
    """Unknown or repeated probe names, unknown hint kinds, hint templates without `{hint}`."""
    return _probe_problems(config.probes) + _hint_problems(config.hint_kinds, config.hint_templates)


def _hint_problems(kinds: list[str], templates: list[str]) -> list[str]:
    """Unknown hint kinds and templates without their {hint} placeholder."""
    problems = [
        f"hint_kinds: unknown hint kind {k!r}; built-in kinds: {', '.join(HINT_TEMPLATES)}"
        for k in kinds
        if k not in HINT_TEMPLATES
    ]
    for i, template in enumerate(templates, start=1):
        try:
            check_template(template, f"hint_templates[{i - 1}]")
        except ValueError as err:
            problems.append(str(err).rstrip("."))
    return problems


def _probe_problems(probes: list[Any]) -> list[str]:
    """Unknown or repeated probe names (the registry decides: user-registered probes count)."""
    known = list_probes()
    problems = []
    for name in probes:
        if isinstance(name, Probe) or name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"probes: unknown probe {name!r}{hint}; registered probes: {', '.join(known)}")
    names = [p.name if isinstance(p, Probe) else p for p in probes]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(f"probes lists {', '.join(map(repr, repeated))} more than once")
    return problems
