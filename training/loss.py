"""The MLCD multi-label loss and UNICOM's single-label ArcFace softmax, computed on one rank's block
of class centers and reduced across ranks.

MLCD (paper eq. 5, margin and scale as RICE states them), for one image with positives P and the
sampled negatives N' (cosines c to L2-normalized centers):

    L = log(1 + sum_{i in P} exp(-s * phi(c_i))) + log(1 + sum_{j in N'} exp(s * c_j))

Each rank holds some of the columns. A log-sum-exp over columns spread across ranks is reduced
stably: all-reduce the per-row max (no gradient needed: the result does not depend on it), then
all-reduce the sum of exp(z - max). The "1" is a zero logit, counted once after the reduction.
Every rank ends with the same per-sample loss; `_AllReduceSum`'s backward is the identity
because each rank back-propagates its own (identical) copy of that downstream graph.

`dense_mlcd_loss` / `dense_unicom_loss` are the single-process reference implementations (tests
compare the sharded version against them; the benchmark uses them as the full-softmax baseline).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.config import check


@dataclass
class LossConfig:
    mode: str = "mlcd"          # mlcd (multi-label, eq. 5) | unicom (single label, ArcFace softmax)
    scale: float = 64.0         # s
    margin: float = 0.3         # m on positives only (0 = the paper's plain form)
    margin_type: str = "arc"    # arc: cos(arccos(c) + m) (ArcFace, UNICOM's code) | cos: c - m
    num_labels: int = 8         # l: the top-l labels of each image are its positives (unicom: 1)

    def __post_init__(self):
        check(self.mode in ("mlcd", "unicom"), "mode", self.mode, "must be mlcd or unicom")
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


class _AllReduceSum(torch.autograd.Function):
    """Forward: sum over ranks. Backward: identity (every rank computes the same loss from the
    sum, so d loss / d (my addend) = d loss / d sum on each rank)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _reduce_max(x: torch.Tensor, group) -> torch.Tensor:
    x = x.detach().clone()
    if group is not None:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def _reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(x, group) if group is not None else x


def sharded_logsumexp1(zs: list[torch.Tensor], group) -> torch.Tensor:
    """For each z in `zs` (B, S_local): log(1 + sum_j exp(z_ij)) per row, over columns spread
    across the ranks of `group` (a very negative z marks a column that does not count). Returns
    (len(zs), B); the terms share one max and one sum all-reduce of small (len(zs), B) tensors."""
    m = _reduce_max(torch.stack([z.max(dim=1).values for z in zs]).clamp_min(0.0), group)  # 1 = exp(0)
    s = _reduce_sum(torch.stack([torch.exp(z - mi[:, None]).sum(dim=1) for z, mi in zip(zs, m)]), group)
    return m + torch.log(s + torch.exp(-m))


def mlcd_loss(cos: torch.Tensor, pos_mask: torch.Tensor, cfg: LossConfig, group=None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """cos: (B, S) cosines of the global batch to this rank's sampled centers; pos_mask: (B, S)
    True where that center is one of the sample's positives (everything else in the rank's
    sample is a negative for that sample). Returns the mean over the global batch."""
    neg_inf = torch.finfo(cos.dtype).min
    z_pos = (-cfg.scale * apply_margin(cos, cfg.margin, cfg.margin_type)).masked_fill(~pos_mask, neg_inf)
    z_neg = (cfg.scale * cos).masked_fill(pos_mask, neg_inf)
    l_pos, l_neg = sharded_logsumexp1([z_pos, z_neg], group)
    loss = (l_pos + l_neg).mean()
    return loss, {"loss_pos": l_pos.detach().mean(), "loss_neg": l_neg.detach().mean()}


def unicom_loss(cos: torch.Tensor, target: torch.Tensor, cfg: LossConfig, group=None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ArcFace softmax cross-entropy over the classes spread across ranks. target: (B,) column of
    the sample's class in this rank's `cos`, -1 where the class lives on another rank."""
    has = target >= 0
    col = target.clamp_min(0)[:, None]
    c_t = cos.gather(1, col).squeeze(1)
    logit_t = cfg.scale * apply_margin(c_t, cfg.margin, cfg.margin_type)
    logits = (cfg.scale * cos).scatter(1, col, torch.where(has, logit_t, cfg.scale * c_t)[:, None])
    m = _reduce_max(logits.max(dim=1).values, group)
    lse = m + torch.log(_reduce_sum(torch.exp(logits - m[:, None]).sum(dim=1), group))
    pos = _reduce_sum(torch.where(has, logit_t, torch.zeros_like(logit_t)), group)
    loss = (lse - pos).mean()
    return loss, {"loss_pos": -pos.detach().mean(), "loss_neg": lse.detach().mean()}  # sum = loss


# ---------------------------------------------------------------- dense references

def _pos_mask_dense(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    mask = torch.zeros(labels.shape[0], num_classes + 1, dtype=torch.bool, device=labels.device)
    mask.scatter_(1, torch.where(labels >= 0, labels, num_classes), True)
    return mask[:, :num_classes]


def dense_mlcd_loss(emb: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor, cfg: LossConfig,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Single-process MLCD loss over all K centers (rho = 1): emb (B, D), centers (K, D),
    labels (B, l) with -1 padding."""
    cos = F.normalize(emb.float(), dim=1) @ F.normalize(centers.float(), dim=1).T
    return mlcd_loss(cos, _pos_mask_dense(labels, centers.shape[0]), cfg, None)


def dense_unicom_loss(emb: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor, cfg: LossConfig
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cos = F.normalize(emb.float(), dim=1) @ F.normalize(centers.float(), dim=1).T
    return unicom_loss(cos, labels[:, 0], cfg, None)
