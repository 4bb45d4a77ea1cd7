"""`mlcd ablate --config configs/compare.yaml`: MLCD vs UNICOM vs CLIP on the same images (the
report and plot of launch/ablate.py's compare mode).

Arms: MLCD (the base cell), UNICOM, CLIP (train.objective=clip: the same image tower, init,
optimizer, schedule, batch, steps and augmentation; a small open_clip text tower on the
captions, training/clip_head.py), random init and the stage-1 encoder, each probed by the same
linear probe and k-NN; MLCD and CLIP again at budget_factors x the steps. Next to the accuracy:
each arm's training wall-clock per optimizer step (the loop's own clock, metrics.jsonl) and its
model FLOPs per step, so compute is compared too.
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from launch.plots import probe_panel, save_png
from pipeline.core.io import read_json

PROBES = ("linear", "knn")


def step_flops(cell, train_cfg, nproc: int) -> float:
    """Model FLOPs of one optimizer step over the global batch (forward + backward = 3x forward,
    2 per multiply-accumulate): the image tower, plus the loss head's matmuls: MLCD/UNICOM the
    B x S logits against the scored class centers (S = K at rho = 1, else ~rho K + the batch's
    positives), CLIP the text tower on every caption and the two B x B logit matrices. The
    loader's decoding is not counted."""
    from training.clip_head import text_forward_flops
    from training.model import forward_flops
    b = train_cfg.data.batch_size * nproc * train_cfg.deepspeed.grad_accum
    dim = train_cfg.model.resolved().embed_dim
    image = forward_flops(train_cfg.model) * b
    if cell.loss == "clip":
        head = text_forward_flops(train_cfg.clip, dim) * b + 2 * (2 * b * b * dim)
    else:
        scored = cell.k if cell.rho >= 1 else min(cell.k, math.floor(cell.rho * cell.k) + b * cell.l)
        head = 2 * b * dim * scored
    return 3 * (image + head)


def _cells(root: Path, cell, seeds) -> list[dict]:
    return [read_json(p) for s in seeds if (p := root / "cells" / cell.name / f"s{s}" / "cell.json").exists()]


def _refs(root: Path) -> dict[str, list[dict]]:
    """Reference rows: name -> one results dict per seed (random_init_s0, _s1, ... -> random_init)."""
    path = root / "cells" / "random_init" / "cell.json"
    out: dict[str, list[dict]] = {}
    for name, res in (read_json(path) if path.exists() else {}).items():
        out.setdefault(name.split("_s")[0] if name.startswith("random_init_s") else name, []).append(res)
    return out


def _ms(xs: list[float], pct: bool = True) -> str:
    if not xs:
        return "-"
    f = 100 if pct else 1
    m = f * statistics.fmean(xs)
    return f"{m:.1f} +- {f * statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{m:.1f}"


def _arm(cell) -> str:
    return {"base": "MLCD", "unicom": "UNICOM", "clip": "CLIP"}.get(cell.factor, "MLCD" if cell.loss != "clip" else "CLIP")


def compare_report(root: Path, cells, seeds, base_steps: int = 0) -> str:
    """The comparison table (mean +- std over seeds), the gaps MLCD - CLIP per budget, report.png.
    base_steps: train.steps of the cells that do not set their own."""
    rows = [(c, _cells(root, c, seeds)) for c in cells]
    refs = _refs(root)
    datasets: list[str] = []
    for _, per in rows:
        for p in per:
            datasets += [d for d in p["results"] if d not in datasets]
    head = ("| arm | steps | seeds | " + " | ".join(f"{d} {p}" for d in datasets for p in PROBES)
            + " | train s/step | GFLOP/step | train wall (s) |")
    lines = [f"# MLCD vs CLIP: {root}", "",
             "Top-1 (%) of a linear probe and k-NN on frozen features of held-out probe sets, mean +- std "
             "over seeds; every trained arm has the same image tower, init, optimizer, schedule, batch, "
             "augmentation, images and optimizer steps. s/step: the training loop's own clock "
             "(step + data wait, metrics.jsonl); GFLOP/step: model FLOPs of one optimizer step over the "
             "global batch (launch/compare.py:step_flops); train wall: the whole train command "
             "(start-up included), mean over seeds.", "",
             head, "|---|---:|---:|" + "---:|" * (2 * len(datasets)) + "---:|---:|---:|"]
    for c, per in rows:
        vals = [_ms([p["results"][d][pr] for p in per if d in p["results"]]) for d in datasets for pr in PROBES]
        sps = [p["s_per_step"] for p in per if "s_per_step" in p]
        wall = [p["train_seconds"] for p in per if "train_seconds" in p]
        gf = f"{per[0]['flops_per_step'] / 1e9:.1f}" if per and "flops_per_step" in per[0] else "-"
        lines.append(f"| {_arm(c)} | {c.steps or base_steps or 'base'} | {len(per)} | " + " | ".join(vals)
                     + f" | {_ms(sps, pct=False) if sps else '-'} | {gf} | {_ms(wall, pct=False) if wall else '-'} |")
    for name, res in refs.items():
        vals = [_ms([r[d][pr] for r in res if d in r]) for d in datasets for pr in PROBES]
        lines.append(f"| {name.replace('_', ' ')} | 0 | {len(res)} | " + " | ".join(vals) + " | - | 0 | - |")
    lines += ["", "MLCD - CLIP (points, mean over seeds; positive = MLCD better):", ""]
    by = {(_arm(c), c.steps): per for c, per in rows if _arm(c) in ("MLCD", "CLIP") and c.factor != "unicom"}
    for steps in sorted({s for _, s in by}):
        m, k = by.get(("MLCD", steps), []), by.get(("CLIP", steps), [])
        gaps = []
        for d in datasets:
            for pr in PROBES:
                a = [p["results"][d][pr] for p in m if d in p["results"]]
                b = [p["results"][d][pr] for p in k if d in p["results"]]
                gaps.append(f"{d} {pr} {100 * (statistics.fmean(a) - statistics.fmean(b)):+.1f}" if a and b else f"{d} {pr} -")
        lines.append(f"- steps {steps or base_steps or 'base'}: " + ", ".join(gaps))
    plot(root, rows, refs, datasets, base_steps)
    return "\n".join(lines) + "\n"


def plot(root: Path, rows, refs: dict[str, list[dict]], datasets: list[str], base_steps: int = 0) -> None:
    """report.png: per probe set and probe, each arm's mean +- std (bars), references as lines."""
    if not datasets:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 2.8 * len(datasets)), squeeze=False)
    labels = [f"{_arm(c)} ({c.steps or base_steps or 'base'} steps)" for c, _ in rows]
    colors = ["tab:blue" if _arm(c) == "MLCD" else "tab:orange" if _arm(c) == "CLIP" else "tab:purple" for c, _ in rows]
    for i, d in enumerate(datasets):
        for j, pr in enumerate(PROBES):
            vals = [[100 * p["results"][d][pr] for p in per if d in p["results"]] for _, per in rows]
            xs = {name: [100 * r[d][pr] for r in res if d in r] for name, res in refs.items()}
            probe_panel(axes[i][j], labels, vals, {n: statistics.fmean(v) if v else None for n, v in xs.items()},
                        f"{d} {pr} top-1 (%)", j == 0, colors, 0.8, 8)
    save_png(fig, root / "report.png")
