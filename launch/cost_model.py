"""The cost model behind docs/SCALING.md: bytes, FLOPs, GPU-hours, memory and traffic per stage.

    python -m launch.cost_model [--dataset laion400m|coyo700m] [--gpus 80]    (markdown tables)

Everything here is arithmetic on cited inputs (``SOURCES``) plus a few stated assumptions
(``ASSUMED``); nothing is measured. Measured numbers come from `make gpu-check` and go beside
these, never in place of them. docs/SCALING.md explains each formula; tests/test_launch.py checks
the anchors (e.g. 400M x 768 fp16 = 614 GB).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from training.model import ModelConfig, analytic_params, forward_flops, num_tokens

GB = 1e9
TB = 1e12

SOURCES = {
    "laion400m_n": (413e6, "unique samples, LAION-400M blog (laion.ai/blog/laion-400-open-dataset)"),
    "laion400m_tb": (10.0, "TB of webdataset at 256 px, img2dataset dataset_examples/laion400m.md"),
    "coyo700m_n": (747e6, "image-text pairs, kakaobrain/coyo-dataset README"),
    "a100_bf16": (312e12, "A100 dense bf16 tensor FLOP/s, NVIDIA A100 datasheet"),
    "a100_fp32": (19.5e12, "A100 fp32 (non-tensor) FLOP/s, NVIDIA A100 datasheet"),
    "h100_bf16": (989e12, "H100 SXM dense bf16 tensor FLOP/s, NVIDIA H100 datasheet"),
    "h100_fp32": (67e12, "H100 SXM fp32 (non-tensor) FLOP/s, NVIDIA H100 datasheet"),
    "clip_retrieval_l14_a100": (312.0, "ViT-L/14 images/s on one A100, clip-retrieval README (stated as "
                                       "GPU-bound there)"),
    # Public CLIP training runs on LAION-400M (samples seen, GPUs, samples/s): the runs table of
    # Cherti et al. 2022, "Reproducible scaling laws for contrastive language-image learning"
    # (arXiv 2212.07143), published with laion/scaling-laws-openclip as trained_models_info.csv.
    "openclip_l14_400m_run": ((13e9, 768, 60327.9), "OpenCLIP ViT-L/14, LAION-400M, 13B samples (32 ep), "
                                                    "768 A100, 60,328 samples/s; Cherti et al. 2022 runs table"),
    "openclip_b32_400m_run": ((13e9, 128, 52724.0), "OpenCLIP ViT-B/32, LAION-400M, 13B samples (32 ep), "
                                                    "128 A100, 52,724 samples/s; Cherti et al. 2022 runs table"),
    "openclip_l14_text_flops": (13.3e9, "ViT-L/14 text tower forward FLOPs per caption, open_clip model profile"),
    "faiss_dist_1m": ((50e6, 1e6, 20, 899.0, 80), ("50M points -> 1M centroids, 20 it, 899 s on 20x4 GPUs, "
                                                   "faiss wiki/benchmark")),
    "adam_bytes_per_param": (16, "mixed-precision Adam model state, ZeRO paper (Rajbhandari et al. 2020)"),
    "act_bytes_per_token_width": (34, ("16-bit activations per layer = 34*s*b*h bytes without the "
                                       "attention-score term (flash/SDPA), Korthikanti et al. 2022")),
}
ASSUMED = {
    "mfu": 0.40,          # ViT training MFU we plan with (the target is >= 50% for L/14 on H100);
                          # public CLIP runs reached less (public_run_mfu: ~13% L/14, ~6% B/32)
    "embed_mfu": 0.40,    # inference with fp16 autocast, when decode keeps up
    "gemm_eff": 0.70,     # fraction of peak a large fp32 GEMM (k-means/assign) reaches
    "bytes_per_image": None,  # derived: laion400m_tb / laion400m_n
}

# name -> (image size as trained in the paper's recipes, training/model.py preset): the sizes
# and FLOPs formulas are the model's own (training.model.analytic_params / forward_flops).
MODELS = {
    "vit_b32_224": (224, "vit_b32_224"),
    "vit_l14_224": (224, "vit_l14_336"),
    "vit_l14_336": (336, "vit_l14_336"),
    "vit_bigG14_224": (224, "vit_bigG14_336"),
    "vit_bigG14_336": (336, "vit_bigG14_336"),
}


def src(key: str) -> float:
    return SOURCES[key][0]


@dataclass(frozen=True)
class ViT:
    """A model preset at a training resolution, with the cost numbers the tables need."""
    cfg: ModelConfig

    @property
    def tokens(self) -> int:
        return num_tokens(self.cfg)

    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def layers(self) -> int:
        return self.cfg.layers

    @property
    def mlp(self) -> int:
        return self.cfg.mlp_dim

    @property
    def out_dim(self) -> int:
        return self.cfg.embed_dim

    def params(self) -> float:
        return analytic_params(self.cfg)

    def fwd_flops(self) -> float:
        return forward_flops(self.cfg)

    def act_bytes(self, checkpointing: bool) -> float:
        """Activation bytes per sample kept for backward (16-bit). Without checkpointing:
        34*n*d per layer scaled for the MLP ratio; with it: the block inputs plus one block."""
        one = src("act_bytes_per_token_width") * self.tokens * self.width * (15 + 19 * self.mlp / (4 * self.width)) / 34
        return (2 * self.tokens * self.width * self.layers + one) if checkpointing else one * self.layers


def model(name: str) -> ViT:
    image, preset = MODELS[name]
    return ViT(ModelConfig(name=preset, image_size=image).resolved())


def train_state_bytes(params: float, zero: int, world: int) -> float:
    """Backbone model state per rank: bf16 weights (2) + bf16 grads (2) + fp32 master, m, v (12)."""
    w, g, o = 2 * params, 2 * params, 12 * params
    if zero >= 1:
        o /= world
    if zero >= 2:
        g /= world
    if zero >= 3:
        w /= world
    return w + g + o


def partial_fc_bytes(k: int, d: int, world: int, batch_global: int, rho: float) -> dict:
    """Class centers per rank (fp32 weight + AdamW m, v) and the step's logits buffer."""
    local = k / world
    sampled = rho * local + min(local, batch_global * 8 / world)  # negatives + the batch's positives
    return {"centers": 4 * local * d, "centers_adam": 3 * 4 * local * d,
            "logits": 2 * 4 * batch_global * sampled}  # fp32 logits + their grad


