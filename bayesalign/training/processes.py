"""What the processes of one launch share: every process' values of a per-sample tensor, rank 0's
choices, and each rank's seed.

The policy engines call these where a quantity is a function of the whole step's draws (log Ẑ,
ESS, the RLOO baseline, the logged metrics, the divergence signals): computed from every
process' draws, they are the same on every process and the same as one process drawing them all
(DESIGN.md "Scale"). On a single process each is the identity; torch.distributed is used
directly, so no accelerate state is created by calling them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

RANK_SEED_STRIDE = 1_000_003  # rank r trains under seed + r × this: its own samples


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank`` in a run seeded ``seed`` (each rank draws its own samples)."""
    return seed + RANK_SEED_STRIDE * rank


def _several() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device(tensor: torch.Tensor) -> torch.device:
    """NCCL moves only GPU tensors; gloo takes them where they are."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every process' ``tensor`` concatenated along dim 0, in rank order (each process must call
    it with the same shape; a bool tensor comes back bool)."""
    if not _several():
        return tensor
    work = tensor.to(_collective_device(tensor), torch.uint8 if tensor.dtype == torch.bool
                     else tensor.dtype).contiguous()
    parts = [torch.empty_like(work) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, work)
    return torch.cat(parts).to(tensor.device, tensor.dtype)


def mean_over_processes(value: float) -> float:
    """The mean over processes of one number per process (a mean of equal-sized shards)."""
    if not _several():
        return value
    return float(gather(torch.tensor([value], dtype=torch.float64)).mean())


def from_first_process(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every process (choices that must agree, e.g. a step's contexts)."""
    if not _several():
        return tensor
    work = tensor.to(_collective_device(tensor)).contiguous()
    dist.broadcast(work, src=0)
    return work.to(tensor.device)
