"""benchmarks/round_benchmark.py: a smoke run with tiny settings prints the promised JSON line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "round_benchmark.py"
KEYS = (
    "speedup_vs_reference",
    "metrics_equal",
    "round_seconds",
    "train_step_seconds",
    "overhead_fraction",
    "round_peak_mem_over_train_peak",
    "device",
)


def test_benchmark_smoke_run_prints_its_figures_as_the_last_line(tmp_path):
    args = ["--device", "cpu", "--panel_size", "4", "--pretrain_steps", "20", "--timed_rounds", "1"]
    args += ["--train_batch", "2", "--train_seq", "32", "--max_new_tokens", "24", "--candidates", "1"]
    args += ["--profile_out", str(tmp_path / "profile.txt"), "--deterministic", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(key in report for key in KEYS)
    assert report["device"] == "cpu" and report["panel_size"] == 4
    assert report["deterministic"] is True
    assert report["metrics_equal"] is True  # engine and reference agree on the same panel
    assert report["speedup_vs_reference"] > 0 and report["round_seconds"] > 0
    # a round over the bare generation of the same chains (which it contains: at least 1)
    assert report["round_over_generation"] == report["round_seconds"] / report["generation_seconds"]
    assert report["generation_seconds"] > 0 and report["round_cost"]["cost/generated_tokens"] > 0
    assert report["overhead_fraction"] == report["round_seconds"] / (50 * report["train_step_seconds"])
    assert set(report["candidates"]) == {
        "same_settings_again",
        "compiled_forced_answers",
        "packed_long_variants",
        "packed_long_variants_bigger_batches",
        "without_drafts",
        "any_sdpa_kernel_in_packed_passes",
        "text_read_every_step",
        "generate_decoding",
        "repeated_kv_heads",
        "every_guard_every_step",
        "reads_waited_for",
        "long_variants_one_per_row",
        "masked_single_rows",
        "bigger_scoring_batches",
    }
    # same figures with other packing, batches, row sharing, masks, stop checks or SDPA kernels
    # (CUDA), or without drafts
    for name in set(report["candidates"]) - {"compiled_forced_answers"}:
        assert report["candidates"][name]["records_differing"] == 0, name
    assert report["timed_rounds_differing"] == 0  # same model, same panel: same records
    # each finished stage was reported on stderr as it ended
    stages = [json.loads(line)["stage"] for line in proc.stderr.splitlines() if line.startswith('{"stage"')]
    assert stages[:4] == ["build", "train_step", "warmup_round", "timed_rounds"]
    assert "chains" in stages and "candidate without_drafts" in stages
    # the profiler table labels the engine's phases
    table = (tmp_path / "profile.txt").read_text()
    assert "phase::generate_chains" in table and "phase::_packed" in table
    # every generate decode step and packed pass is a forward pass
    calls = report["round_calls"]
    assert report["round_forward_passes"] >= calls["generate"] + calls["forward"] + calls.get("decode_steps", 0)
    phases = report["round_phase_seconds"]
    assert phases["generate_chains"] > 0 and phases["_packed"] > 0 and phases["other"] >= 0
    # each phase's model steps, counted outside the model: here every forward pass is one of them
    steps = report["round_phase_steps"]
    assert steps["generate_chains"] > 0 and steps["_packed"] > 0
    assert sum(steps.values()) == report["round_forward_passes"]


def test_benchmark_rejects_an_unknown_candidate_before_it_builds_anything(bench, monkeypatch, capsys):
    """`main` parses its arguments first (the smoke runs above start the script as users do)."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--candidate_names", "without_drafts,no_such_setting"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no_such_setting" in err and "without_drafts" in err
    assert '"stage"' not in err


