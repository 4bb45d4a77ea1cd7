"""`make rice-demo` / `mlcd rice-demo`: RICE's region path end to end on real offline images, then
a region-level evaluation against image-level MLCD and random init at equal steps.

scenes (openclipart objects at known boxes + words rendered with Noto fonts) -> stage 1 on whole
scenes (image store) -> k-means + top-l (image labels: the run file's `cluster:`/`assign:`) ->
stage 1b regions (object boxes from the boxes file, OCR words from Tesseract, crops embedded with
the stage-1 encoder) -> stage 2 unchanged on the region store (`cluster@regions:`/`assign@regions:`,
named instances of the same sections) -> region labels (cluster ids + OCR token ids) -> train RICE
(image + region loss, Region Transformer layers) and, at the same steps, plain MLCD (image loss
only) -> export both to HF -> eval-regions: object-region probe and OCR-word recognition from
box-pooled patch features of RICE, MLCD and random init -> report.md.

Every stage resumes by itself; a finished stage (rice_demo_state.json) is skipped on a rerun.

--seeds S1 S2 ...: the data and stage 1-2 are made once; the trainings, exports and eval-regions run
once per seed (run.seed = S: initialization, data order, probe split; random init takes the same
seed) under ``seed{S}/``, each seed trained and evaluated in turn; report.md gives the mean and
spread over seeds next to each seed's table (launch/rice_seeds.py).
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from launch.demo import Demo
from pipeline.core.config import ConfigError, load_config
from pipeline.core.io import atomic_write_text, read_json

log = logging.getLogger("mlcd.rice_demo")
ROOT = Path(__file__).resolve().parents[1]

# the two trainings differ only in these (equal steps, data, seed and backbone)
TRAININGS = {
    "rice": ["train.regions.enabled=true", "train.out_dir=${run.out_dir}/train_rice"],
    "mlcd": ["train.regions.enabled=false", "train.out_dir=${run.out_dir}/train_mlcd"],
}
ORDER = ("data", "embed", "image_cluster", "image_assign", "regions", "region_cluster", "region_assign",
         "region_labels", "train_rice", "export_rice", "train_mlcd", "export_mlcd", "eval_regions")


class RiceDemo(Demo):
    def __init__(self, config: str, overrides: list[str], nproc: int, image_k: int | None,
                 seeds: list[int] | None = None):
        # --image-k: the image level's K (the run file's `cluster.k`); the region level is
        # `cluster@regions:`, which keeps its own k
        super().__init__(config, overrides + ([f"cluster.k={image_k}"] if image_k else []), nproc)
        self.state_path = self.out / "rice_demo_state.json"
        self.state = read_json(self.state_path) if self.state_path.exists() else {"stages": {}}
        self.seeds = seeds

    def mlcd(self, *args: str, nproc: int = 1) -> None:
        """One stage as its own `mlcd` process (training under torchrun with `nproc` ranks)."""
        from launch.cli import mlcd_child
        cmd, env = mlcd_child(list(args), nproc)
        log.info("+ %s", " ".join(cmd))
        if subprocess.call(cmd, env=env, cwd=ROOT) != 0:
            raise SystemExit(f"rice-demo: `{args[0]}` failed (see above); rerun `make rice-demo` to resume")

    def _cfg(self, *extra: str) -> list[str]:
        return ["--config", self.config, *self.overrides, *extra]

    def data(self):
        self.mlcd("data", "rice", *self._cfg())

    def embed(self):
        self.mlcd("embed", *self._cfg())

    # stage 2 twice, both in the run file: `cluster:`/`assign:` (image level) and their
    # `@regions` instances (region level, pipeline/core/config.py)
    def image_cluster(self):
        self.mlcd("cluster", *self._cfg())

    def image_assign(self):
        self.mlcd("assign", *self._cfg())

    def regions(self):
        self.mlcd("regions", *self._cfg())

    def region_cluster(self):
        self.mlcd("cluster", "--instance", "regions", *self._cfg())

    def region_assign(self):
        self.mlcd("assign", "--instance", "regions", *self._cfg())

    def region_labels(self):
        self.mlcd("region-labels", *self._cfg())

    def _train(self, name: str):
        self.mlcd("train", *self._cfg(*TRAININGS[name]), nproc=self.nproc)

    def _export(self, name: str):
        from training.train import TrainConfig
        _, tcfg = load_config(self.config, [*self.overrides, *TRAININGS[name]], "train", TrainConfig)
        self.mlcd("export", tcfg.out_dir, str(self.out / f"export_{name}"))

    def eval_regions(self):
        self.mlcd("eval-regions", *self._cfg())

    def report(self):
        res = self.out / "eval_regions" / "results.md"
        times = "\n".join(f"| {k} | {v['seconds']:.0f} |" for k, v in self.state["stages"].items())
        text = (f"# RICE demo: {self.out}\n\nStage times (s, this machine):\n\n| stage | s |\n|---|---:|\n{times}\n\n"
                + (res.read_text() if res.is_file() else "(eval-regions has not run)\n"))
        atomic_write_text(self.out / "report.md", text)
        print(text)

    def all(self):
        if self.seeds:
            from launch.rice_seeds import run_seeds
            return run_seeds(self, ORDER[:ORDER.index("train_rice")], self.seeds)
        steps = {"train_rice": lambda: self._train("rice"), "export_rice": lambda: self._export("rice"),
                 "train_mlcd": lambda: self._train("mlcd"), "export_mlcd": lambda: self._export("mlcd")}
        for name in ORDER:
            self.stage(name, steps.get(name) or getattr(self, name))
        self.report()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mlcd rice-demo")
    ap.add_argument("--config", default=str(ROOT / "configs" / "rice_demo.yaml"))
    ap.add_argument("--nproc", type=int, default=2, help="training ranks (torchrun)")
    ap.add_argument("--image-k", type=int, default=None,
                    help="clusters of the whole-scene store (image loss; default: the run file's cluster.k)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="train and evaluate once per seed (data and clusters made once)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        RiceDemo(args.config, args.overrides, args.nproc, args.image_k, args.seeds).all()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
