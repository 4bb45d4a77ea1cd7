"""Stage 1: image-text shards -> L2-normalized image/text/joint features in clip-retrieval's layout.

    python -m pipeline.embed --config configs/demo.yaml [embed.batch_size=128 ...]
    torchrun --nproc_per_node 8 -m pipeline.embed --config ...     (any number of nodes)

Part i of the store is the i-th shard of ``expand_input(embed.input)`` (an image folder or list:
its i-th run of ``files_per_part`` files, pipeline/core/sources.py). Ranks take the
unfinished parts round-robin (rank 0 lists them once and broadcasts, so a rerun cannot split work
differently on different ranks). Within a rank, DataLoader workers each read and decode whole
shards (JPEG decode and resize in parallel, one tar stream per shard: ``pipe:`` sources are read
once) and hand batches of one shard at a time to the main process, which runs the model (autocast
on CUDA, pinned memory, ``prefetch_factor`` batches queued per worker) and writes each part with
``pipeline.core.store.write_part`` as soon as its shard ends. The metadata parquet is written last and
carries the part's sample/skip counts in its schema metadata, so a part is either complete with
its counts or absent: a rerun after SIGKILL redoes only absent parts and ends with the same store.

Fused embed -> assign (``embed.assign_centroids``: a centers file from stage 2's k-means, e.g.
trained on a sample's embeddings): each part's ``assign_kind`` features are also labelled at the
part's end with stage 2b's exact torch kernel (pipeline/core/topl.py: same row cleaning, blocks and
tiles as clustering/assign.py with ``engine=torch``, from the same ``dtype``-rounded features,
so the labels and sims are bit-identical to embed-then-assign on the same device and threads)
and written to ``labels_dir`` in the label-store layout (``labels_{i}.npy`` int32 N x l,
``sims_{i}.npy`` float16, ``state.json``, ``manifest.json``) before the part's metadata, so a
part is complete only with its labels. ``kinds`` may then be empty: only metadata and labels are
written (the sample-then-label recipe, docs/SCALING.md). Stage 2b on the same centers and
``l`` (``assign.engine=torch``) finds these labels done.

Each part records what it was made from (pipeline/core/provenance.py): its shard as given with size
and mtime, and digests of the encoder and decode settings, in the metadata's ``mlcd_part`` JSON
(the completion marker, so a part exists only with its record; fused labels get
``labels_{i}.json``). A rerun checks every finished part first (``check_parts``): another shard
at a part's index or another config is refused in one line, a rewritten shard is embedded again;
``run.overwrite=true`` removes every old part before embedding (``start_over``).

Bad samples never stop a run: each is skipped or repaired and counted by reason (``manifest.json``
``skipped`` / ``fixed``). A shard that cannot be read is logged by name; the other shards finish,
then the run exits 1 listing every failed shard (a rerun retries only those).
"""
from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.core import fs
from pipeline.core.config import RESUMABLE, ConfigError, RunConfig, check, prepare_out_dir
from pipeline.core.dist import DistContext
from pipeline.core.entry import StageError, stage_cli, stage_main
from pipeline.core.guard import die_with_parent_fn
from pipeline.core.images import IMAGE_EXTS, MAX_ASPECT, MAX_PIXELS, image_bytes, load_rgb
from pipeline.core.io import atomic_write_json, clean_stale_tmp, load_npy, read_json
from pipeline.core.provenance import (
    PART_META_KEY,
    centroids_fingerprint,
    digest,
    has_source,
    keys_digest,
    keys_digest_of,
    label_mismatch,
    label_record,
    part_record,
    shard_mismatch,
    shard_source,
)
from pipeline.core.shards import (
    ShardPolicyError,
    ShardSpecError,
    is_url,
    shard_stem,
)
from pipeline.core.sources import expand_input, read_source
from pipeline.core.store import (
    KINDS,
    StoreError,
    labels_path,
    meta_path,
    parquet_rows,
    part_complete,
    part_numbers,
    part_width,
    read_label_record,
    read_parquet_schema,
    settle_label_state,
    write_labels,
    write_part,
)
from pipeline.core.topl import ExactTopL, agreed_centroids, file_sha256, label_rows
from pipeline.core.tracking import Tracker, progress
from pipeline.encoders import EncoderConfig, build_encoder

