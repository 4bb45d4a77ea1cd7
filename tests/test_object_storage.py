"""Object storage through pipeline/core/fs.py, against a real S3 API server (moto's standalone
server on 127.0.0.1, tests/conftest.py:s3_server)."""
import os
import stat

import numpy as np
import pytest

from pipeline.core import fs


@pytest.fixture
def remote_on(monkeypatch):
    monkeypatch.setenv("MLCD_ALLOW_REMOTE", "1")  # what netpolicy.apply(run) sets for run.allow_remote
    fs._CHECKED.clear()


def test_fs_roundtrip_on_s3(s3_bucket, remote_on):
    base = fs.join(s3_bucket, "run", "store")
    assert fs.is_remote(base) and base == f"{s3_bucket}/run/store"
    assert fs.check(base, "store", write=True) == base
    assert not fs.exists(base) and fs.ls(base) == []
    fs.makedirs(base)  # a no-op on object stores
    fs.write_bytes(fs.join(base, "b.bin"), b"\x00\x01" * 1000)
    fs.write_bytes(fs.join(base, "sub", "a.txt"), b"hello")
    assert fs.ls(base) == ["b.bin", "sub"]
    assert fs.isdir(base) and fs.isfile(fs.join(base, "b.bin")) and not fs.isfile(fs.join(base, "sub"))
    assert fs.size(fs.join(base, "b.bin")) == 2000
    assert fs.read_bytes(fs.join(base, "sub", "a.txt")) == b"hello"
    with fs.open_read(fs.join(base, "b.bin")) as f:
        assert f.read(3) == b"\x00\x01\x00"
    assert fs.glob(fs.join(base, "*.bin")) == [fs.join(base, "b.bin")]
    fs.rm(fs.join(base, "b.bin"))
    fs.rm(fs.join(base, "b.bin"))  # missing_ok
    assert fs.ls(base) == ["sub"]
    with pytest.raises(FileNotFoundError):
        fs.read_bytes(fs.join(base, "b.bin"))


def test_put_file_and_local_paths(s3_bucket, remote_on, tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(10_000))
    fs.put_file(src, f"{s3_bucket}/x/w.bin")
    assert fs.read_bytes(f"{s3_bucket}/x/w.bin") == src.read_bytes()
    # plain paths and file:// URLs are local files, written atomically with the umask's mode
    fs.put_file(src, f"file://{tmp_path}/copy/w.bin")
    assert (tmp_path / "copy" / "w.bin").read_bytes() == src.read_bytes()
    assert not fs.is_remote(f"file://{tmp_path}") and fs.local(f"file://{tmp_path}") == str(tmp_path)
    assert fs.ls(tmp_path / "copy") == ["w.bin"]
    mask = os.umask(0o022)
    try:
        fs.write_bytes(tmp_path / "m.bin", b"x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "m.bin").stat().st_mode) == 0o644


def test_bad_urls_stop_with_one_line(s3_server, s3_bucket, monkeypatch):
    fs._CHECKED.clear()
    monkeypatch.delenv("MLCD_ALLOW_REMOTE", raising=False)
    with pytest.raises(fs.FsError, match=r"store s3://.*refused unless run.allow_remote=true"):
        fs.check(f"{s3_bucket}/x", "store")
    monkeypatch.setenv("MLCD_ALLOW_REMOTE", "1")
    with pytest.raises(fs.FsError, match=r"no-such-bucket-xyz.*does not exist") as e:
        fs.check("s3://no-such-bucket-xyz/run", "store")
    assert "\n" not in str(e.value)
    with pytest.raises(fs.FsError, match=r"zz://b/x: unknown scheme zz://"):
        fs.check("zz://b/x", "labels")
    with pytest.raises(fs.FsError, match=r"gs://b/x: gs:// needs its fsspec backend"):
        fs.check("gs://b/x", "labels")


def test_wrong_endpoint_is_one_line_and_retries_are_counted(s3_server, remote_on, monkeypatch):
    import fsspec
    from conftest import free_port
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setattr(fs, "BACKOFF_S", 0.01)
    fsspec.filesystem("s3").clear_instance_cache()  # a new endpoint needs a new client
    before = sum(fs.RETRIES.values())
    try:
        with pytest.raises(fs.FsError, match=r"s3://some-bucket/x.*cannot reach the endpoint") as e:
            fs.check("s3://some-bucket/x", "shards")
    finally:
        fsspec.filesystem("s3").clear_instance_cache()
    assert "testing-secret" not in str(e.value) and "\n" not in str(e.value)
    assert sum(fs.RETRIES.values()) > before


def test_transient_errors_are_retried(monkeypatch):
    monkeypatch.setattr(fs, "BACKOFF_S", 0.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return np.int64(7)
    before = fs.RETRIES["write"]
    assert fs._retry("write", "s3://b/k", flaky) == 7
    assert fs.RETRIES["write"] == before + 2
    with pytest.raises(ValueError):  # not transient: raised at once
        fs._retry("write", "s3://b/k", lambda: (_ for _ in ()).throw(ValueError("bad")))
