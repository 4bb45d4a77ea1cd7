"""The CLIP baseline (`train.objective: clip`): image-text contrastive training of the same image
tower, as one more loss head (training/heads.py), so MLCD can be compared with the method a user
would otherwise run on the same images, init, optimizer, schedule, batch and steps.

- Text: open_clip's TextTransformer built from `train.clip` (small width/depth, never
  downloaded), captions tokenized by open_clip's SimpleTokenizer (its BPE file ships with the
  package: offline) in the loader worker; `Batch.texts` carries the token ids.
- Loss: open_clip's ClipLoss (symmetric InfoNCE) on the *global* batch, with the learnable
  temperature (logit_scale = log(1/0.07) at init, exp clamped at 100 as open_clip does).
  Features are all-gathered through the DistContext group with a gradient-correct backward
  (training/partial_fc.py:all_gather_grad, grad_scale 1). That is open_clip's
  `gather_with_grad=True, local_loss=False`: every rank computes the same B_global x B_global
  loss, the gather's backward sums every rank's (identical) gradient for my rows (W x the true
  one) and DeepSpeed's average over ranks divides the W out again. Chosen over
  `gather_with_grad=False` (a local shard only gets the gradient of its own rows and columns
  of the rank's loss copy; the other ranks' copies never reach it) because it gives the exact
  gradient of the global loss on any number of ranks, which tests/test_clip_objective.py
  checks against one process; the B_global^2 logits are cheap at these batch sizes.
- The text tower and logit scale are replicated: their gradients are averaged over ranks
  (DDP's rule, through DistContext) before their own AdamW steps, at the backbone's scheduled
  LR and the backbone's optimizer settings (no decay on gains, biases, embeddings, the scale).
- The image head is still built (not in the loss): the stream stays the labeled-key stream of
  training/data.py (every pool image has a label row after `mlcd assign`), so both arms of a
  comparison draw the same images in the same order.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from torch import nn

from pipeline.core.io import atomic_write_bytes
from training.config import ClipConfig
from training.data import Batch, LabeledStream
from training.partial_fc import all_gather_grad
from training.safe_load import WeightsError, weights_only_loads

INIT_LOGIT_SCALE = math.log(1 / 0.07)  # open_clip's init
MAX_LOGIT_SCALE = 100.0                 # open_clip clamps exp(logit_scale) here


@lru_cache(maxsize=4)
def _tokenizer(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer(context_length=context_length)


def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    """(N, context_length) int64 token ids (BOS ... EOS, zero-padded, truncated keeping EOS)."""
    return _tokenizer(context_length)(texts).long()


def text_tower(cfg: ClipConfig, out_dim: int) -> nn.Module:
    from open_clip.transformer import TextTransformer
    return TextTransformer(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width,
                           heads=cfg.heads, layers=cfg.layers, output_dim=out_dim)


def text_forward_flops(cfg: ClipConfig, out_dim: int) -> float:
    """Forward FLOPs per caption (2 per multiply-accumulate; the embedding lookup is free):
    per layer qkv/out projections and a 4x MLP over every token plus attention, then the
    projection of the pooled token."""
    n, d = cfg.context_length, cfg.width
    per_layer = n * (8 * d * d + 8 * d * d) + 4 * n * n * d
    return cfg.layers * per_layer + 2 * d * out_dim


def symmetric_infonce(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """open_clip's ClipLoss on already-gathered features (L2-normalised here), scale = exp(...)
    clamped at MAX_LOGIT_SCALE."""
    from open_clip.loss import ClipLoss
    img = nn.functional.normalize(img, dim=-1)
    txt = nn.functional.normalize(txt, dim=-1)
    scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    return ClipLoss()(img, txt, scale)


class CaptionStream(LabeledStream):
    """LabeledStream whose batches also carry the captions' token ids (Batch.texts)."""

    def __init__(self, *args, context_length: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.context_length = context_length

    def _batch(self, raw, rng: np.random.Generator) -> Batch:
        b = super()._batch(raw, rng)
        caps = [(r[4] or b"").decode("utf-8", "replace").strip() for r in raw]
        b.texts = tokenize(caps, self.context_length)
        return b


class ClipTower(nn.Module):
    """The text side: text transformer + learnable temperature (replicated on every rank)."""

    def __init__(self, cfg: ClipConfig, out_dim: int):
        super().__init__()
        self.text = text_tower(cfg, out_dim)
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))


def build_tower(cfg: ClipConfig, dim: int, seed: int, device, optim) -> tuple[ClipTower, torch.optim.Optimizer]:
    """The tower (the same init on every rank, from `seed`) and its AdamW with the backbone's
    settings; no weight decay on gains, biases, embeddings and the temperature (open_clip's rule)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = ClipTower(cfg, dim).to(device)
    named = list(tower.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in named if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                             {"params": other, "weight_decay": 0.0}],
                            lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    return tower, opt


def clip_loss(tower: ClipTower, img: torch.Tensor, texts: torch.Tensor, ctx) -> tuple[torch.Tensor, dict]:
    """This rank's image embeddings + caption tokens -> (the global-batch loss, same on every
    rank; its terms). The gathers' backward carries the loss gradient back to my rows."""
    txt = tower.text(texts.to(img.device)).to(img.dtype)
    g_img, g_txt = all_gather_grad(img, ctx), all_gather_grad(txt, ctx)
    loss = symmetric_infonce(g_img.float(), g_txt.float(), tower.logit_scale)
    scale = tower.logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE)
    return loss, {"clip_loss": loss.detach(), "clip_logit_scale": scale}


def average_grads(ctx, params) -> None:
    """Replicated parameters: DDP's average over ranks (each rank's grad came through its rows)."""
    if ctx is None or not ctx.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:  # one collective per step, not one per parameter (the text tower has dozens)
        flat = ctx.all_reduce_(torch.cat([g.reshape(-1) for g in grads]), "sum").div_(ctx.world_size)
        for g, v in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(v.view_as(g))


def save_tower(path: Path, tower: ClipTower, opt: torch.optim.Optimizer) -> None:
    """Weights (model.*) and AdamW state (opt.<param>.<key>) in one safetensors file."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in tower.state_dict().items()}
    for k, p in tower.named_parameters():
        for s, v in opt.state.get(p, {}).items():
            tensors[f"opt.{k}.{s}"] = (v if torch.is_tensor(v) else torch.tensor(float(v))).detach().cpu()
    atomic_write_bytes(path, st_save(tensors))


def load_tower(path: Path, tower: ClipTower, opt: torch.optim.Optimizer) -> None:
    if not path.is_file():
        raise WeightsError(f"{path}: missing (the CLIP text tower of this checkpoint)")
    with weights_only_loads(path, deepspeed=False):
        t = load_file(str(path))
    try:
        tower.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    except RuntimeError as e:
        raise WeightsError(f"{path}: does not fit train.clip ({str(e).splitlines()[0]})") from None
    dev = tower.logit_scale.device
    for k, p in tower.named_parameters():
        st = {s.split(".")[-1]: t[s].to(dev) for s in t if s.startswith(f"opt.{k}.")}
        if st:
            opt.state[p] = st


