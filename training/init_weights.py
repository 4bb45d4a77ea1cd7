"""Start a new run from earlier weights (`train.init_from`), and the fine-tuning knobs.

Resume vs init_from: resume continues the same run (optimizer, schedule, step, data position),
init_from starts a new one whose backbone (and, with `train.init_centers_from`, class centers)
come from elsewhere while optimizer, schedule and step start at zero. A checkpoint in the run's
own folder always wins: a requeued fine-tune resumes itself instead of restarting from init_from.

`train.init_from` may be
- one of our run folders, its `checkpoints/` folder or a step folder (any ZeRO stage / world
  size: read through training/export.py, which consolidates the fp32 backbone);
- a HF folder: one we exported, or a released one (DeepGlint's CLIPVisionModel /
  MLCDVisionModel folders, or a full CLIPModel whose text tower is skipped; downloaded
  beforehand: nothing is fetched at run time);
- a bare state file (.safetensors, or .pt/.bin read with weights_only=True).
The architecture must match this run's `train.model` except the image size: a CLIP-style
position table is resized bicubically to the new patch grid (class position kept); 2D-RoPE
models have no table and need nothing. A source without a training head (HF folders) leaves
the head freshly initialized. Any mismatch is one ConfigError naming the path and the key,
raised before the DeepSpeed engine is built. Where the run started from is written to
`{train.out_dir}/init_from.json` and into every checkpoint's trainer_state.json (`init_from`).

Fine-tuning knobs (`train.finetune`), applied in the backbone's param groups and the centers' LR:
layer-wise LR decay (BEiT-style: block i of L gets decay^(L - i), embeddings decay^(L + 1), the
final norm and head 1), a frozen patch embedding, frozen class centers. A lower center LR is
`train.partial_fc.lr_mult`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch
from safetensors import safe_open

from pipeline.core.config import ConfigError, check
from pipeline.core.io import atomic_write_json, read_json
from training.safe_load import WeightsError, every_rank_reads, weights_only_loads

if TYPE_CHECKING:  # for annotations only (training.model is imported where it is used)
    from training.model import MLCDEncoder

log = logging.getLogger("mlcd.train.init")
# Fields that fix the weights' shapes and meaning; image_size alone may differ.
ARCH_FIELDS = ("patch_size", "width", "layers", "heads", "mlp_dim", "rope2d", "act", "rope_theta", "layer_norm_eps")
TEXT_KEYS = ("text_model.", "text_projection", "logit_scale")
EMBED_KEYS = ("class_embedding", "position_embedding", "patch_embedding", "class_pos_emb", "pre_layrnorm")


@dataclass
class FinetuneConfig:
    layer_decay: float = 1.0          # LR x decay^(depth from the top); 1 = off. BEiT-style 0.65-0.9
    freeze_patch_embed: bool = False  # keep the patch projection as loaded (no grad, no optimizer state)
    freeze_centers: bool = False      # class centers get LR 0 (loaded ones stay exactly as they are)

    def __post_init__(self):
        check(0 < self.layer_decay <= 1, "layer_decay", self.layer_decay, "must be in (0, 1]")


# ---------------------------------------------------------------- param groups

def layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings, i + 1 for block i, num_layers + 1 for the final norm and head."""
    if name.startswith("vision_model."):
        name = name[len("vision_model."):]
    if name.startswith("encoder.layers."):
        return int(name.split(".")[2]) + 1
    if name.startswith(("embeddings.", *EMBED_KEYS)):
        return 0
    return num_layers + 1


def param_groups(model: MLCDEncoder, weight_decay: float, ft: FinetuneConfig | None = None
                 ) -> list[dict]:
    """Backbone optimizer groups: no decay on 1-D params (norms, biases) and the class/position
    embeddings; with layer-wise decay one group per (depth, decay) carrying `lr_scale`, which the
    step multiplies into the scheduled LR. Freezes the patch embedding when asked (requires_grad
    False): call before the DeepSpeed engine is built."""
    ft = ft or FinetuneConfig()
    if ft.freeze_patch_embed:
        model.vision_model.embeddings.patch_embedding.weight.requires_grad_(False)
    depth = model.config.layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(k in name for k in ("class_embedding", "position_embedding", "class_pos_emb"))
        lid = layer_id(name, depth) if ft.layer_decay < 1 else depth + 1
        g = groups.setdefault((lid, skip), {"params": [], "weight_decay": 0.0 if skip else weight_decay,
                                            "lr_scale": ft.layer_decay ** (depth + 1 - lid)})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[1], k[0]))]


