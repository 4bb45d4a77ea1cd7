"""Training inputs checked before anything expensive (DeepSpeed, the model, the data stream):
one line naming the file and the reason, on every rank, instead of a traceback once a part is
first sampled.

Checked on rank 0, the verdict broadcast (every rank raises the same ``TrainInputError``):
- the shard list expands, some shard has metadata + labels, and every such local shard exists
  (shards without labels are left out with a warning, as before);
- every label part is row-aligned with its metadata part (same rows: a labels folder made from
  another store fails here), has >= ``loss.num_labels`` columns and a sims file;
- every label is in [-1, K): K = ``partial_fc.num_classes`` or the centroids' row count;
- the centroids file exists (also with ``partial_fc.num_classes`` set: the labels are checked
  against the centers they were assigned with); K equals its K unless ``partial_fc.num_classes``
  is set to something else on purpose (then a warning; labels must still fit);
- every part is what its records say it was made from (``check_sources``, pipeline/core/provenance.py):
  metadata part i was embedded from the i-th listed shard (same path, or same name, size and
  mtime; another size is refused, another mtime warned about), label part i from metadata part
  i's keys (order-sensitive digest: another store's labels or reordered rows are refused) and
  from ``train.centroids`` (fingerprint); no part number held by two files. Parts written before
  records were kept get one warning saying how to refresh them;
- with ``regions.enabled`` (RICE): the region store, the region labels and their
  ``label_space.json`` exist; every region label part is row-aligned with its region metadata
  part (which has the box columns), has >= ``regions.num_labels`` columns and labels in
  [-1, num_classes); some shard has a region part.

Cost: one pass over the label files, memory-mapped in blocks (4 bytes x l per image: 12.8 GB for
400M images and l = 8, read once at start-up), one over the metadata's ``key`` columns (the keys
digests: ~9 ms per 10k-row part on one loaded CPU core, on up to 16 threads), ~4 MiB of the
centroids file, headers for everything else.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pipeline.core import fs
from pipeline.core.errors import InputError, StageError
from pipeline.core.io import load_npy
from pipeline.core.provenance import (
    centroids_fingerprint,
    keys_digest,
    label_mismatch,
    parquet_file,
    part_record,
    shard_mismatch,
)
from pipeline.core.shards import ShardSpecError, expand_shards, is_url, local_path
from pipeline.core.store import labels_path, meta_path, part_numbers, read_label_record, sims_path

log = logging.getLogger("mlcd.train.validate")
BLOCK_ROWS = 1 << 22


class TrainInputError(InputError):
    """A training input that can't work (one line: file and reason)."""


def check_inputs(cfg, ctx) -> None:
    """Collective: every rank calls it with the same ``TrainConfig``; rank 0 checks, every rank
    raises the same TrainInputError (``DistContext.agree``)."""
    def check() -> None:
        try:
            _check(cfg)
        except (TrainInputError, ShardSpecError):  # a shard spec keeps its own exit code (as in embed)
            raise
        except (StageError, OSError) as e:  # a store/shard-spec error, an unreadable file
            raise TrainInputError(str(e)) from None
    ctx.agree(check)


def _npy(path, what: str) -> np.ndarray:
    """The memory-mapped array, or one line naming the file (a truncated or non-npy file)."""
    try:
        return load_npy(path, mmap=True)
    except (OSError, ValueError) as e:
        raise TrainInputError(f"{path}: unreadable {what} ({e})") from None


def _centroids_k(path: str) -> int | None:
    if not fs.isfile(fs.check(path, "train.centroids")):
        return None
    a = _npy(path, "centroids")
    if a.ndim != 2:
        raise TrainInputError(f"{path}: centroids must be a 2-D array, got shape {a.shape}")
    return int(a.shape[0])


