"""Image-text shards in img2dataset's layout: ``00000.tar`` (per sample ``{key}.jpg|png``,
``{key}.txt``, ``{key}.json``) beside ``00000.parquet`` and ``00000_stats.json``.

One writer (``ShardWriter``), one way to name inputs (``expand_shards``: the shell/network
policy applied to every spec after expansion) and one tar reader (``read_samples``: members over
``run.max_member_bytes`` skipped from their header) for every stage.
"""
from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path
from typing import IO, Any, Sequence, cast
from urllib.parse import urlparse
from urllib.request import url2pathname

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from braceexpand import braceexpand

from pipeline.core import netpolicy
from pipeline.core.errors import StageError
from pipeline.core.io import atomic_path, atomic_write_json


class ShardSpecError(StageError, ValueError):
    exit_code = 2  # a shard spec that matches nothing is a setting to fix


class ShardPolicyError(ShardSpecError):
    """A spec the run may not open (a shell command, a remote URL, an unknown scheme): refused
    before anything is opened. Exit 1 in every stage: the input names something it must not run."""
    exit_code = 1


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Input shards from a brace pattern (``/data/{00000..04095}.tar``), a list file (``.txt``,
    one shard per line, braces expanded), a directory (its ``*.tar``), or a list of any of those.

    Expansion comes first, then every resulting spec is checked (``check_spec``): an existing
    local path is read as a file; ``pipe:`` (a shell command) and remote URLs are kept only where
    the run allows them; anything else is refused, named with where it came from (the spec, or a
    list file and line number). Nothing is opened or run here."""
    if not isinstance(spec, str):
        return [s for item in spec for s in expand_shards(item)]
    if scheme(spec) in FS_SCHEMES and local_path(spec) is None:
        return _expand_object_store(spec)
    p = Path(spec)
    if p.is_dir():
        shards = sorted(str(x) for x in p.glob("*.tar"))
        if not shards:
            raise ShardSpecError(f"no .tar shards in directory {spec} (an image folder: `mlcd data shards` "
                                 f"converts it)")
        return shards
    if p.suffix == ".txt" and p.is_file():
        # Lines are taken as given (braces expanded): a listed shard that is missing becomes a
        # per-shard failure of the stage reading it, not an error that aborts the whole run.
        lines = [ln.strip() for ln in p.read_text(errors="replace").splitlines()]
        return [check_spec(s, f"{p}:{i + 1}") for i, ln in enumerate(lines)
                if ln and not ln.startswith("#") for s in braceexpand(ln)]
    shards = [check_spec(s, f"shard spec {spec[:120]!r}") for s in braceexpand(spec)]
    missing = [s for s in shards if (lp := local_path(s)) is not None and not os.path.exists(lp)]
    if missing and len(missing) == len(shards):
        raise ShardSpecError(f"shard spec {spec!r} matches no file (first: {missing[0]})")
    return shards


# Object stores read through fsspec (pipeline/core/fs.py): listing, globs, list files, streams.
FS_SCHEMES = frozenset({"s3", "gs", "gcs"})


def _expand_object_store(spec: str) -> list[str]:
    """An object-store spec: a list file (``.txt``), a glob (``*``), a prefix (its ``*.tar``), or
    a brace pattern of objects; checked (run.allow_remote, the bucket) before anything is read."""
    from pipeline.core import fs
    check_spec(spec, f"shard spec {spec[:120]!r}")
    try:
        fs.check(spec, "shard spec")
        if spec.endswith(".txt") and fs.isfile(spec):
            lines = [ln.strip() for ln in fs.read_bytes(spec).decode(errors="replace").splitlines()]
            return [check_spec(s, f"{spec}:{i + 1}") for i, ln in enumerate(lines)
                    if ln and not ln.startswith("#") for s in braceexpand(ln)]
        if "*" in spec or "?" in spec:
            shards = fs.glob(spec)
        elif not spec.endswith(".tar") and "{" not in spec and fs.isdir(spec):
            shards = [fs.join(spec, n) for n in fs.ls(spec) if n.endswith(".tar")]
        else:
            return [check_spec(s, f"shard spec {spec[:120]!r}") for s in braceexpand(spec)]
    except fs.FsError as e:
        raise ShardPolicyError(str(e)) from None
    if not shards:
        raise ShardSpecError(f"shard spec {spec!r} matches no .tar object")
    return shards


# Schemes webdataset's gopen opens itself (plus object stores it reaches through AIS): remote.
REMOTE_SCHEMES = frozenset({"http", "https", "ftp", "ftps", "sftp", "scp", "s3", "gs", "htgs", "ais",
                            "hf", "az", "abfs", "aws", "gcs"})


def scheme(spec: str) -> str:
    """``spec``'s URL scheme, lower-cased (``''`` for a plain path): what gopen would dispatch on.
    ``PIPE:x`` and ``HTTP:/x`` count as ``pipe`` and ``http``."""
    try:
        return urlparse(spec).scheme.lower()
    except ValueError:  # e.g. an unbalanced '[' in a netloc: not a URL we would open
        return "?"


def local_path(spec: str) -> str | None:
    """The file a spec names, or None for a ``pipe:``/URL/unknown-scheme spec. An existing path
    is local whatever it looks like (``http:x`` as a file in the working folder)."""
    if os.path.exists(spec):
        return spec
    sch = scheme(spec)
    if sch == "":
        return spec
    if sch == "file":
        return url2pathname(urlparse(spec).path)
    return None


def is_url(spec: str) -> bool:
    """A ``pipe:`` command or a URL: no local file to look at (webdataset opens it, if allowed)."""
    return local_path(spec) is None


def check_spec(spec: str, where: str) -> str:
    """``spec`` if the run's policy lets it be opened (pipeline/core/netpolicy.py), else one line naming
    it and ``where`` it came from: webdataset runs a ``pipe:`` spec with a shell and fetches
    remote URLs, so a line of a data file must not do either unless the config says so."""
    if local_path(spec) is not None:
        return spec
    sch, shown = scheme(spec), repr(spec[:80])
    if sch == "pipe":
        if not netpolicy.pipe_allowed():
            raise ShardPolicyError(f"{where}: {shown} is a shell command (pipe:); refused unless "
                                 f"run.allow_pipe=true")
    elif sch in REMOTE_SCHEMES:
        if not netpolicy.remote_allowed():
            raise ShardPolicyError(f"{where}: {shown} is a remote URL; refused unless run.allow_remote=true")
    else:
        raise ShardPolicyError(f"{where}: {shown} is neither an existing local path nor a known scheme "
                             f"(pipe:, {', '.join(s + ':' for s in sorted(REMOTE_SCHEMES))}); refused")
    return spec


check_url = check_spec  # the older name


def open_shard(spec: str):
    """A binary stream of one checked spec: a local path (or ``file:``) is opened as a file, never
    through webdataset's scheme dispatch; ``pipe:`` and remote URLs (checked again here: a stage
    may be handed specs from a file on disk) through ``webdataset.gopen``, scheme lower-cased."""
    path = local_path(check_spec(spec, "shard"))
    if path is not None:
        return open(path, "rb")  # noqa: SIM115 -- the caller closes it
    sch = scheme(spec)
    if sch in FS_SCHEMES:  # fsspec's stream, read ahead in blocks; credentials from the standard chain
        from pipeline.core import fs
        return fs.open_read(sch + spec[len(sch):])
    import webdataset as wds
    return wds.gopen(sch + spec[len(sch):])


# ---------------------------------------------------------------- reading samples (every stage)

MAX_MEMBER_BYTES = 64 << 20  # default cap on one tar member (run.max_member_bytes)
MAX_HEADER_BYTES = 1 << 20   # GNU long names / pax headers: tarfile reads these whole
_CAP_ENV = "MLCD_MAX_MEMBER_BYTES"


def set_member_cap(n: int) -> None:
    """The run's cap on one tar member, for this process and its DataLoader workers (inherited
    through the environment, like the network policy); set once per stage by pipeline/core/guard.py."""
    os.environ[_CAP_ENV] = str(int(n))


def member_cap() -> int:
    try:
        return int(os.environ.get(_CAP_ENV, MAX_MEMBER_BYTES))
    except ValueError:
        return MAX_MEMBER_BYTES


def check_member_size(info: tarfile.TarInfo, shard: str, error: type[Exception]) -> None:
    """For readers that index a tar by offset (eval's probe sets): a member over the cap is
    refused by name, from its header, before anything reads it."""
    if info.size > member_cap():
        raise error(f"{shard}: member {info.name!r} is {info.size} bytes, more than "
                    f"run.max_member_bytes={member_cap()}")


_EXT_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                tarfile.SOLARIS_XHDTYPE)
_NO_DATA = (tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE,
            tarfile.FIFOTYPE)  # tarfile reads no data after these whatever their size field says
_ZERO_BLOCK = bytes(512)


def read_samples(url: str, max_member_bytes: int | None = None):
    """Samples of one tar shard, in file order: {"__key__", ext: bytes, ...}; the one tar reader
    of every stage (embed, regions, training). Files are grouped by key like webdataset's
    ``group_by_keys``, except that a repeated extension starts a new sample (so a duplicate key is
    seen and counted, not raised).

    Memory is bounded: a member whose header says it is larger than ``max_member_bytes`` (default:
    the run's ``run.max_member_bytes``) is not read; its sample is yielded with
    ``"__skip__": "member_too_large"`` (still one sample, so row numbers stay those of the tar) and
    its data is read past in 4 MiB pieces. Errors opening/reading propagate, and so does a tar
    that stops early or has an invalid header (``tarfile.ReadError``): a cut-off download must
    not turn into a short part."""
    cap = member_cap() if max_member_bytes is None else max_member_bytes
    raw = open_shard(url)
    try:
        yield from group_members(_members(_Blocks(_decompressed(raw)), cap))
    finally:
        raw.close()  # a pipe: source checks its command's exit status here


def group_members(members):
    """(name, bytes | None) regular tar members in file order -> samples {"__key__", ext: bytes}:
    `read_samples`' grouping rule (webdataset's ``group_by_keys``, but a repeated extension
    starts a new sample; None data, a member over the cap, marks its sample ``__skip__``)."""
    from webdataset.tariterators import base_plus_ext
    cur = None
    for name, data in members:
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        ext = ext.lower()
        if cur is None or key != cur["__key__"] or ext in cur:
            if cur is not None:
                yield cur
            cur = {"__key__": key}
        if data is None:
            cur["__skip__"] = "member_too_large"
        cur[ext] = data
    if cur is not None:
        yield cur


def _members(f: _Blocks, cap: int):
    """(name, bytes | None when over ``cap``) of a tar's regular files, parsing the 512-byte
    headers directly (Python's tarfile costs ~0.25 ms a member in Python-level header handling,
    more than decoding a small JPEG). What tarfile reads: ustar/GNU/pax names (prefix field, GNU
    long names, pax ``path``/``size``, global pax headers), octal and base-256 numbers, both
    checksum conventions. Extended headers over MAX_HEADER_BYTES are refused before being read."""
    glob: dict[str, str] = {}
    pax: dict[str, str] = {}
    longname = None
    while True:
        at, block = f.pos_total, f.take(512)
        if block == _ZERO_BLOCK:
            return f.check_end(at)
        name, typ, size = _header(block, at)
        if typ in _EXT_HEADERS:
            if size > MAX_HEADER_BYTES:
                raise tarfile.ReadError(f"extended header of {size} bytes before {name!r} "
                                        f"(more than {MAX_HEADER_BYTES})")
            body = f.take(size + (-size % 512))[:size]
            if len(body) < size:
                raise tarfile.ReadError(f"truncated tar: extended header at byte {at}")
            if typ == tarfile.GNUTYPE_LONGNAME:
                longname = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif typ in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
                pax.update(_pax(body, at))
            elif typ == tarfile.XGLTYPE:
                glob.update(_pax(body, at))
            continue
        name, size = pax.get("path", longname or name), _pax_size(pax, size, at)
        regular = typ in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE) and not name.endswith("/")
        pax, longname = dict(glob), None
        if not regular and typ in _NO_DATA:
            continue
        padded = size + (-size % 512)
        if not regular or size > cap:
            if not f.skip(padded):
                raise tarfile.ReadError(f"truncated tar: member {name!r} at byte {at}")
            if regular:
                yield name, None
            continue
        data = f.take(padded)
        if len(data) < padded:
            raise tarfile.ReadError(f"truncated tar: member {name!r} at byte {at}")
        yield name, data[:size]


def _header(block: bytes, at: int) -> tuple[str, bytes, int]:
    """(name, type byte, size) of one 512-byte header; ReadError for a short or invalid one."""
    if len(block) < 512:
        raise tarfile.ReadError(f"truncated or corrupt tar: no end-of-archive marker at byte {at}")
    chk = _number(block[148:156], at)
    if chk != 256 + _byte_sum(block) - sum(block[148:156]) and \
            chk != 256 + sum(struct.unpack_from("148b8x356b", block)):
        raise tarfile.ReadError(f"invalid tar header at byte {at} (bad checksum)")
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    typ = block[156:157]
    prefix = block[345:500].split(b"\0", 1)[0]
    if prefix and typ not in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.GNUTYPE_SPARSE):
        name = prefix.decode("utf-8", "surrogateescape") + "/" + name
    size = _number(block[124:136], at)
    if size < 0:
        raise tarfile.ReadError(f"invalid tar header at byte {at} (negative size)")
    return name, typ, size


def _byte_sum(block: bytes) -> int:
    """sum(block) of a 512-byte header, exactly, in C: adler32's low half is 1 + the byte sum
    mod 65521, and a 256-byte half sums to at most 65,280, so it is the sum itself. Python's
    sum() over 512 bytes costs ~5-10 us, and a webdataset sample has ~8 headers (pax ones too)."""
    mv = memoryview(block)
    return (zlib.adler32(mv[:256]) & 0xFFFF) + (zlib.adler32(mv[256:]) & 0xFFFF) - 2


def _number(field: bytes, at: int) -> int:
    """tarfile's ``nti``: NUL/space-terminated octal, or GNU base-256 (first byte 0x80 or 0xff)."""
    if field[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(field[1:], "big")
        return n - (256 ** (len(field) - 1)) if field[0] == 0xFF else n
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise tarfile.ReadError(f"invalid tar header at byte {at} (bad number {field!r})") from None


def _pax_size(pax: dict[str, str], size: int, at: int) -> int:
    try:
        size = int(pax.get("size", size))
    except ValueError:
        raise tarfile.ReadError(f"invalid pax size at byte {at}") from None
    if size < 0:
        raise tarfile.ReadError(f"invalid tar header at byte {at} (negative size)")
    return size


def _pax(body: bytes, at: int) -> dict[str, str]:
    """pax records ``"<len> <key>=<value>\\n"`` -> {key: value} (utf-8, as tarfile decodes them)."""
    out, pos = {}, 0
    while pos < len(body) and body[pos:pos + 1] != b"\0":
        sp = body.find(b" ", pos)
        try:
            n = int(body[pos:sp])
        except ValueError:
            raise tarfile.ReadError(f"invalid pax header at byte {at}") from None
        if sp < 0 or n <= sp - pos:
            raise tarfile.ReadError(f"invalid pax header at byte {at}")
        key, _, value = body[sp + 1:pos + n - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += n
    return out


class _Blocks:
    """A byte stream read in 1 MiB pieces: exact-size ``take``s out of one buffer (no per-member
    read call), ``skip`` in bounded memory, and the end-of-archive check."""
    CHUNK = 1 << 20
    MAX_PAD = 1 << 20  # more trailing bytes than this after the end marker is not padding

    def __init__(self, f):
        self.f, self.buf, self.pos, self.base = f, b"", 0, 0

    @property
    def pos_total(self) -> int:
        return self.base + self.pos

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer only at the end of the stream)."""
        if len(self.buf) - self.pos < n:
            parts, have = [self.buf[self.pos:]], len(self.buf) - self.pos
            while have < n and (c := self.f.read(max(self.CHUNK, n - have))):
                parts.append(c)
                have += len(c)
            self.base += self.pos
            self.buf, self.pos = b"".join(parts), 0
        b = self.buf[self.pos:self.pos + n]
        self.pos += len(b)
        return b

    def skip(self, n: int, chunk: int = 4 << 20) -> bool:
        """Reads past ``n`` bytes, ``chunk`` at a time (a member of zeros that inflates to 1 GiB
        costs seconds and a few chunks of memory); False if the stream ends first."""
        while n > 0:
            if self.pos == len(self.buf):
                self.base += len(self.buf)
                self.buf, self.pos = self.f.read(min(n, chunk)), 0
                if not self.buf:
                    return False
            k = min(n, len(self.buf) - self.pos)
            self.pos, n = self.pos + k, n - k
        return True

    def check_end(self, end: int) -> None:
        """Everything after the zero block at ``end`` must be zeros (padding), at most MAX_PAD."""
        rest = self.buf[self.pos:]
        pad = len(rest)
        while pad <= self.MAX_PAD and not rest.strip(b"\0") and (rest := self.f.read(1 << 16)):
            pad += len(rest)
        if rest.strip(b"\0") or pad > self.MAX_PAD:
            raise tarfile.ReadError(f"truncated or corrupt tar: no end-of-archive marker at byte {end}")


def _decompressed(raw) -> Any:
    """``raw``, or a decompressing reader over it when it starts with a gzip, bzip2 or xz magic
    (the compressions tarfile's ``r|*`` detects)."""
    head = raw.read(6)
    f = _Prefixed(head, raw)
    if head.startswith(b"\x1f\x8b\x08"):
        import gzip
        return gzip.GzipFile(fileobj=cast(IO[bytes], f), mode="rb")
    if head.startswith(b"BZh91"):
        import bz2
        return bz2.BZ2File(cast(IO[bytes], f))
    if head.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")):
        import lzma
        return lzma.LZMAFile(cast(IO[bytes], f))
    return f


class _Prefixed:
    """A stream with bytes already read put back in front."""

    def __init__(self, head: bytes, f):
        self.head, self.f = head, f

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.f.read(n)
        if n is None or n < 0:
            b, self.head = self.head + self.f.read(), b""
            return b
        b, self.head = self.head[:n], self.head[n:]
        return b + self.f.read(n - len(b)) if len(b) < n else b


def shard_stem(url: str) -> str:
    """``/data/00012.tar`` -> ``00012`` (the part id the embedding store uses)."""
    name = url.rstrip("/").split("/")[-1].split(" ")[-1]
    return name[:-4] if name.endswith(".tar") else name


class ShardWriter:
    """Writes one shard atomically: tar + parquet first (as temps), then ``_stats.json``, which
    marks the shard complete. A killed writer leaves no complete-looking partial shard."""

    def __init__(self, folder: str | os.PathLike, shard_id: int):
        self.folder = Path(folder)
        self.stem = f"{shard_id:05d}"
        self.rows: list[dict] = []
        self._tar_ctx = atomic_path(self.folder / f"{self.stem}.tar")
        self._tar_tmp = self._tar_ctx.__enter__()
        self._writer = wds.TarWriter(str(self._tar_tmp))

    @staticmethod
    def is_complete(folder: str | os.PathLike, shard_id: int) -> bool:
        return (Path(folder) / f"{shard_id:05d}_stats.json").exists()

    def write(self, key: str, image_bytes: bytes, ext: str, caption: str, meta: dict) -> None:
        meta = {"key": key, "caption": caption, **meta}
        self._writer.write({"__key__": key, ext: image_bytes, "txt": caption,
                            "json": json.dumps(meta).encode()})
        self.rows.append({**meta, "status": "success", "error_message": None})

    def add_failure(self, key: str, url: str, reason: str, meta: dict | None = None) -> None:
        self.rows.append({"key": key, "url": url, "caption": None, "status": "failed_to_decode",
                          "error_message": reason, **(meta or {})})

    def close(self, extra_stats: dict | None = None) -> dict:
        self._writer.close()
        self._tar_ctx.__exit__(None, None, None)
        ok = [r for r in self.rows if r["status"] == "success"]
        reasons: dict[str, int] = {}
        for r in self.rows:
            if r["status"] != "success":
                reasons[r["error_message"]] = reasons.get(r["error_message"], 0) + 1
        table = pa.Table.from_pylist(self.rows) if self.rows else pa.table({"key": pa.array([], pa.string())})
        with atomic_path(self.folder / f"{self.stem}.parquet") as tmp:
            pq.write_table(table, tmp)
        stats = {"count": len(self.rows), "successes": len(ok), "failed_to_decode": len(self.rows) - len(ok),
                 "status_dict": {"success": len(ok), **reasons}, **(extra_stats or {})}
        atomic_write_json(self.folder / f"{self.stem}_stats.json", stats)
        return stats


def encode_image(img, fmt: str = "jpg", quality: int = 90) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", optimize=False)
    else:
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), fmt


class InlinePool:
    """``ProcessPoolExecutor``'s ``map`` in this process (workers = 1: no pickling, no fork)."""

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def map(self, fn, it, chunksize=1):
        return map(fn, it)