# ---------------------------------------------------------------- reading a source

def _fail(path, why: str) -> NoReturn:
    raise ConfigError(f"train.init_from={path}: {why}")


def read_source(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """(our-layout state dict, source architecture as a ModelConfig-like dict or None, kind)."""
    from training import export
    from training.hf import _hf_weights, config_from_hf, from_hf_state_dict, load_state_file
    p = Path(path)
    try:
        if p.is_file():
            if p.suffix not in export.STATE_SUFFIXES:
                _fail(p, f"a state file must end in {export.STATE_SUFFIXES}")
            return from_hf_state_dict(export._strip_module(load_state_file(p))), None, "state_file"
        if not p.is_dir():
            _fail(p, "no such file or folder")
        if (p / "config.json").is_file():
            arch = dataclasses.asdict(config_from_hf(json.loads((p / "config.json").read_text())))
            # a full CLIPModel folder (e.g. OpenAI's): its vision tower and visual_projection only
            sd = {k: v for k, v in _hf_weights(p).items() if not k.startswith(TEXT_KEYS)}
            return from_hf_state_dict(sd), arch, "hf_folder"
        sd, cfg, state = export.load_training_checkpoint(p)
        arch = dataclasses.asdict(cfg.resolved())
        arch["step"] = state.get("step")
        return sd, arch, "checkpoint"
    except (ConfigError, WeightsError):  # a bad file: one line naming it, exit 1
        raise
    except (OSError, ValueError, KeyError) as e:  # ExportError is a ValueError
        _fail(p, str(e).replace(f"{p}: ", ""))


def adapt_state_dict(sd: dict[str, torch.Tensor], model: MLCDEncoder, path) -> tuple[dict, list[str]]:
    """Checks every key and shape against `model`; resizes a CLIP position table to the model's
    grid. Returns (state dict to load, notes). New tensors only: the source is never modified."""
    ref = model.state_dict()
    cfg = model.config
    notes: list[str] = []
    # a RICE region head is never taken from init_from: it starts fresh (only a resume keeps it)
    sd = {k: v for k, v in sd.items() if not k.startswith("region_head.")}
    pos = "vision_model.embeddings.position_embedding.weight"
    if cfg.rope2d:
        # 2D RoPE computes positions from the grid of each input: nothing to resize.
        assert pos not in ref, "a 2D-RoPE model has no position table"
    elif pos in sd and pos in ref and sd[pos].shape != ref[pos].shape:
        if sd[pos].shape[-1] != ref[pos].shape[-1]:
            _fail(path, f"{pos} has width {sd[pos].shape[-1]}, the model {ref[pos].shape[-1]}")
        from training.model import resize_pos_embed
        g = model.vision_model.embeddings.grid
        src = int(round((sd[pos].shape[0] - 1) ** 0.5))
        try:
            sd[pos] = resize_pos_embed(sd[pos].float(), g, g)
        except ValueError as e:
            _fail(path, f"{pos}: {e}")
        notes.append(f"position embedding resized from a {src}x{src} to a {g}x{g} patch grid (bicubic)")
    unexpected = sorted(set(sd) - set(ref))
    if unexpected:
        _fail(path, f"key {unexpected[0]} is not in model {cfg.name} ({len(unexpected)} unexpected keys)")
    missing = sorted(k for k in set(ref) - set(sd) if not k.startswith("region_head."))
    if any(not k.startswith("head.") for k in missing):
        k = next(k for k in missing if not k.startswith("head."))
        _fail(path, f"key {k} missing from the source ({len(missing)} missing keys)")
    if missing:
        notes.append("the source has no training head: head freshly initialized")
    for k in sorted(set(sd) & set(ref)):
        if tuple(sd[k].shape) != tuple(ref[k].shape):
            _fail(path, f"key {k} has shape {tuple(sd[k].shape)}, model {cfg.name} expects "
                        f"{tuple(ref[k].shape)}")
    return sd, notes


def _check_arch(arch: dict | None, model: MLCDEncoder, path) -> None:
    if arch is None:
        return
    cfg = model.config
    for f in ARCH_FIELDS:
        if f in arch and arch[f] != getattr(cfg, f):
            _fail(path, f"source {f}={arch[f]!r} but train.model.{f}={getattr(cfg, f)!r} "
                        "(only image_size may differ)")


def check_centers_source(path: str | Path, num_classes: int) -> tuple[Path, int]:
    """(step folder, world size it was saved with) of a previous run's centers; ConfigError if
    missing or a different K, WeightsError naming the shard if one is bad (shifted range, wrong
    shape, bad header). Reads trainer_state.json and the shards' headers only."""
    from training import export
    from training.checkpoint import center_files
    try:
        step = export.resolve_step_dir(Path(path))
        world = int(read_json(step / "trainer_state.json")["world_size"])
        files = sorted((step / "partial_fc").glob(f"rank*_of{world}.safetensors"))
        if not files:
            raise ValueError(f"{step / 'partial_fc'}: no center shards")
        with weights_only_loads(files[0], deepspeed=False), safe_open(str(files[0]), framework="pt") as sf:
            k = (sf.metadata() or {}).get("num_classes")
    except WeightsError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"train.init_centers_from={path}: {e}") from None
    if str(k) != str(num_classes):
        raise ConfigError(f"train.init_centers_from={path}: {files[0].name} has num_classes="
                          f"{k}, this run K={num_classes}")
    center_files(step, world, num_classes)
    return step, world


