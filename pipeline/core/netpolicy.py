"""What a run may reach outside its files: the one place that decides.

Off unless the run config says so (``run.allow_download``, ``run.allow_pipe``,
``run.allow_remote``):
- downloads: HF hub / transformers go offline (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, also
  patched into an already imported ``huggingface_hub``), and an open_clip ``pretrained`` tag is
  refused unless it is a local file or its weights are already in the HF cache (open_clip would
  otherwise fetch them, some from plain URLs that ignore HF's offline switch);
- ``pipe:`` shard specs (webdataset runs them with a shell), and remote shard URLs.

``apply(run)`` is called once by each stage entry (``pipeline/core/guard.py``) before any work; it
records the policy in the environment, so DataLoader workers and subprocesses inherit it. A
library caller that never calls ``apply`` gets the safe default: everything off.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.core.errors import ConfigError

_DOWNLOAD, _PIPE, _REMOTE = "MLCD_ALLOW_DOWNLOAD", "MLCD_ALLOW_PIPE", "MLCD_ALLOW_REMOTE"


def apply(run) -> None:
    """Sets the policy of ``run`` (a RunConfig) for this process and its children."""
    for var, on in ((_DOWNLOAD, run.allow_download), (_PIPE, run.allow_pipe), (_REMOTE, run.allow_remote)):
        os.environ[var] = "1" if on else "0"
    offline = "0" if run.allow_download else "1"
    os.environ.update(HF_HUB_OFFLINE=offline, TRANSFORMERS_OFFLINE=offline, HF_DATASETS_OFFLINE=offline)
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:  # read at import time: an imported hub would not see the variable
        setattr(hub, "HF_HUB_OFFLINE", not run.allow_download)  # noqa: B010 -- a module's global


def _on(var: str) -> bool:
    return os.environ.get(var, "0") == "1"


def download_allowed() -> bool:
    return _on(_DOWNLOAD)


def pipe_allowed() -> bool:
    return _on(_PIPE)


def remote_allowed() -> bool:
    return _on(_REMOTE)


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def check_open_clip(model: str, pretrained: str | None, key: str = "pretrained") -> None:
    """Refuses an open_clip ``pretrained`` tag that would download weights (one line, exit 2)."""
    if not pretrained or download_allowed() or Path(pretrained).is_file():
        return
    import open_clip.pretrained as ocp
    cfg = ocp.get_pretrained_cfg(model, pretrained) or {}
    if cfg.get("hf_hub") and _hf_cached(cfg["hf_hub"]):
        return  # HF_HUB_OFFLINE makes open_clip read the cached copy
    raise ConfigError(f"{key}={pretrained!r} (open_clip {model}): its weights are not local and "
                      f"downloads are off; give a weights file, or set run.allow_download=true")


def _hf_cached(hub: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    repo, filename = os.path.split(hub)  # open_clip's convention: 'org/model/' = default file names
    names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)