def _check(cfg) -> None:
    d, need = cfg.data, cfg.loss.labels_used
    try:  # first: a spec the shard policy refuses is named before anything else is looked at
        shards = expand_shards(d.shards)
    except ShardSpecError as e:  # refused by the shard policy or matching nothing: name the key
        raise type(e)(f"train.data.shards={d.shards!r}: {e}") from None
    except OSError as e:
        raise TrainInputError(f"train.data.shards={d.shards!r}: {e}") from None
    if not shards:
        raise TrainInputError(f"train.data.shards={d.shards!r}: no shards")
    k_cent = _centroids_k(cfg.centroids)
    if k_cent is None:  # README: refused also with num_classes set (the labels are checked against it)
        raise TrainInputError(f"{cfg.centroids}: k-means centroids not found (train.centroids; run stage 2: "
                              f"needed also with train.partial_fc.num_classes set, to check the labels)")
    k: int = cfg.partial_fc.num_classes or k_cent
    if k != k_cent:
        log.warning("train.partial_fc.num_classes=%d differs from the %d centroids in %s (kept: set on "
                    "purpose)", k, k_cent, cfg.centroids)
    if not fs.isdir(fs.check(d.store, "train.data.store")):
        raise TrainInputError(f"{d.store}: embedding store not found (train.data.store)")
    if not fs.isdir(fs.check(d.labels, "train.data.labels")):
        raise TrainInputError(f"{d.labels}: label folder not found (train.data.labels)")
    found = 0
    for i, url in enumerate(shards):
        m, lab = meta_path(d.store, i), labels_path(d.labels, i)
        if not (fs.isfile(m) and fs.isfile(lab)):
            continue  # left out at start-up with a warning (training/data.py:find_parts)
        found += 1
        if not is_url(url) and not os.path.isfile(local_path(url) or url):
            raise TrainInputError(f"{url}: shard not found, but it has labels {lab} "
                                  f"(listed by train.data.shards={d.shards!r})")
        _check_part(m, lab, sims_path(d.labels, i), need, k)
    if not found:
        raise TrainInputError(f"no shard of {d.shards} has labels: expected {labels_path(d.labels, 0)} and "
                              f"{meta_path(d.store, 0)} (run stages 1 and 2 first)")
    check_sources(cfg, shards)
    if cfg.regions.enabled:
        _check_regions(cfg)


def check_sources(cfg, shards: list[str]) -> None:
    """Each part training joins (shard i, metadata part i, label part i) against the records of
    what it was made from (module docstring); one line naming the part and both sources."""
    d = cfg.data
    for folder, prefix, suffix in ((fs.join(d.store, "metadata"), "metadata_", ".parquet"),
                                   (d.labels, "labels_", ".npy")):
        if fs.isdir(folder):
            part_numbers(folder, prefix, suffix)  # two files of one part: refused by name
    cfp, unrecorded = centroids_fingerprint(cfg.centroids), {"shard": 0, "labels": 0}
    joined = [(i, url, meta_path(d.store, i), labels_path(d.labels, i)) for i, url in enumerate(shards)]
    joined = [j for j in joined if fs.isfile(j[2]) and fs.isfile(j[3])]
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # parquet reads release the GIL
        keys = list(pool.map(_keys_digest, [m for _, _, m, _ in joined]))
    for (i, url, m, lab), key_sha in zip(joined, keys):
        rec = part_record(m)
        unrecorded["shard"] += "shard" not in rec
        bad = shard_mismatch(rec, url)
        if bad and bad[0] != "mtime":
            raise TrainInputError(f"{fs.url_of(m)}: part {i} {bad[1]} (train.data.shards={d.shards!r} lists {url} at "
                                  f"position {i}; shards listed in another order or changed since stage 1?)")
        if bad:
            log.warning("%s: part %d %s; its keys are trusted to be unchanged", fs.url_of(m), i, bad[1])
        lrec = read_label_record(d.labels, i)
        unrecorded["labels"] += lrec is None
        why = label_mismatch(lrec, key_sha, cfp)
        if why:
            raise TrainInputError(f"{lab} does not label {m} (train.centroids={cfg.centroids}): {why}")
    _warn_unrecorded(unrecorded, d)


