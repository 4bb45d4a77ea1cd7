"""Hostile shard inputs (issue 26): specs that would run a shell or reach the network are refused
after expansion, in one line, by every stage that reads shards; a tar member that inflates to
1 GiB is skipped from its header with bounded memory; a killed run's temp files are removed by
the next run under its lock; embed's DataLoader workers die with their parent."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from pipeline.core.entry import stage_cli
from pipeline.core.stages import name_of_module
from tests.conftest import ROOT, free_port
from tests.test_embed import tiny_args, write_shards

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


# ---------------------------------------------------------------- specs: refused after expansion

@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return Path(write_shards(tmp_path_factory.mktemp("good"), 1, 2)[0])


@pytest.fixture
def listener():
    """A local TCP port: a fetch of a refused URL would connect to it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    yield s.getsockname()[1], s
    s.close()


def _list(tmp: Path, *lines: str) -> str:
    p = tmp / "shards.txt"
    p.write_text("# hostile list\n" + "".join(f"{ln}\n" for ln in lines))
    return str(p)


# name -> (spec builder (tmp, good shard, marker, port), text the one line has, exit code)
# exit 1: a spec the run may not open (ShardPolicyError); 2: a spec that matches no file.
SPECS = {
    "brace_pipe_member": (lambda t, g, m, p: f"{{{g},pipe:touch {m}}}", "is a shell command (pipe:)", 1),
    "upper_PIPE": (lambda t, g, m, p: f"PIPE:touch {m}", "'PIPE:touch", 1),
    "list_Pipe_line": (lambda t, g, m, p: _list(t, str(g), f"Pipe:touch {m}"), "shards.txt:3: 'Pipe:touch", 1),
    "list_http_one_slash": (lambda t, g, m, p: _list(t, f"http:/127.0.0.1:{p}/x.tar"),
                            "shards.txt:2: 'http:/127.0.0.1", 1),
    "http_no_slash": (lambda t, g, m, p: f"http:127.0.0.1:{p}/x.tar", "is a remote URL", 1),
    "upper_HTTPS": (lambda t, g, m, p: f"HTTPS://127.0.0.1:{p}/{{0..2}}.tar", "is a remote URL", 1),
    "brace_remote_member": (lambda t, g, m, p: f"{{{g},http://127.0.0.1:{p}/x.tar}}", "run.allow_remote=true", 1),
    "hf_scheme": (lambda t, g, m, p: f"hf:org/data/{m.name}.tar", "is a remote URL", 1),
    "unknown_scheme": (lambda t, g, m, p: f"{{{g},gopher:{m}}}", "neither an existing local path nor a known scheme", 1),
    "nonexistent_path": (lambda t, g, m, p: f"{t}/nope/{{00000..00003}}.tar", "matches no file", 2),
}


def _train_args(tmp: Path, spec: str) -> list[str]:
    return ["--config", str(ROOT / "configs/debug.yaml"), f"run.out_dir={tmp / 'run'}",
            f"train.data.shards={spec}", "train.partial_fc.num_classes=4"]


def _regions_args(tmp: Path, spec: str) -> list[str]:
    return ["--config", str(ROOT / "configs/debug.yaml"), f"run.out_dir={tmp / 'run'}",
            f"regions.input={spec}", "regions.ocr=none"]


STAGES = {
    "embed": ("pipeline.embed", lambda t, s: tiny_args(t, s, t / "store"), "embed.input="),
    "train": ("training.train", _train_args, "train.data.shards="),
    "regions": ("pipeline.regions", _regions_args, "regions.input="),
}


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("case", list(SPECS))
def test_hostile_spec_is_refused_in_one_line(stage, case, tmp_path, good, listener, capsys, monkeypatch):
    for var in ("MLCD_ALLOW_PIPE", "MLCD_ALLOW_REMOTE", "MLCD_MAX_MEMBER_BYTES"):
        monkeypatch.delenv(var, raising=False)  # the stage sets them: restored after the test
    for var, val in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"),
                     ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(var, val)  # train's one-process group; restored after the test
    port, sock = listener
    marker = tmp_path / "pwned"
    build, text, code = SPECS[case]
    spec = build(tmp_path, good, marker, port)
    module, args, key = STAGES[stage]
    with pytest.raises(SystemExit) as e:
        stage_cli(name_of_module(module), args(tmp_path, f"'{spec}'"))  # YAML-quoted, as in a config
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == code, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert text in err[0] and key in err[0], err[0]
    assert not marker.exists(), "the refused spec ran its command"
    with pytest.raises(BlockingIOError):
        sock.accept()  # nothing connected: the refused URL was never fetched
    assert not (tmp_path / "store" / "img_emb").exists()


