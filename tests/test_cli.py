"""The `faithcb` command line: `scan` on saved synthetic checkpoints, help, one-line errors."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest

from faithcb import FaithConfig, load_panel, run_probe_round
from faithcb.cli import main, postprocess_round
from faithcb.cli._scan import find_checkpoints
from faithcb.monitor._monitor import apply_drift, prefixed_logs

try:
    from tests.rule_models import auto_classes_registered, make_rule_model
except ImportError:  # pytest run from inside tests/
    from rule_models import auto_classes_registered, make_rule_model

# one token per character: a 4-step chain and its answer fit in 80 tokens
LENGTHS = ["--max_new_tokens", "80", "--answer_max_new_tokens", "4"]
FAST = [*LENGTHS, "--no-progress"]
# The run folder's checkpoints are rule models (tests/rule_models.py) with known behaviour:
# step 0 writes nothing (no chain, no answer: a round that cannot be read), step 40 writes
# the chain and answers the true value whatever it says, step 120 answers what its chain says.
KINDS = {0: "silent", 40: "ignores_chain", 120: "reads_chain"}
STEPS = tuple(KINDS)
READABLE = {0: False, 40: True, 120: True}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a shared, busy CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    """A Trainer-like output_dir with checkpoint-0/40/120 of the rule models in `KINDS`."""
    from faithcb.synthetic import make_shifted_slices

    root = tmp_path_factory.mktemp("run")
    for step, kind in KINDS.items():
        model, tokenizer = make_rule_model(kind)
        model.save_pretrained(root / f"checkpoint-{step}")
        tokenizer.save_pretrained(root / f"checkpoint-{step}")
    (root / "runs").mkdir()  # other Trainer output is ignored
    panel = make_shifted_slices(2, seed=5, slices=["in_dist", "length_shift"])
    panel_path = root.parent / f"{root.name}_panel.jsonl"
    panel_path.write_text(
        "".join(
            json.dumps({"prompt": e["prompt"], "completion": e["completion"], "slice": e["slice"]}) + "\n"
            for e in panel
        )
    )
    with auto_classes_registered():  # `faithcb scan` loads them with AutoModelForCausalLM
        yield root, panel_path


def test_find_checkpoints_sorts_by_step_and_parses_names(run_dir, tmp_path):
    root, _ = run_dir
    assert [(c.step, c.path.name) for c in find_checkpoints([root])] == [
        (0, "checkpoint-0"),
        (40, "checkpoint-40"),
        (120, "checkpoint-120"),
    ]
    # an explicit list keeps its order; the step is the list index unless the name says
    listed = find_checkpoints([root / "checkpoint-120", root / "checkpoint-0"])
    assert [c.step for c in listed] == [120, 0]
    single = find_checkpoints([root / "checkpoint-40"])
    assert [(c.step, c.path) for c in single] == [(40, root / "checkpoint-40")]


def test_apply_drift_follows_the_callback_rule():
    first = {"accuracy": 0.5, "accuracy/ci_low": 0.2, "chain/steps/stderr": 0.1, "slice/a/accuracy": 0.5}
    metrics, baseline = apply_drift(first, None)
    assert metrics == first and baseline == {"accuracy": 0.5, "slice/a/accuracy": 0.5}
    later, same = apply_drift({"accuracy": 0.75, "accuracy/ci_low": 0.4, "slice/a/accuracy": 1.0}, baseline)
    assert later["accuracy/delta"] == 0.25
    assert "accuracy/ci_low/delta" not in later and "slice/a/accuracy/delta" not in later
    assert same == baseline
    post = postprocess_round({"accuracy": 0.75, "x": math.nan}, 1.5, baseline, "faith")
    assert post.logs == {"faith/accuracy": 0.75, "faith/accuracy/delta": 0.25, "faith/round_seconds": 1.5}
    assert prefixed_logs({"a": None, "b": 1, "c": "text"}, "p") == {"p/b": 1.0}
    # a partial round (time budget) is flagged and never becomes the baseline
    partial = postprocess_round({"accuracy": 0.1}, 2.0, None, "faith", partial=True)
    assert partial.baseline is None and partial.metrics == {"accuracy": 0.1, "round_seconds": 2.0, "round_partial": 1.0}
    later = postprocess_round({"accuracy": 0.3}, 2.0, baseline, "faith", partial=True)
    assert later.metrics["accuracy/delta"] == pytest.approx(-0.2) and later.baseline == baseline


def test_scan_run_folder_writes_what_the_callback_writes(run_dir, capsys):
    root, panel = run_dir
    rc = main(["scan", str(root), "--panel", str(panel), *LENGTHS])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Scanned 3 checkpoints" in captured.out
    assert "faithcb scan" in captured.err and "3/3" in captured.err  # tqdm bar over checkpoints, on stderr
    out = root / "faithcb_scan"
    metrics = read_jsonl(out / "metrics.jsonl")
    records = read_jsonl(out / "rounds.jsonl")
    assert [(m["step"], m["round"]) for m in metrics] == [(0, 0), (40, 1), (120, 2)]
    assert len(records) == 3 * 4 and {r["step"] for r in records} == set(STEPS)
    # the callback's drift rule: the unreadable step-0 round is a provisional baseline, replaced by
    # the first readable round (step 40); every later round drifts from that one
    assert [bool(m["valid"]) for m in metrics] == [READABLE[step] for step in STEPS]
    baseline = metrics[1]
    assert not any(k.endswith("/delta") for row in metrics[:2] for k in row)
    for row in metrics[2:]:
        deltas = {k[: -len("/delta")]: v for k, v in row.items() if k.endswith("/delta")}
        assert "accuracy" in deltas and "early_answer/aoc" in deltas
        for key, delta in deltas.items():
            assert delta == pytest.approx(row[key] - baseline[key]), key
        assert not any(
            k.endswith(("/ci_low/delta", "/stderr/delta")) or (k.startswith("slice/") and "delta" in k) for k in row
        )
    # the unfaithful step-40 model and the faithful step-120 one differ on the figures that read the chain
    assert metrics[2]["early_answer/aoc/delta"] != 0
    assert any(k.startswith("slice/length_shift/") for k in metrics[-1])
    manifest = json.loads((out / "scan.json").read_text())
    assert [c["step"] for c in manifest["checkpoints"]] == list(STEPS)
    # the summary block: from the first readable checkpoint (the baseline) to the last
    assert "faithcb summary: 3 rounds (checkpoint steps 0-120, baseline at checkpoint step 40); 1 unreadable" in (
        captured.out
    )
    assert "baseline (checkpoint step 40) -> last (checkpoint step 120)" in captured.out
    assert json.loads((out / "summary.json").read_text())["figures_step"] == 120

    # Same code path as the callback: a round on the reloaded checkpoint gives the same figures.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = root / "checkpoint-120"
    config = FaithConfig(max_new_tokens=80, answer_max_new_tokens=4)
    result = run_probe_round(
        AutoModelForCausalLM.from_pretrained(ckpt),
        AutoTokenizer.from_pretrained(ckpt),
        load_panel(panel, size=config.panel_size),
        config,
    )
    expected = json.loads(json.dumps(result.records))
    assert [{k: v for k, v in r.items() if k not in ("step", "round")} for r in records if r["step"] == 120] == expected
    for key, value in result.metrics.items():
        assert metrics[-1][key] == pytest.approx(value), key
    assert any(r["early_answer/matches"] and len(r["early_answer/matches"]) > 1 for r in records)

    # the report reads a scan folder and labels its x-axis by checkpoint
    from faithcb.cli._report import load_run

    assert load_run(root).step_label == "checkpoint step"


def test_scan_model_list_with_tokenizer_flag_and_overwrite(run_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    root, panel = run_dir
    base, later = tmp_path / "base", tmp_path / "checkpoint-7"
    for src, dst in ((root / "checkpoint-0", base), (root / "checkpoint-40", later)):
        AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst)  # no tokenizer files
    capsys.readouterr()
    out = tmp_path / "scan"
    args = ["scan", str(base), str(later), "--panel", str(panel), "--out", str(out), "--panel_size", "2", *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds no tokenizer files; pass --tokenizer PATH" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--tokenizer", str(root / "checkpoint-0")]) == 0
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 7]
    capsys.readouterr()
    assert main([*args, "--tokenizer", str(root / "checkpoint-0")]) == 2
    assert "already holds results" in capsys.readouterr().err
    assert main([*args, "--tokenizer", str(root / "checkpoint-0"), "--overwrite"]) == 0
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 7]


def test_scan_logs_to_wandb_against_the_checkpoint_step(run_dir, tmp_path, wandb_env, capsys):
    from wandb_offline import find_offline_runs, read_history, read_media_keys, read_records

    root, panel = run_dir
    rc = main(["scan", str(root), "--panel", str(panel), "--out", str(tmp_path / "o"), "--wandb", *FAST])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    import wandb

    wandb.teardown()  # the run is finished; shutting the service down makes sure its log is flushed to disk
    [path] = find_offline_runs(wandb_env)
    assert f"wandb sync {path.parent}" in captured.out
    history = read_history(path)
    faith_rows = [row for row in history if "faith/accuracy" in row]
    assert [row["checkpoint/step"] for row in faith_rows] == list(STEPS)
    # the callback's W&B sections: faith/ headline figures, faith_drift/, faith_detail/, faith_interval/
    assert "faith_drift/accuracy/delta" in faith_rows[-1] and "faith_drift/accuracy/delta" not in faith_rows[0]
    assert "faith_interval/accuracy/ci_low" in faith_rows[0] and "faith/accuracy/ci_low" not in faith_rows[0]
    assert not any("train/global_step" in row for row in history)
    metrics = [r.metric for r in read_records(path) if r.HasField("metric")]
    assert any(m.name == "checkpoint/step" for m in metrics)
    for section in ("faith", "faith_drift", "faith_detail", "faith_interval"):
        assert any(m.glob_name == f"{section}/*" and m.step_metric == "checkpoint/step" for m in metrics)
    assert "faith/samples" in read_media_keys(path)


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("scan", "report", "audit-data"):
        assert command in out
    assert main([]) == 2  # no command: help on stderr, non-zero
    with pytest.raises(SystemExit):
        main(["scan", "--help"])
    scan_help = capsys.readouterr().out
    assert "--panel" in scan_help and "--max_new_tokens" in scan_help
    assert "--every_n_steps" not in scan_help and "--eval_round" not in scan_help


def _scan_help(capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["scan", "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_scan_help_puts_engine_options_in_one_advanced_group(capsys):
    from faithcb._config import ENGINE_FIELDS

    text = _scan_help(capsys)
    assert text.startswith("usage: faithcb scan RUN_DIR_OR_MODELS... --panel PANEL")
    user_part, engine_part = text.split("advanced engine options (FaithConfig):")
    assert "probe round settings (FaithConfig):" in user_part
    for name in ENGINE_FIELDS:
        assert f"--{name}" in engine_part and f"--{name}" not in user_part, name
    for name in ("max_new_tokens", "probes", "answer_cues", "paraphraser", "panel_size"):
        assert f"--{name}" in user_part and f"--{name}" not in engine_part, name


def test_scan_help_documents_each_boolean_once_without_benchmark_history(capsys):
    import re

    flat = " ".join(_scan_help(capsys).split())  # argparse wraps lines to the terminal's width
    for name in ("packed_scoring", "mistake_regenerate", "end_chain_at_answer", "wandb_media"):
        assert f"--no_{name}, --no-{name.replace('_', '-')} Turn --{name} off." in flat, name
    assert flat.count("Score the short variants of a chain") == 1  # --packed_scoring's help, not repeated
    assert flat.count("let the model rewrite the chain") == 1
    assert "(default: 256)" in flat and "(default: True)" in flat  # defaults shown once, where set
    assert not re.search(r"H[12]00|\d+(\.\d+)? ?s against|\d(\.\d+)?x (slower|faster)", flat)


def test_advanced_and_negated_flags_still_reach_the_config():
    from faithcb.cli import _config_from, build_parser

    args = build_parser().parse_args(
        [
            "scan",
            "run",
            "--panel",
            "p.jsonl",
            "--no_packed_scoring",
            "--scoring_batch_size",
            "8",
            "--max_new_tokens",
            "9",
        ]
    )
    config = _config_from(args)
    assert (config.packed_scoring, config.scoring_batch_size, config.max_new_tokens) == (False, 8, 9)
    assert config.draft_answers is True and config.compile_forced_answers is False
    args = build_parser().parse_args(["audit-data", "d.jsonl", "--model", "m", "--generation_batch_size", "2"])
    assert _config_from(args).generation_batch_size == 2


def test_python_dash_m_faithcb_help():
    proc = subprocess.run(
        [sys.executable, "-m", "faithcb", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "scan" in proc.stdout and "report" in proc.stdout and "audit-data" in proc.stdout


def _bad_inputs(tmp: Path, run_dir: tuple[Path, Path]) -> dict[str, tuple[list[str], str]]:
    root, panel = run_dir
    (tmp / "empty").mkdir()
    (tmp / "file.txt").write_text("x")
    (tmp / "run_bad" / "checkpoint-5").mkdir(parents=True)
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    (tmp / "bad_panel.jsonl").write_text('{"prompt": "Q: 1 + 1\\n", "completion": "Answer: 2"}\n{oops\n')
    (tmp / "r_none").mkdir()
    (tmp / "r_bad" / "faithcb").mkdir(parents=True)
    (tmp / "r_bad" / "faithcb" / "metrics.jsonl").write_text('{"step": 0, "accuracy": 1}\n[1, 2\n')
    (tmp / "r_empty").mkdir()
    (tmp / "r_empty" / "metrics.jsonl").write_text("\n")
    (tmp / "r_list").mkdir()
    (tmp / "r_list" / "metrics.jsonl").write_text("[1, 2]\n")
    (tmp / "r_nostep").mkdir()
    (tmp / "r_nostep" / "metrics.jsonl").write_text('{"accuracy": 1}\n')
    (tmp / "data_bad.jsonl").write_text("{]\n")
    (tmp / "data_shape.jsonl").write_text('{"text": "Q: 1 + 1\\nAnswer: 2"}\n')
    (tmp / "data_empty.jsonl").write_text("")
    (tmp / "goldless_panel.jsonl").write_text(
        '{"prompt": "Q: 1 + 1\\n", "completion": "1 + 1 = 2\\nAnswer: 2"}\n{"prompt": "Q: 2 + 2\\n"}\n'
        '{"prompt": "Q: 3 + 3\\n", "completion": "3 + 3 = 6\\nso it is 6"}\n'
    )
    good_data = tmp / "data.jsonl"
    good_data.write_text('{"prompt": "Q: 1 + 1\\n", "completion": "1 + 1 = 2\\nAnswer: 2"}\n')
    scan = ["scan", "--panel", str(panel), "--no-progress", "--out", str(tmp / "scan_out")]
    ckpt = str(root / "checkpoint-0")
    audit = ["audit-data", "--model", ckpt, "--no-progress"]
    return {
        "scan_missing_path": ([*scan, str(tmp / "nope")], "No such file or folder"),
        "scan_empty_folder": ([*scan, str(tmp / "empty")], "No checkpoint-* folders"),
        "scan_file": ([*scan, str(tmp / "file.txt")], "Not a folder"),
        "scan_checkpoint_without_config": ([*scan, str(tmp / "run_bad")], "Not a model folder (no config.json)"),
        "scan_corrupt_checkpoint": ([*scan, str(corrupt), "--tokenizer", ckpt], "Cannot load a causal LM"),
        "scan_missing_panel": ([*scan, ckpt, "--panel", str(tmp / "nope.jsonl")], "Probe panel file not found"),
        "scan_malformed_panel": ([*scan, ckpt, "--panel", str(tmp / "bad_panel.jsonl")], "bad_panel.jsonl:2: invalid"),
        "scan_bad_setting": ([*scan, ckpt, "--max_new_tokens", "0"], "invalid setting: max_new_tokens must be"),
        "scan_misspelt_probe": (
            [*scan, ckpt, "--probes", "early_answer", "fillr"],
            "invalid setting: probes: unknown probe 'fillr' (did you mean 'filler'?); registered probes: ",
        ),
        "scan_bad_answer_type": ([*scan, ckpt, "--answer_type", "num"], "answer_type must be one of auto, numeric"),
        "scan_bad_device": ([*scan, ckpt, "--device", "gpu"], "invalid setting: --device 'gpu' is not a torch device"),
        "scan_goldless_panel": (
            [*scan, ckpt, "--panel", str(tmp / "goldless_panel.jsonl")],
            "goldless_panel.jsonl has 2 bad rows: "
            f"{tmp / 'goldless_panel.jsonl'}:2: no gold answer: the row has no 'completion' and no 'gold' field. "
            f"{tmp / 'goldless_panel.jsonl'}:3: cannot read a gold answer: 'completion' is worked text of 2 steps",
        ),
        "scan_bad_tokenizer": ([*scan, ckpt, "--tokenizer", str(tmp / "nope")], "Tokenizer path not found"),
        "report_missing": (["report", str(tmp / "nope")], "No such file or folder"),
        "report_no_metrics": (["report", str(tmp / "r_none")], "No metrics.jsonl in"),
        "report_malformed": (["report", str(tmp / "r_bad")], "metrics.jsonl:2: invalid JSON"),
        "report_empty": (["report", str(tmp / "r_empty")], "holds no rounds"),
        "report_not_objects": (["report", str(tmp / "r_list")], "metrics.jsonl:1: expected a JSON object"),
        "report_no_step": (["report", str(tmp / "r_nostep")], "has no numeric 'step'"),
        "audit_missing_data": ([*audit, str(tmp / "nope.jsonl")], "Data file not found"),
        "audit_data_folder": ([*audit, str(tmp / "empty")], "Data path is a folder"),
        "audit_malformed": ([*audit, str(tmp / "data_bad.jsonl")], "data_bad.jsonl:1: invalid JSON"),
        "audit_bad_shape": ([*audit, str(tmp / "data_shape.jsonl")], "data_shape.jsonl:1: missing field"),
        "audit_empty": ([*audit, str(tmp / "data_empty.jsonl")], "holds no rows"),
        "audit_missing_model": (
            ["audit-data", str(good_data), "--model", str(tmp / "nope")],
            "Not a model folder (no config.json)",
        ),
    }


def test_scan_keeps_gold_less_rows_with_the_opt_in_flag(run_dir, tmp_path, capsys, caplog):
    root, _ = run_dir
    panel = tmp_path / "goldless.jsonl"
    rows = [
        {"prompt": "Q: 3 + 4\n", "completion": "3 + 4 = 7\nAnswer: 7"},
        {"prompt": "Q: 2 * 5\n"},
        {"prompt": "Q: 8 - 1\n", "completion": "8 - 1 = 7\nthat is 7"},
    ]
    panel.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["scan", str(root / "checkpoint-120"), "--panel", str(panel), "--out", str(tmp_path / "out"), *FAST]
    assert main(args) == 2
    assert "goldless.jsonl:2: no gold answer" in capsys.readouterr().err
    with caplog.at_level(logging.INFO, logger="faithcb.cli._scan"):
        assert main([*args, "--allow_missing_gold", "--probes", "early_answer"]) == 0, capsys.readouterr().err
    assert "Probe panel from " in caplog.text and "gold answers:  1 of 3" in caplog.text  # what was detected
    records = read_jsonl(tmp_path / "out" / "rounds.jsonl")
    assert [r["gold"] for r in records] == ["7", None, None]
    assert json.loads((tmp_path / "out" / "scan.json").read_text())["config"]["allow_missing_gold"] is True


def test_bad_inputs_end_with_one_line_and_exit_2(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing lands in the caller's folder, whatever a case writes
    cases = _bad_inputs(tmp_path, run_dir)
    for name, (argv, message) in cases.items():
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (name, err)
        assert "Traceback" not in err, name
        assert lines[0].startswith(f"faithcb {argv[0]}: error: "), (name, err)
        assert message in lines[0], (name, err)


def test_scan_shows_an_unreadable_checkpoint_as_a_banner(run_dir, tmp_path, capsys, caplog):
    """The silent checkpoint-0 never states a parseable answer: no figures, the reasons instead."""
    root, panel = run_dir
    out = tmp_path / "scan0"
    with caplog.at_level("WARNING", logger="faithcb"):
        rc = main(["scan", str(root / "checkpoint-0"), "--panel", str(panel), "--out", str(out), *FAST])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "CANNOT BE READ" in captured.out and "answer_cues" in captured.out
    assert "Last checkpoint:" not in captured.out and "accuracy=" not in captured.out
    assert any("cannot be read" in r.getMessage() for r in caplog.records)
    (line,) = read_jsonl(out / "metrics.jsonl")
    assert line["valid"] == 0.0 and line["invalid_reasons"]
