import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch 2.14: restarted workers must not reuse the agent's rendezvous store (stale peer addresses
# -> "Gloo connectFullMesh ... Connection refused"); pytorch#135712.
os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(module_or_script: list[str], nproc: int, env: dict | None = None, timeout: int = 600,
             check: bool = True, max_restarts: int = 0) -> subprocess.CompletedProcess:
    """Runs real processes under torchrun (gloo on CPU)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--nnodes=1", f"--max_restarts={max_restarts}", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{free_port()}", *module_or_script]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"torchrun failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """Tiny real demo shards (configs/debug.yaml sizes), built once per test session."""
    from pipeline.demo import demo_data as dd
    out = tmp_path_factory.mktemp("run")
    summary = dd.main(str(ROOT / "configs/debug.yaml"), [f"run.out_dir={out}"])
    return out / "data", summary


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto's standalone server) on 127.0.0.1 for the session. The
    endpoint and dummy credentials go where botocore's standard chain reads them (env), so
    subprocesses inherit them; remote access itself stays off until a test allows it."""
    import logging

    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-0123",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the moto server: its ``s3://`` URL."""
    import re

    import boto3
    name = re.sub(r"[^a-z0-9-]", "-", f"t-{request.node.name.lower()}")[:50].strip("-") + f"-{os.getpid()}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"
