"""Tokens a probe round generates and prefills, per probe, against the chain's length in tokens and steps.

A round's token counts (`cost/generated_tokens`, `cost/prefilled_tokens`) depend on the chains'
lengths, the prompts, the forced answers' lengths and the probes, not on how good the model is.
So this script measures them on a *scripted* model whose chains have a length set in advance: a
GPT-2 of one layer, hand-set, no training (`scripted_model`). Its attention and MLP write
nothing, so the next token is a function of the current token and its position id only: at
position p it writes token p + 1 of a fixed script (the prompt's length of padding, then the
response), except after the answer cue's last token (`:`), where it writes the answer (`9`),
and after the answer, where it writes EOS. Every chain is therefore the script's response,
whatever the question; every forced answer, after any context that ends with the cue, is `9`
(a model whose answer ignores its chain: the drafts of packed scoring are always right, so no
forced answer needs a decode step); a regeneration after a corrupted step writes the rest of
the script. Its logits do not depend on the attention mask, so the engine's packing check
passes and packed scoring runs as on a real model. A one-token-per-character tokenizer
(`faithcb.synthetic.build_tokenizer()`) makes the script's length in tokens its length in
characters.

For each chain shape (`SHAPES`: a short chain of sentences; a ~1,000-token think block of
paragraphs; the same length in more paragraphs than `max_positions`, so that the cap applies),
it runs a round with only the always-on probes (core and control), then one round per added
probe (`FaithConfig(probes=[name])`; `hint` and `consistency` on the short chains only), then
one with the default probes, with packed scoring and without (`packed_scoring=False`), and
reports per example the tokens generated and prefilled, and each probe's difference to the
always-on round. Greedy chains are the same in every round (checked: each round's responses
must equal the always-on round's), so after the first round the chains of the same prompts
are taken from it, with the tokens their generation paid added to the round's counts
(`reused_chains`; `--regenerate_chains` turns that off). Beside each measured difference it prints
what the formulas of docs/scale.md predict from the example's prompt, chain, steps, cap and
answer lengths (`predicted`). Token counts are deterministic: the machine's load does not move
them, so no seconds are reported.

    OMP_NUM_THREADS=1 python benchmarks/round_tokens.py --out round_tokens.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from faithcb import FaithConfig, load_panel, run_probe_round
from faithcb.data._parsing import THINK_CLOSE
from faithcb.synthetic import build_tokenizer

#: Probes added one at a time to the always-on round (core and control).
PROBES = ("early_answer", "info_gain", "filler", "paraphrase", "mistake", "step_necessity", "hint", "consistency")
#: The answer every forced context gets (a digit the scripts never write elsewhere).
ANSWER = "9"
CUE = "Answer:"


@dataclass(frozen=True)
class Shape:
    """A chain shape: `steps` steps of about `step_chars` tokens each.

    Attributes:
        name: Row label.
        steps: Steps of the chain.
        step_chars: Target tokens (= characters) per step.
        think: Paragraphs in a `<think>` block (long traces) instead of one sentence per line.
        max_new_tokens: The round's chain budget.
        probes: The probes added one at a time.
    """

    name: str
    steps: int
    step_chars: int
    think: bool
    max_new_tokens: int
    probes: tuple[str, ...] = PROBES[:6]


SHAPES = (
    Shape("short: 12 sentences", steps=12, step_chars=10, think=False, max_new_tokens=256, probes=PROBES),
    Shape("1k think: 20 paragraphs", steps=20, step_chars=50, think=True, max_new_tokens=2048),
    Shape("1k think: 48 paragraphs (> cap)", steps=48, step_chars=20, think=True, max_new_tokens=2048),
)


def step_text(rng: random.Random, chars: int, *, sentence: bool) -> str:
    """One step of arithmetic prose of about `chars` characters, with words the rule paraphraser
    rewrites (`+`, `=`, `so`, `then`, `we get`) and numbers without the digit 9 (the answer's)."""
    a, b = rng.randint(1, 4), rng.randint(1, 4)
    c = a + b
    d = rng.randint(1, c - 1)
    if sentence or chars < 40:
        text = f"{a} + {b} = {c}" if sentence else f"So {a} + {b} = {c}"
    else:
        text = f"So we get {a} + {b} = {c}, then {c} - {d} = {c - d}"
    words = iter(["and", "we", "check", "it", "once", "more"] * (chars // 4 + 1))
    while len(text) + 1 < chars:
        text += " " + next(words)
    return text + "."


def response_text(shape: Shape, seed: int = 0) -> str:
    """The scripted response: the chain, then the cue and the answer."""
    rng = random.Random(seed)
    steps: list[str] = []
    while len(steps) < shape.steps:  # two equal neighbours would give one step removal instead of two
        step = step_text(rng, shape.step_chars, sentence=not shape.think)
        if not steps or step != steps[-1]:
            steps.append(step)
    if shape.think:
        return "<think>\n" + "\n\n".join(steps) + "\n</think>\n" + CUE + ANSWER
    return "\n".join(steps) + "\n" + CUE + ANSWER


def scripted_model(tokenizer: Any, prompt_tokens: int, response: str, *, positions: int) -> Any:
    """A one-layer GPT-2 that writes `response` after any prompt of `prompt_tokens` tokens.

    The block's attention and MLP outputs are zero, so the final hidden state is the token's
    embedding plus its position's. Position p votes for token p + 1 of the script (EOS past
    its end), the cue's last token votes (four times as strongly) for the answer, and the
    answer's token for EOS; the output layer reads the vote.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = len(tokenizer)
    width = 1 << max(6, (vocab - 1).bit_length())  # a one-hot direction per token
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=width,
        n_layer=1,
        n_head=2,
        n_positions=positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(config)
    script = [tokenizer.pad_token_id] * prompt_tokens + tokenizer(response, add_special_tokens=False)["input_ids"]
    (cue_last,) = tokenizer(CUE[-1], add_special_tokens=False)["input_ids"]
    (answer,) = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0)
        for p in range(positions):
            model.transformer.wpe.weight[p, script[p + 1] if p + 1 < len(script) else eos] = 1.0
        model.transformer.wte.weight[cue_last, answer] = 4.0
        model.transformer.wte.weight[answer, eos] = 4.0
        model.lm_head.weight[:, :vocab] = torch.eye(vocab)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(config, key))
    return model.eval()


def panel_rows(n: int, response: str) -> list[dict[str, str]]:
    """`n` prompts of the same length in tokens (single-digit operands), the scripted response
    as their completion (gold 9)."""
    rng = random.Random(1)
    return [
        {"prompt": "Add up " + " ".join(str(rng.randint(1, 8)) for _ in range(4)) + ".\n", "completion": response}
        for _ in range(n)
    ]


@dataclass
class ChainStats:
    """Per-example lengths in tokens: the quantities of the formulas (means over the panel)."""

    prompt: float  # P: the prompt as the engine encodes it
    lead: float  # L: the model's text before its chain (an opening <think>)
    chain: float  # T: the chain
    steps: float  # n
    tail: float  # J: the text between chain and cue, and the cue
    cue: float  # the cue alone (a regeneration writes it)
    answer: float  # A: the answer after the cue
    response: float  # R: everything the model wrote (chain generation)
    separator: float  # s: tokens between two steps
    overlap: float  # o: tokens a cut's tail shares with the chain after the cut (the newline)


def _tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def step_starts(chain: str, steps: list[str]) -> list[int]:
    """Where each step starts in its chain (steps are exact substrings, in order)."""
    starts, at = [], 0
    for step in steps:
        at = chain.index(step, at)
        starts.append(at)
        at += len(step)
    return starts


def chain_stats(tokenizer: Any, records: list[dict[str, Any]]) -> ChainStats:
    """The formulas' quantities, read from a round's records."""
    rows = []
    for r in records:
        response, chain, steps = r["response"], r["chain"], r["steps"]
        start = response.find(chain)
        cue_end = response.find(r["cue"], start + len(chain)) + len(r["cue"])
        tail = response[start + len(chain) : cue_end]
        starts = step_starts(chain, steps)
        after_cut = tokenizer(chain[starts[0] + len(steps[0]) :], add_special_tokens=False)["input_ids"]
        tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        rows.append(
            (
                _tokens(tokenizer, r["prompt"]),
                _tokens(tokenizer, response[:start]),
                r["chain/tokens"],
                r["chain/steps"],
                len(tail_ids),
                _tokens(tokenizer, r["cue"]),
                _tokens(tokenizer, response[cue_end:]),
                r["response_tokens"],
                _tokens(tokenizer, chain[starts[0] + len(steps[0]) : starts[1]]),
                next((i for i, (a, b) in enumerate(zip(after_cut, tail_ids)) if a != b), 0),
            )
        )
    return ChainStats(*(sum(col) / len(rows) for col in zip(*rows)))


def predicted(probe: str, s: ChainStats, cap: int, packed: bool, facts: dict[str, float]) -> tuple[float, float]:
    """(generated, prefilled) tokens per example that `probe` adds to the always-on round, by the
    formulas of docs/scale.md (steps of equal length). `facts` holds what a formula takes from the
    round itself (`round_facts`): the mistake probe's corrupted step and regeneration, the
    paraphrases' length against the chain's, the step removals, the hinted prompts and chains."""
    P, L, T, n, J, A, sep, o = s.prompt, s.lead, s.chain, s.steps, s.tail, s.answer, s.separator, s.overlap
    D = A + 1  # the draft: the stated answer, then EOS
    g = A  # tokens one forced answer generates
    C = P + L + T + J  # the full forced context
    cuts = min(n, cap) + 1  # early answering / information gain: cuts 0..n, at most cap + 1 of them
    r_para = min(n - 1, cap)  # paraphrase positions
    inner = (cuts - 2) * (T - sep) / 2  # the prefix tokens of the cuts strictly inside the chain
    branch = J - o + D  # a forced answer after a cut, packed: the tail after the shared prefix, the draft
    if probe == "always_on":  # chain (prompt P, writes R); a_full, the no-CoT answer, the control (separators doubled)
        control = C + (n - 1) * sep
        if packed:  # a_full (phase 1) and the control in rows of their own, the no-CoT answer off the chain's row
            return s.response + 3 * g, P + (C + D) + (P + L + T + J - 1 + D) + (control + D)
        return s.response + 3 * g, P + C + (P + L + J - 1) + control
    if probe == "early_answer":  # cuts 1..n-1 (0 and n are the always-on round's)
        if packed:
            return (cuts - 2) * g, (cuts - 2) * branch
        return (cuts - 2) * g, (cuts - 2) * (P + L + J) + inner
    if probe == "info_gain":  # the answer's log-prob after every cut: teacher-forced, nothing decoded
        if packed:
            return 0.0, (cuts - 2) * (J - o + A) + (J - 1 + A) + (J + A)
        return 0.0, cuts * (P + L + J + A) - 1 + inner + T
    if probe == "filler":  # one long variant: filler as long as the chain
        return g, C + (D if packed else 0)
    if probe == "paraphrase":  # per position, the paraphrased prefix and the plain one
        rho = facts["paraphrase_ratio"]
        if packed:  # plain prefixes branch off the chain's row; nested paraphrased ones share one row
            longest = P + L + rho * (T - T / n) + J + D
            return 2 * r_para * g, longest + (2 * r_para - 1) * branch
        return 2 * r_para * g, 2 * r_para * (P + L + J) + (1 + rho) * r_para * (T - sep) / 2
    if probe == "mistake":  # regenerate after the corrupted step j, then one long variant
        given, written, regenerated = facts["mistake_given"], facts["mistake_written"], facts["mistake_chain"]
        return written + g, (P + L + given) + (P + L + regenerated + J + (D if packed else 0))
    if probe == "step_necessity":  # one long variant per removed step; packed, late ones branch off the chain's row
        removals = facts["removals"]
        context = C - T / n  # a removal's context (the step and one separator fewer)
        if not packed:
            return removals * g, removals * context
        late, late_tails = facts["late_removals"], facts["late_tail"]
        return removals * g, (removals - late) * (context + D) + late_tails + late * D
    if probe == "hint":  # a chain per hinted prompt
        return facts["hint_generated"], facts["hint_prompts"]
    return 0.0, 0.0  # consistency reads the chain's text only


def round_facts(tokenizer: Any, records: list[dict[str, Any]], stats: ChainStats) -> dict[str, float]:
    """What the formulas take from the round itself (means per example): the mistake probe's
    given text (up to and with the corrupted step) and what the regeneration wrote; the rule
    paraphrases' length over the chain's; the step removals, how many of them depart from the
    chain in the last fifth of their context (packed, those are branches of the chain's own row)
    and their tails (the tokens after the departure); the hinted prompts and what they made the
    model write."""
    from faithcb.perturb import as_paraphraser
    from faithcb.probes.hint import HINT_TEMPLATES, apply_template

    facts = dict.fromkeys(
        ("mistake_given", "mistake_written", "mistake_chain", "paraphrase_ratio", "removals", "late_removals"), 0.0
    )
    facts |= {"late_tail": 0.0, "hint_generated": 0.0, "hint_prompts": 0.0}
    paraphrase = as_paraphraser("rule")  # the probe's default paraphraser
    for r in records:
        chain, steps = r["chain"], r["steps"]
        starts = step_starts(chain, steps)
        if r.get("mistake/continuation") is not None:
            j, continuation = r["mistake/step"], r["mistake/continuation"]
            after = chain[starts[j] + len(steps[j]) : starts[j + 1]] if j + 1 < len(steps) else "\n"
            given = chain[: starts[j]] + r["mistake/corrupted_step"] + after
            end = r["response"].find(chain) + len(chain)
            tail = r["response"][end : r["response"].find(r["cue"], end) + len(r["cue"])]
            facts["mistake_given"] += _tokens(tokenizer, given)
            # the regeneration writes the rest of the chain, then stops at the think block's end or the cue
            stop = tail.lstrip()
            stop = stop[: stop.find(THINK_CLOSE) + len(THINK_CLOSE)] if THINK_CLOSE in stop else stop
            facts["mistake_written"] += _tokens(tokenizer, continuation + stop)
            facts["mistake_chain"] += _tokens(tokenizer, (given + continuation).rstrip())
        gaps = [chain[: starts[0]]] + [chain[starts[i] + len(steps[i]) : starts[i + 1]] for i in range(len(steps) - 1)]
        reworded = "".join(gap + text for gap, text in zip(gaps, paraphrase(steps)))
        facts["paraphrase_ratio"] += _tokens(tokenizer, reworded) / max(1, r["chain/tokens"])
        removed = r.get("step_necessity/steps", range(len(steps)))
        context = stats.prompt + stats.lead + stats.chain + stats.tail - stats.chain / stats.steps
        limit = max(32, context // 5)  # a branch's own tokens may be at most a quarter of what it shares
        ids = tokenizer(chain, add_special_tokens=False)["input_ids"]
        tails = []  # per removal: its context's tokens after it departs from the chain
        for i in removed:
            end = starts[i + 1] if i + 1 < len(steps) else len(chain)
            without = tokenizer(chain[: starts[i]] + chain[end:], add_special_tokens=False)["input_ids"]
            shared = next((k for k, (a, b) in enumerate(zip(ids, without)) if a != b), min(len(ids), len(without)))
            tails.append(len(without) - shared + stats.tail)
        late = [t for t in tails if t <= limit]  # these are branches of the chain's own packed row
        facts["removals"] += len(tails)
        facts["late_removals"] += len(late)
        facts["late_tail"] += sum(late)
        target = r.get("hint/target")
        if target is not None:
            prompts = [apply_template(HINT_TEMPLATES[k], r["prompt"], target) for k in r["hint/kinds"]]
            facts["hint_prompts"] += sum(_tokens(tokenizer, p) for p in prompts)
            facts["hint_generated"] += sum(_tokens(tokenizer, x) for x in r["hint/responses"])
    return {k: v / len(records) for k, v in facts.items()}


@contextlib.contextmanager
def reused_chains(enabled: bool = True) -> Iterator[None]:
    """Inside: `ProbeEngine.generate_chains` decodes each distinct list of prompts once; a later
    call with the same prompts gets copies of those chains, and the engine counts the tokens
    their generation paid, as if it had decoded them again."""
    if not enabled:
        yield
        return
    from faithcb.engine import ProbeEngine

    real = ProbeEngine.generate_chains
    memo: dict[tuple, tuple[list[Any], dict[str, int]]] = {}

    def generate_chains(self: Any, examples: Any, prompts: Any, extra: Any = ()) -> list[Any]:
        key = (tuple(prompts), tuple(extra))
        if key not in memo:
            before = dict(self.tokens)
            chains = real(self, examples, prompts, extra)
            memo[key] = (chains, {k: self.tokens[k] - before[k] for k in before})
            return chains
        chains, paid = memo[key]
        for kind, count in paid.items():
            self.tokens[kind] += count
        return [copy.copy(c) for c in chains]

    ProbeEngine.generate_chains = generate_chains
    try:
        yield
    finally:
        ProbeEngine.generate_chains = real


def run(model: Any, tokenizer: Any, panel: Any, shape: Shape, probes: list[str], packed: bool) -> Any:
    config = FaithConfig(
        probes=probes, max_new_tokens=shape.max_new_tokens, packed_scoring=packed, use_chat_template=False
    )
    return run_probe_round(model, tokenizer, panel, config)


def per_example(result: Any) -> tuple[float, float]:
    m = result.metrics
    return m["cost/generated_tokens_per_example"], m["cost/prefilled_tokens_per_example"]


def measure_shape(shape: Shape, examples: int, tokenizer: Any, *, reuse: bool = True) -> dict[str, Any]:
    """Every round of one chain shape: per-example tokens, differences and predictions."""
    with reused_chains(reuse):
        return _measure_shape(shape, examples, tokenizer)


def _measure_shape(shape: Shape, examples: int, tokenizer: Any) -> dict[str, Any]:
    response = response_text(shape)
    rows = panel_rows(examples, response)
    prompt_tokens = len(tokenizer(rows[0]["prompt"])["input_ids"])
    positions = prompt_tokens + shape.max_new_tokens + 1024
    model = scripted_model(tokenizer, prompt_tokens, response, positions=positions)
    panel = load_panel(rows)
    cap = FaithConfig().max_positions
    out: dict[str, Any] = {"shape": shape.name, "examples": examples, "max_positions": cap}
    for packed in (True, False):
        base_round = run(model, tokenizer, panel, shape, [], packed)
        if any(r.get("chain/truncated") for r in base_round.records):
            raise RuntimeError(f"{shape.name}: a chain hit the budget; raise max_new_tokens")
        stats = chain_stats(tokenizer, base_round.records)
        gen0, pre0 = per_example(base_round)
        table = {"always_on": {"generated": gen0, "prefilled": pre0}}
        table["always_on"]["predicted"] = predicted("always_on", stats, cap, packed, {})
        for name in [*shape.probes, "default"]:
            probes = list(FaithConfig().probes) if name == "default" else [name]
            result = run(model, tokenizer, panel, shape, probes, packed)
            if [r["response"] for r in result.records] != [r["response"] for r in base_round.records]:
                raise RuntimeError(f"{shape.name}: the chains of the {name} round differ from the always-on round's")
            gen, pre = per_example(result)
            row: dict[str, Any] = {"generated": gen - gen0, "prefilled": pre - pre0}
            if name != "default":
                row["predicted"] = predicted(name, stats, cap, packed, round_facts(tokenizer, result.records, stats))
            table[name] = row
            progress(shape=shape.name, packed=packed, probe=name, **row)
        out["packed" if packed else "plain"] = table
        out["chain_stats"] = dataclasses.asdict(stats)
    return out


def progress(**values: Any) -> None:
    """One JSON line on stderr per finished round."""
    print(json.dumps(values, default=str), file=sys.stderr, flush=True)


def markdown(report: list[dict[str, Any]]) -> str:
    """The per-probe table: measured differences per example, packed and plain, with predictions."""
    lines = []
    for shape in report:
        s = shape["chain_stats"]
        lines.append(
            f"\n{shape['shape']}: P = {s['prompt']:.0f}, lead = {s['lead']:.0f}, T = {s['chain']:.0f}, "
            f"n = {s['steps']:.0f}, J = {s['tail']:.0f}, A = {s['answer']:.0f}, R = {s['response']:.0f} "
            f"({shape['examples']} examples, max_positions {shape['max_positions']})\n"
        )
        lines.append("| probe | generated (packed) | prefilled (packed) | predicted | prefilled (plain) | predicted |")
        lines.append("|---|---|---|---|---|---|")
        for name, row in shape["packed"].items():
            plain = shape["plain"][name]
            pred = row.get("predicted", (None, None))
            pred_plain = plain.get("predicted", (None, None))
            lines.append(
                f"| {name} | {row['generated']:,.0f} | {row['prefilled']:,.0f} | {_fmt(pred)} | "
                f"{plain['prefilled']:,.0f} | {_fmt(pred_plain)} |"
            )
    return "\n".join(lines)


def _fmt(pair: tuple[float | None, float | None]) -> str:
    return "" if pair[0] is None else f"{pair[0]:,.0f} / {pair[1]:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2, help="panel size of every round")
    parser.add_argument("--shapes", default="", help="comma-separated indices into SHAPES (default: all)")
    parser.add_argument("--out", default="", help="also write the report as JSON here")
    parser.add_argument("--regenerate_chains", action="store_true", help="decode the chains in every round")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    tokenizer = build_tokenizer()  # one token per character
    chosen = [SHAPES[int(i)] for i in args.shapes.split(",") if i] or list(SHAPES)
    start = time.perf_counter()
    report = [measure_shape(s, args.examples, tokenizer, reuse=not args.regenerate_chains) for s in chosen]
    progress(stage="done", minutes=round((time.perf_counter() - start) / 60, 1))
    print(markdown(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
