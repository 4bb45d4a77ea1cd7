"""The MLCD multi-label loss, the vanilla multi-label loss it is compared against, and UNICOM's
single-label ArcFace softmax, computed on one rank's block of class centers and reduced across
ranks (equations and sources: docs/LOSS.md).

For one image with positives P and negatives N' (cosines c to L2-normalized centers; which
columns are N' is PartialFC's `negatives` rule), with s_i = s * phi(c_i), s_j = s * c_j:

    mlcd (MLCD eq. 5):  L = log(1 + sum_{i in P} exp(-s_i)) + log(1 + sum_{j in N'} exp(s_j))
    mlc  (MLCD eq. 4):  L = log(1 + sum_{j in N'} sum_{i in P} exp(s_j - s_i))
                          = softplus(lse_{i in P}(-s_i) + lse_{j in N'}(s_j))

The double sum factorizes, so both need only the same two log-sum-exps per row.

Each rank holds some of the columns. Every log-sum-exp is split in two steps:
1. `local_terms`: per row, the log-sum-exp over this rank's columns only (a (T, B) tensor: T = 2
   terms, B rows); an empty set of columns gives a very negative value. This is the autograd
   path (`partial_fc.chunk_rows: -1`); training/fused_loss.py computes the same pieces in row
   chunks, with their gradients, so the B x S logit matrix never exists at once.
2. `combine`: the ranks' per-row values are merged stably: all-reduce their max M (no gradient
   needed: the result does not depend on it), all-reduce sum_r exp(lse_r - M), then
   log(1 + sum) = M + log(sum + exp(-M)) for MLCD (the "1" is a zero logit, counted once) or
   M + log(sum) for the softmax and for both mlc terms (then softplus of their sum). Only (T, B)
   tensors cross the wire.
Every rank ends with the same per-sample loss; `_AllReduceSum`'s backward is the identity because
each rank back-propagates its own (identical) copy of that downstream graph.

All collectives of the loss are the autograd Functions below; they take the run's DistContext
(pipeline/core/dist.py) and expect tensors already on its device (NCCL has no CPU tensors).

`dense_mlcd_loss` (mlcd or mlc) / `dense_unicom_loss` are the single-process losses over all K
centers (the benchmark's full-softmax baseline; tests also check them against literal
transcriptions of the equations).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.core.config import check

LOSS_MODES = ("mlcd", "mlc", "unicom")


@dataclass
class LossConfig:
    mode: str = "mlcd"          # mlcd (multi-label, positives and negatives decoupled, eq. 5) |
    #                             mlc (vanilla multi-label, pairs coupled, eq. 4) | unicom (single
    #                             label, ArcFace softmax)
    scale: float = 64.0         # s
    margin: float = 0.3         # m on positives only (0 = the paper's plain form)
    margin_type: str = "arc"    # arc: cos(arccos(c) + m) (ArcFace, UNICOM's code) | cos: c - m
    num_labels: int = 8         # l: the top-l labels of each image are its positives (unicom: 1)

    def __post_init__(self):
        check(self.mode in LOSS_MODES, "mode", self.mode, f"must be one of {', '.join(LOSS_MODES)}")
        check(self.margin_type in ("arc", "cos"), "margin_type", self.margin_type, "must be arc or cos")
        check(self.scale > 0, "scale", self.scale, "must be > 0")
        check(0 <= self.margin < math.pi / 2, "margin", self.margin, "must be in [0, pi/2)")
        check(self.num_labels >= 1, "num_labels", self.num_labels, "must be >= 1")

    @property
    def labels_used(self) -> int:
        return 1 if self.mode == "unicom" else self.num_labels


def apply_margin(c: torch.Tensor, margin: float, kind: str) -> torch.Tensor:
    """phi(c). arc: cos(theta + m) = c cos m - sin(theta) sin m, with sin(theta) from a clamped
    1 - c^2 so the gradient stays finite at c = +-1 (arccos' derivative is infinite there). Where
    theta + m > pi, cos(theta + m) would rise again (a smaller angle would be penalized more), so
    ArcFace's fallback c - m sin(m) keeps phi decreasing in theta."""
    if margin == 0:
        return c
    if kind == "cos":
        return c - margin
    sin_theta = torch.sqrt((1.0 - c * c).clamp_min(1e-6))
    phi = c * math.cos(margin) - sin_theta * math.sin(margin)
    return torch.where(c > math.cos(math.pi - margin), phi, c - margin * math.sin(margin))


def _single(ctx) -> bool:
    return ctx is None or not ctx.distributed


class _AllReduceSum(torch.autograd.Function):
    """Forward: sum over ranks. Backward: identity (every rank computes the same loss from the
    sum, so d loss / d (my addend) = d loss / d sum on each rank)."""

    @staticmethod
    def forward(fctx, x, ctx):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=ctx.group)
        return x

    @staticmethod
    def backward(fctx, grad):
        return grad, None


