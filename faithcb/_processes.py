"""Which process this is: the one place faithcb asks whether it runs as several processes.

A distributed run (torchrun, `accelerate launch`, DeepSpeed) starts one process per rank and
sets up torch.distributed's process group before the trainer calls back; a single process has
none, and counts as rank 0 of 1.
"""

from __future__ import annotations


def world_size() -> int:
    """How many processes run together (1 without an initialized torch.distributed process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def process_index() -> int:
    """This process's rank (0 without an initialized torch.distributed process group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_distributed() -> bool:
    """Whether several processes run together (ranks must then agree before collective steps)."""
    return world_size() > 1


def is_main_process() -> bool:
    """Whether this is rank 0, the process that logs what is said once per run."""
    return process_index() == 0
