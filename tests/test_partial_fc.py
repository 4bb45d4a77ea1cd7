"""PartialFC + MLCD loss exactness.

Run as a script under torchrun (1 or 2 gloo ranks), it checks on every rank:
- K = 11 split 6/5: loss and gradients w.r.t. the embeddings and the class centers equal the
  loss written out row by row in float64 from the positive and negative class sets the rule
  defines (MLCD arc, MLCD cos, vanilla multi-label, UNICOM), rho = 1 and rho < 1 under both
  negative rules (`sampled`, `batch`), unchunked (autograd) and in row chunks (the fused path:
  gradients computed in forward, training/fused_loss.py), in float64 to rounding and in
  float32 to float32 noise; the fused loss also passes torch.autograd.gradcheck;
- a rank whose block gets no sampled column (K = 10, rho = 0.1, positives all on rank 0) adds
  nothing, does not hang its peers; rows without negatives (mlc: zero loss) are handled;
- rho < 1, `batch`: every positive of the global batch in the block is sampled, plus exactly
  floor(rho * K_local) distinct negatives from outside the positives; same step -> same draw;
- rho < 1, `sampled`: each row has exactly floor(rho * K_local) negatives per rank, none its own
  positive, others' positives masked; the logged mean negatives per image is rho * K there and
  far larger under `batch`;
- one full optimizer step (DeepSpeed ZeRO-2 backbone + sharded centers, SGD, grad accumulation 2,
  each rank with half the batch) equals a plain single-process step on the whole batch.
"""
from __future__ import annotations

import sys

import pytest
import torch
from conftest import torchrun


def reference_loss(emb: torch.Tensor, centers: torch.Tensor, pos: list[list[int]], neg: list[list[int]],
                   cfg, valid: list[bool] | None = None) -> torch.Tensor:
    """The losses written out row by row from explicit positive / negative class sets (float64):
    mlcd eq. 5, mlc eq. 4 as a literal double sum over pairs, unicom's softmax over the target
    and the negatives; the mean over the rows marked valid (all by default; none: 0)."""
    from training.loss import apply_margin
    cos = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(centers, dim=1).T
    phi = apply_margin(cos, cfg.margin, cfg.margin_type)
    s, zero = cfg.scale, emb.new_zeros(1)
    out = []
    for i, (p, n) in enumerate(zip(pos, neg)):
        zp, zn = -s * phi[i, p], s * cos[i, n]
        if cfg.mode == "mlcd":
            out.append(torch.logsumexp(torch.cat([zero, zp]), 0) + torch.logsumexp(torch.cat([zero, zn]), 0))
        elif cfg.mode == "mlc":
            pairs = (zn[:, None] + zp[None, :]).flatten()  # s_j - s_i for every (j, i) pair
            out.append(torch.logsumexp(torch.cat([zero, pairs]), 0) + 0 * cos[i].sum())  # keep a graph
        else:
            assert len(p) <= 1 and len(p) + len(n) > 0
            out.append(torch.logsumexp(torch.cat([-zp, zn]), 0) + zp.sum())
    if valid is not None:
        kept = [o for o, v in zip(out, valid) if v]
        return torch.stack(kept).sum() / len(kept) if kept else 0 * emb.sum() + 0 * centers.sum()
    return torch.stack(out).mean()


def reference_sets(ctx, pfc, labels: torch.Tensor, step: int) -> tuple[list[list[int]], list[list[int]]]:
    """Each row's positives and negatives (global class ids) by the rule as the docs state it,
    from every rank's draw: batch = every sampled class but the row's positives; sampled = the
    first floor(rho * K_local) classes of the rank's random order that are not its positives."""
    d = pfc.sample_columns(labels, step)
    order = (d.sampled + pfc.start).tolist()
    n_neg, n_cand = pfc.num_negatives, min(pfc.num_local, pfc.num_negatives + labels.shape[1])
    pos = [sorted({v for v in row if v >= 0}) for row in labels.tolist()]
    mine = [v for row in pos for v in row if pfc.start <= v < pfc.start + pfc.num_local]
    assert set(mine) <= set(order), "a positive of the batch was not sampled"
    if pfc.cfg.negatives == "batch":
        neg = [[c for c in order if c not in p] for p in pos]
    else:
        neg = [[c for c in order[:n_cand] if c not in p][:n_neg] for p in pos]
    every = ctx.all_gather_object(neg) if ctx.distributed else [neg]
    return pos, [sorted(sum((r[i] for r in every), [])) for i in range(len(pos))]