def text_fwd_flops(width: int, layers: int, tokens: int = 77) -> float:
    """A CLIP text tower's forward FLOPs per caption (2 per multiply-add; the same per-layer formula
    as the image tower with MLP = 4 x width; the token embedding costs no FLOPs)."""
    return layers * (tokens * (8 * width ** 2 + 16 * width ** 2) + 4 * tokens ** 2 * width)


def public_run_mfu(name: str) -> dict:
    """What a public OpenCLIP LAION-400M run achieved: MFU on the A100's dense bf16 peak, counting
    3 x forward FLOPs of both towers per sample, and its A100-hours (samples / rate x GPUs)."""
    key, text = {"vit_l14_224": ("openclip_l14_400m_run", src("openclip_l14_text_flops")),
                 "vit_b32_224": ("openclip_b32_400m_run", text_fwd_flops(512, 12))}[name]
    samples, gpus, rate = src(key)
    flops_per_sample = 3 * (model(name).fwd_flops() + text)
    return {"mfu": rate * flops_per_sample / gpus / src("a100_bf16"),
            "a100_h": samples / rate * gpus / 3600, "samples": samples}


def gpu_hours(flops: float, peak: float, eff: float) -> float:
    return flops / (peak * eff) / 3600


def dataset(name: str) -> dict:
    n = {"laion400m": 400e6, "coyo700m": 700e6}[name]  # nominal counts the recipes use
    per_image = src("laion400m_tb") * TB / src("laion400m_n")
    return {"n": n, "image_bytes": n * per_image}


