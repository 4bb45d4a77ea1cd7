"""Labeled image sets and frozen feature extractors for evaluation, behind one small interface.

Datasets (`open_labeled`): a folder of img2dataset shards whose samples carry ``cls`` in their
``.json`` (+ ``classes.json`` beside them: the demo probe sets), or an image folder per class
(torchvision ``ImageFolder`` layout). Images are read by byte offset into the tar (random access,
so ranks can take any rows; indexing a 1k-sample shard costs ~10 ms).

Extractors (`build_extractor`, one per model kind) give ``transform(PIL) -> tensor`` and
``__call__(pixel_values) -> (B, D)`` pooled features:
- ``checkpoint``: our training checkpoint folder (DeepSpeed ZeRO, read with zero_to_fp32) or a bare
  ``.safetensors`` state dict; pooled = ``vision_model(x).pooler_output`` (the HF export's output).
- ``hf``: an exported folder via transformers ``AutoModel`` + its saved image processor.
- ``open_clip``: a model name + pretrained tag or local weights file (null = random init);
  features = ``encode_image`` (CLIP's linear-probe features).
- ``encoder``: the stage-1 embedding encoder (pipeline/encoders.py), image tower only.
- ``random``: our architecture at random init, from a ModelConfig or from the config of a
  checkpoint/export folder ("the same architecture as the trained model").

`extract` runs one extractor over one dataset on all ranks: rank r takes the contiguous row block
[r*ceil(N/W), (r+1)*ceil(N/W)), features are all-gathered (padded to equal blocks) so every rank
gets the (N, D) float32 matrix in dataset order, identical to a 1-rank run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from pipeline.core import netpolicy
from pipeline.core.dist import DistContext
from pipeline.core.entry import StageError
from pipeline.core.images import decode_rgb, is_image_name
from pipeline.core.shards import ShardSpecError, check_member_size, expand_shards
from pipeline.core.sources import SourceError, is_file_source, list_files
from pipeline.core.tracking import progress

log = logging.getLogger("mlcd.eval")

KINDS = ("checkpoint", "hf", "open_clip", "encoder", "random")


class EvalInputError(StageError, ValueError):
    """A dataset or model named in ``eval`` that cannot be read: the message names the file.
    Exit code 2: the fix is in the eval section (a path, a kind)."""
    exit_code = 2


# ------------------------------------------------------------------------------------ datasets

class LabeledImages(Dataset):
    """Rows of (image, label). ``items[i]`` is (file, byte offset, size); offset -1 = whole file."""

    def __init__(self, source: str, items: list[tuple[str, int, int]], labels: np.ndarray,
                 classes: list[str], transform: Callable | None = None):
        self.source, self.items, self.classes, self.transform = source, items, classes, transform
        self.labels = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def read(self, i: int) -> Image.Image:
        path, off, size = self.items[i]
        if off < 0:
            return decode_rgb(path)
        with open(path, "rb") as f:
            f.seek(off)
            return decode_rgb(f.read(size), where=f"{path}@{off}")

    def __getitem__(self, i: int):
        img = self.read(i)
        return self.transform(img) if self.transform else img, int(self.labels[i])

    def with_transform(self, transform: Callable) -> LabeledImages:
        return LabeledImages(self.source, self.items, self.labels, self.classes, transform)

    def fingerprint(self) -> str:
        h = hashlib.sha1(json.dumps([self.items, self.classes]).encode())
        h.update(self.labels.tobytes())
        return h.hexdigest()[:16]


def _key_ext(name: str) -> tuple[str, str]:
    # webdataset's rule: the key is the path up to the first dot of the file's base name
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _shard_items(shard: str) -> tuple[list[tuple[str, int, int]], list[int]]:
    items, labels = [], []
    samples: dict[str, dict] = {}
    order: list[str] = []
    try:
        with tarfile.open(shard) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                check_member_size(m, shard, EvalInputError)
                key, ext = _key_ext(m.name)
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                if ext == "json":
                    samples[key]["json"] = json.loads(tf.extractfile(m).read())
                elif is_image_name(m.name):
                    samples[key]["img"] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, json.JSONDecodeError) as e:
        raise EvalInputError(f"{shard}: cannot read shard ({e})") from None
    for key in order:
        s = samples[key]
        if "img" not in s:
            continue  # a sample with no image (e.g. caption only) is not a probe row
        meta = s.get("json") or {}
        if not isinstance(meta.get("cls"), int):
            raise EvalInputError(f"{shard}: sample {key!r} has no integer 'cls' in its .json "
                                 "(probe shards need a class label per sample)")
        items.append((shard, *s["img"]))
        labels.append(meta["cls"])
    return items, labels


def open_labeled(spec: str) -> LabeledImages:
    """A labeled image set from a shard folder / shard spec (``cls`` in each .json) or an image
    folder with one sub-folder per class."""
    p = Path(spec)
    if is_file_source(spec):
        return _image_files(spec)
    try:
        shards = expand_shards(spec)
    except ShardSpecError as e:
        raise EvalInputError(f"dataset {spec}: {e} (expected shards with 'cls' or class folders)") from None
    items, labels = [], []
    for s in shards:
        it, lb = _shard_items(s)
        items += it
        labels += lb
    if not items:
        raise EvalInputError(f"dataset {spec}: no labeled images found")
    labels = np.asarray(labels, dtype=np.int64)
    folder = p if p.is_dir() else Path(shards[0]).parent
    cj = folder / "classes.json"
    if cj.is_file():
        classes = json.loads(cj.read_text())
        if not isinstance(classes, list) or labels.max() >= len(classes) or labels.min() < 0:
            raise EvalInputError(f"{cj}: must list class names covering cls 0..{labels.max()}")
    else:
        log.warning("%s missing: naming classes by their index", cj)
        classes = [str(i) for i in range(int(labels.max()) + 1)]
    return LabeledImages(str(spec), items, labels, [str(c) for c in classes])


def _image_files(spec: str) -> LabeledImages:
    """An image folder with one sub-folder per class, or an image list with a cls/label column
    (pipeline/core/sources.py lists both)."""
    try:
        list_files.cache_clear()  # list it as it is now
        listing = list_files(os.path.abspath(spec))
    except SourceError as e:
        raise EvalInputError(f"dataset {spec}: {e}") from None
    unlabeled = [it for it in listing.items if it.cls is None]
    if unlabeled:
        raise EvalInputError(f"dataset {spec}: {unlabeled[0].path} has no class (eval needs class "
                             "sub-folders, or a cls/label column in the list)")
    labels = np.asarray([it.cls for it in listing.items], dtype=np.int64)
    classes = list(listing.classes) or [str(i) for i in range(int(labels.max()) + 1)]
    items = [(it.path, -1, -1) for it in listing.items]
    return LabeledImages(str(spec), items, labels, classes)


# ---------------------------------------------------------------------------------- extractors

@dataclass
class Extractor:
    """A frozen model: ``transform`` maps a PIL image to a CHW tensor, ``forward`` a batch to
    (B, D) features. ``info`` (kind, resolved weights, ...) goes into the feature-cache key."""
    forward: Callable[[torch.Tensor], torch.Tensor]
    transform: Callable[[Image.Image], torch.Tensor]
    module: torch.nn.Module | None  # moved to the device by build_extractor (None: already there)
    info: dict = field(default_factory=dict)
    # ViT kinds (checkpoint, hf, random): pixel_values -> (B, H/p, W/p, width) patch tokens of
    # last_hidden_state (region features, training/evaluation/regions.py), and the image
    # processor behind `transform` (its resize/crop geometry maps boxes into the input)
    tokens: Callable[[torch.Tensor], torch.Tensor] | None = None
    processor: Any = None

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.forward(pixel_values).float()

    @torch.no_grad()
    def patch_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.tokens is None:
            raise EvalInputError(f"model kind {self.info.get('kind')!r} gives no patch tokens")
        return self.tokens(pixel_values).float()


def patch_grid(hidden: torch.Tensor, pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, T, C) last_hidden_state -> (B, H/p, W/p, C): the patch tokens in raster order (CLIP
    and MLCD put the class token first; whatever precedes the H/p * W/p patches is dropped)."""
    gh, gw = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    return hidden[:, hidden.shape[1] - gh * gw:].reshape(hidden.shape[0], gh, gw, hidden.shape[2])


