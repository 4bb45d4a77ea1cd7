"""Inputs beyond webdataset: an image folder or a list of image files, read like shards.

A source (``embed.input``, an eval dataset, ``mlcd data shards SRC``) is one of
- webdataset shards (``pipeline/core/shards.py``: brace pattern, ``.txt`` list of shards, a folder
  holding ``*.tar``, ``pipe:``/URL where allowed);
- an image folder (no ``*.tar`` in it): every image file below it, recursively, in sorted order.
  When the images sit in sub-folders only (ImageNet / torchvision ``ImageFolder`` layout), the
  sorted top-level sub-folder names are the classes and each image's ``cls`` is its folder's
  index. A ``NAME.txt`` beside ``NAME.jpg`` is its caption (clip-retrieval's ``files`` layout);
- a list file of images already on disk: ``.txt`` (one path per line, its first line an image
  name; a ``.txt`` of ``.tar`` names stays a shard list), ``.csv`` or ``.parquet`` with a path
  column (``path``, ``filepath``, ``image_path``, ``file``, ``image``, or ``url`` naming a local
  file) and optional ``caption``/``text``, ``key``, ``cls``/``label`` columns. Relative paths are
  relative to the list file's folder.

Stages that read parts (embed) cut a file source into virtual parts of ``per_part`` files in that
order: part ``i`` is the spec ``files:SRC#START:STOP@DIGEST`` (DIGEST: sha256 of the part's relative
paths, so a part at an index always names the same files, and adding or removing files shows as
"another shard at this position", refused like a changed shard list). ``read_source(spec)`` yields
the records ``read_samples`` gives (``__key__``, image bytes under its extension, ``txt``,
``json`` with ``url``/``path``/``cls``), so resume-by-part, skip counts and provenance work
unchanged; ``source_stat`` gives a part's total size and newest mtime for its provenance record
(``pipeline/core/provenance.py``), so an edited image re-embeds its part. Listing costs one
directory walk per process (cached); a part's stat is one ``stat`` per file.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.images import IMAGE_EXTS
from pipeline.core.shards import ShardSpecError, expand_shards, member_cap, read_samples

PREFIX = "files:"
FILES_PER_PART = 10_000  # clip-retrieval's default write_batch_size
PATH_COLUMNS = ("path", "filepath", "image_path", "file", "image", "url")
CAPTION_COLUMNS = ("caption", "text", "txt")
CLASS_COLUMNS = ("cls", "label")


class SourceError(ShardSpecError):
    """A folder/list that cannot be used as input (no images, no path column): exit 2."""


@dataclass(frozen=True)
class FileItem:
    path: str             # absolute path of the image file
    key: str              # sample key: relative path without extension (or the list's key column)
    caption: str | None   # from the list, or None: read NAME.txt beside the image if present
    cls: int | None       # class index (class sub-folders or a cls/label column)


@dataclass(frozen=True)
class Listing:
    source: str
    items: tuple[FileItem, ...]
    classes: tuple[str, ...]  # class names (folder names), () when none


def _ext(name: str) -> str:
    return name.rpartition(".")[2].lower() if "." in name.rpartition("/")[2] else ""


def _is_image(name: str) -> bool:
    return _ext(name) in IMAGE_EXTS


def is_file_source(spec: str | Sequence[str]) -> bool:
    """An image folder or an image list file (not webdataset shards)."""
    if not isinstance(spec, str):
        return False
    p = Path(spec)
    if p.is_dir():
        return not any(p.glob("*.tar"))
    if p.is_file() and p.suffix.lower() in (".csv", ".parquet"):
        return True
    if p.is_file() and p.suffix.lower() == ".txt":
        first = next((ln.strip() for ln in p.read_text(errors="replace").splitlines()
                      if ln.strip() and not ln.startswith("#")), "")
        return _is_image(first)
    return False


@functools.lru_cache(maxsize=8)
def list_files(spec: str) -> Listing:
    """Every image of a folder / list file, in a fixed order (sorted paths; a list's own order)."""
    p = Path(spec)
    listing = _folder(p) if p.is_dir() else _list_file(p)
    if not listing.items:
        raise SourceError(f"{spec}: no .tar shards and no image files ({', '.join(IMAGE_EXTS)})")
    keys = [it.key for it in listing.items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise SourceError(f"{spec}: sample key {dup!r} appears twice (keys must be unique)")
    return listing


def _folder(root: Path) -> Listing:
    files = sorted(os.path.relpath(os.path.join(d, f), root)
                   for d, _, names in os.walk(root, followlinks=False) for f in names if _is_image(f))
    files = [f.replace(os.sep, "/") for f in files]
    top_level = [f for f in files if "/" not in f]
    classes = () if top_level else tuple(sorted({f.split("/", 1)[0] for f in files}))
    index = {c: i for i, c in enumerate(classes)}
    items = tuple(FileItem(str(root / f), f.rpartition(".")[0], None,
                           index[f.split("/", 1)[0]] if classes else None) for f in files)
    return Listing(str(root), items, classes)


def _list_file(p: Path) -> Listing:
    suffix = p.suffix.lower()
    if suffix == ".txt":
        rows = [{"path": ln.strip()} for ln in p.read_text(errors="replace").splitlines()
                if ln.strip() and not ln.startswith("#")]
        cols = ["path"]
    elif suffix == ".csv":
        with open(p, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            rows, cols = list(reader), list(reader.fieldnames or [])
    elif suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(p)
        rows, cols = table.to_pylist(), table.column_names
    else:
        raise SourceError(f"{p}: not an image folder or a .txt/.csv/.parquet list")
    pcol = next((c for c in PATH_COLUMNS if c in cols), None)
    if pcol is None:
        raise SourceError(f"{p}: no path column (one of {', '.join(PATH_COLUMNS)}; columns: {cols[:8]})")
    ccol = next((c for c in CAPTION_COLUMNS if c in cols), None)
    kcol = "key" if "key" in cols else None
    lcol = next((c for c in CLASS_COLUMNS if c in cols), None)
    items = []
    for i, r in enumerate(rows):
        raw = str(r[pcol] or "")
        path = raw if os.path.isabs(raw) else str(p.parent / raw)
        key = str(r[kcol]) if kcol and r.get(kcol) not in (None, "") else f"{i:09d}"
        label = r.get(lcol) if lcol else None
        try:
            cls = int(label) if label not in (None, "") else None
        except ValueError:
            raise SourceError(f"{p}: row {i + 1}: {lcol}={label!r} is not an integer class") from None
        items.append(FileItem(path, key, None if ccol is None else str(r[ccol] or ""), cls))
    return Listing(str(p), tuple(items), ())


# ---------------------------------------------------------------- virtual parts (embed)

def _digest(items: Sequence[FileItem]) -> str:
    return hashlib.sha256("\n".join(f"{it.key}\t{it.path}" for it in items).encode()).hexdigest()[:16]


def expand_input(spec: str | Sequence[str], per_part: int = FILES_PER_PART) -> list[str]:
    """The parts of an input: webdataset shards as ``expand_shards`` gives them, or the virtual
    parts of an image folder / list file (``files:SRC#START:STOP@DIGEST``)."""
    if not is_file_source(spec):
        return expand_shards(spec)
    src = os.path.abspath(str(spec))
    list_files.cache_clear()  # a new run lists the source again (workers forked later reuse it)
    items = list_files(src).items
    return [f"{PREFIX}{src}#{lo}:{min(lo + per_part, len(items))}@{_digest(items[lo:lo + per_part])}"
            for lo in range(0, len(items), per_part)]


def is_virtual(spec: str) -> bool:
    return spec.startswith(PREFIX)


def part_items(spec: str) -> list[FileItem]:
    """The files of a virtual part; refused if the source no longer lists the same files there."""
    src, _, rest = spec[len(PREFIX):].rpartition("#")
    span, _, want = rest.partition("@")
    lo, hi = (int(x) for x in span.split(":"))
    items = list(list_files(src).items[lo:hi])
    if _digest(items) != want:
        raise SourceError(f"{src}: files {lo}..{hi} differ from when the input was listed "
                          f"(files added/removed meanwhile); rerun to list it again")
    return items


def source_stat(spec: str) -> dict:
    """A virtual part's provenance: total bytes and newest mtime of its files (missing: 0)."""
    size, mtime = 0, 0
    for it in part_items(spec):
        try:
            st = os.stat(it.path)
        except OSError:
            continue
        size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
    return {"shard_size": size, "shard_mtime_ns": mtime}


def read_source(spec: str) -> Iterator[dict]:
    """Samples of one part: a tar shard through ``read_samples``, a virtual part from its files.
    A missing file is yielded as ``__skip__: file_missing``, a file over ``run.max_member_bytes``
    as ``member_too_large`` (not read), so rows keep their positions and skips are counted."""
    if not is_virtual(spec):
        yield from read_samples(spec)
        return
    cap = member_cap()
    for it in part_items(spec):
        yield file_sample(it, cap)


def file_sample(it: FileItem, cap: int | None = None) -> dict:
    """One file as a webdataset-style sample: {__key__, ext: bytes, txt?, json}."""
    cap = member_cap() if cap is None else cap
    meta: dict = {"url": it.path, "path": it.path}
    if it.cls is not None:
        meta["cls"] = it.cls
    s: dict = {"__key__": it.key, "json": json.dumps(meta).encode()}
    try:
        size = os.path.getsize(it.path)
    except OSError:
        s["__skip__"] = "file_missing"
        return s
    if size > cap:
        s["__skip__"] = "member_too_large"
        return s
    with open(it.path, "rb") as f:
        ext = _ext(it.path)  # an unknown extension is read as an image all the same
        s[ext if ext in IMAGE_EXTS else "jpg"] = f.read()
    if it.caption is not None:
        s["txt"] = it.caption.encode()
    else:
        side = Path(it.path).with_suffix(".txt")
        if side.is_file():
            s["txt"] = side.read_bytes()
    return s
