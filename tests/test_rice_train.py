"""RICE training (train.regions): the masked region loss, the Trainer with a region head and a
second PartialFC, checkpoints (exact and re-sharded resume) and the export's region head files.

Run as a script under torchrun (1 or 2 gloo ranks):
- `loss`: the sharded loss with a row validity mask (padding regions) equals the loss written out
  row by row in float64 (tests/test_partial_fc.py's reference, averaged over the valid rows),
  loss and gradients, both negative rules, mlcd / mlc / unicom, rows with 0-3 labels, all -1
  rows, rows mixing cluster ids and token ids (K + t), no valid row at all (loss 0, no NaN).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import torchrun

K_CLUSTERS, V_TOKENS = 7, 6  # region label space: cluster ids [0, K), token ids K + t


def region_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8 global rows (4 per rank on 2 ranks), labels of width 3 in the K + V label space."""
    K = K_CLUSTERS
    labels = torch.tensor([
        [0, 3, 5],            # object: 3 cluster ids
        [2, -1, -1],          # object: 1 cluster id
        [K + 1, K + 4, -1],   # OCR: 2 token ids
        [-1, -1, -1],         # valid region without a usable label
        [1, K + 0, K + 5],    # cluster and token ids mixed
        [4, 6, 2],            # padding: labels must be ignored
        [K + 2, -1, -1],      # OCR: 1 token id
        [-1, -1, -1],         # padding
    ])
    valid = torch.tensor([True, True, True, True, True, False, True, False])
    emb = torch.randn(8, 8, generator=torch.Generator().manual_seed(11))
    return emb, labels, valid


def check_masked_loss(ctx) -> None:
    from test_partial_fc import compare_dense

    from training.loss import LossConfig
    from training.partial_fc import PartialFC, PartialFCConfig
    n = K_CLUSTERS + V_TOKENS
    emb, labels, valid = region_batch()
    losses = (LossConfig(num_labels=3), LossConfig(mode="mlc", num_labels=3, scale=16),
              LossConfig(mode="unicom", scale=32, margin=0.5))
    for cfg in losses:
        for rule in ("sampled", "batch"):
            for rho, chunk, step in ((1.0, -1, 0), (0.35, -1, 0), (0.35, 2, 5), (0.5, 3, 9)):
                pfc_cfg = PartialFCConfig(sample_rate=rho, negatives=rule, chunk_rows=chunk)
                compare_dense(ctx, n, emb, labels, cfg, pfc_cfg, step=step, valid=valid)
                # no valid row: loss exactly 0, zero gradients, no NaN
                t = compare_dense(ctx, n, emb, labels, cfg, pfc_cfg, step=step, valid=torch.zeros(8, dtype=torch.bool))
                assert float(t["valid_rows"]) == 0 and all(torch.isfinite(v) for v in t.values())
    # every row valid == no mask (the image path), up to the order of the sum
    B = 8 // ctx.world_size
    mine = slice(ctx.rank * B, (ctx.rank + 1) * B)
    for rule in ("sampled", "batch"):
        pfc = PartialFC(n, 8, PartialFCConfig(sample_rate=0.35, negatives=rule), losses[0], ctx.rank,
                        ctx.world_size, ctx, seed=3)
        a, ta = pfc(emb[mine], labels[mine], 4)
        b, tb = pfc(emb[mine], labels[mine], 4, valid=torch.ones(B, dtype=torch.bool))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert all(abs(float(ta[k]) - float(tb[k])) < 1e-5 for k in ta)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_masked_loss_matches_dense_reference(ranks):
    p = torchrun(["tests/test_rice_train.py", "loss"], ranks, timeout=240)
    assert all(f"RICE_LOSS_OK {r}" in p.stdout for r in range(ranks)), p.stdout[-2000:]


if __name__ == "__main__":  # worker: python tests/test_rice_train.py WHAT [ARGS] under torchrun
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pipeline.dist import init_distributed
    ctx = init_distributed()
    if sys.argv[1] == "loss":
        check_masked_loss(ctx)
        print(f"RICE_LOSS_OK {ctx.rank}", flush=True)
