"""`make gpu-check OUT=dir`: the GPU path of every stage, proven in one unattended command.

    python -m launch.gpu_check --out DIR            # on a CUDA machine (every visible GPU)
    DRY_RUN=1 python -m launch.gpu_check            # the plan: items, sizes, time limits
    GPU_CHECK_ON_CPU=1 python -m launch.gpu_check --out DIR   # rehearsal: same item code on CPU,
                                                    # gloo, tiny sizes (proves the logic, not speed)

Part 1, correctness, on small real shards (the demo images from `make gpu-bundle`), each stage
under torchrun with NCCL on every GPU: DistContext collectives with CPU and GPU tensors, embed
(open_clip ViT-B-32, random init, fp16), k-means with faiss on GPU (SKIP where no faiss GPU build
imports) and with the torch method, assign on GPU, train 4 steps with ZeRO-2 and with ZeRO-3 in
bf16 with activation checkpointing and PartialFC, export + reload with transformers, eval.
Part 2, per-GPU rates at production shapes on synthetic data (1 rank): embed img/s (ViT-L/14),
assign rows/s and k-means s/iteration at K = 1M, D = 768, train samples/s and MFU (ViT-B/32 and
ViT-L/14 with PartialFC at K = 1M), the train loader (CPU decode per core, GPU decode) and the
PartialFC loss alone (chunked without recompute vs unchunked). Rate items report samples/s, MFU
against the measured matmul of their precision and peak memory; the end-to-end train items the
share of step time spent waiting for data. Per-item seconds for every item.

Every item runs in its own process group with its own time limit (a hang costs its limit, not
the run), prints PASS / FAIL / SKIP and never stops the others; an item whose inputs failed is
skipped. A global budget (--budget-s, 540 s by default; the item limits sum to it) bounds the
whole run: an item gets at most what is left, and one that cannot get its minimum is skipped.
When a previous run in the same --out folder passed every correctness item on the same commit,
the rate items run first (ONLY=a,b runs a subset). Results: DIR/gpu_check.json,
DIR/gpu_check.md (one table) and DIR/gpu_check.log (every item's output).

On an offline box with only python3 + torch, the wheels in .gpu_bundle/wheels (deepspeed built
with no ops, open_clip, webdataset, ...) are installed into /tmp/site first (item `bundle`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = Path(os.environ.get("GPU_CHECK_BUNDLE", ROOT / ".gpu_bundle"))
SITE = Path(os.environ.get("GPU_CHECK_SITE", "/tmp/site"))  # where the bundle's wheels are installed
CONFIG = ROOT / "configs" / "gpu_check.yaml"


@dataclass
class Item:
    name: str
    what: str
    timeout_s: int
    launch: str = "torchrun"   # torchrun (every GPU) | torchrun1 (one rank) | python
    needs: list[str] = field(default_factory=list)
    min_s: int = 20            # skipped when less than this is left of the budget


# Limits are the GPU ones (x3 for the CPU rehearsal) and sum to <= 540 s: one H200 runs every
# item, bundle install included, inside 9 minutes (the 2026-11-28 run took 10-32 s per item).
ITEMS = [
    Item("bundle", "install .gpu_bundle/wheels into /tmp/site when deepspeed/open_clip are missing", 50,
         "python", min_s=5),
    Item("env", "versions, GPUs, which faiss imports (GPUs it sees), bf16 and fp32 matmul TFLOP/s", 25, "python"),
    Item("collectives", "every DistContext collective with CPU and device tensors", 20, min_s=10),
    Item("data", "demo shards + probe sets (from make gpu-bundle)", 10, "python", min_s=5),
    Item("embed", "embed: open_clip ViT-B-32 random init, fp16 -> store", 35, needs=["data"]),
    Item("kmeans_faiss", "k-means method=faiss on GPU", 20, needs=["embed"], min_s=10),
    Item("kmeans_torch", "k-means method=torch on the device", 20, needs=["embed"], min_s=10),
    Item("assign", "top-8 assign on the device", 20, needs=["kmeans_torch"], min_s=10),
    Item("train_zero2", "train 4 steps ZeRO-2 bf16 + activation ckpt + PartialFC (+ data-wait share)", 40,
         needs=["assign"]),
    Item("train_zero3", "train 4 steps ZeRO-3 bf16 + activation ckpt + PartialFC (+ data-wait share)", 40,
         needs=["assign"]),
    Item("export", "export to HF, reload with transformers on the device", 25, "python"),
    Item("eval", "linear probe + k-NN of the export and random init", 40, needs=["export"]),
    Item("rate_embed", "embed img/s, open_clip ViT-L-14 at 224, fp16, random init", 30, "python"),
    Item("rate_assign", "assign rows/s, exact top-8 of K=1M, D=768", 25, "python"),
    Item("rate_train_b32", "train samples/s + MFU, ViT-B/32 bf16 ZeRO-2 + PartialFC K=1M", 30, "torchrun1"),
    Item("rate_train_l14", "train samples/s + MFU, ViT-L/14-224 bf16 ZeRO-2 + PartialFC K=1M", 40,
         "torchrun1"),
    Item("rate_kmeans", "k-means s/iteration, torch method, K=1M, D=768, 262,144 points", 30,
         "torchrun1", min_s=25),
    Item("rate_loader", "train loader img/s: CPU decode per core, GPU decode (decode_jpeg on the device), "
         "pixel difference GPU vs CPU", 20, "python"),
    Item("rate_fused_loss", "PartialFC loss fwd+bwd at K=1M share, chunked (no recompute) vs unchunked: "
         "samples/s, TFLOP/s, peak memory", 20, "python"),
]
CORRECTNESS = ("collectives", "embed", "kmeans_torch", "assign", "train_zero2", "train_zero3", "export", "eval")
BY_NAME = {it.name: it for it in ITEMS}

# Rate sizes: (GPU, CPU rehearsal). The CPU ones only exercise the code.
SIZES = {
    "rate_embed": ({"model": "ViT-L-14", "batch": 256, "iters": 10}, {"model": "ViT-B-32", "batch": 2, "iters": 1}),
    "rate_assign": ({"k": 1_000_000, "d": 768, "rows": 65_536, "l": 8, "block_rows": 4096},
                    {"k": 512, "d": 32, "rows": 1024, "l": 8, "block_rows": 256}),
    "rate_kmeans": ({"k": 1_000_000, "d": 768, "rows": 262_144, "block_rows": 4096, "niter": 1},
                    {"k": 256, "d": 32, "rows": 2048, "block_rows": 512, "niter": 1}),
    "rate_train_b32": ({"model": "vit_b32_224", "image_size": 224, "batch": 256, "k": 1_000_000, "iters": 5},
                       {"model": "vit_tiny_rope2d", "image_size": 48, "batch": 4, "k": 512, "iters": 1}),
    "rate_train_l14": ({"model": "vit_l14_336", "image_size": 224, "batch": 128, "k": 1_000_000, "iters": 4},
                       {"model": "vit_tiny_clip", "image_size": 48, "batch": 4, "k": 512, "iters": 1}),
    "rate_loader": ({"images": 512}, {"images": 64}),
    # one rank of K = 1M over W ranks scoring the global batch (None: bench_train's CUDA shape,
    # W = 8, D = 512, B = 32,768)
    "rate_fused_loss": ({"shape": None}, {"shape": {"K": 65_536, "W": 4, "D": 64, "B": 1024}}),
}
# The end-to-end items on CPU: tiny models, fp32 (the stages' CPU precision), no worker processes.
CPU_OVERRIDES = [
    "embed.encoder.precision=fp32", "embed.encoder.image_size=64", "embed.workers=0",
    "train.model.name=vit_tiny_rope2d", "train.model.image_size=48", "train.model.patch_size=8",
    "train.model.width=64", "train.model.layers=2", "train.model.heads=4", "train.model.mlp_dim=128",
    "train.model.embed_dim=32", "train.deepspeed.precision=fp32", "train.data.workers=0",
    "train.data.pin_memory=false", "eval.workers=0",
]


def on_cpu() -> bool:
    return os.environ.get("GPU_CHECK_ON_CPU") == "1"


def limit_of(it: Item) -> int:
    """An item's time limit: the GPU one, x3 for the CPU rehearsal (a shared 2-core box runs the
    small end-to-end models at CPU speed, and DeepSpeed may JIT-build its CPU comm op there)."""
    return it.timeout_s * (3 if on_cpu() else 1)


# ================================================================ items (run in the child)

class Skip(Exception):
    pass


def _peak_mem(res: dict) -> None:
    import torch
    if torch.cuda.is_available() and not on_cpu():
        res["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        import resource
        res["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def _sync() -> None:
    import torch
    if torch.cuda.is_available() and not on_cpu():
        torch.cuda.synchronize()


def _device():
    import torch
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if (
        torch.cuda.is_available() and not on_cpu()) else torch.device("cpu")


def _timed(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync()
    return (time.perf_counter() - t0) / iters


def _stage_args(work: Path) -> tuple[str, list[str]]:
    return str(CONFIG), [f"run.out_dir={work / 'run'}", *(CPU_OVERRIDES if on_cpu() else [])]


def _stage(name: str, work: Path, extra: list[str]):
    import importlib

    from pipeline.core.stages import module_of
    config, ov = _stage_args(work)
    return importlib.import_module(module_of(name)).main(config, ov + extra)


def _read(work: Path, name: str) -> dict:
    p = work / "items" / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def item_env(work: Path) -> dict:
    import torch
    res = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpus": torch.cuda.device_count() if not on_cpu() else 0}
    for mod in ("deepspeed", "open_clip", "transformers", "webdataset"):
        try:
            res[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - reported, not fatal here
            res[mod] = f"not importable: {type(e).__name__}: {e}"
    try:
        import faiss
        res["faiss"] = f"{faiss.__version__} from {Path(faiss.__file__).parent}"
        res["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except Exception as e:  # noqa: BLE001
        res["faiss"], res["faiss_gpus"] = f"not importable: {type(e).__name__}", 0
    dev = _device()
    n = 8192 if dev.type == "cuda" else 256
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    dt = _timed(lambda: a @ a, 10, 3)
    res["matmul_tflops"] = float(f"{2 * n ** 3 / dt / 1e12:.4g}")
    a = a.float()  # the fp32 GEMM k-means and assign run (their MFU is measured against it)
    dt = _timed(lambda: a @ a, 5, 2)
    res["matmul_tflops_fp32"] = float(f"{2 * n ** 3 / dt / 1e12:.4g}")
    res["device_name"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    res["value"], res["unit"] = res["matmul_tflops"], f"TFLOP/s ({n}^3 {str(dtype)[6:]} matmul)"
    missing = [m for m in ("deepspeed", "open_clip", "webdataset") if str(res[m]).startswith("not")]
    if missing:
        res.update(status="FAIL", reason=f"not importable: {missing} (run `make gpu-bundle`, carry .gpu_bundle)")
    return res


def item_collectives(work: Path) -> dict:
    import torch

    from pipeline.core.dist import destroy, init_distributed
    ctx = init_distributed()
    try:
        r, w = ctx.rank, ctx.world_size
        checked = 0
        for dev in sorted({"cpu", str(ctx.device)}):
            def eq(got, want, what):
                nonlocal checked
                if got != want:
                    raise AssertionError(f"{what} on {dev}: got {got}, want {want}")
                checked += 1
            t = torch.tensor([r + 1.0, -r], device=dev)
            ctx.all_reduce_(t)
            eq(t.tolist(), [w * (w + 1) / 2, -w * (w - 1) / 2], "all_reduce sum")
            eq(t.device.type, torch.device(dev).type, "result stays on the caller's device")
            eq(ctx.all_reduce_(torch.tensor([r], device=dev), "max").tolist(), [w - 1], "all_reduce max")
            eq(ctx.all_reduce_(torch.tensor([2**40 + r], device=dev)).tolist(),
               [w * 2**40 + w * (w - 1) // 2], "all_reduce int64")
            eq(ctx.all_reduce_(torch.tensor([1.0], device=dev), "avg").tolist(), [1.0], "all_reduce avg")
            g = ctx.all_gather(torch.full((2, 3), float(r), device=dev))
            eq(g[::2, 0].tolist(), [float(i) for i in range(w)], "all_gather")
            rs = ctx.reduce_scatter(torch.arange(2.0 * w, device=dev))
            eq(rs.tolist(), [w * (2.0 * r), w * (2.0 * r + 1)], "reduce_scatter")
            eq(ctx.broadcast_(torch.tensor([10.0 * r], device=dev), src=w - 1).tolist(), [10.0 * (w - 1)],
               "broadcast")
        ctx.barrier()
        eq(ctx.all_gather_object(r), list(range(w)), "all_gather_object")
        eq(ctx.broadcast_object("x" if r == 0 else None), "x", "broadcast_object")
        return {"backend": ctx.backend, "world_size": w, "checks": checked, "value": checked, "unit": "checks"}
    finally:
        destroy(ctx)


def item_data(work: Path) -> dict:
    src = BUNDLE / "run" / "data"
    dst = work / "run" / "data"
    if not (src / "train" / "00000.tar").is_file():
        from pipeline.demo import demo_data  # needs the Debian image packages (make apt)
        config, ov = _stage_args(work)
        demo_data.main(config, ov)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to(src.resolve(), target_is_directory=True)
    shards = sorted((dst / "train").glob("*.tar"))
    probes = sorted(p.parent.name for p in (dst / "probe").glob("*/test"))
    if not shards or not probes:
        raise RuntimeError(f"no shards or probe sets under {dst}")
    return {"shards": len(shards), "probes": probes, "source": str(src if src.is_dir() else dst),
            "value": len(shards), "unit": "shards"}


def item_embed(work: Path) -> dict:
    _stage("embed", work, [])
    rows = json.loads((work / "run/store/manifest.json").read_text())["num_rows"]
    if not rows:
        raise RuntimeError("embed wrote no rows")
    return {"value": rows, "unit": "rows"}


def item_kmeans_faiss(work: Path) -> dict:
    try:
        import faiss
    except ImportError as e:
        raise Skip(f"faiss GPU: not installable here (no faiss importable: {e})") from None
    if on_cpu() or not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        raise Skip(f"faiss GPU: this faiss ({Path(faiss.__file__).parent}) sees no GPU")
    r = _stage("cluster", work, ["cluster.method=faiss", f"cluster.out_dir={work / 'run/clusters_faiss'}"])
    return {"objective_final": r.get("objective_final"), "value": r.get("mean_similarity"), "unit": "mean sim"}


def item_kmeans_torch(work: Path) -> dict:
    r = _stage("cluster", work, ["cluster.method=torch"])
    return {"objective_final": r.get("objective_final"), "value": r.get("mean_similarity"), "unit": "mean sim"}


def item_assign(work: Path) -> dict:
    _stage("assign", work, [])
    import numpy as np
    labels = [np.load(p) for p in sorted((work / "run/clusters/labels").glob("labels_*.npy"))]
    n = sum(len(x) for x in labels)
    if not n or not all(((x >= -1) & (x < 32)).all() for x in labels):
        raise RuntimeError("assign wrote no labels or labels out of range")
    return {"value": n, "unit": "rows labelled"}


def _train(work: Path, zero: int) -> dict:
    import math
    r = _stage("train", work, [f"train.deepspeed.zero_stage={zero}", f"train.out_dir={work / f'run/train_z{zero}'}"])
    last = r.get("last", {})
    if r.get("step") != 4 or not math.isfinite(last.get("loss", float("nan"))):
        raise RuntimeError(f"training ended at step {r.get('step')} with loss {last.get('loss')}")
    res = {"loss": last.get("loss"), "value": last.get("samples_per_s"), "unit": "samples/s (tiny run)"}
    for key in ("data/wait_share", "data_wait_share"):  # the share of step time spent waiting for data
        if key in last:
            res["data_wait_share"] = round(float(last[key]), 3)
    return res


def item_train_zero2(work: Path) -> dict:
    return _train(work, 2)


def item_train_zero3(work: Path) -> dict:
    return _train(work, 3)


def item_export(work: Path) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    from training import export
    src = next((work / f"run/train_z{z}" for z in (3, 2) if _read(work, f"train_zero{z}").get("status") == "PASS"),
               None)
    if src is None:
        raise Skip("needs train_zero3 or train_zero2")
    out = work / "run" / "export"
    export.export(src, out)
    dev = _device()
    model = AutoModel.from_pretrained(out).to(dev).eval()
    proc = AutoProcessor.from_pretrained(out)
    x = proc(images=[Image.new("RGB", (80, 60), c) for c in ("white", "red")], return_tensors="pt")
    with torch.no_grad():
        y = model(pixel_values=x["pixel_values"].to(dev)).pooler_output
    if not torch.isfinite(y).all() or torch.allclose(y[0], y[1]):
        raise RuntimeError("reloaded model gives non-finite or input-independent features")
    return {"from": src.name, "class": type(model).__name__, "value": list(y.shape)[1], "unit": "feature dim"}


def item_eval(work: Path) -> dict:
    _stage("eval", work, [])
    res = json.loads((work / "run/eval/results.json").read_text())
    return {"value": None, "unit": "", "results": json.dumps(res)[:400]}


def item_rate_embed(work: Path, p: dict) -> dict:
    import torch

    from launch.cost_model import model as cost_model
    from pipeline.encoders import EncoderConfig, build_encoder
    dev = _device()
    enc = build_encoder(EncoderConfig(kind="open_clip", model=p["model"], pretrained=None,
                                      precision="fp16" if dev.type == "cuda" else "fp32"), dev)
    x = torch.randn(p["batch"], 3, enc.image_size, enc.image_size, device=dev)
    dt = _timed(lambda: enc.encode_images(x), p["iters"], 2)
    rate = p["batch"] / dt
    res = {"value": round(rate, 1), "unit": "img/s/GPU", "setting": f"{p['model']} {'fp16' if dev.type == 'cuda' else 'fp32'} batch {p['batch']}"}
    if p["model"] == "ViT-L-14":
        res["mfu"] = _mfu(work, rate * cost_model("vit_l14_224").fwd_flops())
    return res


def item_rate_assign(work: Path, p: dict) -> dict:
    import torch

    from clustering.topk import TopK
    dev = _device()
    g = torch.Generator(device=dev).manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(p["k"], p["d"], device=dev, generator=g), dim=1)
    x = torch.nn.functional.normalize(torch.randn(p["rows"], p["d"], device=dev, generator=g), dim=1)
    c, x = c.cpu().numpy(), x.cpu().numpy()  # the stage's inputs: numpy parts read from the store
    top = TopK(c, p["l"], engine="torch", device=dev, block_rows=p["block_rows"])
    del c
    dt = _timed(lambda: top.search(x), 1, 1)
    rate = p["rows"] / dt
    return {"value": round(rate), "unit": "rows/s/GPU", "setting": f"top-{p['l']} of K={p['k']} D={p['d']} fp32",
            "laion400m_gpu_hours": round(400e6 / rate / 3600, 1),
            "mfu": _mfu(work, rate * 2.0 * p["k"] * p["d"], fp32=True)}


def item_rate_kmeans(work: Path, p: dict) -> dict:
    import torch

    from clustering.kmeans import Checkpoint, train_torch
    from pipeline.core.dist import destroy, init_distributed
    ctx = init_distributed()
    try:
        dev = ctx.device if not on_cpu() else torch.device("cpu")
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.nn.functional.normalize(torch.randn(p["rows"], p["d"], device=dev, generator=g), dim=1)
        init = x[torch.randperm(p["rows"], device=dev, generator=g)[:p["k"]]].clone()
        ckpt = Checkpoint(work / "kmeans_rate_ckpt", "rate", enabled=False)
        _sync()
        t0 = time.perf_counter()
        _, hist = train_torch(x, init, p["niter"], ckpt, 10**9, ctx, p["block_rows"])
        _sync()
        per_it = (time.perf_counter() - t0) / p["niter"]
    finally:
        destroy(ctx)
    flops = 2.0 * p["rows"] * p["k"] * p["d"]
    return {"value": float(f"{per_it:.4g}"), "unit": "s/iteration", "tflops_fp32": round(flops / per_it / 1e12, 1),
            "rows_per_s": round(p["rows"] / per_it), "mfu": _mfu(work, flops / per_it, fp32=True),
            "setting": f"K={p['k']} D={p['d']} N={p['rows']} fp32, block_rows {p['block_rows']}",
            "s_per_iter_100M_sample_on_32_gpus": round(per_it * 100e6 / p["rows"] / 32, 1)}


def _mfu(work: Path, flops_per_s: float, fp32: bool = False) -> dict:
    """Achieved FLOP/s against the datasheet peak and against the `env` item's measured matmul of
    the same precision (bf16 for the models, fp32 for the k-means/assign GEMMs)."""
    from training.trainer import DATASHEET_BF16_TFLOPS  # the one table (the trainer's MFU uses it too)
    env = _read(work, "env")
    name = env.get("device_name", "")
    tflops = None if fp32 else next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    sheet = tflops * 1e12 if tflops else None
    out = {}
    if sheet:
        out["vs_datasheet_bf16"] = round(flops_per_s / sheet, 3)
    measured = env.get("matmul_tflops_fp32" if fp32 else "matmul_tflops")
    if measured:
        out["vs_measured_matmul"] = round(flops_per_s / (measured * 1e12), 3)
    return out


def _rate_train(work: Path, p: dict) -> dict:
    import deepspeed
    import torch

    from pipeline.core.dist import init_distributed
    from training.bench_model import vit_train_flops
    from training.loss import LossConfig
    from training.model import ModelConfig, build_model
    from training.partial_fc import PartialFC, PartialFCConfig, make_optimizer
    ctx = init_distributed()
    gpu = ctx.device.type == "cuda"
    cfg = ModelConfig(name=p["model"], image_size=p["image_size"])
    model = build_model(cfg)
    ds = {"train_micro_batch_size_per_gpu": p["batch"], "gradient_accumulation_steps": 1,
          "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}, "bf16": {"enabled": gpu},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    # torch's AdamW, not DeepSpeed's FusedAdam: no op is ever JIT-compiled
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                      config=ds, dist_init_required=False)
    # one GPU: the class centers are all local (no group); the rate is per GPU
    pfc = PartialFC(p["k"], model.out_dim, PartialFCConfig(sample_rate=0.1), LossConfig()).to(engine.device)
    pfc_opt = make_optimizer(pfc, pfc.cfg, 1e-4, 0.0)
    dtype = torch.bfloat16 if gpu else torch.float32
    x = torch.randn(p["batch"], 3, p["image_size"], p["image_size"], device=engine.device, dtype=dtype)
    labels = torch.randint(0, p["k"], (p["batch"], 8), device=engine.device)
    step = [0]

    def one():
        loss, _ = pfc(engine(x), labels, step[0])
        engine.backward(loss)
        engine.step()
        pfc_opt.step()
        pfc_opt.zero_grad(set_to_none=True)
        step[0] += 1
    dt = _timed(one, p["iters"], 2)
    rate = p["batch"] / dt
    return {"value": round(rate, 1), "unit": "samples/s/GPU",
            "setting": f"{p['model']}@{p['image_size']} {'bf16' if gpu else 'fp32'} batch {p['batch']} ZeRO-2 + "
                       f"PartialFC K={p['k']} rho 0.1",
            "mfu": _mfu(work, rate * vit_train_flops(cfg, p["image_size"]))}


def item_rate_train_b32(work: Path, p: dict) -> dict:
    return _rate_train(work, p)


def item_rate_train_l14(work: Path, p: dict) -> dict:
    return _rate_train(work, p)


def item_rate_loader(work: Path, p: dict) -> dict:
    """The train loader's decode on its own synthetic JPEG shards (training/bench_data.py):
    CPU decode in one thread (= per core), and on a GPU batched decode_jpeg on the device, with
    the GPU path's pixel difference from the CPU path."""
    import torch

    from training.bench_data import loader_rate
    torch.set_num_threads(1)  # per core: the loader's workers each run one thread
    cpu = loader_rate("cpu", "cpu", p["images"])
    res = {"value": round(cpu["images_per_s"], 1), "unit": "img/s per core (CPU decode)", "cpu": cpu}
    dev = _device()
    if dev.type == "cuda":
        gpu = loader_rate("gpu", str(dev), p["images"])
        res.update(gpu=gpu, gpu_images_per_s=round(gpu["images_per_s"], 1),
                   setting=f"GPU decode {gpu['images_per_s']:.0f} img/s, max |pixel diff| vs CPU "
                           f"{gpu.get('pixel_max_abs_diff_vs_cpu', '?')} levels")
    else:
        res["setting"] = "GPU decode: no CUDA device (CPU rehearsal)"
    return res


