"""The stage table: the one list of stages. Everything else that lists stages reads it or is
checked against it (tests/test_stage_table.py):

- `mlcd --help`, `mlcd <stage> --help` and the command dispatch (launch/cli.py, pipeline/core/entry.py);
- the config sections a run file may hold (``pipeline.core.config.SECTIONS``) and `mlcd check`;
- the shell launchers: launch/env.sh (``python -m pipeline.core.stages module NAME``), the one SLURM
  template launch/slurm/stage.sbatch, and the Makefile's stage targets
  (``python -m pipeline.core.stages names --launch``);
- `make bench` (launch/bench.py runs each stage's ``bench`` modules).

Only names (strings) live here: ``pipeline/`` imports no stage above it, and looking a stage up
costs no import of torch or the stage (the Makefile runs this file with the system python).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str                   # `mlcd <name>`; also the make target and the SLURM argument
    module: str                 # `python -m <module>`
    help: str                   # one line for `mlcd --help`
    section: str | None = None  # the config section it reads (`mlcd <name>@<instance>` layers one)
    schema: str | None = None   # "module:Class" of that section
    torchrun: bool = False      # runs on any number of ranks: `--nproc N` starts it under torchrun
    tool: bool = False          # parses its own argv: the module's main(argv) -> exit code;
    #                             otherwise main(config, overrides, instance) via pipeline.core.entry
    shell: bool = False         # started by the shell launchers (torchrun.sh, stage.sbatch, make)
    slurm: str = ""             # suggested `sbatch` size for launch/slurm/stage.sbatch
    bench: tuple[str, ...] = ()  # modules with run_bench(quick) -> rows (`make bench`)
    usage: str = "[--config F] [k=v ...]"  # what follows `mlcd <name>`


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("data", "pipeline.demo.demo_data", "build the offline demo shards (Debian clipart, fonts, Fashion-MNIST)",
          "data", "pipeline.demo.demo_data:DataConfig"),
    Stage("data-rice", "pipeline.demo.rice_data", "build the RICE demo scenes (objects + words, with boxes)",
          "data", "pipeline.demo.demo_data:DataConfig"),
    Stage("data-shards", "pipeline.make_shards", "an image folder or image list as img2dataset shards",
          tool=True, usage="SRC OUT [--per-shard N] [--workers W]"),
    Stage("regions", "pipeline.regions", "stage 1b: region boxes and region embeddings (RICE)",
          "regions", "pipeline.regions:RegionsConfig", torchrun=True, shell=True,
          slurm="--nodes=4 --time=24:00:00"),
    Stage("embed", "pipeline.embed", "stage 1: embed the image shards into a store",
          "embed", "pipeline.embed:EmbedConfig", torchrun=True, shell=True,
          slurm="--nodes=4 --time=24:00:00", bench=("pipeline.bench_embed",)),
    Stage("cluster", "clustering.kmeans", "stage 2a: k-means of the store into K centers",
          "cluster", "clustering.kmeans:KMeansConfig", torchrun=True, shell=True,
          slurm="--nodes=4 --time=12:00:00", bench=("clustering.bench",)),
    Stage("assign", "clustering.assign", "stage 2b: top-l cluster labels for every image",
          "assign", "clustering.assign:AssignConfig", torchrun=True, shell=True,
          slurm="--nodes=2 --time=12:00:00"),
    Stage("region-labels", "clustering.region_labels", "stage 2c: cluster labels for every region (RICE)",
          "region_labels", "clustering.region_labels:RegionLabelsConfig", torchrun=True, shell=True,
          slurm="--nodes=2 --time=12:00:00"),
    Stage("train", "training.train", "stage 3: MLCD pretraining (DeepSpeed + PartialFC)",
          "train", "training.train:TrainConfig", torchrun=True, shell=True,
          slurm="--nodes=10 --time=48:00:00", bench=("training.bench_model", "training.bench_train")),
    Stage("export", "training.export", "a checkpoint as a HF transformers folder", tool=True, shell=True,
          usage="CHECKPOINT OUT_DIR [--model NAME] [--with-head] [--dtype D] [--eval F] [--push-to-hub REPO]"),
    Stage("eval", "training.evaluation.evaluate", "linear probe and k-NN of a checkpoint or export",
          "eval", "training.evaluation.evaluate:EvalConfig", torchrun=True, shell=True,
          slurm="--nodes=1 --time=4:00:00"),
    Stage("eval-regions", "training.evaluation.regions", "region-level probe of a RICE checkpoint",
          "eval_regions", "training.evaluation.regions:RegionEvalConfig", torchrun=True, shell=True,
          slurm="--nodes=1 --time=4:00:00"),
    Stage("envcheck", "launch.envcheck", "preflight of a layout: ranks, hosts, all-reduce bandwidth",
          torchrun=True, tool=True, shell=True, usage="[--bytes N] [--out DIR]"),
    Stage("demo", "launch.demo", "the whole pipeline on the demo data", tool=True,
          usage="[--config F] [--only STAGE] [k=v ...]"),
    Stage("rice-demo", "launch.rice_demo", "RICE end to end on the offline scenes", tool=True),
    Stage("ablate", "launch.ablate", "MLCD's ablation grid (configs/ablation.yaml)",
          "ablate", "launch.ablate:AblateConfig", tool=True, usage="[--quick] [--config F] [k=v ...]"),
    Stage("check", "launch.check", "validate every section of a run config", tool=True,
          usage="--config F [k=v ...] | --write-defaults"),
    Stage("status", "launch.status", "where a run stands (every stage), from its files alone", tool=True,
          usage="RUN_DIR [--json]"),
)}

# The shared section every stage reads, and who owns it.
RUN_SCHEMA = "pipeline.core.config:RunConfig"

# `make bench`: stage -> modules with run_bench(quick) -> rows (launch/bench.py runs them in order).
BENCHES: dict[str, tuple[str, ...]] = {n: s.bench for n, s in STAGES.items() if s.bench}


def module_of(name: str) -> str:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r} ({' '.join(STAGES)})")
    return STAGES[name].module


def name_of_module(module: str) -> str:
    """The stage a module runs (``training.train`` -> ``train``); the module's last part otherwise."""
    return next((n for n, s in STAGES.items() if s.module == module), module.rsplit(".", 1)[-1])
