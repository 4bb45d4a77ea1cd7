"""Run configuration: YAML files + dotted CLI overrides -> small typed dataclasses.

One run file (``configs/*.yaml``) holds a section per stage (``run``, ``data``, ``embed``,
``cluster``, ``assign``, ``train``, ``eval``). A file may name a ``base:`` file (relative to itself)
that it is layered on, dinov2-style: experiment files stay short. The typed defaults live in each
stage's dataclass (one place); ``configs/defaults/*.yaml`` are their dumps, checked by a test.

A stage validates ``run`` and its own section only: ``pipeline/`` must not import the stages above
it, so it cannot know their schemas. ``mlcd check`` (launch/) validates every section at once.

Named instances: a section ``cluster@regions:`` is the ``cluster`` section's instance "regions":
``load_config(..., "cluster", Schema, instance="regions")`` reads the plain ``cluster`` section
layered with ``cluster@regions`` (the instance wins, key by key), so one run file holds both the
image-level and the region-level clustering. Overrides ``cluster@regions.k=5`` go to the instance
layer, ``cluster.k=5`` to the plain one (which an instance's own keys still override);
``${cluster@regions.out_dir}`` interpolates like any section.

Resumable keys: settings that may change between reruns of a stage in the same output folder
(worker counts, logging, the folder's own path) are declared once, on the dataclass field:
``field(default=..., metadata=RESUMABLE)``; ``prepare_out_dir`` reads them (``resumable_keys``).

Every problem is one line naming the key, the value and the file, and exits with code 2: also a
hostile file (an alias bomb: the expanded size is bounded; python tags; non-UTF-8 text) and
non-finite floats (``lr=.inf``: refused for every float field unless its metadata says
``allow_inf``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from pipeline.core import fs
from pipeline.core.errors import ConfigError  # noqa: F401 -- defined beside StageError, imported from here
from pipeline.core.io import atomic_write_text
from pipeline.core.stages import sections

# The sections a run file may hold: ``run`` and each stage's, from the stage table.
SECTIONS = sections()
T = TypeVar("T")
RESUMABLE = {"resumable": True}   # field metadata: may change between reruns of one output folder
INSTANCE_RE = re.compile(r"^([a-z_]+)@([A-Za-z0-9_]+)$")  # `cluster@regions`
MAX_FILE_BYTES = 256 << 10        # a run file is a few KiB (PyYAML parses ~0.1 MiB/s here)
MAX_NODES = 100_000               # scalars + containers after alias expansion (alias bombs)
MAX_DEPTH = 32                    # nesting levels (a run file uses ~5)


def check(cond: bool, key: str, value: Any, why: str) -> None:
    """Range checks in ``__post_init__``; the loader adds section and file to ``key``."""
    if not cond:
        raise ConfigError(f"{key}={value!r}: {why}")


@dataclass
class WandbConfig:
    """Unset (null) keys fall back to wandb's own environment variables (WANDB_MODE,
    WANDB_PROJECT, WANDB_ENTITY), then to the defaults in brackets: a value set here wins."""
    mode: str | None = None     # disabled | offline | online [env WANDB_MODE, else disabled]
    project: str | None = None  # [env WANDB_PROJECT, else openmlcd]
    entity: str | None = None   # [env WANDB_ENTITY]
    name: str | None = None     # run names are <name>-<stage> [run.name]
    group: str | None = None    # one group per pipeline run [run.name]
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        check(self.mode in (None, "disabled", "offline", "online"), "mode", self.mode,
              "must be disabled, offline or online (or null: WANDB_MODE, else disabled)")


@dataclass
class RunConfig:
    """Shared by every stage: where outputs go and how a rerun treats an existing output."""
    out_dir: str = field(default="runs/default", metadata=RESUMABLE)  # a run folder may be moved
    name: str | None = None     # the pipeline run's name (wandb group, run names); null: out_dir's folder name
    seed: int = 0
    # A stage that finds its output dir written with a different config refuses to continue
    # unless told: resume=True keeps going with the new config, overwrite=True starts afresh.
    resume: bool = field(default=False, metadata=RESUMABLE)
    overwrite: bool = field(default=False, metadata=RESUMABLE)
    log_every: int = field(default=10, metadata=RESUMABLE)  # steps/batches between metric records
    # seconds between progress lines in non-interactive logs (batch jobs; pipeline/core/tracking.py)
    log_every_s: float = field(default=60.0, metadata=RESUMABLE)
    wandb: WandbConfig = field(default_factory=WandbConfig, metadata=RESUMABLE)
    # Off unless set (pipeline/core/netpolicy.py): model downloads (HF hub, open_clip tags), shard
    # specs that run a shell command (`pipe:...`), and remote shard URLs (http://, s3://, ...).
    allow_download: bool = field(default=False, metadata=RESUMABLE)
    allow_pipe: bool = field(default=False, metadata=RESUMABLE)
    allow_remote: bool = field(default=False, metadata=RESUMABLE)
    allow_upload: bool = field(default=False, metadata=RESUMABLE)  # `mlcd export --push-to-hub` may upload
    # Largest tar member any stage reads (pipeline/core/shards.py:read_samples): a larger one is skipped
    # from its header, before reading, as `member_too_large` (a 1 MiB gzip can inflate to 1 GiB).
    max_member_bytes: int = field(default=64 << 20, metadata=RESUMABLE)

    def __post_init__(self):
        check(self.max_member_bytes > 0, "max_member_bytes", self.max_member_bytes, "must be > 0")
        check(self.log_every_s >= 0, "log_every_s", self.log_every_s, "must be >= 0")


class _Loader(yaml.SafeLoader):
    """safe_load's loader (no python tags), for run files and override values."""


