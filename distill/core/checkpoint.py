"""Training checkpoints: one safetensors file (no pickle) with a JSON metadata header.

Writes are atomic (:func:`distill.core.fileio.atomic_write`), so a crash or a full disk never
leaves a half-written checkpoint in place of the last good one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from safetensors import safe_open

from distill.core.errors import UserError
from distill.core.fileio import atomic_write

CHECKPOINT_NAME = "checkpoint.safetensors"  # a training run's checkpoint inside its output folder


def save_checkpoint(path: Path, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    header = {"meta": json.dumps(meta, sort_keys=True)}
    atomic_write(Path(path), lambda tmp: save_file(arrays, tmp, metadata=header))


def load_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), "np") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} is corrupt or not a safetensors file ({str(e).splitlines()[0]})") from e
    return tensors, meta


def read_meta(path: Path) -> dict[str, Any]:
    """Only the metadata header (cheap: no tensors read)."""
    try:
        with safe_open(str(path), "np") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}"))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} is corrupt or not a safetensors file ({str(e).splitlines()[0]})") from e
