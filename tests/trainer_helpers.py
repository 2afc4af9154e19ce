"""Shared trainer settings for tests: a tiny, CPU-only, quiet SFT run."""

from __future__ import annotations

import warnings
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
