"""A locally trained tokenizer and tiny randomly initialised causal LMs.

Everything here runs offline on a CPU in seconds: no model or tokenizer is
downloaded. Together with :mod:`faithcb.synthetic._tasks` this lets users try
faithcb (and tests exercise it) without a GPU.
"""

from __future__ import annotations

import logging
import math
import random
import string
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from ._tasks import (
    FORMAT_SHIFT_TEMPLATE,
    make_arithmetic_examples,
    make_letter_examples,
    to_text_dataset,
)

__all__ = [
    "BASE_ALPHABET",
    "CHAT_MARKERS",
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TINY_ARCHS",
    "build_tiny_model",
    "build_tokenizer",
    "default_tokenizer_texts",
    "pretrain_tiny_model",
]

logger = logging.getLogger(__name__)

#: Characters that are always in the vocabulary: printable ASCII letters, digits,
#: punctuation, space and newline (96 characters).
BASE_ALPHABET: str = string.ascii_letters + string.digits + string.punctuation + " \n"

#: Special tokens (``bos``, ``eos``, ``pad``, ``unk``).
SPECIAL_TOKENS: dict[str, str] = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}

#: Role markers added as special tokens when ``chat_template=True``.
CHAT_MARKERS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>")

#: Chat template used when ``chat_template=True``. Renders
#: ``<|user|>\\n{content}\\n<|assistant|>\\n{content}</s>``; the assistant content
#: and EOS are wrapped in ``{% generation %}`` so TRL's ``assistant_only_loss``
#: works. ``add_generation_prompt`` appends ``<|assistant|>\\n``.
CHAT_TEMPLATE: str = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\n' -}}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)

#: Architectures accepted by :func:`build_tiny_model`.
TINY_ARCHS: tuple[str, ...] = ("llama", "qwen2", "gpt2")


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _byte_level(ch: str) -> str:
    # GPT-2 byte-to-unicode map on the base alphabet: the ByteLevel pre-tokenizer
    # maps " " to "Ġ" and "\n" to "Ċ"; other printable ASCII maps to itself.
    if ch == " ":
        return "\u0120"
    if ch == "\n":
        return "\u010a"
    return ch


