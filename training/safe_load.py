"""The one reader of weights files, and no pickled code from them.

Every read of weights goes through here: `train.init_from`, `train.init_centers_from`, a resume
(on every rank), `mlcd export` and eval's `checkpoint`/`hf` models. A file that cannot be used
becomes one `WeightsError` line naming the file and the reason (exit 1: a bad input file):
a refused pickle (`UnsafeCheckpoint`), a bad safetensors header, a truncated or foreign file,
a wrong shape, an index.json entry escaping its folder (refused before anything is read).

Pickles: DeepSpeed 0.19 loads its own files with ``torch.load(..., weights_only=False)``
(``TorchCheckpointEngine.load`` for resume, ``zero_to_fp32`` for export and re-sharding), which
would run any code a crafted checkpoint pickles. torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``
turns every load into a weights-only load (torch >= 2.4 reads it per call), and
``safe_globals`` admits the few plain DeepSpeed types its ZeRO optimizer states hold (a loss
scaler, the ZeRO stage enum, fragment addresses: data only, nothing callable).

Ranks: `every_rank_reads(ctx, fn)` is the multi-rank form (each rank reads its own files; one
rank's bad file stops every rank with that rank's line, printed once by rank 0), and
`check_torch_files` reads only the pickled structure of files (mmap: no tensor bytes), so a
resume can refuse a bad rank file before DeepSpeed's loader enters any collective.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.core.config import ConfigError
from pipeline.core.errors import InputError, StageError

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
STATE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
HF_INDEX = "model.safetensors.index.json"
T = TypeVar("T")
# What reading a broken file raises (torch: RuntimeError for a bad zip / truncated storage,
# EOFError for a short pickle; safetensors: SafetensorError; DeepSpeed: KeyError / ValueError
# / AssertionError for a file that lacks its keys or has the wrong shapes).
READ_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, AssertionError,
               IndexError, zipfile.BadZipFile, SafetensorError, UnicodeDecodeError)


class WeightsError(InputError):
    """A weights file that cannot be used (unreadable, truncated, bad header, wrong shape, a path
    escaping its folder): one line naming the file, exit 1."""


class UnsafeCheckpoint(WeightsError):
    """A checkpoint file holds something a weights-only load may not build (pickled code)."""


def deepspeed_types() -> list:
    """The DeepSpeed classes found in its ZeRO 0-3 checkpoints (fp32/bf16/fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _reason(e: BaseException) -> str:
    """One line for a read error (an OSError names its own file: kept, the caller names ours)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"unreadable ({type(e).__name__}: {first})" if first else f"unreadable ({type(e).__name__})"


@contextmanager
def weights_only_loads(where: str | Path, deepspeed: bool = True) -> Iterator[None]:
    """Every torch.load in the block is weights-only. A refused pickle raises UnsafeCheckpoint,
    any other read error a WeightsError; both name `where` (one line, exit 1). Errors of the
    process group (a peer that died), a full disk and user errors keep their own type.
    deepspeed=False: plain state files (no DeepSpeed types admitted, deepspeed not imported)."""
    old = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_types() if deepspeed else []):
            yield
    except pickle.UnpicklingError as e:
        m = re.search(r"(?:Unsupported global|GLOBAL) ?:? ?(?:GLOBAL )?([\w.]+)", str(e))
        what = f"the pickled global {m.group(1)}" if m else str(e).splitlines()[0]
        raise UnsafeCheckpoint(f"{where}: refused to load {what} (checkpoints are read weights-only: "
                               f"tensors and plain data; this file was not written by our trainer "
                               f"or was altered)") from None
    except (StageError, ConfigError):
        raise
    except READ_ERRORS as e:
        if isinstance(e, torch.distributed.DistError) or _is_disk_full(e):
            raise
        raise WeightsError(f"{where}: {_reason(e)}") from None
    finally:
        if old is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = old


def _is_disk_full(e: BaseException) -> bool:
    import errno
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))


# ---------------------------------------------------------------- state files and HF folders

def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A bare state file: .safetensors or a torch .pt/.pth/.bin (weights-only: no pickled code
    runs). A {"module": ..} / {"state_dict": ..} / {"model": ..} wrapper is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such state file")
    if path.suffix not in STATE_SUFFIXES:
        raise WeightsError(f"{path}: a state file must end in {', '.join(STATE_SUFFIXES)}")
    with weights_only_loads(path, deepspeed=False):
        if path.suffix == ".safetensors":
            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("module", "state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise WeightsError(f"{path}: not a state dict of named tensors")
    return sd


def inside(folder: Path, name: object, where: Path) -> Path:
    """folder/name for a file an index names, refused unless it is a plain relative path inside
    the folder (no absolute path, drive or `..`): checked before anything is read."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise WeightsError(f"{where}: entry {name!r} is not a file name")
    posix, win = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or win.is_absolute() or win.drive or ".." in posix.parts or ".." in win.parts:
        raise UnsafeCheckpoint(f"{where}: refused entry {name!r}: it points outside {folder} "
                               "(an index may only name files inside its own folder)")
    return folder / name


def hf_weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a HF folder, in load order: model.safetensors, the shards its
    index.json names (each checked to stay inside the folder first), or pytorch_model.bin."""
    folder = Path(folder)
    index = folder / HF_INDEX
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
            if not isinstance(wmap, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: {_reason(e)}") from None
        files = [inside(folder, n, index) for n in sorted(set(map(str, wmap.values())))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{index}: names {missing[0]}, which is not in {folder}")
        return files
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    raise WeightsError(f"{folder}: no model.safetensors, {HF_INDEX} or pytorch_model.bin")


def read_hf_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF folder (see hf_weight_files), weights-only."""
    sd: dict[str, torch.Tensor] = {}
    for f in hf_weight_files(folder):
        sd.update(read_state_file(f))
    return sd


def check_torch_files(paths: Iterable[Path]) -> None:
    """Reads the pickled structure of torch files (mmap: no tensor bytes), weights-only: a bad
    pickle, a truncated zip or a missing file is a WeightsError naming the file, found before a
    loader that talks to other ranks is entered."""
    for p in paths:
        with weights_only_loads(p):
            torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))


# ---------------------------------------------------------------- every rank agrees

def every_rank_reads(ctx, fn: Callable[[], T]) -> T:
    """Every rank runs ``fn`` (reading its own files); if it fails on any rank with a user error
    (a WeightsError, ...), every rank raises the error of the lowest failing rank, marked
    ``agreed`` so rank 0 alone prints it (pipeline/core/entry.py:report). No rank goes on to a
    collective a failed peer never reaches. Costs one all_gather_object per call."""
    if ctx is None or not ctx.distributed:  # one process (ctx None: a PartialFC built bare)
        return fn()
    out, err = None, None
    try:
        out = fn()
    except (StageError, ConfigError) as e:
        err = e
    errs = ctx.all_gather_object(err)
    first = next((e for e in errs if e is not None), None)
    if first is not None:
        first.agreed = True
        raise first
    return out  # type: ignore[return-value]  # fn() returned (no rank raised)
