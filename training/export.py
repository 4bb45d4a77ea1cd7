"""Export a trained MLCD encoder as a HF transformers folder (`mlcd export`, `make export`):

    python -m training.export CHECKPOINT OUT_DIR [--model NAME|config.json] [--with-head] [--dtype D]
        [--eval results.md] [--push-to-hub REPO [--config F] run.allow_upload=true]

CHECKPOINT is one of
- a training run folder (`${train.out_dir}`) or its `checkpoints/` folder: the step named by
  `latest` is exported;
- a step folder `checkpoints/step_N/` (DeepSpeed ZeRO checkpoint + trainer_state.json): the fp32
  backbone is gathered with deepspeed's zero_to_fp32, the architecture read from
  trainer_state.json's `model_config`;
- a bare model state file (.safetensors, or .pt/.bin read with weights_only=True) with our keys
  (`vision_model.*`, `head.weight`) or HF's; needs --model (a preset name, or a JSON file holding
  a ModelConfig dict or a trainer_state.json).

OUT_DIR gets README.md (a model card: architecture, data, K, l, steps, loss, the eval table
when found, the command; training/model_card.py), config.json, model.safetensors (`vision_model.`-prefixed keys: transformers 4.5x and
5.x both load it) and preprocessor_config.json (CLIPImageProcessor), so
`AutoModel.from_pretrained(OUT_DIR)` / `AutoProcessor.from_pretrained(OUT_DIR)` work offline.
The training head is left out unless --with-head (CLIP family: CLIPVisionModelWithProjection).

RICE checkpoints (train.regions) also hold the Region Transformer head (`region_head.*` keys,
training/regions.py). The backbone exports exactly as above (those keys never reach the HF
files), and two more files are written beside them:
- region_head.safetensors: the RegionHead state dict (keys without the `region_head.` prefix:
  region_embedding, layers.{i}.*, norm.*, proj.weight);
- region_head.json: its config, `RegionHead(**{k: cfg[k] for k in ("width", "heads", "mlp_dim",
  "layers", "embed_dim", "act", "eps")})` rebuilds it, plus what its input needs (patch_size,
  image_size, rope2d, rope_theta: it reads the backbone's final class and patch tokens and
  boxes in input pixels; see MLCDRegionEncoder.forward).
Transformers ignores both; the loss heads' class centers (partial_fc/, region_fc/) are not
exported. Model parts beyond the backbone are listed once, in `EXTRA_PARTS` (key prefix -> writer).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from pathlib import Path

import torch

from pipeline.core.config import ConfigError, load_run
from pipeline.core.entry import StageError, disk_full, report
from pipeline.core.io import atomic_path, atomic_write_json, atomic_write_text, read_json
from training.checkpoint import STEP_RE, find_latest, load_backbone_state_dict
from training.hf import from_hf_state_dict, load_state_file, save_hf_folder
from training.model import PRESETS, ModelConfig
from training.model_card import CARD_NAME, check_upload, find_eval_table, model_card, push_to_hub
from training.safe_load import STATE_SUFFIXES, WeightsError

log = logging.getLogger(__name__)
REGION_PREFIX = "region_head."  # RICE's Region Transformer head (training/regions.py)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(StageError, ValueError):
    """A bad argument (a path that is no checkpoint, --model): one line, exit code 2. A damaged
    or refused checkpoint file is a WeightsError (training/safe_load.py): exit code 1."""
    exit_code = 2
    label = "export error"


def resolve_step_dir(path: Path) -> Path:
    """A run folder / checkpoints folder / step folder -> the complete step folder to export
    (`latest`, else the newest complete step: training.checkpoint.find_latest)."""
    if (path / "trainer_state.json").is_file():
        return path
    for folder in (path, path / "checkpoints"):
        if folder.is_dir() and ((folder / "latest").is_file()
                                or any(STEP_RE.match(p.name) for p in folder.iterdir())):
            step = find_latest(folder)
            if step is None:
                raise ExportError(f"{folder}: no complete checkpoint (trainer_state.json with "
                                  "complete=true)")
            return step
    raise ExportError(f"{path}: not a training checkpoint (no trainer_state.json, no latest file)")


def model_config_from(spec: str) -> ModelConfig:
    """--model: a preset name, or a JSON file with a ModelConfig dict / a trainer_state.json."""
    if spec in PRESETS:
        return ModelConfig(name=spec)
    p = Path(spec)
    if not p.is_file():
        raise ExportError(f"--model {spec!r}: neither a preset ({', '.join(PRESETS)}) nor a file")
    d = read_json(p)
    d = d.get("model_config", d)
    return _config(d, str(p))


def _config(d: dict, where: str) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ExportError(f"{where}: model_config has unknown keys {unknown}")
    return ModelConfig(**d)


def _zero_tag_dir(step: Path) -> Path:
    """The folder holding DeepSpeed's `*model_states.pt` (the step folder or one level below)."""
    for cand in (step, *sorted(p for p in step.iterdir() if p.is_dir())):
        if any(cand.glob("*model_states.pt")):
            return cand
    raise WeightsError(f"{step}: no DeepSpeed model states (*model_states.pt) found")