def _safe_yaml(text: str, where: str) -> Any:
    """Parse one YAML document; refuses python tags (SafeLoader), deep nesting and alias bombs
    (the expanded size is counted up to MAX_NODES before OmegaConf would copy every alias: a
    342-byte bomb of 9^9 strings used to run for minutes, tests/test_hostile_config.py)."""
    if _flow_depth(text) > MAX_DEPTH:  # PyYAML's scanner is quadratic in `[[[[...` nesting
        raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:  # PyYAML composes nested nodes recursively: `[[[[...`
        raise ConfigError(f"{where}: nested deeper than Python's recursion limit") from None
    _bounded(data, where)
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e)
    return " ".join(f"{what}{f' (line {mark.line + 1}, column {mark.column + 1})' if mark else ''}".split())


def _flow_depth(text: str) -> int:
    """Deepest nesting of [ and { (brackets inside quoted strings count too: a config has none
    32 deep), in one pass without parsing."""
    depth = deepest = 0
    for c in re.sub(r"[^\[\]{}]", "", text):
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(0, depth - 1)
    return deepest


def _bounded(data: Any, where: str) -> None:
    """Counts values as if aliases were copied (what OmegaConf does), stopping at MAX_NODES, and
    refuses nesting deeper than MAX_DEPTH (OmegaConf recurses per level)."""
    stack, n = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        n += 1
        if n > MAX_NODES:
            raise ConfigError(f"{where}: more than {MAX_NODES} values once YAML aliases are expanded "
                              f"(an alias bomb?)")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes; a run file is at most {MAX_FILE_BYTES}")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    data = _safe_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def split_section(key: str) -> tuple[str, str | None]:
    """``cluster@regions`` -> ("cluster", "regions"); ``cluster`` -> ("cluster", None)."""
    m = INSTANCE_RE.match(key)
    return (m.group(1), m.group(2)) if m else (key, None)


def _known(key: Any) -> bool:
    return isinstance(key, str) and split_section(key)[0] in SECTIONS


