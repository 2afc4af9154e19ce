"""One rank of a multi-process faithcb run, for tests/test_distributed.py.

Launched by the tests as
`torchrun --standalone --nproc_per_node 2 tests/_dist_worker.py --mode trainer ...` (gloo on
CPU), or called in-process through `run(...)` for the single-process reference. Each rank
writes what it saw to `<out_dir>/rank<r>.json`: the per-round model calls and panel ids of its
shard, the gathered ids, the round metrics, the callback state, its faith log entries and
whether it wrote JSONL.

Modes:
    trainer: `transformers.Trainer` (DDP on CPU under torchrun) with the callback.
    sft: TRL `SFTTrainer` with the callback.
    zero3: `transformers.Trainer` under DeepSpeed ZeRO-3 (CPU accelerator, gloo), every
        parameter partitioned (`stage3_param_persistence_threshold: 0`).
    fsdp2 / fsdp1: no trainer (accelerate does not enable FSDP on CPU); the model is sharded
        with `fully_shard` on a CPU device mesh (fsdp2) or wrapped in `FullyShardedDataParallel`
        per decoder layer (fsdp1), and the callback's sharded round runs a few times on it.

`--sync` installs `synced_engine()`, a prototype (monkeypatch) of the engine change a model
too large to gather would need: every rank enters every model-call phase and makes the same
number of generate / forward calls in it (dummy calls pad the short ranks), and `generate`
runs with `synced_gpus=True`. It replaces the library's weight gathering.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# the panel as written: these tests count the rounds each rank runs, and prompt-shape trials at
# the baseline (tests/test_prompt_shape.py covers them) would add rounds of their own
FAST_ROUND = {"max_new_tokens": 40, "answer_max_new_tokens": 6, "panel_size": None, "prompt_shape": "as_written"}


# ---------------------------------------------------------------------------- assets
def build_assets(folder: str | Path, *, pretrain_steps: int = 300, seed: int = 0) -> dict[str, str]:
    """Save a briefly pre-trained tiny Llama + tokenizer, a 5-example panel and a train set.

    The panel puts three 2-operation questions first and two 4-operation ones last, so that
    with two ranks (shards [0, 1, 2] and [3, 4, 4-padding]) the ranks get chains of different
    lengths, hence different numbers of probe variants.
    """
    import torch

    from faithcb.synthetic import (
        build_tiny_model,
        build_tokenizer,
        make_arithmetic_examples,
        pretrain_tiny_model,
        to_sft_dataset,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: two spinning OMP threads slow this down many-fold
    try:
        tokenizer = build_tokenizer()
        model = build_tiny_model(tokenizer, seed=seed)
        pretrain = make_arithmetic_examples(600, seed=seed + 1) + make_arithmetic_examples(
            300, seed=seed + 2, min_ops=3, max_ops=4
        )
        pretrain_tiny_model(model, tokenizer, pretrain, steps=pretrain_steps, batch_size=16, seed=seed)
    finally:
        torch.set_num_threads(threads)
    seen = {e["prompt"] for e in pretrain}
    panel = make_arithmetic_examples(3, seed=seed + 3, exclude=seen) + make_arithmetic_examples(
        2, seed=seed + 4, min_ops=4, max_ops=4, exclude=seen
    )
    train = make_arithmetic_examples(32, seed=seed + 5, exclude=seen)
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    panel_path = folder / "panel.jsonl"
    panel_path.write_text(
        "".join(
            json.dumps({"id": str(i), "prompt": e["prompt"], "completion": e["completion"]}) + "\n"
            for i, e in enumerate(panel)
        )
    )
    train_path = folder / "train.jsonl"
    train_path.write_text("".join(json.dumps(row) + "\n" for row in to_sft_dataset(train)))
    return {"model_dir": str(model_dir), "panel": str(panel_path), "train": str(train_path)}


# ---------------------------------------------------------------------------- prototype fix
@contextlib.contextmanager
def synced_engine() -> Iterator[None]:
    """Prototype of the engine change for FSDP / ZeRO-3 (monkeypatch; see docs/distributed.md).

    * Every model-call phase is entered on every rank, even with nothing to do locally: the
      regeneration phase of `run`, the free-form and the multiple-choice branches of
      `_forced_answers` (the engine guards them with `if requests:`).
    * `ProbeEngine._batches` agrees on the number of batches of its phase with every rank
      (one `all_reduce(MAX)` before the first batch) and, after its own batches, makes dummy
      model calls (one BOS token; `generate` with `max_new_tokens=1` or a forward) until it
      has made as many calls as the busiest rank.
    * `ProbeEngine.generate` passes `synced_gpus=True`, so ranks whose sequences finish early
      keep stepping (transformers auto-enables it only for ZeRO-3 and FSDP-managed models).
    """
    import torch
    import torch.distributed as dist

    from faithcb.engine import _engine
    from faithcb.round import _probe_round

    @contextlib.contextmanager
    def no_gathering(model, enabled=True, *, wrapped=None):
        yield False

    engine_cls = _engine.ProbeEngine
    original_full_weights = _probe_round.full_weights
    originals = {name: getattr(engine_cls, name) for name in ("_batches", "generate", "run", "_forced_answers")}

    def synced() -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def dummy_call(self: Any) -> None:
        token = self.tokenizer.bos_token_id
        token = self.tokenizer.pad_token_id if token is None else token
        ids = torch.tensor([[token]], device=self.device)
        mask = torch.ones_like(ids)
        if getattr(self, "_faithcb_phase", "forward") == "generate":
            self.calls["generate"] += 1
            self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=1,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                synced_gpus=True,
            )
        else:
            self.calls["forward"] += 1
            self.model(input_ids=ids, attention_mask=mask, use_cache=False)

    def _batches(self: Any, order: list[int], size: int):
        local = list(originals["_batches"](self, order, size))
        if not synced():
            yield from local
            return
        count = torch.tensor([len(local)], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        yield from local
        for _ in range(int(count.item()) - len(local)):
            dummy_call(self)

    def generate(self: Any, contexts, **kwargs):
        if not synced():
            return originals["generate"](self, contexts, **kwargs)
        self._faithcb_phase = "generate"
        self.model.generate = functools.partial(type(self.model).generate, self.model, synced_gpus=True)
        try:
            return originals["generate"](self, contexts, **kwargs)
        finally:
            del self.model.generate
            self._faithcb_phase = "forward"

    def run(self: Any, chains, requests, **kwargs):
        requests = list(requests)
        if synced() and not any(isinstance(r, _engine.ForcedAnswer) and r.regenerate for r in requests):
            self.generate([], max_new_tokens=1)  # the regeneration phase, empty on this rank
        return originals["run"](self, chains, requests, **kwargs)

    def _forced_answers(self: Any, chains, requests, texts, continued):
        choice = [r for r in requests if chains[r.example].answer_type == "choice"]
        if synced() and len(choice) == len(requests):
            self.generate([], max_new_tokens=1)  # the free-form phase, empty on this rank
        out = originals["_forced_answers"](self, chains, requests, texts, continued)
        if synced() and not choice:
            for _ in _batches(self, [], self.config.scoring_batch_size):  # the choice phase, empty here
                pass
        return out

    engine_cls._batches = _batches
    engine_cls.generate = generate
    engine_cls.run = run
    engine_cls._forced_answers = _forced_answers
    _probe_round.full_weights = no_gathering
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(engine_cls, name, value)
        _probe_round.full_weights = original_full_weights


# ---------------------------------------------------------------------------- run
class _Recorder:
    """Wraps the callback's sharded round to record what each rank did in each round."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []
        self.jsonl_writes = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Patch the callback module for the duration (restored after: safe in-process)."""
        from faithcb import callback as callback_module
        from faithcb.publish._sinks import JsonlSink
        from faithcb.round import _sharded

        recorder = self
        original_round = _sharded.run_probe_round
        original_sharded = callback_module.FaithfulnessCallback._run_sharded
        original_write = JsonlSink.write

        def run_probe_round(model, tokenizer, examples, config, probes=None, **kwargs):
            examples = list(examples)
            result = original_round(model, tokenizer, examples, config, probes, **kwargs)
            recorder.rounds.append({"local_ids": [e.id for e in examples], "local_calls": dict(result.calls)})
            return result

        def _run_sharded(self, model, tokenizer, *args, **kwargs):  # panel, probes: the prompt-shape trials pass them
            out = original_sharded(self, model, tokenizer, *args, **kwargs)
            result = out[0] if isinstance(out, tuple) else out  # (RoundResult, partial) in newer callbacks
            entry = recorder.rounds[-1]
            entry["gathered_ids"] = [r["id"] for r in result.records]
            # `cost/...` is what this run's ranks paid (a rank's padding duplicate included), not a figure
            entry["metrics"] = {k: v for k, v in result.metrics.items() if "cost/" not in k}
            return out

        def write(self, **kwargs):
            recorder.jsonl_writes += 1
            return original_write(self, **kwargs)

        _sharded.run_probe_round = run_probe_round
        callback_module.FaithfulnessCallback._run_sharded = _run_sharded
        JsonlSink.write = write
        try:
            yield
        finally:
            _sharded.run_probe_round = original_round
            callback_module.FaithfulnessCallback._run_sharded = original_sharded
            JsonlSink.write = original_write


def failing_probe(rank: int) -> Any:
    """A probe (unregistered instance) whose scoring raises on `rank` only."""
    from faithcb import Probe

    class FailsOnRank(Probe):
        name = "fails_on_rank"
        metrics = ("fails_on_rank/x",)

        def variants(self, chain, a_full):
            return []

        def score(self, chain, results, a_full):
            if int(os.environ.get("RANK", "0")) == rank:
                raise RuntimeError(f"probe fails on rank {rank}")
            return {}

    return FailsOnRank()


def _strip_seconds(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # `cost/...` too: what the ranks paid in tokens (a padding duplicate included), unlike one process
    return [{k: v for k, v in h.items() if k != "round_seconds" and "cost/" not in k} for h in history]


def _faith_logs(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for entry in log_history:
        faith = {
            k: v
            for k, v in entry.items()
            if k.startswith("faith/") and not k.endswith("round_seconds") and "cost/" not in k
        }
        if faith:
            out.append({"step": entry["step"], **faith})
    return out


def run(
    mode: str,
    model_dir: str,
    panel: str,
    train: str,
    out_dir: str,
    output_dir: str,
    *,
    batch_size: int = 1,
    max_steps: int = 3,
    sync: bool = False,
    plain_scoring: bool = False,
    fail_rank: int | None = None,
) -> dict[str, Any]:
    """Run one rank; returns (and writes to `<out_dir>/rank<r>.json`) what it saw."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from faithcb import FaithConfig

    recorder = _Recorder()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torchrun's default (OMP_NUM_THREADS=1): same kernels in every run
    try:
        with (
            recorder.installed(),
            synced_engine() if sync else contextlib.nullcontext(),
        ):
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            config = FaithConfig(
                every_n_steps=1,
                generation_batch_size=batch_size,
                scoring_batch_size=batch_size,
                strict=fail_rank is None,
                **FAST_ROUND,
                **({"packed_scoring": False} if plain_scoring else {}),
            )
            if mode in ("fsdp1", "fsdp2"):
                summary = _run_fsdp(mode, model, tokenizer, panel, config, max_steps)
            else:
                summary = _run_trainer(
                    mode, model, tokenizer, panel, train, config, output_dir, max_steps, fail_rank=fail_rank
                )
    finally:
        torch.set_num_threads(threads)
    summary.update(mode=mode, rounds=recorder.rounds, jsonl_writes=recorder.jsonl_writes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{summary['rank']}.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    return summary


def _run_trainer(
    mode, model, tokenizer, panel, train, config, output_dir, max_steps, *, fail_rank=None
) -> dict[str, Any]:
    from datasets import load_dataset

    from faithcb import FaithfulnessCallback, StopRule

    common = {
        "output_dir": output_dir,
        "max_steps": max_steps,
        "per_device_train_batch_size": 2,
        "learning_rate": 0.0,  # rounds at every step see the step-0 weights: exactly comparable
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    dataset = load_dataset("json", data_files=train, split="train")
    if mode == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common, bf16=False, gradient_checkpointing=False, max_length=64)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    elif mode in ("trainer", "zero3"):
        from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

        if mode == "zero3":
            common["deepspeed"] = {
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                "train_micro_batch_size_per_gpu": "auto",
                "train_batch_size": "auto",
                "gradient_accumulation_steps": "auto",
            }

        def encode(batch):
            texts = [p + c + tokenizer.eos_token for p, c in zip(batch["prompt"], batch["completion"])]
            return tokenizer(texts)

        dataset = dataset.map(encode, batched=True, remove_columns=dataset.column_names)
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        )
    else:
        raise ValueError(f"unknown mode {mode!r}")
    # Violated from step 1 on (accuracy <= 1 < 1.01); the baseline round never counts: every
    # rank must stop after the round at step 1.
    stop = StopRule("accuracy", below=1.01, min_steps=1)
    probes = None if fail_rank is None else [*config.probes, failing_probe(fail_rank)]
    callback = FaithfulnessCallback(trainer, panel, config=config, probes=probes, stop_rules=[stop])
    trainer.add_callback(callback)
    trainer.train()
    state = callback.state()
    state["history"] = _strip_seconds(state["history"])
    if isinstance(state.get("baseline"), dict):
        state["baseline"] = _strip_seconds([state["baseline"]])[0]
    return {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "is_world_process_zero": trainer.state.is_world_process_zero,
        "global_step": trainer.state.global_step,
        "stop_events": callback.stop_events,
        "should_training_stop": bool(trainer.control.should_training_stop),
        "callback_state": state,
        "faith_logs": _faith_logs(trainer.state.log_history),
        "failed_steps": [e["step"] for e in trainer.state.log_history if "faith/round_failed" in e],
        "model_training": model.training,
        "wrapped": type(trainer.model_wrapped).__name__,
        "partitioned": _partitioned(trainer.model),
    }


