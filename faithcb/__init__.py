"""faithcb: a live chain-of-thought faithfulness monitor for `transformers` / TRL training.

Where things live:
- `faithcb.callback`: `FaithfulnessCallback`, the `TrainerCallback` users attach.
- `faithcb.probes`: one module per probe (variants + per-example scoring).
- `faithcb.engine`: the only code that calls the model (batched generation and scoring).
- `faithcb.functional`: pure metric math; `faithcb._aggregate`: panel statistics.
- `faithcb._sinks`: JSONL files and W&B media; the trainer's `log` carries the metrics.
- `faithcb.synthetic`: offline CoT tasks, a locally trained tokenizer and tiny models.
"""

from ._config import FaithConfig
from ._panel import PanelError, ProbeExample, ProbePanel, load_panel
from ._round import RoundResult, build_probes, run_probe_round
from .callback import FaithfulnessCallback
from .probes import Probe, get_probe, list_probes, register_probe

__version__ = "0.1.0"

__all__ = [
    "FaithConfig",
    "FaithfulnessCallback",
    "PanelError",
    "Probe",
    "ProbeExample",
    "ProbePanel",
    "RoundResult",
    "__version__",
    "build_probes",
    "get_probe",
    "list_probes",
    "load_panel",
    "register_probe",
    "run_probe_round",
]
