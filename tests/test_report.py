"""`faithcb report`: PNG figures and a self-contained HTML page from a run's JSONL."""

from __future__ import annotations

import base64
import json
import re
import struct
from pathlib import Path

import pytest

from faithcb.cli import main
from faithcb.cli._report import MAIN_METRICS, interval, load_run, locate_run_data, write_report

pytest.importorskip("matplotlib")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (checks the signature too)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a shared, busy CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def instrumented_run(tmp_path_factory, tokenizer, one_thread):
    """A real SFTTrainer run with FaithfulnessCallback: rounds at steps 0, 2, 4, 6, two slices."""
    from faithcb import FaithConfig, FaithfulnessCallback
    from faithcb.synthetic import (
        build_tiny_model,
        make_arithmetic_examples,
        make_shifted_slices,
        pretrain_tiny_model,
        to_sft_dataset,
    )

    root = tmp_path_factory.mktemp("instrumented")
    train = make_arithmetic_examples(300, seed=1)
    model = pretrain_tiny_model(build_tiny_model(tokenizer), tokenizer, train, steps=120, batch_size=16, lr=1e-2)
    panel = [
        {"prompt": e["prompt"], "completion": e["completion"], "slice": e["slice"]}
        for e in make_shifted_slices(2, seed=5, slices=["in_dist", "length_shift"])
    ]
    args = trl.SFTConfig(
        output_dir=str(root),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_length=64,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(to_sft_dataset(train[:32])),
        processing_class=tokenizer,
    )
    config = FaithConfig(every_n_steps=2, max_new_tokens=24, answer_max_new_tokens=4)
    trainer.add_callback(FaithfulnessCallback(trainer, panel, config=config))
    trainer.train()
    return root


