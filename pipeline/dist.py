"""The distributed context, built once by each entry point and passed down explicitly.

Reads the launcher's environment (torchrun, the deepspeed launcher, or srun via torchrun):
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT. With none set it is a single process and no
process group is created. nccl when CUDA is present, gloo otherwise. Nothing here runs at import.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None  # None: single process, no process group
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def group(self):
        """The world group (passed explicitly to collectives; None when single-process)."""
        return dist.group.WORLD if self.distributed else None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_gather_object(self, obj):
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=op)
        return t

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.distributed:
            dist.broadcast(t, src=src)
        return t

    def broadcast_object(self, obj, src: int = 0):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def shard(self, items: list) -> list:
        """This rank's items of a list: every world_size-th, starting at rank (deterministic)."""
        return items[self.rank::self.world_size]


def init_distributed(timeout_min: float = 30.0, backend: str | None = None) -> DistContext:
    """Builds the context from the environment; creates the default process group if the
    launcher set WORLD_SIZE (even =1, so single-rank torchrun runs take the same code path)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistContext(device=device)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_min),
                                device_id=device if cuda else None)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank,
                       local_world_size=local_world, backend=backend, device=device)


def destroy(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(fn, *args):
    """Entry-point plumbing of every stage: build the context once, log per rank, run
    ``fn(*args, ctx)``, and always tear the process group down (also on errors)."""
    from pipeline.tracking import setup_logging  # tracking imports this module
    ctx = init_distributed()
    setup_logging(ctx)
    try:
        return fn(*args, ctx)
    finally:
        destroy(ctx)
