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
    p = subprocess.run([BASH, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def cmd_line(out: str, needle: str) -> list[str]:
    lines = [ln for ln in out.splitlines() if needle in ln and not ln.startswith("#")]
    assert len(lines) == 1, f"expected one command line with {needle!r}:\n{out}"
    return lines[0].split()


def exports(out: str) -> dict:
    return dict(m.groups() for m in re.finditer(r"^export (\w+)=(.*)$", out, re.MULTILINE))


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
    assert env_out["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # restarts work (pytorch#135712)
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
    assert re.search(r"^#\s+DS_ACCELERATOR=(cpu|cuda)$", out, re.MULTILINE)  # travels to remote hosts
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


@pytest.mark.parametrize("stage,module", [("train", "training.train"), ("cluster", "clustering.kmeans")])
def test_slurm_dry_run_two_nodes_by_eight(stage, module, tmp_path):
    # Run from elsewhere, as sbatch does with its spooled copy: the script finds the repo.
    # (Every launchable stage through the same template: tests/test_stage_table.py.)
    out = sh([str(ROOT / "launch/slurm/stage.sbatch"), stage, "configs/prod/x.yaml", "run.seed=1"],
             SLURM_ENV, cwd=tmp_path).stdout
    srun = cmd_line(out, "srun ")
    assert srun[:5] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                        "--cpus-per-task=96"]
    assert srun[5:] == ["bash", f"{ROOT}/launch/torchrun.sh", stage, "configs/prod/x.yaml", "run.seed=1"]
    node = cmd_line(out, "torch.distributed.run")
    port = 29500 + 4242 % 1000
    for flag in ["--nproc_per_node=8", "--nnodes=2", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint=gpu07:{port}", "--rdzv_id=4242", "--max_restarts=2",
                 f"--log_dir={ROOT}/logs/mlcd-{stage}-4242"]:
        assert flag in node, (flag, node)
    assert node[node.index(module) - 1:] == ["-m", module, "--config", "configs/prod/x.yaml", "run.seed=1"]
    assert exports(out)["MASTER_ADDR"] == "gpu07" and "world size 16" in out
    header = (ROOT / "launch/slurm/stage.sbatch").read_text()
    for d in ["--requeue", "--signal=B:USR1@300", "--ntasks-per-node=1", "--output=logs/%x-%j.out"]:
        assert f"#SBATCH {d}" in header


def test_slurm_named_instance_faiss_layout_and_outside_job():
    out = sh(["launch/slurm/stage.sbatch", "cluster@regions", "c.yaml"], SLURM_ENV).stdout
    node = cmd_line(out, "torch.distributed.run")  # torch k-means: a rank per GPU
    assert "--nproc_per_node=8" in node and "world size 16" in out
    assert node[node.index("clustering.kmeans") + 1:] == ["--instance", "regions", "--config", "c.yaml"]
    out = sh(["launch/slurm/stage.sbatch", "cluster", "c.yaml", "cluster.method=faiss"],
             {**SLURM_ENV, "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "gpu01", "NPROC": "1"}).stdout
    node = cmd_line(out, "torch.distributed.run")  # FAISS: one process takes all the node's GPUs
    assert "--nproc_per_node=1" in node and "--standalone" in node and node[-1] == "cluster.method=faiss"
    p = sh(["launch/slurm/stage.sbatch", "train", "c.yaml"], {"DRY_RUN": "1"}, check=False)
    assert p.returncode != 0 and "SLURM_JOB_ID" in p.stderr.splitlines()[-1]


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
    assert "launch/slurm/stage.sbatch" in files and "launch/deepspeed.sh" in files
    p = subprocess.run(["shellcheck", "-x", *files], cwd=ROOT, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


# --- production configs and the cost model ------------------------------------------------------

PROD = sorted((ROOT / "configs/prod").glob("*.yaml"))
TRAIN_RECIPES = [p for p in PROD if p.name.startswith(("mlcd_", "unicom_"))]


def _chain_text(path: Path) -> str:
    """A recipe's own text plus its base files' (the statements may live in the base)."""
    import yaml
    text = path.read_text()
    base = (yaml.safe_load(text) or {}).get("base")
    return text + (_chain_text(path.parent / base) if base else "")


@pytest.mark.parametrize("path", PROD, ids=lambda p: p.name)
def test_prod_config_validates_with_the_papers_numbers(path):
    from launch.check import check_file
    s = check_file(str(path), [])
    assert s["cluster"].k == 1_000_000 and s["embed"].encoder.model == "ViT-L-14"
    assert Path(s["embed"].encoder.pretrained).is_absolute()  # a local weights file, never a hub tag
    n = 700e6 if "coyo" in path.name else 400e6
    assert s["embed"].input.endswith("coyo700m" if "coyo" in path.name else "laion400m")
    t = s["train"]
    if path not in TRAIN_RECIPES:
        return
    assert t.data.batch_size * t.deepspeed.grad_accum * 80 == 32_000  # "32K" on 80 GPUs
    assert t.partial_fc.sample_rate == 0.1 and t.optim.name == "adamw" and t.optim.weight_decay == 0.2
    epochs = t.steps * 32_000 / n
    if "_ft" in path.name:  # one epoch at a higher resolution, from the 224 run's weights and centers
        assert epochs == 1 and t.model.image_size in (336, 448) and str(t.model.image_size) in path.name
        assert t.init_from.endswith("_224") and t.init_centers_from == t.init_from
    else:
        assert epochs == 32 and t.optim.lr == 1e-3 and t.model.resolved().image_size == 224
    if path.name.startswith("unicom"):
        assert t.loss.mode == "unicom" and s["assign"].l == 1 and s["cluster"].kind == "joint"
        assert t.data.labels == s["assign"].out_dir and t.centroids == s["assign"].centroids
    else:
        assert t.loss.mode == "mlcd" and t.loss.num_labels == 8 == s["assign"].l
    if "bigG" in path.name:
        assert t.model.resolved().rope2d and t.deepspeed.zero_stage >= 2
    text = _chain_text(path)
    for stated in ("GPUs:", "Per-GPU batch", "ZeRO", "Memory per GPU"):
        assert stated.lower() in text.lower(), f"{path.name} does not state {stated!r}"


def test_cost_model_anchors_and_presets():
    import torch

    from launch import cost_model as cm
    from training.model import ModelConfig, build_model
    assert cm.embed_cost(400e6)["store_bytes_per_kind"] == pytest.approx(614.4e9)  # the anchor
    assert cm.partial_fc_bytes(1_000_000, 512, 80, 32_000, 0.1)["centers"] == pytest.approx(25.6e6)
    p = cm.model("vit_bigG14_224").params()
    assert cm.train_state_bytes(p, 0, 80) == pytest.approx(16 * p)
    assert cm.train_state_bytes(p, 2, 80) == pytest.approx(2 * p + 14 * p / 80)
    assert cm.train_state_bytes(p, 3, 80) == pytest.approx(16 * p / 80)
    # open_clip's profiler (profiler_results.csv): ViT-L-14 image tower 162.03 GFLOPs, 303.97M params
    assert cm.model("vit_l14_224").fwd_flops() == pytest.approx(162.03e9, rel=0.005)
    assert cm.model("vit_b32_224").fwd_flops() == pytest.approx(8.82e9, rel=0.01)  # same formula
    for name, preset in (("vit_b32_224", "vit_b32_224"), ("vit_l14_224", "vit_l14_336"),
                         ("vit_bigG14_224", "vit_bigG14_336")):
        with torch.device("meta"):  # no memory: the real module tree, counted
            m = build_model(ModelConfig(name=preset, image_size=cm.MODELS[name][0]))
        assert sum(q.numel() for q in m.parameters()) == cm.model(name).params(), name
    assert "614 GB" in cm.tables("laion400m")
    # the public OpenCLIP L/14 LAION-400M run (13B samples, 768 A100, 60,328 samples/s): ~46k
    # A100-hours at ~13% MFU, the low end of the training-hours range the doc gives
    pub = cm.public_run_mfu("vit_l14_224")
    assert pub["a100_h"] == pytest.approx(13e9 / 60327.9 * 768 / 3600) and 0.11 < pub["mfu"] < 0.15
    assert cm.public_run_mfu("vit_b32_224")["mfu"] < pub["mfu"]  # B/32: input-bound, lower still
    scaling = (ROOT / "docs/SCALING.md").read_text()  # the doc shows the model's current output
    for ds in ("laion400m", "coyo700m"):
        assert cm.tables(ds) in scaling, f"docs/SCALING.md is stale: paste `python -m launch.cost_model --dataset {ds}`"


# --- elastic restart ----------------------------------------------------------------------------

@pytest.mark.slow
def test_elastic_restart_resumes_from_last_checkpoint(tmp_path):
    """2 ranks under launch/torchrun.sh with MAX_RESTARTS=1; rank 1 is SIGKILLed mid-run. torchrun
    restarts the group, which resumes from the newest checkpoint and finishes: the step counter
    continues and at most one checkpoint interval is redone."""
    import psutil

    # The training tests' tiny synthetic shards + store + labels (stage 1/2 layouts) and model.
    from test_train import TINY, build_synthetic, synthetic_overrides
    build_synthetic(tmp_path / "syn")
    out = tmp_path / "run"
    every, steps = 2, 40
    overrides = [f"run.out_dir={out}", *TINY, *synthetic_overrides(tmp_path / "syn"),
                 f"train.steps={steps}", f"train.checkpoint.every={every}", "train.checkpoint.keep=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC": "2", "MAX_RESTARTS": "1",
           "DS_ACCELERATOR": "cpu"}
    p = subprocess.Popen([BASH, "launch/torchrun.sh", "train", *overrides], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = out / "train" / "checkpoints" / "latest"
    metrics = out / "train" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (latest.exists() and latest.read_text().strip() >= "step_00000006"):
        assert p.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    rank1 = [q for q in psutil.Process(p.pid).children(recursive=True)
             if q.environ().get("RANK") == "1" and q.environ().get("TORCHELASTIC_RESTART_COUNT") == "0"]
    assert len(rank1) == 1, rank1
    rank1[0].send_signal(signal.SIGKILL)
    logged_at_kill = max(json.loads(ln)["step"] for ln in metrics.read_text().splitlines())
    log = p.communicate(timeout=300)[0]
    assert p.returncode == 0, log[-4000:]
    resumed = {int(m) for m in re.findall(r"resumed from \S+step_(\d{8})", log)}  # every rank logs it
    assert len(resumed) == 1, log[-4000:]  # one restart, and it resumed
    at = resumed.pop()
    assert 6 <= at and logged_at_kill - at <= every, (logged_at_kill, at)  # <= one interval redone
    state = json.loads((out / "train" / "checkpoints" / f"step_{steps:08d}" / "trainer_state.json").read_text())
    assert state["step"] == steps and state["complete"]
    logged = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # the counter continued; redone steps logged once
