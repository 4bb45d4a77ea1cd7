"""`make bench-gpu`: per-GPU throughput of every stage at production shapes, in one table.

    python -m launch.bench_gpu                 # on a CUDA machine (one GPU is enough)
    python -m launch.bench_gpu --dry-run       # (or DRY_RUN=1) the plan: what runs, at which sizes
    python -m launch.bench_gpu --tiny          # every benchmark at toy sizes on any device (tests)

Rows: the card's bf16 matmul rate (the MFU denominator, measured, beside the datasheet peak);
embed = open_clip ViT-L/14-224 image tower under fp16 autocast, img/s per GPU (random init runs
at the speed of the released weights; clip-retrieval: 312/s per A100); kmeans = one Lloyd
iteration at K = 1M, D = 768 with our blocked GEMM (clustering.topk.nearest + index_add, as
clustering.kmeans method=torch), s per 1M rows, extrapolated to the production sample;
assign = clustering.topk.TopK exact top-8 of K = 1M, rows/s; train = ViT-L/14-224 bf16
fwd+bwd+AdamW with a PartialFC (K = 1M, rho = 0.1, MLCD loss) on one GPU, samples/s and MFU.
Paste the table into docs/SCALING.md ("Measured per-GPU rates") and README.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from launch.bench import print_table
from launch.cost_model import SOURCES

DATASHEET_BF16 = {"H100": SOURCES["h100_bf16"][0], "H200": SOURCES["h100_bf16"][0],
                  "A100": SOURCES["a100_bf16"][0]}

# name -> (production sizes, tiny sizes); printed by --dry-run, used by the runs below.
PLAN = {
    "matmul": ({"n": 8192, "dtype": "bf16"}, {"n": 128, "dtype": "fp32"}),
    "embed": ({"model": "ViT-L-14", "batch": 256, "iters": 20}, {"model": "ViT-S-32", "batch": 2, "iters": 2}),
    "kmeans": ({"k": 1_000_000, "d": 768, "rows": 2_000_000, "block_rows": 4096},
               {"k": 256, "d": 32, "rows": 2048, "block_rows": 512}),
    "assign": ({"k": 1_000_000, "d": 768, "rows": 500_000, "l": 8, "block_rows": 4096},
               {"k": 256, "d": 32, "rows": 2048, "l": 8, "block_rows": 512}),
    "train": ({"model": "vit_l14_336", "image_size": 224, "batch": 128, "k": 1_000_000, "iters": 10},
              {"model": "vit_tiny_rope2d", "image_size": 48, "batch": 4, "k": 512, "iters": 2}),
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _per_iter(fn, dev: torch.device, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / iters


def bench_matmul(dev, p) -> dict:
    dtype = torch.bfloat16 if p["dtype"] == "bf16" else torch.float32
    a = torch.randn(p["n"], p["n"], device=dev, dtype=dtype)
    dt = _per_iter(lambda: a @ a, dev, 10)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    tf = 2 * p["n"] ** 3 / dt / 1e12
    return {"bench": "matmul", "setting": f"{p['n']}^3 {p['dtype']}", "metric": "TFLOP/s", "value": tf,
            "ref": f"datasheet {sheet / 1e12:.0f}" if sheet else "", "_peak": tf}


def bench_embed(dev, p, peak: float) -> dict:
    from launch.cost_model import model
    from pipeline.encoders import EncoderConfig, build_encoder
    enc = build_encoder(EncoderConfig(kind="open_clip", model=p["model"], pretrained=None), dev)
    x = torch.randn(p["batch"], 3, enc.image_size, enc.image_size, device=dev)
    with torch.no_grad():
        dt = _per_iter(lambda: enc.encode_images(x), dev, p["iters"], warmup=1)
    rate = p["batch"] / dt
    mfu = rate * model("vit_l14_224").fwd_flops() / (peak * 1e12) if p["model"] == "ViT-L-14" else None
    return {"bench": "embed", "setting": f"{p['model']} fp16 batch {p['batch']}", "metric": "img/s/GPU",
            "value": rate, "MFU": mfu, "ref": "312/s A100 (clip-retrieval); >= 2,000/s H100 target"}


def bench_kmeans(dev, p) -> dict:
    from clustering.topk import nearest
    g = torch.Generator(device="cpu").manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(p["k"], p["d"], generator=g), dim=1).to(dev)
    x = torch.nn.functional.normalize(torch.randn(p["rows"], p["d"], generator=g), dim=1).to(dev)
    ct = c.T.contiguous()

    def lloyd():  # the body of clustering.kmeans.train_torch's iteration, minus the all-reduce
        i, _ = nearest(x, ct, p["block_rows"])
        sums = torch.zeros_like(c).index_add_(0, i, x)
        counts = torch.bincount(i, minlength=p["k"])
        return sums, counts
    dt = _per_iter(lloyd, dev, 1, warmup=1)
    per_m = dt * 1e6 / p["rows"]
    return {"bench": "kmeans", "setting": f"K={p['k']} D={p['d']} fp32, {p['rows']} rows",
            "metric": "s/iter per 1M rows", "value": per_m,
            "ref": f"100M sample on 32 GPUs: {per_m * 100 / 32:.3g} s/iter (paper: ~10 min total)"}


def bench_assign(dev, p) -> dict:
    from clustering.topk import TopK
    rng = np.random.default_rng(0)
    c = rng.standard_normal((p["k"], p["d"]), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = rng.standard_normal((p["rows"], p["d"]), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    top = TopK(c, p["l"], engine="torch", device=dev, block_rows=p["block_rows"])
    dt = _per_iter(lambda: top.search(x), dev, 1, warmup=1)
    rate = p["rows"] / dt
    return {"bench": "assign", "setting": f"top-{p['l']} of K={p['k']} D={p['d']} fp32", "metric": "rows/s/GPU",
            "value": rate, "ref": f"LAION-400M on 32 GPUs: {400e6 / rate / 32 / 60:.3g} min"}


def bench_train(dev, p, peak: float) -> dict:
    from training.bench_model import vit_train_flops
    from training.loss import LossConfig
    from training.model import ModelConfig, build_model
    from training.partial_fc import PartialFC, PartialFCConfig
    cfg = ModelConfig(name=p["model"], image_size=p["image_size"])
    model = build_model(cfg).to(dev).train()
    pfc = PartialFC(p["k"], model.out_dim, PartialFCConfig(sample_rate=0.1), LossConfig()).to(dev)
    opt = torch.optim.AdamW([*model.parameters(), *pfc.parameters()], lr=1e-4)
    x = torch.randn(p["batch"], 3, p["image_size"], p["image_size"], device=dev)
    labels = torch.randint(0, p["k"], (p["batch"], 8), device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    step = [0]

    def one():
        with amp:
            loss, _ = pfc(model(x), labels, step[0])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step[0] += 1
    dt = _per_iter(one, dev, p["iters"], warmup=2)
    rate = p["batch"] / dt
    mfu = rate * vit_train_flops(cfg, p["image_size"]) / (peak * 1e12)
    return {"bench": "train", "setting": f"{p['model']}@{p['image_size']} bf16 b{p['batch']} + PartialFC K={p['k']}",
            "metric": "samples/s/GPU", "value": rate, "MFU": mfu, "ref": "MFU >= 50% (target)"}


def run(only: list[str], tiny: bool, dev: torch.device) -> list[dict]:
    sizes = {k: v[1] if tiny else v[0] for k, v in PLAN.items()}
    rows = [bench_matmul(dev, sizes["matmul"])]
    peak = rows[0].pop("_peak")
    for name in only:
        t0 = time.perf_counter()
        if name == "embed":
            row = bench_embed(dev, sizes[name], peak)
        elif name == "train":
            row = bench_train(dev, sizes[name], peak)
        else:
            row = {"kmeans": bench_kmeans, "assign": bench_assign}[name](dev, sizes[name])
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        print(f"bench-gpu: {name} done in {row['wall_s']:.1f} s", file=sys.stderr, flush=True)
    for r in rows:
        r.setdefault("MFU", None)
        r["MFU"] = "" if r["MFU"] is None else f"{100 * r['MFU']:.1f}%"
    return rows


def cli(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="launch.bench_gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="embed,kmeans,assign,train")
    ap.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN") == "1")
    ap.add_argument("--tiny", action="store_true", help="toy sizes on any device (CI)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = [s for s in only if s not in PLAN or s == "matmul"]
    if unknown:
        print(f"bench-gpu: unknown benchmark(s) {unknown}; known: embed, kmeans, assign, train", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    if args.dry_run:
        print(f"bench-gpu plan ({'CUDA: ' + torch.cuda.get_device_name() if cuda else 'no CUDA here'}; "
              f"{'tiny' if args.tiny else 'production'} sizes):")
        for name in ["matmul", *only]:
            print(f"  {name}: {json.dumps(PLAN[name][1 if args.tiny else 0])}")
        print(f"  command: {sys.executable} -m launch.bench_gpu --only {','.join(only)}"
              f"{' --tiny' if args.tiny else ''}")
        return 0
    if not cuda and not args.tiny:
        print("bench-gpu: needs a CUDA GPU (use --dry-run to see the plan, --tiny for toy sizes on CPU)",
              file=sys.stderr)
        return 2
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    rows = run(only, args.tiny, dev)
    print_table(f"bench-gpu on {torch.cuda.get_device_name(dev) if cuda else 'cpu'}"
                f"{' (tiny sizes: not a measurement)' if args.tiny else ''}", rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
