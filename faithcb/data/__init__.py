"""The panel and what is read from it, with no model in sight.

- `_panel`: loading and checking a panel (`load_panel`, `ProbeExample`, `ProbePanel`);
  `_standard_panels`: the held-out splits loaded by name; `_jsonl`: reading JSONL files with
  errors that name the file and line;
- `_parsing`: a response split into steps, its stated answer and chain end; `_answers`:
  answer types, normalisation and gold matching;
- `_positions`: which cuts and steps of a long chain a capped probe reads;
- `_prompt_shape`: how the panel's prompts are written (instruction, worked shots), chosen once
  at the baseline.

Perturbation sources (`faithcb.perturb`) and the offline synthetic tasks (`faithcb.synthetic`)
are packages of their own.
"""
