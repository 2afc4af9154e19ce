"""Where a round's figures go.

- `_publisher`: `RoundPublisher`, a training run's rounds to the JSONL files, the trainer's log
  stream, W&B and the console;
- `_sinks`: the JSONL files, the W&B sections and media, the console line.
"""
