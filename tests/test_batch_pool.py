"""Workers reuse their shared-memory batches (training/batch_pool.py), with real DataLoader
worker processes: a slot is written again only after the training process has let go of every
batch that used it, so batches still held keep their pixels, and the pooled stream is the
unpooled one, batch for batch."""
import torch

from training.bench_data import synthetic_data
from training.data import TrainDataConfig, find_parts, make_loader


def _loader(tmp_path, pool: bool, n: int = 14):
    spec, store, labels = synthetic_data(tmp_path, 80)
    cfg = TrainDataConfig(shards=spec, store=store, labels=labels, batch_size=8, workers=2, shuffle_buffer=20,
                          pin_memory=False, pool_batches=pool)
    return make_loader(find_parts(cfg, num_labels=8), cfg, 32, 8, 1000, seed=3, rank=0, epoch=0, num_batches=n)


def test_pooled_batches_are_reused_only_once_released(tmp_path):
    held, seen, tags = {}, [], []
    for j, b in enumerate(_loader(tmp_path, pool=True)):
        assert b.images.is_shared() and b.images.is_contiguous(memory_format=torch.channels_last)
        seen.append((b.images.clone(), b.labels.clone()))
        tags.append(b.pool_slot)
        if j % 3 == 0:
            held[j] = b  # still referenced: its slot must not come back to the worker
    assert all(t is not None for t in tags)
    # dropped batches' slots were reused (fewer segments than batches) ...
    assert len(set(tags)) < len(tags), tags
    # ... and no held batch was written over by a later one
    for j, b in held.items():
        assert torch.equal(b.images, seen[j][0]), f"held batch {j} changed"
    # the pool changes where the pixels live, not what they are
    plain = [(b.images.clone(), b.labels.clone(), b.pool_slot) for b in _loader(tmp_path / "u", pool=False)]
    assert len(plain) == len(seen)
    for (img, lab), (img2, lab2, tag) in zip(seen, plain):
        assert tag is None and torch.equal(img, img2) and torch.equal(lab, lab2)


def test_batches_all_kept_get_their_own_segments(tmp_path):
    """A consumer that keeps every batch (list()) never gives a slot back: the workers run out of
    slots and make new batches, and every batch keeps its pixels."""
    kept = list(_loader(tmp_path, pool=True, n=16))
    again = list(_loader(tmp_path / "u", pool=False, n=16))
    assert [b.pool_slot is None for b in kept].count(True) > 0  # past the slots: unpooled batches
    ptrs = {b.images.untyped_storage().data_ptr() for b in kept}
    assert len(ptrs) == len(kept)
    assert all(torch.equal(a.images, b.images) for a, b in zip(kept, again))
