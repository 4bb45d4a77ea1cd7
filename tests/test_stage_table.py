"""The stage table (pipeline/core/stages.py) is the one list of stages: everything else that lists
stages is generated from it or checked against it here (mlcd's help and dispatch, the config
sections, `mlcd check`, the Makefile's stage targets, the SLURM template, launch/env.sh, the
bench runner, and every stage module's entry tail)."""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import shutil
import subprocess
from dataclasses import dataclass, field

import pytest
from conftest import ROOT

from pipeline.core.stages import BENCHES, STAGES, launchable, schema, schemas, sections

BASH = shutil.which("bash")
CONFIG_STAGES = [n for n, s in STAGES.items() if s.section and not s.tool]


def sh(script: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **env})


# --- the table itself ---------------------------------------------------------------------------

def test_table_entries_name_real_modules_and_schemas():
    for name, s in STAGES.items():
        path = ROOT / (s.module.replace(".", "/") + ".py")
        assert path.is_file(), (name, s.module)
        if s.section:
            assert dataclasses.is_dataclass(schema(s.section)), (name, s.schema)
        assert bool(s.section) == bool(s.schema), name
        if s.torchrun and not s.tool:
            assert s.shell and s.slurm, f"{name}: a rank stage the shell launchers and SLURM start"


def test_config_sections_and_check_come_from_the_table():
    from launch import check
    from pipeline.core import config
    assert config.SECTIONS == sections() == tuple(schemas())
    assert "bench" not in config.SECTIONS  # had no schema
    assert set(check.schemas()) == set(sections())
    assert {p.stem for p in (ROOT / "configs/defaults").glob("*.yaml")} == set(sections())
    with pytest.raises(config.ConfigError, match="unknown section 'bench'"):
        config.load_sections(None, ["bench.x=1"], {"run": config.RunConfig})


# --- every stage module's tail is the one entry path --------------------------------------------

