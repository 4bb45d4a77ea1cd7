"""Stage 3 benchmark (`make bench`, launch/bench.py): numbers measured side by side.

1. Classifier memory per rank: the PartialFC block (measured tensor bytes of centers, gradient and
   AdamW state; no ratio: it is K*D*4/W by construction), plus the per-step sampled buffers
   (computed: S x D rows and B x S logits, a few copies each).
2. Step time of the sharded loss at K = 100k, rho = 0.1 vs rho = 1.0 (one process: forward +
   backward, and with the centers' AdamW step, which is dense over the block either way).
3. The PartialFC loss at one simulated rank of a large global batch (LOSS_SHAPES): chunked
   (training/fused_loss.py, auto chunk) / unchunked (autograd over B x S) time, alternating in one
   process, and peak memory, each in a fresh process (peak RSS growth on CPU,
   torch.cuda.max_memory_allocated on CUDA); the chunked loss's GEMM rate against its three
   GEMMs run alone at the same shapes, alternating (`fused_loss_rate` is the same on a GPU).
4. Samples/s of the training step, 2 ranks (torchrun, gloo on CPU), synthetic batches (compute
   only), from a plain DDP step with a full data-parallel softmax classifier to ours, one change
   per row (CHAIN: sharding, then sampling, then the loss), all timed alternating.
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
                     "ours": centers / 2**20, "unit": "MiB (measured tensor bytes)",
                     "note": f"+grad+AdamW {(2 * centers + state) / 2**20:.0f} MiB (a data-parallel "
                             f"classifier: {K * D * 4 / 2**20:.0f} MiB/rank); unchunked sampled buffers "
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


LOSS_SHAPES = {"quick": dict(K=1_000_000, W=32, D=256, B=4096),      # one simulated rank of W
               "full": dict(K=1_000_000, W=32, D=256, B=16_384),     # the CPU bench shape
               "cuda": dict(K=1_000_000, W=8, D=512, B=32_768)}      # production: B = 32k on 8 GPUs


def _loss_child(spec: dict) -> dict:
    """Runs `_loss_worker(spec)` in a fresh process (its own allocator and peak RSS)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if spec["what"] == "memory":
        # glibc's default (dynamic) mmap threshold keeps freed buffers resident, so RSS would not
        # track live tensors; a fixed threshold returns every large buffer on free
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    p = subprocess.run([sys.executable, "-m", "training.bench_train", "loss", json.dumps(spec)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("LOSS_JSON ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"loss bench failed ({p.returncode}): {p.stderr[-3000:]}")
    return json.loads(line[len("LOSS_JSON "):])


def bench_loss_chunks(quick: bool) -> list[dict]:
    """Chunked (fused, training/fused_loss.py, auto chunk) vs unchunked (autograd over the B x S
    logits) PartialFC loss at one simulated rank: time alternating in one process, peak memory
    each in a fresh process; and the chunked loss's GEMM rate against the bare GEMMs of the
    same shapes, alternating."""
    spec = LOSS_SHAPES["quick" if quick else ("cuda" if torch.cuda.is_available() else "full")]
    reps = 3
    mem = {c: _loss_child({**spec, "chunks": [c], "what": "memory", "reps": 0})["peak"] for c in (-1, 0)}
    t = _loss_child({**spec, "chunks": [-1, 0], "what": "time", "reps": reps})
    cfg = (f"K={spec['K']:,} W={spec['W']} D={spec['D']} global B={spec['B']:,} S_local={t['S']:,} "
           f"(dense {t['n_dense']:,}) auto chunk {t['rows']} rows, {t['threads']} threads")
    fused, dense = t["time"]["0"], t["time"]["-1"]
    return [
        {"bench": "loss fwd+bwd time, chunked/unchunked", "config": cfg, "ours": fused, "reference": dense,
         "unit": "s/step", "ratio": fused / dense,
         "note": "fused chunks (gradients in forward) vs autograd over B x S; alternating, min of "
                 f"{reps}; target <= 1.10"},
        {"bench": "loss peak memory, chunked/unchunked", "config": cfg, "ours": mem[0] / 2**20,
         "reference": mem[-1] / 2**20, "unit": f"MiB ({t['how']})", "ratio": mem[0] / max(mem[-1], 1),
         "note": "each in a fresh process"},
        {"bench": "loss GEMM rate / bare GEMM rate", "config": cfg, "ours": t["flops"] / fused / 1e9,
         "reference": t["flops"] / t["time"]["gemm"] / 1e9, "unit": "GFLOP/s",
         "ratio": t["time"]["gemm"] / fused,
         "note": "chunked loss fwd+bwd vs its 3 GEMMs alone (same chunks, reused outputs), "
                 "alternating; target >= 0.30"},
    ]


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


def _loss_setup(spec: dict, dev: torch.device, chunk: int = 0):
    """One simulated rank (rank 0 of W, no process group: the global batch is given directly)."""
    from training.loss import LossConfig
    from training.partial_fc import PartialFC, PartialFCConfig
    B, D, K = spec["B"], spec["D"], spec["K"]
    pfc = PartialFC(K, D, PartialFCConfig(sample_rate=0.1, chunk_rows=chunk), LossConfig(),
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
    return pfc, emb, labels, fwd_bwd


def _bare_gemms(B: int, D: int, n: int, rows: int, dev: torch.device):
    """The chunked loss's three GEMMs (logits, d_emb, d_w) alone, at its shapes and chunks, into
    reused outputs: the ceiling its GEMM rate is compared with."""
    g = torch.Generator().manual_seed(1)
    e, w = torch.randn(B, D, generator=g).to(dev), torch.randn(n, D, generator=g).to(dev)
    z, de, dw = torch.empty(min(rows, B), n, device=dev), torch.empty(B, D, device=dev), torch.zeros(n, D, device=dev)

    def run():
        for b0 in range(0, B, rows):
            c = e[b0:b0 + rows]
            zc = z[:c.shape[0]]
            torch.mm(c, w.T, out=zc)
            torch.mm(zc, w, out=de[b0:b0 + rows])
            dw.addmm_(zc.T, c)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return run


def _peak_start(dev) -> tuple[int, str]:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated(), "cuda max_memory_allocated"
    # the process's high-water mark is reset first (Linux: clear_refs 5), so set-up transients
    # (the centers' seeded init, library pages) cannot hide the loss's own peak
    return _rss_reset_peak(), "peak RSS growth"


def _peak_end(dev, base: int) -> int:
    return (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _rss_peak()) - base


def _loss_worker(spec: dict) -> None:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pfc, emb, labels, fwd_bwd = _loss_setup(spec, dev)
    for rows in (-1, 16):  # both code paths once, small: one-time library pages are not the loss's
        pfc.cfg.chunk_rows = rows
        fwd_bwd(64)
    d = pfc.sample_columns(labels, 0)
    n = int(d.limit.max())
    pfc.cfg.chunk_rows = 0
    rows = pfc.chunk_rows(spec["B"], n)
    out = {"S": d.sampled.numel(), "n_dense": n, "rows": rows, "threads": torch.get_num_threads(),
           "flops": 6 * spec["B"] * spec["D"] * (n + labels.shape[1])}
    if spec["what"] == "memory":
        pfc.cfg.chunk_rows = spec["chunks"][0]
        base, out["how"] = _peak_start(dev)
        fwd_bwd()
        out["peak"] = _peak_end(dev, base)
    else:
        def at_chunk(c: int):
            def run():
                pfc.cfg.chunk_rows = c
                fwd_bwd()
            return run
        fns = {str(c): at_chunk(c) for c in spec["chunks"]}
        fns["gemm"] = _bare_gemms(spec["B"], spec["D"], n, rows, dev)
        times = {k: [] for k in fns}
        for _ in range(spec["reps"]):  # alternating: load from other processes hits all alike
            for k, fn in fns.items():
                times[k].append(_timed(fn))
        out["time"] = {k: min(v) for k, v in times.items()}  # min: the box may be shared
        out["how"] = "peak RSS growth" if dev.type == "cpu" else "cuda max_memory_allocated"
    print("LOSS_JSON " + json.dumps(out), flush=True)


def fused_loss_rate(device: str | torch.device = "cuda", shape: dict | None = None, reps: int = 3) -> dict:
    """The chunked (fused) PartialFC loss's rate on `device` at `shape` (default: LOSS_SHAPES
    "cuda" on CUDA, "quick" elsewhere; keys K, W, D, B: one simulated rank of W): samples/s of
    the global batch, TFLOP/s of its GEMMs, the same GEMMs alone (gemm_tflops) and their ratio,
    and the peak memory of one step (bytes above the set-up). For `make gpu-check`."""
    dev = torch.device(device)
    spec = shape or LOSS_SHAPES["cuda" if dev.type == "cuda" else "quick"]
    pfc, emb, labels, fwd_bwd = _loss_setup(spec, dev)
    fwd_bwd(64)
    n = int(pfc.sample_columns(labels, 0).limit.max())
    rows = pfc.chunk_rows(spec["B"], n)
    gemm = _bare_gemms(spec["B"], spec["D"], n, rows, dev)
    fwd_bwd(), gemm()  # warm-up at full size
    base, how = _peak_start(dev)
    t_loss, t_gemm = [], []
    for _ in range(reps):
        t_loss.append(_timed(fwd_bwd))
        t_gemm.append(_timed(gemm))
    peak = _peak_end(dev, base)
    flops = 6 * spec["B"] * spec["D"] * (n + labels.shape[1])
    t, tg = min(t_loss), min(t_gemm)
    return {"shape": dict(spec), "chunk_rows": rows, "dense_cols": n, "samples_per_s": spec["B"] / t,
            "tflops": flops / t / 1e12, "gemm_tflops": flops / tg / 1e12, "ratio_to_gemm": tg / t,
            "peak_mem": peak, "peak_how": how, "seconds": t}


def bench_throughput(quick: bool) -> list[dict]:
    from pipeline.core.dist import free_port
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
    return json.loads(line[len("BENCH_JSON "):])


# The chain from a plain DDP step to ours, one change per row (each row: this config vs the
# previous one): sharding (ZeRO-2 backbone + PartialFC sharded centers, still the full
# single-label softmax: rho = 1, loss unicom), then sampling (rho = 0.1), then the loss (MLCD's
# multi-label loss over 8 labels).
CHAIN = (("sharding", "ZeRO-2 + PartialFC rho 1, softmax", 1.0, "unicom"),
         ("sampling", "ZeRO-2 + PartialFC rho .1, softmax", 0.1, "unicom"),
         ("loss", "ZeRO-2 + PartialFC rho .1, MLCD 8 labels", 0.1, "mlcd"))


def _ddp_baseline(model_cfg, out_dim: int, K: int, images, labels):
    """A plain DDP step: the same backbone, a full data-parallel K-way linear classifier, CE."""
    import torch.nn.functional as F

    from training.model import build_model
    torch.manual_seed(0)
    base = torch.nn.Sequential(build_model(model_cfg), torch.nn.Linear(out_dim, K, bias=False))
    ddp = torch.nn.parallel.DistributedDataParallel(base)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3, weight_decay=0.2)

    def step():
        F.cross_entropy(ddp(images), labels[:, 0]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _throughput_worker(quick: bool) -> None:
    """Under torchrun: same model, same batch; the CHAIN's configs timed alternating."""
    import dataclasses

    from pipeline.core.config import RunConfig
    from pipeline.core.dist import init_distributed
    from training.config import DeepSpeedConfig, OptimConfig, TrainConfig
    from training.data import Batch, TrainDataConfig
    from training.loss import LossConfig
    from training.model import ModelConfig
    from training.partial_fc import PartialFCConfig
    from training.trainer import Trainer
    ctx = init_distributed()
    model_cfg = (ModelConfig(name="vit_tiny_rope2d", image_size=32, width=64, layers=2, heads=4, mlp_dim=128,
                             embed_dim=64) if quick else
                 ModelConfig(name="vit_tiny_rope2d", image_size=64, patch_size=8, width=192, layers=6,
                             heads=3, mlp_dim=768, embed_dim=128))
    K, B, reps = (20_000, 32, 4) if quick else (100_000, 32, 6)
    cfg = TrainConfig(model=model_cfg, loss=LossConfig(num_labels=8),
                      partial_fc=PartialFCConfig(num_classes=K, sample_rate=0.1),
                      optim=OptimConfig(warmup_steps=0), data=TrainDataConfig(batch_size=B),
                      deepspeed=DeepSpeedConfig(zero_stage=2, precision="fp32"))
    g = torch.Generator().manual_seed(ctx.rank)
    size = model_cfg.resolved().image_size
    images = torch.randn(B, 3, size, size, generator=g)
    labels = torch.randint(0, K, (B, 8), generator=g)
    trainer = Trainer(RunConfig(seed=0), cfg, ctx, num_classes=K)  # the stage's build, no files
    pfc = trainer.head("image").pfc  # type: ignore[attr-defined]  # the image head is a ClassHead

    def ours(rho, mode):
        pfc.cfg = dataclasses.replace(pfc.cfg, sample_rate=rho)
        pfc.loss_cfg = dataclasses.replace(cfg.loss, mode=mode)
        trainer.train_step([Batch(images, labels)])
        trainer.step += 1
    fns = {"ddp": _ddp_baseline(model_cfg, trainer.engine.module.out_dim, K, images, labels)}
    fns.update({name: (lambda rho=rho, mode=mode: ours(rho, mode)) for name, _, rho, mode in CHAIN})
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):  # alternating: load from other processes hits every config alike
        for k, fn in fns.items():
            times[k].append(_timed(fn))
    if ctx.is_main:
        gb = B * ctx.world_size
        t = {k: statistics.median(v) for k, v in times.items()}
        shape = f"w{model_cfg.resolved().width}x{model_cfg.resolved().layers}@{size}px K={K:,} global B={gb}"
        prev, prev_name, rows = "ddp", "DDP + full data-parallel softmax", []
        for name, label, _, _ in CHAIN:
            rows.append({"bench": f"samples/s, 2 ranks, change {name}: {label} (ours) vs {prev_name} (ref)",
                         "config": shape, "ours": gb / t[name], "reference": gb / t[prev], "unit": "samples/s",
                         "ratio": t[prev] / t[name],
                         "note": f"synthetic batches, compute only; median of {reps}, alternating"})
            prev, prev_name = name, label
        print("BENCH_JSON " + json.dumps(rows), flush=True)


def run_bench(quick: bool) -> list[dict]:
    from training.bench_data import bench_loader
    rows = bench_memory(quick) + bench_rho(quick) + bench_loss_chunks(quick)
    step = bench_throughput(quick)
    return rows + step + bench_loader(quick, step[-1]["ours"], step[-1]["config"])  # ours: the MLCD step


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "loss":
        _loss_worker(json.loads(sys.argv[2]))
    else:
        _throughput_worker(quick=len(sys.argv) > 1 and sys.argv[1] == "quick")
