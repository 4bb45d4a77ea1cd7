"""`mlcd rice-demo --seeds S1 S2 ...`: the RICE vs MLCD region comparison repeated over seeds.

The data, the stage-1 stores and both clusterings are made once (the demo's own stages); then per
seed S, under ``{run.out_dir}/seed{S}/``: train RICE, export, train MLCD, export, eval-regions,
then report.md is rewritten (an interrupted run has whole seeds to show). ``run.seed=S``
is the only change between seeds (initialization, data order, the probe's validation split); the
random-init baseline takes the same seed. Every step is a demo stage (``rice_demo_state.json``),
so a rerun resumes at the first unfinished one. report.md: stage times, the mean +- standard
deviation over seeds of every table cell, then each seed's own table.
"""
from __future__ import annotations

import json

import numpy as np

from pipeline.core.config import load_config
from pipeline.core.io import atomic_write_text, read_json

NAMES = ("rice", "mlcd")


def seed_overrides(demo, seed: int) -> list[str]:
    """run.seed, and the per-seed folders of training, export and eval-regions."""
    from training.evaluation.regions import RegionEvalConfig
    d = demo.out / f"seed{seed}"
    over = [f"run.seed={seed}", f"eval_regions.out_dir={d / 'eval_regions'}"]
    _, ecfg = load_config(demo.config, demo.overrides, "eval_regions", RegionEvalConfig)
    exports = {str(demo.out / f"export_{n}"): str(d / f"export_{n}") for n in NAMES}
    for i, m in enumerate(ecfg.models):  # the run file names the single-seed exports: move them
        if m.path in exports:
            over.append(f"eval_regions.models.{i}.path={exports[m.path]}")
        if m.kind == "random":
            over.append(f"eval_regions.models.{i}.seed={seed}")
    return over


def run_seeds(demo, shared: tuple[str, ...], seeds: list[int]) -> None:
    for name in shared:
        demo.stage(name, getattr(demo, name))
    for s in seeds:
        d = demo.out / f"seed{s}"
        for n in NAMES:
            train = [*seed_overrides(demo, s), f"train.regions.enabled={'true' if n == 'rice' else 'false'}",
                     f"train.out_dir={d / f'train_{n}'}"]
            demo.stage(f"seed{s}/train_{n}",
                       lambda t=train: demo.mlcd("train", *demo._cfg(*t), nproc=demo.nproc))
            demo.stage(f"seed{s}/export_{n}",
                       lambda n=n: demo.mlcd("export", str(d / f"train_{n}"), str(d / f"export_{n}")))
        demo.stage(f"seed{s}/eval_regions",
                   lambda s=s: demo.mlcd("eval-regions", *demo._cfg(*seed_overrides(demo, s))))
        report(demo, seeds)  # after each seed: an interrupted run has whole seeds to show


def _cells(results: dict) -> dict[tuple[str, str], float]:
    """(model row, column) -> top-1 % from one results.json (its markdown table's cells)."""
    out = {}
    for r in results.get("results", []):
        if "linear" not in r:
            continue
        row = r["model"] + (f" [{r['feature']}]" if r.get("feature") else "")
        out[(row, f"{r['task']} linear")] = 100 * r["linear"]["top1"]
        out[(row, f"{r['task']} k-NN")] = 100 * r["knn"]["top1"]
    return out


def seeds_table(per_seed: dict[int, dict]) -> str:
    """Mean +- standard deviation (ddof 1) over seeds of every cell present in all of them."""
    cells = [_cells(r) for r in per_seed.values()]
    rows = list(dict.fromkeys(k[0] for c in cells for k in c))
    cols = list(dict.fromkeys(k[1] for c in cells for k in c))
    lines = ["| model [feature] | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for row in rows:
        vals = []
        for col in cols:
            v = [c[(row, col)] for c in cells if (row, col) in c]
            vals.append("n/a" if len(v) < len(cells) else  # one seed: no spread to show
                        f"{np.mean(v):.1f}" + (f" ± {np.std(v, ddof=1):.1f}" if len(v) > 1 else ""))
        lines.append(f"| {row} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def report(demo, seeds: list[int]) -> str:
    per_seed = {}
    for s in seeds:
        p = demo.out / f"seed{s}" / "eval_regions" / "results.json"
        if p.is_file():
            per_seed[s] = read_json(p)
    times = "\n".join(f"| {k} | {v['seconds']:.0f} |" for k, v in demo.state["stages"].items())
    total = sum(v["seconds"] for v in demo.state["stages"].values())
    text = [f"# RICE vs MLCD over seeds {', '.join(map(str, seeds))}: {demo.out}\n",
            f"Stage times (s, this machine; sum {total:.0f} s):\n\n| stage | s |\n|---|---:|\n{times}\n"]
    if per_seed:
        text.append(f"Top-1 accuracy (%) on probe/test, mean ± std over the seeds evaluated so far "
                    f"{sorted(per_seed)}:\n\n"
                    + seeds_table(per_seed))
    for s in seeds:
        md = demo.out / f"seed{s}" / "eval_regions" / "results.md"
        text.append(f"## seed {s}\n\n" + (md.read_text() if md.is_file() else "(eval-regions has not run)\n"))
    out = "\n".join(text)
    atomic_write_text(demo.out / "report.md", out)
    atomic_write_text(demo.out / "report_seeds.json", json.dumps(
        {str(s): {f"{r} | {c}": v for (r, c), v in _cells(js).items()} for s, js in per_seed.items()},
        indent=1))
    print(out)
    return out