log = logging.getLogger("mlcd.embed")
# decode settings that change a part's rows (recorded per part as reader_sha256, with the encoder's)
READER_FIELDS = ("dtype", "max_pixels", "image_exts", "caption_ext", "skip_missing_caption", "extra_fields")


@dataclass
class EmbedConfig:
    input: str = "${run.out_dir}/data/train"  # shards (brace pattern, .txt list, folder of .tar, pipe:/URL), an image folder or a .txt/.csv/.parquet image list
    files_per_part: int = 10000        # image folder/list input: files per store part (pipeline/core/sources.py)
    out_dir: str = "${run.out_dir}/store"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    kinds: list[str] = field(default_factory=lambda: list(KINDS))  # features written per part ([]: labels only)
    dtype: str = "float16"             # on disk
    batch_size: int = 64
    workers: int = field(default=2, metadata=RESUMABLE)  # DataLoader decode workers per rank (0 = in the main process)
    prefetch_factor: int = field(default=4, metadata=RESUMABLE)  # batches queued per worker
    max_pixels: int = MAX_PIXELS       # larger images are skipped before decoding (Pillow's limit)
    max_aspect: float = MAX_ASPECT     # longer/shorter side over this: skipped from the header (0 = no cap)
    image_exts: list[str] = field(default_factory=lambda: list(IMAGE_EXTS))  # first one present is read
    caption_ext: str = "txt"
    skip_missing_caption: bool = False  # False: keep the image, embed the empty caption
    extra_fields: list[str] = field(default_factory=list)  # sample-JSON fields copied to metadata
    # fused embed -> assign: label each part against these centers (None: embeddings only)
    assign_centroids: str | None = None
    assign_kind: str = "joint"          # the feature kind the centers were trained on
    assign_l: int = 8                   # labels per row (MLCD: 8; UNICOM: 1)
    assign_block_rows: int = 16384      # as assign.block_rows: same blocks, same labels
    labels_dir: str = "${run.out_dir}/clusters/labels"

    def __post_init__(self):
        check(self.batch_size > 0, "batch_size", self.batch_size, "must be > 0")
        check(self.files_per_part > 0, "files_per_part", self.files_per_part, "must be > 0")
        check(self.workers >= 0, "workers", self.workers, "must be >= 0")
        check(self.prefetch_factor > 0, "prefetch_factor", self.prefetch_factor, "must be > 0")
        check(self.max_pixels > 0, "max_pixels", self.max_pixels, "must be > 0")
        check(self.max_aspect == 0 or self.max_aspect >= 1, "max_aspect", self.max_aspect, "must be 0 or >= 1")
        check(self.dtype in ("float16", "float32"), "dtype", self.dtype, "must be float16 or float32")
        check(set(self.kinds) <= set(KINDS) and len(set(self.kinds)) == len(self.kinds), "kinds", self.kinds,
              f"must be a subset of {list(KINDS)}")
        check(bool(self.kinds) or bool(self.assign_centroids), "kinds", self.kinds,
              "may be empty only with embed.assign_centroids set (labels only)")
        check(self.assign_kind in KINDS, "assign_kind", self.assign_kind, f"must be one of {KINDS}")
        check(self.assign_l >= 1, "assign_l", self.assign_l, "must be >= 1")
        check(self.assign_block_rows >= 1, "assign_block_rows", self.assign_block_rows, "must be >= 1")
        check(bool(self.image_exts), "image_exts", self.image_exts, "must not be empty")
        check(isinstance(self.input, str) and bool(self.input), "input", self.input, "must be a non-empty string")


class EmbedFailed(StageError):
    """Some shards could not be read; every other part was written (exit 1, rerun retries them)."""
    label = "embed failed"


# ---------------------------------------------------------------- reading and repairing samples

