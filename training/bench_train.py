"""Stage 3 benchmark (`make bench`, launch/bench.py): numbers measured side by side.

1. Classifier memory per rank: the PartialFC block (measured tensor bytes of centers, gradient and
   AdamW state) against K*D*4/W, plus the per-step sampled buffers (computed: S x D rows and
   B x S logits, a few copies each).
2. Step time of the sharded loss at K = 100k, rho = 0.1 vs rho = 1.0 (one process: forward +
   backward, and with the centers' AdamW step, which is dense over the block either way).
3. Peak memory of the loss forward + backward at one rank's share of a large global batch,
   chunked (`partial_fc.chunk_rows`) vs not, and the step-time cost of chunking (each variant in
   a fresh process: peak RSS growth on CPU, torch.cuda.max_memory_allocated on CUDA).
4. Samples/s of the training step (DeepSpeed ZeRO-2 + PartialFC rho 0.1 + MLCD) against a plain
   DDP baseline of the same model with a full data-parallel softmax classifier, 2 ranks (torchrun,
   gloo on CPU), synthetic batches (compute only, no data loading).
5. The training data loader's images/s with 1 and 2 workers on real shards, per core, and the
   cores per GPU it implies at an anchor rate, next to (4) (training/bench_data.py).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_memory(quick: bool) -> list[dict]:
    from training.loss import LossConfig
    from training.partial_fc import PartialFC, PartialFCConfig, make_optimizer
    K, D, B, rho = (100_000, 128, 1024, 0.1) if quick else (1_000_000, 512, 32_768, 0.1)
    rows = []
    for W in ((1, 8, 80) if quick else (8, 80)):  # full: W=1 would hold 8 GiB (1M x 512 + AdamW)
        pfc = PartialFC(K, D, PartialFCConfig(sample_rate=rho, init_std=0.01), LossConfig(), rank=0, world_size=W)
        opt = make_optimizer(pfc, PartialFCConfig(), 1e-3, 0.0)
        pfc.weight.grad = torch.zeros_like(pfc.weight)
        opt.step()
        centers = pfc.weight.numel() * pfc.weight.element_size()
        state = sum(v.numel() * v.element_size() for v in opt.state[pfc.weight].values() if v.dim())
        S = min(pfc.num_local, B * 8 // W + int(rho * pfc.num_local))  # <= positives + negatives
        sampled = 2 * S * D * 4 + 4 * B * S * 4  # rows (+normalized), logits (+2 masked, exp)
        rows.append({"bench": "classifier memory/rank", "config": f"K={K:,} D={D} W={W}",
                     "ours": centers / 2**20, "reference": K * D * 4 / W / 2**20, "unit": "MiB (K*D*4/W)",
                     "ratio": centers / (K * D * 4 / W),
                     "note": f"+grad+AdamW {(2 * centers + state) / 2**20:.0f} MiB; sampled buffers "
                             f"~{sampled / 2**20:.0f} MiB (computed, global B={B})"})
        del pfc, opt
    return rows


def bench_rho(quick: bool) -> list[dict]:
    from training.loss import LossConfig
    from training.partial_fc import PartialFC, PartialFCConfig, make_optimizer
    K, D, B = 100_000, 128 if quick else 256, 256 if quick else 512
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(B, D, generator=g, requires_grad=True)
    labels = torch.randint(0, K, (B, 8), generator=g)
    times = {}
    for rho in (0.1, 1.0):
        pfc = PartialFC(K, D, PartialFCConfig(sample_rate=rho), LossConfig())
        opt = make_optimizer(pfc, PartialFCConfig(), 1e-3, 0.0)

        def fwd_bwd(pfc=pfc):
            loss, _ = pfc(emb, labels, 0)
            loss.backward()

        def full(fwd_bwd=fwd_bwd, opt=opt):
            fwd_bwd()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times[rho] = (_time(fwd_bwd, 3 if quick else 5), _time(full, 3 if quick else 5))
    cfg = f"K={K:,} D={D} B={B}"
    return [{"bench": "step time rho=0.1 (ours) vs 1.0 (ref)", "config": cfg + " loss fwd+bwd",
             "ours": times[0.1][0], "reference": times[1.0][0], "unit": "s/step",
             "ratio": times[1.0][0] / times[0.1][0], "note": "ratio = speed-up"},
            {"bench": "step time rho=0.1 (ours) vs 1.0 (ref)", "config": cfg + " + centers' AdamW",
             "ours": times[0.1][1], "reference": times[1.0][1], "unit": "s/step",
             "ratio": times[1.0][1] / times[0.1][1], "note": "AdamW is dense over the block either way"}]


def bench_loss_chunks(quick: bool) -> list[dict]:
    """One simulated rank (rank 0 of W, no process group: the global batch is given directly)."""
    spec = dict(K=200_000, W=32, D=128, B=8192, reps=5) if quick else dict(K=1_000_000, W=32, D=256,
                                                                             B=16_384, reps=5)
    if torch.cuda.is_available() and not quick:  # the production shape: K = 1M, W = 8, B = 32,768
        spec = dict(K=1_000_000, W=8, D=512, B=32_768, reps=5)
    out = {}
    for chunk in (-1, 1024, 0):
        for what in ("memory", "time"):
            # memory: glibc's default (dynamic) mmap threshold keeps freed buffers resident, so RSS
            # would not track live tensors; a fixed threshold returns every large buffer on free.
            # time: default malloc (what training runs with)
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            if what == "memory":
                env["MALLOC_MMAP_THRESHOLD_"] = "65536"
            p = subprocess.run([sys.executable, "-m", "training.bench_train", "loss",
                                json.dumps({**spec, "chunk": chunk, "what": what})],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("LOSS_JSON ")), None)
            if p.returncode != 0 or line is None:
                raise RuntimeError(f"loss memory bench failed ({p.returncode}): {p.stderr[-3000:]}")
            out.setdefault(chunk, {}).update({k: v for k, v in json.loads(line[len("LOSS_JSON "):]).items()
                                              if v is not None})
    off = out[-1]
    cfg = f"K={spec['K']:,} W={spec['W']} D={spec['D']} global B={spec['B']:,} S_local={off['S']:,}"
    rows = []
    for chunk in (1024, 0):
        r = out[chunk]
        name = f"chunk_rows={chunk}" + (f" (auto: {r['rows']} rows)" if chunk == 0 else "")
        rows += [{"bench": f"loss peak memory, {name} (ours) vs unchunked (ref)", "config": cfg,
                  "ours": r["peak"] / 2**20, "reference": off["peak"] / 2**20, "unit": f"MiB ({r['how']})",
                  "ratio": off["peak"] / max(r["peak"], 1), "note": "ratio = memory saved x"},
                 {"bench": f"loss fwd+bwd time, {name} (ours) vs unchunked (ref)", "config": cfg,
                  "ours": r["time"], "reference": off["time"], "unit": "s/step",
                  "ratio": r["time"] / off["time"], "note": "ratio - 1 = cost of chunking (goal <= 10%)"}]
    return rows


def _proc_status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _rss_reset_peak() -> int:
    """Resets this process's peak RSS (VmHWM) to its current RSS; returns the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kb("VmRSS")


