"""Exact two-way conversion between our MLCDEncoder and HF transformers vision towers.

Our backbone already uses HF parameter names, so conversion is key prefixes only:
- ours:            `vision_model.<hf name>`, `head.weight`
- HF 4.5x / DeepGlint's published files: `vision_model.<hf name>` (CLIPVisionModel,
  MLCDVisionModel); CLIPVisionModelWithProjection adds `visual_projection.weight`.
- HF 5.x `state_dict()`: `<hf name>` without the prefix (5.x maps the prefixed layout on load).
We write the prefixed layout: one file both generations load.

The architecture is picked by `rope2d`: CLIP (absolute positions) -> `CLIPVisionModel`,
2D RoPE -> `MLCDVisionModel`. config.json is written by transformers' own config class, plus
the keys transformers 4.5x reads that 5.x leaves out.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pipeline.core import fs
from pipeline.core.io import atomic_path, atomic_write_json
from training.model import CLIP_MEAN, CLIP_STD, PRESETS, MLCDEncoder, ModelConfig, build_model
from training.safe_load import read_hf_weights, read_state_file

log = logging.getLogger(__name__)
PREFIX = "vision_model."
PROJ = "visual_projection.weight"  # CLIPVisionModelWithProjection's head (bias-free, like ours)
# Non-persistent in current HF but persistent in some older saves: never weights.
BUFFERS = ("position_ids", "inv_freq", "original_inv_freq")


def architecture(cfg: ModelConfig, with_head: bool = False) -> str:
    cfg = cfg.resolved()
    if cfg.rope2d:
        return "MLCDVisionModel"
    return "CLIPVisionModelWithProjection" if with_head and cfg.embed_dim else "CLIPVisionModel"


def hf_config_dict(cfg: ModelConfig, with_head: bool = False) -> dict:
    """config.json contents for transformers 5.x and 4.5x."""
    from transformers import CLIPVisionConfig, MLCDVisionConfig
    cfg = cfg.resolved()
    common: dict[str, Any] = {"hidden_size": cfg.width, "intermediate_size": cfg.mlp_dim,
                  "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
                  "image_size": cfg.image_size, "patch_size": cfg.patch_size, "hidden_act": cfg.act,
                  "layer_norm_eps": cfg.layer_norm_eps, "num_channels": 3}
    if cfg.rope2d:
        if cfg.rope_theta != 10000.0:
            # 4.5x hard-codes theta=1e4 in MLCDRotaryEmbedding; only 5.x reads rope_parameters.
            log.warning("rope_theta=%s: transformers 4.5x ignores it (uses 1e4); only 5.x matches",
                        cfg.rope_theta)
        hf: Any = MLCDVisionConfig(**common, rope_parameters={"rope_type": "axial",
                                                         "rope_theta": cfg.rope_theta})
    else:
        hf = CLIPVisionConfig(**common, projection_dim=cfg.embed_dim or cfg.width)
    hf.architectures = [architecture(cfg, with_head)]
    # unset fields (5.x's `dtype: null`, `problem_type: null`) are left out: a reader sees one dtype
    d = {k: v for k, v in hf.to_dict().items() if v is not None}
    d.setdefault("torch_dtype", "float32")  # 4.5x's name; 5.x reads `dtype` and accepts this
    if cfg.rope2d:
        # 4.5x's AutoConfig knows MLCD only as "mlcd" (DeepGlint's hub configs say so too);
        # 5.x maps "mlcd" to MLCDVisionConfig/MLCDVisionModel as well. "mlcd_vision_model"
        # (what 5.x writes itself) fails in 4.5x.
        d["model_type"] = "mlcd"
    return d


def config_from_hf(d: dict, **overrides) -> ModelConfig:
    """ModelConfig for a HF config.json (CLIP or MLCD vision model, any generation)."""
    mt = d.get("model_type", "")
    if mt in ("clip", "mlcd") and "vision_config" in d:  # a full CLIPModel config
        d = {**d["vision_config"], "model_type": mt + "_vision_model"}
        mt = d["model_type"]
    if mt.startswith("mlcd"):
        rope2d = True
    elif mt.startswith("clip"):
        rope2d = False
    else:
        raise ValueError(f"config.json: model_type={mt!r} is neither a CLIP nor an MLCD vision model")
    rope = d.get("rope_parameters") or {}
    fields = {
        "image_size": int(d["image_size"]), "patch_size": int(d["patch_size"]), "width": int(d["hidden_size"]),
        "layers": int(d["num_hidden_layers"]), "heads": int(d["num_attention_heads"]),
        "mlp_dim": int(d["intermediate_size"]), "rope2d": rope2d, "act": d.get("hidden_act", "gelu"),
        "layer_norm_eps": float(d.get("layer_norm_eps", 1e-5)),
        "rope_theta": float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))}
    # Every field is explicit; the preset name is a label (the closest family member).
    name = next((n for n, p in PRESETS.items() if p["rope2d"] == rope2d and p["width"] == fields["width"]),
                "vit_tiny_rope2d" if rope2d else "vit_tiny_clip")
    fields.update(overrides)
    fields.setdefault("embed_dim", 0)
    return ModelConfig(name=name, **fields)


def to_hf_state_dict(sd: dict[str, torch.Tensor], prefixed: bool = True,
                     with_head: bool = False) -> dict[str, torch.Tensor]:
    """Our MLCDEncoder state dict -> HF keys (`vision_model.` prefix kept when `prefixed`);
    `head.weight` -> `visual_projection.weight` only when asked."""
    out = {}
    for k, v in sd.items():
        if k.startswith(PREFIX):
            out[k if prefixed else k[len(PREFIX):]] = v
        elif k == "head.weight":
            if with_head:
                out[PROJ] = v
        elif k.startswith("head."):
            raise KeyError(f"{k}: the HF export has no place for it (head must be bias-free)")
        else:
            raise KeyError(f"{k}: not an MLCDEncoder parameter (expected vision_model.* or head.*)")
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF state dict (prefixed or not; CLIPVisionModel, MLCDVisionModel, ...WithProjection), or
    one already in our layout -> our MLCDEncoder keys. Buffers older saves carry are dropped."""
    out = {}
    for k, v in sd.items():
        if k.rsplit(".", 1)[-1] in BUFFERS:
            continue
        if k == PROJ:
            out["head.weight"] = v
        elif k.startswith((PREFIX, "head.")):  # already ours
            out[k] = v
        else:
            out[PREFIX + k] = v
    return out


