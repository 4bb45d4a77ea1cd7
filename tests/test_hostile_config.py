"""Hostile and broken run files and overrides: each one is refused in one line naming the file,
key or override (ConfigError, exit 2), before any stage work, with no traceback and no payload run.
Table-driven: `load_config` directly for most cases, the `mlcd` CLI in a subprocess for a few."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

from pipeline.core.config import ConfigError, load_config
from training.config import TrainConfig

# 342 bytes that expand to 9^9 (~387M) strings: a "billion laughs" alias bomb
BOMB = ('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
        + "".join(f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")))
TAG = 'run:\n  seed: !!python/object/apply:os.system ["touch {marker}"]\n'

# (file text or bytes, overrides, what the one line must contain)
CASES = {
    "alias bomb": (BOMB, [], "alias bomb"),
    "python tag in file": (TAG, [], "could not determine a constructor"),
    "python tag override": ("", ['run.seed=!!python/object/apply:os.system ["touch {marker}"]'],
                            "could not determine a constructor"),
    "python name tag": ("train:\n  steps: !!python/name:os.system\n", [], "could not determine a constructor"),
    "base is a list": ("base: [a.yaml, b.yaml]\n", [], "base=['a.yaml', 'b.yaml']: must be one file name"),
    "base is an int": ("base: 3\n", [], "base=3: must be one file name"),
    "base missing": ("base: nowhere.yaml\n", [], "config file not found"),
    "not UTF-8": (b"train:\n  steps: 4\n# \xff\xfe caf\xe9\n", [], "not UTF-8 text"),
    "bad YAML file": ("train: [1\n", [], "not valid YAML"),
    "top level a list": ("- 1\n- 2\n", [], "top level must be a mapping"),
    "section a scalar": ("train: 3\n", [], "section 'train' must be a mapping"),
    "unknown section": ("trian: {}\n", [], "unknown section 'trian'"),
    "bad instance name": ("cluster@re-gions: {}\n", [], "unknown section 'cluster@re-gions'"),
    "too deep": ("train:\n  deepspeed:\n    extra: " + "[" * 40 + "]" * 40 + "\n", [], "nested deeper"),
    "flow nesting bomb": ("train: " + "[" * 200_000 + "\n", [], "nested deeper than 32"),
    "block nesting bomb": ("".join("  " * i + f"k{i}:\n" for i in range(100)), [], "nested deeper than 32"),
    "bad YAML override": ("", ["train.steps=[1"], "override 'train.steps=[1': not valid YAML"),
    "override without =": ("", ["train.steps"], "expected dotted.key=value"),
    "lr inf": ("", ["train.optim.lr=.inf"], "train.optim.lr=inf: must be a finite number"),
    "lr nan": ("", ["train.optim.lr=.nan"], "train.optim.lr=nan: must be a finite number"),
    "lr -inf in file": ("train:\n  optim:\n    lr: -.inf\n", [], "optim.lr=-inf: must be a finite number"),
    "loss scale inf": ("", ["train.loss.scale=.inf"], "train.loss.scale=inf: must be a finite number"),
    "margin nan": ("", ["train.loss.margin=.nan"], "train.loss.margin=nan"),
    "region weight inf": ("", ["train.regions.weight=.inf"], "train.regions.weight=inf"),
    "time budget inf": ("", ["train.time_budget_s=.inf"], "train.time_budget_s=inf"),
    "steps inf": ("", ["train.steps=.inf"], "train.steps"),
    "eps zero": ("", ["train.optim.eps=0"], "eps"),
}


def _file(tmp_path, text: str | bytes) -> str | None:
    if text == "":
        return None
    p = tmp_path / "hostile.yaml"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text.replace("{marker}", str(tmp_path / "pwned")))
    return str(p)


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_config_is_one_line(tmp_path, name):
    text, overrides, needle = CASES[name]
    path = _file(tmp_path, text)
    overrides = [o.replace("{marker}", str(tmp_path / "pwned")) for o in overrides]
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides, "train", TrainConfig)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and len(msg) < 500, msg
    assert path is None or "hostile.yaml" in msg or "nowhere.yaml" in msg  # names the file
    assert not (tmp_path / "pwned").exists()


def test_oversized_file_refused_before_parsing(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_text("train:\n  steps: 4\n" + "#" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"big.yaml: \d+ bytes; a run file is at most"):
        load_config(p, [], "train", TrainConfig)


@pytest.mark.parametrize("name,stage", [("alias bomb", "cluster"), ("python tag override", "cluster"),
                                        ("lr inf", "train")])
def test_hostile_config_through_mlcd(tmp_path, name, stage):
    """The same through `mlcd <stage>`: exit 2, one `config error:` line, no traceback, no payload.
    (The bomb is refused in well under the timeout; it used to run for minutes.)"""
    text, overrides, needle = CASES[name]
    path = _file(tmp_path, text)
    overrides = [o.replace("{marker}", str(tmp_path / "pwned")) for o in overrides]
    args = [*(["--config", path] if path else []), f"run.out_dir={tmp_path / 'run'}", *overrides]
    p = subprocess.run([sys.executable, "-m", "launch.cli", stage, *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu",
                                                    "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("config error:"), p.stderr[-2000:]
    assert needle in lines[0] and "Traceback" not in p.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "run").exists()
