"""Training checkpoints: one safetensors file (no pickle) with a JSON metadata header.

Writes are atomic (:func:`distill.core.fileio.atomic_write`), so a crash or a full disk never
leaves a half-written checkpoint in place of the last good one. The header carries a SHA-256 of
the metadata and of every tensor (name, dtype, shape, bytes), checked on every load: a flipped
byte anywhere in the file is refused with the file's name, never used.
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
from distill.core.fileio import atomic_write, digest

CHECKPOINT_NAME = "checkpoint.safetensors"  # a training run's checkpoint inside its output folder
DIGEST_KEY = "sha256"  # header key of the content digest (checkpoints written before it have none)


def content_digest(tensors: Mapping[str, np.ndarray], meta_text: str) -> str:
    """SHA-256 of the metadata text and of every tensor's name, dtype, shape and bytes, by name."""
    parts: list[Any] = [meta_text.encode()]
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        parts += [f"{name}|{a.dtype.str}|{a.shape}".encode(), a]
    return digest(*parts)


def save_checkpoint(path: Path, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    meta_text = json.dumps(meta, sort_keys=True)
    header = {"meta": meta_text, DIGEST_KEY: content_digest(arrays, meta_text)}
    atomic_write(Path(path), lambda tmp: save_file(arrays, tmp, metadata=header))


def load_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), "np") as f:
            header = f.metadata() or {}
        meta_text = header.get("meta", "{}")
        meta = json.loads(meta_text)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} is corrupt or not a safetensors file ({str(e).splitlines()[0]})") from e
    if DIGEST_KEY in header and header[DIGEST_KEY] != content_digest(tensors, meta_text):
        raise UserError(f"checkpoint {path} fails its SHA-256 check (the file was altered or is corrupt); "
                        "restore it or remove it to train again")
    return tensors, meta


def read_meta(path: Path) -> dict[str, Any]:
    """Only the metadata header (cheap: no tensors read)."""
    try:
        with safe_open(str(path), "np") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}"))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} is corrupt or not a safetensors file ({str(e).splitlines()[0]})") from e