def default_tokenizer_texts(n: int = 1000, *, seed: int = 0) -> list[str]:
    """Task text used to train the default tokenizer.

    Args:
        n: Examples per task variant (2-op arithmetic, 4-op arithmetic,
            format-shifted arithmetic, 2-op letters, 4-op letters).
        seed: Generator seed.

    Returns:
        ``prompt + completion`` strings.
    """
    examples = (
        make_arithmetic_examples(n, seed=seed)
        + make_arithmetic_examples(n // 2, seed=seed + 1, min_ops=4, max_ops=4)
        + make_arithmetic_examples(n // 4, seed=seed + 2, prompt_template=FORMAT_SHIFT_TEMPLATE)
        + make_letter_examples(n, seed=seed + 3)
        + make_letter_examples(n // 2, seed=seed + 4, min_ops=4, max_ops=4)
    )
    return [row["text"] for row in to_text_dataset(examples)]


def build_tokenizer(
    texts: Iterable[str] | None = None,
    *,
    vocab_size: int = 96,
    chat_template: bool = False,
) -> PreTrainedTokenizerFast:
    """Trains a small byte-level BPE tokenizer locally (deterministic, offline).

    Design:

    * Pre-tokenizer: ``Sequence([Digits(individual_digits=True),
      Split([A-Z], isolated), ByteLevel(add_prefix_space=False,
      use_regex=False)])`` with a ``ByteLevel`` decoder. Digits and uppercase
      letters are therefore always single tokens (per-character arithmetic and
      letter tasks), and ``decode(encode(t)) == t`` exactly for any text over
      :data:`BASE_ALPHABET`, spaces and newlines included. Other characters
      become ``<unk>`` unless they occur in ``texts``.
    * Special tokens ``<s>`` (bos), ``</s>`` (eos), ``<pad>``, ``<unk>``;
      **no BOS or EOS is added automatically** (``add_special_tokens=True`` adds
      nothing); append ``tokenizer.eos_token`` yourself when training.
    * ``padding_side="left"``, ``model_max_length=512``,
      ``clean_up_tokenization_spaces=False``.

    Args:
        texts: Training text; defaults to :func:`default_tokenizer_texts`.
        vocab_size: Target number of regular (non-special) tokens: the
            96-character :data:`BASE_ALPHABET` plus learned merges. The default
            96 gives a character-level tokenizer; larger values add BPE merges.
        chat_template: If True, set :data:`CHAT_TEMPLATE` and add
            :data:`CHAT_MARKERS` as special tokens.

    Returns:
        A ``PreTrainedTokenizerFast`` that supports ``save_pretrained`` /
        ``from_pretrained``.

    Raises:
        TypeError: If ``vocab_size`` is not an int.
        ValueError: If ``vocab_size`` is smaller than the base alphabet (96).
    """
    _check_int("vocab_size", vocab_size, len(BASE_ALPHABET))
    corpus = default_tokenizer_texts() if texts is None else list(texts)
    specials = list(SPECIAL_TOKENS.values())

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex("[A-Z]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(specials),
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=[_byte_level(c) for c in BASE_ALPHABET],
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **SPECIAL_TOKENS,
        padding_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
        add_bos_token=False,
        add_eos_token=False,
    )
    if chat_template:
        tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_MARKERS)})
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 512,
    dropout: float = 0.0,
    seed: int = 0,
    attn_implementation: str = "eager",
) -> PreTrainedModel:
    """Builds a tiny randomly initialised causal LM matching ``tokenizer``.

    The vocabulary size is ``len(tokenizer)``; bos/eos/pad ids come from the
    tokenizer (config and ``generation_config``); input and output embeddings
    are tied. About 0.14M parameters at the defaults with a 100-token vocabulary.

    Args:
        tokenizer: Tokenizer, e.g. from :func:`build_tokenizer`.
        arch: ``"llama"``, ``"qwen2"`` or ``"gpt2"``.
        hidden_size: Model width (divisible by ``num_heads``).
        num_layers: Transformer blocks.
        num_heads: Attention heads (no grouped-query attention).
        intermediate_size: MLP width.
        max_position_embeddings: Maximum sequence length.
        dropout: Attention dropout (llama/qwen2); residual, embedding and
            attention dropout (gpt2).
        seed: ``torch.manual_seed`` applied right before construction.
        attn_implementation: Attention backend; ``"eager"`` (default) supports
            ``output_attentions``.

    Returns:
        The model, in eval mode, on CPU.

    Raises:
        TypeError: If a size is not an int.
        ValueError: If ``arch`` is unknown or a size or ``dropout`` is out of range.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")
    for name, value in (
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("intermediate_size", intermediate_size),
        ("max_position_embeddings", max_position_embeddings),
    ):
        _check_int(name, value)
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "tie_word_embeddings": True,
        "attn_implementation": attn_implementation,
        **ids,
    }
    if arch == "gpt2":
        config = GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=max_position_embeddings,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            **common,
        )
    else:
        config_cls = LlamaConfig if arch == "llama" else Qwen2Config
        config = config_cls(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            attention_dropout=dropout,
            **common,
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    for key, value in ids.items():
        setattr(model.generation_config, key, value)
    model.eval()
    return model


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrain_tiny_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[dict[str, Any]],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    weight_decay: float = 0.01,
    warmup_steps: int | None = None,
    log_every: int = 100,
    progress: bool = False,
) -> PreTrainedModel:
    """Trains ``model`` on ``prompt + completion + eos`` with a plain torch loop.

    Causal-LM loss on all tokens (prompt included); only padding is masked.
    Batches are drawn with replacement by a seeded ``random.Random`` and
    right-padded; AdamW with linear warm-up and cosine decay to 10% of ``lr``.
    Losses are reported through :mod:`logging` (logger ``faithcb.synthetic._tiny``).

    Args:
        model: Causal LM, e.g. from :func:`build_tiny_model`. Trained in place.
        tokenizer: Tokenizer providing ``eos_token`` and ``pad_token_id``.
        examples: Dicts with ``"prompt"`` and ``"completion"``.
        steps: Optimiser steps (>= 0).
        batch_size: Examples per step.
        lr: Peak learning rate.
        seed: Seed of batch sampling (``torch.manual_seed`` too, for dropout).
        weight_decay: AdamW weight decay.
        warmup_steps: Warm-up steps; defaults to 5% of ``steps``.
        log_every: Log the mean loss every this many steps.
        progress: Show a ``tqdm`` progress bar (if tqdm is installed).

    Returns:
        The same model, in eval mode.

    Raises:
        TypeError: If an integer argument is not an int.
        ValueError: If ``examples`` is empty or an argument is out of range.
    """
    _check_int("steps", steps, 0)
    _check_int("batch_size", batch_size)
    _check_int("log_every", log_every)
    if steps and not examples:
        raise ValueError("examples must not be empty")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if warmup_steps is None:
        warmup_steps = max(1, steps // 20)
    _check_int("warmup_steps", warmup_steps)

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    eos = tokenizer.eos_token or ""
    encoded = [
        tokenizer(ex["prompt"] + ex["completion"] + eos, add_special_tokens=False)["input_ids"] for ex in examples
    ]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, warmup_steps))

    iterator: Iterable[int] = range(steps)
    if progress:
        try:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="pretrain", total=steps)
        except ImportError:  # pragma: no cover - tqdm is optional
            logger.debug("tqdm not installed; no progress bar")

    model.train()
    running = 0.0
    for step in iterator:
        batch = [encoded[rng.randrange(len(encoded))] for _ in range(batch_size)]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        attention = torch.zeros((batch_size, width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[row, : len(ids)] = 1
        labels = input_ids.masked_fill(attention == 0, -100)
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            labels=labels.to(device),
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running += out.loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n_since = (step % log_every) + 1
            logger.info("step %d/%d loss %.4f", step + 1, steps, running / n_since)
            running = 0.0
    model.eval()
    return model
