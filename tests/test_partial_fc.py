"""PartialFC + MLCD loss exactness.

Run as a script under torchrun (1 or 2 gloo ranks), it checks on every rank:
- rho = 1, K = 11 split 6/5: loss and gradients w.r.t. the embeddings and the class centers equal
  the dense single-process float64 loss on the same global batch (MLCD arc, MLCD cos, UNICOM),
  unchunked and in row chunks of 1, 4 and auto (chunks recomputed in backward);
- a rank whose block gets no sampled column (K = 10, rho = 0.1, positives all on rank 0) adds
  nothing, does not hang its peers, and the loss equals the dense loss over the sampled columns;
- rho < 1: every positive of the global batch in the block is sampled, plus exactly
  floor(rho * K_local) distinct negatives from outside the positives; same step -> same draw;
- one full optimizer step (DeepSpeed ZeRO-2 backbone + sharded centers, SGD, grad accumulation 2,
  each rank with half the batch) equals a plain single-process step on the whole batch.
"""
from __future__ import annotations

import sys

import pytest
import torch
from conftest import torchrun


def compare_dense(ctx, K: int, emb: torch.Tensor, labels: torch.Tensor, cfg, pfc_cfg, seed: int = 3,
                  columns: list[int] | None = None) -> None:
    """Sharded loss, d loss/d emb and d loss/d centers on every rank == the dense float64 loss
    over the global batch (over `columns` of the K centers only, when given: the sampled ones)."""
    from training.loss import dense_mlcd_loss, dense_unicom_loss
    from training.partial_fc import PartialFC, init_centers
    B = emb.shape[0] // ctx.world_size
    pfc = PartialFC(K, emb.shape[1], pfc_cfg, cfg, ctx.rank, ctx.world_size, ctx, seed=seed)
    mine = slice(ctx.rank * B, (ctx.rank + 1) * B)
    x = emb[mine].clone().requires_grad_()
    loss, terms = pfc(x, labels[mine], step=0)
    loss.backward()
    xd = emb.double().requires_grad_()
    wd = init_centers(K, emb.shape[1], 0, K, 0.01, seed=seed).double().requires_grad_()
    lab = labels[:, :cfg.labels_used]
    cols = torch.arange(K) if columns is None else torch.tensor(columns)
    remap = torch.full((K + 1,), -1, dtype=torch.long)
    remap[cols] = torch.arange(len(cols))
    dense = dense_unicom_loss if cfg.mode == "unicom" else dense_mlcd_loss
    ld, _ = dense(xd, wd[cols], remap[torch.where(lab >= 0, lab, K)], cfg)
    ld.backward()
    torch.testing.assert_close(loss.double(), ld, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad[mine], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pfc.weight.grad.double(), wd.grad[pfc.start:pfc.start + pfc.num_local],
                               rtol=1e-4, atol=1e-6)
    assert float(x.grad.abs().sum()) > 0
    assert int(terms["sampled_classes"]) == len(cols)


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
    for cfg in (LossConfig(num_labels=3), LossConfig(num_labels=3, margin_type="cos", margin=0.2),
                LossConfig(mode="unicom", scale=32, margin=0.5)):
        for chunk in (-1, 1, 4, 0):
            compare_dense(ctx, K, emb, labels, cfg, PartialFCConfig(sample_rate=1.0, chunk_rows=chunk))

    # an empty block: K = 10, 2 ranks, rho = 0.1 -> floor(0.5) = 0 negatives, positives all in
    # [0, 5): rank 1 samples nothing (1 rank: rho = 0.05, no negatives either)
    rho = 0.1 if ctx.world_size == 2 else 0.05
    labels = torch.randint(0, 4, (B * 2, 3), generator=g)
    labels[2] = -1  # a row with no positive at all
    for cfg in (LossConfig(num_labels=3), LossConfig(mode="unicom", scale=16)):
        used = sorted(set(labels[:, :cfg.labels_used].flatten().tolist()) - {-1})
        for chunk in (-1, 2):
            compare_dense(ctx, 10, emb, labels, cfg, PartialFCConfig(sample_rate=rho, chunk_rows=chunk),
                          columns=used)

    # rho < 1: positives always in, exactly floor(rho * K_local) negatives outside them
    K, rho = 1001, 0.1
    pfc = PartialFC(K, D, PartialFCConfig(sample_rate=rho), LossConfig(num_labels=8), ctx.rank,
                    ctx.world_size, ctx, seed=0)
    for step in range(5):
        lab = torch.randint(0, K, (64, 8), generator=g)
        lab[0] = -1
        sampled, mask = pfc.sample(lab, step)
        local = lab - pfc.start
        pos = set(local[(lab >= 0) & (local >= 0) & (local < pfc.num_local)].tolist())
        s = sampled.tolist()
        assert len(set(s)) == len(s) and pos <= set(s)
        assert len(set(s) - pos) == int(rho * pfc.num_local)
        assert int(mask.sum()) == sum(len({v - pfc.start for v in row if pfc.start <= v < pfc.start + pfc.num_local})
                                      for row in lab.tolist())
        again, _ = pfc.sample(lab, step)
        assert torch.equal(again, sampled)
    # more positives than the negative budget (the case insightface's top-k rule gets wrong)
    pfc = PartialFC(40, D, PartialFCConfig(sample_rate=0.25), LossConfig(num_labels=8), ctx.rank,
                    ctx.world_size, ctx)
    lab = torch.arange(32).view(4, 8)
    sampled, _ = pfc.sample(lab, 0)
    n_pos = len([c for c in range(32) if pfc.start <= c < pfc.start + pfc.num_local])
    assert sampled.numel() == n_pos + min(int(0.25 * pfc.num_local), pfc.num_local - n_pos)
    # floor(0.29 * 100) = 29 negatives (float arithmetic says 28)
    pfc = PartialFC(100 * ctx.world_size, D, PartialFCConfig(sample_rate=0.29), LossConfig(), ctx.rank,
                    ctx.world_size, ctx)
    sampled, _ = pfc.sample(torch.full((2, 8), -1), 0)
    assert sampled.numel() == 29 == pfc.num_negatives