def item_rate_fused_loss(work: Path, p: dict) -> dict:
    """The PartialFC loss alone (training/bench_train.py:fused_loss_rate): one simulated rank of a
    global batch at K = 1M (default shape on CUDA: W = 8, D = 512, B = 32,768), chunked without
    recompute; samples/s, TFLOP/s, its ratio to the same GEMMs alone, peak memory."""
    from training.bench_train import fused_loss_rate
    r = fused_loss_rate(_device(), p.get("shape"))
    return {"value": round(r["samples_per_s"]), "unit": "samples/s (loss fwd+bwd)", **r,
            "setting": f"{r['shape']} chunk {r['chunk_rows']} rows; {r['ratio_to_gemm']:.2f} of its GEMMs' rate",
            "mfu": _mfu(work, r["tflops"] * 1e12, fp32=True)}


def previous_correctness(out: Path, commit: str | None) -> bool:
    """Did a run on this commit already pass every correctness item (then rate items go first)?"""
    try:
        prev = json.loads((out / "gpu_check.json").read_text())
    except (OSError, ValueError):
        return False
    done = {r["name"]: r["status"] for r in prev.get("items", [])}
    return bool(commit) and prev.get("commit") == commit and all(done.get(n) == "PASS" for n in CORRECTNESS)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def ordered(items: list[Item], rates_first: bool) -> list[Item]:
    """Plan order; with rates_first the rate items run right after env (correctness already
    passed on this commit), then the rest."""
    if not rates_first:
        return items
    head = [it for it in items if it.name in ("bundle", "env", "data")]
    rates = [it for it in items if it.name.startswith("rate_")]
    return head + rates + [it for it in items if it not in head and it not in rates]