def processor_transform(proc) -> Callable:
    def tf(img: Image.Image) -> torch.Tensor:
        return proc(images=img, return_tensors="pt")["pixel_values"][0]
    return tf


def _our_model(cfg, state: dict | None, seed: int, feature: str, info: dict) -> Extractor:
    """Our MLCDEncoder (training.model) with ``state`` (None = random init with ``seed``) and the
    export's own image processor (training.hf.processor_config): checkpoint features equal the
    exported folder's."""
    from training.model import ModelConfig, build_model
    if isinstance(cfg, dict):
        try:
            cfg = ModelConfig(**cfg)
        except (TypeError, ValueError) as e:
            raise EvalInputError(f"{info.get('weights') or 'model'}: bad ModelConfig {cfg}: {e}") from None
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    if state is not None:
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatch
            raise EvalInputError(f"{info.get('weights')}: weights do not fit {cfg.name}: "
                                 f"{str(e).splitlines()[-1].strip()}") from None
        # a bare backbone state may lack the training head; the backbone must be whole
        bad = [k for k in missing if not k.startswith("head.")] + list(unexpected)
        if bad:
            raise EvalInputError(f"{info.get('weights')}: state dict does not match {cfg.name}: {bad[:4]}")
    return model_extractor(model, cfg, feature, info)


