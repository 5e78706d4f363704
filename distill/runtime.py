"""Device, seed and execution-mode set-up, shared by every task."""
from __future__ import annotations

import logging
import os

import mindspore as ms

from distill.errors import UserError

DEVICES = ("CPU", "GPU", "Ascend")
log = logging.getLogger(__name__)


def setup_runtime(device: str = "CPU", seed: int = 0, deterministic: bool = True) -> None:
    """Select the device target and seed MindSpore. Idempotent."""
    if device not in DEVICES:
        raise UserError(f"device '{device}' is not one of {', '.join(DEVICES)}")
    os.environ.setdefault("GLOG_v", "3")  # keep MindSpore's C++ logging to errors
    try:
        ms.set_device(device)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"device '{device}' is not available here ({str(e).splitlines()[0]})") from e
    if deterministic:
        ms.set_deterministic(True)
    ms.set_seed(seed)