# float64: the sharded loss runs in float64 too, so any difference beyond rounding is a bug
# (gradcheck-level). float32 (what training runs): the float64 reference within float32 noise
# (the centers' gradient passes through normalize of norm-0.03 rows, which amplifies rounding).
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=1e-3, atol=1e-5)}


def compare_dense(ctx, K: int, emb: torch.Tensor, labels: torch.Tensor, cfg, pfc_cfg, seed: int = 3,
                  step: int = 0, valid: torch.Tensor | None = None, dtype=torch.float64) -> dict:
    """Sharded loss, d loss/d emb and d loss/d centers on every rank == the loss written out
    row by row in float64 from the rule's positive and negative sets over the global batch.
    valid (global (B,) bool, optional): the reference drops the invalid rows' labels and averages
    over the valid rows only (their gradients must be exactly zero). dtype: the sharded loss's
    (PartialFC's centers and embeddings). Returns the sharded stats."""
    from training.partial_fc import PartialFC, init_centers
    B = emb.shape[0] // ctx.world_size
    pfc = PartialFC(K, emb.shape[1], pfc_cfg, cfg, ctx.rank, ctx.world_size, ctx, seed=seed).to(dtype)
    mine = slice(ctx.rank * B, (ctx.rank + 1) * B)
    x = emb[mine].to(dtype).clone().requires_grad_()
    loss, terms = pfc(x, labels[mine], step=step, valid=None if valid is None else valid[mine])
    loss.backward()
    lab = labels[:, :cfg.labels_used]
    if valid is not None:
        lab = lab.masked_fill(~valid[:, None], -1)
    pos, neg = reference_sets(ctx, pfc, lab, step)
    xd = emb.double().requires_grad_()
    wd = init_centers(K, emb.shape[1], 0, K, 0.01, seed=seed).double().requires_grad_()
    ld = reference_loss(xd, wd, pos, neg, cfg, None if valid is None else valid.tolist())
    ld.backward()
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), ld, **tol)
    torch.testing.assert_close(x.grad.double(), xd.grad[mine], **tol)
    torch.testing.assert_close(pfc.weight.grad.double(), wd.grad[pfc.start:pfc.start + pfc.num_local], **tol)
    assert float(xd.grad.abs().sum()) == 0 or float(x.grad.abs().sum()) > 0
    kept = [n for i, n in enumerate(neg) if valid is None or valid[i]]
    assert abs(float(terms["negatives"]) - sum(map(len, kept)) / max(len(kept), 1)) < 1e-4
    if valid is not None:
        assert float(x.grad[~valid[mine]].abs().sum()) == 0  # padding rows: exactly no gradient
        assert torch.isfinite(loss) and float(terms["valid_rows"]) == int(valid.sum())
    return terms