def read_caption(raw: bytes | None) -> tuple[str, list[str]]:
    if raw is None:
        return "", ["caption_missing"]
    fixes = []
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        fixes.append("caption_not_utf8")
    text = " ".join(text.split())  # newlines/tabs/runs of spaces -> one space
    if not text and not fixes:
        fixes.append("caption_empty")
    return text, fixes


class ShardSamples(IterableDataset):
    """Yields batches of one shard at a time: {"part", "pixels", "key", "caption", "url",
    "shard_row", "extra", "end", "stats", "error"}. Each DataLoader worker takes whole shards
    (worker w of W: parts[w::W]); the last batch of a shard has end=True and its counts."""

    def __init__(self, parts: list[tuple[int, str]], cfg: EmbedConfig, preprocess, image_size: int):
        self.parts, self.cfg, self.preprocess, self.image_size = parts, cfg, preprocess, image_size

    def __iter__(self):
        info = get_worker_info()
        mine = self.parts[info.id::info.num_workers] if info else self.parts
        for part, url in mine:
            yield from self._shard(part, url)

    def _shard(self, part: int, url: str):
        cfg = self.cfg
        skipped, fixed, seen = collections.Counter(), collections.Counter(), set()
        rows, n = [], 0
        try:
            for row, s in enumerate(read_source(url)):
                n = row + 1
                key = s["__key__"]
                if key in seen:
                    skipped["duplicate_key"] += 1
                    continue
                seen.add(key)
                if "__skip__" in s:  # a member over run.max_member_bytes: never read
                    skipped[s["__skip__"]] += 1
                    continue
                img, why = load_rgb(image_bytes(s, cfg.image_exts), cfg.max_pixels, self.image_size, cfg.max_aspect)
                if img is None:
                    skipped[why] += 1
                    continue
                caption, cfix = read_caption(s.get(cfg.caption_ext))
                if cfg.skip_missing_caption and not caption:
                    skipped["no_caption"] += 1
                    continue
                try:
                    pixels = self.preprocess(img)
                except Exception:  # noqa: BLE001 -- a bad image must not stop the shard
                    skipped["corrupt_image"] += 1
                    continue
                meta, jfix = _json(s.get("json"))
                fixed.update(why + cfix + jfix)
                rows.append((pixels, key, caption, str(meta.get("url") or ""), row,
                             {k: meta.get(k) for k in cfg.extra_fields}))
                if len(rows) == cfg.batch_size:
                    yield self._batch(part, rows)
                    rows = []
        except Exception as e:  # noqa: BLE001 -- unopenable/corrupt tar, failed pipe: this shard fails
            yield {"part": part, "error": f"{type(e).__name__}: {e}", "end": True}
            return
        stats = {"samples": n, "skipped": dict(sorted(skipped.items())), "fixed": dict(sorted(fixed.items()))}
        yield self._batch(part, rows, stats)

    def _batch(self, part, rows, stats=None):
        pixels = (torch.stack([r[0] for r in rows]) if rows
                  else torch.empty(0, 3, self.image_size, self.image_size))
        return {"part": part, "pixels": pixels, "key": [r[1] for r in rows],
                "caption": [r[2] for r in rows], "url": [r[3] for r in rows],
                "shard_row": torch.tensor([r[4] for r in rows], dtype=torch.int64),
                "extra": [r[5] for r in rows], "end": stats is not None, "stats": stats, "error": None}


def _json(raw: bytes | None) -> tuple[dict, list[str]]:
    if raw is None:
        return {}, []
    try:
        meta = json.loads(raw)
        return (meta, []) if isinstance(meta, dict) else ({}, ["json_invalid"])
    except (ValueError, UnicodeDecodeError):
        return {}, ["json_invalid"]


