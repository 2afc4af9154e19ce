"""The probe protocol and the registry of probes by name.

A probe (1) builds *variants* of an example's chain as engine requests — pure text work —
and (2) scores the engine's results into per-example fields. The engine runs the requests of
all probes together. Each per-example field named in `metrics` is averaged over the panel
into `faith/<field>`; `rates` marks the 0/1 fields (reported with a Wilson interval);
`figures` declares the facts every reader of a round needs about them (`Figure`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from ..data._panel import ProbeExample
from ..engine import Chain, ForcedResult, PromptChain, Request
from ._figure import Figure
from ._round_figures import ROUND_FIGURES


class Probe:
    """Base class of a probe.

    Subclasses set `name`, `metrics` (per-example scalar fields averaged over the panel) and
    `rates` (the subset of `metrics` that are 0/1 indicators), `agreement` (the metrics that
    measure agreement with the full-chain answer; they are also reported split by whether that
    answer was correct), `figures` (the facts of its figures: direction, role in `score`,
    report and dashboard placement; see `Figure`), and implement `variants` and `score`.
    A probe that needs settings of the `FaithConfig` overrides `from_config`.
    """

    name: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ()
    rates: ClassVar[tuple[str, ...]] = ()
    agreement: ClassVar[tuple[str, ...]] = ()
    #: Whether the probe still reads a chain that hit `max_new_tokens` without an answer. Figures
    #: that compare forced answers with the full-chain answer must not (that answer is not the
    #: model's); a figure read against the gold answer may.
    reads_truncated_chains: ClassVar[bool] = False
    figures: ClassVar[tuple[Figure, ...]] = ()

    @classmethod
    def from_config(cls, config: Any) -> Probe:
        """The probe as a round with `config` (a `FaithConfig`) runs it; the default takes no setting.

        Args:
            config: The round's settings.
        """
        return cls()

    def on_train_begin(self, model: Any, tokenizer: Any) -> None:
        """Optional hook, called once when a training run begins, before any round and any
        optimizer step (not when a run resumes): for work that needs the model as it was before
        fine-tuning (e.g. a frozen copy of it). The default does nothing.
        """

    def on_round_start(self, engine: Any) -> None:
        """Optional hook, called once per round with the round's engine, before any chain.

        For text work that depends on the model's tokenizer (e.g. the length of a text in the
        model's own tokens: `engine.encode_continuation(text)`). Probes never call the model.
        The default does nothing.
        """

    def prepare(self, chains: Sequence[Chain], a_full: Sequence[str | None]) -> None:
        """Optional hook, called once per round before any `variants`: batch work over all chains.

        A probe whose perturbed texts come from a perturbation source (a paraphraser, a mistake
        maker, possibly a reference model) computes them all here in one batch. The default does
        nothing.

        Args:
            chains: The round's parsed examples (indexed by `Chain.index`).
            a_full: The full-chain answer of each chain, in the same order.
        """

    def prompt_requests(
        self, index: int, example: ProbeExample, render: Callable[[ProbeExample], str]
    ) -> list[PromptChain]:
        """Optional hook, called before the round generates: altered prompts to reason on.

        Their chains are generated in the same batched decode as the round's chains; `score`
        finds each parsed `Chain` in `results[request]`. The default asks for none.

        Args:
            index: Position of the example in the round (`Chain.index`).
            example: The panel example.
            render: Renders an example (e.g. a `dataclasses.replace`d copy with an altered
                question) into prompt text exactly as the round renders its own prompts.
        """
        return []

    def panel_metrics(self, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Optional hook: panel figures that are not means of one per-example field (e.g. a rate
        pooled over several trials per example), computed from the round's records (also per
        slice). Keys without the `faith/` prefix; the default adds none."""
        return {}

    def variants(self, chain: Chain, a_full: str | None) -> list[Request]:
        """Requests this probe needs for one example (no model calls here).

        Args:
            chain: The parsed example.
            a_full: The answer forced after the full chain (known before variants are built).
        """
        raise NotImplementedError

    def score(self, chain: Chain, results: Mapping[Request, Any], a_full: str | None) -> dict[str, Any]:
        """Per-example fields from the engine's results.

        Args:
            chain: The parsed example.
            results: Results of every request of the round.
            a_full: The answer forced after the full chain (None: unparseable).
        """
        raise NotImplementedError


