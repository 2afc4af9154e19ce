"""The plain batched path: regenerations, forced answers and answer log-probs in left-padded
batches (what packed scoring does not take, and everything when it is off)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from ..data._answers import CHOICE_LABELS, answer_complete, extract_answer
from ..data._parsing import answer_span, find_cue
from ._chains import regeneration_ends
from ._packed import common_prefix
from ._requests import AnswerLogProb, Chain, ForcedAnswer, ForcedResult

LN2 = math.log(2.0)


class PlainScoring:
    """The part of `ProbeEngine` that runs requests one row each (a mixin: it uses the engine's
    `model`, `tokenizer`, `config`, counters, `generate`, encoders and batching helpers)."""

    config: Any

    def _continue_chains(self, chains: Sequence[Chain], requests: list[ForcedAnswer]) -> dict[ForcedAnswer, str]:
        """Let the model write the rest of a chain after a (perturbed) prefix, up to any cue.

        The model continues from the prompt, its own text before the chain and the prefix; in
        the think format the chain also ends where the model closes its think block.

        A regeneration gets at most the budget the original chain had left after the given
        prefix (`max_new_tokens` minus the prefix's tokens): it cannot run longer than the chain
        it replaces could have.

        Returns the full continued chain text (the given prefix + what the model wrote).
        """
        cues = [regeneration_ends(chains[r.example], self._cues(chains[r.example].example)) for r in requests]
        static = self._static_shapes()
        width = self._chain_width([c.prompt for c in chains]) if static else 0
        budget = self.config.max_new_tokens
        written = self.encode_many([chains[r.example].lead + r.chain_text for r in requests], continuation=True)
        budgets = [budget - len(tokens) for tokens in written]
        texts = self.generate(
            [chains[r.example].written_context(r.chain_text) for r in requests],
            # the static-shape path keeps the chains' decode shape (one compiled graph); rows are cut at their budget
            max_new_tokens=budget if static else max(1, *budgets),
            budgets=budgets,
            stop_strings=self.config.stop_strings,
            finished=partial(_cue_written, cues),
            static_shapes=static,
            min_width=width,
        )
        out = {}
        for r, cue_list, (text, _) in zip(requests, cues, texts):
            found = find_cue(text, cue_list)
            out[r] = r.chain_text + (text[: found[0]] if found else text)
        return out

    def _forced_answers(
        self,
        chains: Sequence[Chain],
        requests: list[ForcedAnswer],
        texts: dict[ForcedAnswer, str],
        continued: dict[ForcedAnswer, str],
    ) -> dict[ForcedAnswer, ForcedResult]:
        """Forced answers on the plain path: free ones decoded by `generate`, choice ones read as
        the arg-max over the label tokens."""
        results: dict[ForcedAnswer, ForcedResult] = {}
        choice = [r for r in requests if chains[r.example].answer_type == "choice"]
        free = [r for r in requests if chains[r.example].answer_type != "choice"]
        if free:
            results.update(self._free_forced_answers(chains, free, texts, continued))
        if choice:
            results.update(self._choice_forced_answers(chains, choice, texts, continued))
        return results

    def _free_forced_answers(
        self,
        chains: Sequence[Chain],
        free: list[ForcedAnswer],
        texts: dict[ForcedAnswer, str],
        continued: dict[ForcedAnswer, str],
    ) -> dict[ForcedAnswer, ForcedResult]:
        """Forced answers that are written out (not choices): decoded up to a complete answer."""
        contexts = [chains[r.example].forced_context(texts[r]) for r in free]
        static = self.config.compile_forced_answers and self._static_shapes()
        # one compiled shape per run: any prompt, a chain of max_new_tokens tokens and a cue
        # (a longer context gets a wider bucket, hence one more compiled shape)
        width = self._chain_width([c.prompt for c in chains]) + 16 if static else 0
        outs = self.generate(
            contexts,
            max_new_tokens=self.config.answer_max_new_tokens,
            finished=partial(_forced_answer_written, chains, free),
            batch_size=self.scoring_batch_size,
            static_shapes=static,
            min_width=width,
        )
        results: dict[ForcedAnswer, ForcedResult] = {}
        for r, (raw, _) in zip(free, outs):
            chain = chains[r.example]
            answer = extract_answer(
                answer_span(raw, chain.cue), chain.answer_type, chain.num_choices, chain.example.choices
            )
            results[r] = ForcedResult(answer, raw, continued.get(r))
        return results

    def _choice_forced_answers(
        self,
        chains: Sequence[Chain],
        choice: list[ForcedAnswer],
        texts: dict[ForcedAnswer, str],
        continued: dict[ForcedAnswer, str],
    ) -> dict[ForcedAnswer, ForcedResult]:
        """Forced answers of choice examples: the label whose first token is likeliest."""
        results: dict[ForcedAnswer, ForcedResult] = {}
        encoded, labels = [], []
        for r in choice:
            chain = chains[r.example]
            shared, first = self.label_token_ids(chain.answer_sep, chain.num_choices)
            encoded.append(self.encode(chain.forced_context(texts[r])) + shared)
            labels.append(first)
        order = sorted(range(len(choice)), key=lambda i: len(encoded[i]))
        for batch in self._batches(order, self.scoring_batch_size):
            logits = self._last_logits([encoded[i] for i in batch], keep=1)[:, -1]
            picks = torch.stack([torch.argmax(row[labels[i]]) for row, i in zip(logits, batch)]).tolist()
            for pick, i in zip(picks, batch):
                label = CHOICE_LABELS[pick]
                results[choice[i]] = ForcedResult(label, label, continued.get(choice[i]))
        return results

    def label_token_ids(self, sep: str, num_choices: int) -> tuple[list[int], list[int]]:
        """How the model would write each choice label after the cue.

        Returns:
            (shared, first): tokens all labels start with (e.g. a lone space token when the
            tokenizer splits `" A"` into `" "` + `"A"`), appended to the context before the
            arg-max; and each label's first token after them.
        """
        encoded = [self.encode_continuation(sep + label) for label in CHOICE_LABELS[:num_choices]]
        shared = encoded[0]
        for tokens in encoded[1:]:
            shared = shared[: common_prefix(shared, tokens)]
        shared = shared[: min(len(t) for t in encoded) - 1] if encoded else []
        first = [t[len(shared)] if len(t) > len(shared) else self.tokenizer.unk_token_id for t in encoded]
        return shared, first

    def _answer_logprobs(self, chains: Sequence[Chain], requests: list[AnswerLogProb]) -> dict[AnswerLogProb, float]:
        """Log-probabilities (bits) of answers after their contexts, in left-padded batches."""
        rows, spans = [], []
        for r in requests:
            chain = chains[r.example]
            context = self.encode(chain.forced_context(r.chain_text))
            answer = self.encode_continuation(chain.answer_continuation(r.answer))
            rows.append(context + answer)
            spans.append(len(answer))
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        out: dict[AnswerLogProb, float] = {}
        for batch in self._batches(order, self.scoring_batch_size):
            keep = max(spans[i] for i in batch) + 1
            logits = self._last_logits([rows[i] for i in batch], keep=keep)
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            scored = [(b, i) for b, i in enumerate(batch) if spans[i] > 0]
            for i in batch:
                if spans[i] == 0:
                    out[requests[i]] = 0.0
            if not scored:
                continue
            # every row's answer tokens in one host-to-device copy, the sums in one copy back
            targets = torch.tensor([t for _, i in scored for t in rows[i][-spans[i] :]], device=logprobs.device)
            sums, offset = [], 0
            for b, i in scored:
                n = spans[i]
                picked = logprobs[b, keep - 1 - n : keep - 1].gather(-1, targets[offset : offset + n, None])
                sums.append(picked.sum())
                offset += n
            for (_, i), value in zip(scored, torch.stack(sums).tolist()):
                out[requests[i]] = value / LN2
        return out

    def _last_logits(self, rows: Sequence[list[int]], *, keep: int) -> torch.Tensor:
        """Logits of the last `keep` positions of left-padded rows (never the full sequence)."""
        ids, mask = self._left_pad(rows)
        self.tokens["prefilled"] += sum(len(row) for row in rows)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        if self._has_position_ids:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        self.calls["forward"] += 1
        if self._has_logits_to_keep:
            logits = self.model(**kwargs, logits_to_keep=keep).logits
        else:
            logits = self.model(**kwargs).logits
        return logits[:, -keep:]


def _cue_written(cues: Sequence[list[str]], i: int, text: str) -> bool:
    """`generate`'s `finished` for regenerations: row `i` has written one of its `cues[i]`."""
    return find_cue(text, cues[i]) is not None


def _forced_answer_written(chains: Sequence[Chain], requests: Sequence[ForcedAnswer], i: int, text: str) -> bool:
    """`generate`'s `finished` for forced answers: row `i` holds a complete answer."""
    chain = chains[requests[i].example]
    return answer_complete(text, chain.cue, chain.answer_type)
