"""PartialFC: the K x D class centers split into contiguous blocks across ranks (model parallel,
insightface/UNICOM style), with per-step negative sampling.

Memory per rank: K/W x D fp32 centers (+ their gradient and optimizer state, x3-4 with AdamW)
plus the sampled rows and a B_global x S logit matrix; a data-parallel classifier would need the
whole K x D on every rank (1M x 512 fp32 = 2 GiB, 8 GiB with Adam).

Per step, a rank:
1. all-gathers the normalized embeddings and labels of the global batch (`all_gather_grad`:
   backward sums each rank's slice, i.e. a reduce-scatter, times `grad_scale`);
2. samples its columns and, per row, which of them are the row's negatives (`negatives`):
   - sampled (MLCD/RICE, docs/LOSS.md): a uniformly random order of the block; a row's negatives
     are the first floor(rho * K_local) classes in that order that are not its own positives, so
     each image gets exactly that many negatives per rank, a uniform draw from outside its
     positives. The columns are the first floor(rho * K_local) + l classes of the order plus the
     batch's other positives; another image's positive that is not among a row's negatives is
     masked for that row (neither positive nor negative). The per-row rule is one threshold:
     row b's negatives are its non-positive columns with index < limit[b]. Cost: limits in
     O(B x l); the chunked loss scores only columns below max(limit) densely (the other
     images' appended positives are nobody's negatives), the unchunked one every column.
   - batch (PartialFC/UNICOM): every positive of the global batch in the block plus
     floor(rho * K_local) random non-positives; every column that is not the row's own
     positive is its negative. Other images' positives add to the negatives: with a large batch
     far more than rho * K (global batch 32,000 x 8 labels, K = 1M: ~0.33 K per image).
   rho = 1: both rules give every non-positive class of the block;
3. computes cosines to those centers and its share of the loss (training/loss.py), reduced
   across ranks. By default (`chunk_rows` >= 0) the global batch goes through in row chunks
   whose gradients are computed during the forward pass (training/fused_loss.py): no chunk is
   recomputed in backward, and peak loss memory is O(chunk x S) instead of O(B_global x S)
   (the B x S logits, their masked copies and exps: 44.5 GiB measured at K = 1M, W = 8,
   B = 32,768). Only the columns that can be some row's negative are scored densely (under
   `sampled`, the drawn candidates, not the other images' appended positives); each row's own
   positives are scored sparsely. `chunk_rows: -1` is the plain autograd path over the whole
   B x S matrix (the reference the fused path is tested and benchmarked against).
The centers are never data-parallel parameters: keep them out of DeepSpeed/DDP and give them
their own optimizer (`make_optimizer`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import check
from training.fused_loss import distinct_sorted, fused_loss
from training.loss import LossConfig, combine, local_terms, reduce_sum, target_mask

INIT_CHUNK = 1 << 16  # centers are initialized in fixed chunks so the K x D matrix is the same
#                       for any world size (one seeded generator per chunk)
AUTO_CHUNK_LOGITS = {"cuda": 1 << 26, "cpu": 1 << 23}  # chunk_rows = 0: rows per chunk so a
#   chunk holds <= this many dense logits. CUDA: 64M (256 MiB fp32 buffer); the recomputing
#   path measured on an H200 (B = 32,768, S = 41,500) took 243 ms unchunked, 344 ms at 4,096
#   rows, 409 ms at 404 rows. CPU: 8M (32 MiB). Measured on the 2-core box under load ~14, K = 1M,
#   W = 32, B = 16,384, 3,133 dense columns, 2 threads, s/step: 256 rows 52.5, 512 35.6, 1,024
#   29.1, 2,048 22.8, 4,096 23.8, 8,192 20.2 (each op's thread sync costs most on a loaded box;
#   with 1 thread 256 and 2,048 rows took the same time).


def auto_chunk_logits(device: torch.device) -> int:
    return AUTO_CHUNK_LOGITS["cuda" if device.type == "cuda" else "cpu"]


NEGATIVE_RULES = ("sampled", "batch")


@dataclass
class PartialFCConfig:
    num_classes: int = 0          # K; 0 = rows of the k-means centroids file (train.centroids)
    sample_rate: float = 0.1      # rho: negatives per image per rank = floor(rho * K_local)
    negatives: str = "sampled"    # sampled: each image's own floor(rho * K_local) negatives from
    #                               outside its positives (MLCD/RICE) | batch: also every other
    #                               image's positives (PartialFC/UNICOM); see the module docstring
    init_std: float = 0.01        # centers ~ normal(0, init_std) (normalized in the loss)
    optimizer: str = "adamw"      # adamw | sgd (momentum 0.9)
    lr_mult: float = 1.0          # center LR = backbone LR (schedule included) x lr_mult
    weight_decay: float | None = None  # None: the backbone's optim.weight_decay
    chunk_rows: int = 0           # loss rows per chunk (gradients computed in forward, nothing
    #                               recomputed); 0 = auto (AUTO_CHUNK_LOGITS), -1 = off (autograd)

    def __post_init__(self):
        check(self.num_classes >= 0, "num_classes", self.num_classes, "must be >= 0 (0 = from centroids)")
        check(0 < self.sample_rate <= 1, "sample_rate", self.sample_rate, "must be in (0, 1]")
        check(self.negatives in NEGATIVE_RULES, "negatives", self.negatives,
              f"must be one of {', '.join(NEGATIVE_RULES)}")
        check(self.init_std > 0, "init_std", self.init_std, "must be > 0")
        check(self.optimizer in ("adamw", "sgd"), "optimizer", self.optimizer, "must be adamw or sgd")
        check(self.lr_mult > 0, "lr_mult", self.lr_mult, "must be > 0")
        check(self.chunk_rows >= -1, "chunk_rows", self.chunk_rows, "must be >= 1, 0 (auto) or -1 (off)")


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, num_local) of a rank's block; the first K % W ranks get one extra class."""
    num_local = num_classes // world_size + int(rank < num_classes % world_size)
    start = num_classes // world_size * rank + min(rank, num_classes % world_size)
    return start, num_local