def _keys_digest(meta) -> str:
    try:
        return keys_digest(meta)
    except Exception as e:  # noqa: BLE001 (pyarrow raises several types for a bad file)
        raise TrainInputError(f"{meta}: unreadable keys ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def check_region_record(meta, lab) -> None:
    """A region label part against its record (clustering/region_labels.py writes it): made from
    this region metadata part's keys. No record (older folders): not checked."""
    rec = read_label_record(os.path.dirname(lab), os.path.basename(lab)[len("labels_"):-len(".npy")])
    why = label_mismatch(rec, _keys_digest(meta), None) if rec is not None else None
    if why:
        raise TrainInputError(f"{lab} does not label {meta} (train.regions): {why}")


def _warn_unrecorded(unrecorded: dict, d) -> None:
    if unrecorded["shard"]:
        log.warning("%d metadata part(s) in %s do not record the shard they were embedded from (a "
                    "clip-retrieval store or one written before records were kept): shard order is not "
                    "checked for them; rerun `mlcd embed` with run.overwrite=true to refresh",
                    unrecorded["shard"], d.store)
    if unrecorded["labels"]:
        log.warning("%d label part(s) in %s do not record the keys and centers they were made from "
                    "(written before records were kept): not checked; rerun `mlcd assign` to refresh "
                    "them", unrecorded["labels"], d.labels)


def region_num_classes(rcfg) -> int:
    """The region classes (clusters K + tokens V): ``regions.partial_fc.num_classes`` if set, else
    ``num_classes`` of ``{regions.labels}/label_space.json`` (one line naming the file if unfit)."""
    if rcfg.partial_fc.num_classes:
        return rcfg.partial_fc.num_classes
    from training.region_data import region_num_classes as from_label_space
    try:
        return from_label_space(rcfg.labels)
    except (OSError, ValueError) as e:
        raise TrainInputError(str(e)) from None


def _check_regions(cfg) -> None:
    """Region parts as the loader finds them (headers: training/region_data.py), then every
    region label in range."""
    from training.region_data import RegionSpec, find_region_parts
    r = cfg.regions
    fs.check(r.labels, "train.regions.labels")
    if not fs.isdir(fs.check(r.store, "train.regions.store")):
        raise TrainInputError(f"{r.store}: region store not found (train.regions.store; run mlcd regions)")
    k = region_num_classes(r)
    try:
        parts = find_region_parts(cfg.data, RegionSpec.of(r, k), cfg.loss.labels_used)
    except (OSError, ValueError) as e:
        raise TrainInputError(str(e)) from None
    for p in parts:
        if p.region_labels:
            _check_labels(p.region_meta, p.region_labels, r.num_labels, k, "train.regions.num_labels",
                          "K + V = train.regions.partial_fc.num_classes or label_space.json's num_classes")
            check_region_record(p.region_meta, p.region_labels)


def _check_part(meta, lab, sims, need: int, k: int) -> None:
    _check_labels(meta, lab, need, k)
    if not fs.isfile(sims):
        raise TrainInputError(f"{sims}: missing (written with {lab} by stage 2)")


def _check_labels(meta, lab, need: int, k: int, width_key: str = "train.loss.num_labels",
                  k_is: str = "K = train.partial_fc.num_classes or the centroids' count") -> None:
    try:
        rows = parquet_file(meta).metadata.num_rows
    except Exception as e:  # noqa: BLE001 (pyarrow raises several types for a bad file)
        raise TrainInputError(f"{meta}: unreadable metadata ({str(e).splitlines()[0]})") from None
    a = _npy(lab, "labels")
    if a.ndim != 2 or a.shape[0] != rows:
        raise TrainInputError(f"{lab}: {a.shape[0] if a.ndim else 0} label rows but {meta} has {rows}: "
                              f"not row-aligned (labels made from another store?)")
    if a.shape[1] < need:
        raise TrainInputError(f"{lab}: {a.shape[1]} labels per row, {width_key} needs {need}")
    if a.dtype.kind not in "iu":
        raise TrainInputError(f"{lab}: dtype {a.dtype}, expected integers")
    for s in range(0, rows, BLOCK_ROWS):
        b = np.asarray(a[s:s + BLOCK_ROWS, :need])
        if b.size and (b.max() >= k or b.min() < -1):
            bad = int(b.max()) if b.max() >= k else int(b.min())
            row = s + int(np.argwhere((b >= k) | (b < -1))[0][0])
            raise TrainInputError(f"{lab}: label {bad} at row {row} is outside [-1, {k}) ({k_is})")
