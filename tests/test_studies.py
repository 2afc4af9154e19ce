"""Study recipes (issue 8) in smoke mode, in-process, and the proxy-tuned model."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"faithcb_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def finite_figures(row: dict) -> list[float]:
    """Every figure value of a table row; asserts they are finite."""
    values = [v["value"] for v in row.values() if isinstance(v, dict) and v.get("value") is not None]
    assert all(math.isfinite(v) for v in values)
    return values


def run_smoke(name: str, tmp_path: Path, *extra: str) -> tuple[dict, Path]:
    recipe = load_recipe(name)
    out = tmp_path / name
    args = recipe.parse_args(["--smoke", "--output_dir", str(out), "--threads", "1", *extra])
    assert args.smoke
    data = recipe.run_study(args)
    return data, out


def test_drift_study_smoke(tmp_path):
    _data, out = run_smoke("drift_study", tmp_path)
    saved = json.loads((out / "drift_study.json").read_text())
    assert set(saved["arms"]) == {"small_fixed", "fresh", "tails", "no_tails"}
    assert {r["arm"] for r in saved["table"]} == {"small_fixed", "fresh", "tails"}
    for arm in ("small_fixed", "fresh", "tails"):
        assert (out / arm / "faithcb" / "metrics.jsonl").is_file()
        steps = [r["step"] for r in saved["arms"][arm]["rounds"]]
        assert steps == [0, 2]
    for row in saved["table"]:
        assert row["accuracy"]["value"] is not None
        finite_figures(row)
    assert any((out / "pretrained").iterdir())  # the cached pre-trained model, reused by every arm


def test_drift_study_reuses_cached_model(tmp_path):
    recipe = load_recipe("drift_study")
    out = tmp_path / "drift"
    args = recipe.parse_args(["--smoke", "--output_dir", str(out), "--arms", "fresh"])
    recipe.run_study(args)
    first = sorted(p.name for p in (out / "pretrained").iterdir())
    data = recipe.run_study(args)
    assert sorted(p.name for p in (out / "pretrained").iterdir()) == first
    assert data["pretrain_seconds"] < 5  # loaded, not trained again


def test_trim_study_smoke(tmp_path):
    _data, out = run_smoke("trim_study", tmp_path)
    saved = json.loads((out / "trim_study.json").read_text())
    assert [r["arm"] for r in saved["table"]] == ["pretrained", "original", "trimmed", "random_trim"]
    for name in ("trimmed.jsonl", "random_trim.jsonl", "summary.json"):
        assert (out / "audit" / name).is_file()
    assert saved["audit"]["summary"]["rows"] == 8
    for row in saved["table"]:
        finite_figures(row)
    traces = (out / "traces.jsonl").read_text().splitlines()
    assert "so the result is" in json.loads(traces[0])["completion"]


def test_trim_study_smoke_with_sft_judge(tmp_path):
    _data, out = run_smoke("trim_study", tmp_path, "--judge", "sft")
    saved = json.loads((out / "trim_study.json").read_text())
    assert saved["audit"]["judge"].endswith("original/model")
    assert (out / "original" / "model" / "config.json").is_file()
    assert [r["arm"] for r in saved["table"]] == ["pretrained", "original", "trimmed", "random_trim"]


def test_shift_study_smoke(tmp_path):
    from faithcb.synthetic import SHIFT_SLICES

    _data, out = run_smoke("shift_study", tmp_path)
    saved = json.loads((out / "shift_study.json").read_text())
    assert [r["step"] for r in saved["rounds"]] == [0, 2]
    for rnd in saved["rounds"]:
        assert list(rnd["slices"]) == list(SHIFT_SLICES)
        for figures in rnd["slices"].values():
            assert figures["n"] == 2
            assert math.isfinite(figures["accuracy"]["value"])
    metrics = [json.loads(line) for line in (out / "faithcb" / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("slice/length_shift/") or "/slice/length_shift/" in k for k in metrics[0])


def test_proxy_tuning_smoke(tmp_path):
    _data, out = run_smoke("proxy_tuning", tmp_path)
    saved = json.loads((out / "proxy_tuning.json").read_text())
    assert [r["model"] for r in saved["table"]] == ["base", "direct_sft", "untuned_small", "tuned_small", "proxy"]
    assert saved["parameters"]["base"] > saved["parameters"]["small"]
    for row in saved["table"]:
        assert row["accuracy"]["value"] is not None
        finite_figures(row)


# ---------------------------------------------------------------------- ProxyTunedModel
@pytest.fixture(scope="module")
def trio():
    from faithcb.synthetic import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    base = build_tiny_model(tok, hidden_size=32, num_heads=2, intermediate_size=64, seed=1)
    tuned = build_tiny_model(tok, hidden_size=16, num_heads=2, intermediate_size=32, seed=2)
    untuned = build_tiny_model(tok, hidden_size=16, num_heads=2, intermediate_size=32, seed=3)
    return tok, base, tuned, untuned


def test_proxy_logits_are_base_plus_offset(trio):
    from faithcb.contrib.proxy import ProxyTunedModel

    tok, base, tuned, untuned = trio
    before = base.model.embed_tokens.weight.clone()
    proxy = ProxyTunedModel(base, tuned, untuned, alpha=0.5)
    assert torch.equal(base.model.embed_tokens.weight, before)  # wrapping leaves the weights alone
    ids = torch.randint(4, len(tok), (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = proxy(input_ids=ids).logits
        want = base(input_ids=ids).logits + 0.5 * (tuned(input_ids=ids).logits - untuned(input_ids=ids).logits)
        last = proxy(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, want[:, -1:], atol=1e-5, rtol=1e-5)


def test_proxy_generate_with_left_padding(trio):
    from faithcb.contrib.proxy import ProxyTunedModel

    tok, base, tuned, untuned = trio
    prompts = ["Q: 3 + 4 * 5\n", "Q: 12 + 3 - 4 * 2\n"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    assert enc["attention_mask"][0, 0] == 0  # the short prompt is left-padded
    proxy = ProxyTunedModel(base, tuned, untuned)
    batched = proxy.generate(**enc, max_new_tokens=6, do_sample=False)
    single_enc = tok(prompts[:1], return_tensors="pt")
    single = proxy.generate(**single_enc, max_new_tokens=6, do_sample=False)
    new_single = single[0, single_enc["input_ids"].shape[1] :].tolist()
    new_batched = batched[0, enc["input_ids"].shape[1] :].tolist()
    assert new_batched[: len(new_single)] == new_single  # padding does not change the greedy tokens
    # with tuned == untuned the proxy is the base model: same greedy tokens as base.generate
    same = ProxyTunedModel(base, tuned, tuned).generate(**enc, max_new_tokens=6, do_sample=False)
    assert torch.equal(same, base.generate(**enc, max_new_tokens=6, do_sample=False))


def test_proxy_rejects_other_vocabularies_and_packed_masks(trio):
    from faithcb.contrib.proxy import ProxyTunedModel
    from faithcb.engine._packed import packing_supported
    from faithcb.synthetic import build_tiny_model, build_tokenizer

    tok, base, tuned, untuned = trio
    other = build_tiny_model(build_tokenizer(chat_template=True), hidden_size=16, num_heads=2, intermediate_size=32)
    with pytest.raises(ValueError, match="vocabulary"):
        ProxyTunedModel(base, other, untuned)
    proxy = ProxyTunedModel(base, tuned, untuned)
    assert not packing_supported(proxy, tok.pad_token_id)  # the engine falls back to separate passes


def test_proxy_in_probe_round(trio, arithmetic):
    from faithcb import FaithConfig, load_panel, run_probe_round
    from faithcb.contrib.proxy import ProxyTunedModel

    tok, base, tuned, untuned = trio
    proxy = ProxyTunedModel(base, tuned, untuned)
    panel = load_panel([{"prompt": e["prompt"], "completion": e["completion"]} for e in arithmetic[:3]])
    result = run_probe_round(proxy, tok, panel, FaithConfig(max_new_tokens=16, answer_max_new_tokens=4))
    assert result.metrics["n_examples"] == 3
    assert len(result.records) == 3
    assert not proxy.training