def same_answer(result: ForcedResult, reference: str | None) -> bool | None:
    """Whether a forced answer equals the reference; None when either is unparseable."""
    if result.answer is None or reference is None:
        return None
    return result.answer == reference


_REGISTRY: dict[str, type[Probe]] = {}


def register_probe(name: str) -> Callable[[type[Probe]], type[Probe]]:
    """Class decorator: make a probe constructible by name (`get_probe(name)`) and its `figures`
    known to every reader of a round (aggregation, stop rules, report, W&B, console, CLI).

    A figure key belongs to one set of facts: a probe may declare a key another probe declares
    only with the same facts (a subclass of a registered probe inherits its figures).

    Raises:
        ValueError: The name is taken, or a figure key is declared with other facts by another
            probe (or is a round figure) already.
    """

    def wrap(cls: type[Probe]) -> type[Probe]:
        if name in _REGISTRY:
            raise ValueError(f"A probe named {name!r} is already registered.")
        figures = tuple(getattr(cls, "figures", ()))
        if not all(isinstance(f, Figure) for f in figures):
            raise ValueError(f"Probe {name!r}: figures must hold Figure objects.")
        taken: dict[str, tuple[str, Figure]] = {}
        for owner, figure in _owned_figures():
            taken.setdefault(figure.key, (owner, figure))
        clash = [f"{f.key!r} (declared by {taken[f.key][0]})" for f in figures if taken.get(f.key, (0, f))[1] != f]
        if clash or len({f.key for f in figures}) != len(figures):
            raise ValueError(
                f"Probe {name!r} declares figures with other facts than before: "
                f"{', '.join(clash) or 'a key twice within its own figures'}."
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def unregister_probe(name: str) -> None:
    """Remove a registered probe (and its figures) by name; for tests and notebooks that register
    a probe for a while.

    Raises:
        ValueError: No probe has this name.
    """
    if name not in _REGISTRY:
        raise ValueError(f"No probe named {name!r} is registered; registered probes: {', '.join(list_probes())}.")
    del _REGISTRY[name]


def _owned_figures() -> list[tuple[str, Figure]]:
    """(owner, figure) of the round's own figures, then of every registered probe by name."""
    owned = [("the round", f) for f in ROUND_FIGURES]
    for name in sorted(_REGISTRY):
        owned.extend((f"probe {name!r}", f) for f in getattr(_REGISTRY[name], "figures", ()))
    return owned


def registered_figures() -> list[Figure]:
    """The facts of every figure a round can log, each key once: the round's own figures, then
    those of every registered probe (probes in name order, each in its declared order)."""
    first: dict[str, Figure] = {}
    for _, figure in _owned_figures():
        first.setdefault(figure.key, figure)
    return list(first.values())


def list_probes() -> list[str]:
    """Names of the registered probes."""
    return sorted(_REGISTRY)


def get_probe(name: str | Probe, **kwargs: Any) -> Probe:
    """A probe instance from its registered name (instances pass through)."""
    if isinstance(name, Probe):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"Unknown probe {name!r}; registered probes: {', '.join(list_probes())}.")
    return _REGISTRY[name](**kwargs)


def probe_from_config(name: str | Probe, config: Any) -> Probe:
    """A probe instance from its registered name, built with the settings of `config` (its class's
    `from_config`); instances pass through."""
    if isinstance(name, Probe):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"Unknown probe {name!r}; registered probes: {', '.join(list_probes())}.")
    return _REGISTRY[name].from_config(config)