def test_allowed_specs_open_as_classified(tmp_path, good, monkeypatch):
    """With the opt-in, ``PIPE:`` runs (scheme lower-cased for webdataset); a local file whose name
    looks like a URL (``http:x.tar``) is read as a file, never fetched."""
    from pipeline.core.shards import expand_shards, is_url, read_samples
    monkeypatch.setenv("MLCD_ALLOW_PIPE", "1")
    monkeypatch.delenv("MLCD_ALLOW_REMOTE", raising=False)
    keys = [s["__key__"] for s in read_samples(str(good))]
    assert [s["__key__"] for s in read_samples(f"PIPE:cat {good}")] == keys == ["000000000", "000000001"]
    monkeypatch.chdir(tmp_path)
    Path("http:x.tar").write_bytes(good.read_bytes())
    assert not is_url("http:x.tar") and expand_shards("{http,http}:x.tar") == ["http:x.tar"] * 2
    assert [s["__key__"] for s in read_samples("http:x.tar")] == keys
    monkeypatch.setenv("MLCD_ALLOW_PIPE", "0")  # the reader checks again when it opens
    from pipeline.core.shards import ShardPolicyError
    with pytest.raises(ShardPolicyError, match="run.allow_pipe=true"):
        next(read_samples(f"pipe:touch {tmp_path / 'pwned'}"))
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- memory: a 1 GiB member

class _Zeros:
    def read(self, n: int) -> bytes:
        return bytes(n)


def _member(name: str, data: bytes = b"", size: int | None = None) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = len(data) if size is None else size
    return ti.tobuf(tarfile.GNU_FORMAT) + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _bomb(path: Path, pieces: int = 64, piece: int = 16 << 20) -> int:
    """The red-team file: a gzipped tar (about 1 MiB) with sample a, then b.jpg of
    ``pieces * piece`` zero bytes (1 GiB), then sample c. Written as spliced deflate blocks: one
    compressed piece of zeros, repeated (each starts from an empty dictionary, so the copies are a
    valid stream), so building it costs one piece and a CRC, not a gigabyte of compression."""
    import struct
    import zlib

    def raw(data: bytes, last: bool = False) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush(zlib.Z_FINISH if last else zlib.Z_FULL_FLUSH)
    head = _member("a.txt", b"first") + _member("a.jpg", b"\xff\xd8") + _member("b.jpg", size=pieces * piece)
    tail = _member("c.txt", b"last") + bytes(2 * tarfile.BLOCKSIZE)
    total = len(head) + pieces * piece + len(tail)
    tail += bytes(-total % tarfile.RECORDSIZE)
    total += -total % tarfile.RECORDSIZE
    zeros, crc = bytes(piece), zlib.crc32(head)
    for _ in range(pieces):
        crc = zlib.crc32(zeros, crc)
    crc = zlib.crc32(tail, crc)
    block = raw(zeros)
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + raw(head))
        for _ in range(pieces):
            f.write(block)
        f.write(raw(tail, last=True) + struct.pack("<LL", crc, total & 0xFFFFFFFF))
    return total


PEAK = """
import json, resource, sys
from pipeline.core.shards import read_samples
import webdataset.tariterators  # imported before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = [[s["__key__"], s.get("__skip__"), sorted(k for k in s if not k.startswith("__"))]
       for s in read_samples(sys.argv[1])]
print(json.dumps({"delta_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,
                  "samples": out}))
"""


def test_tar_bomb_is_skipped_with_bounded_memory(tmp_path):
    path = tmp_path / "bomb.tar.gz"
    assert _bomb(path) > 1 << 30 and path.stat().st_size < 2 << 20
    p = subprocess.run([sys.executable, "-c", PEAK, str(path)], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout)
    assert r["samples"] == [["a", None, ["jpg", "txt"]], ["b", "member_too_large", ["jpg"]],
                            ["c", None, ["txt"]]]
    assert r["delta_mb"] < 200, r  # reading it whole: +1 GiB at least