def _partitioned(model) -> bool:
    """Whether every weight of `model` is a ZeRO-3 partition (empty outside a gather)."""
    params = list(model.parameters())
    return all(hasattr(p, "ds_id") and p.numel() == 0 for p in params)


class _FakeTrainer:
    """Just enough of a Trainer for `FaithfulnessCallback` outside a training loop."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.processing_class = tokenizer
        self.logged: list[dict[str, float]] = []

    def log(self, logs: dict[str, float]) -> None:
        self.logged.append(dict(logs))

    state = None


def _run_fsdp(mode, model, tokenizer, panel, config, rounds) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    from faithcb import FaithfulnessCallback

    PartialState(cpu=True)  # what TrainingArguments(use_cpu=True) does: gloo group from torchrun's env
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    trainer = _FakeTrainer(model, tokenizer)
    if world > 1 and mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif world > 1:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        layer_type = type(model.model.layers[0])
        model = FullyShardedDataParallel(
            model, auto_wrap_policy=ModuleWrapPolicy({layer_type}), device_id=torch.device("cpu")
        )
        trainer.model = trainer.model_wrapped = model  # as Trainer holds an FSDP1 model
    callback = FaithfulnessCallback(trainer, panel, config=config)
    model.train()
    history = []
    for _ in range(rounds):
        out = callback._run_sharded(model, tokenizer)
        result = out[0] if isinstance(out, tuple) else out
        history.append(dict(result.metrics))
    return {
        "rank": rank,
        "world_size": world,
        "is_world_process_zero": rank == 0,
        "fsdp": world > 1,
        "wrapped": type(trainer.model).__name__,
        "history": history,
        "model_training": model.training,
    }


def main(argv: list[str] | None = None) -> None:
    """Command line of one rank."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["trainer", "sft", "zero3", "fsdp1", "fsdp2"], required=True)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--panel", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--sync", action="store_true")
    parser.add_argument("--plain_scoring", action="store_true", help="FaithConfig(packed_scoring=False)")
    parser.add_argument("--fail_rank", type=int, default=None, help="a probe raises on this rank only")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(
        args.mode,
        args.model_dir,
        args.panel,
        args.train,
        args.out_dir,
        args.output_dir,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        sync=args.sync,
        plain_scoring=args.plain_scoring,
        fail_rank=args.fail_rank,
    )
    import torch.distributed as dist

    if dist.is_initialized():  # a clean shutdown: DeepSpeed's CPU backend may abort at exit otherwise
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # The rank's work is done, its summary written and its process group destroyed. Skip the
    # interpreter's teardown: in 2 of ~20 CI runs an FSDP rank aborted there ("terminate called
    # without an active exception", a C++ thread destroyed while joinable) after writing its
    # summary, which failed a test whose figures were all in.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
