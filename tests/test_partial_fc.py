"""PartialFC + MLCD loss exactness.

Run as a script under torchrun (2 gloo ranks), it checks on every rank:
- rho = 1, K = 11 split 6/5: loss and gradients w.r.t. the embeddings and the class centers equal
  the dense single-process loss on the same global batch (MLCD arc, MLCD cos, UNICOM);
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


def check_loss_and_grads(ctx) -> None:
    import torch.nn.functional as F  # noqa: F401

    from training.loss import LossConfig, dense_mlcd_loss, dense_unicom_loss
    from training.partial_fc import PartialFC, PartialFCConfig, init_centers
    K, D, B = 11, 8, 3
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(B * ctx.world_size, D, generator=g)
    labels = torch.randint(0, K, (B * ctx.world_size, 3), generator=g)
    labels[1, 1:] = -1
    labels[4, 0] = labels[4, 1]  # duplicate label in a row
    for cfg in (LossConfig(num_labels=3), LossConfig(num_labels=3, margin_type="cos", margin=0.2),
                LossConfig(mode="unicom", scale=32, margin=0.5)):
        pfc = PartialFC(K, D, PartialFCConfig(sample_rate=1.0), cfg, ctx.rank, ctx.world_size, ctx.group, seed=3)
        assert (pfc.start, pfc.num_local) == ((0, 6) if ctx.rank == 0 else (6, 5))
        mine = slice(ctx.rank * B, (ctx.rank + 1) * B)
        x = emb[mine].clone().requires_grad_()
        loss, _ = pfc(x, labels[mine], step=0)
        loss.backward()
        xd = emb.clone().requires_grad_()
        wd = init_centers(K, D, 0, K, 0.01, seed=3).requires_grad_()
        dense = dense_unicom_loss if cfg.mode == "unicom" else dense_mlcd_loss
        ld, _ = dense(xd, wd, labels[:, :cfg.labels_used], cfg)
        ld.backward()
        torch.testing.assert_close(loss, ld, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, xd.grad[mine], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(pfc.weight.grad, wd.grad[pfc.start:pfc.start + pfc.num_local],
                                   rtol=1e-4, atol=1e-6)
        assert float(x.grad.abs().sum()) > 0 and float(pfc.weight.grad.abs().sum()) > 0

    # rho < 1: positives always in, exactly floor(rho * K_local) negatives outside them
    K, rho = 1001, 0.1
    pfc = PartialFC(K, D, PartialFCConfig(sample_rate=rho), LossConfig(num_labels=8), ctx.rank,
                    ctx.world_size, ctx.group, seed=0)
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
                    ctx.world_size, ctx.group)
    lab = torch.arange(32).view(4, 8)
    sampled, _ = pfc.sample(lab, 0)
    n_pos = len([c for c in range(32) if pfc.start <= c < pfc.start + pfc.num_local])
    assert sampled.numel() == n_pos + min(int(0.25 * pfc.num_local), pfc.num_local - n_pos)


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
def test_partial_fc_exact_two_ranks():
    p = torchrun(["tests/test_partial_fc.py"], 2, timeout=240)
    assert "PARTIAL_FC_OK 0" in p.stdout and "PARTIAL_FC_OK 1" in p.stdout, p.stdout[-2000:]


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from pipeline.dist import init_distributed
    ctx = init_distributed()
    check_loss_and_grads(ctx)
    check_full_step(ctx)
    print(f"PARTIAL_FC_OK {ctx.rank}", flush=True)
