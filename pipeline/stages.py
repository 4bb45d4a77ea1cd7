"""The stage registry: the one table of stage name -> module, config section and schema, read by
`mlcd` (launch/cli.py), the shell launchers (launch/env.sh calls ``python -m pipeline.stages
module NAME``), the config checker (launch/check.py) and the bench runner (launch/bench.py).

Only names (strings) live here: ``pipeline/`` imports no stage above it, and looking a stage up
costs no import of torch or the stage.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    module: str                 # `python -m <module>`: exposes cli(argv) (config stages: main(config, overrides))
    section: str | None = None  # the config section it owns
    schema: str | None = None   # "module:Class" of that section
    torchrun: bool = False      # `mlcd <name> --nproc N` starts it under torchrun


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("data", "pipeline.demo_data", "data", "pipeline.demo_data:DataConfig"),
    Stage("data-rice", "pipeline.rice_data"),  # `mlcd data rice`; its config is `data.rice`
    Stage("regions", "pipeline.regions", "regions", "pipeline.regions:RegionsConfig", torchrun=True),
    Stage("embed", "pipeline.embed", "embed", "pipeline.embed:EmbedConfig", torchrun=True),
    Stage("cluster", "clustering.kmeans", "cluster", "clustering.kmeans:KMeansConfig", torchrun=True),
    Stage("assign", "clustering.assign", "assign", "clustering.assign:AssignConfig", torchrun=True),
    Stage("region-labels", "clustering.region_labels", "region_labels",
          "clustering.region_labels:RegionLabelsConfig", torchrun=True),
    Stage("train", "training.train", "train", "training.train:TrainConfig", torchrun=True),
    Stage("export", "training.export"),
    Stage("eval", "training.evaluation.evaluate", "eval", "training.evaluation.evaluate:EvalConfig",
          torchrun=True),
    Stage("eval-regions", "training.evaluation.regions", "eval_regions",
          "training.evaluation.regions:RegionEvalConfig", torchrun=True),
    Stage("envcheck", "launch.envcheck", torchrun=True),
    Stage("demo", "launch.demo"),
    Stage("rice-demo", "launch.rice_demo"),
    Stage("ablate", "launch.ablate", "ablate", "launch.ablate:AblateConfig"),
    Stage("check", "launch.check"),
    Stage("status", "launch.status"),  # `mlcd status RUN_DIR`: where a run stands, from its files
)}

# The shared section every stage reads, and who owns it.
RUN_SCHEMA = "pipeline.config:RunConfig"

# `make bench`: name -> module with run_bench(quick) -> rows (launch/bench.py runs them in order).
BENCHES = {
    "embed": "pipeline.bench_embed",
    "cluster": "clustering.bench",
    "model": "training.bench_model",
    "train": "training.bench_train",
}


def module_of(name: str) -> str:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r} ({' '.join(STAGES)})")
    return STAGES[name].module


def name_of_module(module: str) -> str:
    """The stage a module runs (``training.train`` -> ``train``); the module's last part otherwise."""
    return next((n for n, s in STAGES.items() if s.module == module), module.rsplit(".", 1)[-1])


def schemas() -> dict[str, str]:
    """Config section -> "module:Class", ``run`` first (launch/check.py imports them)."""
    return {"run": RUN_SCHEMA, **{s.section: s.schema for s in STAGES.values() if s.section}}


def schema(section: str) -> type:
    """The dataclass of a config section, imported on demand (launch/check.py, and entries that
    read another stage's section, such as the standalone cluster report)."""
    import importlib
    ref = schemas()[section]
    mod, cls = ref.split(":")
    return getattr(importlib.import_module(mod), cls)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.stages module NAME``: the module of a stage, for the shell launchers."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "module":
        print("usage: python -m pipeline.stages module NAME", file=sys.stderr)
        return 2
    launchable = [n for n, s in STAGES.items() if s.torchrun or n == "export"]
    if args[1] not in launchable:
        print(f"unknown stage '{args[1]}' ({' '.join(launchable)})", file=sys.stderr)
        return 2
    print(STAGES[args[1]].module)
    return 0


if __name__ == "__main__":
    sys.exit(main())
