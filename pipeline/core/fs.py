"""The one data-access layer: a local path, ``file://`` URL or object-store URL (``s3://``,
``gs://``, any scheme fsspec knows) -> read, list, write with the right commit rule.

API (stable; every stage reads and writes data through it or through ``io``/``store`` on top):

- ``is_remote(url)`` / ``local(url)``: an object-store URL, or the local path a plain path or
  ``file://`` URL names (``None`` for a remote one). ``join(base, *names)`` builds a child of either.
- ``check(url, what, write=False)``: before any work, one ``FsError`` line naming the URL and what
  failed: an unknown scheme, a backend that is not installed, remote access the run does not
  allow (``run.allow_remote``, ``pipeline/core/netpolicy.py``), a missing bucket, a wrong endpoint,
  denied credentials (the bucket is probed once per process). Local paths pass unchanged.
- ``exists``, ``isfile``, ``isdir``, ``size``, ``mtime_ns``, ``ls(url) -> sorted child names``,
  ``glob(pattern) -> sorted URLs``, ``open_read(url)`` (a binary stream), ``read_bytes``.
- ``write_bytes(url, data)`` / ``put_file(local_path, url)``: the object-store writers (a local
  path is refused: ``pipeline/core/io.py``'s ``atomic_*`` write any path, local ones by temp file
  + fsync + rename with the umask's mode, URLs through these). Object store: one upload under the
  final name (S3 shows an object only once its PUT or multipart upload has
  completed, so a reader never sees half of one). A multi-file part is "done" only once its marker
  (the store's metadata file, a label part's record) exists, written last; a killed run resumes
  by redoing the parts without a marker.
- ``makedirs`` (a no-op on object stores: prefixes need no folder, and a missing bucket is an
  error, never created), ``rm(url)``, ``rmtree(url)``.
- Transient errors (dropped connections, timeouts, throttling) are retried ``ATTEMPTS`` times with
  exponential backoff; ``RETRIES`` counts them per operation (logged once per retry, no data lost:
  a retried write rewrites the whole object).

Credentials come from each backend's standard chain (S3: ``AWS_ACCESS_KEY_ID``/``_SECRET_...``,
``AWS_PROFILE``, ``~/.aws/``, instance roles; GCS: ``GOOGLE_APPLICATION_CREDENTIALS``, gcloud).
None are taken from configs, and none are logged or written: errors name the URL and the failure
class only. The S3 endpoint is botocore's standard ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) variable: MinIO, Ceph or a local test server need nothing else.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import re
import time
from pathlib import Path
from typing import IO, Any, Callable, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

from pipeline.core import netpolicy
from pipeline.core.errors import InputError

log = logging.getLogger("mlcd.fs")

ATTEMPTS = 5          # tries of one operation before a transient error is final
BACKOFF_S = 0.5       # first wait; doubles per try (0.5 + 1 + 2 + 4 s at most: 7.5 s per operation)
RETRIES: collections.Counter[str] = collections.Counter()  # operation -> retries taken

T = TypeVar("T")


class FsError(InputError):
    """A URL that cannot be reached or used: one line naming it and what failed (exit 1)."""


def _scheme(url: str) -> str:
    try:
        return urlparse(str(url)).scheme.lower()
    except ValueError:
        return "?"


_PATHLIB = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")  # s3:/b/k: a URL pathlib joined


def url_of(url: str | os.PathLike) -> str:
    """``url`` as a string, with ``//`` restored where ``pathlib.Path`` collapsed it
    (``Path("s3://b") / "k"`` is ``s3:/b/k``), so store code may join parts with ``/``."""
    s = str(url)
    m = _PATHLIB.match(s)
    if m and m.group(1).lower() != "file" and not os.path.exists(s):
        return f"{m.group(1)}://{s[m.end():]}"
    return s


def local(url: str | os.PathLike) -> str | None:
    """The local path ``url`` names (a plain path, or a ``file://`` URL), else ``None``."""
    url = url_of(url)
    sch = _scheme(url)
    if sch == "" or os.path.exists(url) or len(sch) == 1:  # len 1: a Windows drive letter
        return url
    if sch == "file":
        return url2pathname(urlparse(url).path)
    return None


def is_remote(url: str | os.PathLike) -> bool:
    return local(url) is None


def join(base: str | os.PathLike, *names: str) -> str:
    """``base/names...`` for a local path or a URL (a URL keeps its scheme and uses ``/``)."""
    if not is_remote(base):
        return str(Path(str(base), *names))
    return "/".join([url_of(base).rstrip("/"), *(n.strip("/") for n in names)])


_BUSY = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, 121}  # 121: EREMOTEIO (5xx)


