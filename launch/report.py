"""The demo's report: ``report.md`` + PNGs (loss curve, accuracy during training, probe bar chart;
the clustering stage writes the cluster-size histogram and contact sheets) from what each stage
left on disk.

Every PNG and the report carry the run they came from (``source_id``: the demo's run id and the
training step): report.md states it, each PNG holds it as a ``OpenMLCD-Run`` text chunk.
``publish(out, docs)`` copies the report and the README's pictures together (contact sheets
re-stamped), and tests/test_report.py checks that docs/demo's PNGs match docs/demo/report.md.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.io import atomic_path, atomic_write_text, read_json

STAMP = "OpenMLCD-Run"  # the PNG text chunk naming the source run


def source_id(state: dict) -> str:
    """The run's id (demo_state.json's run_id) and the training step its numbers are from."""
    step = state.get("stages", {}).get("train", {}).get("steps_done")
    return f"{state.get('run_id', 'unknown')} step {step if step is not None else '?'}"


def read_stamp(png: Path) -> str | None:
    from PIL import Image
    with Image.open(png) as im:
        return im.text.get(STAMP)  # type: ignore[attr-defined]  # PngImageFile


def _save(fig, png: Path, source: str | None) -> None:
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", metadata={STAMP: source} if source else None)


def stamp_copy(src: Path, dst: Path, source: str) -> None:
    """A copy of the PNG ``src`` with the source run in its text chunk (pixels unchanged)."""
    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text(STAMP, source)
    with Image.open(src) as im, atomic_path(dst) as tmp:
        im.save(tmp, format="PNG", pnginfo=info)


def _read(path: Path):
    return read_json(path) if path.is_file() else None


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def loss_curve(metrics: list[dict], png: Path, source: str | None = None) -> bool:
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
    _save(fig, png, source)
    plt.close(fig)
    return True


def eval_series(metrics: list[dict]) -> tuple[list[str], list[tuple[int, dict]]]:
    """Evaluation during training (train.eval_every): the keys (eval/<set>/<probe>) and
    (step, {key: top-1}) for each step that has them."""
    rows = [(m["step"], {k: v for k, v in m.items() if k.startswith("eval/") and k.endswith("_top1")})
            for m in metrics if "step" in m]
    rows = [(s, r) for s, r in rows if r]
    keys = list(dict.fromkeys(k for _, r in rows for k in r))
    return keys, rows


def eval_section(metrics: list[dict], png: Path, source: str | None = None) -> list[str]:
    keys, rows = eval_series(metrics)
    if not rows:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for k in keys:
        pts = [(s, 100 * r[k]) for s, r in rows if k in r]
        ax.plot(*zip(*pts), marker="o", lw=1.2, label=k.removeprefix("eval/"))
    ax.set_xlabel("step")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("held-out accuracy during training")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, png, source)
    plt.close(fig)
    secs = [m["eval/seconds"] for m in metrics if "eval/seconds" in m]
    names = [k.removeprefix("eval/") for k in keys]
    lines = ["## Accuracy during training", "",
             f"`train.eval_every`: the backbone being trained, on evenly spaced rows of the held-out sets "
             f"(`train.eval_max_images` per split), every few steps; {sum(secs):.1f} s of evaluation in "
             f"all ({sum(secs) / len(secs):.1f} s each).", "",
             "| step | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    lines += [f"| {s} | " + " | ".join(f"{100 * r[k]:.1f}" if k in r else "" for k in keys) + " |" for s, r in rows]
    return lines + ["", f"![accuracy during training]({png.name})", ""]


def probe_chart(rows: list[dict], png: Path, source: str | None = None) -> bool:
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
    _save(fig, png, source)
    plt.close(fig)
    return True


def _shown(config: str) -> str:
    """The config path as the reader would type it: relative to the working directory when it is
    below it (a published report names no local folders)."""
    try:
        return str(Path(config).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return config


def write_report(out: Path, state: dict, config: str, overrides: list[str]) -> str:
    """Writes ``{out}/report.md`` (+ PNGs) and returns its text."""
    out = Path(out)
    source = source_id(state)
    lines = ["# OpenMLCD demo report", "",
             f"Config `{_shown(config)}` {' '.join(overrides)}; everything below was measured in this run.", "",
             f"Source run: `{source}` (the `{STAMP}` text chunk of every PNG of this report).", ""]
    # stage timings
    lines += ["## Stages", "", "| stage | seconds | throughput |", "|---|---:|---|"]
    store = _read(out / "store" / "manifest.json") or {}
    clus = _read(out / "clusters" / "clustering.json") or {}
    metrics = _metrics(out / "train" / "metrics.jsonl")
    thr = {
        "embed": (f"{store['num_rows'] / max(state['stages']['embed']['seconds'], 1e-9):.1f} images/s "
                  f"({store['num_rows']} images)") if store and "embed" in state.get("stages", {}) else "",
        "cluster": f"K={clus.get('k')} on {clus.get('sample_size')} x {clus.get('dim')}" if clus else "",
        "train": (f"{sum(m.get('samples_per_s', 0) for m in metrics[-20:]) / max(len(metrics[-20:]), 1):.0f} "
                  f"samples/s (last 20 logged steps, all ranks)") if metrics else "",
    }
    total = 0.0
    for name, st in state.get("stages", {}).items():
        total += st.get("seconds", 0)
        lines.append(f"| {name} | {st.get('seconds', 0):.0f} | {thr.get(name, '')} |")
    lines += [f"| **total** | {total:.0f} | |", ""]
    # data + clusters
    data = _read(out / "data" / "manifest.json") or {}
    if data:
        lines += ["## Data", "", "| set | images | shards | skipped |", "|---|---:|---:|---|"]
        lines += [f"| {k} | {v['samples']} | {v['shards']} | {v['skipped'] or ''} |" for k, v in data.items()]
        lines.append("")
    if clus:
        cs = clus.get("cluster_sizes", {})
        obj = clus.get("objective", [])
        lines += ["## Clusters", "",
                  f"Spherical k-means of `{clus.get('kind')}` features: K = {clus.get('k')}, D = {clus.get('dim')}, "
                  f"{clus.get('sample_size')} points, {clus.get('iterations_run')} iterations "
                  f"(mean cosine to own center {clus.get('mean_similarity', 0):.3f}; objective "
                  f"{obj[0]:.1f} -> {obj[-1]:.1f})." if obj else "",
                  f"Cluster sizes: min {cs.get('min')}, median {cs.get('median')}, max {cs.get('max')}, "
                  f"empty {cs.get('empty')}, imbalance {cs.get('imbalance', 0):.2f}.", ""]
    rep = out / "clusters" / "report"
    hist = rep / "cluster_sizes.png"  # names written by clustering/report.py
    hist = hist if hist.is_file() else None
    sheets = sorted(rep.glob("sheet_*.png")) if rep.is_dir() else []
    if hist:
        lines += [f"![cluster sizes]({hist.relative_to(out)})", ""]
    if sheets:
        lines += [f"Contact sheets of sampled clusters ({len(sheets)}; index: "
                  f"`{(rep / 'index.html').relative_to(out)}`):", ""]
        lines += [f"![{p.stem}]({p.relative_to(out)})" for p in sheets[:3]] + [""]
    # training
    if metrics:
        png = out / "loss_curve.png"
        loss_curve(metrics, png, source)
        last = metrics[-1]
        k = max(1, len(metrics) // 10)
        head = sum(m["loss"] for m in metrics[:k]) / k
        tail = sum(m["loss"] for m in metrics[-k:]) / k
        tr = state.get("stages", {}).get("train", {})
        if tr.get("steps_planned") and not tr.get("done"):
            lines += ["## Training", "", f"**Stopped early: {tr.get('steps_done')} of {tr['steps_planned']} planned "
                      f"steps** (train.time_budget_s = {tr.get('time_budget_s')} s ran out). The numbers below "
                      "are from that checkpoint; rerun the demo to continue training.", ""]
        else:
            lines += ["## Training", "", f"Finished all {tr['steps_planned']} planned steps." if tr.get(
                "steps_planned") else "", ""]
        lines += [f"{last.get('step')} steps, {last.get('samples_seen', '?')} samples seen; mean loss of the "
                  f"first / last {k} logged steps: {head:.2f} -> {tail:.2f}.", "",
                  "![loss curve](loss_curve.png)", ""]
        lines += eval_section(metrics, out / "eval_curve.png", source)
    # probes
    ev = _read(out / "eval" / "results.json")
    if ev:
        from training.evaluation.evaluate import markdown_table
        rows = [{"model": r["model"], "dataset": r["dataset"], "linear": 100 * r["linear"]["top1"],
                 "knn": 100 * r["knn"]["top1"]} for r in ev["results"]]
        probe_chart(rows, out / "probe.png", source)
        lines += ["## Linear probe and k-NN on held-out sets", "", markdown_table(ev), "",
                  "![probe accuracy](probe.png)", ""]
    lines += ["## What this scale can and cannot show", "",
              "A few thousand clip-art images and a few minutes of CPU training show that every stage "
              "runs end to end on real data and that MLCD's cluster labels carry signal a ViT can learn "
              "(trained vs random init). They say nothing about the paper's ImageNet numbers, which take "
              "LAION-400M, K = 1M and thousands of GPU-hours; the stage-1 encoder row is a teacher trained "
              "on ImageNet and is expected to stay ahead at this budget.", ""]
    text = "\n".join(lines)
    atomic_write_text(out / "report.md", text)
    return text


def publish(out: Path, docs: Path) -> list[Path]:
    """Copies report.md and its pictures to ``docs`` (the README's docs/demo): loss_curve.png,
    eval_curve.png, probe.png, cluster_sizes.png, and the report's contact sheets as contact_sheet.png,
    contact_sheet_2.png and contact_sheet_3.png, every PNG stamped with the report's source run. Returns what it wrote."""
    out, docs = Path(out), Path(docs)
    text = (out / "report.md").read_text()
    source = text.split("Source run: `", 1)[1].split("`", 1)[0] if "Source run: `" in text else None
    if source is None:
        raise ValueError(f"{out / 'report.md'}: no 'Source run' line (written by an older report)")
    docs.mkdir(parents=True, exist_ok=True)
    rep = out / "clusters" / "report"
    sheets = sorted(rep.glob("sheet_*.png")) if rep.is_dir() else []
    pngs = {n: out / n for n in ("loss_curve.png", "eval_curve.png", "probe.png") if (out / n).is_file()}
    if (rep / "cluster_sizes.png").is_file():  # the report's histogram (clustering/report.py's name)
        pngs["cluster_sizes.png"] = rep / "cluster_sizes.png"
    # the sheets the report shows (sheets[:3] above)
    pngs.update({name: p for name, p in zip(("contact_sheet.png", "contact_sheet_2.png", "contact_sheet_3.png"),
                                            sheets)})
    written = []
    for name, src in pngs.items():
        stamp_copy(src, docs / name, source)
        written.append(docs / name)
        text = text.replace(f"]({src.relative_to(out)})", f"]({name})")  # links to the copies
    atomic_write_text(docs / "report.md", text)
    return written + [docs / "report.md"]
