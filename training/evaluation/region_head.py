"""RICE's own region embeddings for eval-regions: the exported Region Transformer head
(``region_head.safetensors`` + ``region_head.json`` beside the HF files, training/export.py) on top
of the exported backbone, run on each probe box.

The feature of a box is the head's output for it (the region-attention token after the head's
LayerNorm and projection: what the region PartialFC scored in training), L2-normalized. The
backbone is our own MLCDEncoder loaded from the HF folder (training/evaluation/features.py
``_our_model``: the export's image processor, so the input and box geometry are those of the
pooled-patch feature of the same model). Only an HF export that holds a region head has this
feature; plain MLCD and random init have no region layers. Cost: one backbone pass plus the head
layers per probe image, done once more beside the pooled-patch pass.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from training.evaluation.features import EvalInputError, Extractor, _our_model

FILES = ("region_head.json", "region_head.safetensors")
SPEC_KEYS = ("width", "heads", "mlp_dim", "layers", "embed_dim", "act", "eps")


def has_region_head(spec) -> bool:
    """An HF export with the region head's files (other kinds: only pooled patch tokens)."""
    return spec.kind == "hf" and all((Path(spec.path) / f).is_file() for f in FILES)


def build_region_head(spec, device: torch.device) -> Extractor:
    """Our backbone from the HF folder + its RegionHead; ``module.region_head`` is the head."""
    from safetensors.torch import load_file

    from training.hf import config_from_hf, from_hf_state_dict
    from training.regions import RegionHead
    from training.safe_load import read_hf_weights
    p = Path(spec.path)
    try:
        conf = json.loads((p / FILES[0]).read_text())
        cfg = config_from_hf(json.loads((p / "config.json").read_text()))
        head = RegionHead(**{k: conf[k] for k in SPEC_KEYS})
        head.load_state_dict(load_file(str(p / FILES[1])))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise EvalInputError(f"{p}: region head unusable ({str(e).splitlines()[0]})") from None
    ex = _our_model(cfg, from_hf_state_dict(read_hf_weights(p)), 0, "pooled",
                    {"kind": "hf", "weights": str(p), "feature": "region_head", "region_head": conf})
    ex.module.region_head = head
    ex.module.to(device).eval()
    return ex


@torch.no_grad()
def head_features(ex: Extractor, x: torch.Tensor, boxes: list[torch.Tensor]) -> list[torch.Tensor]:
    """x (B, 3, H, W), boxes[i] (R_i, 4) in input pixels -> per image (R_i, D) L2-normalized
    region-head embeddings (one forward for the batch, boxes padded to max R_i)."""
    from training.regions import region_embeddings
    model = ex.module
    r = max(1, max(len(b) for b in boxes))
    pad = torch.zeros(len(boxes), r, 4, device=x.device)
    valid = torch.zeros(len(boxes), r, dtype=torch.bool, device=x.device)
    for i, b in enumerate(boxes):
        pad[i, :len(b)] = b.to(x.device, torch.float32)
        valid[i, :len(b)] = True
    hidden = model.vision_model(x).last_hidden_state
    emb = region_embeddings(model.vision_model, model.region_head, hidden, x, pad, valid,
                            model.config.resolved().patch_size).float()
    return [F.normalize(emb[i, :len(b)], dim=1) for i, b in enumerate(boxes)]
