"""The distributed context, built once by each entry point and passed down explicitly.

Reads the launcher's environment (torchrun, the deepspeed launcher, or srun via torchrun):
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT. With none set it is a single process and no
process group is created. nccl when CUDA is present, gloo otherwise. Nothing here runs at import.
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
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

    # ------------------------------------------------------------ collectives
    # Every torch.distributed collective of the project goes through these methods (a static test
    # enforces it; the only exceptions are the autograd Functions of training/partial_fc.py and
    # training/loss.py). NCCL has no CPU backend, so a tensor that is not on the communication
    # device is staged there and the result copied back: the caller may pass a CPU tensor and
    # still gets a correct (if slower: one host round trip) result. Per-step statistics should
    # be created on `ctx.device` in the first place so that no copy happens.

    @property
    def comm_device(self) -> torch.device:
        """Where collective buffers must live: the rank's GPU under nccl, the CPU under gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def _stage(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.comm_device else t.to(self.comm_device)

    def barrier(self) -> None:
        if self.distributed:
            # under nccl, name the device: a barrier on a guessed device can hang (torch warns)
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce_(self, t: torch.Tensor, op: str | dist.ReduceOp = "sum") -> torch.Tensor:
        """In place over ranks (op: sum | max | min | product | avg, or a ReduceOp); returns t."""
        if self.distributed:
            red = _op(op)
            if red == dist.ReduceOp.AVG and self.backend != "nccl":  # gloo has no AVG
                self.all_reduce_(t, "sum")
                return t.div_(self.world_size)
            buf = self._stage(t)
            dist.all_reduce(buf, op=red)
            if buf is not t:
                t.copy_(buf)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation along dim 0 of every rank's tensor (same shape and dtype on every
        rank), on t's device."""
        if not self.distributed:
            return t
        buf = self._stage(t).contiguous()
        parts = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(parts, buf)
        return torch.cat(parts).to(t.device)

    def reduce_scatter(self, t: torch.Tensor, op: str | dist.ReduceOp = "sum") -> torch.Tensor:
        """Reduces t over ranks and returns this rank's block of dim 0 (t.shape[0] must divide by
        world_size), on t's device."""
        if not self.distributed:
            return t
        if t.shape[0] % self.world_size:
            raise ValueError(f"reduce_scatter: dim 0 ({t.shape[0]}) must divide by the world size "
                             f"({self.world_size})")
        buf = self._stage(t).contiguous()
        parts = list(buf.chunk(self.world_size))
        mine = torch.empty_like(parts[0])
        if self.backend == "nccl":
            dist.reduce_scatter(mine, parts, op=_op(op))
        else:  # gloo implements no reduce_scatter: all-reduce, keep my block (CPU, small)
            dist.all_reduce(buf, op=_op(op))
            mine.copy_(buf.chunk(self.world_size)[self.rank])
        return mine.to(t.device)

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place: every rank ends with rank src's values; returns t."""
        if self.distributed:
            buf = self._stage(t)
            dist.broadcast(buf, src=src)
            if buf is not t:
                t.copy_(buf)
        return t

    def all_gather_object(self, obj):
        """Every rank's picklable obj, in rank order. Objects are pickled: only for small
        control data the project itself made (never data read from a file)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def agree(self, fn):
        """Rank 0 runs ``fn()``; every rank returns its result, or raises its error. The one way
        to "check once, all agree" (listing work, validating inputs, preparing a folder): an
        error on rank 0 is broadcast, so no rank is left waiting at a later collective."""
        if not self.distributed:
            return fn()
        out, err = None, None
        if self.is_main:
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001 -- re-raised below, on every rank
                err = e
        sent = err
        if self.is_main and err is not None:
            try:
                pickle.dumps(err)
            except Exception:  # noqa: BLE001 -- an exception that cannot travel: send its text
                sent = RuntimeError(f"{type(err).__name__}: {err}")
        err_all = self.broadcast_object(sent)
        if isinstance(err_all, BaseException):
            if self.is_main and err is not None:
                raise err
            err_all.agreed = True  # type: ignore[attr-defined]  # a copy of rank 0's: rank 0 reports it
            raise err_all
        return self.broadcast_object(out)

    def shard(self, items: list) -> list:
        """This rank's items of a list: every world_size-th, starting at rank (deterministic)."""
        return items[self.rank::self.world_size]


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN,
        "product": dist.ReduceOp.PRODUCT, "avg": dist.ReduceOp.AVG}


def _op(op):
    if isinstance(op, str):
        if op not in _OPS:
            raise ValueError(f"unknown reduce op {op!r}; one of {sorted(_OPS)}")
        return _OPS[op]
    return op


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


def free_port() -> int:
    """A TCP port free on this host now, for a one-node rendezvous (MASTER_PORT, rdzv endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def destroy(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()

