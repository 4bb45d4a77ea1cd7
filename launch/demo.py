"""`make demo` / `mlcd demo`: the whole pipeline on real offline images, then a report.

demo shards -> embed (offline EfficientNet-Lite0 + MiniLM encoder) -> k-means -> top-8 labels
-> train a small 2D-RoPE ViT with DeepSpeed ZeRO-2 + PartialFC on 2 CPU ranks (torchrun)
-> export to HF and reload with transformers -> linear probe + k-NN of (a) the trained model,
(b) the same architecture at random init, (c) the stage-1 encoder -> runs/demo/report.md.

Each stage resumes by itself; a stage recorded in ``demo_state.json`` as finished is skipped, so
re-running `make demo` picks up where it stopped.
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

from pipeline.core.config import ConfigError, load_config, load_run
from pipeline.core.io import atomic_write_json, read_json

log = logging.getLogger("mlcd.demo")
AFTER_TRAIN = ("export", "eval")  # redone when training has moved on since they ran
ROOT = Path(__file__).resolve().parents[1]


class Demo:
    def __init__(self, config: str, overrides: list[str], nproc: int):
        self.config, self.overrides, self.nproc = config, list(overrides), nproc
        run = self.run = load_run(config, overrides)
        self.out = Path(run.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.state_path = self.out / "demo_state.json"
        self.state = read_json(self.state_path) if self.state_path.exists() else {"stages": {}}
        if "run_id" not in self.state:  # names this run in its report and PNGs (launch/report.py)
            self.state["run_id"] = f"{run.name or self.out.name}@{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
            atomic_write_json(self.state_path, self.state)

    def stage(self, name: str, fn) -> None:
        """Runs a stage unless recorded done. A stage after training records the step it saw, so a
        training run continued later (it had stopped at its time budget) redoes export and eval."""
        st, train_step = self.state["stages"].get(name, {}), self.state["stages"].get("train", {}).get("steps_done")
        if st.get("done") and (name not in AFTER_TRAIN or st.get("train_step") == train_step):
            log.info("stage %-8s already done (%.0f s), skipping", name, st["seconds"])
            return
        log.info("stage %-8s starting", name)
        t0 = time.perf_counter()
        res = dict(fn() or {})
        dt = time.perf_counter() - t0
        done = res.pop("done", True)
        self.state["stages"][name] = {"done": done, "seconds": round(dt, 1), **res}
        if name in AFTER_TRAIN:
            self.state["stages"][name]["train_step"] = self.state["stages"].get("train", {}).get("steps_done")
        atomic_write_json(self.state_path, self.state)
        log.info("stage %-8s %s in %.0f s", name, "done" if done else "stopped early", dt)

    # ------------------------------------------------------------ stages
    def data(self):
        from pipeline.demo import demo_data
        demo_data.main(self.config, self.overrides)

    def embed(self):
        from pipeline import embed
        embed.main(self.config, self.overrides)

    def cluster(self):
        from clustering import kmeans
        kmeans.main(self.config, self.overrides)

    def assign(self):
        from clustering import assign
        assign.main(self.config, self.overrides)

    def train(self):
        from launch.cli import torchrun_cmd, torchrun_env
        from pipeline.core.stages import module_of
        cmd = torchrun_cmd(module_of("train"), ["--config", self.config, *self.overrides], self.nproc)
        env = torchrun_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        log.info("+ %s", " ".join(cmd))
        if subprocess.call(cmd, env=env, cwd=ROOT) != 0:
            raise SystemExit("demo: training failed (see the log above); rerun `make demo` to resume")
        return self.train_progress()

    def train_progress(self) -> dict:
        """Steps done (the newest checkpoint) against train.steps: training stopped by its time
        budget is not done, so a rerun of the demo continues it."""
        from training import checkpoint as ckpt
        from training.train import TrainConfig
        _, tcfg = load_config(self.config, self.overrides, "train", TrainConfig)
        latest = ckpt.find_latest(Path(tcfg.out_dir) / "checkpoints")
        step = int(ckpt.read_state(latest)["step"]) if latest else 0
        if step < tcfg.steps:
            log.warning("training stopped at step %d of %d (train.time_budget_s=%s): the report says so; "
                        "rerun the demo to continue", step, tcfg.steps, tcfg.time_budget_s)
        return {"done": step >= tcfg.steps, "steps_done": step, "steps_planned": tcfg.steps,
                "time_budget_s": tcfg.time_budget_s}

    def export(self):
        from training import export
        from training.train import TrainConfig
        _, tcfg = load_config(self.config, self.overrides, "train", TrainConfig)
        export.export(tcfg.out_dir, self.out / "export")
        _check_reload(self.out / "export")

    def eval(self):
        from training.evaluation import evaluate as ev
        ev.main(self.config, self.overrides)

    def report(self):
        from launch.report import write_report
        text = write_report(self.out, self.state, self.config, self.overrides)
        print(text.split("## Linear probe")[-1] if "## Linear probe" in text else text)

    def all(self):
        for name in ("data", "embed", "cluster", "assign", "train", "export", "eval"):
            self.stage(name, getattr(self, name))
        self.report()


def _check_reload(folder: Path) -> None:
    """The exported folder loads with transformers, offline, and gives finite features."""
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor
    model = AutoModel.from_pretrained(folder).eval()
    proc = AutoProcessor.from_pretrained(folder)
    x = proc(images=Image.new("RGB", (80, 60), "white"), return_tensors="pt")
    with torch.no_grad():
        out = model(**x)
    if not torch.isfinite(out.pooler_output).all():
        raise SystemExit(f"demo: exported model in {folder} gives non-finite features")
    log.info("reloaded %s with transformers (%s): pooler_output %s", folder, type(model).__name__,
             tuple(out.pooler_output.shape))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mlcd demo")
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--nproc", type=int, default=2, help="training ranks (torchrun)")
    ap.add_argument("--only", default=None, help="run one stage (data, embed, ..., report)")
    ap.add_argument("--docs", default=None, metavar="DIR",
                    help="after the report, copy it and its PNGs (stamped with the run) to DIR, e.g. docs/demo")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        demo = Demo(args.config, args.overrides, args.nproc)
        if args.only:
            if args.only == "report":
                demo.report()
            else:
                demo.state["stages"].pop(args.only, None)
                demo.stage(args.only, getattr(demo, args.only))
        else:
            demo.all()
        if args.docs:
            from launch.report import publish
            for p in publish(demo.out, Path(args.docs)):
                log.info("published %s", p)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
