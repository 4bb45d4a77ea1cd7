"""Region labels (RICE): every region of the region store gets its positive classes.

    python -m clustering.region_labels --config configs/rice_demo.yaml [region_labels.key=value ...]
    torchrun --nproc_per_node N -m clustering.region_labels ...          (ranks split the parts)

RICE (Xie et al., ICCV 2025, arXiv 2507.20025) trains one region cluster-discrimination loss
over a single label space: object regions are positives of their top-l k-means clusters (stage 2
run on the region store, unchanged), OCR regions are positives of the tokens of their text,
placed after the K cluster ids. Here, per part ``i`` of the region store::

    {out_dir}/labels_{i}.npy   int64 N_i x L (L = width), row-aligned with metadata_{i}.parquet
        object rows: their assign labels (top-l cluster ids, nearest first), -1 padded
        ocr rows:    K + j, j = the compact index of each CLIP BPE token of their text (no
                     start/end token, distinct, first max_tokens), -1 padded
                     (compact_tokens=false: j = the CLIP id itself, V = 49,408)
        rows without a usable label (empty text, an object row assign marked invalid): all -1
    {out_dir}/label_space.json  {"clusters": K, "tokens": V, "num_classes": K + V, "tokenizer",
                                 "width": L, "token_ids": [CLIP id of class K + j for j < V],
                                 counts}; written last, so its presence = complete

Compact token space (the default): only the CLIP ids that occur in the store's OCR texts are
classes, sorted by id and remapped to 0..V-1; ``token_ids`` in label_space.json is the mapping back
(training/region_data.py ``LabelSpace`` reads it). At demo scale this is ~hundreds of classes
instead of 49,408, so every token class sees positives and the region PartialFC scores them all.
It costs one more pass over the texts (tokenizing, before any part is written).

The tokenizer is open_clip's CLIP BPE (``SimpleTokenizer``, 49,408 ids), whose vocabulary file
ships inside the package: no network. Inputs are checked before any work (one line naming the
file); each part is written atomically and a part already written with the same inputs and
settings (``state.json``, ``pipeline.core.store.settle_label_state``) is skipped on a rerun. Each part
records what it was made from (``labels_{i}.json``: its metadata's keys digest and the centers'
fingerprint, pipeline/core/provenance.py), written after it; assign's parts whose record names other
keys or centers are refused before any work.
Cost: one pass over the metadata and the assign labels; tokenizing is the bulk (measured ~13k
texts of 1-3 words per second on one core of a loaded 2-core machine, docs/REGIONS_EVAL.md).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core import fs
from pipeline.core.config import RunConfig, check, prepare_out_dir
from pipeline.core.dist import DistContext
from pipeline.core.entry import stage_cli, stage_main
from pipeline.core.io import atomic_save_npy, atomic_write_json, clean_stale_tmp, load_npy, read_json
from pipeline.core.provenance import centroids_fingerprint, keys_digest, label_mismatch, label_record
from pipeline.core.store import (
    StoreError,
    labels_path,
    meta_path,
    parquet_rows,
    part_name,
    part_numbers,
    read_label_record,
    read_parquet,
    read_parquet_schema,
    record_path,
    settle_label_state,
)
from pipeline.core.topl import file_sha256
from pipeline.core.tracking import Timer, progress

log = logging.getLogger("mlcd.region_labels")

KINDS = ("object", "ocr")            # the region store's `kind` values (RICE_SPEC section 2)
COLUMNS = ("key", "kind", "text")    # the metadata columns this stage reads
TOKENIZER = "open_clip.tokenizer.SimpleTokenizer (CLIP BPE)"


@dataclass
class RegionLabelsConfig:
    store: str = "${run.out_dir}/regions/store"                        # region store (stage 1b)
    labels: str = "${run.out_dir}/regions/clusters/labels"             # assign's output on it
    centroids: str = "${run.out_dir}/regions/clusters/centroids.npy"   # K = its rows
    out_dir: str = "${run.out_dir}/regions/labels"
    width: int = 8           # L: label slots per region (object rows use min(l, L) of them)
    max_tokens: int = 8      # tokens kept per OCR text (the first distinct ones; at most width)
    ocr: bool = True         # false: OCR rows get no labels (cluster-only ablation)
    compact_tokens: bool = True  # token classes = only the CLIP ids that occur (label_space.json token_ids)

    def __post_init__(self):
        check(self.width >= 1, "width", self.width, "must be >= 1")
        check(self.max_tokens >= 1, "max_tokens", self.max_tokens, "must be >= 1")


# ------------------------------------------------------------------------------------ labels

class Tokens:
    """CLIP BPE ids of a text: no start/end tokens, distinct in first-seen order, first ``n``."""

    def __init__(self, n: int):
        from open_clip.tokenizer import SimpleTokenizer  # vocab file ships in the package
        self.tok, self.n = SimpleTokenizer(), n
        self.vocab = len(self.tok.encoder)

    def __call__(self, text: str) -> list[int]:
        ids = self.tok.encode(text or "")
        return list(dict.fromkeys(ids))[: self.n]


def label_part(kinds: list[str], texts: list[str], assigned: np.ndarray, k: int, width: int,
               tokens: Tokens | None, remap: dict[int, int] | None = None) -> np.ndarray:
    """int64 (N, width) label rows for one part (module docstring); ``tokens=None``: no OCR labels;
    ``remap``: CLIP id -> compact index (None: the CLIP id is the index)."""
    out = np.full((len(kinds), width), -1, dtype=np.int64)
    kinds_a = np.asarray(kinds, dtype=object)
    obj = kinds_a == "object"
    take = min(assigned.shape[1], width)
    out[obj, :take] = assigned[obj, :take]
    if tokens is not None:
        for r in np.flatnonzero(kinds_a == "ocr"):
            ids = tokens(texts[r])
            if remap is not None:
                ids = [remap[i] for i in ids]
            out[r, :len(ids)] = k + np.asarray(ids, dtype=np.int64)
    return out


def token_vocab(store: str | Path, parts: list[int], tokens: Tokens) -> list[int]:
    """The compact token space: sorted distinct CLIP ids of every OCR text in the store (the same
    ``tokens`` that labels them, so each id a label needs is in it)."""
    ids: set[int] = set()
    for p in parts:
        meta = read_parquet(meta_path(store, p), columns=["kind", "text"])
        for kind, text in zip(meta.column("kind").to_pylist(), meta.column("text").to_pylist()):
            if kind == "ocr":
                ids.update(tokens(text))
    return sorted(ids)


# ------------------------------------------------------------------------------------ inputs

@dataclass
class Inputs:
    parts: list[int]
    names: dict[int, str]   # part -> the store's digits (labels follow them)
    rows: dict[int, int]
    k: int
    state: dict             # what the labels depend on; a change relabels every part
    keys: dict[int, str] = field(default_factory=dict)  # part -> keys digest of its metadata
    centroids_fp: str = ""  # pipeline/core/provenance.py: recorded per written part


def _metadata_parts(store: Path) -> list[int]:
    folder = store / "metadata"
    if not fs.isdir(fs.check(folder, "region_labels.store")):
        raise StoreError(f"region store {store}: no metadata/ folder (run `mlcd regions` first)")
    parts = part_numbers(folder, "metadata_", ".parquet")  # two files of one part: refused by name
    if not parts:
        raise StoreError(f"region store {store}: no metadata parts in {folder}")
    return parts


def _centroid_rows(path: Path) -> int:
    if not fs.isfile(fs.check(path, "region_labels.centroids")):
        raise StoreError(f"centroids file {path} does not exist (run `mlcd cluster` on the region store)")
    try:
        c = load_npy(path, mmap=True)  # reads the header only
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable ({e})") from None
    if c.ndim != 2 or c.shape[0] < 1:
        raise StoreError(f"{path}: expected K x D centroids, got shape {c.shape}")
    return int(c.shape[0])


def _file_id(p: Path) -> str:
    return f"{p.name}:{fs.size(p)}:{fs.mtime_ns(p)}"  # an object: its size and upload time


def check_part(store: Path, labels: Path, part: int, k: int, values: bool) -> tuple[str, int]:
    """(part digits, rows): metadata columns, labels present and row-aligned, ids in [-1, K)
    (``values``: scan the ids too). One line naming the file otherwise."""
    mp = meta_path(store, part)
    names = read_parquet_schema(mp).names
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise StoreError(f"{mp}: missing column(s) {missing} (has: {', '.join(names[:10])})")
    rows = parquet_rows(mp)
    digits = part_name(store, part)
    lp = labels_path(labels, digits)
    if not fs.isfile(lp):
        raise StoreError(f"missing labels {lp} for {mp} (run `mlcd assign` on the region store)")
    try:
        lab = load_npy(lp, mmap=True)
    except (OSError, ValueError) as e:
        raise StoreError(f"{lp}: unreadable ({e})") from None
    if lab.ndim != 2 or lab.shape[0] != rows:
        raise StoreError(f"{lp}: shape {lab.shape} is not row-aligned with {mp} ({rows} rows)")
    if values and lab.size and (int(lab.max()) >= k or int(lab.min()) < -1):
        raise StoreError(f"{lp}: label ids in [{int(lab.min())}, {int(lab.max())}] outside [-1, K={k}) "
                         f"(K = rows of the centroids file)")
    return digits, rows


def check_inputs(cfg: RegionLabelsConfig) -> Inputs:
    """Everything this stage reads, checked before any work (rank 0, through ``ctx.agree``)."""
    store, labels, cpath = Path(cfg.store), Path(cfg.labels), Path(cfg.centroids)
    parts = _metadata_parts(store)
    k = _centroid_rows(cpath)
    if not fs.isdir(fs.check(labels, "region_labels.labels")):
        raise StoreError(f"label store {labels} does not exist (run `mlcd assign` on the region store)")
    st_path = labels / "state.json"
    assign_state = read_json(st_path) if fs.isfile(st_path) else {}
    if assign_state.get("k") not in (None, k):
        raise StoreError(f"{st_path}: labels were assigned with k={assign_state['k']} centers, "
                         f"{cpath} has {k}")
    names, rows, ids = {}, {}, []
    for p in parts:
        names[p], rows[p] = check_part(store, labels, p, k, values=True)
        ids += [_file_id(meta_path(store, p)), _file_id(labels_path(labels, names[p]))]
    keys, cfp = check_records(store, labels, names, cpath)
    sha = assign_state.get("centroids_sha256") or file_sha256(cpath)
    state = {"k": k, "centroids_sha256": sha, "width": cfg.width, "max_tokens": cfg.max_tokens,
             "ocr": cfg.ocr, "compact_tokens": cfg.compact_tokens, "tokenizer": TOKENIZER, "inputs": ids}
    return Inputs(parts, names, rows, k, state, keys, cfp)


def check_records(store: Path, labels: Path, names: dict[int, str], cpath: Path) -> tuple[dict, str]:
    """(keys digest per part, the centers' fingerprint); assign's label parts whose record says
    they were made from other metadata keys or other centers are refused in one line naming both
    files. Parts without a record (assigned before records were kept) are warned about once."""
    cfp, keys, unrecorded = centroids_fingerprint(cpath), {}, 0
    for p, digits in names.items():
        mp = meta_path(store, p)
        keys[p] = keys_digest(mp)
        rec = read_label_record(labels, digits)
        unrecorded += rec is None
        why = label_mismatch(rec, keys[p], cfp)
        if why:
            raise StoreError(f"{labels_path(labels, digits)} does not label {mp} (region_labels.centroids="
                             f"{cpath}): {why}")
    if unrecorded:
        log.warning("%d label part(s) in %s have no record of what they were made from (assigned before "
                    "records were kept): rerun `mlcd assign` on the region store to refresh them",
                    unrecorded, labels)
    return keys, cfp


# ------------------------------------------------------------------------------------ stage

def part_done(out: Path, digits: str, rows: int, width: int, keys: str | None = None) -> bool:
    """Written with this shape and (given ``keys``, the digest of its metadata's keys) recorded as
    made from those keys: the record is written last, so without it the part is redone."""
    lp = labels_path(out, digits)
    if not fs.isfile(lp):
        return False
    try:
        a = load_npy(lp, mmap=True)
        if not (a.dtype == np.int64 and tuple(a.shape) == (rows, width)):
            return False
    except (OSError, ValueError):  # unreadable (truncated by a crash mid-copy): redo it
        return False
    if keys is None:
        return True
    rec = read_label_record(out, digits)
    return rec is not None and label_mismatch(rec, keys, None) is None


def settle(out: Path, inp: Inputs, overwrite: bool) -> None:
    """Rank 0: parts on disk are kept only if they came from these exact inputs and settings;
    label_space.json (the completion marker) is dropped until every part is written again."""
    clean_stale_tmp(out)
    st = out / "state.json"
    old = read_json(st) if fs.isfile(st) else None
    settle_label_state(out, inp.state, old, overwrite)
    if not all(part_done(out, inp.names[p], inp.rows[p], inp.state["width"], inp.keys.get(p)) for p in inp.parts):
        fs.rm(out / "label_space.json")


def run_region_labels(run: RunConfig, cfg: RegionLabelsConfig, ctx: DistContext) -> dict:
    timer = Timer()
    inp = ctx.agree(lambda: check_inputs(cfg))
    out = ctx.agree(lambda: prepare_out_dir(cfg.out_dir, run, {"run": run, "region_labels": cfg},
                                            "region_labels"))
    ctx.agree(lambda: settle(out, inp, run.overwrite))
    mine = ctx.shard(inp.parts)
    todo = [p for p in mine if not part_done(out, inp.names[p], inp.rows[p], cfg.width, inp.keys[p])]
    if len(todo) < len(mine):
        log.info("resuming: %d of this rank's %d parts already labeled", len(mine) - len(todo), len(mine))
    tokens = Tokens(min(cfg.max_tokens, cfg.width)) if cfg.ocr else None
    # every rank needs the whole vocabulary (its parts' labels index into it); rank 0 reads it once
    vocab = ctx.agree(lambda: token_vocab(cfg.store, inp.parts, tokens)) if (tokens is not None and cfg.compact_tokens) else None
    remap = {t: j for j, t in enumerate(vocab)} if vocab is not None else None
    bar = progress(sum(inp.rows[p] for p in mine), "region-labels", ctx, unit="region",
                   initial=sum(inp.rows[p] for p in mine if p not in todo))
    for p in todo:
        meta = read_parquet(meta_path(cfg.store, p), columns=["kind", "text"])
        kinds, texts = meta.column("kind").to_pylist(), meta.column("text").to_pylist()
        bad = sorted({str(x) for x in kinds} - set(KINDS))
        if bad:
            raise StoreError(f"{meta_path(cfg.store, p)}: unknown region kind(s) {bad[:3]} (known: {KINDS})")
        assigned = load_npy(labels_path(cfg.labels, inp.names[p]))
        fs.rm(record_path(out, inp.names[p]))
        atomic_save_npy(labels_path(out, inp.names[p]),
                        label_part(kinds, texts, assigned, inp.k, cfg.width, tokens, remap))
        atomic_write_json(record_path(out, inp.names[p]),  # last: the part is done with its record
                          label_record(inp.keys[p], len(kinds), inp.centroids_fp))
        bar.update(len(kinds))
    bar.close()
    ctx.barrier()
    space = ctx.agree(lambda: write_label_space(out, cfg, inp, timer.elapsed(), vocab))
    return space


def write_label_space(out: Path, cfg: RegionLabelsConfig, inp: Inputs, wall_s: float,
                      vocab: list[int] | None = None) -> dict:
    """Counted from the written files (right after any number of resumes); written last."""
    counts = {"regions": 0, "object": 0, "ocr": 0, "object_labeled": 0, "ocr_labeled": 0,
              "unlabeled": 0, "token_labels": 0}
    for p in inp.parts:
        lab = load_npy(labels_path(out, inp.names[p]), mmap=True)
        kinds = np.asarray(read_parquet(meta_path(cfg.store, p), columns=["kind"]).column("kind")
                           .to_pylist(), dtype=object)
        has = lab[:, 0] >= 0
        for kind in KINDS:
            counts[kind] += int((kinds == kind).sum())
            counts[f"{kind}_labeled"] += int((has & (kinds == kind)).sum())
        counts["regions"] += len(kinds)
        counts["unlabeled"] += int((~has).sum())
        counts["token_labels"] += int((lab >= inp.k).sum())
    # no OCR labels: the space is the clusters alone; compact: the occurring ids only
    v = (len(vocab) if vocab is not None else Tokens(1).vocab) if cfg.ocr else 0
    space = {"clusters": inp.k, "tokens": v, "num_classes": inp.k + v, "tokenizer": TOKENIZER,
             **({"token_ids": vocab} if vocab is not None else {}),
             "width": cfg.width, "max_tokens": cfg.max_tokens, "ocr": cfg.ocr, "counts": counts,
             "parts": len(inp.parts), "store": str(cfg.store), "labels": str(cfg.labels),
             "centroids": str(cfg.centroids), "wall_s": round(wall_s, 2)}
    atomic_write_json(out / "label_space.json", space)
    log.info("region labels for %d regions (%d object, %d ocr, %d unlabeled) -> %s; %d classes",
             counts["regions"], counts["object"], counts["ocr"], counts["unlabeled"], fs.url_of(out),
             space["num_classes"])
    return space


def main(config: str | None = None, overrides: Sequence[str] = (), instance: str | None = None) -> dict:
    return stage_main("region-labels", run_region_labels, config, overrides, instance)


if __name__ == "__main__":
    stage_cli("region-labels")