@pytest.fixture
def bench(monkeypatch):
    """The benchmark script as a module (registered while the test runs: it defines dataclasses)."""
    spec = importlib.util.spec_from_file_location("round_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_split_settings_set_each_candidate_setting_where_it_lives_and_leave_the_defaults(bench):
    from faithcb.engine import EngineOptions

    def current(options):
        return options.packed_sdpa_backends, options.text_check_every, options.static_decode

    settings = {k for overrides in bench.CANDIDATES.values() for k in overrides}
    assert {"packed_sdpa_backends", "text_check_every", "static_decode"} <= settings
    before = current(EngineOptions())
    overrides = {"packed_sdpa_backends": None, "text_check_every": 1, "static_decode": False, "draft_answers": False}
    fields, options = bench.split_settings(overrides)
    assert current(options) == (None, 1, False)
    assert fields == {"draft_answers": False}  # a FaithConfig field, not an engine option
    assert current(EngineOptions()) == before
    for candidate in bench.CANDIDATES.values():  # every candidate names settings that exist
        bench.split_settings(candidate)
    with pytest.raises(KeyError, match="NO_SUCH_SETTING"):
        bench.split_settings({"NO_SUCH_SETTING": 1})


def test_phase_steps_count_every_forward_pass_of_either_decode_path(bench, tokenizer):
    """`time_phases` counts decode steps of the engine's static-cache loop as well as of
    `generate` (CPU runs the loop uncompiled with `compile_generation=True`)."""
    from faithcb import FaithConfig, load_panel, run_probe_round
    from faithcb.synthetic import build_tiny_model, make_arithmetic_examples, to_sft_dataset

    model = build_tiny_model(tokenizer, seed=1).eval()
    panel = load_panel(to_sft_dataset(make_arithmetic_examples(3, seed=2)))
    for static in (True, False):
        config = FaithConfig(max_new_tokens=16, compile_generation=static, generation_batch_size=2)
        run_probe_round(model, tokenizer, panel, config)  # once-per-model checks (packing) out of the way
        _, steps = bench.time_phases(lambda c=config: run_probe_round(model, tokenizer, panel, c), "cpu")
        passes = bench.count_forward_passes(model, lambda c=config: run_probe_round(model, tokenizer, panel, c))
        assert steps["generate_chains"] >= 2, static
        assert sum(steps.values()) == passes, static


DECODE_SCRIPT = SCRIPT.with_name("decode_step_benchmark.py")


def test_decode_step_benchmark_smoke_run_times_every_step_setting(tmp_path):
    """benchmarks/decode_step_benchmark.py: each step setting decodes the same batch, and the
    report says how long a step took against the default's (traced only: `--compile_backend eager`)."""
    from dataclasses import fields

    from faithcb.engine import EngineOptions

    args = ["--device", "cpu", "--num_layers", "2", "--steps", "6", "--repeats", "1", "--batch", "2", "--prompt", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(DECODE_SCRIPT), *args, "--compile_backend", "eager"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["device"] == "cpu" and report["steps"] == 6 and report["compile_backend"] == "eager"
    settings = report["settings"]
    assert set(settings) == {"default", "repeated_kv_heads", "every_guard_every_step", "neither", "reads_waited_for"}
    assert settings["default"]["ratio_to_default"] == 1.0
    for name, figures in settings.items():
        assert figures["ms_per_step"] > 0 and figures["warmup_seconds"] > 0, name
        assert figures["tokens_equal_to_default"] is True, name  # fp32: the settings change no token
        assert set(figures["overrides"]) <= {f.name for f in fields(EngineOptions)}, name


def test_decode_step_benchmark_rejects_a_decode_too_short_to_time(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(DECODE_SCRIPT.parent))  # it imports round_benchmark, as a script does
    monkeypatch.delitem(sys.modules, "round_benchmark", raising=False)
    spec = importlib.util.spec_from_file_location("decode_step_benchmark", DECODE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # it defines dataclasses
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(DECODE_SCRIPT), "--device", "cpu", "--steps", "1"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2 and "--steps must be >= 2" in capsys.readouterr().err