def test_embed_counts_oversize_members(tmp_path, monkeypatch):
    """A member over run.max_member_bytes is a skipped sample (by reason) of an otherwise
    embedded shard."""
    from pipeline import embed as E
    monkeypatch.delenv("MLCD_MAX_MEMBER_BYTES", raising=False)  # the stage sets it: restored after
    shard = Path(write_shards(tmp_path / "src", 1, 3)[0])
    big = tmp_path / "big.tar"
    with tarfile.open(shard) as src, tarfile.open(big, "w") as dst:
        for m in src:
            dst.addfile(m, src.extractfile(m))
        ti = tarfile.TarInfo("zzbig.jpg")
        ti.size = 200_000
        dst.addfile(ti, _Zeros())
    E.main(str(ROOT / "configs/debug.yaml"), tiny_args(tmp_path, str(big), tmp_path / "store",
                                                       "run.max_member_bytes=100000", "embed.workers=0")[2:])
    m = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert m["num_rows"] == 3 and m["skipped"] == {"member_too_large": 1}, m


# ---------------------------------------------------------------- our tar parser vs Python's tarfile

def _tarfile_samples(path: Path) -> list[tuple[str, bytes]]:
    """What Python's tarfile reads: (name, data) of the regular members, in order."""
    with tarfile.open(path, "r|*") as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf if m.isreg()]


