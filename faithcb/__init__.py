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
- `faithcb.functional`: pure metric math.
- `faithcb.data`: the panel, answer and step parsing, the prompt shape.
- `faithcb.round`: one probe round, its run sharded over ranks, panel statistics, validity.
- `faithcb.monitor`: what a run makes of its rounds (baseline, drift, stop rules).
- `faithcb.publish`: JSONL files, the W&B sections and the console line; the trainer's `log`
  carries the metrics to every other integration.
- `faithcb.cli`: the `faithcb` command and its Python entry points (`scan_checkpoints`,
  `write_report`, `audit_traces`, `check_model`, `check_panel`).
- `faithcb.contrib`: proxy-tuned decoding, `load_smollm2`.
- `faithcb.synthetic`: offline CoT tasks, a locally trained tokenizer and tiny models.
"""

from ._config import FaithConfig
from ._errors import FaithcbError
from ._errors import RoundBudgetExceeded as RoundBudgetExceeded  # raised by run_probe_round; a FaithcbError
from ._moved import install_old_paths
from .callback import FaithfulnessCallback
from .cli._check_panel import check_panel
from .contrib._models import load_smollm2
from .data._panel import PanelError as PanelError  # raised by load_panel; a FaithcbError
from .data._panel import ProbeExample, ProbePanel, load_panel
from .data._standard_panels import list_standard_panels
from .monitor._stop_rules import StopRule
from .probes import Figure, Probe, get_probe, list_probes, register_probe
from .round._probe_round import RoundResult, run_probe_round

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

install_old_paths()
