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
    """This process's rank under torchrun (torchelastic) or srun (SLURM); rank 0 of 1 otherwise.

    Under SLURM the rank, world size and local rank are SLURM's own task variables
    (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` or ``SLURM_NTASKS``, ``SLURM_LOCALID``), which every
    version from 22.05 sets for ``srun --ntasks N`` and ``--ntasks-per-node``; sampling needs no
    more. (Lightning's SLURM environment, which training uses, also wants
    ``SLURM_NTASKS_PER_NODE``, which 22.05 does not set for ``srun --ntasks``.)
    """
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        env = TorchElasticEnvironment()
        return Launch(env.global_rank(), env.world_size(), env.local_rank())
    return slurm_launch(os.environ)


def slurm_launch(environ) -> Launch:
    """The launch SLURM describes in ``environ`` (rank 0 of 1 outside an srun task, and in an
    allocation's shell, whose job name is ``bash`` or ``interactive``, as Lightning has it)."""
    if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return Launch()
    if environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return Launch()
    try:
        world = int(environ.get("SLURM_STEP_NUM_TASKS") or environ["SLURM_NTASKS"])
        rank, local = int(environ["SLURM_PROCID"]), int(environ.get("SLURM_LOCALID", "0"))
    except ValueError:
        raise ValueError(
            "SLURM's task variables (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) are not numbers; "
            "start sample.py with srun"
        ) from None
    if not 0 <= rank < world:
        raise ValueError(f"SLURM_PROCID {rank} is not a rank of {world} tasks; start with srun")
    if world > 1 and isinstance(environ, os._Environ):
        # the process group reads these: the first node of the step, a port from the job id
        from lightning.fabric.plugins.environments import SLURMEnvironment

        nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_NODELIST", "127.0.0.1")
        os.environ.setdefault("MASTER_ADDR", SLURMEnvironment.resolve_root_node_address(nodes))
        job = environ.get("SLURM_JOB_ID", "")
        os.environ.setdefault(
            "MASTER_PORT", str(int(job[-4:]) + 15000 if job[-4:].isdigit() else 12910)
        )
    return Launch(rank, world, local)
