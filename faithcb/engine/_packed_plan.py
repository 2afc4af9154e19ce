"""Packed prefix scoring, the engine's side: which variants share a packed row, how rows are
batched, and how a batch's outputs become results (`score_packed` runs the batches)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..data._answers import CHOICE_LABELS, answer_complete, extract_answer
from ..data._parsing import THINK_CLOSE, answer_span, find_cue
from ._packed import Branch, PackedRow, attention_windows, common_prefix, packing_supported, score_packed, straggler_row
from ._requests import AnswerLogProb, Chain, ForcedAnswer, ForcedResult, Request
from ._text import cut_at_first, model_stop_strings

_DRAFT_CHARS = 256  # how much of a stated answer a draft may cover
_STRAGGLER_SHARE = 1 / 8  # forced answers a batch hands on unfinished to the batch of stragglers

LongVariant = tuple[ForcedAnswer, list[int], int]  # request, context tokens, tokens shared with the example's row


@dataclass
class _PackedCall:
    """What one call of `PackedScoring._packed` keeps while it plans and scores its rows; it is
    dropped when the call returns.

    Attributes:
        chains: The round's chains.
        continued: Regenerated chain text of the forced requests that regenerate.
        results: What the packed rows gave so far, by request.
        choice_ids: Per choice branch (`id(branch)`), the first token of each choice label.
        drafts: Per example, the answer draft its free forced branches end with.
        left_forced: Forced requests left for the plain path.
        left_logprobs: Log-prob requests left for the plain path.
    """

    chains: Sequence[Chain]
    continued: dict[ForcedAnswer, str]
    results: dict[Request, Any] = field(default_factory=dict)
    choice_ids: dict[int, list[int]] = field(default_factory=dict)
    drafts: dict[int, list[int]] = field(default_factory=dict)
    left_forced: list[ForcedAnswer] = field(default_factory=list)
    left_logprobs: list[AnswerLogProb] = field(default_factory=list)


class _AnswerCompletion:
    """`score_packed`'s `is_finished`: whether a forced branch's tokens hold a complete answer
    (or a model stop string), each distinct (cue, answer type, tokens) decoded once (many
    branches decode the same tokens: their draft). Lives for one `_packed` call."""

    def __init__(self, chains: Sequence[Chain], tokenizer: Any, stops: list[str]) -> None:
        self.chains = chains
        self.tokenizer = tokenizer
        self.stops = stops
        self.complete: dict[tuple, bool] = {}

    def __call__(self, key: ForcedAnswer, tokens: list[int]) -> bool:
        chain = self.chains[key.example]
        seen = (chain.cue, chain.answer_type, *tokens)
        if seen not in self.complete:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            self.complete[seen] = answer_complete(text, chain.cue, chain.answer_type) or any(
                s in text for s in self.stops
            )
        return self.complete[seen]


class PackedScoring:
    """The part of `ProbeEngine` that scores variants in packed rows (a mixin: it uses the
    engine's `model`, `tokenizer`, `config`, `options`, counters and encoders)."""

    config: Any

    def _packed(
        self,
        chains: Sequence[Chain],
        forced: list[ForcedAnswer],
        texts: dict[ForcedAnswer, str],
        continued: dict[ForcedAnswer, str],
        logprobs: list[AnswerLogProb],
    ) -> tuple[dict[Request, Any], list[ForcedAnswer], list[AnswerLogProb]]:
        """Score every short variant of an example inside one packed row (see `_packed`), and
        decode the forced answers of long variants in rows of their own (nested ones share one:
        `_long_variant_rows`) with the same tree decode (no `generate` call, drafts checked in
        the prefill).

        Returns the packed results and the requests left for the plain batched path (long
        log-prob and choice variants, and everything when the model does not support custom
        4-D masks).
        """
        if not self.config.packed_scoring or not (forced or logprobs):
            return {}, forced, logprobs
        if not self._has_position_ids or not packing_supported(self.model, self.tokenizer.pad_token_id):
            return {}, forced, logprobs
        call = _PackedCall(chains=chains, continued=continued)
        rows, long_variants = self._plan_packed_rows(call, forced, texts, logprobs)
        long_rows = [
            row for e, group in long_variants.items() for row in self._long_variant_rows(group, self._draft(call, e))
        ]
        eos_ids = self._eos_ids()
        stops = [s for s in model_stop_strings(self.model) if s]  # as `generate` ends a forced answer
        is_finished = _AnswerCompletion(chains, self.tokenizer, stops)
        batches = self._packed_batches(rows, long_rows)
        # With several batches, each one stops decoding once a few long answers are left; those
        # finish together in one batch of stragglers instead of keeping every batch stepping.
        stragglers: list[PackedRow] = []
        for batch in batches:
            forced_branches = [(row, b) for row in batch for b in row.branches if not b.n_answer]
            hand_off = int(len(forced_branches) * _STRAGGLER_SHARE) if len(batches) > 1 else 0
            self._score_packed_rows(call, batch, hand_off, is_finished, eos_ids, stops)
            stragglers += [straggler_row(row, b) for row, b in forced_branches if b.key not in call.results]
        for batch in self._row_batches(sorted(stragglers, key=lambda row: row.length), self.scoring_batch_size):
            self._score_packed_rows(call, batch, 0, is_finished, eos_ids, stops)
        return call.results, call.left_forced, call.left_logprobs

    def _plan_packed_rows(
        self,
        call: _PackedCall,
        forced: list[ForcedAnswer],
        texts: dict[ForcedAnswer, str],
        logprobs: list[AnswerLogProb],
    ) -> tuple[dict[int, PackedRow], dict[int, list[LongVariant]]]:
        """Each request as a branch of its example's packed row where it fits (`_fits`); forced
        ones that do not are returned as long variants (rows of their own), the rest are left for
        the plain path (`call.left_forced`, `call.left_logprobs`). An empty answer scores 0."""
        chains = call.chains
        rows: dict[int, PackedRow] = {}
        long_variants: dict[int, list[LongVariant]] = {}  # forced ones no example row takes
        # the compiled static-shape decode of `compile_forced_answers` keeps long variants on `generate`
        solo_allowed = not (self.config.compile_forced_answers and self._static_shapes())
        requests = [*forced, *logprobs]
        examples = sorted({r.example for r in requests})
        # the start of the example's full forced context (prompt + lead + chain), which its variants share
        bases = dict(zip(examples, self.encode_many([chains[e].written_context(chains[e].chain) for e in examples])))
        contexts = self.encode_many(
            [
                chains[r.example].forced_context(texts[r] if isinstance(r, ForcedAnswer) else r.chain_text)
                for r in requests
            ]
        )
        answer_texts = [chains[r.example].answer_continuation(r.answer) for r in logprobs]
        answers = dict(zip(logprobs, self.encode_many(answer_texts, continuation=True)))
        for r, context in zip(requests, contexts):
            chain = chains[r.example]
            if r.example not in rows:
                rows[r.example] = PackedRow(base=bases[r.example])
            row = rows[r.example]
            shared = common_prefix(context, row.base)
            own = context[shared:]
            n_answer = 0
            if isinstance(r, AnswerLogProb):
                answer = answers[r]
                if not answer:
                    call.results[r] = 0.0
                    continue
                own, n_answer = own + answer, len(answer)
            branch = Branch(key=r, shared=shared, own=own, n_answer=n_answer)
            free_forced = isinstance(r, ForcedAnswer) and chain.answer_type != "choice"
            if isinstance(r, ForcedAnswer) and chain.answer_type == "choice":
                label_prefix, call.choice_ids[id(branch)] = self.label_token_ids(chain.answer_sep, chain.num_choices)
                branch.own = branch.own + label_prefix
            if shared and own and self._fits(row, branch):
                row.branches.append(branch)
                if free_forced:
                    _add_draft(branch, self._draft(call, r.example))
            elif free_forced and solo_allowed and len(context) > 1:
                long_variants.setdefault(r.example, []).append((r, context, shared))
            else:
                (call.left_forced if isinstance(r, ForcedAnswer) else call.left_logprobs).append(r)
        return rows, long_variants

    def _draft(self, call: _PackedCall, example: int) -> list[int]:
        """The draft that follows every free forced branch of `example` (`draft_answers`),
        worked out once per call."""
        if not self.config.draft_answers:
            return []
        if example not in call.drafts:
            call.drafts[example] = self._answer_draft(call.chains[example])
        return call.drafts[example]

    def _packed_batches(self, rows: dict[int, PackedRow], long_rows: list[PackedRow]) -> list[list[PackedRow]]:
        """Rows of several branches (the examples' rows, then those of nested long variants) go
        `generation_batch_size` at a time: a tree-decode step feeds every row of a batch as many
        tokens as its fullest row has branches, and reads all their logits. Single-variant rows
        go `scoring_batch_size` at a time."""
        packed_rows = sorted((row for row in rows.values() if row.branches), key=lambda row: row.length)
        nested_rows = sorted((row for row in long_rows if len(row.branches) > 1), key=lambda row: row.length)
        single_rows = sorted((row for row in long_rows if len(row.branches) == 1), key=lambda row: row.length)
        batches = self._row_batches(packed_rows, max(1, self.config.generation_batch_size))
        batches += self._row_batches(nested_rows, max(1, self.config.generation_batch_size))
        batches += self._row_batches(single_rows, self.scoring_batch_size)
        return batches

    def _score_packed_rows(
        self,
        call: _PackedCall,
        batch: list[PackedRow],
        hand_off: int,
        is_finished: _AnswerCompletion,
        eos_ids: list[int],
        stops: list[str],
    ) -> None:
        """One batch of packed rows through `score_packed`; its results go to `call.results`."""
        self.calls["forward"] += 1
        self.tokens["prefilled"] += sum(row.length for row in batch)
        out = score_packed(
            self.model,
            batch,
            pad_id=self.tokenizer.pad_token_id,
            max_new_tokens=self.config.answer_max_new_tokens,
            is_finished=is_finished,
            eos_ids=eos_ids,
            choice_ids=call.choice_ids,
            hand_off=hand_off,
            calls=self.calls,
            options=self.options,
        )
        for key, value in out.items():
            call.results[key] = self._packed_result(call, key, value, eos_ids, stops)

    def _packed_result(
        self, call: _PackedCall, key: Request, value: Any, eos_ids: list[int], stops: list[str]
    ) -> float | ForcedResult:
        """A request's result from what `score_packed` gave it: a log-prob (bits) as it is, a
        choice label's index as that label, a free answer's tokens read up to EOS."""
        if isinstance(key, AnswerLogProb):
            return value
        if isinstance(value, int):
            label = CHOICE_LABELS[value]
            return ForcedResult(label, label, call.continued.get(key))
        chain = call.chains[key.example]
        tokens = value
        for pos, tok in enumerate(tokens):
            if tok in eos_ids:
                tokens = tokens[:pos]
                break
        self.tokens["generated"] += len(tokens)
        raw = self.tokenizer.decode(tokens, skip_special_tokens=True)
        raw = cut_at_first(raw, stops)
        answer = extract_answer(answer_span(raw, chain.cue), chain.answer_type, chain.num_choices)
        return ForcedResult(answer, raw, call.continued.get(key))

    def _long_variant_rows(self, variants: list[LongVariant], draft: list[int]) -> list[PackedRow]:
        """Rows for the long forced variants of one example (those its packed row does not take).

        Longest first, a variant joins the first of these rows whose base holds all but a few of
        its tokens (`_fits`), as a branch; otherwise it starts a row of its own
        (`_single_variant_row`). Variants that are prefixes of one another (the paraphrased
        chain cut after each step) then share one row instead of taking one each. Every branch
        ends with `draft` (the example's answer draft, or nothing).

        Args:
            variants: Each variant's request, context tokens, and how many of them it shares
                with the example's own row. Two contexts that depart from that row at different
                tokens share exactly the tokens before the earlier departure (no scan needed:
                an example's step removals all depart at different steps).
            draft: Tokens every branch ends with.
        """
        out: list[tuple[PackedRow, int]] = []  # each row, and the tokens its base shares with the example's row
        for request, context, on_chain in sorted(variants, key=lambda variant: len(variant[1]), reverse=True):
            need = self._fewest_shared(len(context))
            for row, row_on_chain in out if self.options.nest_long_variants else ():
                # departing from the example's row at different tokens: they share what precedes the earlier
                same_departure = row_on_chain == on_chain
                shared = common_prefix(context, row.base) if same_departure else min(row_on_chain, on_chain)
                if shared < need:  # too little shared to fit (and no copy of `own` made)
                    continue
                branch = Branch(key=request, shared=shared, own=context[shared:])
                if branch.own and self._fits(row, branch):
                    row.branches.append(branch)
                    break
            else:
                row = self._single_variant_row(request, context)
                out.append((row, min(on_chain, len(row.base))))
                branch = row.branches[0]
            _add_draft(branch, draft)
        return [row for row, _ in out]

    @staticmethod
    def _single_variant_row(request: ForcedAnswer, context: list[int]) -> PackedRow:
        """A packed row holding one long variant's forced answer: its context, the last token
        as the branch (so the tree decode and the draft check apply as in a shared row)."""
        return PackedRow(base=context[:-1], branches=[Branch(key=request, shared=len(context) - 1, own=context[-1:])])

    def _row_batches(self, rows: list[PackedRow], size: int) -> list[list[PackedRow]]:
        """Consecutive batches of packed rows sorted by length: at most `size` rows, and bounded
        4-D masks (rows x width^2 elements each, answer decode included; a model with sliding-window
        and full layers takes a mask of each kind)."""
        windows = attention_windows(self.model)
        budget = self.options.packed_mask_elements // max(1, len(set(windows.values())) if windows else 1)
        batches: list[list[PackedRow]] = []
        for row in rows:
            if batches:
                batch = batches[-1]
                width = row.length + self.config.answer_max_new_tokens  # the longest row so far
                if len(batch) < size and (len(batch) + 1) * width * width <= budget:
                    batch.append(row)
                    continue
            batches.append([row])
        return batches

    def _answer_draft(self, chain: Chain) -> list[int]:
        """Tokens of the answer the model stated after its full chain, up to where a forced
        answer is complete: the likeliest greedy answer of every variant of this example."""
        if not chain.cue_found:
            return []
        response = chain.response.partition(THINK_CLOSE)[2] or chain.response
        found = find_cue(response, [chain.cue])
        if found is None:
            return []
        after = response[found[0] + len(chain.cue) :][:_DRAFT_CHARS]
        end = next(
            (cut for cut in range(1, len(after) + 1) if answer_complete(after[:cut], chain.cue, chain.answer_type)),
            len(after),
        )
        tokens = self.encode_continuation(after[:end]) if end else []
        eos_ids = self._eos_ids()
        if tokens and eos_ids and not answer_complete(after[:end], chain.cue, chain.answer_type):
            tokens.append(eos_ids[0])  # the response ended inside the answer: most likely at EOS
        return tokens[: self.config.answer_max_new_tokens]

    def _fits(self, row: PackedRow, branch: Branch) -> bool:
        """Whether `branch` joins `row`: within `packed_row_max_tokens`, answer decode included
        (0: only short variants, as long as the shared prefix pays for them)."""
        limit = self.config.packed_row_max_tokens
        if limit <= 0:
            return len(branch.own) - branch.n_answer <= max(32, branch.shared // 4)
        decode = 0 if branch.n_answer else self.config.answer_max_new_tokens
        return row.length + len(branch.own) + decode <= limit

    def _fewest_shared(self, length: int) -> int:
        """A lower bound on the shared prefix with which a forced variant of `length` context
        tokens can pass `_fits` (at least 1: a branch shares some of its row's base)."""
        if self.config.packed_row_max_tokens > 0:
            return 1
        return max(1, length - max(32, length // 4))  # own tokens <= max(32, shared // 4 <= length // 4)


def _add_draft(branch: Branch, draft: list[int]) -> None:
    """End a forced branch with draft tokens (checked in the prefill; see `Branch`)."""
    if draft:
        branch.own = branch.own + draft
        branch.n_draft = len(draft)
