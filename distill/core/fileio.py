"""Files: atomic writes (a crash or a full disk never leaves a half-written file in place), JSON and
text, SHA-256 digests, and folders that appear only when complete."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from distill.core.errors import UserError


def atomic_write(path: Path, write: Callable[[str], object], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, then rename it over ``path``.

    ``suffix`` is the temp file's ending, for writers that add or require one (``np.savez``
    appends ``.npz``; MindSpore's safetensors writer wants ``.safetensors``). A failed write
    removes the temp file and leaves any previous ``path`` untouched; an OSError (e.g. a full
    disk) becomes a one-line UserError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"could not write {path}: {e.strerror or e}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (with a final newline) to ``path`` atomically."""
    return write_text(path, json_text(obj))


def json_text(obj: Any) -> str:
    """``obj`` as the project writes JSON files: indented by 2, a final newline."""
    return json.dumps(obj, indent=2) + "\n"


def sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest(*parts: bytes | np.ndarray) -> str:
    """SHA-256 (hex) of byte strings and arrays in order (an array counts as its C-order bytes)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


def _swap_into_place(tmp: Path, dest: Path, overwrite: bool) -> None:
    if not dest.exists():
        os.rename(tmp, dest)
        return
    if not overwrite:
        raise UserError(f"bundle {dest} already exists (set publish.overwrite=true to replace it)")
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(dest: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty sibling folder of ``dest``; on success it becomes ``dest``, on failure it is removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield tmp
        for p in tmp.rglob("*"):  # mindspore writes owner-read-only files; a bundle is for sharing
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        _swap_into_place(tmp, dest, overwrite)
    except OSError as e:
        raise UserError(f"could not publish to {dest}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
