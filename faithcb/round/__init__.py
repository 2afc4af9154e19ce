"""A probe round: the panel through the engine and every probe, then its figures.

- `_probe_round`: one round (`run_probe_round`, `RoundResult`, `build_probes`) and the one way
  a round is finished from its records, a partial one (ended by its time budget) included
  (`finish_round`: figures, cost, validity, the self-check warning);
- `_sharded`: the callback's round split over ranks, its records gathered and finished once;
- `_aggregate`: per-example records to panel figures (intervals, splits, noise floor, `score`);
- `_validity`: whether a round's figures can be read at all.
"""
