"""Run configuration: YAML files + dotted CLI overrides -> small typed dataclasses.

One run file (``configs/*.yaml``) holds a section per stage (``run``, ``data``, ``embed``,
``cluster``, ``assign``, ``train``, ``eval``). A file may name a ``base:`` file (relative to itself)
that it is layered on, dinov2-style: experiment files stay short. The typed defaults live in each
stage's dataclass (one place); ``configs/defaults/*.yaml`` are their dumps, checked by a test.

A stage validates ``run`` and its own section only: ``pipeline/`` must not import the stages above
it, so it cannot know their schemas. ``mlcd check`` (launch/) validates every section at once.

Every problem is one line naming the key, the value and the file, and exits with code 2.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.io import atomic_write_text
from pipeline.stages import sections

# The sections a run file may hold: ``run`` and each stage's, from the stage table.
SECTIONS = sections()
T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration: the message is a single line for the user."""


def check(cond: bool, key: str, value: Any, why: str) -> None:
    """Range checks in ``__post_init__``; the loader adds section and file to ``key``."""
    if not cond:
        raise ConfigError(f"{key}={value!r}: {why}")


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "openmlcd"
    entity: str | None = None
    name: str | None = None
    group: str | None = None  # e.g. one experiment's stages, or a 224 run and its 336 continuation
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        check(self.mode in ("disabled", "offline", "online"), "mode", self.mode,
              "must be disabled, offline or online")


@dataclass
class RunConfig:
    """Shared by every stage: where outputs go and how a rerun treats an existing output."""
    out_dir: str = "runs/default"
    seed: int = 0
    # A stage that finds its output dir written with a different config refuses to continue
    # unless told: resume=True keeps going with the new config, overwrite=True starts afresh.
    resume: bool = False
    overwrite: bool = False
    log_every: int = 10
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Off unless set (pipeline/netpolicy.py): model downloads (HF hub, open_clip tags), shard
    # specs that run a shell command (`pipe:...`), and remote shard URLs (http://, s3://, ...).
    allow_download: bool = False
    allow_pipe: bool = False
    allow_remote: bool = False


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _file_chain(path: Path, seen: tuple = ()) -> list[tuple[Path, dict]]:
    """[(file, data)] from the deepest base to ``path`` itself."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: base chain loops back to itself")
    data = _read_yaml(path)
    base = data.pop("base", None)
    chain = _file_chain((path.parent / base), seen + (path,)) if base else []
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {key!r} (known: {', '.join(SECTIONS)})")
    return chain + [(path, data)]


def _parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        if key.split(".")[0] not in SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section {key.split('.')[0]!r}")
        out.append((key, yaml.safe_load(raw) if raw != "" else ""))
    return out


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = getattr(e, "msg", None) or str(e)
    msg = msg.splitlines()[0]
    return f"{key}: {msg}" if key else msg


def load_config(path: str | os.PathLike | None, overrides: Sequence[str], section: str,
                schema: type[T]) -> tuple[RunConfig, T]:
    """Validated (run, section) configs for one stage. Raises ConfigError (one line)."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r}")
    out = load_sections(path, overrides, {"run": RunConfig, section: schema})
    return out["run"], out[section]


def load_run(path: str | os.PathLike | None, overrides: Sequence[str]) -> RunConfig:
    """Only the shared ``run`` section (for orchestrators such as the demo)."""
    return load_sections(path, overrides, {"run": RunConfig})["run"]


def load_sections(path: str | os.PathLike | None, overrides: Sequence[str],
                  schemas: dict[str, type]) -> dict[str, Any]:
    """Merge files and overrides into the structured schemas, resolve ``${...}`` interpolation
    across sections, and build the dataclasses (running their ``__post_init__`` checks)."""
    chain = _file_chain(Path(path)) if path else []
    where = str(path) if path else "defaults"
    root = OmegaConf.create({name: OmegaConf.structured(s) for name, s in schemas.items()})
    # Sections other stages own are kept raw so interpolations into them still resolve.
    for src, data in chain:
        mine = {k: v for k, v in data.items() if k in schemas}
        other = {k: v for k, v in data.items() if k not in schemas}
        try:
            root = OmegaConf.merge(root, mine)
            OmegaConf.set_struct(root, False)
            root = OmegaConf.merge(root, other)
            OmegaConf.set_struct(root, True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{src}: {_describe(e)}") from None
    for key, value in _parse_overrides(overrides):
        if key.split(".")[0] not in schemas:
            continue  # another stage's override (e.g. `mlcd demo` passes all of them)
        try:
            OmegaConf.update(root, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {key}={value!r} (config {where}): {_describe(e)}") from None
    out = {}
    for name, schema in schemas.items():
        try:
            data = OmegaConf.to_container(root[name], resolve=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{where}: {name}.{_describe(e)}") from None
        try:
            out[name] = _build(schema, data)
        except ConfigError as e:
            raise ConfigError(f"{where}: {name}.{e}") from None
    return out


def _build(schema: type, data: dict):
    """Dataclass from validated plain data, nested ones first; a failing ``check`` in a nested
    ``__post_init__`` gets its dotted path (``optim.lr=...``)."""
    hints = typing.get_type_hints(schema)
    kwargs = {}
    for f in dataclasses.fields(schema):
        if f.name not in data:
            continue
        v, sub = data[f.name], hints.get(f.name)
        if dataclasses.is_dataclass(sub) and isinstance(v, dict):
            try:
                v = _build(sub, v)
            except ConfigError as e:
                raise ConfigError(f"{f.name}.{e}") from None
        kwargs[f.name] = v
    return schema(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def dump_yaml(sections: dict[str, Any]) -> str:
    return yaml.safe_dump({k: to_dict(v) for k, v in sections.items()}, sort_keys=False)


def prepare_out_dir(out_dir: str | os.PathLike, run: RunConfig, sections: dict[str, Any],
                    name: str, ignore: Sequence[str] = ()) -> Path:
    """Create ``out_dir`` and write the resolved config as ``config.{name}.yaml`` beside the
    outputs. If a different config is already there, refuse unless ``run.resume`` or
    ``run.overwrite``; ``ignore`` lists dotted keys allowed to change between reruns."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"config.{name}.yaml"
    text = dump_yaml(sections)
    if target.exists() and not (run.resume or run.overwrite):
        old = yaml.safe_load(target.read_text()) or {}
        new = yaml.safe_load(text)
        diff = _diff(old, new, ignore=tuple(ignore) + ("run.resume", "run.overwrite", "run.wandb",
                                                         "run.log_every", "run.allow_download",
                                                         "run.allow_pipe", "run.allow_remote"))
        if diff:
            raise ConfigError(
                f"{out} holds a run with a different config ({'; '.join(diff[:3])}); "
                f"pass run.resume=true to continue it or run.overwrite=true to start over")
    atomic_write_text(target, text)
    return out


def _diff(old: Any, new: Any, prefix: str = "", ignore: tuple = ()) -> list[str]:
    if prefix.rstrip(".") in ignore:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.", ignore)
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]