def run_item(name: str, work: Path) -> int:
    """The child: runs one item on every rank; rank 0 writes work/items/<name>.json."""
    rank = int(os.environ.get("RANK", 0))
    fn = globals()[f"item_{name}"]
    t0 = time.perf_counter()
    res: dict = {"name": name}
    try:
        out = fn(work, SIZES[name][1 if on_cpu() else 0]) if name in SIZES else fn(work)
        res.update({"status": "PASS", **out})
    except Skip as e:
        res.update(status="SKIP", reason=str(e))
    except BaseException as e:  # noqa: BLE001 - the item's failure is its result
        traceback.print_exc()
        res.update(status="FAIL", reason=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}")
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    try:
        _peak_mem(res)
    except Exception:  # noqa: BLE001
        pass
    if rank == 0:
        (work / "items").mkdir(parents=True, exist_ok=True)
        tmp = work / "items" / f".{name}.json.tmp"
        tmp.write_text(json.dumps(res, default=str))
        os.replace(tmp, work / "items" / f"{name}.json")
    # the verdict is written; now tear down any process group an item left (a stage's main may
    # not destroy its own), so an NCCL communicator is not destructed at interpreter exit
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0 if res["status"] != "FAIL" else 1


# ================================================================ the orchestrator (parent)

def _nproc(launch: str) -> int:
    if launch != "torchrun" or on_cpu():
        return 1
    import torch
    return max(1, torch.cuda.device_count())