# ---------------------------------------------------------------- the hooks train.py calls

def load_initial_weights(model: MLCDEncoder, cfg, num_classes: int, ctx, out_dir: str | Path) -> dict:
    """Call once for a NEW run (no checkpoint in its folder), after build_model and before the
    DeepSpeed engine: loads `cfg.init_from` into the backbone, checks `cfg.init_centers_from`,
    writes `{out_dir}/init_from.json`. Returns the provenance (also for trainer_state.json)."""
    prov: dict = {"init_from": cfg.init_from or None, "init_centers_from": cfg.init_centers_from or None}
    if cfg.init_centers_from:
        step, world = ctx.agree(lambda: check_centers_source(cfg.init_centers_from, num_classes))
        prov["centers"] = {"step_dir": str(step), "saved_world_size": world}
    if cfg.init_from:
        prov.update(_load_on_rank0(model, cfg.init_from, ctx))
        for n in prov["notes"]:
            log.info("init_from: %s", n)
        log.info("backbone initialized from %s (%s)", cfg.init_from, prov["kind"])
    if ctx.is_main and (cfg.init_from or cfg.init_centers_from):
        atomic_write_json(Path(out_dir) / "init_from.json", prov)
    return prov


def _load_on_rank0(model: MLCDEncoder, path: str, ctx) -> dict:
    """Rank 0 reads, checks and loads the source, then every weight is broadcast from it: one
    reader per job (consolidating a ZeRO checkpoint reads every rank's optimizer shards: 12 B per
    parameter, ~22 GB for bigG; per rank that would be 8x that per node). A bad source raises the
    same ConfigError on every rank."""
    def read() -> dict:
        sd, arch, kind = read_source(path)
        _check_arch(arch, model, path)
        sd, notes = adapt_state_dict(sd, model, path)
        model.load_state_dict(sd, strict=False)  # only head.* can be absent (checked above)
        return {"kind": kind, "source_image_size": (arch or {}).get("image_size"),
                "source_step": (arch or {}).get("step"), "image_size": model.config.image_size,
                "notes": notes}
    info = ctx.agree(read)
    if ctx.distributed:
        with torch.no_grad():
            for t in model.state_dict().values():  # on the collective's device (NCCL: GPU)
                buf = ctx.broadcast_(t.to(ctx.device), src=0)
                if not ctx.is_main:
                    t.copy_(buf)
    return info


def load_initial_centers(pfc, cfg) -> None:
    """Call once for a NEW run after PartialFC is built: this rank's block of the previous run's
    centers, re-sharded to this world size by training/checkpoint.py. The previous optimizer
    moments and RNG state are not taken (a fresh run: optimizer and sampling start anew)."""
    if not cfg.init_centers_from:
        return
    from training.checkpoint import load_centers
    from training.export import resolve_step_dir

    def load() -> None:  # every rank reads its block; one bad read stops every rank (one line)
        step = resolve_step_dir(Path(cfg.init_centers_from))
        world = int(read_json(step / "trainer_state.json")["world_size"])
        rng = torch.get_rng_state()
        scratch = torch.optim.SGD([pfc.weight], lr=0.0)  # receives the old moments; dropped
        load_centers(step, pfc, scratch, world)
        torch.set_rng_state(rng)
        log.info("class centers [%d, %d) initialized from %s", pfc.start, pfc.start + pfc.num_local, step)
    every_rank_reads(pfc.ctx, load)
