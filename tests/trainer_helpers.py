"""Shared trainer settings for tests: a tiny, CPU-only, quiet SFT run; kit models pre-trained
until they show the property a test needs."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

TINY_SFT = {
    "max_steps": 4,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-3,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "bf16": False,
    "use_cpu": True,
    "gradient_checkpointing": False,
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
    "max_length": 64,
}


def tiny_lm_trainer(tokenizer: Any, tmp_path: Path, examples: list[dict], model: Any, *, max_steps: int):
    """A plain `transformers.Trainer` of a few quiet CPU steps of language modelling on the
    kit's examples (as text rows, each ending with EOS), writing to `tmp_path/out`."""
    import datasets
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from faithcb.synthetic import to_text_dataset

    train = datasets.Dataset.from_list(to_text_dataset(examples)).map(
        lambda batch: tokenizer([t + tokenizer.eos_token for t in batch["text"]]), batched=True, remove_columns=["text"]
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )


def tiny_sft_config(tmp_path: Path, **overrides: Any):
    """`trl.SFTConfig` of a few-step CPU run writing to `tmp_path/out` (overrides win)."""
    import trl

    settings = {"output_dir": str(tmp_path / "out"), **TINY_SFT, **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing -> activation_checkpointing
        return trl.SFTConfig(**settings)


def pretrain_until(
    model: Any,
    tokenizer: Any,
    examples: list[dict],
    ready: Callable[[Any], str | None],
    *,
    steps: int,
    max_rounds: int = 4,
    **pretrain_kwargs: Any,
) -> Any:
    """Pre-train a kit model `steps` steps at a time until it shows what a test relies on.

    A test that needs, say, chains with steps from a briefly trained model should not depend
    on what a few hundred steps happen to teach under this release of torch: the fixture
    checks the property after each round of training and trains on until it holds, so the
    property holds by construction (or the fixture fails, saying which one never did).

    Args:
        model: A model from `faithcb.synthetic` (trained in place).
        tokenizer: Its tokenizer.
        examples: Pre-training examples (`prompt`, `completion`).
        ready: Called with the model in eval mode: None when the property holds, else what is
            still missing.
        steps: Pre-training steps per round (the first round alone is the usual fixture).
        max_rounds: Rounds before giving up.
        **pretrain_kwargs: Passed to `pretrain_tiny_model` (each round's seed is the given
            one plus the round index).

    Returns:
        The model, in eval mode.

    Raises:
        RuntimeError: If the property still does not hold after `max_rounds` rounds.
    """
    from faithcb.synthetic import pretrain_tiny_model

    seed = pretrain_kwargs.pop("seed", 0)
    missing = None
    for attempt in range(max_rounds):
        pretrain_tiny_model(model, tokenizer, examples, steps=steps, seed=seed + attempt, **pretrain_kwargs)
        missing = ready(model.eval())
        if missing is None:
            return model
    raise RuntimeError(f"after {max_rounds * steps} pre-training steps the fixture model still lacks: {missing}")


def cached_pretraining(cache_dir: Path) -> Callable[..., Any]:
    """`faithcb.synthetic.pretrain_tiny_model`, keeping each model it trained under `cache_dir`.

    Several tests pre-train the same kit model (the demo's, say); with this, the first one
    trains it and the others load its weights. The key is everything that decides the
    weights: the model's config and initial weights, the tokenizer's vocabulary, the examples
    and the settings. A file lock per key lets test processes (pytest-xdist workers) share the
    folder: one trains, the others wait for it and load.

    Args:
        cache_dir: An existing folder.

    Returns:
        A function with `pretrain_tiny_model`'s signature.
    """
    import torch
    from filelock import FileLock

    from faithcb.synthetic import pretrain_tiny_model

    def pretrain(model: Any, tokenizer: Any, examples: Any, **kwargs: Any) -> Any:
        digest = hashlib.sha256(model.config.to_json_string().encode())
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
        digest.update(json.dumps([[e["prompt"], e["completion"]] for e in examples]).encode())
        digest.update(json.dumps(kwargs, sort_keys=True, default=str).encode())
        path = cache_dir / f"{digest.hexdigest()[:32]}.pt"
        with FileLock(f"{path}.lock"):
            if path.exists():
                model.load_state_dict(torch.load(path, map_location="cpu"))
                return model.eval()
            pretrain_tiny_model(model, tokenizer, examples, **kwargs)
            scratch = path.with_suffix(".tmp")
            torch.save(model.state_dict(), scratch)
            os.replace(scratch, path)
        return model.eval()

    return pretrain