class _AllGather(torch.autograd.Function):
    """Concatenation over ranks; backward sums each rank's gradient for my rows (reduce-scatter).
    x must already be on ctx.device."""

    @staticmethod
    def forward(fctx, x, ctx, grad_scale):
        fctx.dist_ctx, fctx.grad_scale = ctx, grad_scale
        out = [torch.empty_like(x) for _ in range(ctx.world_size)]
        dist.all_gather(out, x.contiguous(), group=ctx.group)
        return torch.cat(out)

    @staticmethod
    def backward(fctx, grad):
        ctx = fctx.dist_ctx
        parts = list(grad.contiguous().chunk(ctx.world_size))
        mine = torch.empty_like(parts[0])
        # each rank's loss only saw its own classes: the true gradient of my rows is the sum of
        # every rank's partial gradient for them
        dist.reduce_scatter(mine, parts, op=dist.ReduceOp.SUM, group=ctx.group)
        return mine * fctx.grad_scale, None, None


def all_gather_grad(x: torch.Tensor, ctx, grad_scale: float = 1.0) -> torch.Tensor:
    """Concatenation over ranks (equal first dims) with a gradient-correct backward. The trainer
    passes grad_scale = W: DeepSpeed/DDP average backbone gradients over ranks, but the loss is
    already a mean over the global batch, so the average would divide by W once too often."""
    if ctx is None or not ctx.distributed:
        return x  # single process: W = 1, nothing to undo
    return _AllGather.apply(x, ctx, grad_scale)


def all_gather_nograd(x: torch.Tensor, ctx) -> torch.Tensor:
    if ctx is None or not ctx.distributed:
        return x
    with torch.no_grad():
        return _AllGather.apply(x, ctx, 1.0)


