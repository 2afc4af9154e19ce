"""How the engine runs a round: switches of its optimisations, in one frozen dataclass.

Each switch turns one optimisation of the engine on or off. None of them changes what a round
measures (the records are those of plain greedy decoding and separate passes either way); they
exist so that benchmarks can time an optimisation against its absence and tests can check that
both give the same results. The defaults are the fast path, and users never need to change them.

The engine settings that users do choose for their hardware (batch sizes, packing, compilation,
prompt buckets, sharded-weight gathering) stay on `FaithConfig` (`faithcb._config.ENGINE_FIELDS`),
where recipes set them beside their training arguments.

The options reach every engine function that reads one as an argument (`ProbeEngine(...,
options=...)`, `run_probe_round(..., engine_options=...)`); nothing reads them from a module global.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.nn.attention import SDPBackend

#: SDPA kernels of packed passes on CUDA by default (see `EngineOptions.packed_sdpa_backends`).
DEFAULT_PACKED_SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


@dataclass(frozen=True)
class EngineOptions:
    """Switches of the engine's optimisations (for benchmarks and tests; defaults for users).

    Every field has help text, so a benchmark can expose them with `transformers.HfArgumentParser`.
    """

    static_decode: bool = field(
        default=True,
        metadata={
            "help": "Decode greedy chains, regenerations and forced answers in the engine's own static-cache loop "
            "(`static_greedy_decode`) wherever it gives `generate`'s tokens; False: transformers' `generate` for "
            "every decode."
        },
    )
    gqa_on_kv_heads: bool = field(
        default=True,
        metadata={
            "help": "Compiled decode steps of grouped-query models attend on the key/value heads, as transformers' "
            "eager SDPA attention does; False: transformers' compiled branch, which copies every key/value head "
            "once per query head at every layer and step."
        },
    )
    skip_repeated_guards: bool = field(
        default=True,
        metadata={
            "help": "After a batch's first compiled decode step, check only the torch.compile guards that tell "
            "cached graphs apart (the later steps pass the same kind of inputs); False: every guard at every step."
        },
    )
    defer_token_reads: bool = field(
        default=True,
        metadata={
            "help": "On CUDA, the own decode loop checks each read of the tokens one interval later, while the "
            "device runs the next steps; False: the host waits for each read and the device idles meanwhile."
        },
    )
    text_check_every: int = field(
        default=8,
        metadata={
            "help": "Decode steps between two reads of the generated text on CUDA (1: after every step); off CUDA "
            "the text is read after every step."
        },
    )
    defer_stop_checks: bool = field(
        default=True,
        metadata={
            "help": "Let transformers' `generate` read its all-done flag one step late on CUDA, as it does on MPS "
            "(it undoes the extra step); False: it waits for the flag after every step."
        },
    )
    nest_long_variants: bool = field(
        default=True,
        metadata={
            "help": "Long forced variants nested in a longer one (the paraphrased prefixes) share its packed row; "
            "False: every long variant gets a row of its own."
        },
    )
    causal_single_rows: bool = field(
        default=True,
        metadata={
            "help": "A batch of packed rows that are each one sequence (a long variant in a row of its own) runs "
            "with the model's causal attention, right-padded, instead of a dense 4-D mask (full-attention models); "
            "False: every packed batch takes the mask."
        },
    )
    packed_sdpa_backends: list[str] | None = field(
        default_factory=lambda: list(DEFAULT_PACKED_SDPA_BACKENDS),
        metadata={
            "help": "SDPA kernels (`torch.nn.attention.SDPBackend` names) allowed in packed passes on CUDA; None: "
            "PyTorch's own choice. cuDNN is left out by default: it builds an execution plan for every new input "
            "shape, and every tree-decode step has a new number of keys. Kept as a tuple."
        },
    )
    packed_mask_elements: int = field(
        default=1 << 26,
        metadata={
            "help": "Most 4-D attention-mask entries of one batch of packed rows (rows x width^2; 1 << 26 is "
            "128 MiB in bf16): bounds a packed pass's memory."
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.text_check_every, bool) or not isinstance(self.text_check_every, int):
            problems.append(f"text_check_every must be an integer, got {self.text_check_every!r}")
        elif self.text_check_every < 1:
            problems.append(f"text_check_every must be >= 1, got {self.text_check_every!r}")
        if isinstance(self.packed_mask_elements, bool) or not isinstance(self.packed_mask_elements, int):
            problems.append(f"packed_mask_elements must be an integer, got {self.packed_mask_elements!r}")
        elif self.packed_mask_elements < 1:
            problems.append(f"packed_mask_elements must be positive, got {self.packed_mask_elements!r}")
        backends = self.packed_sdpa_backends
        if backends is not None:
            known = [name for name in SDPBackend.__members__ if name != "ERROR"]
            if isinstance(backends, str) or not all(isinstance(name, str) for name in backends):
                problems.append(f"packed_sdpa_backends must be a list of SDPBackend names or None, got {backends!r}")
            elif any(name not in known for name in backends):
                unknown = [name for name in backends if name not in known]
                problems.append(f"packed_sdpa_backends: unknown SDPBackend {unknown}; known: {', '.join(known)}")
            else:  # a tuple: the options stay immutable (and hashable)
                object.__setattr__(self, "packed_sdpa_backends", tuple(backends))
        if problems:
            raise ValueError("; ".join(problems))
