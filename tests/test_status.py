"""Runs you can see into: the progress reporter's lines in batch logs (no terminal), its global
count from the ranks' files, and `mlcd status` on a finished, a killed and a failed stage."""
import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import ROOT
from test_embed import run_embed, tiny_args, write_shards

from pipeline.core.dist import DistContext
from pipeline.core.tracking import Progress

LINE = re.compile(r"work: (\d+)/50 img \(\d+\.\d%\) [\d.,]+ img/s ETA \S+ \| skipped (\d+)")


def test_progress_prints_periodic_lines_without_a_terminal(tmp_path):
    """stdout/stderr to a file (as under SLURM or nohup): tqdm is off, the reporter logs a line
    with done/total, rate, ETA and the stage's counters every log_every_s, and a final one."""
    code = (
        "import time\n"
        "from pipeline.core.dist import DistContext\n"
        "from pipeline.core.tracking import progress, setup_logging\n"
        "setup_logging(None, 0.1)\n"
        f"bar = progress(50, 'work', DistContext(), share_dir={str(tmp_path)!r})\n"
        "for i in range(50):\n"
        "    time.sleep(0.02)\n"
        "    bar.set(skipped=i)\n"
        "    bar.update(1)\n"
        "bar.close()\n")
    log = tmp_path / "job.log"
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    text = log.read_text()
    assert p.returncode == 0, text
    lines = [m.groups() for m in LINE.finditer(text)]
    assert len(lines) >= 3, text  # ~1 s of work at 0.1 s intervals
    done = [int(d) for d, _ in lines]
    assert done == sorted(done) and 0 < done[0] < 50
    assert all(int(s) == d - 1 for d, s in ((int(d), s) for d, s in lines))  # the counter rides along
    assert re.search(r"work: done 50 img in \S+ \([\d.,]+ img/s\)", text), text
    rec = json.loads((tmp_path / ".progress" / "work.rank0.json").read_text())
    assert rec["done"] == 50 and rec["final"] and rec["counters"] == {"skipped": 49}


def test_rank_zero_sums_the_ranks_progress_files(tmp_path):
    """No collective per item: each rank writes its counts, rank 0's line adds them up."""
    r0 = Progress(100, "embed", DistContext(rank=0, world_size=2), share_dir=tmp_path, every_s=0)
    r1 = Progress(60, "embed", DistContext(rank=1, world_size=2), share_dir=tmp_path, every_s=0)
    r1.update(30)
    r0.update(10)
    assert r0.line().startswith("embed: 40/160 img (25.0%)")
    same = Progress(50, "train", DistContext(rank=0, world_size=2), unit="step", share_dir=tmp_path, every_s=0,
                    replicated=True)  # every rank runs the same steps: never summed
    same.update(5)
    assert same.line().startswith("train: 5/50 step (10.0%)")
    alone = Progress(100, "assign", DistContext(rank=0, world_size=2), unit="row", every_s=0)
    alone.update(10)  # no share dir: its own share times the world size, said so
    assert alone.line().startswith("assign: 20/200 row") and "(rank 0 x 2, estimated)" in alone.line()
    for b in (r0, r1, same, alone):
        b.close()


def _status(run_dir) -> dict:
    from launch.status import describe, stage_dirs
    return {stage: describe(stage, folder) for stage, folder in stage_dirs(run_dir)}


def test_status_of_finished_killed_and_failed_stages(tmp_path, capsys):
    write_shards(tmp_path / "shards", 2, 16)
    for d in ("done", "killed", "failed", "fresh"):
        (tmp_path / d).mkdir()
    # finished
    done_run = tmp_path / "done"
    p = run_embed(tiny_args(done_run, str(tmp_path / "shards" / "{00000..00001}.tar"), done_run / "store"))
    assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    st = _status(done_run)["embed"]
    assert st["state"] == "done" and st["progress"]["done"] == 32 and st["progress"]["final"]
    # killed mid-way: "stopped", with how far it got from the progress file. Enough images that
    # the run cannot finish between the progress file's 32 and the kill: 128 of them took
    # well under the 0.2 s progress period on a fast CPU (the status then said "done")
    killed = tmp_path / "killed"
    write_shards(tmp_path / "many", 64, 48)
    p = run_embed(tiny_args(killed, str(tmp_path / "many" / "{00000..00063}.tar"), killed / "store",
                            "embed.workers=1", "run.log_every_s=0.2"), start_new_session=True)
    rec = killed / "store" / ".progress" / "embed.rank0.json"
    deadline = time.time() + 240
    while p.poll() is None and time.time() < deadline:
        if rec.is_file() and json.loads(rec.read_text())["done"] >= 32:
            break
        time.sleep(0.05)
    assert p.poll() is None, "finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    st = _status(killed)["embed"]
    assert st["state"] == "stopped" and "is gone" in st["detail"]
    assert 32 <= st["progress"]["done"] < 64 * 48  # total unknown: these shards have no parquet sidecar
    # failed: the one error line and its exit code
    failed = tmp_path / "failed"
    (failed / "store").mkdir()
    (failed / "store" / "notes.txt").write_text("a folder in use")  # a rerun into a used folder
    p = run_embed(tiny_args(failed, str(tmp_path / "nowhere" / "{00000..00001}.tar"), failed / "store"))
    assert p.wait(timeout=300) == 2  # a shard spec that matches no file: a config error
    st = _status(failed)["embed"]
    assert st["state"] == "failed" and st["exit_code"] == 2 and "matches no file" in st["detail"]
    # the command prints one line per stage folder
    from launch.status import cli
    assert cli([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and {ln.split()[1] for ln in out} == {"done", "stopped", "failed"}
    # a bad config caught before anything was written leaves no trace (the folder is removed)
    p = run_embed(tiny_args(tmp_path / "fresh", str(tmp_path / "nowhere" / "{00000..00001}.tar"),
                            tmp_path / "fresh" / "store"))
    assert p.wait(timeout=300) == 2 and not (tmp_path / "fresh" / "store").exists()
