"""Shared fixtures: a locally trained tokenizer, tiny models and synthetic CoT data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (rule_models, wandb_offline)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# One intra-op thread per test process (and per subprocess it starts, e.g. torchrun ranks):
# the tiny models gain nothing from more, and on a small shared machine (CI: 2 cores, 2 test
# processes) spinning OpenMP threads of several processes slow every one of them many-fold.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _one_thread_per_process() -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_one_thread_per_process()


@pytest.fixture(scope="session")
def kit_pretraining(tmp_path_factory):
    """`pretrain_tiny_model` that trains each kit model once per session (see
    `trainer_helpers.cached_pretraining`), shared by the pytest-xdist workers."""
    from trainer_helpers import cached_pretraining

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' base folders share this parent
    folder = root / "kit_models"
    folder.mkdir(exist_ok=True)
    return cached_pretraining(folder)


@pytest.fixture(scope="session")
def tokenizer():
    from faithcb.synthetic import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer():
    from faithcb.synthetic import build_tokenizer

    return build_tokenizer(chat_template=True)


@pytest.fixture(scope="session")
def arithmetic():
    from faithcb.synthetic import make_arithmetic_examples

    return make_arithmetic_examples(64, seed=11)


@pytest.fixture
def panel_rows(arithmetic):
    return [{"prompt": e["prompt"], "completion": e["completion"]} for e in arithmetic[:4]]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """An isolated offline W&B environment; yields the W&B dir."""
    pytest.importorskip("wandb")
    for key in list(os.environ):
        if key.startswith("WANDB_"):
            monkeypatch.delenv(key, raising=False)
    wandb_dir = tmp_path / "wandb_root"
    wandb_dir.mkdir()
    for key, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(key, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_PROJECT", "faithcb-tests")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    import wandb

    wandb.teardown()  # W&B settings are process-global: start from this test's environment
    yield wandb_dir
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()