@pytest.mark.parametrize("name", CONFIG_STAGES)
def test_stage_module_tail_goes_through_stage_main(name):
    """``main`` is one ``return stage_main("<name>", ...)`` and ``python -m`` calls
    ``stage_cli("<name>")``: no stage keeps its own copy of the entry."""
    tree = ast.parse((ROOT / (STAGES[name].module.replace(".", "/") + ".py")).read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert [a.arg for a in main.args.args] == ["config", "overrides", "instance"]
    (ret,) = main.body
    assert isinstance(ret, ast.Return) and isinstance(ret.value, ast.Call)
    assert ast.unparse(ret.value.func) == "stage_main" and ast.literal_eval(ret.value.args[0]) == name
    guard = next(n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
    assert ast.unparse(guard.body[-1]) == f"stage_cli({name!r})"
    assert not [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "cli"]


# --- mlcd ---------------------------------------------------------------------------------------

def test_mlcd_help_lists_exactly_the_table(capsys):
    from launch import cli
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    rows = out.split("\ncommands:\n")[1].split("\n\n")[0].splitlines()
    assert [r.split()[0] for r in rows] == list(STAGES)
    assert [r.split()[0] for r in rows if r.split()[1] == "*"] == [n for n, s in STAGES.items() if s.torchrun]
    for (word, sub), target in cli.ALIASES.items():
        assert target in STAGES and cli.parse([word, sub])[0].name == target


def test_unknown_command_lists_the_stages(capsys):
    from launch import cli
    assert cli.main(["bogus", "--config", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mlcd: unknown command 'bogus'")
    assert err.split("one of: ")[1].split(" (")[0].split(", ") == list(STAGES)


@pytest.mark.parametrize("argv,msg", [
    (["train", "--nproc", "abc"], "--nproc expects a whole number >= 1, got 'abc'"),
    (["train", "--nnodes", "0"], "--nnodes expects a whole number >= 1, got '0'"),
    (["train", "--nproc=-2"], "--nproc expects a whole number >= 1, got '-2'"),
    (["embed", "--nproc"], "--nproc expects a whole number >= 1"),
    (["export@x", "a", "b"], None),
    (["cluster@", "--config", "x"], None),
])
def test_bad_mlcd_lines_are_one_line_exit_2(argv, msg, capsys):
    from launch import cli
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mlcd: ")
    if msg:
        assert err.strip() == f"mlcd: {msg}"


def test_version_is_the_projects(capsys):
    from launch import cli
    assert cli.main(["--version"]) == 0
    want = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert capsys.readouterr().out.strip() == f"mlcd {want}"


def test_named_instance_and_ranks_reach_the_stage():
    """`mlcd cluster@regions --nproc 2 ...`: the cluster module under torchrun with
    `--instance regions`; in one process the same arguments reach the module's main."""
    from launch import cli
    from pipeline.core.entry import stage_args
    stage, rest, nproc, nnodes = cli.plan(["cluster@regions", "--nproc", "2", "--config", "f.yaml", "cluster.k=3"])
    assert (stage.name, rest, nproc, nnodes) == ("cluster", ["--instance", "regions", "--config", "f.yaml",
                                                             "cluster.k=3"], 2, 1)
    cmd = cli.torchrun_cmd(stage.module, rest, nproc, nnodes)
    assert cmd[cmd.index("-m", 3):] == ["-m", "clustering.kmeans", *rest]
    args = stage_args("cluster", [*rest, "--local_rank=3"])
    assert (args.config, args.instance, args.overrides) == ("f.yaml", "regions", ["cluster.k=3"])
    stage, rest, nproc, _ = cli.plan(["data", "rice", "data.workers=1"])  # a one-process stage
    assert (stage.name, rest, nproc) == ("data-rice", ["data.workers=1"], 1)
    stage, rest, nproc, _ = cli.plan(["demo", "--nproc", "3"])  # a tool's own --nproc is its own
    assert (stage.name, rest, nproc) == ("demo", ["--nproc", "3"], 1)


@pytest.mark.parametrize("argv,line", [
    (["train", "--steps", "10"], "mlcd train: unknown option --steps; did you mean train.steps=10?"),
    (["cluster", "--k=5"], "mlcd cluster: unknown option --k; did you mean cluster.k=5?"),
    (["embed", "--out-dir", "x"], "mlcd embed: unknown option --out-dir; did you mean run.out_dir=x or "
                                  "embed.out_dir=x?"),
    (["assign", "--bogus-key"], "mlcd assign: unknown option --bogus-key; settings are key=value "
                                "(mlcd assign --help lists them)"),
])
def test_unknown_flag_names_the_key_it_may_mean(argv, line, capsys):
    from launch import cli
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and capsys.readouterr().err == line + "\n"


@pytest.mark.parametrize("name", CONFIG_STAGES)
def test_stage_help_lists_every_key_of_its_section(name, capsys):
    from launch import cli
    from pipeline.core.keys import keys
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    listed = {ln.split()[0] for ln in out.split("settings (")[1].splitlines()[1:] if ln.strip()}
    section = STAGES[name].section
    assert listed == {k.name for k in keys(schema(section), section)} | {k.name for k in keys(schema("run"), "run")}
    if STAGES[name].shell:
        assert f"launch/slurm/stage.sbatch {name} CONFIG" in out


def test_check_help_and_tools_parse_their_own_arguments(capsys):
    from launch import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["check", "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: mlcd check")
    assert cli.main(["check", "--config", str(ROOT / "configs/debug.yaml"), "train.steps=0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@dataclass
class _Documented:
    plain: int = 1  # beside the field
    # above the field,
    # on two lines
    above: str = "x"
    meta: float = field(default=0.5, metadata={"doc": "from the field's metadata"})  # not this
    bare: bool = False


@dataclass
class _Outer:
    inner: _Documented = field(default_factory=_Documented)
    top: list[int] = field(default_factory=list)  # a list stays one key


def test_key_docs_come_from_the_dataclass():
    from pipeline.core.keys import keys, suggest
    got = {k.name: (k.type, k.default, k.doc) for k in keys(_Outer, "s")}
    assert got == {"s.inner.plain": ("int", 1, "beside the field"),
                   "s.inner.above": ("str", "x", "above the field, on two lines"),
                   "s.inner.meta": ("float", 0.5, "from the field's metadata"),
                   "s.inner.bare": ("bool", False, ""),
                   "s.top": ("list[int]", [], "a list stays one key")}
    assert suggest("--plain", "3", {"s": _Outer}) == ["s.inner.plain=3"]
    assert dataclasses.is_dataclass(_Outer)


# --- shell launchers, make, SLURM, bench --------------------------------------------------------

def test_env_sh_launches_exactly_the_launchable_stages():
    for name, s in STAGES.items():
        p = sh(f"source launch/env.sh && launch_module {name}")
        if s.shell:
            assert (p.returncode, p.stdout.strip()) == (0, s.module), name
        else:
            assert p.returncode == 2 and f"unknown stage '{name}'" in p.stderr, name


@pytest.mark.skipif(not shutil.which("make"), reason="make not installed")
def test_makefile_stage_targets_are_the_table():
    p = subprocess.run(["make", "-pn", "-f", "Makefile"], cwd=ROOT,
                       capture_output=True, text=True)
    m = re.search(r"^STAGE_TARGETS := (.*)$", p.stdout, re.MULTILINE)
    assert m and m.group(1).split() == launchable(), p.stderr[-2000:]
    for name in launchable():
        p = subprocess.run(["make", "-n", name, "CONFIG=c.yaml", "ARGS=run.seed=1", "NPROC=2"], cwd=ROOT,
                           capture_output=True, text=True)
        assert f"NPROC=2 NNODES=1 bash launch/torchrun.sh {name} c.yaml run.seed=1" in p.stdout.splitlines(), \
            (name, p.stdout, p.stderr)


SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_GPUS_ON_NODE": "8", "DRY_RUN": "1"}


def test_one_slurm_template_takes_any_launchable_stage(tmp_path):
    assert sorted(p.name for p in (ROOT / "launch/slurm").iterdir()) == ["common.sh", "stage.sbatch"]
    for name in launchable():
        p = subprocess.run([BASH, str(ROOT / "launch/slurm/stage.sbatch"), name, "c.yaml", "run.seed=1"],
                           cwd=tmp_path, capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin", "SLURM_SUBMIT_DIR": str(ROOT), **SLURM_ENV})
        assert p.returncode == 0, (name, p.stderr)
        node = [ln.split() for ln in p.stdout.splitlines() if ln.startswith(("/", "python")) and " -m " in ln]
        assert len(node) == 1, p.stdout
        module = STAGES[name].module
        args = ["c.yaml", "run.seed=1"] if name in ("export", "envcheck") else ["--config", "c.yaml", "run.seed=1"]
        assert node[0][node[0].index(module) - 1:] == ["-m", module, *args], (name, node)
    p = subprocess.run([BASH, str(ROOT / "launch/slurm/stage.sbatch"), "demo", "c.yaml"], cwd=tmp_path,
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **SLURM_ENV,
                                                            "SLURM_SUBMIT_DIR": str(ROOT)})
    assert p.returncode == 2 and "unknown stage 'demo'" in p.stderr and "srun" not in p.stdout


def test_bench_runner_reads_the_table(capsys):
    from launch import bench
    assert bench.BENCHES is BENCHES
    for name, mods in BENCHES.items():
        assert name in STAGES
        for mod in mods:
            spec = importlib.util.find_spec(mod)
            assert spec and "def run_bench(quick" in open(spec.origin).read(), mod
    with pytest.raises(SystemExit) as e:
        bench.cli(["--only", "embed,bogus"])
    assert e.value.code == 2 and "--only bogus: no bench" in capsys.readouterr().err
