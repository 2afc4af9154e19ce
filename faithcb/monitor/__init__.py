"""What a run makes of its rounds, with no trainer in sight.

- `_monitor`: `Monitor` (baseline, history, drift, validity verdicts, state that checkpoints
  carry), fed by the callback and by `faithcb scan`;
- `_stop_rules`: `StopRule` and the counters that decide when a rule fires.
"""
