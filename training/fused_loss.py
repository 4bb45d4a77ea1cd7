"""The chunked PartialFC loss without recompute (the path `partial_fc.chunk_rows` >= 0 takes).

Same loss as training/loss.py (`local_terms` + `combine`; equations in docs/LOSS.md), computed in
row chunks of the global batch so the B x S logit matrix never exists. Unlike activation
checkpointing, nothing is recomputed in backward: each chunk's gradient with respect to its
embeddings and to the sampled centers is computed during the forward pass and kept, and backward
only multiplies the two by the incoming (scalar) gradient. This is the idea of fused
linear-cross-entropy kernels (Liger-Kernel, Apple's Cut Cross-Entropy), applied to the two-term
log-sum-exp loss whose normalisers span ranks:
1. a chunk's logits go into one reused buffer; its per-row local log-sum-exps (2, rows) are
   all-gathered at once (one small collective per chunk; every rank uses the same chunks);
2. from every rank's values each row's global normalisers, loss and per-row factors follow
   (mlcd: d loss / d z = exp(z - l) / N; mlc: times sigmoid(l_pos + l_neg); unicom: the softmax
   minus the target), so the buffer, which holds exp(z), becomes d loss / d cos in place;
3. two GEMMs turn it into the chunk's d loss / d emb rows and add its share of d loss / d w.
Cost: 3 GEMMs of rows x S_neg x D per chunk (as many as an unchunked forward + backward), three
full elementwise passes over the buffer (exp, row sums, the per-row scaling), no logit-sized
allocation. Memory: the buffer and a (rows, l) band mask, plus the B x D and S x D gradients
backward would allocate anyway.

Only negatives are scored densely. A row's negatives are its non-positive columns below its
limit (training/partial_fc.py); columns at or past max(limit) are nobody's negatives (under the
`sampled` rule: the other images' positives appended after the drawn candidates), so the dense
part covers columns [0, max(limit)), and the per-row limits differ only in [min(limit),
max(limit)), a band at most l wide. Each row's own positives (at most l) are scored sparsely
from their gathered center rows. Under `sampled` at K = 1M, W = 8, B = 32,768 this scores
~12.5k of ~41.5k sampled columns.

exp(z) is taken without a max shift when scale is small enough for the dtype (|z| <= scale
because emb and w are L2-normalized; float32: scale <= ~77 at 41k columns): one pass fewer.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from training.loss import LossConfig, apply_margin


def distinct_sorted(cols: torch.Tensor) -> torch.Tensor:
    """(B, l) -> each row's distinct columns >= 0, ascending, the rest -1 (at the ends)."""
    c = torch.sort(cols, dim=1).values
    dup = torch.zeros_like(c, dtype=torch.bool)
    dup[:, 1:] = c[:, 1:] == c[:, :-1]
    return c.masked_fill(dup, -1)


