"""faithcb: a live chain-of-thought faithfulness monitor for `transformers` / TRL training.

What a user needs is importable from here (`__all__`): the callback, its configuration and stop
rules, the probe panel (and the standard panels it loads by name), a single probe round, the
pre-flight `check_panel`, probe registration and the base exception.
Everything else is importable from its module; where things live (see the README's layout
table):

- `faithcb.callback`: `FaithfulnessCallback`, the `TrainerCallback` users attach.
- `faithcb.probes`: one module per probe (variants, per-example scoring and the facts of its
  figures, `Figure`), and everything a probe author needs (`Chain`, `ForcedAnswer`, ...).
- `faithcb.engine`: the only code that calls the model (batched generation and scoring).
- `faithcb.functional`: pure metric math; `faithcb._aggregate`: panel statistics.
- `faithcb._sinks`: JSONL files, the W&B sections and the console line; the trainer's `log`
  carries the metrics to every other integration.
- `faithcb.cli`: the `faithcb` command and its Python entry points (`scan_checkpoints`,
  `write_report`, `audit_traces`, `check_model`, `check_panel`).
- `faithcb.synthetic`: offline CoT tasks, a locally trained tokenizer and tiny models.
"""

from ._check_panel import check_panel
from ._config import FaithConfig
from ._errors import FaithcbError
from ._errors import RoundBudgetExceeded as RoundBudgetExceeded  # raised by run_probe_round; a FaithcbError
from ._models import load_smollm2
from ._panel import PanelError as PanelError  # raised by load_panel; a FaithcbError
from ._panel import ProbeExample, ProbePanel, load_panel
from ._round import RoundResult, run_probe_round
from ._standard_panels import list_standard_panels
from ._stopping import StopRule
from .callback import FaithfulnessCallback
from .probes import Figure, Probe, get_probe, list_probes, register_probe

__version__ = "0.1.0"

__all__ = [
    "FaithConfig",
    "FaithcbError",
    "FaithfulnessCallback",
    "Figure",
    "Probe",
    "ProbeExample",
    "ProbePanel",
    "RoundResult",
    "StopRule",
    "__version__",
    "check_panel",
    "get_probe",
    "list_probes",
    "list_standard_panels",
    "load_panel",
    "load_smollm2",
    "register_probe",
    "run_probe_round",
]
