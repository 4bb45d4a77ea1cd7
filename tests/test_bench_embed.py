"""The stage-1 bench's efficiency (pipeline/bench_embed.py) is the model's busy share of the whole
stage's wall time: the timer around the encoder's real calls counts their time, never more than
the wall around them, and puts the methods back."""
import time

import torch


def test_model_busy_timer_counts_real_calls_and_restores():
    from pipeline.bench_embed import _model_busy
    from pipeline.encoders import Encoder, EncoderConfig, build_encoder
    enc = build_encoder(EncoderConfig(kind="offline"), "cpu")
    before = {n: getattr(Encoder, n) for n in ("encode_images", "encode_texts", "joint")}
    x = torch.rand(4, 3, enc.image_size, enc.image_size)
    t0 = time.perf_counter()
    with _model_busy(cuda=False) as busy:
        img = enc.encode_images(x)
        enc.joint(img, enc.encode_texts(["a", "b", "c", "d"]))
        time.sleep(0.05)  # waiting, not model time
    wall = time.perf_counter() - t0
    assert 0 < busy[0] <= wall - 0.05
    assert {n: getattr(Encoder, n) for n in before} == before
    n = busy[0]
    enc.encode_images(x)
    assert busy[0] == n  # outside the block: not counted