def _file_chain(path: Path, seen: tuple = ()) -> list[tuple[Path, dict]]:
    """[(file, data)] from the deepest base to ``path`` itself."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: base chain loops back to itself")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is not None and (not isinstance(base, str) or not base):
        raise ConfigError(f"{path}: base={base!r}: must be one file name (relative to this file)")
    chain = _file_chain((path.parent / base), seen + (path,)) if base else []
    for key, value in data.items():
        if not _known(key):
            raise ConfigError(f"{path}: unknown section {key!r} (known: {', '.join(SECTIONS)}; "
                              f"an instance is section@name)")
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{path}: section {key!r} must be a mapping, got {type(value).__name__}")
    return chain + [(path, {k: v or {} for k, v in data.items()})]


def _parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if not isinstance(item, str) or "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        if not _known(key.split(".")[0]):
            raise ConfigError(f"override {item!r}: unknown section {key.split('.')[0]!r}")
        out.append((key, _safe_yaml(raw, f"override {item!r}") if raw != "" else ""))
    return out


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = getattr(e, "msg", None) or str(e)
    msg = msg.splitlines()[0]
    return f"{key}: {msg}" if key else msg


def load_config(path: str | os.PathLike | None, overrides: Sequence[str], section: str,
                schema: type[T], instance: str | None = None) -> tuple[RunConfig, T]:
    """Validated (run, section) configs for one stage. Raises ConfigError (one line).
    ``instance``: read the ``section@instance`` layer over the plain section (module doc)."""
    if section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r}")
    out = load_sections(path, overrides, {"run": RunConfig, section: schema},
                        instances={section: instance} if instance else None)
    return out["run"], out[section]


def load_run(path: str | os.PathLike | None, overrides: Sequence[str]) -> RunConfig:
    """Only the shared ``run`` section (for orchestrators such as the demo)."""
    return load_sections(path, overrides, {"run": RunConfig})["run"]


def named_instances(path: str | os.PathLike | None, overrides: Sequence[str]) -> list[tuple[str, str]]:
    """(section, instance) of every ``section@instance`` in the run file chain and the overrides
    (``mlcd check`` validates each one as its stage would load it)."""
    keys = [k for _, data in (_file_chain(Path(path)) if path else []) for k in data]
    keys += [k.split(".")[0] for k, _ in _parse_overrides(overrides)]
    found = [split_section(k) for k in keys]
    return list(dict.fromkeys((s, i) for s, i in found if i is not None))


def _layer_key(key: str, schemas: dict, instances: dict) -> str | None:
    """Where a file section or override key goes: its own name if this load builds it (a schema
    section, or the instance layer of one), else None (kept raw, for interpolation only)."""
    name, inst = split_section(key)
    if name in schemas and (inst is None or instances.get(name) == inst):
        return key
    return None


def load_sections(path: str | os.PathLike | None, overrides: Sequence[str],
                  schemas: dict[str, type], instances: dict[str, str] | None = None) -> dict[str, Any]:
    """Merge files and overrides into the structured schemas, resolve ``${...}`` interpolation
    across sections, and build the dataclasses (running their ``__post_init__`` checks).
    ``instances``: section -> instance name, whose ``section@name`` layer is merged over it."""
    instances = {k: v for k, v in (instances or {}).items() if v}
    for sec, inst in instances.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", inst):
            raise ConfigError(f"instance {sec}@{inst}: a name is letters, digits and _")
    chain = _file_chain(Path(path)) if path else []
    where = str(path) if path else "defaults"
    root = OmegaConf.create({name: OmegaConf.structured(s) for name, s in schemas.items()})
    layers = {f"{s}@{i}" for s, i in instances.items()}
    root = _merge_files(root, chain, schemas)
    for key, value in _parse_overrides(overrides):
        top = key.split(".")[0]
        try:
            # another stage's section (e.g. `mlcd demo` passes all overrides), or this stage's
            # instance layer: kept raw (validated by its owner / when merged), but applied, so
            # interpolations into it (`${cluster.out_dir}`) see the override
            if top in layers or _layer_key(top, schemas, instances) is None:
                with open_dict(root):
                    root.setdefault(top, {})
                with open_dict(root[top]):
                    OmegaConf.update(root, key, value, merge=True)
            else:
                OmegaConf.update(root, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {key}={value!r} (config {where}): {_describe(e)}") from None
    for sec, inst in instances.items():  # the instance layer wins, key by key (type-checked)
        if f"{sec}@{inst}" in root:
            try:
                root[sec] = OmegaConf.merge(root[sec], root[f"{sec}@{inst}"])
            except OmegaConfBaseException as e:
                raise ConfigError(f"{where}: {sec}@{inst}: {_describe(e)}") from None
    return _build_sections(root, schemas, where)


def _merge_files(root, chain, schemas: dict):
    # Sections other stages own are kept raw so interpolations into them still resolve; this
    # stage's instance layers are raw too until merged over the section (after the overrides).
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
    return root


def _build_sections(root, schemas: dict, where: str) -> dict[str, Any]:
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
    ``__post_init__`` gets its dotted path (``optim.lr=...``). A non-finite float is refused
    unless the field's metadata says ``allow_inf``."""
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
        elif isinstance(v, float) and not math.isfinite(v) and not f.metadata.get("allow_inf"):
            raise ConfigError(f"{f.name}={v!r}: must be a finite number")
        kwargs[f.name] = v
    return schema(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def dump_yaml(sections: dict[str, Any]) -> str:
    return yaml.safe_dump({k: to_dict(v) for k, v in sections.items()}, sort_keys=False)


def resumable_keys(sections: dict[str, Any]) -> tuple[str, ...]:
    """Dotted keys whose schema field is declared ``metadata=RESUMABLE`` (the whole subtree when
    the field is a nested config), for each section that is a dataclass."""
    out: list[str] = []
    for name, cfg in sections.items():
        if dataclasses.is_dataclass(cfg):
            out += _resumable(cfg if isinstance(cfg, type) else type(cfg), name)
    return tuple(out)


def _resumable(schema: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(schema)
    out = []
    for f in dataclasses.fields(schema):
        if f.metadata.get("resumable"):
            out.append(f"{prefix}.{f.name}")
        elif dataclasses.is_dataclass(hints.get(f.name)):
            out += _resumable(hints[f.name], f"{prefix}.{f.name}")
    return out


def prepare_out_dir(out_dir: str | os.PathLike, run: RunConfig, sections: dict[str, Any],
                    name: str, ignore: Sequence[str] = ()) -> Path:
    """Create ``out_dir`` and write the resolved config as ``config.{name}.yaml`` beside the
    outputs. If a different config is already there, refuse unless ``run.resume`` or
    ``run.overwrite``. Keys allowed to change between reruns: the schemas' resumable fields
    (``resumable_keys``) plus ``ignore`` (dotted keys, for cases only known at run time)."""
    out = Path(out_dir)
    fs.makedirs(out)  # a URL: no folder needed (and the bucket is never created)
    target = out / f"config.{name}.yaml"
    text = dump_yaml(sections)
    if fs.exists(target) and not (run.resume or run.overwrite):
        old = yaml.safe_load(fs.read_bytes(target)) or {}
        new = yaml.safe_load(text)
        diff = _diff(old, new, ignore=tuple(ignore) + resumable_keys(sections))
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