def embed_cost(n: float) -> dict:
    f = model("vit_l14_224").fwd_flops()
    return {"flops": n * f, "store_bytes_per_kind": n * 768 * 2,
            "a100_h_cited": n / src("clip_retrieval_l14_a100") / 3600,
            "h100_h_compute": gpu_hours(n * f, src("h100_bf16"), ASSUMED["embed_mfu"]),
            "a100_h_compute": gpu_hours(n * f, src("a100_bf16"), ASSUMED["embed_mfu"])}


def kmeans_cost(k: int, d: int, sample: float, niter: int, world: int) -> dict:
    per_iter = 2 * sample * k * d
    return {"flops_per_iter": per_iter, "flops": per_iter * niter,
            "sample_bytes_fp32": sample * d * 4, "centroid_bytes": k * d * 4,
            "allreduce_bytes_per_rank_iter": 2 * (world - 1) / world * (k * d * 4 + k * 8),
            "h100_h_fp32": gpu_hours(per_iter * niter, src("h100_fp32"), ASSUMED["gemm_eff"]),
            "h100_h_bf16": gpu_hours(per_iter * niter, src("h100_bf16"), ASSUMED["gemm_eff"]),
            "a100_h_fp32": gpu_hours(per_iter * niter, src("a100_fp32"), ASSUMED["gemm_eff"])}


def assign_cost(n: float, k: int, d: int, l: int) -> dict:
    f = 2 * n * k * d
    return {"flops": f, "labels_bytes": n * l * 4, "sims_bytes": n * l * 2,
            "h100_h_fp32": gpu_hours(f, src("h100_fp32"), ASSUMED["gemm_eff"]),
            "h100_h_bf16": gpu_hours(f, src("h100_bf16"), ASSUMED["gemm_eff"]),
            "a100_h_fp32": gpu_hours(f, src("a100_fp32"), ASSUMED["gemm_eff"])}


def train_cost(name: str, samples: float, batch_global: int, world: int, zero: int, ckpt: bool,
               k: int = 1_000_000, rho: float = 0.1) -> dict:
    m = model(name)
    recompute = 1 if ckpt else 0
    flops = samples * (3 + recompute) * m.fwd_flops()
    useful = samples * 3 * m.fwd_flops()  # MFU counts model FLOPs, not recomputation
    p = m.params()
    per_gpu = batch_global / world
    pfc = partial_fc_bytes(k, m.out_dim, world, batch_global, rho)
    return {"params": p, "fwd_flops": m.fwd_flops(), "flops": flops,
            "a100_h": gpu_hours(useful, src("a100_bf16"), ASSUMED["mfu"]),
            "h100_h": gpu_hours(useful, src("h100_bf16"), ASSUMED["mfu"]),
            "state_bytes": train_state_bytes(p, zero, world), "act_bytes": per_gpu * m.act_bytes(ckpt),
            "pfc_bytes": pfc["centers"] + pfc["centers_adam"] + pfc["logits"],
            # per step and rank: gradient reduce-scatter/all-reduce (bf16) + embedding all-gather
            "grad_bytes_per_step": 2 * (world - 1) / world * 2 * p,
            "emb_gather_bytes_per_step": (world - 1) / world * batch_global * (m.out_dim * 2 + 8 * 8)}


def fmt_bytes(b: float) -> str:
    for unit, s in ((TB, "TB"), (GB, "GB"), (1e6, "MB")):
        if b >= unit:
            return f"{b / unit:.3g} {s}"
    return f"{b:.0f} B"


