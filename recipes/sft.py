"""Supervised fine-tuning with TRL's `SFTTrainer` and the faithcb monitor: the recipe to launch.

Every `SFTConfig` flag (TRL), every `ModelConfig` flag (dtype, LoRA: `--use_peft --lora_r ...`)
and every `FaithConfig` field (`--every_n_steps`, `--max_new_tokens`, `--probes`, ...; its
`seed` is `--probe_seed` here, since `--seed` is the trainer's) is a command-line flag; a YAML
file with the same keys works too (`--config recipe.yaml`). Launch:

    # one process (CPU, or one GPU)
    python recipes/sft.py \\
        --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct \\
        --dataset_name data/train.jsonl --probe_panel data/panel.jsonl \\
        --output_dir outputs/sft --max_steps 500 --learning_rate 2e-5 \\
        --every_n_steps 50 --max_new_tokens 256 --report_to wandb

    # several GPUs, data parallel (DDP): the same flags
    accelerate launch --num_processes 4 recipes/sft.py --model_name_or_path ... --probe_panel ...
    torchrun --nproc_per_node 4 recipes/sft.py --model_name_or_path ... --probe_panel ...

    # LoRA, and a stop rule that ends training when early-answering AOC drops 0.2 twice in a row
    python recipes/sft.py ... --use_peft --lora_r 16 --lora_target_modules all-linear \\
        --stop_rules "early_answer/aoc:max_drop=0.2,patience=2"

    # DeepSpeed ZeRO-3 or FSDP: the trainer's own flags; each probe round gathers the weights
    torchrun --nproc_per_node 4 recipes/sft.py ... --deepspeed zero3.json
    torchrun --nproc_per_node 4 recipes/sft.py ... --fsdp --fsdp_config fsdp.json

What was verified for each backend, and how: docs/distributed.md.

`--dataset_name` is a JSONL / JSON / Parquet / CSV file, a folder of such files, a folder
written by `datasets.Dataset.save_to_disk`, or a Hub dataset name; rows in any shape
`SFTTrainer` takes (`text`, `prompt`/`completion`, `messages`). `--probe_panel` is a JSONL
file of held-out CoT examples (see docs/getting_started.md for the row shapes).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("faithcb.recipes.sft")

# FaithConfig fields that clash with SFTConfig flags get a `probe_` prefix on the command line.
RENAMED = {"seed": "probe_seed"}


@dataclass
class ScriptArguments:
    """Data and monitor inputs of the recipe."""

    dataset_name: str = field(
        metadata={
            "help": "Training data: a .jsonl/.json/.parquet/.csv file, a folder of them, a folder saved with "
            "Dataset.save_to_disk, or a Hub dataset name."
        }
    )
    probe_panel: str = field(metadata={"help": "JSONL file of held-out CoT examples the monitor probes."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on (needs --eval_strategy steps)."}
    )
    stop_rules: list[str] = field(
        default_factory=list,
        metadata={"help": "Stop rules, e.g. 'early_answer/aoc:max_drop=0.2,patience=2' (see faithcb.StopRule)."},
    )


def probe_arguments_class() -> type:
    """`FaithConfig` as a parser dataclass, with clashing names prefixed (see `RENAMED`)."""
    from faithcb import FaithConfig

    specs = []
    for f in dataclasses.fields(FaithConfig):
        default: dict[str, Any] = {}
        if f.default is not dataclasses.MISSING:
            default["default"] = f.default
        if f.default_factory is not dataclasses.MISSING:
            default["default_factory"] = f.default_factory
        specs.append((RENAMED.get(f.name, f.name), f.type, field(metadata=dict(f.metadata), **default)))
    return dataclasses.make_dataclass("ProbeArguments", specs)


def faith_config_from(probe_args: Any) -> Any:
    """The `FaithConfig` that parsed `ProbeArguments` describe."""
    from faithcb import FaithConfig

    back = {new: old for old, new in RENAMED.items()}
    return FaithConfig(**{back.get(k, k): v for k, v in dataclasses.asdict(probe_args).items()})


def parse_args(argv: list[str] | None = None) -> tuple[Any, Any, Any, Any]:
    """(ScriptArguments, SFTConfig, ModelConfig, FaithConfig) from the command line (or a YAML `--config`)."""
    from trl import ModelConfig, SFTConfig, TrlParser

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, probe_arguments_class()))
    script_args, training_args, model_args, probe_args = parser.parse_args_and_config(args=argv)
    return script_args, training_args, model_args, faith_config_from(probe_args)


def load_train_data(name: str, *, config: str | None = None, split: str = "train") -> Any:
    """A `datasets.Dataset` from a local file, a local folder or the Hub (see the module docstring)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    formats = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    path = Path(name).expanduser()
    if path.is_file():
        kind = formats.get(path.suffix.lower())
        if kind is None:
            raise ValueError(f"--dataset_name {name}: unknown file type (use one of {', '.join(formats)}).")
        return load_dataset(kind, data_files=str(path), split="train")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            data = load_from_disk(str(path))
            return data[split] if isinstance(data, DatasetDict) else data
        return load_dataset(str(path), split=split)
    return load_dataset(name, config, split=split)


def load_model(model_args: Any) -> tuple[Any, Any]:
    """Model and tokenizer named by `--model_name_or_path` (pad token falls back to EOS)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = model_args.dtype
    if dtype not in (None, "auto"):
        dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"revision": model_args.model_revision, "dtype": dtype}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def main(argv: list[str] | None = None) -> Any:
    """Parse the flags, fine-tune with the monitor attached, save; returns the trainer."""
    from trl import SFTTrainer, get_peft_config

    from faithcb import FaithfulnessCallback, StopRule

    script_args, training_args, model_args, faith_config = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    stop_rules = [StopRule.from_string(spec) for spec in script_args.stop_rules]
    model, tokenizer = load_model(model_args)
    train_dataset = load_train_data(
        script_args.dataset_name, config=script_args.dataset_config, split=script_args.dataset_train_split
    )
    eval_dataset = None
    if script_args.dataset_test_split:
        eval_dataset = load_train_data(
            script_args.dataset_name, config=script_args.dataset_config, split=script_args.dataset_test_split
        )
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    monitor = FaithfulnessCallback.attach(trainer, script_args.probe_panel, config=faith_config, stop_rules=stop_rules)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        logger.info(
            "faithcb: %d probe rounds; per-example records in %s",
            len(monitor.history),
            Path(training_args.output_dir) / faith_config.output_subdir / "rounds.jsonl",
        )
    return trainer


if __name__ == "__main__":
    main()
    from accelerate import PartialState

    PartialState().destroy_process_group()  # a clean exit on every rank (a no-op in one process)