class _AllReduceMax(torch.autograd.Function):
    """Max over ranks of a detached tensor (a stabilizing shift: no gradient flows through it)."""

    @staticmethod
    def forward(fctx, x, ctx):
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=ctx.group)
        return x

    @staticmethod
    def backward(fctx, grad):
        return None, None


def reduce_sum(x: torch.Tensor, ctx) -> torch.Tensor:
    return x if _single(ctx) else _AllReduceSum.apply(x, ctx)


def reduce_max(x: torch.Tensor, ctx) -> torch.Tensor:
    return x.detach() if _single(ctx) else _AllReduceMax.apply(x.detach(), ctx)


def local_terms(cos: torch.Tensor, pos_mask: torch.Tensor, cfg: LossConfig,
                neg_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row local pieces of the loss over this rank's columns, (2, B). neg_mask (B, S): the
    row's negatives (None: every column that is not its positive); other columns are ignored.
    mlcd / mlc: [lse of -s phi(c) over positives, lse of s c over negatives].
    unicom: pos_mask with at most one True per row (the sample's class if it lives here) ->
    [lse over target and negatives with the margin on the target, target logit or 0]."""
    neg_inf = torch.finfo(cos.dtype).min
    if neg_mask is None:
        neg_mask = ~pos_mask
    if cfg.mode == "unicom":
        has = pos_mask.any(1)
        phi = cfg.scale * apply_margin(cos, cfg.margin, cfg.margin_type)
        logits = torch.where(pos_mask, phi, cfg.scale * cos).masked_fill(~(pos_mask | neg_mask), neg_inf)
        # logsumexp over zero columns is -inf; clamp keeps it finite (and its gradient zero)
        lse = torch.logsumexp(logits, dim=1).clamp_min(neg_inf)
        pos = torch.where(pos_mask, phi, torch.zeros_like(phi)).sum(1)
        return torch.stack([lse, torch.where(has, pos, torch.zeros_like(pos))])
    z_pos = (-cfg.scale * apply_margin(cos, cfg.margin, cfg.margin_type)).masked_fill(~pos_mask, neg_inf)
    z_neg = (cfg.scale * cos).masked_fill(~neg_mask, neg_inf)
    return torch.stack([torch.logsumexp(z_pos, dim=1), torch.logsumexp(z_neg, dim=1)]).clamp_min(neg_inf)


def combine(local: torch.Tensor, cfg: LossConfig, ctx=None, valid: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Merges the ranks' (2, B) `local_terms` into the global-batch mean loss (same on every rank).
    valid: optional (B,) bool over the global batch (padding rows False): invalid rows add nothing
    to the loss, its gradient or the stats; the mean is over the valid rows (0 when none)."""
    if cfg.mode == "unicom":
        m = reduce_max(local[0], ctx)
        lse = m + torch.log(reduce_sum(torch.exp(local[0] - m), ctx))
        pos = reduce_sum(local[1], ctx)
        loss = _mean(lse - pos, valid)
        return loss, {"loss_pos": -_mean(pos.detach(), valid), "loss_neg": _mean(lse.detach(), valid)}  # sum = loss
    if cfg.mode == "mlc":
        m = reduce_max(local, ctx)
        l_pos, l_neg = m + torch.log(reduce_sum(torch.exp(local - m), ctx))
        # no positive or no negative: no pair, loss 0 (an empty lse is ~finfo.min; their sum
        # would overflow to -inf, the clamp keeps it finite with a zero gradient)
        pair = (l_pos + l_neg).clamp_min(torch.finfo(local.dtype).min)
        loss = _mean(torch.logaddexp(pair, pair.new_zeros(())), valid)  # softplus, exact for large pair
        # the two log-sum-exps: loss = softplus(loss_pos + loss_neg) per row, not their sum
        return loss, {"loss_pos": _mean(l_pos.detach(), valid), "loss_neg": _mean(l_neg.detach(), valid)}
    m = reduce_max(local, ctx).clamp_min(0.0)  # the "1" is exp(0)
    l_pos, l_neg = m + torch.log(reduce_sum(torch.exp(local - m), ctx) + torch.exp(-m))
    loss = _mean(l_pos + l_neg, valid)
    return loss, {"loss_pos": _mean(l_pos.detach(), valid), "loss_neg": _mean(l_neg.detach(), valid)}


def _mean(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over the rows (valid None: plain .mean(), the image path unchanged) or over the valid
    rows only: `where` gives invalid rows an exact zero gradient; no valid row -> 0, not NaN."""
    if valid is None:
        return x.mean()
    return torch.where(valid, x, torch.zeros_like(x)).sum() / valid.sum().clamp_min(1)


def mlcd_loss(cos: torch.Tensor, pos_mask: torch.Tensor, cfg: LossConfig, ctx=None,
              neg_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """cos: (B, S) cosines of the global batch to this rank's sampled centers; pos_mask: (B, S)
    True where that center is one of the sample's positives; neg_mask: its negatives (None:
    every other column). mlcd or mlc, as cfg.mode says. Returns the mean over the global batch."""
    return combine(local_terms(cos, pos_mask, cfg, neg_mask), cfg, ctx)


def unicom_loss(cos: torch.Tensor, target: torch.Tensor, cfg: LossConfig, ctx=None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ArcFace softmax cross-entropy over the classes spread across ranks. target: (B,) column of
    the sample's class in this rank's `cos`, -1 where the class lives on another rank."""
    return combine(local_terms(cos, target_mask(target, cos.shape[1]), cfg), cfg, ctx)


def target_mask(cols: torch.Tensor, num_cols: int) -> torch.Tensor:
    """(B,) or (B, l) column indices (-1 = none) -> (B, num_cols) bool mask."""
    cols = cols.reshape(cols.shape[0], -1)
    mask = torch.zeros(cols.shape[0], num_cols + 1, dtype=torch.bool, device=cols.device)
    mask.scatter_(1, torch.where(cols >= 0, cols, num_cols), True)
    return mask[:, :num_cols]


# ---------------------------------------------------------------- dense references

def dense_mlcd_loss(emb: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor, cfg: LossConfig,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Single-process multi-label loss (mlcd or mlc, as cfg.mode says) over all K centers
    (rho = 1): emb (B, D), centers (K, D), labels (B, l) with -1 padding."""
    cos = F.normalize(emb, dim=1) @ F.normalize(centers, dim=1).T
    return mlcd_loss(cos, target_mask(labels, centers.shape[0]), cfg, None)


def dense_unicom_loss(emb: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor, cfg: LossConfig
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cos = F.normalize(emb, dim=1) @ F.normalize(centers, dim=1).T
    return unicom_loss(cos, labels[:, 0], cfg, None)
