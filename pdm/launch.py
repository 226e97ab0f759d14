"""One command over many processes: which process this is, and the few collectives sampling needs.

``torchrun --nproc_per_node N sample.py ...`` and ``srun --ntasks N python sample.py ...`` start
N copies of one command. :func:`detect` reads the rank from Lightning's cluster environments
(torchelastic's and SLURM's variables); a plain ``python sample.py`` is rank 0 of 1 and opens
no process group. CPU processes talk over gloo, GPU processes over NCCL, each rank on its own
GPU (``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# A rank may wait at a barrier while the others finish their shards: hours for 50,000 images.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=48)


@dataclass(frozen=True)
class Launch:
    """This process's place in a multi-process launch."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """Whether other processes share this command."""
        return self.world_size > 1

    def device(self, requested: torch.device) -> torch.device:
        """The rank's own device: ``cuda:LOCAL_RANK`` when CUDA was asked for without an index."""
        if self.distributed and requested.type == "cuda":
            if requested.index is not None:
                raise ValueError(
                    f"--device {requested} pins every rank to one GPU; pass --device cuda and each "
                    "rank takes cuda:LOCAL_RANK"
                )
            return torch.device("cuda", self.local_rank)
        return requested

    def start(self, device: torch.device) -> None:
        """Open the process group (gloo on CPUs, NCCL on GPUs); nothing for a single process."""
        if not self.distributed or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            rank=self.rank,
            world_size=self.world_size,
            timeout=COLLECTIVE_TIMEOUT,
            **({"device_id": device} if device.type == "cuda" else {}),
        )

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank (a barrier as well)."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def stop(self) -> None:
        """Close the process group, if this process opened one."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def detect() -> Launch:
    """This process's rank under torchrun (torchelastic) or srun (SLURM); rank 0 of 1 otherwise."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for env_cls in (TorchElasticEnvironment, SLURMEnvironment):
        with (
            warnings.catch_warnings()
        ):  # Lightning's "srun is available but not used" is for training
            warnings.filterwarnings("ignore", message=r".*`srun` command is available.*")
            found = env_cls.detect()
        if found:
            try:
                env = env_cls()
            except RuntimeError as e:  # e.g. srun --ntasks without --ntasks-per-node
                raise ValueError(" ".join(str(e).split())) from None
            if env.world_size() > 1:
                # the process group reads these (torchrun sets them; under srun Lightning derives them)
                os.environ.setdefault("MASTER_ADDR", env.main_address)
                os.environ.setdefault("MASTER_PORT", str(env.main_port))
            return Launch(env.global_rank(), env.world_size(), env.local_rank())
    return Launch()