def floor_fraction(rate: float, n: int) -> int:
    """floor(rate * n) for the rate as written in the config: int(0.29 * 100) is 28 in floats."""
    return math.floor(Fraction(repr(rate)) * n)


def init_centers(num_classes: int, dim: int, start: int, num_local: int, std: float, seed: int
                 ) -> torch.Tensor:
    """Rows [start, start + num_local) of a K x D normal(0, std) matrix that does not depend on
    how it is split (costs at most two extra chunks of generation per rank)."""
    out = torch.empty(num_local, dim)
    end = start + num_local
    for c in range(start // INIT_CHUNK, math.ceil(end / INIT_CHUNK)):
        c0, c1 = c * INIT_CHUNK, min((c + 1) * INIT_CHUNK, num_classes)
        g = torch.Generator().manual_seed(seed * 1_000_003 + c)
        chunk = torch.randn(c1 - c0, dim, generator=g) * std
        lo, hi = max(c0, start), min(c1, end)
        out[lo - start:hi - start] = chunk[lo - c0:hi - c0]
    return out


class PartialFC(nn.Module):
    """This rank's block of class centers and the sampled, sharded loss over the global batch."""

    def __init__(self, num_classes: int, dim: int, cfg: PartialFCConfig, loss_cfg: LossConfig,
                 rank: int = 0, world_size: int = 1, ctx=None, seed: int = 0,
                 grad_scale: float = 1.0):
        """ctx: the run's DistContext (None or not distributed: one process). rank/world_size
        may describe a simulated split when ctx is None (benchmarks)."""
        super().__init__()
        check(num_classes >= world_size, "num_classes", num_classes,
              f"must be >= the number of ranks ({world_size}): a rank would hold no classes")
        if ctx is not None and ctx.distributed:
            assert (rank, world_size) == (ctx.rank, ctx.world_size), "rank/world_size differ from ctx"
        self.cfg, self.loss_cfg = cfg, loss_cfg
        self.num_classes, self.dim = num_classes, dim
        self.rank, self.world_size, self.ctx = rank, world_size, ctx
        self.seed, self.grad_scale = seed, grad_scale
        self.start, self.num_local = shard_range(num_classes, rank, world_size)
        self.weight = nn.Parameter(init_centers(num_classes, dim, self.start, self.num_local,
                                                cfg.init_std, seed))

    @property
    def num_negatives(self) -> int:
        return floor_fraction(self.cfg.sample_rate, self.num_local)

    def _generator(self, step: int, device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed((self.seed * 1_000_003 + step) * 4099 + self.rank)

    def sample_columns(self, labels: torch.Tensor, step: int) -> Draw:
        """labels: (B, l) global class ids of the global batch (-1 = none). Returns the sampled
        local rows (S,), each label's column in them ((B, l), -1 where the class is not in this
        block) and each row's negative limit (B,): row b's negatives are its non-positive columns
        with index < limit[b]. The draw depends only on (seed, rank, step): a resumed run
        samples what the uninterrupted one did. S may be 0 (batch rule, no positive here and
        floor(rho * K_local) = 0): the block then adds nothing."""
        dev = labels.device
        local = labels - self.start
        valid = (labels >= 0) & (local >= 0) & (local < self.num_local)
        pos = torch.unique(local[valid])
        n_neg = self.num_negatives
        if self.cfg.negatives == "sampled":
            # a random order of the block; its first n_neg + l classes hold every row's n_neg
            # negatives (a row skips at most its l positives); other positives are appended
            if self.cfg.sample_rate >= 1.0:
                cand = torch.arange(self.num_local, device=dev)
            else:
                score = torch.rand(self.num_local, generator=self._generator(step, dev), device=dev)
                cand = torch.topk(score, min(self.num_local, n_neg + labels.shape[1])).indices
            seen = torch.zeros(self.num_local, dtype=torch.bool, device=dev)
            seen[cand] = True
            sampled = torch.cat([cand, pos[~seen[pos]]])
        elif self.cfg.sample_rate >= 1.0:
            sampled = torch.arange(self.num_local, device=dev)
        else:
            score = torch.rand(self.num_local, generator=self._generator(step, dev), device=dev)
            score[pos] = -1.0  # never drawn as a negative
            k = min(n_neg, self.num_local - pos.numel())
            sampled = torch.cat([pos, torch.topk(score, k, sorted=False).indices])
        col = torch.full((self.num_local + 1,), -1, dtype=torch.long, device=dev)
        col[sampled] = torch.arange(sampled.numel(), device=dev)
        cols = col[torch.where(valid, local, self.num_local)]  # index num_local -> -1
        if self.cfg.negatives == "batch":
            limit = torch.full((labels.shape[0],), sampled.numel(), dtype=torch.long, device=dev)
        else:
            limit = negative_limit(cols, n_neg, cand.numel())
        return Draw(sampled, cols, limit)

    def sample(self, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sampled local rows (S,) and the (B, S) positive and negative masks (small
        batches only: the trainer never builds the whole masks)."""
        d = self.sample_columns(labels, step)
        pos = target_mask(d.cols, d.sampled.numel())
        return d.sampled, pos, row_negatives(pos, d.limit)

    def chunk_rows(self, batch: int, num_cols: int) -> int:
        """Rows per loss chunk. auto: a chunk of the densest rank holds <= AUTO_CHUNK_LOGITS
        logits (every rank must use the same chunks: one collective per chunk)."""
        if self.cfg.chunk_rows > 0:
            return self.cfg.chunk_rows
        if self.cfg.chunk_rows < 0:
            return batch
        if self.ctx is not None and self.ctx.distributed:
            n = torch.tensor([float(num_cols)], device=self.ctx.device)
            num_cols = int(self.ctx.all_reduce_(n, "max").item())
        return max(1, auto_chunk_logits(self.weight.device) // max(num_cols, 1))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, step: int, valid: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """emb: (B_local, D) unnormalized embeddings of this rank's samples; labels (B_local, l).
        valid: optional (B_local,) bool (regions: False = a padding row; every rank passes one
        or none). Invalid rows' labels are dropped before sampling (no positive of theirs is
        drawn, under either rule), and they add nothing to the loss, its gradient or the stats;
        the loss is the mean over the global batch's valid rows (0 when there is none).
        Returns the global-batch loss (same value on every rank) and detached stats."""
        labels = labels[:, :self.loss_cfg.labels_used].to(emb.device, torch.long)
        # float32 (bf16/fp16 embeddings are promoted); float64 when the centers are (exactness tests)
        emb = F.normalize(emb.to(torch.float64 if self.weight.dtype == torch.float64 else torch.float32), dim=1)
        emb_g = all_gather_grad(emb, self.ctx, self.grad_scale)
        valid_g = None
        if valid is not None:
            valid = valid.to(emb.device, torch.bool).reshape(-1)
            labels = labels.masked_fill(~valid[:, None], -1)
            valid_g = all_gather_nograd(valid.to(torch.uint8), self.ctx).bool()  # gloo: no bool
        labels_g = all_gather_nograd(labels, self.ctx)
        sampled, cols, limit = self.sample_columns(labels_g, step)
        w = F.normalize(self.weight[sampled], dim=1)  # gradient flows into the sampled rows only
        if self.cfg.chunk_rows < 0:  # unchunked: the B x S logits through autograd
            loss, terms = combine(_chunk_terms(emb_g, w, cols, limit, self.loss_cfg), self.loss_cfg,
                                  self.ctx, valid_g)
        else:  # row chunks, gradients computed in forward (training/fused_loss.py)
            rows = self.chunk_rows(emb_g.shape[0], int(limit.max()) if limit.numel() else 0)
            loss, terms = fused_loss(emb_g, w, cols, limit, self.loss_cfg, self.ctx, rows, valid_g)
        n_pos = torch.unique(cols[cols >= 0]).numel()
        per_row = (limit - positives_below(cols, limit)).float()  # negatives per row, this rank
        if valid_g is None:
            negs = per_row.mean()
        else:
            negs = per_row.masked_fill(~valid_g, 0).sum() / valid_g.sum().clamp_min(1)
        counts = torch.cat([torch.tensor([float(sampled.numel()), float(n_pos)], device=negs.device),
                            negs.view(1)])
        if self.ctx is not None and self.ctx.distributed:
            counts = all_reduce_stats(counts, self.ctx)
        terms.update(sampled_classes=counts[0], positives=counts[1], negatives=counts[2])
        if valid_g is not None:
            terms["valid_rows"] = valid_g.sum().float()  # of the global batch
        return loss, terms


class Draw(NamedTuple):
    sampled: torch.Tensor  # (S,) local class rows, in column order
    cols: torch.Tensor     # (B, l) each label's column, -1 = not in this block
    limit: torch.Tensor    # (B,) row b's negatives: its non-positive columns < limit[b]


def negative_limit(cols: torch.Tensor, n_neg: int, n_cand: int) -> torch.Tensor:
    """(B,) per-row limit so that columns [0, limit) hold exactly n_neg non-positives of the row
    (fewer when the first n_cand columns have no more): start at n_neg and extend by one for
    each own positive that falls below the current limit, in ascending order. O(B x l)."""
    limit = torch.full((cols.shape[0],), n_neg, dtype=torch.long, device=cols.device)
    for p in distinct_sorted(cols).unbind(1):
        limit += ((p >= 0) & (p < limit)).long()
    return limit.clamp_max(n_cand)


def positives_below(cols: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """(B,) number of a row's distinct positive columns < limit."""
    c = distinct_sorted(cols)
    return ((c >= 0) & (c < limit[:, None])).sum(1)


def row_negatives(pos_mask: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """(B, S) negatives: non-positive columns below each row's limit."""
    idx = torch.arange(pos_mask.shape[1], device=pos_mask.device)
    return (idx < limit[:, None]) & ~pos_mask


def _chunk_terms(emb: torch.Tensor, w: torch.Tensor, cols: torch.Tensor, limit: torch.Tensor,
                 cfg: LossConfig) -> torch.Tensor:
    """(2, rows) local loss pieces of a row chunk: cosines to the sampled centers, positives
    from the labels' columns, negatives below each row's limit (the (rows, S) masks only live
    inside the chunk)."""
    pos = target_mask(cols, w.shape[0])
    return local_terms(emb @ w.T, pos, cfg, row_negatives(pos, limit))


def all_reduce_stats(x: torch.Tensor, ctx) -> torch.Tensor:
    """Sum over ranks of a detached per-step statistic (on the embeddings' device)."""
    with torch.no_grad():
        return reduce_sum(x, ctx)


def make_optimizer(pfc: PartialFC, cfg: PartialFCConfig, lr: float, weight_decay: float,
                   betas=(0.9, 0.98), eps: float = 1e-6) -> torch.optim.Optimizer:
    """The centers' own optimizer (per-rank state, no data-parallel reduction). Its LR follows
    the backbone schedule x lr_mult (the trainer sets it every step)."""
    wd = weight_decay if cfg.weight_decay is None else cfg.weight_decay
    if cfg.optimizer == "sgd":
        return torch.optim.SGD([pfc.weight], lr=lr * cfg.lr_mult, momentum=0.9, weight_decay=wd)
    return torch.optim.AdamW([pfc.weight], lr=lr * cfg.lr_mult, betas=betas, eps=eps, weight_decay=wd)
