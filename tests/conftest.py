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