def check_full_step(ctx) -> None:
    """2 ranks x (2 micro-batches of 2) through DeepSpeed == one dense SGD step on 8 samples."""
    from pipeline.config import RunConfig
    from training.config import DeepSpeedConfig, OptimConfig, TrainConfig
    from training.data import TrainDataConfig
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
    engine, pfc = trainer.engine, trainer.pfc
    assert all(torch.equal(p, q) for p, q in zip(engine.module.state_dict().values(), ref.state_dict().values()))
    # global micro-batch m = ranks' slices m of their halves; rank r holds samples [4r, 4r + 4)
    mine = [(images[4 * ctx.rank + 2 * m:4 * ctx.rank + 2 * m + 2],
             labels[4 * ctx.rank + 2 * m:4 * ctx.rank + 2 * m + 2], 0) for m in range(2)]
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
    from pipeline.dist import DistContext
    check_loss_and_grads(DistContext())


def test_negative_count_and_too_few_classes():
    from pipeline.config import ConfigError
    from training.loss import LossConfig
    from training.partial_fc import PartialFC, PartialFCConfig, floor_fraction
    assert int(0.29 * 100) == 28 and floor_fraction(0.29, 100) == 29
    assert [floor_fraction(r, 10) for r in (0.1, 0.3, 0.7, 1.0)] == [1, 3, 7, 10]
    with pytest.raises(ConfigError, match="num_classes=3: must be >= the number of ranks"):
        PartialFC(3, 8, PartialFCConfig(), LossConfig(), rank=0, world_size=4)


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from pipeline.dist import init_distributed
    ctx = init_distributed()
    check_loss_and_grads(ctx)
    if ctx.world_size == 2:
        check_full_step(ctx)
    print(f"PARTIAL_FC_OK {ctx.rank}", flush=True)
