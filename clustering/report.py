"""For humans: a cluster-size histogram and contact sheets (member images of sampled clusters,
fetched from the source shards by key) with a small HTML index; wandb gets the PNGs.

Runs at the end of ``clustering.assign`` (``assign.report``), or alone:
    python -m clustering.report --config configs/demo.yaml
Memory: one part's top-1 labels at a time, plus the few members kept per sampled cluster.
Shards given as URLs or ``pipe:`` commands are skipped (only local tars are opened).
"""
from __future__ import annotations

import html
import logging
import os
import tarfile
from pathlib import Path

import numpy as np

from pipeline.core import fs
from pipeline.core.images import is_image_name, load_rgb
from pipeline.core.io import atomic_path, atomic_write_text, load_npy
from pipeline.core.shards import FS_SCHEMES, is_url, member_cap, open_shard, scheme
from pipeline.core.store import EmbeddingStore, LabelStore

log = logging.getLogger("mlcd.report")


SIM_BINS = np.linspace(-1.0, 1.0, 201)  # top-1 cosine similarity histogram (fixed bins: streamed)


def cluster_sizes(labels: LabelStore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows per cluster by top-1 label over the whole store (part by part), the sum of their top-1
    similarities per cluster, and the histogram of every row's top-1 similarity (SIM_BINS)."""
    sizes, sims = np.zeros(0, np.int64), np.zeros(0, np.float64)
    hist = np.zeros(len(SIM_BINS) - 1, np.int64)
    for p in labels.parts():
        lab, sim = labels.load(p, mmap=True)
        top1, s1 = np.asarray(lab[:, 0]), np.asarray(sim[:, 0], dtype=np.float64)
        ok = top1 >= 0
        b = np.bincount(top1[ok])
        w = np.bincount(top1[ok], weights=s1[ok], minlength=len(b))
        if len(b) > len(sizes):
            sizes, sims = np.pad(sizes, (0, len(b) - len(sizes))), np.pad(sims, (0, len(b) - len(sims)))
        sizes[:len(b)] += b
        sims[:len(w)] += w
        hist += np.histogram(np.clip(s1[ok], -1, 1), SIM_BINS)[0]
    return sizes, sims, hist


def plot_histogram(sizes: np.ndarray, k: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = np.pad(sizes, (0, max(0, k - len(sizes))))
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.hist(sizes, bins=min(60, max(10, int(sizes.max()) + 1)), color="#3b6ea5")
    ax.set_yscale("log")  # a few huge clusters and a long tail: counts span decades
    ax.set_xlabel("images per cluster (top-1 label)")
    ax.set_ylabel("clusters (log scale)")
    ax.set_title(f"K={k}: {int((sizes == 0).sum())} empty, median {np.median(sizes):.0f}, max {sizes.max()}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_similarity(hist: np.ndarray, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.stairs(np.maximum(hist, 0.5), SIM_BINS, fill=True, color="#a56e3b")  # 0.5: empty bins on a log axis
    ax.set_yscale("log")
    nz = np.nonzero(hist)[0]
    if len(nz):
        ax.set_xlim(SIM_BINS[nz[0]], SIM_BINS[nz[-1] + 1])
    ax.set_xlabel("cosine similarity to the top-1 center")
    ax.set_ylabel("images (log scale)")
    mean = float((hist * (SIM_BINS[:-1] + SIM_BINS[1:]) / 2).sum() / max(hist.sum(), 1))
    ax.set_title(f"{int(hist.sum())} images, mean top-1 similarity {mean:.3f}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def pick_members(store: EmbeddingStore, labels: LabelStore, chosen: np.ndarray, m: int
                 ) -> dict[int, list[tuple[float, int, int]]]:
    """Per chosen cluster, the m rows with the highest top-1 similarity: [(sim, part, row)]."""
    best: dict[int, list] = {int(c): [] for c in chosen}
    for p in labels.parts():
        lab, sim = labels.load(p, mmap=True)
        top1, s1 = np.asarray(lab[:, 0]), np.asarray(sim[:, 0], dtype=np.float32)
        for c in np.intersect1d(chosen, top1):
            rows = np.nonzero(top1 == c)[0]
            rows = rows[np.argsort(-s1[rows], kind="stable")[:m]]
            best[int(c)] = sorted(best[int(c)] + [(float(s1[r]), p, int(r)) for r in rows], reverse=True)[:m]
    return best


def fetch_images(wanted: dict[str, set[str]]) -> dict[tuple[str, str], bytes]:
    """{(shard, key): image bytes}, one sequential pass over each needed local tar."""
    out = {}
    for shard, keys in wanted.items():
        if not _readable(shard):
            log.warning("contact sheets: cannot open shard %s (not a local file or object); skipped", shard)
            continue
        with open_shard(shard) as raw, tarfile.open(fileobj=raw, mode="r|*") as tf:
            for ti in tf:
                base = os.path.basename(ti.name)
                key = base.partition(".")[0]
                if key in keys and is_image_name(base) and (shard, key) not in out and ti.size <= member_cap():
                    f = tf.extractfile(ti)  # None for a member that is not a regular file
                    if f is not None:
                        out[(shard, key)] = f.read()
    return out


def _readable(shard: str) -> bool:
    """A local tar, or an object-store URL the run may read (``open_shard`` streams it)."""
    if not is_url(shard):
        return os.path.isfile(shard)
    try:
        return scheme(shard) in FS_SCHEMES and fs.isfile(fs.check(shard, "shard"))
    except fs.FsError:
        return False


def contact_sheet(images: list[bytes | None], thumb: int, path: Path) -> None:
    from PIL import Image
    sheet = Image.new("RGB", (thumb * max(1, len(images)), thumb), "white")
    for i, b in enumerate(images):
        if b is None:
            continue
        im, why = load_rgb(b, draft=thumb)
        if im is None:  # leave its cell blank
            log.warning("contact sheet %s: unreadable image (%s)", path.name, why)
            continue
        im.thumbnail((thumb, thumb))
        sheet.paste(im, (i * thumb + (thumb - im.width) // 2, (thumb - im.height) // 2))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def make_report(store_root: str, labels_dir: str | Path, report_dir: str | Path, n_clusters: int,
                n_members: int, seed: int, tracker=None, thumb: int = 96) -> Path:
    report = Path(report_dir)
    fs.makedirs(report)
    store, labels = EmbeddingStore(store_root), LabelStore(labels_dir)
    centroids = Path(labels_dir).parent / "centroids.npy"
    k = int(load_npy(centroids, mmap=True).shape[0]) if fs.isfile(centroids) else 0
    sizes, sim_sums, sim_hist = cluster_sizes(labels)
    k = max(k, len(sizes))
    plot_histogram(sizes, k, report / "cluster_sizes.png")
    plot_similarity(sim_hist, report / "top1_similarity.png")
    nonempty = np.nonzero(sizes)[0]
    rng = np.random.default_rng([seed, 0xC0])
    chosen = np.sort(rng.choice(nonempty, size=min(n_clusters, len(nonempty)), replace=False))
    members = pick_members(store, labels, chosen, n_members)
    meta = {}  # (part, row) -> (shard, key, caption)
    for p in sorted({p for ms in members.values() for _, p, _ in ms}):
        rows = sorted({r for ms in members.values() for _, q, r in ms if q == p})
        t = store.metadata(p).take(rows).to_pydict()
        for i, r in enumerate(rows):
            meta[(p, r)] = (str(t["shard"][i]) if "shard" in t else "", str(t.get("key", t.get("image_path", [""] * len(rows)))[i]),
                            str(t.get("caption", [""] * len(rows))[i] or ""))
    wanted: dict[str, set[str]] = {}
    for shard, key, _ in meta.values():
        wanted.setdefault(shard, set()).add(key)
    images = fetch_images(wanted)
    rows_html = []
    for c in chosen:
        ms = members[int(c)]
        info = [meta[(p, r)] for _, p, r in ms]
        name = f"sheet_{int(c):07d}.png"
        contact_sheet([images.get((s, k_)) for s, k_, _ in info], thumb, report / name)
        caps = "<br>".join(f"{html.escape(cap[:80])} <small>({sim:.2f})</small>"
                           for (sim, _, _), (_, _, cap) in zip(ms, info))
        rows_html.append(f"<tr><td>{int(c)}</td><td>{int(sizes[c])}</td>"
                         f"<td><img src='{name}'></td><td>{caps}</td></tr>")
        if tracker is not None:
            tracker.log_image(f"clusters/sheet_{int(c)}", str(report / name),
                              caption=f"cluster {int(c)}: {int(sizes[c])} images, mean top-1 similarity "
                                      f"{sim_sums[c] / max(sizes[c], 1):.3f}; best {len(ms)} shown")
    page = ("<html><head><meta charset='utf-8'><title>clusters</title></head><body>"
            f"<h2>{len(sizes)} clusters, {int(sizes.sum())} labeled images</h2>"
            "<img src='cluster_sizes.png'><table border=1 cellpadding=4>"
            "<tr><th>cluster</th><th>size</th><th>members (best first)</th><th>captions (sim)</th></tr>"
            + "\n".join(rows_html) + "</table></body></html>\n")
    atomic_write_text(report / "index.html", page)
    if tracker is not None:
        tracker.log_image("clusters/size_histogram", str(report / "cluster_sizes.png"),
                          caption=f"images per cluster (top-1), K = {k}, log scale")
        tracker.log_image("clusters/top1_similarity", str(report / "top1_similarity.png"),
                          caption="cosine similarity of each image to its top-1 center, log scale")
        tracker.log_histogram("clusters/sizes", np.pad(sizes, (0, max(0, k - len(sizes)))))
        tracker.log_histogram("clusters/top1_similarity_hist", sim_hist, SIM_BINS)
    log.info("report: %d contact sheets, %d/%d images found -> %s", len(chosen), len(images),
             len(meta), fs.url_of(report / "index.html"))
    return report / "index.html"


def main(config: str | None = None, overrides=()) -> Path:
    from pipeline.core.config import load_config
    from pipeline.core.dist import DistContext
    from pipeline.core.stages import schema
    from pipeline.core.tracking import Tracker, setup_logging
    # the report's settings are the assign section's (through the registry: assign imports us)
    run, cfg = load_config(config, list(overrides), "assign", schema("assign"))
    setup_logging()
    tracker = Tracker(run, DistContext(), cfg.report_dir, "cluster-report", {})
    try:
        return make_report(cfg.store, cfg.out_dir, cfg.report_dir, cfg.report_clusters,
                           cfg.report_members, run.seed, tracker)
    finally:
        tracker.finish()


def cli(argv=None) -> int:
    from pipeline.core.entry import cli_main
    return cli_main(main, argv)


if __name__ == "__main__":
    cli()