def fused_loss(emb: torch.Tensor, w: torch.Tensor, cols: torch.Tensor, limit: torch.Tensor,
               cfg: LossConfig, ctx=None, rows: int = 1024, valid: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """emb (B, D): the L2-normalized global batch; w (S, D): this rank's L2-normalized sampled
    centers; cols (B, l): each label's column in w (-1 = not here); limit (B,): row b's
    negatives are its non-positive columns < limit[b]; valid: optional (B,) bool (invalid rows
    add nothing). rows: rows per chunk, the same on every rank. Returns the global-batch mean
    loss (the same on every rank) and detached stats, as `training.loss.combine` does."""
    needs = torch.is_grad_enabled() and (emb.requires_grad or w.requires_grad)
    loss, stats = _Fused.apply(emb, w, cols, limit, valid, cfg, ctx, max(1, rows), needs)
    return loss, {"loss_pos": stats[0], "loss_neg": stats[1]}


class _Fused(torch.autograd.Function):
    """Forward computes the loss and its gradients; backward scales the gradients."""

    @staticmethod
    def forward(fctx, emb, w, cols, limit, valid, cfg, ctx, rows, needs):
        loss, stats, fctx.grads = _forward(emb, w, cols, limit, valid, cfg, ctx, rows, needs)
        fctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(fctx, grad, _stats_grad):
        if fctx.grads is None:
            raise RuntimeError("fused_loss: gradients were not computed (forward ran without grad)")
        d_emb, d_w = fctx.grads
        return grad * d_emb, grad * d_w, None, None, None, None, None, None, None


class _Work:
    """Per-call constants and reused buffers (allocated once, used by every chunk)."""

    def __init__(self, emb, w, limit, l, cfg, rows, needs):
        B, D = emb.shape
        self.cfg, self.needs, self.S = cfg, needs, w.shape[0]
        self.n = int(limit.max()) if B else 0          # dense columns [0, n)
        self.band = min(int(limit.min()), self.n) if B else 0  # limits differ in [band, n)
        r = min(rows, B)
        self.buf = emb.new_empty(r, self.n + 1)        # column n: where absent positives go
        self.mask = torch.empty(r, self.n - self.band, dtype=torch.bool, device=emb.device)
        self.wp = emb.new_empty(r * l, D)             # the rows' own positives' centers
        self.outer: Any = emb.new_empty(r * l, D) if needs else None  # their d_w terms
        self.cols_band = torch.arange(self.band, self.n, device=emb.device)
        self.w_ext = torch.cat([w, w.new_zeros(1, D)])  # row S: the absent-label row (zeros)
        self.w_dense = w[:self.n]
        fmax = torch.finfo(emb.dtype)
        # exp(z) with |z| <= scale needs no shift when neither it nor the row sum leaves the range
        self.shift = cfg.scale > min(math.log(fmax.max) - math.log(max(self.n, 1)) - 1,
                                     -math.log(fmax.tiny) - 1)
        self.d_emb: Any = torch.empty_like(emb) if needs else None
        self.d_w: Any = emb.new_zeros(self.S + 1, D) if needs else None  # row S: the absent-label sink


def _forward(emb, w, cols, limit, valid, cfg, ctx, rows, needs):
    B = emb.shape[0]
    pc = distinct_sorted(cols)
    wk = _Work(emb, w, limit, pc.shape[1], cfg, rows, needs)
    if valid is None:
        weight = emb.new_full((B,), 1.0 / max(B, 1))
    else:
        weight = valid.to(emb.dtype) / valid.sum().clamp_min(1).to(emb.dtype)
    per_row = emb.new_empty(3, B)  # loss, stat_pos, stat_neg
    for b0 in range(0, B, rows):
        sl = slice(b0, min(B, b0 + rows))
        per_row[:, sl] = _chunk(wk, emb[sl], pc[sl], limit[sl], weight[sl], ctx, sl)
    kept = weight > 0
    loss = torch.where(kept, per_row[0] * weight, 0).sum()
    stats = torch.where(kept, per_row[1:] * weight, 0).sum(1)
    grads = (wk.d_emb, wk.d_w[:wk.S]) if needs else None
    return loss, stats, grads


def _chunk(wk: _Work, e, pc, limit, weight, ctx, sl) -> torch.Tensor:
    """One row chunk: its (3, rows) loss and stats; with gradients, its d_emb rows and its share
    of d_w are written into wk."""
    cfg, r, n = wk.cfg, e.shape[0], wk.n
    has = pc >= 0
    idx = torch.where(has, pc, wk.S)
    wp = torch.index_select(wk.w_ext, 0, idx.flatten(), out=wk.wp[:idx.numel()]).view(r, -1, e.shape[1])
    cp = torch.bmm(wp, e.unsqueeze(2)).squeeze(2)        # (r, l) their cosines
    zfull = wk.buf[:r]
    z = zfull[:, :n]
    l_neg, m = _dense_lse(wk, e, z, zfull, idx, limit, r)
    phi = apply_margin(cp, cfg.margin, cfg.margin_type)
    if cfg.mode == "unicom":  # the target joins the softmax's sum; its logit is the 2nd term
        zt = torch.where(has, cfg.scale * phi, -math.inf)[:, 0]
        local = torch.stack([torch.logaddexp(l_neg, zt), torch.where(has[:, 0], zt, 0)])
    else:
        zp = torch.where(has, -cfg.scale * phi, -math.inf)
        local = torch.stack([torch.logsumexp(zp, 1), l_neg])
    every = local[None] if ctx is None or not ctx.distributed else ctx.all_gather(local).view(-1, 2, r)
    out, neg_factor, pos_grad = _combine_rows(every, cfg, weight, m)
    if wk.needs:
        z.mul_((neg_factor * cfg.scale)[:, None])        # exp(z - m) -> d loss / d cos
        d_cp = torch.where(has, pos_grad(phi, zp if cfg.mode != "unicom" else zt[:, None])
                           * _margin_slope(cp, cfg), 0)
        d_e = wk.d_emb[sl]
        torch.mm(z, wk.w_dense, out=d_e)
        d_e.add_(torch.bmm(d_cp.unsqueeze(1), wp).squeeze(1))
        wk.d_w[:n].addmm_(z.T, e)
        outer = torch.mul(d_cp.unsqueeze(2), e.unsqueeze(1), out=wk.outer[:idx.numel()].view_as(wp))
        wk.d_w.index_add_(0, idx.flatten(), outer.flatten(0, 1))
    return out


def _dense_lse(wk: _Work, e, z, zfull, idx, limit, r):
    """Fills z with exp(s * cos - m) over the row's negatives (0 elsewhere); returns the rows'
    log-sum-exp over them (-inf: none) and the shift m."""
    cfg, n = wk.cfg, wk.n
    if n == 0:
        return e.new_full((r,), -math.inf), e.new_zeros(r)
    torch.mm(e * cfg.scale, wk.w_dense.T, out=z)
    if wk.band < n:  # columns at or past the row's limit are not its negatives
        mask = torch.ge(wk.cols_band, limit[:, None], out=wk.mask[:r])
        z[:, wk.band:].masked_fill_(mask, -math.inf)
    zfull.scatter_(1, idx.clamp_max(n), -math.inf)     # own positives (absent ones: column n)
    if wk.shift:
        m = z.amax(1)
        m = torch.where(torch.isfinite(m), m, 0)
        z.sub_(m[:, None])
    else:
        m = e.new_zeros(r)
    z.exp_()
    return z.sum(1).log_().add_(m), m


def _combine_rows(every, cfg: LossConfig, weight, m):
    """every (W, 2, r): every rank's local terms of the chunk's rows. Returns (3, r) per-row loss
    and stats, the per-row factor that turns exp(z - m) into d loss / d z for the dense columns,
    and pos_grad(phi, z_own) -> d loss / d phi at the own positives (sparse columns)."""
    fmin = torch.finfo(every.dtype).min
    if cfg.mode == "unicom":
        lse = torch.logsumexp(every[:, 0], 0)
        pos = every[:, 1].sum(0)
        out = torch.stack([lse.clamp_min(fmin) - pos, -pos, lse.clamp_min(fmin)])
        neg_factor = _factor(weight, m, lse)
        return out, neg_factor, lambda phi, zt: (weight[:, None] * (torch.exp(zt - lse[:, None]) - 1)
                                                 * cfg.scale)
    if cfg.mode == "mlc":
        lp, ln = torch.logsumexp(every, 0)
        pair = lp + ln
        h = weight * torch.sigmoid(pair)
        out = torch.stack([torch.logaddexp(pair, pair.new_zeros(())), lp.clamp_min(fmin), ln.clamp_min(fmin)])
    else:  # mlcd: log(1 + sum): the "1" is a zero logit
        lp, ln = torch.logaddexp(torch.logsumexp(every, 0), every.new_zeros(()))
        h = weight
        out = torch.stack([lp + ln, lp, ln])
    return out, _factor(h, m, ln), lambda phi, zp: -cfg.scale * _safe_exp(zp, lp) * h[:, None]


def _factor(h, m, lse):
    """h * exp(m - lse), 0 where the row has no term (lse = -inf) or no weight."""
    ok = torch.isfinite(lse) & (h != 0)
    return torch.where(ok, h * torch.exp(m - torch.where(ok, lse, 0)), 0)


def _safe_exp(z, lse):
    """exp(z - lse) with -inf - -inf read as 0 (a row with no term)."""
    return torch.exp(z - torch.where(torch.isfinite(lse), lse, 0)[:, None])


def _margin_slope(c: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """d phi / d c at the positives' cosines (small: rows x l), through the same `apply_margin`
    the autograd path differentiates (its clamps and branches included)."""
    if cfg.margin == 0 or cfg.margin_type == "cos":
        return torch.ones_like(c)
    with torch.enable_grad():
        x = c.detach().requires_grad_()
        return torch.autograd.grad(apply_margin(x, cfg.margin, cfg.margin_type).sum(), x)[0]