def _rss_peak() -> int:
    return _proc_status_kb("VmHWM")


def _loss_worker(spec: dict) -> None:
    from training.loss import LossConfig
    from training.partial_fc import PartialFC, PartialFCConfig
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    B, D, K = spec["B"], spec["D"], spec["K"]
    pfc = PartialFC(K, D, PartialFCConfig(sample_rate=0.1, chunk_rows=spec["chunk"]), LossConfig(),
                    rank=0, world_size=spec["W"]).to(dev)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(B, D, generator=g).to(dev).requires_grad_()
    labels = torch.randint(0, K, (B, 8), generator=g).to(dev)

    def fwd_bwd(n=B):
        loss, _ = pfc(emb[:n], labels[:n], 0)
        loss.backward()
        pfc.weight.grad = emb.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize()
    for rows in (-1, 16):  # both code paths once, small: one-time library pages are not the loss's
        pfc.cfg.chunk_rows = rows
        fwd_bwd(64)
    pfc.cfg.chunk_rows = spec["chunk"]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base, how = torch.cuda.memory_allocated(), "cuda max_memory_allocated"
    else:
        # The process's high-water mark is reset first (Linux: clear_refs 5), so set-up transients
        # (the centers' seeded init, library pages) cannot hide the loss's own peak.
        base, how = _rss_reset_peak(), "peak RSS growth"
    fwd_bwd()
    peak: float | None = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _rss_peak()) - base
    sampled, _, _ = pfc.sample_columns(labels, 0)
    t: float | None = None
    if spec["what"] == "time":
        peak = None
        t = min(_timed(fwd_bwd) for _ in range(spec["reps"]))  # min: the box may be shared
    print("LOSS_JSON " + json.dumps({"peak": peak, "time": t, "how": how, "S": sampled.numel(),
                                     "rows": pfc.chunk_rows(B, sampled.numel())}), flush=True)