def _transient(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if isinstance(e, OSError) and e.errno in _BUSY:  # s3fs: SlowDown/503, InternalError/500
        return True
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                         "ClientPayloadError", "ServerDisconnectedError", "ClientOSError",
                         "ResponseStreamingError", "IncompleteReadError"})


def _describe(url: str, op: str, e: BaseException) -> str:
    """The failure without anything from the credential chain: only its class and the URL."""
    if isinstance(e, PermissionError):
        return (f"{url}: {op} denied (check the credentials the backend's standard chain found: "
                f"env, ~/.aws or gcloud config, instance role)")
    if isinstance(e, FileNotFoundError):
        return f"{url}: {op}: not found ({str(e)[:120]})"
    if _transient(e):
        return (f"{url}: {op}: cannot reach the endpoint after {ATTEMPTS} tries "
                f"({type(e).__name__}; check AWS_ENDPOINT_URL / network)")
    return f"{url}: {op} failed ({type(e).__name__}: {str(e)[:160]})"


def _retry(op: str, url: str, fn: Callable[[], T], attempts: int | None = None) -> T:
    attempts = attempts or ATTEMPTS
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if not _transient(e) or i == attempts - 1:
                raise
            RETRIES[op] += 1
            log.warning("%s %s: %s, retry %d/%d", op, url, type(e).__name__, i + 1, attempts - 1)
            time.sleep(BACKOFF_S * 2 ** i)
    raise AssertionError("unreachable")


