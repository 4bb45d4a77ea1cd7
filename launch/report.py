"""The demo's report: ``report.md`` + PNGs (loss curve, probe bar chart; the clustering stage
writes the cluster-size histogram and contact sheets) from what each stage left on disk."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.io import atomic_write_text, read_json


def _read(path: Path):
    return read_json(path) if path.is_file() else None


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def loss_curve(metrics: list[dict], png: Path) -> bool:
    pts = [(m["step"], m["loss"]) for m in metrics if "loss" in m and "step" in m]
    if not pts:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(*zip(*pts), lw=1.2, label="MLCD loss")
    for key, name in (("loss_pos", "positive term"), ("loss_neg", "negative term")):
        sub = [(m["step"], m[key]) for m in metrics if key in m]
        if sub:
            ax.plot(*zip(*sub), lw=0.8, alpha=0.7, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss (2 CPU ranks, DeepSpeed ZeRO-2, PartialFC)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return True


def probe_chart(rows: list[dict], png: Path) -> bool:
    if not rows:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    datasets = sorted({r["dataset"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.5), dpi=110, squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        x = np.arange(len(models))
        for j, metric in enumerate(("linear", "knn")):
            vals = [next((r[metric] for r in rows if r["dataset"] == ds and r["model"] == m), 0.0)
                    for m in models]
            ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, label="linear probe" if metric == "linear" else "k-NN")
        ax.set_xticks(x, models, rotation=15, fontsize=8)
        ax.set_title(ds)
        ax.set_ylabel("top-1 (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return True
