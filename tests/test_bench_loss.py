"""The loss benchmark's building blocks (training/bench_train.py) run and report what they say;
no timing is asserted (speed targets live in `make bench`)."""
from __future__ import annotations

import math

import torch


def test_fused_loss_rate_on_cpu():
    """`fused_loss_rate` (the gpu-check item's function) on a tiny shape: the chunked path ran
    (several chunks), and the numbers are finite and consistent with each other."""
    from training.bench_train import fused_loss_rate
    shape = dict(K=20_000, W=4, D=32, B=512)
    r = fused_loss_rate("cpu", shape, reps=1)
    assert r["shape"] == shape and r["chunk_rows"] >= 1
    # sampled rule: dense columns = floor(0.1 * 5000) + up to l = 8 own positives, never more
    assert 500 <= r["dense_cols"] <= 508
    for k in ("samples_per_s", "tflops", "gemm_tflops", "ratio_to_gemm", "seconds"):
        assert math.isfinite(r[k]) and r[k] > 0, (k, r[k])
    assert abs(r["samples_per_s"] * r["seconds"] - shape["B"]) < 1e-6 * shape["B"]
    assert abs(r["ratio_to_gemm"] - r["tflops"] / r["gemm_tflops"]) < 1e-9
    assert r["peak_mem"] is not None


def test_bare_gemms_are_the_loss_gemms():
    """The ceiling the loss's GEMM rate is compared with runs the three products of the loss's
    shapes: logits (B x n), d_emb (B x D) and d_w (n x D), in the loss's row chunks."""
    from training.bench_train import _bare_gemms
    calls = []
    real_mm = torch.mm
    try:
        torch.mm = lambda a, b, out=None: (calls.append((tuple(a.shape), tuple(b.shape))), real_mm(a, b, out=out))[1]
        _bare_gemms(10, 4, 6, 4, torch.device("cpu"))()
    finally:
        torch.mm = real_mm
    assert calls == [((4, 4), (4, 6)), ((4, 6), (6, 4))] * 2 + [((2, 4), (4, 6)), ((2, 6), (6, 4))]


def test_throughput_chain_changes_one_thing_per_row():
    """DDP -> sharding -> sampling -> loss: the first row only shards (still the full single-label
    softmax: rho = 1, unicom), each later row changes exactly one of rho and the loss mode."""
    from training.bench_train import CHAIN
    assert [c[0] for c in CHAIN] == ["sharding", "sampling", "loss"]
    assert CHAIN[0][2:] == (1.0, "unicom")
    for prev, cur in zip(CHAIN, CHAIN[1:]):
        assert sum(a != b for a, b in zip(prev[2:], cur[2:])) == 1, (prev, cur)