def load_training_checkpoint(path: Path, region_head: bool = False) -> tuple[dict, ModelConfig, dict]:
    """(our state dict in fp32, ModelConfig, trainer_state) of a complete training checkpoint.
    Keys of EXTRA_PARTS (a RICE checkpoint's `region_head.*`) are dropped unless region_head=True:
    callers that build an MLCDEncoder (eval, init_from) get the backbone + head only."""
    step = resolve_step_dir(path)
    try:
        state = read_json(step / "trainer_state.json")
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise WeightsError(f"{step}/trainer_state.json: unreadable ({e})") from None
    if not state.get("complete"):
        raise WeightsError(f"{step}/trainer_state.json: checkpoint is not complete (killed while "
                           "saving?); use an earlier step")
    if not isinstance(state.get("model_config"), dict):
        raise WeightsError(f"{step}/trainer_state.json: no model_config")
    try:
        cfg = _config(state["model_config"], f"{step}/trainer_state.json")
    except (ExportError, TypeError, ValueError) as e:
        raise WeightsError(str(e) if isinstance(e, ExportError) else f"{step}/trainer_state.json: "
                           f"bad model_config ({e})") from None
    # One reader for every ZeRO stage (0 stores the module whole; 1-3 go through zero_to_fp32).
    sd = _strip_module(dict(load_backbone_state_dict(_zero_tag_dir(step))))
    if not region_head:
        sd = {k: v for k, v in sd.items() if not k.startswith(tuple(EXTRA_PARTS))}
    return sd, cfg, state


def _strip_module(sd: dict) -> dict:
    if sd and all(k.startswith("module.") for k in sd):  # DDP / engine wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def export(checkpoint: str | Path, out_dir: str | Path, model: str | None = None,
           with_head: bool = False, dtype: str = "float32", eval_table: str | None = None,
           command: str = "") -> Path:
    src = Path(checkpoint)
    info: dict = {"source": str(src)}
    if src.is_file():
        if src.suffix not in STATE_SUFFIXES:
            raise ExportError(f"{src}: a state file must end in {STATE_SUFFIXES}")
        if model is None:
            raise ExportError(f"{src}: a bare state file needs --model (preset name or JSON)")
        sd = from_hf_state_dict(_strip_module(load_state_file(src)))
        state = {}
        cfg = model_config_from(model)
        # The file decides whether a head exists; --model only fixes the backbone.
        head = sd.get("head.weight")
        cfg = dataclasses.replace(cfg, embed_dim=int(head.shape[0]) if head is not None else 0)
    elif src.is_dir():
        sd, cfg, state = load_training_checkpoint(src, region_head=True)
        if model is not None:
            log.warning("--model ignored: the checkpoint's trainer_state.json names the model")
        info.update(step=state.get("step"), samples_seen=state.get("samples_seen"))
    else:
        raise ExportError(f"{src}: no such file or folder")
    cfg = cfg.resolved()
    extra = {p: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)} for p in EXTRA_PARTS}
    sd = {k: v for k, v in sd.items() if not k.startswith(tuple(EXTRA_PARTS))}
    _check_shapes(sd, cfg, src, ExportError if src.is_file() else WeightsError)
    out = save_hf_folder(sd, cfg, out_dir, with_head=with_head, dtype=DTYPES[dtype])
    for prefix, part in extra.items():
        if part:  # e.g. info["region_head"]: the config written beside the HF files
            info[prefix.rstrip(".")] = EXTRA_PARTS[prefix](part, cfg, state, out, DTYPES[dtype], src)
    info.update(model_config=dataclasses.asdict(cfg), with_head=with_head, dtype=dtype,
                params=sum(v.numel() for k, v in sd.items() if k.startswith("vision_model.")))
    atomic_write_json(Path(out) / "mlcd_export.json", info)  # provenance; HF ignores it
    card = model_card(info, state, find_eval_table(state, eval_table), command or f"mlcd export {src} {out_dir}")
    atomic_write_text(Path(out) / CARD_NAME, card)
    return out