def sections() -> tuple[str, ...]:
    """Every config section a run file may hold: ``run``, then each stage's, once."""
    return tuple(dict.fromkeys(["run", *(s.section for s in STAGES.values() if s.section)]))


def schemas() -> dict[str, str]:
    """Config section -> "module:Class", ``run`` first (launch/check.py imports them)."""
    return {"run": RUN_SCHEMA, **{s.section: s.schema for s in STAGES.values() if s.section and s.schema}}


def schema(section: str) -> type:
    """The dataclass of a config section, imported on demand (launch/check.py, and entries that
    read another stage's section, such as the standalone cluster report)."""
    import importlib
    ref = schemas()[section]
    mod, cls = ref.split(":")
    return getattr(importlib.import_module(mod), cls)


def launchable() -> list[str]:
    """The stages the shell launchers start (launch/torchrun.sh, stage.sbatch, make targets)."""
    return [n for n, s in STAGES.items() if s.shell]


def main(argv: list[str] | None = None) -> int:
    """For the shell launchers and the Makefile:
    ``python -m pipeline.core.stages module NAME`` (the module of a launchable stage) and
    ``python -m pipeline.core.stages names --launch`` (the launchable stages, one line)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["names", "--launch"]:
        print(" ".join(launchable()))
        return 0
    if len(args) != 2 or args[0] != "module":
        print("usage: python -m pipeline.core.stages module NAME | names --launch", file=sys.stderr)
        return 2
    if args[1] not in launchable():
        print(f"unknown stage '{args[1]}' ({' '.join(launchable())})", file=sys.stderr)
        return 2
    print(STAGES[args[1]].module)
    return 0


if __name__ == "__main__":
    sys.exit(main())
