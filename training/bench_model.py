"""`make bench` (model): forward+backward samples/s of our ViT vs HF transformers' model of the
same shape and weights (and timm's ViT where the architecture matches: the CLIP family), same
batch, in one run. Iterations of the models alternate, so load from other processes on a shared
box hits them alike; the median iteration time is reported. Target: ratio >= 1.0.

On a CUDA machine it also reports the MFU of L/14-224 training steps in bf16, against the
card's bf16 matmul rate measured first (target >= 50%).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from functools import partial

import torch
from torch import nn

from training.hf import hf_config_dict, to_hf_state_dict
from training.model import ModelConfig, build_model, forward_flops, num_params

# (label, model config, batch, input size); full mode uses B/32 at full size and a 4-layer
# slice of RICE L/14 (one L/14 step of 24 layers takes tens of seconds on 2 CPU cores).
CASES_FULL = [
    ("clip B/32-224", ModelConfig(name="vit_b32_224", embed_dim=0), 8, 224),
    ("rope2d L/14 (4 layers)-224", ModelConfig(name="vit_l14_rope2d_560", layers=4, image_size=224,
                                               embed_dim=0), 4, 224),
]
CASES_QUICK = [
    ("clip small-64", ModelConfig(name="vit_tiny_clip", width=192, layers=4, heads=3, mlp_dim=768,
                                  image_size=64, embed_dim=0), 8, 64),
    ("rope2d small-64", ModelConfig(name="vit_tiny_rope2d", width=192, layers=4, heads=3,
                                    mlp_dim=768, image_size=64, embed_dim=0), 8, 64),
]


def hf_twin(ours) -> nn.Module:
    """The HF model of the same shape holding the same weights."""
    import transformers
    d = hf_config_dict(ours.config)
    conf = transformers.AutoConfig.for_model(d.pop("model_type"), **{
        k: v for k, v in d.items() if k not in ("architectures", "transformers_version", "torch_dtype")})
    conf._attn_implementation = "sdpa"
    hf = getattr(transformers, d["architectures"][0])(conf)
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), prefixed=False), strict=True)
    return hf


def timm_twin(cfg: ModelConfig) -> nn.Module | None:
    """timm's VisionTransformer with CLIP's layout (pre-norm, class token, quick_gelu)."""
    cfg = cfg.resolved()
    if cfg.rope2d:
        return None  # no timm model has this RoPE layout (EVA's differs)
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None
    return VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.layers,
        num_heads=cfg.heads, mlp_ratio=cfg.mlp_dim / cfg.width, qkv_bias=True, class_token=True,
        pre_norm=True, global_pool="token", num_classes=0, act_layer="quick_gelu",
        norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps))


def _pooled(model, name):
    if name == "ours":
        return lambda x: model.vision_model(x).pooler_output
    if name == "hf":
        kw = {} if getattr(model.config, "model_type", "").startswith("mlcd") else \
            {"interpolate_pos_encoding": False}
        return lambda x: model(pixel_values=x, **kw).pooler_output
    return model  # timm: forward -> pooled token


def _step(fn, x):
    fn(x).float().square().mean().backward()


def compare(label: str, cfg: ModelConfig, batch: int, size: int, iters: int) -> list[dict]:
    torch.manual_seed(0)
    ours = build_model(cfg).train()
    models = {"ours": ours, "hf": hf_twin(ours).train()}
    tm = timm_twin(cfg.resolved())
    if tm is not None:
        models["timm"] = tm.train()
    fns = {n: _pooled(m, n) for n, m in models.items()}
    x = torch.randn(batch, 3, size, size)
    times = {n: [] for n in fns}
    for n, f in fns.items():  # warm-up (allocator, kernels)
        _step(f, x)
    for _ in range(iters):
        for n, f in fns.items():
            for p in models[n].parameters():
                p.grad = None
            t0 = time.perf_counter()
            _step(f, x)
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    rows = []
    for n in fns:
        rows.append({"case": label, "model": n, "params_M": num_params(models[n]) / 1e6,
                     "batch": batch, "samples_per_s": batch / med[n]})
        if n != "ours":  # ours vs itself would be 1 by construction
            rows[-1]["ours_speedup"] = med[n] / med["ours"]
    return rows


def _matmul_tflops(dtype=torch.bfloat16, n=8192, iters=20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12


def vit_train_flops(cfg: ModelConfig, size: int) -> float:
    """Matmul FLOPs of one fwd+bwd sample (bwd = 2x fwd) of the backbone at `size` px."""
    return 3 * forward_flops(dataclasses.replace(cfg, image_size=size), head=False)


def cuda_mfu(quick: bool) -> list[dict]:
    peak = _matmul_tflops()
    cfg = ModelConfig(name="vit_l14_336", image_size=224, embed_dim=0)
    batch, iters = (32, 5) if quick else (128, 20)
    model = build_model(cfg).cuda().train()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    fn = lambda: model(x).float().square().mean().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    achieved = vit_train_flops(cfg, 224) * batch / dt / 1e12
    return [{"case": "L/14-224 bf16 fwd+bwd", "model": "ours", "batch": batch,
             "samples_per_s": batch / dt, "bf16_matmul_TFLOPs": peak,
             "achieved_TFLOPs": achieved, "MFU": achieved / peak}]


def run_bench(quick: bool) -> list[dict]:
    rows = []
    iters = 2 if quick else 3
    for label, cfg, batch, size in (CASES_QUICK if quick else CASES_FULL):
        rows += compare(label, cfg, batch, size, iters)
    if torch.cuda.is_available():
        rows += cuda_mfu(quick)
    return rows
