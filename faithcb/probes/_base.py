"""The probe protocol and the registry of probes by name.

A probe (1) builds *variants* of an example's chain as engine requests — pure text work —
and (2) scores the engine's results into per-example fields. The engine runs the requests of
all probes together. Each per-example field named in `metrics` is averaged over the panel
into `faith/<field>`; `rates` marks the 0/1 fields (reported with a Wilson interval).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from .._panel import ProbeExample
from ..engine import Chain, ForcedResult, PromptChain, Request


class Probe:
    """Base class of a probe.

    Subclasses set `name`, `metrics` (per-example scalar fields averaged over the panel) and
    `rates` (the subset of `metrics` that are 0/1 indicators), `agreement` (the metrics that
    measure agreement with the full-chain answer; they are also reported split by whether that
    answer was correct), and implement `variants` and `score`.
    """

    name: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ()
    rates: ClassVar[tuple[str, ...]] = ()
    agreement: ClassVar[tuple[str, ...]] = ()

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


_REGISTRY: dict[str, Callable[..., Probe]] = {}


def register_probe(name: str) -> Callable[[type[Probe]], type[Probe]]:
    """Class decorator: make a probe constructible by name (`get_probe(name)`)."""

    def wrap(cls: type[Probe]) -> type[Probe]:
        if name in _REGISTRY:
            raise ValueError(f"A probe named {name!r} is already registered.")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


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