def command(it: Item, work: Path) -> list[str]:
    args = ["-m", "launch.gpu_check", "--item", it.name, "--work", str(work)]
    if it.launch == "python":
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={_nproc(it.launch)}",
            *args]


def child_env() -> dict:
    env = dict(os.environ)
    path = [str(ROOT)] + ([str(SITE)] if SITE.is_dir() else []) + [p for p in env.get("PYTHONPATH", "").split(":") if p]
    cpu = on_cpu()
    import torch
    cuda = torch.cuda.is_available() and not cpu
    env.update(PYTHONPATH=":".join(dict.fromkeys(path)), PYTHONUNBUFFERED="1",
               DS_ACCELERATOR="cuda" if cuda else "cpu", DS_BUILD_OPS="0", DS_SKIP_CUDA_CHECK="1",
               WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1" if cpu else "4"))
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def install_bundle(log) -> dict:
    """The `bundle` item, in the parent: pip into /tmp/site only what is not importable."""
    wheels = sorted((BUNDLE / "wheels").glob("*.whl"))
    probe = subprocess.run([sys.executable, "-c", "import deepspeed, open_clip, webdataset"], env=child_env(),
                           capture_output=True, text=True, timeout=60)
    if probe.returncode == 0:
        return {"status": "SKIP", "reason": "deepspeed, open_clip, webdataset already importable"}
    if not wheels:
        return {"status": "FAIL", "reason": f"packages missing and no wheels in {BUNDLE / 'wheels'} "
                                            "(run `make gpu-bundle` where there is network)"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    log(p.stdout + p.stderr)
    if p.returncode:
        return {"status": "FAIL", "reason": f"pip install --target {SITE} failed ({p.returncode})"}
    return {"status": "PASS", "value": len(wheels), "unit": f"wheels into {SITE}"}


def run_all(out: Path, work: Path, budget_s: float, only: list[str] | None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    (work / "items").mkdir(parents=True, exist_ok=True)
    logf = open(out / "gpu_check.log", "a")

    def log(s: str) -> None:
        print(s, end="" if s.endswith("\n") else "\n", flush=True)
        logf.write(s if s.endswith("\n") else s + "\n")
        logf.flush()

    t_start = time.perf_counter()
    deadline = t_start + budget_s
    results = []
    status: dict[str, str] = {}
    commit = git_commit()
    rates_first = previous_correctness(out, commit)
    if rates_first:
        log(f"gpu-check: correctness passed on {commit[:12]} before: rate items first")
    for it in ordered(ITEMS, rates_first):
        if only and it.name not in only:
            continue
        left = deadline - time.perf_counter()
        bad = [n for n in it.needs if status.get(n, "PASS" if only else "missing") != "PASS"]
        t0 = time.perf_counter()
        if left < it.min_s:
            res = {"status": "SKIP", "reason": f"out of the time budget ({left:.0f} s left of {budget_s:.0f})"}
        elif bad:
            res = {"status": "SKIP", "reason": f"needs {', '.join(bad)}"}
        elif it.name == "kmeans_faiss" and not _read(work, "env").get("faiss_gpus"):
            # known from `env` without starting a process group (saves ~10 s of the budget)
            env = _read(work, "env")
            res = {"status": "SKIP", "reason": "faiss GPU: not installable here" if str(env.get("faiss", "")).startswith(
                "not") else f"faiss GPU: faiss {env.get('faiss', '?')} sees no GPU"}
        else:
            try:
                res = install_bundle(log) if it.name == "bundle" else _launch(it, work, min(limit_of(it), left), log)
            except Exception as e:  # noqa: BLE001 - one item's trouble never stops the others
                res = {"status": "FAIL", "reason": f"{type(e).__name__}: {e}"[:300]}
        res["proc_s"] = round(time.perf_counter() - t0, 1)  # with process start, imports, teardown
        res.setdefault("wall_s", res["proc_s"])
        res["name"], res["what"] = it.name, it.what
        status[it.name] = res["status"]
        results.append(res)
        log(f"gpu-check: {res['status']:4s} {it.name} ({res['proc_s']} s)"
            f"{': ' + res['reason'] if res.get('reason') else ''}")
        write_outputs(out, results, time.perf_counter() - t_start, final=False, commit=commit)  # partial
    total = time.perf_counter() - t_start
    log(f"gpu-check: {sum(r['status'] == 'PASS' for r in results)} PASS, "
        f"{sum(r['status'] == 'FAIL' for r in results)} FAIL, {sum(r['status'] == 'SKIP' for r in results)} SKIP "
        f"in {total:.0f} s")
    write_outputs(out, results, total, commit=commit)
    logf.close()
    return results


def _launch(it: Item, work: Path, limit: float, log) -> dict:
    cmd = command(it, work)
    log(f"\n=== {it.name}: {it.what} (limit {limit:.0f} s)\n+ {' '.join(cmd)}")
    proc = _run_child(cmd, limit, log)
    res = _read(work, it.name) or proc  # the item's own verdict, else how its process ended
    if proc["status"] == "FAIL" and res is not proc:
        res["process"] = proc["reason"]  # e.g. a hang in teardown after the work was done
    return res


def _run_child(cmd: list[str], limit: float, log) -> dict:
    """One item in its own process group; killed with everything it started at the limit."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    timed_out = [False]

    def kill():
        timed_out[0] = True
        try:
            os.killpg(p.pid, signal.SIGTERM)
            time.sleep(3)
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    import threading
    timer = threading.Timer(limit, kill)
    timer.start()
    tail: list[str] = []
    try:
        for line in p.stdout:
            log(line)
            tail = (tail + [line.rstrip()])[-5:]
        p.wait()
    finally:
        timer.cancel()
    if timed_out[0]:
        return {"status": "FAIL", "reason": f"timeout: killed after {limit:.0f} s"}
    if p.returncode:
        last = next((ln for ln in reversed(tail) if ln.strip()), "")
        return {"status": "FAIL", "reason": f"exit code {p.returncode}: {last[:300]}"}
    return {"status": "PASS"}


def _fmt_mfu(r: dict) -> str:
    m = r.get("mfu") or {}
    parts = []
    if "vs_datasheet_bf16" in m:
        parts.append(f"{100 * m['vs_datasheet_bf16']:.1f}%")
    if "vs_measured_matmul" in m:
        parts.append(f"({100 * m['vs_measured_matmul']:.1f}% of matmul)")
    return " ".join(parts)


def write_outputs(out: Path, results: list[dict], total: float, final: bool = True,
                  commit: str | None = None) -> None:
    env = next((r for r in results if r["name"] == "env"), {})
    head = (f"gpu-check on {env.get('device_name', '?')} x{env.get('gpus', '?')}, torch {env.get('torch', '?')}, "
            f"{'CPU REHEARSAL (tiny sizes, gloo: not a measurement)' if on_cpu() else 'CUDA/NCCL'}; "
            f"{total:.0f} s{'' if final else ' so far (incomplete)'}")
    lines = [f"# {head}", "", "| item | status | value | MFU | peak mem GB | item s | process s | detail |",
             "|---|---|---:|---|---:|---:|---:|---|"]
    for r in results:
        val = r.get("value")
        val = (f"{val:,}" if isinstance(val, int) or abs(val) >= 1000 else f"{val:.4g}") if isinstance(
            val, (int, float)) else ""
        val = f"{val} {r.get('unit', '')}" if val else ""
        mem = r.get("peak_mem_gb", r.get("peak_rss_gb", ""))
        detail = r.get("reason") or r.get("setting") or r.get("what", "")
        if "data_wait_share" in r:
            detail = f"{detail}; data wait {100 * r['data_wait_share']:.0f}% of step time"
        lines.append(f"| {r['name']} | {r['status']} | {val} | {_fmt_mfu(r)} | {mem} | {r.get('wall_s', '')} | {r.get('proc_s', '')} | "
                     f"{str(detail).replace('|', '/')} |")
    text = "\n".join(lines) + "\n"
    tmp = out / ".gpu_check.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "gpu_check.md")
    tmp = out / ".gpu_check.json.tmp"
    tmp.write_text(json.dumps({"header": head, "commit": commit, "cpu_rehearsal": on_cpu(), "total_s": round(total, 1),
                               "items": results}, indent=1, default=str))
    os.replace(tmp, out / "gpu_check.json")
    if final:
        print("\n" + text, flush=True)


def plan(budget_s: float, only: list[str] | None) -> str:
    import torch
    cuda = torch.cuda.is_available() and not on_cpu()
    mode = (f"CUDA ({torch.cuda.device_count()} GPU: {torch.cuda.get_device_name(0)}), NCCL" if cuda else
            "CPU rehearsal, gloo, tiny sizes" if on_cpu() else "no CUDA here: a real run needs a GPU "
            "(GPU_CHECK_ON_CPU=1 rehearses on CPU)")
    rows = [f"gpu-check plan: {mode}; budget {budget_s:.0f} s; config {CONFIG.relative_to(ROOT)}"]
    tot = 0
    for it in ITEMS:
        if only and it.name not in only:
            continue
        tot += limit_of(it)
        size = SIZES.get(it.name, ({}, {}))[1 if on_cpu() else 0]
        rows.append(f"  {it.name:15s} limit {limit_of(it):3d} s  {it.launch:9s} {it.what}"
                    f"{'  ' + json.dumps(size) if size else ''}{'  needs ' + ','.join(it.needs) if it.needs else ''}")
    rows.append(f"  sum of item limits {tot} s, capped by the budget {budget_s:.0f} s")
    return "\n".join(rows)


def cli(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="launch.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check_out", help="results folder")
    ap.add_argument("--work", default=None, help="scratch folder (default: a fresh temp dir)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="whole-run bound (default 540 s on a GPU, 1620 s for the CPU rehearsal)")
    ap.add_argument("--only", default=os.environ.get("ONLY"), help="comma-separated item names")
    ap.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN") == "1")
    ap.add_argument("--cpu", action="store_true", help="CPU rehearsal (= GPU_CHECK_ON_CPU=1)")
    ap.add_argument("--item", default=None, help=argparse.SUPPRESS)  # the child side
    args = ap.parse_args(argv)
    if args.cpu:
        os.environ["GPU_CHECK_ON_CPU"] = "1"
    if args.item:
        return run_item(args.item, Path(args.work))
    if args.budget_s is None:
        args.budget_s = float(os.environ.get("GPU_CHECK_BUDGET_S") or (1620 if on_cpu() else 540))
    only = [s for s in (args.only or "").split(",") if s] or None
    unknown = [s for s in only or [] if s not in BY_NAME]
    if unknown:
        print(f"gpu-check: unknown item(s) {unknown}; known: {', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    print(plan(args.budget_s, only), flush=True)
    if args.dry_run:
        return 0
    import torch
    if not torch.cuda.is_available() and not on_cpu():
        print("gpu-check: needs a CUDA GPU (DRY_RUN=1 prints the plan; GPU_CHECK_ON_CPU=1 rehearses on CPU)",
              file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        results = run_all(Path(args.out), work, args.budget_s, only)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r["status"] == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(cli())