def model_extractor(model: torch.nn.Module, cfg, feature: str = "pooled", info: dict | None = None,
                    dtype: torch.dtype | None = None, module: bool = True) -> Extractor:
    """An Extractor over a built MLCDEncoder (also the one being trained: training/eval_hook.py),
    with the export's own image processor. dtype: what the model's weights are (bf16 training),
    the float pixels are cast to it. module=False: the model stays where it is (no .to/.eval)."""
    from transformers import CLIPImageProcessor

    from training.hf import processor_config

    def cast(x):
        return x if dtype is None else x.to(dtype)
    if feature == "head":
        def fwd(x):
            return model(cast(x))
    else:
        def fwd(x):
            return model.vision_model(cast(x)).pooler_output
    proc = CLIPImageProcessor(**{k: v for k, v in processor_config(cfg).items()
                                 if k != "image_processor_type"})

    def tokens(x):
        return patch_grid(model.vision_model(cast(x)).last_hidden_state, x, cfg.resolved().patch_size)
    return Extractor(fwd, processor_transform(proc), model if module else None,
                     {**(info or {}), "model_config": dict(vars(cfg.resolved())), "feature": feature},
                     tokens, proc)


def resolve_checkpoint(path: str) -> Path:
    """A training out_dir, its ``checkpoints/`` folder, or one ``step_*`` folder -> the step
    folder (``latest`` names the newest complete one)."""
    from training.export import ExportError, resolve_step_dir
    try:
        return resolve_step_dir(Path(path))
    except ExportError as e:
        raise EvalInputError(str(e)) from None


def _checkpoint(spec) -> Extractor:
    """Training checkpoint folder (via training.export's loader: zero_to_fp32 + trainer_state's
    model_config) or a bare state file (.safetensors/.pt, our or HF keys) + `model` fields."""
    from training.export import ExportError, load_training_checkpoint
    from training.hf import from_hf_state_dict, load_state_file
    from training.safe_load import WeightsError
    p = Path(spec.path)
    info = {"kind": "checkpoint", "weights": spec.path}
    try:
        if p.is_file():
            if not spec.model:
                raise EvalInputError(f"{p}: a bare state file needs `model` (ModelConfig fields)")
            sd = from_hf_state_dict(load_state_file(p))
            mcfg = dict(spec.model)
            if "head.weight" in sd:  # the file decides the head width (as training.export does)
                mcfg["embed_dim"] = int(sd["head.weight"].shape[0])
            return _our_model(mcfg, sd, spec.seed, spec.feature, info)
        sd, cfg, st = load_training_checkpoint(p)
    except (ExportError, FileNotFoundError, ValueError) as e:
        if isinstance(e, (EvalInputError, WeightsError)):  # a bad weights file: exit 1, as is
            raise
        raise EvalInputError(f"{p}: {e}") from None
    info.update(weights=str(resolve_checkpoint(spec.path)), step=st.get("step"))
    return _our_model(cfg, sd, spec.seed, spec.feature, info)