def bench_throughput(quick: bool) -> list[dict]:
    from pipeline.dist import free_port
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "-m", "training.bench_train",
           "quick" if quick else "full"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"throughput bench failed ({p.returncode}): {p.stderr[-3000:]}")
    return [json.loads(line[len("BENCH_JSON "):])]


def _throughput_worker(quick: bool) -> None:
    """Under torchrun: same model, same batch; ours vs DDP + full softmax."""
    import torch.nn.functional as F

    from pipeline.config import RunConfig
    from pipeline.dist import init_distributed
    from training.config import DeepSpeedConfig, OptimConfig, TrainConfig
    from training.data import Batch, TrainDataConfig
    from training.loss import LossConfig
    from training.model import ModelConfig, build_model
    from training.partial_fc import PartialFCConfig
    from training.trainer import Trainer
    ctx = init_distributed()
    model_cfg = (ModelConfig(name="vit_tiny_rope2d", image_size=32, width=64, layers=2, heads=4, mlp_dim=128,
                             embed_dim=64) if quick else
                 ModelConfig(name="vit_tiny_rope2d", image_size=64, patch_size=8, width=192, layers=6,
                             heads=3, mlp_dim=768, embed_dim=128))
    K, B, reps = (20_000, 32, 5) if quick else (100_000, 32, 8)
    cfg = TrainConfig(model=model_cfg, loss=LossConfig(num_labels=8),
                      partial_fc=PartialFCConfig(num_classes=K, sample_rate=0.1),
                      optim=OptimConfig(warmup_steps=0), data=TrainDataConfig(batch_size=B),
                      deepspeed=DeepSpeedConfig(zero_stage=2, precision="fp32"))
    g = torch.Generator().manual_seed(ctx.rank)
    size = model_cfg.resolved().image_size
    images = torch.randn(B, 3, size, size, generator=g)
    labels = torch.randint(0, K, (B, 8), generator=g)

    trainer = Trainer(RunConfig(seed=0), cfg, ctx, num_classes=K)  # the stage's build, no files

    def ours():
        trainer.train_step([Batch(images, labels)])
        trainer.step += 1
    t_ours = _time(ours, reps)

    torch.manual_seed(0)
    base = torch.nn.Sequential(build_model(model_cfg), torch.nn.Linear(trainer.engine.module.out_dim, K, bias=False))
    ddp = torch.nn.parallel.DistributedDataParallel(base)
    bopt = torch.optim.AdamW(ddp.parameters(), lr=1e-3, weight_decay=0.2)

    def baseline():
        logits = ddp(images)
        F.cross_entropy(logits, labels[:, 0]).backward()
        bopt.step()
        bopt.zero_grad(set_to_none=True)
    t_base = _time(baseline, reps)
    if ctx.is_main:
        gb = B * ctx.world_size
        print("BENCH_JSON " + json.dumps({
            "bench": "samples/s, 2 ranks: ZeRO-2+PartialFC rho .1 (ours) vs DDP full softmax (ref)",
            "config": f"w{model_cfg.resolved().width}x{model_cfg.resolved().layers}@{size}px K={K:,} "
                      f"global B={gb}", "ours": gb / t_ours, "reference": gb / t_base,
            "unit": "samples/s", "ratio": t_base / t_ours, "note": "synthetic batches, compute only"}),
            flush=True)


def run_bench(quick: bool) -> list[dict]:
    from training.bench_data import bench_loader
    rows = bench_memory(quick) + bench_rho(quick) + bench_loss_chunks(quick)
    step = bench_throughput(quick)
    return rows + step + bench_loader(quick, step[0]["ours"], step[0]["config"])


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "loss":
        _loss_worker(json.loads(sys.argv[2]))
    else:
        _throughput_worker(quick=len(sys.argv) > 1 and sys.argv[1] == "quick")