def _tar(path: Path, fmt: int, mode: str = "w") -> Path:
    """Members a shard may hold: plain, ustar-prefix, GNU long and pax (non-ASCII) names, a
    directory, a symlink, an empty file, members of 512 and 513 bytes, keys with dots."""
    import io
    names = ["000.jpg", "000.txt", "d/" + "p" * 120 + "/001.jpg", "d/" + "l" * 150 + ".json",
             "caf\u00e9/002.jpg", "003.seg.png", "004.txt", "005.bin"]
    with tarfile.open(path, mode, format=fmt) as tf:
        ti = tarfile.TarInfo("adir")
        ti.type = tarfile.DIRTYPE
        tf.addfile(ti)
        for i, n in enumerate(names):
            if (fmt != tarfile.PAX_FORMAT and not n.isascii()) or \
                    (fmt == tarfile.USTAR_FORMAT and len(n.rpartition("/")[2]) > 100):
                continue
            data = bytes([i]) * [7, 0, 512, 513, 3000, 1, 2, 0][i]
            ti = tarfile.TarInfo(n)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("006.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "000.jpg"
        tf.addfile(link)
    return path


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("comp", ["", "gz", "bz2", "xz"])
def test_tar_parser_reads_what_tarfile_reads(tmp_path, fmt, comp):
    """shards.py parses tar headers itself (speed): same members, names and bytes as tarfile."""
    from pipeline.core.shards import _Blocks, _decompressed, _members
    path = _tar(tmp_path / ("x.tar" + ("." + comp if comp else "")), fmt, "w:" + comp if comp else "w")
    want = _tarfile_samples(path)
    with open(path, "rb") as f:
        got = list(_members(_Blocks(_decompressed(f)), cap=1 << 20))
    assert got == want and len(want) >= 6
    with open(path, "rb") as f:  # members over the cap: named, not read
        capped = list(_members(_Blocks(_decompressed(f)), cap=600))
    assert capped == [(n, None if len(d) > 600 else d) for n, d in want]


@pytest.mark.parametrize("damage", ["cut_in_data", "cut_at_header", "no_end_marker", "bad_checksum",
                                    "garbage_after_end", "huge_pax_header", "empty"])
def test_tar_parser_refuses_damaged_tars(tmp_path, damage):
    """A cut-off, corrupt or hostile tar raises tarfile.ReadError (never a silently short part)."""
    from pipeline.core.shards import MAX_HEADER_BYTES, read_samples
    good = _tar(tmp_path / "good.tar", tarfile.GNU_FORMAT).read_bytes()
    h = good.index(b"003.seg.png")  # a member header; the member before it has 513 bytes
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, MAX_HEADER_BYTES + 1
    bad = {"cut_in_data": good[:h - 600], "cut_at_header": good[:h + 100], "no_end_marker": good[:h],
           "bad_checksum": good[:h] + b"x" + good[h + 1:], "garbage_after_end": good + b"\1" * 512,
           "huge_pax_header": pax.tobuf(tarfile.USTAR_FORMAT) + bytes(2 * MAX_HEADER_BYTES), "empty": b""}
    path = tmp_path / "bad.tar"
    path.write_bytes(bad[damage])
    with pytest.raises(tarfile.ReadError):
        list(read_samples(str(path)))


# ---------------------------------------------------------------- leftovers of a killed run

KILLED_WRITER = """
import os, signal, sys
from pipeline.core.io import atomic_path
for p in sys.argv[1:]:
    tmp = atomic_path(p).__enter__()
    tmp.write_bytes(b"x" * 4096)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_stale_temps_removed_under_the_lock_only(tmp_path, monkeypatch):
    for var in ("MLCD_ALLOW_PIPE", "MLCD_ALLOW_REMOTE", "MLCD_ALLOW_DOWNLOAD", "MLCD_MAX_MEMBER_BYTES"):
        monkeypatch.delenv(var, raising=False)  # stage_guard sets them: restored after the test
    from pipeline.core import lock
    from pipeline.core.config import RunConfig
    from pipeline.core.dist import DistContext
    from pipeline.core.guard import stage_guard
    from pipeline.core.io import UNTAGGED_STALE_S, atomic_path
    out = tmp_path / "clusters"
    (out / "labels").mkdir(parents=True)
    killed = [out / "centroids.npy", out / "checkpoints" / "latest", out / "labels" / "labels_0.npy",
              tmp_path / "other" / "x.npy"]
    subprocess.run([sys.executable, "-c", KILLED_WRITER, *map(str, killed)], cwd=ROOT, env=ENV, timeout=60)
    temps = sorted(tmp_path.rglob(".*.tmp"))
    assert len(temps) == 4
    old = out / ".state.json.abcd1234.tmp"  # written before temps were tagged, long ago
    old.write_text("x")
    os.utime(old, (time.time() - UNTAGGED_STALE_S - 60,) * 2)
    fresh, other = out / ".meta.json.abcd1234.tmp", out / ".notes.tmp"  # fresh untagged; not ours
    fresh.write_text("x")
    other.write_text("x")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.core import lock; "
                               f"lock.acquire({str(out)!r}, 'holder'); print('held', flush=True); "
                               "time.sleep(120)"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.LockError), stage_guard(RunConfig(), out, DistContext(), "t"):
            pass
        assert sorted(tmp_path.rglob(".*.tmp")) == sorted([*temps, old, fresh, other])  # not held: kept
    finally:
        holder.kill()
        holder.wait()
    labels_lock = lock.acquire(out / "labels", "live")  # another live stage's folder inside the tree
    try:
        with atomic_path(out / "live.npy") as live:  # a live writer (this process)
            live.write_bytes(b"y")
            with stage_guard(RunConfig(), out, DistContext(), "t"):
                left = sorted(tmp_path.rglob(".*.tmp"))
    finally:
        lock.release(labels_lock)
    gone = [t for t in temps if t.parent in (out, out / "checkpoints")] + [old]
    assert len(gone) == 3 and not any(t in left for t in gone), left
    assert sorted(left) == sorted([t for t in temps if t not in gone] + [fresh, other, live]), left
    assert (out / "live.npy").read_bytes() == b"y"


# ---------------------------------------------------------------- embed's workers die with it

def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


@pytest.mark.slow  # a subprocess embed with 2 workers
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_embed_workers_die_with_killed_parent(tmp_path):
    """SIGKILL to the embed process alone (as ``kill -9`` of the ``mlcd`` pid): its DataLoader
    workers go too, also while blocked inside a read (a stalled ``pipe:``/remote stream, where
    torch's own parent check, made between batches, never runs)."""
    shard = write_shards(tmp_path / "src", 1, 16)[0]
    spec = tmp_path / "stalled.txt"
    # each stream stalls before its end (four distinct specs: a shard listed twice is refused)
    spec.write_text("".join(f"pipe:cat {shard}; sleep {60 + i}\n" for i in range(4)))
    p = subprocess.Popen([sys.executable, "-m", "pipeline.embed",
                          *tiny_args(tmp_path, str(spec), tmp_path / "store", "embed.workers=2",
                                     "embed.batch_size=4", "run.allow_pipe=true")],
                         cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: list[int] = []
    seen: list[int] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and p.poll() is None and len(_descendants(p.pid)) < 6:
            time.sleep(0.05)  # 2 workers, each with its shell and sleep
        workers, seen = _children(p.pid), _descendants(p.pid)
        assert p.poll() is None and len(workers) >= 2, p.stderr.read().decode()[-2000:] if p.poll() else seen
        time.sleep(1)  # the workers are blocked reading their stalled streams
        os.kill(p.pid, signal.SIGKILL)  # the parent only
        p.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), [w for w in workers if _alive(w)]
    finally:
        for w in seen:  # only the pids this test saw start (workers, their shells and sleeps)
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        if p.poll() is None:
            p.kill()
            p.wait()