# Listings are never cached (other processes write: ranks, a resumed run). s3fs and botocore
# retry nothing themselves, so every retry is ``_retry``'s, with its backoff, and counted.
_OPTIONS = {"s3": {"use_listings_cache": False,
                   "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}}


def _filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a remote URL; one line if the scheme is unknown
    or its backend is not installed."""
    import fsspec
    sch = _scheme(url)
    try:
        fs = fsspec.filesystem(sch, **_OPTIONS.get(sch, {}))
    except ValueError:
        raise FsError(f"{url}: unknown scheme {sch}:// (known: s3, gs, file, plain paths, and "
                      f"what fsspec lists)") from None
    except ImportError as e:
        raise FsError(f"{url}: {sch}:// needs its fsspec backend installed ({e})") from None
    if sch in ("s3", "s3a"):
        fs.retries = 1  # s3fs's own loop (a class attribute, no constructor argument)
    return fs, fs._strip_protocol(url)


def _call(op: str, url: str, fn: Callable[[Any, str], T]) -> T:
    fs, path = _filesystem(url)
    try:
        return _retry(op, url, lambda: fn(fs, path))
    except (FsError, InputError):
        raise
    except (OSError, ConnectionError, TimeoutError) as e:
        if isinstance(e, FileNotFoundError) and op in ("read", "size"):
            raise
        raise FsError(_describe(url, op, e)) from None
    except Exception as e:
        if _transient(e):
            raise FsError(_describe(url, op, e)) from None
        raise


_CHECKED: set[str] = set()


def check(url: str | os.PathLike, what: str = "path", write: bool = False) -> str:
    """``url`` if this run may use it and its bucket answers; else one ``FsError`` line."""
    url = url_of(url)
    if not is_remote(url):
        return url
    if not netpolicy.remote_allowed():
        raise FsError(f"{what} {url}: a remote URL; refused unless run.allow_remote=true")
    fs, path = _filesystem(url)
    bucket = path.split("/", 1)[0]
    key = f"{_scheme(url)}://{bucket}"
    if key in _CHECKED:
        return url
    try:
        # info (S3: HEAD bucket), not exists: s3fs answers exists() False for a denied bucket
        # or a dead endpoint
        _retry("probe", url, lambda: fs.info(bucket), attempts=3)
    except FileNotFoundError:
        raise FsError(f"{what} {url}: bucket {bucket!r} does not exist (buckets are never "
                      f"created by a stage)") from None
    except Exception as e:
        raise FsError(f"{what} {_describe(url, 'access', e)}") from None
    _CHECKED.add(key)
    return url


# ---------------------------------------------------------------- reading

def _query(op: str, url: str | os.PathLike, on_disk: Callable[[str], Any], remote: Callable[[Any, str], Any]):
    """``on_disk(path)`` for a local path or ``file://`` URL, else ``remote(filesystem, path)``
    with the retries and counting of ``_call``."""
    p = local(url)
    return on_disk(p) if p is not None else _call(op, url_of(url), remote)


def exists(url: str | os.PathLike) -> bool:
    return bool(_query("exists", url, os.path.exists, lambda fs, path: fs.exists(path)))


def isfile(url: str | os.PathLike) -> bool:
    return bool(_query("isfile", url, os.path.isfile, lambda fs, path: fs.isfile(path)))


def isdir(url: str | os.PathLike) -> bool:
    """A local folder, or a prefix with at least one object below it (object stores have no
    empty folders)."""
    return bool(_query("isdir", url, os.path.isdir, lambda fs, path: fs.isdir(path)))


def size(url: str | os.PathLike) -> int:
    return int(_query("size", url, os.path.getsize, lambda fs, path: fs.size(path)))


def mtime_ns(url: str | os.PathLike) -> int:
    """When the file was last written (an object: its upload time, as the store reports it)."""
    p = local(url)
    if p is not None:
        return os.stat(p).st_mtime_ns
    info = _call("size", url_of(url), lambda fs, path: fs.info(path))  # "size": a missing file raises FileNotFoundError
    t = info.get("LastModified") or info.get("mtime") or info.get("updated")
    if hasattr(t, "timestamp"):
        return int(t.timestamp() * 1e9)
    if isinstance(t, str):  # an ISO time stamp
        from datetime import datetime
        return int(datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() * 1e9)
    return int(float(t or 0) * 1e9)


def ls(url: str | os.PathLike) -> list[str]:
    """Sorted names (not paths) of the entries directly in a folder/prefix; ``[]`` if none."""
    p = local(url)
    if p is not None:
        return sorted(os.listdir(p)) if os.path.isdir(p) else []

    def names(fs, path):
        try:
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False))
        except FileNotFoundError:
            return []
    return _call("list", url_of(url), names)


def glob(pattern: str) -> list[str]:
    """Sorted paths/URLs matching a ``*``/``?`` pattern (URLs keep their scheme)."""
    pattern = url_of(pattern)
    p = local(pattern)
    if p is not None:
        import glob as _glob
        return sorted(_glob.glob(p))
    sch = _scheme(pattern)
    return _call("list", pattern, lambda fs, path: sorted(f"{sch}://{m}" for m in fs.glob(path)))


def open_read(url: str | os.PathLike) -> IO[bytes]:
    """A binary stream (the caller closes it); object stores read ahead in blocks."""
    p = local(url)
    if p is not None:
        return open(p, "rb")  # noqa: SIM115 -- the caller closes it
    return _call("read", url_of(url), lambda fs, path: fs.open(path, "rb"))


def read_bytes(url: str | os.PathLike) -> bytes:
    p = local(url)
    if p is not None:
        return Path(p).read_bytes()
    return _call("read", url_of(url), lambda fs, path: fs.cat_file(path))


# ---------------------------------------------------------------- writing

def _remote_only(url: str | os.PathLike) -> str:
    if local(url) is not None:
        raise ValueError(f"{url}: a local path; write it with pipeline.core.io (atomic temp + rename)")
    return url_of(url)


def write_bytes(url: str | os.PathLike, data: bytes) -> None:
    """Commits ``data`` as the object ``url`` by one upload under its final name."""
    _call("write", _remote_only(url), lambda fs, path: fs.pipe_file(path, data))


def put_file(src: str | os.PathLike, url: str | os.PathLike) -> None:
    """Copies the local file ``src`` to ``url`` with ``write_bytes``' commit rule (a large file
    goes up as one multipart upload, visible only when complete)."""
    _call("write", _remote_only(url), lambda fs, path: fs.put_file(str(src), path))


def makedirs(url: str | os.PathLike) -> None:
    p = local(url)
    if p is not None:
        os.makedirs(p, exist_ok=True)


def rm(url: str | os.PathLike, missing_ok: bool = True) -> None:
    p = local(url)
    if p is not None:
        if missing_ok:
            Path(p).unlink(missing_ok=True)
        else:
            Path(p).unlink()
        return

    def remove(fs, path):
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise
    _call("remove", url_of(url), remove)


def rmtree(url: str | os.PathLike) -> None:
    """Removes a folder (a URL: every object under the prefix); nothing if absent."""
    p = local(url)
    if p is not None:
        import shutil
        shutil.rmtree(p, ignore_errors=True)
        return

    def remove(fs, path):
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
    _call("remove", url_of(url), remove)