def check_loss_and_grads(ctx) -> None:
    from training.loss import LossConfig
    from training.partial_fc import PartialFC, PartialFCConfig
    K, D, B = 11, 8, 3
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(B * 2, D, generator=g)
    labels = torch.randint(0, K, (B * 2, 3), generator=g)
    labels[1, 1:] = -1
    labels[4, 0] = labels[4, 1]  # duplicate label in a row
    if ctx.world_size == 2:
        assert PartialFC(K, D, PartialFCConfig(), LossConfig(), ctx.rank, 2, ctx).num_local == (6 if ctx.rank == 0 else 5)
    losses = (LossConfig(num_labels=3), LossConfig(num_labels=3, margin_type="cos", margin=0.2),
              LossConfig(mode="mlc", num_labels=3, scale=16), LossConfig(mode="unicom", scale=32, margin=0.5))
    for cfg in losses:
        for chunk in (-1, 1, 4, 0):  # -1: autograd over the B x S logits; else fused row chunks
            compare_dense(ctx, K, emb, labels, cfg, PartialFCConfig(sample_rate=1.0, chunk_rows=chunk))
            compare_dense(ctx, K, emb, labels, cfg, PartialFCConfig(sample_rate=1.0, chunk_rows=chunk),
                          dtype=torch.float32)
    # rho < 1, both rules: 2 / 1 negatives per rank (+ the batch's positives under `batch`)
    for rule in ("sampled", "batch"):
        for cfg in losses[::2] + losses[3:]:
            for chunk, step in ((-1, 0), (2, 0), (-1, 7), (4, 7), (5, 7)):
                compare_dense(ctx, K, emb, labels, cfg,
                              PartialFCConfig(sample_rate=0.35, negatives=rule, chunk_rows=chunk), step=step)

    # an empty block: K = 10, 2 ranks, rho = 0.1 -> floor(0.5) = 0 negatives, positives all in
    # [0, 5): under `batch` rank 1 samples nothing (1 rank: rho = 0.05, no negatives either);
    # under `sampled` no row has a negative (mlc: a zero loss)
    rho = 0.1 if ctx.world_size == 2 else 0.05
    labels = torch.randint(0, 4, (B * 2, 3), generator=g)
    for rule in ("sampled", "batch"):
        for cfg in (LossConfig(num_labels=3), LossConfig(mode="mlc", num_labels=3), LossConfig(mode="unicom", scale=16)):
            for chunk in (-1, 2):
                compare_dense(ctx, 10, emb, labels, cfg,
                              PartialFCConfig(sample_rate=rho, negatives=rule, chunk_rows=chunk))
    labels[2] = -1  # a row with no positive at all
    for chunk in (-1, 2):
        compare_dense(ctx, 10, emb, labels, LossConfig(num_labels=3),
                      PartialFCConfig(sample_rate=rho, negatives="batch", chunk_rows=chunk))

    # rho < 1, batch rule: positives always in, exactly floor(rho * K_local) negatives outside them
    K, rho = 1001, 0.1
    pfc = PartialFC(K, D, PartialFCConfig(sample_rate=rho, negatives="batch"), LossConfig(num_labels=8),
                    ctx.rank, ctx.world_size, ctx, seed=0)
    for step in range(5):
        lab = torch.randint(0, K, (64, 8), generator=g)
        lab[0] = -1
        sampled, mask, negs = pfc.sample(lab, step)
        local = lab - pfc.start
        pos = set(local[(lab >= 0) & (local >= 0) & (local < pfc.num_local)].tolist())
        s = sampled.tolist()
        assert len(set(s)) == len(s) and pos <= set(s)
        assert len(set(s) - pos) == int(rho * pfc.num_local)
        assert int(mask.sum()) == sum(len({v - pfc.start for v in row if pfc.start <= v < pfc.start + pfc.num_local})
                                      for row in lab.tolist())
        assert torch.equal(negs, ~mask)
        again, _, _ = pfc.sample(lab, step)
        assert torch.equal(again, sampled)
    # sampled rule: every row has exactly floor(rho * K_local) negatives per rank, none its own
    # positive; another row's positive is masked (not a negative) unless drawn for this row
    pfc = PartialFC(K, D, PartialFCConfig(sample_rate=rho), LossConfig(num_labels=8), ctx.rank,
                    ctx.world_size, ctx, seed=0)
    n = pfc.num_negatives
    for step in range(5):
        lab = torch.randint(0, K, (64, 8), generator=g)
        sampled, mask, negs = pfc.sample(lab, step)
        assert negs.sum(1).eq(n).all() and not (negs & mask).any()
        assert len(set(sampled.tolist())) == sampled.numel() <= n + 8 + int(mask.any(0).sum())
        batch_pos = mask.any(0)
        assert (batch_pos & ~mask & ~negs).any(), "no other row's positive was masked"
        again = pfc.sample(lab, step)
        assert all(torch.equal(u, v) for u, v in zip(again, (sampled, mask, negs)))
    # mean negatives per image (the logged stat): ~rho * K under `sampled`, far more under `batch`
    x = torch.randn(32, D, generator=g)
    lab = torch.randint(0, K, (32 * ctx.world_size, 8), generator=torch.Generator().manual_seed(9))
    mine = lab[32 * ctx.rank:32 * ctx.rank + 32]
    _, t_sampled = pfc(x, mine, 0)
    pfc.cfg = PartialFCConfig(sample_rate=rho, negatives="batch")
    _, t_batch = pfc(x, mine, 0)
    assert float(t_sampled["negatives"]) == 100  # floor(0.1 * 501) + floor(0.1 * 500), or 0.1 * 1001
    distinct = len(set(lab.flatten().tolist()))
    own = sum(len(set(row)) for row in lab.tolist()) / lab.shape[0]
    assert abs(float(t_batch["negatives"]) - (100 + distinct - own)) < 1e-3
    assert float(t_batch["negatives"]) > 300  # 1 rank: ~100 + 226 - 8; 2 ranks: ~100 + 400 - 8
    # more positives than the negative budget (the case insightface's top-k rule gets wrong)
    pfc = PartialFC(40, D, PartialFCConfig(sample_rate=0.25, negatives="batch"), LossConfig(num_labels=8),
                    ctx.rank, ctx.world_size, ctx)
    lab = torch.arange(32).view(4, 8)
    sampled, _, _ = pfc.sample(lab, 0)
    n_pos = len([c for c in range(32) if pfc.start <= c < pfc.start + pfc.num_local])
    assert sampled.numel() == n_pos + min(int(0.25 * pfc.num_local), pfc.num_local - n_pos)
    # floor(0.29 * 100) = 29 negatives (float arithmetic says 28)
    for rule in ("sampled", "batch"):
        pfc = PartialFC(100 * ctx.world_size, D, PartialFCConfig(sample_rate=0.29, negatives=rule), LossConfig(),
                        ctx.rank, ctx.world_size, ctx)
        _, _, negs = pfc.sample(torch.full((2, 8), -1), 0)
        assert negs.sum(1).tolist() == [29, 29] and pfc.num_negatives == 29