def _weights_id(path: Path) -> str:
    """Cheap identity of a weights file/folder (names, sizes, mtimes) for the feature cache."""
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    h = hashlib.sha1()
    for f in files:
        if f.is_file():
            s = f.stat()
            name = f.relative_to(path) if path.is_dir() else f.name
            h.update(f"{name}:{s.st_size}:{s.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def build_extractor(spec, device: torch.device, ctx: DistContext | None = None) -> Extractor:
    """``spec``: a training.evaluation.evaluate.ModelSpec (kind, path, arch, pretrained, model, seed, feature).
    ctx: every rank builds; a bad model file stops all of them with one line, printed once."""
    if ctx is not None:
        from training.safe_load import every_rank_reads
        return every_rank_reads(ctx, lambda: build_extractor(spec, device))
    builders = {"checkpoint": _checkpoint, "hf": lambda s: _hf(s.path), "random": _random,
                "open_clip": _open_clip, "encoder": lambda s: _encoder(s, device)}
    if spec.kind not in builders:
        raise EvalInputError(f"unknown model kind {spec.kind!r} (known: {', '.join(KINDS)})")
    ex = builders[spec.kind](spec)
    if ex.module is not None:
        ex.module.to(device).eval()
        ex.info.setdefault("params", sum(p.numel() for p in ex.module.parameters()))
    return ex


def _random(spec) -> Extractor:
    """Random init of our architecture: `model` (ModelConfig fields), or the architecture of the
    checkpoint / HF export at `path` (so the baseline is exactly the trained model's)."""
    info = {"kind": "random", "seed": spec.seed}
    if spec.model:
        return _our_model(dict(spec.model), None, spec.seed, spec.feature, info)
    p = Path(spec.path)
    if (p / "config.json").is_file():  # an HF folder (ours or DeepGlint's CLIP/MLCD towers)
        from training.hf import config_from_hf
        try:
            cfg = config_from_hf(json.loads((p / "config.json").read_text()))
        except (ValueError, KeyError) as e:
            raise EvalInputError(f"{p}/config.json: {e}") from None
        return _our_model(cfg, None, spec.seed, spec.feature, {**info, "like": spec.path})
    from training.export import ExportError, model_config_from
    step = resolve_checkpoint(spec.path)
    try:
        cfg = model_config_from(str(step / "trainer_state.json"))
    except (ExportError, ValueError) as e:
        raise EvalInputError(f"{step}/trainer_state.json: no usable model_config ({e})") from None
    return _our_model(cfg, None, spec.seed, spec.feature, {**info, "like": spec.path})


def _hf(path: str) -> Extractor:
    """transformers AutoModel (CLIPVisionModel, MLCDVisionModel, or a full CLIPModel's tower) and
    the folder's saved image processor; features = the tower's pooler_output. The weights are
    read by training/safe_load.py (weights-only, an index may not leave its folder; a bad file is
    one WeightsError line) and handed to transformers, which reads no weights file itself."""
    from transformers import AutoConfig, AutoImageProcessor
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    from training.safe_load import WeightsError, read_hf_weights
    p = Path(path)
    if not (p / "config.json").is_file():
        raise EvalInputError(f"{path}: not an HF model folder (no config.json)")
    try:
        proc = AutoImageProcessor.from_pretrained(path)
        conf = AutoConfig.from_pretrained(path)
        cls = MODEL_MAPPING[type(conf)]
    except (OSError, ValueError, KeyError) as e:
        raise EvalInputError(f"{path}: cannot load with transformers ({str(e).splitlines()[0]})") from None
    sd = read_hf_weights(p)
    try:
        model, info = cls.from_pretrained(None, config=conf, state_dict=sd, output_loading_info=True)
    except (RuntimeError, ValueError) as e:  # a tensor of the wrong shape
        raise WeightsError(f"{path}: weights do not fit its config.json ({str(e).splitlines()[0]})") from None
    missing = sorted(k for k in info["missing_keys"] if k.rsplit(".", 1)[-1] != "position_ids")
    if missing:
        raise WeightsError(f"{path}: weights do not fit its config.json: {missing[0]} missing "
                           f"({len(missing)} missing keys)")
    model.eval()
    tower = getattr(model, "vision_model", model)

    def fwd(x):
        return tower(pixel_values=x).pooler_output

    patch = getattr(model.config, "vision_config", model.config).patch_size

    def tokens(x):
        return patch_grid(tower(pixel_values=x).last_hidden_state, x, patch)
    return Extractor(fwd, processor_transform(proc), model,
                     {"kind": "hf", "weights": path, "model_type": model.config.model_type,
                      "class": type(model).__name__}, tokens, proc)


def _open_clip(spec) -> Extractor:
    """An open_clip model (name + pretrained tag or local file; null = random init);
    features = encode_image (the embedding CLIP's own linear-probe evaluation uses)."""
    import open_clip
    torch.manual_seed(spec.seed)
    netpolicy.check_open_clip(spec.arch, spec.pretrained, f"eval.models[{spec.name}].pretrained")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.arch, pretrained=spec.pretrained or None, pretrained_text=False)
    except (RuntimeError, ValueError, OSError) as e:
        raise EvalInputError(f"open_clip {spec.arch} pretrained={spec.pretrained!r}: "
                             f"{str(e).splitlines()[0]}") from None
    return Extractor(model.encode_image, preprocess, model,
                     {"kind": "open_clip", "arch": spec.arch, "pretrained": spec.pretrained})