# The one weights reader (weights-only, one line per bad file): training/safe_load.py.
load_state_file = read_state_file
_hf_weights = read_hf_weights


def load_hf_folder(folder: str | Path, embed_dim: int | None = None,
                   grad_checkpointing: bool = False) -> MLCDEncoder:
    """Our MLCDEncoder with the weights of a local HF CLIPVisionModel / MLCDVisionModel folder
    (e.g. DeepGlint's released checkpoints). The head comes from `visual_projection` when the
    folder has one; otherwise `embed_dim` (default 0: none) builds a freshly initialized head."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing (not a HF model folder)")
    sd = from_hf_state_dict(_hf_weights(folder))
    has_head = "head.weight" in sd
    if has_head and embed_dim not in (None, sd["head.weight"].shape[0]):
        raise ValueError(f"{folder}: visual_projection has {sd['head.weight'].shape[0]} outputs, "
                         f"asked for embed_dim={embed_dim}")
    dim = sd["head.weight"].shape[0] if has_head else (embed_dim or 0)
    try:
        cfg = config_from_hf(json.loads(cfg_path.read_text()), embed_dim=dim,
                             grad_checkpointing=grad_checkpointing)
    except KeyError as e:
        raise ValueError(f"{cfg_path}: missing key {e}") from None
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k.startswith("head.") and not has_head)]
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match config.json "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model


def processor_config(cfg: ModelConfig) -> dict:
    """CLIPImageProcessor: shortest side -> image_size (bicubic), center crop, CLIP mean/std."""
    cfg = cfg.resolved()
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"shortest_edge": cfg.image_size},
        "resample": 3,  # PIL bicubic
        "do_center_crop": True, "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }


def save_hf_folder(model_or_sd: MLCDEncoder | dict, cfg: ModelConfig, out_dir: str | Path,
                   with_head: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Writes config.json, model.safetensors (prefixed `vision_model.` keys) and
    preprocessor_config.json; each file atomically (weights last: a folder with weights is whole)."""
    out = Path(out_dir)
    fs.makedirs(out)  # a URL (s3://...): no folder; each file is one upload
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else model_or_sd
    cfg = cfg.resolved()
    if with_head and cfg.rope2d and cfg.embed_dim:
        raise ValueError("MLCDVisionModel has no projection head; export the rope2d model without "
                         "--with-head")
    hf = to_hf_state_dict(sd, prefixed=True, with_head=with_head)
    hf = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
          .detach().cpu().contiguous() for k, v in hf.items()}
    conf = hf_config_dict(cfg, with_head=with_head)
    if dtype is not None:
        conf["torch_dtype"] = str(dtype).removeprefix("torch.")
    atomic_write_json(out / "config.json", conf)
    atomic_write_json(out / "preprocessor_config.json", processor_config(cfg))
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(hf, str(tmp), metadata={"format": "pt"})
    return out
