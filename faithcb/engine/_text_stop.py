"""When a batch of generated rows stops: text conditions read every few steps, and a stop flag
read one step late on CUDA.

transformers' `generate` asks its stopping criteria after every decode step. A criterion that
reads the text copies the tokens to the host, which waits until the device has finished the
step, so the host cannot queue the next one meanwhile, and a small model's decode steps then
take longer in wall time than on the device (docs/dev/engine.md). `TextStop` reads the text
only every `check_every` steps and then finds the exact token after which each row's condition
first held, so the rows end where a check after every step would have ended them, while the
device runs ahead in between.

transformers itself reads its "every row is done" flag after every step too, and defers that
read by one step on MPS only; the engine lets it defer on CUDA as well (`deferred_stop_checks`
in `faithcb.engine._patches`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch
from transformers import StoppingCriteria


class TextStop(StoppingCriteria):
    """Ends a row once its new text meets a condition, reading the text every `check_every` steps.

    The condition must stay met as the text grows (true of "contains a stop string", "contains
    an answer cue" and "the answer line has ended"): a row whose condition holds at a check
    stopped at the first token since the previous check after which it held, which is where a
    check after every step would have stopped it. Call `settle` with the generated tokens once
    `generate` returns, for the steps after the last check; `stop_at` then holds each stopped
    row's length, and the tokens a row wrote after it are to be dropped.

    Args:
        met: `f(row, text) -> bool` on a row's decoded new text.
        decode: Token ids to text.
        prompt_width: Columns of the (padded) prompt in `generate`'s `input_ids`.
        rows: Rows with a condition; later rows (padding of a fixed-shape batch) are done at once.
        check_every: Decode steps between two reads of the text.
        eos_ids: End-of-sequence ids: a row read once after its EOS is not decoded again (its
            text no longer changes).

    Attributes:
        stop_at: Row index -> number of new tokens after which its text first met the condition.
    """

    def __init__(
        self,
        met: Callable[[int, str], bool],
        decode: Callable[[list[int]], str],
        *,
        prompt_width: int,
        rows: int,
        check_every: int = 1,
        eos_ids: Collection[int] = (),
    ) -> None:
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}.")
        self.met = met
        self.decode = decode
        self.prompt_width = prompt_width
        self.rows = rows
        self.check_every = check_every
        self.eos_ids = set(eos_ids)
        self.stop_at: dict[int, int] = {}
        self._ended: set[int] = set()  # rows read after their EOS without meeting the condition
        self._checked = 0  # new tokens at the last read of the text
        self._flags: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self._flags is None:
            self._flags = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            self._flags[self.rows :] = True
        if input_ids.shape[1] - self.prompt_width - self._checked < self.check_every:
            return self._flags  # the device keeps running: nothing is copied to the host
        self.settle(input_ids[:, self.prompt_width :].tolist())  # one copy for the whole batch
        flags = [row >= self.rows or row in self.stop_at for row in range(input_ids.shape[0])]
        self._flags = torch.tensor(flags, dtype=torch.bool, device=input_ids.device)
        return self._flags

    def reset(self) -> None:
        """Forget every read: the batch is decoded again from its prompt."""
        self.stop_at.clear()
        self._ended.clear()
        self._checked = 0
        self._flags = None

    def settle(self, new_tokens: list[list[int]]) -> None:
        """Read the text of every running row written since the last read."""
        width = max((len(tokens) for tokens in new_tokens), default=0)
        for row, tokens in enumerate(new_tokens[: self.rows]):
            if row in self.stop_at or row in self._ended:
                continue
            if not self.met(row, self.decode(tokens)):
                if self.eos_ids.intersection(tokens):
                    self._ended.add(row)
                continue
            self.stop_at[row] = next(
                (m for m in range(self._checked + 1, len(tokens)) if self.met(row, self.decode(tokens[:m]))),
                len(tokens),
            )
        self._checked = max(self._checked, width)


def text_check_interval(device: torch.device, max_new_tokens: int, every: int = 8) -> int:
    """Steps between two reads of the text: on CUDA (where a read stalls the device) up to
    `every` (`EngineOptions.text_check_every`), and at most a quarter of the budget, so a short
    decode (a 16-token forced answer) runs few steps past its end; after every step elsewhere."""
    if device.type != "cuda":
        return 1
    return max(1, min(every, max_new_tokens // 4))
