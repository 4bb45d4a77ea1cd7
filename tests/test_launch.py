"""Launchers, SLURM templates, production configs, GPU-bench plan and the elastic restart.

Dry runs are checked for a 2-node x 8-GPU layout (ranks, world size, rendezvous, env); the
multi-node wiring itself is exercised for real with two torchrun agents (and two DeepSpeed
launchers) on this box playing two nodes of 2 CPU ranks each (gloo).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port

BASH = shutil.which("bash")


def sh(args, env=None, check=True, cwd=ROOT, timeout=120):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NNODES",
                                                                   "NPROC", "RDZV", "LOG_DIR"))}
    e.update({"OMP_NUM_THREADS": "1", **(env or {})})
    p = subprocess.run([BASH, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def cmd_line(out: str, needle: str) -> list[str]:
    lines = [ln for ln in out.splitlines() if needle in ln and not ln.startswith("#")]
    assert len(lines) == 1, f"expected one command line with {needle!r}:\n{out}"
    return lines[0].split()


def exports(out: str) -> dict:
    return dict(m.groups() for m in re.finditer(r"^export (\w+)=(.*)$", out, re.M))


# --- torchrun -----------------------------------------------------------------------------------

def test_torchrun_dry_run_two_nodes_by_eight():
    env = {"DRY_RUN": "1", "NPROC": "8", "NNODES": "2", "MASTER_ADDR": "gpu01", "RDZV_ID": "job7",
           "MAX_RESTARTS": "3", "LOG_DIR": "/logs/x"}
    out = sh(["launch/torchrun.sh", "train", "configs/prod/x.yaml", "train.steps=10"], env).stdout
    cmd = cmd_line(out, "torch.distributed.run")
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    for flag in ["--nproc_per_node=8", "--nnodes=2", "--max_restarts=3", "--rdzv_backend=c10d",
                 "--rdzv_endpoint=gpu01:29500", "--rdzv_id=job7", "--log_dir=/logs/x", "--tee=3"]:
        assert flag in cmd, (flag, cmd)
    assert "--standalone" not in cmd
    assert cmd[cmd.index("-m", 3):] == ["-m", "training.train", "--config", "configs/prod/x.yaml",
                                        "train.steps=10"]
    env_out = exports(out)
    assert env_out["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env_out["DS_ACCELERATOR"] in ("cpu", "cuda")
    assert env_out["PYTHONPATH"].split(":")[0] == str(ROOT)
    assert "world size 16" in out and "RANK 8*k .. 8*k+7" in out and "LOCAL_RANK 0..7" in out


def test_torchrun_single_node_elastic_and_errors():
    out = sh(["launch/torchrun.sh", "embed", "configs/debug.yaml"], {"DRY_RUN": "1", "NPROC": "2"}).stdout
    cmd = cmd_line(out, "torch.distributed.run")
    assert "--standalone" in cmd and "--nnodes=1" in cmd and "-m" in cmd and "pipeline.embed" in cmd
    assert "world size 2" in out
    out = sh(["launch/torchrun.sh", "assign", "c.yaml"],
             {"DRY_RUN": "1", "NPROC": "8", "NNODES": "2:4", "MASTER_ADDR": "h"}).stdout
    assert "--nnodes=2:4" in cmd_line(out, "torch.distributed.run")
    assert "world size 16..32 (elastic)" in out
    p = sh(["launch/torchrun.sh", "train", "c.yaml"], {"DRY_RUN": "1", "NNODES": "2"}, check=False)
    assert p.returncode != 0 and "MASTER_ADDR" in p.stderr
    p = sh(["launch/torchrun.sh", "bogus"], {"DRY_RUN": "1"}, check=False)
    assert p.returncode != 0 and "unknown stage 'bogus'" in p.stderr
    # export takes positional CHECKPOINT OUT_DIR, not a config: both reach the module.
    out = sh(["launch/torchrun.sh", "export", "ck/step_1", "out"], {"DRY_RUN": "1"}).stdout
    assert cmd_line(out, "training.export")[-3:] == ["training.export", "ck/step_1", "out"]


@pytest.mark.slow
def test_torchrun_two_agents_form_one_world(tmp_path):
    """Two torchrun agents (two 'nodes' of 2 ranks) meet at the c10d rendezvous of the script."""
    env = {"NPROC": "2", "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RDZV_ID": "t-two-agents"}
    e = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    procs = [subprocess.Popen([BASH, "launch/torchrun.sh", "envcheck", "--bytes", "1e6",
                               "--out", str(tmp_path)], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    assert {r["world_size"] for r in ranks} == {4}
    assert sorted((r["group_rank"], r["local_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["allreduce_ok"] and r["busbw_GBps"] > 0 for r in ranks)
    assert "envcheck: world_size=4" in "".join(outs)


# --- deepspeed launcher -------------------------------------------------------------------------

def test_deepspeed_dry_run_hostfile(tmp_path):
    hosts = tmp_path / "hostfile"
    hosts.write_text("# the job's nodes\ngpu01 slots=8\ngpu02 slots=8  # second\n\ngpu03 slots=8\n")
    env = {"DRY_RUN": "1", "HOSTFILE": str(hosts), "NUM_NODES": "2", "LOG_DIR": str(tmp_path / "l")}
    out = sh(["launch/deepspeed.sh", "train", "configs/prod/x.yaml", "train.zero_stage=3"], env).stdout
    cmd = cmd_line(out, "--hostfile=")
    assert Path(cmd[0]).name == "deepspeed"
    for flag in [f"--hostfile={hosts}", "--num_nodes=2", "--master_addr=gpu01", "--master_port=29500",
                 "--launcher=pdsh", "--no_local_rank", "--module"]:
        assert flag in cmd, (flag, cmd)
    assert cmd[-4:] == ["training.train", "--config", "configs/prod/x.yaml", "train.zero_stage=3"]
    assert "# node 0 gpu01: RANK 0..7, LOCAL_RANK 0..7" in out
    assert "# node 1 gpu02: RANK 8..15, LOCAL_RANK 0..7" in out
    assert "gpu03" not in out.split("# layout")[1] and "# world size 16" in out
    assert f"export DS_ENV_FILE={tmp_path / 'l'}/deepspeed_env" in out
    assert re.search(r"^#\s+DS_ACCELERATOR=(cpu|cuda)$", out, re.M)  # travels to remote hosts
    assert not (tmp_path / "l").exists()  # a dry run writes nothing
    out = sh(["launch/deepspeed.sh", "train", "c.yaml"],
             {**env, "NO_SSH": "1", "NODE_RANK": "1", "NUM_GPUS": "4"}).stdout
    cmd = cmd_line(out, "--hostfile=")
    assert "--no_ssh" in cmd and "--node_rank=1" in cmd and "--num_gpus=4" in cmd
    assert "# node 1 gpu02: RANK 4..7, LOCAL_RANK 0..3" in out


def test_deepspeed_bad_hostfile(tmp_path):
    bad = tmp_path / "hosts"
    bad.write_text("gpu01 slots=8\ngpu02 8\n")
    p = sh(["launch/deepspeed.sh", "train", "c.yaml"], {"DRY_RUN": "1", "HOSTFILE": str(bad)}, check=False)
    assert p.returncode == 2 and str(bad) in p.stderr and "gpu02 8" in p.stderr
    bad.write_text("gpu01 slots=8\n")
    p = sh(["launch/deepspeed.sh", "train", "c.yaml"],
           {"DRY_RUN": "1", "HOSTFILE": str(bad), "NUM_NODES": "2"}, check=False)
    assert p.returncode == 2 and "NUM_NODES=2" in p.stderr


@pytest.mark.slow
def test_deepspeed_two_nodes_without_ssh(tmp_path):
    """The deepspeed launcher per node (NO_SSH) on a 2-host hostfile: ranks follow host order."""
    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=2\n127.0.0.1 slots=2\n")
    port = str(free_port())
    procs = []
    for node in (0, 1):
        e = {**os.environ, "OMP_NUM_THREADS": "1", "HOSTFILE": str(hosts), "NO_SSH": "1",
             "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
             "LOG_DIR": str(tmp_path / f"logs{node}")}
        procs.append(subprocess.Popen([BASH, "launch/deepspeed.sh", "envcheck", "--out", str(tmp_path / "r")],
                                      cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    ranks = [json.loads((tmp_path / "r" / f"rank{r}.json").read_text()) for r in range(4)]
    assert [(r["rank"], r["local_rank"], r["world_size"]) for r in ranks] == \
        [(0, 0, 4), (1, 1, 4), (2, 0, 4), (3, 1, 4)]
    assert (tmp_path / "logs0" / "deepspeed_env").read_text().count("DS_ACCELERATOR=") == 1


# --- SLURM --------------------------------------------------------------------------------------

SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "96", "SLURM_JOB_NAME": "mlcd-x",
             "SLURM_SUBMIT_DIR": str(ROOT), "DRY_RUN": "1"}


@pytest.mark.parametrize("stage,module", [("train", "training.train"), ("embed", "pipeline.embed"),
                                          ("assign", "clustering.assign"), ("eval", "training.eval")])
def test_slurm_dry_run_two_nodes_by_eight(stage, module, tmp_path):
    # Run from elsewhere, as sbatch does with its spooled copy: the script finds the repo.
    out = sh([str(ROOT / f"launch/slurm/{stage}.sbatch"), "configs/prod/x.yaml", "run.seed=1"],
             SLURM_ENV, cwd=tmp_path).stdout
    srun = cmd_line(out, "srun ")
    assert srun[:5] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                        "--cpus-per-task=96"]
    assert srun[5:] == ["bash", f"{ROOT}/launch/torchrun.sh", stage, "configs/prod/x.yaml", "run.seed=1"]
    node = cmd_line(out, "torch.distributed.run")
    port = 29500 + 4242 % 1000
    for flag in ["--nproc_per_node=8", "--nnodes=2", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint=gpu07:{port}", "--rdzv_id=4242", "--max_restarts=2",
                 f"--log_dir={ROOT}/logs/mlcd-x-4242"]:
        assert flag in node, (flag, node)
    assert node[node.index(module) - 1:] == ["-m", module, "--config", "configs/prod/x.yaml", "run.seed=1"]
    assert exports(out)["MASTER_ADDR"] == "gpu07" and "world size 16" in out
    header = (ROOT / f"launch/slurm/{stage}.sbatch").read_text()
    for d in ["--requeue", "--signal=B:USR1@300", "--ntasks-per-node=1", "--output=logs/%x-%j.out"]:
        assert f"#SBATCH {d}" in header


def test_slurm_cluster_one_process_per_node_and_outside_job():
    out = sh(["launch/slurm/cluster.sbatch", "c.yaml"], {**SLURM_ENV, "SLURM_NNODES": "1",
                                                        "SLURM_JOB_NODELIST": "gpu01"}).stdout
    assert "--nproc_per_node=1" in cmd_line(out, "torch.distributed.run")  # FAISS takes all GPUs
    p = sh(["launch/slurm/train.sbatch", "c.yaml"], {"DRY_RUN": "1"}, check=False)
    assert p.returncode != 0 and "SLURM_JOB_ID" in p.stderr


def test_hostlist_expansion():
    from launch.hostlist import expand
    assert expand("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand("r[1-2]n[8-9]") == ["r1n8", "r1n9", "r2n8", "r2n9"]
    assert expand("node[098-101]")[-1] == "node101"
    with pytest.raises(ValueError, match="unbalanced"):
        expand("gpu[01-02")


@pytest.mark.slow
def test_slurm_usr1_requeues_and_stops_the_step(tmp_path):
    """The requeue path with real torchrun ranks: USR1 to the batch shell -> `scontrol requeue`
    and SIGTERM down the step. srun/scontrol are stand-ins on PATH (no SLURM here): srun drops
    its own flags and runs the task once (one node), scontrol records its arguments."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_ / "scontrol").write_text(
        '#!/usr/bin/env bash\n'
        f'if [ "$1" = show ]; then exec {sys.executable} -m launch.hostlist "$3"; fi\n'
        f'echo "$@" >> {tmp_path}/scontrol.log\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    e = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "OMP_NUM_THREADS": "1",
         "PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_JOB_ID": "777", "SLURM_NNODES": "1",
         "SLURM_JOB_NODELIST": "127.0.0.1", "NPROC": "2", "LOG_DIR": str(tmp_path / "logs"),
         "MASTER_PORT": str(free_port())}
    script = ("source launch/env.sh; source launch/slurm/common.sh; "
              f"slurm_run_stage envcheck --out {tmp_path}/r --sleep 120")
    p = subprocess.Popen([BASH, "-c", script], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    while not (tmp_path / "r" / "rank1.json").exists():
        assert time.time() < deadline and p.poll() is None, p.stdout.read() if p.poll() is not None else ""
        time.sleep(0.5)
    workers = [json.loads((tmp_path / "r" / f"rank{r}.json").read_text())["pid"] for r in range(2)]
    t0 = time.time()
    p.send_signal(signal.SIGUSR1)
    out = p.communicate(timeout=60)[0]
    assert time.time() - t0 < 45, "the step did not stop promptly after USR1"
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "777"]
    assert "time limit near (USR1)" in out and "step exited with status" in out
    for pid in workers:  # the ranks are gone, not orphaned
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


# --- shellcheck ---------------------------------------------------------------------------------

def test_shell_scripts_pass_shellcheck():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed (Debian: apt-get install shellcheck)")
    files = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("launch/*.sh"), *ROOT.glob("launch/slurm/*")])
    assert "launch/slurm/train.sbatch" in files and "launch/deepspeed.sh" in files
    p = subprocess.run(["shellcheck", "-x", *files], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
