"""Training checkpoints (the contract the export stage reads)::

    {train.out_dir}/checkpoints/step_{N:08d}/
        <DeepSpeed's checkpoint of the MLCDEncoder engine: keys vision_model.*, head.*>
        <folder>/rank{r}_of{W}.safetensors     one folder per loss head (training/heads.py): its
                                               class-center block [start, end) + its optimizer
                                               state + the rank's torch RNG. partial_fc/: the
                                               image head; region_fc/: the region head (RICE)
        trainer_state.json                     step, samples_seen, seeds, model_config, config, ...
    {train.out_dir}/checkpoints/latest         names the newest complete step folder

Order of a save: DeepSpeed files, every head's center shards (atomic), barrier,
trainer_state.json with "complete": true, then `latest` (atomic). A save killed at any point
leaves `latest` naming the previous complete checkpoint; `find_latest` also falls back to
scanning for complete folders.
Resuming on another world size re-shards the centers (blocks concatenated by their ranges and
re-split: each rank reads only the slices it needs) and loads the backbone weights from the
consolidated fp32 state (`load_backbone_state_dict`); DeepSpeed cannot re-partition ZeRO
optimizer moments across a new world size, so the backbone's moments restart then (logged).
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from pipeline.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from training.safe_load import WeightsError, check_torch_files, weights_only_loads

log = logging.getLogger("mlcd.train.ckpt")
STEP_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(step_dir: Path) -> bool:
    try:
        return bool(read_json(step_dir / "trainer_state.json").get("complete"))
    except (OSError, ValueError):
        return False


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, else the newest complete folder."""
    root = Path(root)
    latest = root / "latest"
    if latest.is_file():
        d = root / latest.read_text().strip()
        if is_complete(d):
            return d
        log.warning("%s names %s, which is not complete; scanning %s", latest, d, root)
    if not root.is_dir():
        return None
    steps = sorted((p for p in root.iterdir() if STEP_RE.match(p.name)), reverse=True)
    return next((d for d in steps if is_complete(d)), None)


def read_state(step_dir: Path) -> dict:
    return read_json(step_dir / "trainer_state.json")


# ---------------------------------------------------------------- class centers

def _opt_tensors(opt: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, torch.Tensor]:
    st = opt.state.get(param, {})
    return {f"opt.{k}": (v if torch.is_tensor(v) else torch.tensor(float(v))).detach().cpu().contiguous()
            for k, v in st.items()}


def save_centers(step_dir: Path, pfc, opt: torch.optim.Optimizer, folder: str = "partial_fc") -> None:
    tensors = {"weight": pfc.weight.detach().cpu().contiguous(), **_opt_tensors(opt, pfc.weight),
               "rng.torch": torch.get_rng_state()}
    meta = {"start": str(pfc.start), "end": str(pfc.start + pfc.num_local),
            "num_classes": str(pfc.num_classes), "rank": str(pfc.rank), "world_size": str(pfc.world_size)}
    path = step_dir / folder / f"rank{pfc.rank}_of{pfc.world_size}.safetensors"
    atomic_write_bytes(path, st_save(tensors, metadata=meta))


def center_files(step_dir: Path, world_size: int, num_classes: int, dim: int | None = None,
                 folder: str = "partial_fc") -> list[tuple[Path, int, int]]:
    """(file, start, end) of a checkpoint's center shards, after checking what every shard says
    before any tensor is read: a safetensors header, its metadata (this K, its own rank and
    world size), a weight of (end - start, dim) rows, and ranges that tile [0, K) in rank order
    (a shifted or overlapping block would put centers on the wrong classes). WeightsError
    naming the file otherwise. Reads headers only."""
    where = step_dir / folder
    files = sorted(where.glob(f"rank*_of{world_size}.safetensors"),
                   key=lambda f: int(re.sub(r"\D", "", f.name.split("_of")[0]) or -1))
    if len(files) != world_size:
        raise WeightsError(f"{where}: expected {world_size} center shards rank*_of{world_size}.safetensors, "
                           f"found {len(files)}")
    out, end = [], 0
    for r, f in enumerate(files):
        with weights_only_loads(f, deepspeed=False), safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata() or {}
            shape = sf.get_slice("weight").get_shape() if "weight" in sf.keys() else None  # noqa: SIM118
        try:
            s, e, k, rank, w = (int(meta[x]) for x in ("start", "end", "num_classes", "rank", "world_size"))
        except (KeyError, ValueError):
            raise WeightsError(f"{f}: no center-shard metadata (start, end, num_classes, rank, "
                               "world_size as integers)") from None
        if k != num_classes:
            raise WeightsError(f"{f}: checkpoint has {k} classes, this run {num_classes}")
        if (rank, w) != (r, world_size) or f.name != f"rank{r}_of{world_size}.safetensors":
            raise WeightsError(f"{f}: says rank {rank} of {w}; expected rank{r}_of{world_size}")
        if s != end or e < s or (r == world_size - 1 and e != k):
            raise WeightsError(f"{f}: holds classes [{s}, {e}); the shards must tile [0, {k}) in rank "
                               f"order, this one must start at {end}")
        if shape is None or len(shape) != 2 or shape[0] != e - s or (dim is not None and shape[1] != dim):
            raise WeightsError(f"{f}: weight has shape {shape}, expected ({e - s}, {dim or 'D'}) "
                               f"for classes [{s}, {e})")
        out.append((f, s, e))
        end = e
    return out


