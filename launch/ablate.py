"""`mlcd ablate` / `make ablation`: does this implementation move with MLCD's knobs the way the
paper's ablations do? (the paper's numbers: docs/LOSS.md)

One data build, one embedding store and one clustering per K (`{root}/k{K}/clusters`, top-l
labels with l = the largest l of the grid: training takes each image's first l), then a grid of
training runs at equal optimizer steps, one factor at a time around the base cell:
l (`labels`), rho (`sample_rates`), K (`k_factors` x cluster.k), loss (`losses`), negative rule
(`negatives`), plus UNICOM; each cell x seed trains, exports and is probed (linear + k-NN) in
its own folder `{root}/cells/{cell}/s{seed}`. A finished cell x seed leaves `cell.json` and is
skipped on a rerun; an unfinished one resumes (every stage resumes by itself). `--quick`: the
`quick_*` grid (l x rho, crossed) with `quick_overrides` (a smaller pool and budget).
Writes `{root}/report.md`: mean +- std over seeds per cell, next to the paper's numbers.

Every stage runs as its own `mlcd` command (a subprocess; training under torchrun), so this file
depends only on the stages' command lines and output files.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from launch.plots import probe_panel, save_png
from pipeline.core.config import ConfigError, RunConfig, check, load_sections
from pipeline.core.io import atomic_write_json, atomic_write_text, read_json

log = logging.getLogger("mlcd.ablate")
ROOT = Path(__file__).resolve().parents[1]

# MLCD (arXiv 2407.17331) ablations, ImageNet linear probe top-1 (%), ViT-B/32: factor -> value ->
# number. K is relative to the base K (1M in the paper); the loss row compares eq. 4 and eq. 5.
PAPER = {
    "l": {1: 71.4, 8: 75.2, 32: 68.7},
    "rho": {0.01: 73.4, 0.1: 75.2, 1.0: 63.2},
    "k": {0.1: 66.9, 1.0: 75.2, 5.0: 74.7},
    "loss": {"mlc": 76.9, "mlcd": 78.1},
}


@dataclass
class AblateConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    nproc: int = 2                  # training ranks (torchrun)
    # the base cell (every other cell changes one of these)
    l: int = 8
    rho: float = 0.1
    loss: str = "mlcd"
    negatives: str = "sampled"
    # the grid, one factor at a time
    labels: list[int] = field(default_factory=lambda: [1, 8, 32])
    sample_rates: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    k_factors: list[float] = field(default_factory=lambda: [0.1, 1.0, 5.0])  # x cluster.k
    losses: list[str] = field(default_factory=lambda: ["mlcd", "mlc"])
    negative_rules: list[str] = field(default_factory=lambda: ["sampled", "batch"])
    unicom: bool = True
    # compare (configs/compare.yaml): MLCD (the base cell) vs UNICOM vs CLIP (train.objective=clip,
    # training/clip_head.py) instead of the knob grid, plus MLCD and CLIP again at each
    # budget_factors x train.steps; reference rows (random init, stage-1 encoder) per seed
    compare: bool = False
    budget_factors: list[int] = field(default_factory=lambda: [2])
    # --quick: labels x sample_rates crossed, other factors at the base, plus these overrides
    quick_labels: list[int] = field(default_factory=lambda: [1, 8])
    quick_sample_rates: list[float] = field(default_factory=lambda: [0.1, 1.0])
    quick_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    quick_overrides: list[str] = field(default_factory=list)

    def __post_init__(self):
        check(len(self.seeds) >= 1, "seeds", self.seeds, "needs at least one seed")
        check(self.nproc >= 1, "nproc", self.nproc, "must be >= 1")
        check(self.loss in ("mlcd", "mlc"), "loss", self.loss, "must be mlcd or mlc")
        check(self.negatives in ("sampled", "batch"), "negatives", self.negatives, "must be sampled or batch")
        for name in ("labels", "quick_labels"):
            check(all(v >= 1 for v in getattr(self, name)), name, getattr(self, name), "must be >= 1")
        for name in ("sample_rates", "quick_sample_rates"):
            check(all(0 < v <= 1 for v in getattr(self, name)), name, getattr(self, name), "must be in (0, 1]")
        check(all(v > 0 for v in self.k_factors), "k_factors", self.k_factors, "must be > 0")
        check(set(self.losses) <= {"mlcd", "mlc"}, "losses", self.losses, "must be mlcd / mlc")
        check(set(self.negative_rules) <= {"sampled", "batch"}, "negative_rules", self.negative_rules,
              "must be sampled / batch")
        check(all(f >= 2 for f in self.budget_factors), "budget_factors", self.budget_factors, "must be >= 2")


@dataclass(frozen=True)
class Cell:
    factor: str       # which knob this cell varies ("base" for the center)
    l: int
    rho: float
    k: int
    loss: str         # mlcd | mlc | unicom | clip (the contrastive baseline)
    negatives: str
    steps: int = 0    # train.steps of this cell; 0 = the config's

    @property
    def name(self) -> str:
        budget = f"_steps{self.steps}" if self.steps else ""
        if self.loss == "clip":
            return f"clip{budget}"
        return f"l{self.l}_rho{self.rho:g}_k{self.k}_{self.loss}_{self.negatives}{budget}"

    def train_overrides(self) -> list[str]:
        # clip: the base cell's settings (same labeled-key stream, so the same images in the same
        # order), the contrastive head instead of MLCD's in the loss
        mode = "mlcd" if self.loss == "clip" else self.loss
        return [f"train.loss.mode={mode}", f"train.loss.num_labels={self.l}",
                f"train.partial_fc.sample_rate={self.rho}", f"train.partial_fc.negatives={self.negatives}",
                "train.partial_fc.num_classes=0",  # K from the centroids file of this K
                *(["train.objective=clip"] if self.loss == "clip" else []),
                *([f"train.steps={self.steps}", f"train.checkpoint.every={self.steps}"] if self.steps else [])]


def grid(cfg: AblateConfig, base_k: int, quick: bool = False, steps: int = 0) -> list[Cell]:
    """The cells in report order, each once (the base cell is shared by every factor). steps:
    train.steps (compare's budget cells run budget_factors x it)."""
    base = Cell("base", cfg.l, cfg.rho, base_k, cfg.loss, cfg.negatives)
    cells = [base]
    if cfg.compare:
        clip = Cell("clip", cfg.l, cfg.rho, base_k, "clip", cfg.negatives)
        cells += [Cell("unicom", 1, cfg.rho, base_k, "unicom", cfg.negatives), clip]
        for f in cfg.budget_factors:
            cells += [dataclasses.replace(c, factor=f"{f}x steps", steps=f * steps) for c in (base, clip)]
        return cells

    def add(c: Cell):
        if all((c.l, c.rho, c.k, c.loss, c.negatives) != (d.l, d.rho, d.k, d.loss, d.negatives) for d in cells):
            cells.append(c)
    if quick:
        for l, rho in itertools.product(cfg.quick_labels, cfg.quick_sample_rates):
            add(Cell("l x rho", l, rho, base_k, cfg.loss, cfg.negatives))
        return cells
    for l in cfg.labels:
        add(Cell("l", l, cfg.rho, base_k, cfg.loss, cfg.negatives))
    for rho in cfg.sample_rates:
        add(Cell("rho", cfg.l, rho, base_k, cfg.loss, cfg.negatives))
    for f in cfg.k_factors:
        add(Cell("k", cfg.l, cfg.rho, max(2, round(base_k * f)), cfg.loss, cfg.negatives))
    for loss in cfg.losses:
        add(Cell("loss", cfg.l, cfg.rho, base_k, loss, cfg.negatives))
    for rule in cfg.negative_rules:
        add(Cell("negatives", cfg.l, cfg.rho, base_k, cfg.loss, rule))
    if cfg.unicom:
        add(Cell("unicom", 1, cfg.rho, base_k, "unicom", cfg.negatives))
    return cells


class Ablation:
    def __init__(self, config: str, overrides: list[str], quick: bool, dry_run: bool = False):
        self.quick, self.dry_run = quick, dry_run
        sec = load_sections(config, overrides, {"run": RunConfig, "ablate": AblateConfig})
        self.cfg: AblateConfig = sec["ablate"]
        # quick overrides first: the command line's own overrides still win
        self.overrides = ([*self.cfg.quick_overrides] if quick else []) + list(overrides)
        sec = load_sections(config, self.overrides, {"run": RunConfig, "ablate": AblateConfig})
        self.config, self.run = config, sec["run"]
        self.root = Path(self.run.out_dir)
        self.base_k = int(self._section_value("cluster", "k"))
        self.seeds = self.cfg.quick_seeds if quick else self.cfg.seeds
        self.train_cfg = self._section_value("train", None)
        self.cells = grid(self.cfg, self.base_k, quick, self.train_cfg.steps)
        self.l_max = max(c.l for c in self.cells)
        self.state_path = self.root / "ablate_state.json"
        self.state = read_json(self.state_path) if self.state_path.exists() else {"done": {}}

    def _section_value(self, section: str, key: str):
        """A value of another stage's section, as that stage's own schema resolves it."""
        from launch.check import schemas
        sec = load_sections(self.config, self.overrides, {"run": RunConfig, section: schemas()[section]})
        return sec[section] if key is None else getattr(sec[section], key)

    # ------------------------------------------------------------ running stages
    def mlcd(self, *args: str, nproc: int = 1) -> None:
        from launch.cli import mlcd_child
        cmd, env = mlcd_child(list(args), nproc)
        log.info("+ %s", " ".join(cmd))
        if self.dry_run:
            return
        if subprocess.call(cmd, env=env, cwd=ROOT) != 0:
            raise SystemExit(f"ablate: `{' '.join(args[:1])}` failed (see above); rerun to resume")

    def once(self, key: str, fn) -> None:
        """A shared stage (data, embed, cluster/assign per K), recorded when finished."""
        if self.state["done"].get(key):
            return
        t0 = time.perf_counter()
        fn()
        if not self.dry_run:
            self.state["done"][key] = round(time.perf_counter() - t0, 1)
            atomic_write_json(self.state_path, self.state)

    def clusters(self, k: int) -> Path:
        return self.root / f"k{k}" / "clusters"

    def shared(self) -> None:
        c, o = self.config, self.overrides
        self.once("data", lambda: self.mlcd("data", "demo", "--config", c, *o))
        self.once("embed", lambda: self.mlcd("embed", "--config", c, *o))
        for k in sorted({cell.k for cell in self.cells}):
            d = self.clusters(k)
            self.once(f"cluster_k{k}", lambda d=d, k=k: self.mlcd(
                "cluster", "--config", c, *o, f"cluster.k={k}", f"cluster.out_dir={d}"))
            self.once(f"assign_k{k}_l{self.l_max}", lambda d=d: self.mlcd(
                "assign", "--config", c, *o, f"assign.l={self.l_max}", f"assign.centroids={d}/centroids.npy",
                f"assign.out_dir={d}/labels", f"assign.report_dir={d}/report"))

    def cell_dir(self, cell: Cell, seed: int) -> Path:
        return self.root / "cells" / cell.name / f"s{seed}"

    def run_cell(self, cell: Cell, seed: int) -> None:
        d = self.cell_dir(cell, seed)
        if (d / "cell.json").exists():
            log.info("cell %s seed %d: done, skipping", cell.name, seed)
            return
        c, o = self.config, self.overrides
        k_dir = self.clusters(cell.k)
        t0 = time.perf_counter()
        self.mlcd("train", "--config", c, *o, f"run.seed={seed}", f"train.out_dir={d}/train",
                  f"train.data.labels={k_dir}/labels", f"train.centroids={k_dir}/centroids.npy",
                  *cell.train_overrides(), nproc=self.cfg.nproc)
        train_s = time.perf_counter() - t0
        self.mlcd("export", str(d / "train"), str(d / "export"))
        self.mlcd("eval", "--config", c, *o, f"run.seed={seed}", f"eval.out_dir={d}/eval",
                  f"eval.models=[{{name: trained, kind: hf, path: '{d}/export'}}]")
        if self.dry_run:
            return
        res = read_json(d / "eval" / "results.json")["results"]
        atomic_write_json(d / "cell.json", {"cell": asdict(cell), "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
                                            **compute(d / "train", cell, self.train_cfg, self.cfg.nproc, train_s),
                                            "results": {r["dataset"]: {"linear": r["linear"]["top1"], "knn": r["knn"]["top1"]}
                                                        for r in res if r["model"] == "trained"}})

    def reference(self) -> None:
        """The same architecture at random init, and the stage-1 encoder whose features were
        clustered (one eval; random init needs any cell's export for its shape)."""
        d = self.root / "cells" / "random_init"
        if (d / "cell.json").exists():
            return
        export = self.cell_dir(self.cells[0], self.seeds[0]) / "export"
        # compare: one random init per seed (the arms' seeds); the stage-1 encoder has no seed
        inits = [f"random_init_s{s}" for s in self.seeds] if self.cfg.compare else ["random_init"]
        models = [f"{{name: {m}, kind: random, path: '{export}', seed: {self.seeds[i] if self.cfg.compare else 0}}}"
                  for i, m in enumerate(inits)]
        self.mlcd("eval", "--config", self.config, *self.overrides, f"eval.out_dir={d}/eval",
                  f"eval.models=[{', '.join(models)}, {{name: stage1_encoder, kind: encoder, model: '${{embed.encoder}}'}}]")
        if not self.dry_run:
            res = read_json(d / "eval" / "results.json")["results"]
            atomic_write_json(d / "cell.json", {m: {r["dataset"]: {"linear": r["linear"]["top1"], "knn": r["knn"]["top1"]}
                                                    for r in res if r["model"] == m}
                                                for m in (*inits, "stage1_encoder")})

    def all(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        log.info("%d cells x %d seeds: %s", len(self.cells), len(self.seeds), [c.name for c in self.cells])
        self.shared()
        # seed-major: after the first pass every cell has one seed, so a grid stopped early (or
        # read while running: the report is rewritten after each pass) still covers every knob
        for seed in self.seeds:
            for cell in self.cells:
                self.run_cell(cell, seed)
            if seed == self.seeds[0]:
                self.reference()
            if not self.dry_run:
                self.write_report()
        return "" if self.dry_run else (self.root / "report.md").read_text()

    def write_report(self) -> None:
        if self.cfg.compare:
            from launch.compare import compare_report
            atomic_write_text(self.root / "report.md", compare_report(self.root, self.cells, self.seeds,
                                                                             self.train_cfg.steps))
            return
        text = report(self.root, self.cells, self.seeds, self.quick)
        atomic_write_text(self.root / "report.md", text)
        plot(self.root, self.cells, self.seeds)


def compute(train_dir: Path, cell: Cell, train_cfg, nproc: int, train_s: float) -> dict:
    """What a cell's training cost: wall-clock (the train command, and per step from its metrics:
    the loop's own clock, no start-up) and model FLOPs per optimizer step (launch/compare.py)."""
    from launch.compare import step_flops
    out = {"train_seconds": round(train_s, 1), "flops_per_step": step_flops(cell, train_cfg, nproc)}
    path = train_dir / "metrics.jsonl"
    if path.exists():
        # each line: its window's mean step time + data wait (windows of run.log_every steps)
        rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        if rows:
            out["s_per_step"] = statistics.fmean(r["step_s"] + r["data_wait_s"] for r in rows)
    return out


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = 100 * statistics.fmean(xs)
    sd = 100 * statistics.stdev(xs) if len(xs) > 1 else float("nan")
    return f"{m:.1f} +- {sd:.1f}"


def paper_value(cell: Cell, base: Cell) -> str:
    """MLCD's number for the knob this cell changes (none when it changes two, or none ran)."""
    v = None
    if cell.factor == "base":
        v = PAPER["l"][8]  # the paper's base row (l = 8, rho = 0.1, K = 1M)
    elif cell.factor in ("l", "rho", "l x rho"):
        if cell.rho == base.rho:
            v = PAPER["l"].get(cell.l)
        elif cell.l == base.l:
            v = PAPER["rho"].get(cell.rho)
    elif cell.factor == "k":
        v = PAPER["k"].get(round(cell.k / base.k, 2))
    elif cell.factor == "loss" and cell.loss in PAPER["loss"]:
        # a separate comparison in the paper (another setting): show both of its numbers
        return f"{PAPER['loss'][cell.loss]:.1f} (mlcd {PAPER['loss']['mlcd']:.1f})"
    return "-" if v is None else f"{v:.1f}"


def report(root: Path, cells: list[Cell], seeds: list[int], quick: bool) -> str:
    """Mean +- std over seeds of each cell's linear-probe and k-NN top-1, per probe dataset."""
    rows, datasets = [], []
    for cell in cells:
        per = [read_json(root / "cells" / cell.name / f"s{s}" / "cell.json")
               for s in seeds if (root / "cells" / cell.name / f"s{s}" / "cell.json").exists()]
        for p in per:
            datasets += [d for d in p["results"] if d not in datasets]
        rows.append((cell, per))
    ref_path = root / "cells" / "random_init" / "cell.json"
    refs = read_json(ref_path) if ref_path.exists() else {}
    head = "| factor | cell | seeds | " + " | ".join(f"{d} linear | {d} k-NN" for d in datasets) + " | paper (IN linear) |"
    lines = [f"# Ablation{' (quick)' if quick else ''}: {root}", "",
             "Top-1 (%) on held-out probe sets, mean +- std over seeds (run.seed also redraws the "
             "training order and init); the paper column is MLCD's ImageNet linear probe for the same "
             "knob value (ViT-B/32, docs/LOSS.md) — compare directions, not levels.", "",
             head, "|---|---|---:|" + "---:|---:|" * len(datasets) + "---:|"]
    for cell, per in rows:
        vals = []
        for d in datasets:
            for probe in ("linear", "knn"):
                vals.append(_mean_std([p["results"][d][probe] for p in per if d in p["results"]]))
        lines.append(f"| {cell.factor} | {cell.name} | {len(per)} | " + " | ".join(vals)
                     + f" | {paper_value(cell, cells[0])} |")
    for name, ref in refs.items():
        vals = [f"{100 * ref[d][probe]:.1f}" if d in ref else "-" for d in datasets for probe in ("linear", "knn")]
        lines.append(f"| reference | {name.replace('_', ' ')} | 1 | " + " | ".join(vals) + " | - |")
    return "\n".join(lines) + "\n"


def plot(root: Path, cells: list[Cell], seeds: list[int]) -> None:
    """report.png: per probe set and probe, mean +- std per cell (bars), references as lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    per = {c.name: [read_json(p)["results"] for s in seeds
                    if (p := root / "cells" / c.name / f"s{s}" / "cell.json").exists()] for c in cells}
    datasets = sorted({d for rs in per.values() for r in rs for d in r})
    if not datasets:
        return
    ref_path = root / "cells" / "random_init" / "cell.json"
    refs = read_json(ref_path) if ref_path.exists() else {}
    fig, axes = plt.subplots(len(datasets), 2, figsize=(12, 3.2 * len(datasets)), squeeze=False)
    labels = [f"{c.factor}: {c.name}" for c in cells]
    for i, d in enumerate(datasets):
        for j, probe in enumerate(("linear", "knn")):
            vals = [[100 * r[d][probe] for r in per[c.name] if d in r] for c in cells]
            probe_panel(axes[i][j], labels, vals, {n: 100 * ref[d][probe] if d in ref else None
                                                   for n, ref in refs.items()},
                        f"{d} {probe} top-1 (%)", j == 0, "tab:blue", 0.7, 7)
    save_png(fig, root / "report.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mlcd ablate")
    ap.add_argument("--config", default=str(ROOT / "configs" / "ablation.yaml"))
    ap.add_argument("--quick", action="store_true", help="the quick grid (l x rho) on the quick data")
    ap.add_argument("--dry-run", action="store_true", help="print the stage commands only")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        text = Ablation(args.config, args.overrides, args.quick, args.dry_run).all()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
