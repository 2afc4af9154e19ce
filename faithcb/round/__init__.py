"""A probe round: the panel through the engine and every probe, then its figures.

- `_probe_round`: one round (`run_probe_round`, `RoundResult`, `build_probes`);
- `_sharded`: the callback's round split over ranks, its records gathered and aggregated once,
  and a round ended by its time budget (`partial_round`);
- `_aggregate`: per-example records to panel figures (intervals, splits, noise floor, `score`);
- `_validity`: whether a round's figures can be read at all.
"""