def load_centers(step_dir: Path, pfc, opt: torch.optim.Optimizer, world_size: int,
                 folder: str = "partial_fc") -> None:
    """Fills this rank's block (and its optimizer state) from the saved blocks that overlap it
    (checked first by center_files); a bad shard is a WeightsError naming it."""
    lo, hi = pfc.start, pfc.start + pfc.num_local
    state: dict[str, torch.Tensor] = {}
    for f, s, e in center_files(step_dir, world_size, pfc.num_classes, pfc.weight.shape[1], folder):
        a, b = max(s, lo), min(e, hi)
        with weights_only_loads(f, deepspeed=False), safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = sf.get_slice(key).get_shape()
                if key == "rng.torch":
                    if world_size == pfc.world_size and f.name == f"rank{pfc.rank}_of{world_size}.safetensors":
                        torch.set_rng_state(sf.get_tensor(key))
                    continue
                if shape == [] or key == "opt.step":  # per-rank scalar
                    state.setdefault(key, sf.get_tensor(key))
                    continue
                if shape[0] != e - s:
                    raise WeightsError(f"{f}: {key} has {shape[0]} rows, the block [{s}, {e}) {e - s}")
                if a >= b:
                    continue
                if key not in state:
                    state[key] = torch.empty(pfc.num_local, *shape[1:])
                state[key][a - lo:b - lo] = sf.get_slice(key)[a - s:b - s]
    if pfc.num_local:
        with torch.no_grad():
            pfc.weight.copy_(state.pop("weight"))
    state.pop("weight", None)
    if state:
        opt.state[pfc.weight] = {k[4:]: v for k, v in state.items() if k.startswith("opt.")}


# ---------------------------------------------------------------- the whole checkpoint

def save(root: Path, step: int, engine, heads, trainer_state: dict, ctx, keep: int = 2) -> Path:
    """Collective: every rank calls it. heads: training/heads.py's, each writing its own shards
    (``head.save(step_dir)``, atomic files in its folder)."""
    tag = tag_for(step)
    step_dir = root / tag
    if ctx.is_main and step_dir.exists():  # a leftover incomplete save of the same step
        (step_dir / "trainer_state.json").unlink(missing_ok=True)
    ctx.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    for head in heads:
        head.save(step_dir)
    ctx.barrier()
    if ctx.is_main:
        atomic_write_json(step_dir / "trainer_state.json", {**trainer_state, "complete": True})
        atomic_write_text(root / "latest", tag + "\n")
        _prune(root, keep, tag)
    ctx.barrier()
    return step_dir


def _prune(root: Path, keep: int, current: str) -> None:
    if keep <= 0:
        return
    done = sorted(p for p in root.iterdir() if STEP_RE.match(p.name) and is_complete(p))
    for old in done[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def load_backbone_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 MLCDEncoder state dict of a checkpoint, whatever its ZeRO stage and world
    size (ZeRO 1-3 via DeepSpeed's zero_to_fp32; ZeRO 0 stores the module whole)."""
    step_dir = Path(step_dir)
    with weights_only_loads(step_dir):  # zero_to_fp32 would unpickle anything: not here
        if list(step_dir.glob("*zero_pp_rank_*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            sd = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
        else:
            path = step_dir / "mp_rank_00_model_states.pt"
            if not path.is_file():
                raise WeightsError(f"{step_dir}: no DeepSpeed model states (mp_rank_00_model_states.pt)")
            with weights_only_loads(path):  # names the file itself
                sd = torch.load(path, map_location="cpu", weights_only=True)["module"]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise WeightsError(f"{step_dir}: the model states are not a state dict of tensors")
    return {k: v.float() for k, v in sd.items()}


def load_engine(engine, step_dir: Path) -> None:
    """DeepSpeed's own resume (same world size and ZeRO stage), weights-only (training/safe_load.py)."""
    with weights_only_loads(step_dir):
        engine.load_checkpoint(str(step_dir.parent), tag=step_dir.name, load_optimizer_states=True,
                               load_lr_scheduler_states=False)


def rank_files(step_dir: Path, rank: int) -> list[Path]:
    """The DeepSpeed files `rank` reads on an exact resume (ZeRO 0-2: the shared model states;
    ZeRO-3: its own; ZeRO 1-3: its optimizer partition, fp32 or bf16)."""
    pat = re.compile(rf"^(mp_rank_00_model_states|(bf16_)?zero_pp_rank_{rank}_mp_rank_00_(model|optim)_states)\.pt$")
    return sorted(p for p in step_dir.iterdir() if pat.match(p.name)) if step_dir.is_dir() else []


def check_resume(step_dir: Path, rank: int, exact: bool, centers: list[tuple[int, int, int, str]]) -> None:
    """What this rank will read on a resume, checked before any loader that talks to other ranks
    runs: its DeepSpeed files' pickled structure (exact resumes; mmap, no tensor bytes) and every
    center shard's header (centers: (world size saved, K, dim, folder) per PartialFC)."""
    if exact:
        files = rank_files(step_dir, rank)
        if not any(f.name.endswith("model_states.pt") for f in files):
            raise WeightsError(f"{step_dir}: no DeepSpeed model states for rank {rank} "
                               "(mp_rank_00_model_states.pt or zero_pp_rank_*_model_states.pt)")
        check_torch_files(files)
    for world, k, dim, folder in centers:
        center_files(step_dir, world, k, dim, folder)