def test_report_renders_an_instrumented_run(instrumented_run, capsys):
    run = load_run(instrumented_run)
    assert run.folder == instrumented_run / "faithcb" and run.steps == [0, 2, 4, 6]
    assert run.step_label == "training step"

    assert main(["report", str(instrumented_run)]) == 0
    out = instrumented_run / "faithcb" / "report"
    assert f"Report: {out / 'report.html'}" in capsys.readouterr().out
    pngs = sorted(out.glob("*.png"))
    names = {p.name for p in pngs}
    for expected in (
        "metric_accuracy.png",
        "metric_early_answer-aoc.png",
        "metric_post_conclusion-tail_fraction.png",
        "metric_filler-match.png",
        "metric_info_gain-total_bits.png",
        "early_answer_curves.png",
        "slices.png",
    ):
        assert expected in names
    page = (out / "report.html").read_text(encoding="utf-8")
    shown = [int(w) for w in re.findall(r'<img alt="[^"]*" width="(\d+)"', page)]
    for png in pngs:
        width, height = png_size(png)
        # drawn at twice the size they are shown at (sharp on high-density screens), shown at that size
        assert 500 <= width / 2 <= 1500 and 300 <= height / 2 <= 800, (png.name, width, height)
        assert png.stat().st_size > 8_000, png.name  # a real plot, not an empty canvas
    assert sorted(shown) == sorted(png_size(p)[0] // 2 for p in pngs)
    assert page.startswith("<!DOCTYPE html>")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(pngs)
    assert {base64.b64decode(b) for b in embedded} == {p.read_bytes() for p in pngs}
    # self-contained: every src is a data URI, no external URL, stylesheet or script
    assert re.findall(r'src="([a-z]+):', page) == ["data"] * len(pngs)
    for forbidden in ("http://", "https://", "<link", "<script", "url(", "@import"):
        assert forbidden not in page, forbidden
    for key in ("accuracy", "early_answer/aoc", "post_conclusion/tail_fraction", "filler/match", "early_answer/curves"):
        assert key in page
    assert "Last round (step 6)" in page and "slice" in page
    # the summary block the end of training logged (summary.json), before the last round's table
    summary = page.split("<pre class='summary'>")[1].split("</pre>")[0]
    assert summary.startswith("faithcb summary: 4 rounds (steps 0-6, baseline at step 0)")
    assert "rules fired: none" in summary and "training ended at step 6 of 6" in summary
    assert page.index("<h2>Summary</h2>") < page.index("Last round (step 6)")
    # a line under each figure: what it measures and which way reads as faithful
    assert "<code>early_answer/aoc</code>: Early answering" in page and "Higher = more faithful." in page
    # sample chains: the same examples in every round, with what the probes made of them
    run_records = load_run(instrumented_run).records
    first_ids = list(dict.fromkeys(r["id"] for r in run_records if r["step"] == 0))[:3]
    assert page.count("<details") == 4  # one block per round
    for example_id in first_ids:
        assert page.count(f"example <code>{example_id}</code>") == 4
    assert "<b>Early answering</b> (answer after 0..n steps:" in page
    assert "<b>Filler</b> in place of the chain:" in page


def test_report_from_hand_written_metrics(tmp_path):
    """No rounds.jsonl: metric figures only; bands from Wilson bounds or from stderr."""
    data = tmp_path / "run" / "faithcb"
    data.mkdir(parents=True)
    rows = [
        {
            "step": s,
            "round": i,
            "n_examples": 32.0,
            "accuracy": a,
            "accuracy/ci_low": a - 0.1,
            "accuracy/ci_high": a + 0.1,
            "info_gain/total_bits": 3.0 - i,
            "info_gain/total_bits/stderr": 0.5,
            "early_answer/aoc": None,  # non-finite values land as null
        }
        for i, (s, a) in enumerate([(0, 0.2), (50, 0.4), (100, 0.7)])
    ]
    rows[1]["accuracy/delta"], rows[2]["accuracy/delta"] = 0.2, 0.5
    (data / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = load_run(tmp_path / "run")
    low, high = interval(run, "info_gain/total_bits")
    assert low[0] == pytest.approx(3.0 - 1.96 * 0.5, abs=1e-3) and high[2] == pytest.approx(1.0 + 1.96 * 0.5, abs=1e-3)
    low, high = interval(run, "accuracy")
    assert low == pytest.approx([0.1, 0.3, 0.6]) and high == pytest.approx([0.3, 0.5, 0.8])
    assert interval(run, "early_answer/aoc") is None

    result = write_report(data / "metrics.jsonl", tmp_path / "rep", title="hand <made>")
    assert [p.name for p in result.figures] == ["metric_accuracy.png", "metric_info_gain-total_bits.png"]
    for png in result.figures:
        png_size(png)
    page = result.html.read_text()
    assert "<title>hand &lt;made&gt;</title>" in page
    assert "No per-example early-answering data" in page
    assert "+0.500" in page  # drift column of the last round's table
    assert "No per-example records (rounds.jsonl)" in page  # no sample chains to show
    assert page.count("data:image/png;base64,") == 2
    # no summary.json: the summary block is built from metrics.jsonl (no rules recorded there)
    summary = page.split("<pre class='summary'>")[1].split("</pre>")[0]
    assert summary.startswith("faithcb summary: 3 rounds (steps 0-100, baseline at step 0)")
    assert "0.200 -&gt; 0.700  +0.500" in summary and "rules fired" not in summary
    assert f"figures and records: {data}" in summary and f"report: {result.html}" in summary


def test_report_shows_the_summary_the_run_left_when_it_covers_the_rounds(tmp_path, caplog):
    from faithcb.monitor._summary import SUMMARY_FILE, summarize_run

    data = tmp_path / "faithcb"
    data.mkdir()
    rows = [{"step": s, "n_examples": 4.0, "accuracy": 0.5, "score": v} for s, v in ((0, 0.8), (10, 0.2))]
    rows[1]["score/delta"] = -0.6
    (data / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    events = [{"step": 10, "rule": "faith/score < 0.5", "action": "stop"}]
    left = summarize_run(rows, stop_events=events, failed_steps=[5], files={"report": "elsewhere"})
    (data / SUMMARY_FILE).write_text(json.dumps(left.to_dict()))
    page = write_report(tmp_path).html.read_text()
    assert "step 10: stop &#x27;faith/score &lt; 0.5&#x27;" in page and "1 failed and skipped (step 5)" in page
    assert "elsewhere" not in page  # the files are where the report found them
    # a summary of other rounds (a run that did not finish) is not shown; one is built from metrics.jsonl
    rows.append({"step": 20, "n_examples": 4.0, "accuracy": 0.5, "score": 0.1, "score/delta": -0.7})
    (data / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = write_report(tmp_path).html.read_text()
    assert "faithcb summary: 3 rounds" in page and "faith/score &lt; 0.5" not in page
    assert "covers other rounds than metrics.jsonl" in caplog.text


def test_report_says_why_a_figure_has_gaps(tmp_path):
    data = tmp_path / "faithcb"
    data.mkdir()
    rows = [{"step": s, "accuracy": 0.5, "score": v} for s, v in ((0, 0.8), (10, None), (20, 0.7))]
    (data / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = write_report(tmp_path).html.read_text()
    assert "No value at training step 10: score needs a noise floor on at least half of the panel." in page


def test_locate_run_data_finds_the_usual_places(tmp_path):
    for sub in ("faithcb", "faithcb_scan", "custom"):
        folder = tmp_path / sub / sub
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text('{"step": 0}\n')
        assert locate_run_data(tmp_path / sub) == folder
        assert locate_run_data(folder / "metrics.jsonl") == folder
    assert set(MAIN_METRICS) >= {"accuracy", "early_answer/aoc", "post_conclusion/tail_fraction", "filler/match"}


def test_unreadable_last_round_is_a_banner_not_figures(tmp_path):
    """A round whose answers never parsed shows its reasons, not an accuracy of 0.000 as a figure."""
    data = tmp_path / "run" / "faithcb"
    data.mkdir(parents=True)
    readable = {"step": 0, "round": 0, "n_examples": 8.0, "accuracy": 0.5, "parse_fail_rate": 0.0, "valid": 1.0}
    logged = {"step": 10, "round": 1, "n_examples": 8.0, "accuracy": 0.0, "early_answer/aoc": 1.0}
    logged.update({"parse_fail_rate": 1.0, "valid": 0.0, "invalid_reasons": ["stated answers unparseable: fix it"]})
    older = {"step": 20, "round": 2, "n_examples": 8.0, "accuracy": 0.0, "parse_fail_rate": 1.0}  # no valid key
    (data / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (readable, logged, older)))
    page = write_report(data / "metrics.jsonl", tmp_path / "rep").html.read_text()
    assert "cannot be read" in page and "answer_cues" in page  # the last round's reasons, from its figures
    assert "<th>95% interval</th>" not in page  # no table of its figures
    assert "steps 10, 20" in page  # every unreadable round is named
    logged_only = tmp_path / "run2" / "faithcb"
    logged_only.mkdir(parents=True)
    (logged_only / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (readable, logged)))
    page = write_report(logged_only / "metrics.jsonl", tmp_path / "rep2").html.read_text()
    assert "stated answers unparseable: fix it" in page  # the reasons the round logged
