"""Shared-memory batches a DataLoader worker reuses (training/data.py's fast loader, workers >= 1).

A worker's fast batch is made in shared memory (`decode.batch_buffer(shared=True)`), so handing
it to the training process sends a file descriptor, not a copy. A new segment per batch still
costs its first touch and its unmapping: ~2,350 page faults for a 64-image 224 px batch, ~90 us an
image on the bench's CPUs, about a sixth of a worker's time (make bench's 1-worker row). The pool
keeps each worker's segments and reuses one once the training process has let go of it:

- the worker takes a slot it has been given back (or makes a new one, up to `slots`; past that
  an unpooled batch as before), decodes into it, and tags the Batch (pool, worker, slot);
- the training process gives a slot back over that worker's pipe when nothing in it can read the
  segment any more: right after the pinned copy (`Batch.pin_memory`, the DataLoader's pin thread
  on CUDA), or, unpinned, once the storage's use count shows that only `Pooled`'s own reference
  is left (checked each time the trainer asks for the next batch).

So a slot is written again only after the training process has stopped reading it. A give-back to
a worker that has exited is dropped (non-blocking pipe); the training process keeps its mappings.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import threading

import torch
from torch.utils.data import get_worker_info

from training.decode import batch_buffer

_POOLS: dict[int, BatchPool] = {}  # in the training process: pool id -> pool, for give-backs
_IDS = itertools.count(1)


class BatchPool:
    """One iteration's pool: a pipe per worker (training process -> worker), created before the
    DataLoader forks its workers; each worker's slots live in that worker alone."""

    def __init__(self, workers: int, slots: int):
        self.id, self.slots = next(_IDS), slots
        self.pipes = [mp.Pipe(duplex=False) for _ in range(workers)]  # (worker's end, ours)
        for _, ours in self.pipes:
            os.set_blocking(ours.fileno(), False)  # a full pipe (worker gone) drops, never blocks
        self._lock = threading.Lock()  # the pin thread and the main thread both give back
        self._mine: tuple[list[torch.Tensor], set[int]] | None = None  # worker side: slot batches, free ones
        _POOLS[self.id] = self

    def __getstate__(self) -> dict:  # a spawned worker gets the pool pickled: no lock, no slots
        return {**self.__dict__, "_lock": None, "_mine": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def take(self, n: int, size: int) -> tuple[torch.Tensor, tuple[int, int, int] | None]:
        """In a worker: a (n, 3, size, size) channels-last uint8 batch in one of its slots, and the
        tag the training process gives back; outside a worker, or with every slot out, a new
        batch (shared in a worker) and None."""
        info = get_worker_info()
        if info is None:
            return batch_buffer(n, size), None
        if self._mine is None:
            self._mine = [], set()
        batches, free = self._mine
        ours = self.pipes[info.id][0]
        while ours.poll():
            free.add(int.from_bytes(ours.recv_bytes(), "little"))
        slot = next((s for s in free if batches[s].shape == (n, 3, size, size)), None)
        if slot is None and len(batches) < self.slots:
            slot = len(batches)
            batches.append(batch_buffer(n, size, shared=True))
        if slot is None:
            return batch_buffer(n, size, shared=True), None
        free.discard(slot)
        return batches[slot], (self.id, info.id, slot)

    def give_back(self, worker: int, slot: int) -> None:
        with self._lock:
            try:
                self.pipes[worker][1].send_bytes(slot.to_bytes(4, "little"))
            except (OSError, ValueError):  # full or closed: the worker is gone, and its slots with it
                pass

    def close(self) -> None:
        _POOLS.pop(self.id, None)
        for a, b in self.pipes:
            a.close()
            b.close()


def give_back(tag: tuple[int, int, int] | None) -> None:
    """The training process is done reading the tagged batch (no-op for None or a closed pool)."""
    if tag is not None and (pool := _POOLS.get(tag[0])) is not None:
        pool.give_back(tag[1], tag[2])


class Pooled:
    """Iterates a DataLoader over `ds` (a LabeledStream) with a fresh BatchPool per iteration, and
    gives back the slots of unpinned batches nothing here references any more."""

    def __init__(self, dl, ds, slots: int):
        self.dl, self.ds, self.slots = dl, ds, slots

    def __iter__(self):
        pool = BatchPool(self.dl.num_workers, self.slots)
        self.ds.pool = pool  # before iter() forks the workers: they inherit it
        held: list[tuple[tuple[int, int, int], torch.UntypedStorage]] = []
        try:
            for b in self.dl:
                # our own reference is the only one left: nobody here can read that batch any more
                keep = []
                for tag, st in held:
                    if torch._C._storage_Use_Count(st._cdata) == 1:
                        give_back(tag)
                    else:
                        keep.append((tag, st))
                held = keep
                batch = b[0] if isinstance(b, (tuple, list)) else b  # (Batch, ...): the loader bench's
                if batch.pool_slot is not None:  # unpinned (pin_memory gave its slot back and cleared it)
                    held.append((batch.pool_slot, batch.images.untyped_storage()))
                yield b
        finally:
            self.ds.pool = None
            pool.close()

