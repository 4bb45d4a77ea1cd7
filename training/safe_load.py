"""No pickled code from checkpoint files: every ``torch.load`` inside ``weights_only_loads()``
runs with ``weights_only=True``, DeepSpeed's included.

DeepSpeed 0.19 loads its own files with ``torch.load(..., weights_only=False)``
(``TorchCheckpointEngine.load`` for resume, ``zero_to_fp32`` for export and re-sharding), which
would run any code a crafted checkpoint pickles. torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``
turns every load into a weights-only load (torch >= 2.4 reads it per call), and
``safe_globals`` admits the few plain DeepSpeed types its ZeRO optimizer states hold (a loss
scaler, the ZeRO stage enum, fragment addresses: data only, nothing callable). Anything else is
refused with one line naming the checkpoint and the global it tried to load.
"""
from __future__ import annotations

import os
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from pipeline.errors import InputError

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpoint(InputError):
    """A checkpoint file holds something a weights-only load may not build."""


def deepspeed_types() -> list:
    """The DeepSpeed classes found in its ZeRO 0-3 checkpoints (fp32/bf16/fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads(where: str | Path) -> Iterator[None]:
    """Every torch.load in the block is weights-only; a refused file raises UnsafeCheckpoint."""
    old = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_types()):
            yield
    except pickle.UnpicklingError as e:
        m = re.search(r"(?:Unsupported global|GLOBAL) ?:? ?(?:GLOBAL )?([\w.]+)", str(e))
        what = f"the pickled global {m.group(1)}" if m else str(e).splitlines()[0]
        raise UnsafeCheckpoint(f"{where}: refused to load {what} (checkpoints are read weights-only: "
                               f"tensors and plain data; this file was not written by our trainer "
                               f"or was altered)") from None
    finally:
        if old is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = old
