"""Preflight for a multi-node job: every rank reports where it runs, the group proves it can
talk, and an all-reduce measures the bus bandwidth the training step will get.

    launch/torchrun.sh envcheck [--bytes 256e6] [--iters 5] [--out DIR] [--sleep S]

Rank 0 prints one line per rank (host, RANK, LOCAL_RANK, GROUP_RANK, restart count) and the
all-reduce bus bandwidth in nccl-tests' convention (busbw = bytes * 2(W-1)/W / time), so the
number compares with `all_reduce_perf`. A bad NCCL_SOCKET_IFNAME or a missing IB HCA shows up
here as ~1-3 GB/s instead of ~100+ GB/s per node, before a 1,000 GPU-hour job learns it.
--out writes rank{r}.json per rank (atomic) for scripts and tests; --sleep keeps ranks alive
(signal-handling tests of the SLURM templates).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import torch

from pipeline.core.entry import run_distributed
from pipeline.core.io import atomic_write_json


def report(ctx) -> dict:
    env = os.environ
    return {"host": socket.gethostname(), "pid": os.getpid(), "rank": ctx.rank,
            "world_size": ctx.world_size, "local_rank": ctx.local_rank,
            "local_world_size": ctx.local_world_size,
            "group_rank": int(env.get("GROUP_RANK", env.get("NODE_RANK", 0))),
            "restart_count": int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
            "master": f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}",
            "backend": ctx.backend, "device": str(ctx.device),
            "omp_threads": torch.get_num_threads()}


def allreduce_busbw(ctx, nbytes: int, iters: int) -> float:
    """GB/s of bus bandwidth for a fp32 all-reduce of `nbytes` (0 when single-process)."""
    if not ctx.distributed or nbytes <= 0:
        return 0.0
    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=ctx.device)
    ctx.all_reduce_(x)  # warm-up: builds the communicator / rings
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        ctx.all_reduce_(x)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    w = ctx.world_size
    return x.numel() * 4 * 2 * (w - 1) / w / dt / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="launch.envcheck")
    ap.add_argument("--bytes", type=float, default=0, help="all-reduce size for the bandwidth test")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=None, help="write rank{r}.json here")
    ap.add_argument("--sleep", type=float, default=0.0, help="stay alive this long (seconds)")
    return run_distributed(check, None, ap.parse_args(argv))


def check(_run, args, ctx) -> int:
    me = report(ctx)
    # The group really talks: the sum of ones is the world size on every rank.
    one = ctx.all_reduce_(torch.ones(1, device=ctx.device))
    me["allreduce_ok"] = int(one.item()) == ctx.world_size
    me["busbw_GBps"] = allreduce_busbw(ctx, int(args.bytes), args.iters)
    everyone = ctx.all_gather_object(me)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        atomic_write_json(os.path.join(args.out, f"rank{ctx.rank}.json"), me)
    if ctx.is_main:
        for r in everyone:
            print(json.dumps(r), flush=True)
        hosts = sorted({r["host"] for r in everyone})
        ok = all(r["allreduce_ok"] for r in everyone)
        print(f"envcheck: world_size={ctx.world_size} hosts={len(hosts)} backend={ctx.backend} "
              f"allreduce={'ok' if ok else 'FAILED'} busbw={me['busbw_GBps']:.2f} GB/s", flush=True)
    if args.sleep:
        time.sleep(args.sleep)
    return 0 if me["allreduce_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