def make_loader(parts: list[tuple[int, str]], cfg: EmbedConfig, preprocess, image_size: int,
                pin_memory: bool) -> DataLoader:
    workers = min(cfg.workers, len(parts))
    # batch_size=None: the dataset batches per shard itself; pinned host memory lets the
    # host->GPU copy overlap the previous batch's compute (non_blocking in the encoder).
    return DataLoader(ShardSamples(parts, cfg, preprocess, image_size), batch_size=None,
                      num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=cfg.prefetch_factor if workers else None,
                      worker_init_fn=die_with_parent_fn() if workers else None)


# ---------------------------------------------------------------- the stage

class _Part:
    def __init__(self):
        self.feats = {k: [] for k in KINDS}
        self.cols = {"key": [], "caption": [], "url": [], "shard_row": [], "extra": []}


def _write(out: Path, part: int, url: str, buf: _Part, stats: dict, enc, cfg: EmbedConfig, topl=None,
           width: int | None = None):
    dims = {"img": enc.img_dim, "text": enc.text_dim, "joint": enc.joint_dim}
    emb = {k: (torch.cat(buf.feats[k]).cpu().numpy() if buf.feats[k] else np.zeros((0, dims[k]), np.float32))
           for k in _needed(cfg)}
    c = buf.cols
    cols = {"key": pa.array(c["key"], pa.string()), "caption": pa.array(c["caption"], pa.string()),
            "url": pa.array(c["url"], pa.string()), "shard": pa.array([_as_given(url)] * len(c["key"]), pa.string()),
            "shard_row": pa.array(c["shard_row"], pa.int64())}
    for f in cfg.extra_fields:
        vals = [e[f] for e in c["extra"]]
        try:
            cols[f] = pa.array(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types across samples: keep as JSON text
            cols[f] = pa.array([None if v is None else json.dumps(v) for v in vals], pa.string())
    # the part's record (pipeline/core/provenance.py), in the completion marker itself
    info = {"part": part, **shard_source(url), **source_digests(cfg), "rows": len(c["key"]), **stats}
    if topl is not None:  # labelled from the features as stage 2b reads them: rounded to the store dtype
        labels, sims, bad = label_rows(emb[cfg.assign_kind].astype(cfg.dtype), topl, cfg.assign_block_rows)
        rec = label_record(keys_digest_of(c["key"]), len(c["key"]), centroids_fingerprint(str(cfg.assign_centroids)))
        write_labels(cfg.labels_dir, part, labels, sims, rec)  # before the metadata: complete = labelled
        info["invalid_labels"] = bad
    table = pa.table(cols).replace_schema_metadata({PART_META_KEY: json.dumps(info).encode()})
    write_part(out, part, {k: emb[k] for k in cfg.kinds}, table, dtype=np.dtype(cfg.dtype), width=width)
    return info


def _as_given(url: str) -> str:
    """The shard as a reader elsewhere finds it: a URL or ``pipe:`` as given, a path absolute."""
    return url if is_url(url) else os.path.abspath(url)


def part_digits(out: Path, count: int) -> int | None:
    """The zero-padding of part numbers: clip-retrieval's (``part_width``) for a new store; an
    existing store keeps its own (an unpadded one, written before padding: None), so a resumed
    run never writes a part under a second name."""
    names = fs.ls(out / "metadata")
    digits = [n[len("metadata_"):-len(".parquet")] for n in names
              if n.startswith("metadata_") and n.endswith(".parquet")]
    padded = [d for d in digits if len(d) > 1 and d.startswith("0")]
    if padded:
        return len(padded[0])
    if any(len(d) == 1 for d in digits) and part_width(count) > 1:
        return None
    return part_width(count)


def _needed(cfg: EmbedConfig) -> list[str]:
    """Feature kinds computed per part: the ones written, and the one labelled."""
    return [k for k in KINDS if k in cfg.kinds or (cfg.assign_centroids and k == cfg.assign_kind)]


def _labelled(cfg: EmbedConfig, out: Path, part: int) -> bool:
    """The part's labels exist, fit its metadata, and (where recorded) were made from its keys
    and these centers. Labels without a record predate records: kept (their part is complete)."""
    if not cfg.assign_centroids:
        return True
    lp = labels_path(cfg.labels_dir, part)
    if not fs.isfile(lp):  # written after its sims: present means both are
        return False
    mp = meta_path(out, part)
    try:
        if tuple(load_npy(lp, mmap=True).shape) != (_num_rows(mp), cfg.assign_l):
            return False
        return label_mismatch(read_label_record(cfg.labels_dir, part), keys_digest(mp),
                              centroids_fingerprint(cfg.assign_centroids)) is None
    except (OSError, ValueError):  # unreadable (e.g. cut off by a crash mid-copy): redo it
        return False


def source_digests(cfg: EmbedConfig) -> dict:
    """What a part's rows depend on besides its shard: the encoder config (with the bytes of its
    model_config file; text_batch_size only groups captions) and the decode settings."""
    enc = {k: v for k, v in _plain(cfg.encoder).items() if k != "text_batch_size"}
    if cfg.encoder.model_config:
        enc["model_config"] = Path(cfg.encoder.model_config).read_text()
    return {"encoder_sha256": digest(enc), "reader_sha256": digest({k: getattr(cfg, k) for k in READER_FIELDS})}


def check_parts(out: Path, shards: list[str], cfg: EmbedConfig) -> list[int]:
    """Rank 0, under the folder's lock, before any work: every finished part against its record.
    Another shard at its index (shards inserted, removed or reordered: part numbers would shift
    under clip-retrieval's numbering) or another encoder/decode config is refused in one line
    naming the part and both sources (``run.overwrite=true`` starts over); a part whose own shard
    was rewritten since (size/mtime) is dropped here and embedded again. Returns the dropped parts."""
    _refuse_duplicate_shards(shards, cfg.input)
    folder = out / "metadata"
    done = part_numbers(folder, "metadata_", ".parquet")
    for k in cfg.kinds:
        if fs.isdir(out / f"{k}_emb"):
            part_numbers(out / f"{k}_emb", f"{k}_emb_", ".npy")  # duplicates refused by name
    want, unrecorded, redo = source_digests(cfg), 0, []
    for i in done:
        mp, rec = meta_path(out, i), part_record(meta_path(out, i))
        if i >= len(shards):
            raise StoreError(f"{mp}: part {i} was made from {rec.get('shard', 'a shard')}, but embed.input="
                             f"{cfg.input!r} lists {len(shards)} shards now; pass run.overwrite=true to start over")
        bad = shard_mismatch(rec, shards[i])
        if bad and bad[0] == "other":
            raise StoreError(f"{mp}: part {i} {bad[1]} (embed.input={cfg.input!r} lists another shard at "
                             f"position {i}: the shard list changed); pass run.overwrite=true to start over")
        if not has_source(rec):
            unrecorded += 1
            continue
        for key, what in (("encoder_sha256", "embed.encoder"), ("reader_sha256", "embed.dtype/max_pixels/...")):
            if rec.get(key) != want[key]:
                raise ConfigError(f"{mp}: part {i} was embedded with a different config ({what}: sha256 "
                                  f"{str(rec.get(key))[:12]} recorded, {want[key][:12]} now); pass "
                                  f"run.overwrite=true to start over")
        if bad:  # this shard, rewritten: its part is embedded again (metadata first: incomplete)
            log.warning("%s: part %d %s; embedding it again", mp, i, bad[1])
            fs.rm(mp, missing_ok=False)
            redo.append(i)
    if unrecorded:
        log.warning("%d finished part(s) of %s were written before per-part records (shard size/mtime, "
                    "encoder digest) were kept and are not checked; rerun with run.overwrite=true to "
                    "re-embed them with records", unrecorded, out)
    return redo


def _refuse_duplicate_shards(shards: list[str], spec: str) -> None:
    seen: dict[str, int] = {}
    for i, url in enumerate(shards):
        key = os.path.realpath(url) if os.path.isfile(url) else url
        if key in seen:
            raise ConfigError(f"embed.input={spec!r} lists {url} twice (positions {seen[key]} and {i}): "
                              f"one shard would be stored as two parts")
        seen[key] = i


def start_over(out: Path) -> None:
    """``run.overwrite=true``: removes every part (metadata, the completion markers, first: a
    kill midway leaves incomplete parts, which are redone) and the manifest, under the lock."""
    n = 0
    for folder, prefix, suffix in [("metadata", "metadata_", ".parquet"),
                                   *((f"{k}_emb", f"{k}_emb_", ".npy") for k in KINDS)]:
        for name in fs.ls(out / folder):
            if name.startswith(prefix) and name.endswith(suffix):
                fs.rm(out / folder / name)
                n += folder == "metadata"
    fs.rm(out / "manifest.json")
    if n:
        log.warning("run.overwrite=true: removed the %d parts in %s; embedding every shard again", n, out)


def _label_state(run: RunConfig, cfg: EmbedConfig) -> dict:
    """Rank 0: the label store's state.json (stage 2b's fields). Labels from other centers, l or
    kind are removed, so their parts are redone (embedded again: the labels need the features)."""
    path = Path(cfg.assign_centroids or "")  # unset: '.' is no file, the error below says so
    if not path.is_file():
        raise ConfigError(f"embed.assign_centroids={str(path)!r} does not exist (run clustering.kmeans first)")
    lab = prepare_out_dir(cfg.labels_dir, run, {"run": run, "embed": cfg}, "embed")
    clean_stale_tmp(lab)
    k = int(load_npy(path, mmap=True).shape[0])
    state = {"centroids_sha256": file_sha256(path), "k": k, "l": cfg.assign_l, "kind": cfg.assign_kind,
             "engine": "torch"}
    st_path = lab / "state.json"
    old = read_json(st_path) if fs.isfile(st_path) else None
    settle_label_state(lab, state, old, run.overwrite)
    return state


def part_info(out: Path, part: int) -> dict:
    """A finished part's counts, from its metadata parquet's schema (no data read)."""
    md = read_parquet_schema(meta_path(out, part)).metadata or {}
    if PART_META_KEY in md:
        return json.loads(md[PART_META_KEY])
    return {"part": part, "rows": _num_rows(meta_path(out, part))}


def _num_rows(path: Path) -> int:
    return parquet_rows(path)


def _expected_rows(shards: list[str]) -> int | None:
    """Progress-bar total from img2dataset's ``{stem}_stats.json`` beside local shards, if any."""
    total = 0
    for s in shards:
        p = Path(s).with_name(shard_stem(s) + "_stats.json")
        if is_url(s) or not p.is_file():
            return None
        try:
            total += int(json.loads(p.read_text())["successes"])
        except (ValueError, KeyError, OSError):
            return None
    return total


def _embed_parts(mine: list, shards: list[str], out: Path, cfg: EmbedConfig, run: RunConfig, enc, topl,
                 ctx: DistContext, tracker) -> tuple[list, list, int, collections.Counter]:
    """This rank's shards through the encoder; each part written (atomically) as it ends.
    Returns (failures, written part infos, rows embedded, skipped counts by reason)."""
    needed = _needed(cfg)
    need_text = bool({"text", "joint"} & set(needed))  # labels-only from img features skip the text tower
    failures, written, rows_done = [], [], 0
    skipped = collections.Counter()
    t0 = time.perf_counter()
    if not mine:
        return failures, written, rows_done, skipped
    loader = make_loader(mine, cfg, enc.preprocess, enc.image_size, ctx.device.type == "cuda")
    bar = progress(_expected_rows([u for _, u in mine]), "embed", ctx, share_dir=out)
    width = part_digits(out, len(shards))
    bufs: dict[int, _Part] = {}
    for step, b in enumerate(loader):
        part = b["part"]
        if b["error"]:
            bufs.pop(part, None)
            failures.append({"part": part, "shard": shards[part], "error": b["error"]})
            log.error("shard %s (part %d) failed: %s", shards[part], part, b["error"])
            continue
        buf = bufs.setdefault(part, _Part())
        if b["key"]:
            img = enc.encode_images(b["pixels"])
            feats = {"img": img}
            if need_text:
                feats["text"] = txt = enc.encode_texts(b["caption"])
                feats["joint"] = enc.joint(img, txt)
            for k in needed:  # stays on the device until the part ends: no per-batch sync
                buf.feats[k].append(feats[k])
            for c in ("key", "caption", "url", "extra"):
                buf.cols[c] += b[c]
            buf.cols["shard_row"] += b["shard_row"].tolist()
            rows_done += len(b["key"])
            bar.update(len(b["key"]))
        if b["end"]:
            info = _write(out, part, shards[part], bufs.pop(part), b["stats"], enc, cfg, topl, width)
            written.append(info)
            skipped.update(info["skipped"])
            bar.set(parts=f"{len(written)}/{len(mine)}", skipped=sum(skipped.values()))
        if step % max(run.log_every, 1) == 0 or b["end"]:
            rate = rows_done / max(time.perf_counter() - t0, 1e-9)
            tracker.log({"embed/images_per_s": rate, "embed/images": rows_done,
                         "embed/parts_written": len(written),
                         **{f"embed/skipped/{k}": v for k, v in skipped.items()}}, step=step)
    bar.close()
    return failures, written, rows_done, skipped


def embed(run: RunConfig, cfg: EmbedConfig, ctx: DistContext) -> dict:
    out = Path(cfg.out_dir)
    try:
        shards = expand_input(cfg.input, cfg.files_per_part)
    except ShardPolicyError as e:  # exit 1: the input names something the run may not open
        raise ShardPolicyError(f"embed.input={cfg.input!r}: {e}") from None
    except ShardSpecError as e:
        raise ConfigError(f"embed.input={cfg.input!r}: {e}") from None
    def unfinished() -> list[int]:  # one rank checks the folder and lists the work
        if run.overwrite:  # parts are removed once the centers are checked too (start_over below)
            _refuse_duplicate_shards(shards, cfg.input)
        else:  # before the new config is written: a refused run leaves the folder as it was
            check_parts(out, shards, cfg)
        prepare_out_dir(out, run, {"run": run, "embed": cfg}, "embed")
        for k in [*KINDS, "metadata"]:
            clean_stale_tmp(out / (f"{k}_emb" if k != "metadata" else k))
        if cfg.assign_centroids:
            _label_state(run, cfg)
        return [i for i in range(len(shards))
                if run.overwrite or not (part_complete(out, i, cfg.kinds) and _labelled(cfg, out, i))]

    todo = ctx.agree(unfinished)
    mine = [(i, shards[i]) for i in ctx.shard(todo)]
    log.info("%d shards, %d done, %d to do (%d on this rank) -> %s",
             len(shards), len(shards) - len(todo), len(todo), len(mine), fs.url_of(out))

    torch.manual_seed(run.seed)  # a random-init encoder (pretrained=null) is the same on every rank/rerun
    enc = build_encoder(cfg.encoder, ctx.device)
    topl = None
    if cfg.assign_centroids:  # checked on rank 0 (one line), then loaded by every rank
        dim = {"img": enc.img_dim, "text": enc.text_dim, "joint": enc.joint_dim}[cfg.assign_kind]
        topl = ExactTopL(agreed_centroids(ctx, cfg.assign_centroids, dim, cfg.assign_l, "embed.assign_l"),
                         cfg.assign_l, ctx.device, cfg.assign_block_rows)
    if run.overwrite:  # every input checked: now the old parts go, under the folder's lock
        ctx.agree(lambda: start_over(out))
    tracker = Tracker(run, ctx, str(out), "embed", {"run": _plain(run), "embed": _plain(cfg)})
    t0 = time.perf_counter()
    failures, written, rows_done, skipped = _embed_parts(mine, shards, out, cfg, run, enc, topl, ctx, tracker)
    secs = time.perf_counter() - t0
    rate = rows_done / max(secs, 1e-9)
    log.info("rank %d: %d images in %.1f s (%.1f images/s), %d parts written, skipped %s",
             ctx.rank, rows_done, secs, rate, len(written), dict(skipped))

    # Every rank is past its loop once the gather returns, so all parts are on disk.
    gathered = ctx.all_gather_object({"failures": failures, "rows": rows_done, "secs": secs})
    failures = sorted((f for g in gathered for f in g["failures"]), key=lambda f: f["part"])
    summary = {"rows": sum(g["rows"] for g in gathered), "parts_written": len(todo) - len(failures),
               "images_per_s": sum(g["rows"] for g in gathered) / max(max(g["secs"] for g in gathered), 1e-9),
               "failures": failures}
    if ctx.is_main:
        summary["manifest"] = write_manifest(out, shards, cfg, run, enc, failures)
        if cfg.assign_centroids:
            summary["labels"] = write_label_manifest(out, shards, cfg)
        tracker.log({"embed/total_images_per_s": summary["images_per_s"],
                     **{f"embed/total_skipped/{k}": v for k, v in summary["manifest"]["skipped"].items()}})
    tracker.finish()

    def all_written() -> None:  # all ranks hold the same list; rank 0 reports it (after the manifest)
        if failures:
            lines = "\n".join(f"  part {f['part']}: {f['shard']}: {f['error']}" for f in failures)
            raise EmbedFailed(f"{len(failures)} of {len(shards)} shards failed (rerun to retry them):\n{lines}")
    ctx.agree(all_written)
    return summary


def write_manifest(out: Path, shards: list[str], cfg: EmbedConfig, run: RunConfig, enc, failures) -> dict:
    """Whole-store summary from every finished part's own counts (written by any rank, any run)."""
    parts = [part_info(out, i) for i in range(len(shards))
             if part_complete(out, i, cfg.kinds) and _labelled(cfg, out, i)]
    skipped, fixed = collections.Counter(), collections.Counter()
    for p in parts:
        skipped.update(p.get("skipped", {}))
        fixed.update(p.get("fixed", {}))
    dims = {"img": enc.img_dim, "text": enc.text_dim, "joint": enc.joint_dim}
    manifest = {
        "format": "clip-retrieval", "complete": len(parts) == len(shards),
        "encoder": enc.describe(), "kinds": list(cfg.kinds),
        "dims": {k: dims[k] for k in cfg.kinds}, "dtype": cfg.dtype,
        "num_shards": len(shards), "num_parts": len(parts), "part_digits": part_digits(out, len(shards)), "num_rows": sum(p["rows"] for p in parts),
        "skipped": dict(sorted(skipped.items())), "fixed": dict(sorted(fixed.items())),
        "failed_shards": failures, "parts": parts, "labels_dir": cfg.labels_dir if cfg.assign_centroids else None,
        "config": {"run": _plain(run), "embed": _plain(cfg)},
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def write_label_manifest(out: Path, shards: list[str], cfg: EmbedConfig) -> dict:
    """The label store's manifest (stage 2b's fields), from the label files themselves."""
    lab = Path(cfg.labels_dir)
    parts, invalid = [], 0
    for i in range(len(shards)):
        if part_complete(out, i, cfg.kinds) and _labelled(cfg, out, i):
            labels = load_npy(labels_path(lab, i), mmap=True)
            bad = int((labels[:, 0] < 0).sum())
            invalid += bad
            parts.append({"part": i, "rows": len(labels), "invalid": bad})
    manifest = {"complete": len(parts) == len(shards), **read_json(lab / "state.json"),
                "store": str(out), "centroids": cfg.assign_centroids, "exact": True, "fused": True,
                "rows": sum(p["rows"] for p in parts), "invalid_rows": invalid, "parts": parts}
    atomic_write_json(lab / "manifest.json", manifest)
    return manifest


def _plain(cfg) -> dict:
    import dataclasses
    return dataclasses.asdict(cfg)


def main(config: str | None = None, overrides: Sequence[str] = (), instance: str | None = None) -> dict:
    return stage_main("embed", embed, config, overrides, instance)


if __name__ == "__main__":
    stage_cli("embed")