def save_region_head(sd: dict, cfg: ModelConfig, state: dict, out: Path, dtype: torch.dtype, src: Path) -> dict:
    """region_head.safetensors + region_head.json beside the HF files (checked by loading them
    into a RegionHead of that config first). Returns the config written."""
    from safetensors.torch import save_file

    from training.regions import RegionHead
    layers = (state.get("region_head") or {}).get("layers") or len(
        {k.split(".")[1] for k in sd if k.startswith("layers.")})
    spec = {"width": cfg.width, "heads": cfg.heads, "mlp_dim": cfg.mlp_dim, "layers": layers,
            "embed_dim": cfg.embed_dim, "act": cfg.act, "eps": cfg.layer_norm_eps}
    with torch.device("meta"):
        ref = RegionHead(**spec).state_dict()
    bad = sorted(set(ref) ^ set(sd)) + sorted(k for k in set(ref) & set(sd) if ref[k].shape != sd[k].shape)
    if bad:
        raise ExportError(f"{src}: region_head weights do not match a {layers}-layer RegionHead of "
                          f"{cfg.name} (first mismatch: {bad[0]})")
    conf = {**spec, "patch_size": cfg.patch_size, "image_size": cfg.image_size, "rope2d": cfg.rope2d,
            "rope_theta": cfg.rope_theta, "region_classes": state.get("region_classes"),
            "module": "training.regions.RegionHead"}
    with atomic_path(Path(out) / "region_head.safetensors") as tmp:
        save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(tmp), metadata={"format": "pt"})
    atomic_write_json(Path(out) / "region_head.json", conf)
    return conf


# Model parts beyond the backbone (key prefix -> writer of their files beside the HF folder):
# left out of the HF weights, and of load_training_checkpoint's state dict unless asked for.
EXTRA_PARTS = {REGION_PREFIX: save_region_head}


def _check_shapes(sd: dict, cfg: ModelConfig, src: Path, error: type = WeightsError) -> None:
    """Loads into a meta-device model (no memory) so a config/weights mismatch is one clear
    error here, not a shape error inside transformers later. error: WeightsError when the
    checkpoint's own config disagrees with its weights, ExportError when --model does."""
    from training.model import build_model
    with torch.device("meta"):
        ref = build_model(cfg).state_dict()
    missing = sorted(set(ref) - set(sd))
    unexpected = sorted(set(sd) - set(ref))
    bad = [k for k in set(ref) & set(sd) if tuple(ref[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or bad:
        raise error(f"{src}: weights do not match model {cfg.name} (missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}, wrong shape {sorted(bad)[:3]})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mlcd export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="training run/checkpoint/step folder, or a state file")
    ap.add_argument("out_dir")
    ap.add_argument("--model", default=None,
                    help=f"for a bare state file: a preset ({', '.join(PRESETS)}) or a JSON config")
    ap.add_argument("--with-head", action="store_true",
                    help="also export the training head (CLIP family: as visual_projection)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--eval", default=None, help="an eval results.md for the model card (default: the "
                    "training run's eval/results.md, if any)")
    ap.add_argument("--push-to-hub", default=None, metavar="REPO",
                    help="upload the folder to this hub repo (needs run.allow_upload=true)")
    ap.add_argument("--config", default=None, help="run file whose `run` section applies (allow_upload)")
    ap.add_argument("overrides", nargs="*", help="run.k=v overrides (run.allow_upload=true)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = shlex.join(["mlcd", "export", *(sys.argv[1:] if argv is None else argv)])
    try:
        run = load_run(args.config, args.overrides)
        if args.push_to_hub:  # refused before any work
            check_upload(args.push_to_hub, run.allow_upload)
        out = export(args.checkpoint, args.out_dir, args.model, args.with_head, args.dtype, args.eval, command)
        if args.push_to_hub:
            log.info("uploaded: %s", push_to_hub(Path(out), args.push_to_hub, run.allow_upload))
    except (StageError, ConfigError) as e:  # a bad file (exit 1) or argument (exit 2): one line
        return report(e)
    except (FileNotFoundError, ValueError, KeyError) as e:
        return report(ExportError(str(e)))
    except Exception as e:  # a full disk: one line, exit 1; anything else keeps its traceback
        full = disk_full(e, args.out_dir)
        if full is None:
            raise
        return report(full)
    print(json.dumps({"out_dir": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
