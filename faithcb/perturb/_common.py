"""Shared machinery of perturbation sources: stable seeds, callable wrapping, a reference model.

Every perturbation source has the batch API `__call__(texts: list[str]) -> list[str]`: a probe
collects the texts of a whole round (`Probe.prepare`) and asks once, so a model-based source
runs a few batched `generate` calls per round instead of one per step.
"""

from __future__ import annotations

import collections.abc
import hashlib
import inspect
import os
import time
import typing
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class TextSource(Protocol):
    """A perturbation source: one output text per input text, in order."""

    def __call__(self, texts: list[str]) -> list[str]: ...


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from `parts`, the same in every process and Python version.

    Python's built-in `hash` of strings is salted per process (PYTHONHASHSEED), so it must never
    seed anything that has to agree across ranks or runs; this hashes the parts' text with
    SHA-256 instead.
    """
    joined = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(joined.encode("utf-8")).digest()[:8], "big")


def _hint_kind(hint: Any) -> str | None:
    """`"one"` for a `str` hint, `"batch"` for a list/sequence hint, else None."""
    if isinstance(hint, str):
        text = hint.replace(" ", "")
        if text == "str":
            return "one"
        if text.startswith(("list[", "List[", "Sequence[", "typing.List[", "collections.abc.Sequence[")):
            return "batch"
        return None
    if hint is str:
        return "one"
    origin = typing.get_origin(hint) or hint
    if origin in (list, collections.abc.Sequence, typing.List):  # noqa: UP006
        return "batch"
    return None


def infer_batched(fn: Callable[..., Any]) -> bool:
    """Whether a callable takes a list of texts (True) or one text (False).

    An explicit boolean attribute `batched` on the callable wins; then the annotation of its
    first parameter (`str` -> one text, `list[str]` / `Sequence[str]` -> a batch); without
    either, one text.
    """
    flag = getattr(fn, "batched", None)
    if isinstance(flag, bool):
        return flag
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)  # noqa: B004
    try:
        params = [
            p
            for p in inspect.signature(target).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return False
    if not params or params[0].annotation is inspect.Parameter.empty:
        return False
    annotation = params[0].annotation
    try:
        resolved = typing.get_type_hints(target).get(params[0].name, annotation)
    except Exception:  # unresolvable forward references: read the annotation text
        resolved = annotation
    return _hint_kind(resolved) == "batch"


class BatchedCallable:
    """Gives any text callable the batch API `__call__(texts) -> list[str]`.

    Args:
        fn: `str -> str` or `list[str] -> list[str]`.
        batched: Which of the two `fn` is; None infers it (see `infer_batched`).
        name: What error messages call it.
    """

    def __init__(self, fn: Callable[..., Any], *, batched: bool | None = None, name: str = "perturbation") -> None:
        if not callable(fn):
            raise TypeError(f"A {name} source must be callable, got {type(fn).__name__}.")
        self.fn = fn
        self.batched = infer_batched(fn) if batched is None else batched
        self.name = name

    def __call__(self, texts: list[str]) -> list[str]:
        texts = list(texts)
        if not texts:
            return []
        if self.batched:
            out = self.fn(texts)
            if isinstance(out, str) or not isinstance(out, Sequence):
                raise TypeError(
                    f"The {self.name} callable was treated as batched (list[str] -> list[str]) but returned "
                    f"{type(out).__name__}; pass batched=False for a str -> str callable."
                )
            out = list(out)
            if len(out) != len(texts) or not all(isinstance(t, str) for t in out):
                raise ValueError(
                    f"The batched {self.name} callable must return one string per input text "
                    f"({len(texts)} in, got {len(out)} items)."
                )
            return out
        results = []
        for text in texts:
            out = self.fn(text)
            if not isinstance(out, str):
                raise TypeError(
                    f"The {self.name} callable was treated as str -> str but returned {type(out).__name__}; "
                    "annotate its parameter as list[str] or pass batched=True for a batched callable."
                )
            results.append(out)
        return results

    def __repr__(self) -> str:
        return f"BatchedCallable({self.fn!r}, batched={self.batched})"


def looks_like_model_path(spec: str | os.PathLike) -> bool:
    """Whether a string names a local model folder or a hub id (`owner/name`)."""
    text = os.fspath(spec)
    return os.path.isdir(text) or ("/" in text and not text.startswith(("/", ".")))


def default_device() -> torch.device:
    """This process's accelerator (the live model's device under one process per GPU), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ReferenceGenerator:
    """Batched greedy generation with a frozen reference model (never the engine's live model).

    A model loaded from a path is put in eval mode with gradients off, on `device` (default:
    this process's accelerator). A model object is used where it is; its train/eval flags are
    put back after every call, and its `requires_grad` flags are never touched (it could be the
    live model).

    Args:
        model_or_path: A causal LM, or a local folder / hub id to load one from.
        tokenizer: Its tokenizer (or a folder / id); loaded from `model_or_path` when None.
        device: Where a loaded model goes (and where a given one is moved, if set).
        dtype: Weights dtype of a loaded model (e.g. `torch.bfloat16`); default: the checkpoint's.
        batch_size: Prompts per `generate` call.
        max_new_tokens: Token budget of one output.
        use_chat_template: Wrap prompts in the tokenizer's chat template (default: if it has one).
    """

    def __init__(
        self,
        model_or_path: Any,
        tokenizer: Any = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 16,
        max_new_tokens: int = 128,
        use_chat_template: bool | None = None,
    ) -> None:
        if batch_size <= 0 or max_new_tokens <= 0:
            raise ValueError("batch_size and max_new_tokens must be positive.")
        if isinstance(model_or_path, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM

            kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
            model = AutoModelForCausalLM.from_pretrained(os.fspath(model_or_path), **kwargs)
            model.to(device if device is not None else default_device())
            model.eval()
            model.requires_grad_(False)
            if tokenizer is None:
                tokenizer = model_or_path
        else:
            model = model_or_path
            if tokenizer is None:
                raise ValueError("Give the tokenizer of a reference model object.")
            if device is not None:
                model.to(device)
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.use_chat_template = use_chat_template
        self.calls = 0
        self.generated_tokens = 0  # tokens written, up to EOS or the stop string
        self.seconds = 0.0  # wall time spent generating

    @property
    def chat(self) -> bool:
        """Whether prompts go through the chat template."""
        has = getattr(self.tokenizer, "chat_template", None) is not None
        return has if self.use_chat_template is None else (self.use_chat_template and has)

    def render(self, user: str, assistant_prefix: str, plain: str) -> str:
        """The prompt text: chat-formatted `user` + `assistant_prefix`, or `plain` without a template."""
        if self.chat:
            head = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
            return head + assistant_prefix
        return plain

    def _encode(self, text: str) -> list[int]:
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    def generate(self, prompts: Sequence[str], *, stop: str | None = None) -> list[str]:
        """Greedy continuations of `prompts`, batched by length, cut at the first `stop`.

        Leading whitespace of an output is dropped before the cut; outputs are stripped. A row
        stops at EOS or once it has written `stop` (no tokens are spent after it).
        """
        if not prompts:
            return []
        start_time = time.perf_counter()
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad_id is None:
            raise ValueError("The reference tokenizer has neither a pad nor an EOS token.")
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = tok.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        encoded = [self._encode(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        device = _device_of(self.model)
        modes = [(m, m.training) for m in self.model.modules()]
        out = [""] * len(prompts)
        try:
            self.model.eval()
            with torch.no_grad():
                for start in range(0, len(order), self.batch_size):
                    batch = order[start : start + self.batch_size]
                    width = max(len(encoded[i]) for i in batch)
                    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                    mask = torch.zeros((len(batch), width), dtype=torch.long)
                    for row, i in enumerate(batch):
                        ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i], dtype=torch.long)
                        mask[row, width - len(encoded[i]) :] = 1
                    self.calls += 1
                    stops = {"stop_strings": [stop], "tokenizer": tok} if stop else {}
                    generated = self.model.generate(
                        input_ids=ids.to(device),
                        attention_mask=mask.to(device),
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        temperature=None,
                        top_p=None,
                        top_k=None,
                        pad_token_id=pad_id,
                        eos_token_id=eos_ids or None,
                        **stops,
                    )
                    for row, i in enumerate(batch):
                        new = generated[row, width:].tolist()
                        cut = next((pos for pos, t in enumerate(new) if t in eos_ids or t == pad_id), len(new))
                        self.generated_tokens += cut
                        text = tok.decode(new[:cut], skip_special_tokens=True).lstrip()
                        if stop:
                            text = text.split(stop, 1)[0]
                        out[i] = text.strip()
        finally:
            for module, training in modes:
                module.training = training
            self.seconds += time.perf_counter() - start_time
        return out


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