def _encoder(spec, device) -> Extractor:
    """The stage-1 encoder's image tower (pipeline.encoders): same weights and preprocessing
    as the embeddings that were clustered; `model` holds its EncoderConfig fields."""
    from pipeline.encoders import EncoderConfig, build_encoder
    try:
        enc = build_encoder(EncoderConfig(**dict(spec.model)), device)
    except (TypeError, ValueError, RuntimeError, OSError) as e:
        raise EvalInputError(f"stage-1 encoder {dict(spec.model)}: {str(e).splitlines()[0]}") from None
    tower = getattr(enc, "net", None) or getattr(enc, "model", None)  # offline | open_clip
    params = sum(p.numel() for p in tower.parameters()) if tower is not None else 0
    return Extractor(enc.encode_images, enc.preprocess, None,
                     {"kind": "encoder", **enc.describe(), "params": params})


# ---------------------------------------------------------------------------------- extraction

def _collate(batch):
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])


def extract(ex: Extractor, ds: LabeledImages, ctx: DistContext, batch_size: int = 64,
            workers: int = 0, desc: str = "features", device: torch.device | None = None) -> np.ndarray:
    """(N, D) float32 features of ``ds`` in row order, on every rank. Each rank computes one
    contiguous block of rows; the blocks are all-gathered (one collective per dataset)."""
    device = device or ctx.device
    n, world = len(ds), ctx.world_size
    per = math.ceil(n / world)
    lo, hi = min(ctx.rank * per, n), min((ctx.rank + 1) * per, n)
    sub = Subset(ds.with_transform(ex.transform), range(lo, hi))
    loader = DataLoader(sub, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                        persistent_workers=False)
    out = []
    with progress(hi - lo, desc, ctx) as bar:
        for x, _ in loader:
            out.append(ex(x.to(device, non_blocking=True)).cpu())
            bar.update(len(x))
    local = torch.cat(out) if out else None
    if not ctx.distributed:
        return local.numpy() if local is not None else np.zeros((0, 0), np.float32)
    # a rank with no rows (N < W) still joins; it learns D from the others
    dim = ctx.all_reduce_(torch.tensor([local.shape[1] if local is not None else 0], device=device), "max")
    buf = torch.zeros(per, int(dim), dtype=torch.float32, device=device)
    if local is not None:
        buf[: len(local)] = local.to(device)
    return ctx.all_gather(buf)[:n].cpu().numpy()


def to_jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=str))