def tables(ds: str, world: int = 80) -> str:
    d = dataset(ds)
    n = d["n"]
    e = embed_cost(n)
    sample = 100 * 1_000_000
    km = kmeans_cost(1_000_000, 768, sample, 20, 32)
    a = assign_cost(n, 1_000_000, 768, 8)
    out = [f"### {ds}: N = {n / 1e6:.0f}M images\n",
           "| stage | on disk | FLOPs | A100-hours | H100-hours |", "|---|---|---|---|---|",
           f"| images (256 px shards) | {fmt_bytes(d['image_bytes'])} | | | |",
           (f"| embed ViT-L/14-224 fp16 | {fmt_bytes(e['store_bytes_per_kind'])} per kind (img/text/joint) | "
            f"{e['flops']:.2g} | {e['a100_h_cited']:.0f} (cited rate) / {e['a100_h_compute']:.0f} (40% MFU) | "
            f"{e['h100_h_compute']:.0f} (40% MFU, if decode keeps up) |"),
           (f"| k-means K=1M, 100M sample, 20 it | {fmt_bytes(km['centroid_bytes'])} centroids | {km['flops']:.2g} | "
            f"{km['a100_h_fp32']:.0f} (fp32) | {km['h100_h_fp32']:.0f} (fp32) / {km['h100_h_bf16']:.1f} (bf16) |"),
           (f"| assign top-8 of 1M | {fmt_bytes(a['labels_bytes'] + a['sims_bytes'])} labels+sims | {a['flops']:.2g} | "
            f"{a['a100_h_fp32']:.0f} (fp32) | {a['h100_h_fp32']:.0f} (fp32) / {a['h100_h_bf16']:.1f} (bf16) |")]
    epochs = 32
    for name, zero, ck in (("vit_b32_224", 1, False), ("vit_l14_224", 1, True), ("vit_bigG14_224", 2, True)):
        t = train_cost(name, n * epochs, 32_000, world, zero, ck)
        a100 = f"{t['a100_h']:,.0f}"
        if name in ("vit_b32_224", "vit_l14_224"):  # at the MFU a public CLIP run reached instead
            pub = public_run_mfu(name)
            a100 += f" (40% MFU) / {t['a100_h'] * ASSUMED['mfu'] / pub['mfu']:,.0f} ({100 * pub['mfu']:.0f}% MFU)"
        out.append(f"| train {name} {epochs} ep | | {t['flops']:.2g} | {a100} | {t['h100_h']:,.0f} |")
    t = train_cost("vit_l14_336", n, 32_000, world, 1, True)
    out.append(f"| train vit_l14_336 1 ep fine-tune | | {t['flops']:.2g} | {t['a100_h']:,.0f} | {t['h100_h']:,.0f} |")
    out += ["", f"Memory and traffic per rank at {world} GPUs, global batch 32,000, K = 1M, rho = 0.1:\n",
            "| model | params | ZeRO | model state | activations | PartialFC | grads/step | emb. gather/step |",
            "|---|---|---|---|---|---|---|---|"]
    for name, zero, ck in (("vit_b32_224", 1, False), ("vit_l14_224", 1, True), ("vit_l14_336", 1, True),
                           ("vit_bigG14_224", 1, True), ("vit_bigG14_224", 2, True), ("vit_bigG14_224", 3, True)):
        t = train_cost(name, n, 32_000, world, zero, ck)
        out.append(f"| {name}{' (ckpt)' if ck else ''} | {t['params'] / 1e6:.0f}M | {zero} | "
                   f"{fmt_bytes(t['state_bytes'])} | {fmt_bytes(t['act_bytes'])} | {fmt_bytes(t['pfc_bytes'])} | "
                   f"{fmt_bytes(t['grad_bytes_per_step'])} | {fmt_bytes(t['emb_gather_bytes_per_step'])} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="launch.cost_model")
    ap.add_argument("--dataset", default="laion400m,coyo700m")
    ap.add_argument("--gpus", type=int, default=80)
    args = ap.parse_args(argv)
    for ds in args.dataset.split(","):
        print(tables(ds, args.gpus) + "\n")
    print("Sources:")
    for k, (_, why) in SOURCES.items():
        print(f"- {k}: {why}")
    print("\nPublic OpenCLIP runs on LAION-400M (image + text towers, 3 x forward FLOPs per sample):")
    for name in ("vit_b32_224", "vit_l14_224"):
        p = public_run_mfu(name)
        print(f"- {name}: {100 * p['mfu']:.1f}% MFU of the A100 bf16 peak, {p['a100_h']:,.0f} A100-hours "
              f"for {p['samples'] / 1e9:.0f}B samples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
