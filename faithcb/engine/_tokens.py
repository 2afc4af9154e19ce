"""Tokens: encoding a round's texts, left padding, batching, and the model's EOS ids."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch


class Tokenization:
    """The part of `ProbeEngine` that turns text into padded batches of token ids (a mixin: it
    uses the engine's `model`, `tokenizer` and `device`)."""

    model: Any
    tokenizer: Any
    device: torch.device

    def encode(self, text: str) -> list[int]:
        """Token ids of a full context; BOS is added unless the text already starts with it."""
        return self.encode_many([text])[0]

    def encode_many(self, texts: Sequence[str], *, continuation: bool = False) -> list[list[int]]:
        """`encode` (or `encode_continuation`) of many texts, one tokenizer call per kind (a
        fast tokenizer encodes a batch in parallel, without the per-call overhead). Each distinct
        text is encoded once: a round's probes ask for many of the same contexts (an early
        answer and an information-gain log-prob after the same prefix)."""
        bos = self.tokenizer.bos_token
        distinct = list(dict.fromkeys(texts))
        adds_bos = [not continuation and not (bos and text.startswith(bos)) for text in distinct]
        by_text: dict[str, list[int]] = {}
        for add_special in (False, True):
            batch = [text for text, adds in zip(distinct, adds_bos) if adds == add_special]
            if batch:
                encoded = self.tokenizer(batch, add_special_tokens=add_special)["input_ids"]
                by_text.update(zip(batch, encoded))
        return [list(by_text[text]) for text in texts]  # a list of its own for every caller

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of text that continues a context (no special tokens)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _left_pad(self, rows: Sequence[list[int]], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(width or 0, max(len(r) for r in rows))
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _batches(self, order: list[int], size: int) -> Iterable[list[int]]:
        for start in range(0, len(order), size):
            yield order[start : start + size]

    def _eos_ids(self) -> list[int]:
        return _as_list(getattr(self.model.generation_config, "eos_token_id", None)) or _as_list(
            self.tokenizer.eos_token_id
        )


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