def check_full_step(ctx) -> None:
    """2 ranks x (2 micro-batches of 2) through DeepSpeed == one dense SGD step on 8 samples."""
    from pipeline.core.config import RunConfig
    from training.config import DeepSpeedConfig, OptimConfig, TrainConfig
    from training.data import Batch, TrainDataConfig
    from training.loss import LossConfig, dense_mlcd_loss
    from training.model import ModelConfig, build_model
    from training.partial_fc import PartialFCConfig, init_centers
    from training.trainer import Trainer, make_backbone_optimizer
    cfg = TrainConfig(
        model=ModelConfig(name="vit_tiny_rope2d", image_size=16, patch_size=8, width=16, layers=1,
                          heads=2, mlp_dim=32, embed_dim=8),
        loss=LossConfig(num_labels=2, margin=0.3),
        partial_fc=PartialFCConfig(sample_rate=1.0, optimizer="sgd", lr_mult=4.0, weight_decay=0.0),
        optim=OptimConfig(name="sgd", lr=0.05, weight_decay=0.1, warmup_steps=0),
        deepspeed=DeepSpeedConfig(zero_stage=2, precision="fp32", grad_clip=0.0, grad_accum=2),
        data=TrainDataConfig(batch_size=2), steps=10)
    K, n = 7, 8
    g = torch.Generator().manual_seed(5)
    images = torch.randn(n, 3, 16, 16, generator=g)
    labels = torch.randint(0, K, (n, 2), generator=g)
    torch.manual_seed(0)
    ref = build_model(cfg.model)  # the same seeded init the Trainer builds (run.seed = 0)
    trainer = Trainer(RunConfig(seed=0), cfg, ctx, num_classes=K)  # the stage's build, no files
    engine, pfc = trainer.engine, trainer.head("image").pfc
    assert [h.name for h in trainer.heads] == ["image"]
    assert all(torch.equal(p, q) for p, q in zip(engine.module.state_dict().values(), ref.state_dict().values()))
    # global micro-batch m = ranks' slices m of their halves; rank r holds samples [4r, 4r + 4)
    mine = [Batch(images[4 * ctx.rank + 2 * m:4 * ctx.rank + 2 * m + 2],
                  labels[4 * ctx.rank + 2 * m:4 * ctx.rank + 2 * m + 2]) for m in range(2)]
    out = trainer.train_step(mine)
    centers = torch.cat(ctx.all_gather_object(pfc.weight.detach()))

    wd = init_centers(K, 8, 0, K, 0.01, seed=0).requires_grad_()
    ref_opt = make_backbone_optimizer(ref, cfg.optim)
    order = torch.tensor([0, 1, 4, 5, 2, 3, 6, 7])  # micro-batch 0 = both ranks' first pairs
    total = 0.0
    for m in range(2):
        idx = order[4 * m:4 * m + 4]
        loss, _ = dense_mlcd_loss(ref(images[idx]), wd, labels[idx], cfg.loss)
        (loss / 2).backward()
        total += loss.item() / 2
    ref_opt.step()
    with torch.no_grad():
        wd -= cfg.optim.lr * cfg.partial_fc.lr_mult * wd.grad
    assert abs(out["loss"] - total) < 1e-4 * abs(total), (out["loss"], total)
    torch.testing.assert_close(centers, wd.detach(), rtol=1e-4, atol=1e-6)
    for (name, p), (_, q) in zip(engine.module.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-6, msg=name)
    torch.manual_seed(0)
    start = build_model(cfg.model).state_dict()
    moved = max(float((start[k] - v).abs().max()) for k, v in ref.state_dict().items())
    assert moved > 1e-4, "the step did not move the backbone"


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_partial_fc_exact(ranks):
    p = torchrun(["tests/test_partial_fc.py"], ranks, timeout=240)
    assert all(f"PARTIAL_FC_OK {r}" in p.stdout for r in range(ranks)), p.stdout[-2000:]


def test_partial_fc_one_process_chunked():
    """No process group: chunked == unchunked == dense float64, both loss modes."""
    from pipeline.core.dist import DistContext
    check_loss_and_grads(DistContext())


def test_fused_loss_gradcheck():
    """The fused chunked loss (training/fused_loss.py) against finite differences in float64,
    every mode, both rules, with padding rows and a chunk that splits the batch unevenly; and at
    a scale too large for an unshifted exp in float32 (the max-shift branch) == the autograd
    path."""
    import torch.nn.functional as F

    from training.fused_loss import fused_loss
    from training.loss import LossConfig, combine
    from training.partial_fc import PartialFC, PartialFCConfig, _chunk_terms
    g = torch.Generator().manual_seed(4)
    emb, labels = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randint(0, 23, (7, 3), generator=g)
    labels[2, 1:] = -1
    valid = torch.tensor([True, True, False, True, True, True, False])
    for cfg in (LossConfig(num_labels=3), LossConfig(mode="mlc", num_labels=3, scale=8),
                LossConfig(mode="unicom", scale=16, margin=0.5)):
        for rule in ("sampled", "batch"):
            pfc = PartialFC(23, 5, PartialFCConfig(sample_rate=0.3, negatives=rule), cfg)
            d = pfc.sample_columns(labels[:, :cfg.labels_used], 1)
            w = F.normalize(pfc.weight.detach()[d.sampled].double(), dim=1).requires_grad_()
            e = F.normalize(emb, dim=1).requires_grad_()
            for v in (None, valid):
                assert torch.autograd.gradcheck(
                    lambda e, w, v=v: fused_loss(e, w, d.cols, d.limit, cfg, None, 3, v)[0], (e, w), fast_mode=True)
    cfg = LossConfig(num_labels=3, scale=120.0)
    pfc = PartialFC(23, 5, PartialFCConfig(sample_rate=0.3), cfg)
    d = pfc.sample_columns(labels, 1)
    out = []
    for fused in (True, False):
        e = F.normalize(emb.float(), dim=1).requires_grad_()
        w = F.normalize(pfc.weight.detach()[d.sampled], dim=1).requires_grad_()
        loss = (fused_loss(e, w, d.cols, d.limit, cfg, None, 2)[0] if fused else
                combine(_chunk_terms(e, w, d.cols, d.limit, cfg), cfg)[0])
        loss.backward()
        out.append((loss, e.grad, w.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sampled_negatives_are_uniform():
    """Under `sampled`, a row's negatives are a uniform draw from outside its own positives:
    over 400 steps every other class (another row's positive included) is one of its 5
    negatives ~400 * 5 / 47 = 43 times (binomial sd ~6), its positives never; `batch` makes the
    other rows' positives negatives at every step."""
    from training.loss import LossConfig
    from training.partial_fc import PartialFC, PartialFCConfig
    lab = torch.tensor([[0, 1, 2], [3, 4, 5], [6, -1, -1]])
    counts = torch.zeros(50)
    pfc = PartialFC(50, 4, PartialFCConfig(sample_rate=0.1), LossConfig(num_labels=3))
    for step in range(400):
        sampled, _, negs = pfc.sample(lab, step)
        counts[sampled[negs[0]]] += 1
    assert counts[:3].sum() == 0 and counts.sum() == 400 * 5
    assert counts[3:].min() >= 20 and counts[3:].max() <= 70, counts
    pfc.cfg = PartialFCConfig(sample_rate=0.1, negatives="batch")
    sampled, _, negs = pfc.sample(lab, 0)
    assert set(sampled[negs[0]].tolist()) >= {3, 4, 5, 6}


def test_negative_count_and_too_few_classes():
    from pipeline.core.config import ConfigError
    from training.loss import LossConfig
    from training.partial_fc import PartialFC, PartialFCConfig, floor_fraction
    assert int(0.29 * 100) == 28 and floor_fraction(0.29, 100) == 29
    assert [floor_fraction(r, 10) for r in (0.1, 0.3, 0.7, 1.0)] == [1, 3, 7, 10]
    with pytest.raises(ConfigError, match="num_classes=3: must be >= the number of ranks"):
        PartialFC(3, 8, PartialFCConfig(), LossConfig(), rank=0, world_size=4)


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from pipeline.core.dist import init_distributed
    ctx = init_distributed()
    check_loss_and_grads(ctx)
    if ctx.world_size == 2:
        check_full_step(ctx)
    print(f"PARTIAL_FC_OK {ctx.rank}", flush=True)
