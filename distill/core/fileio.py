"""Files: atomic writes (a crash or a full disk never leaves a half-written file in place), JSON and
text, SHA-256 digests, folders that appear only when complete, the clean-up of what an interrupted
write left behind, and the check of names that become parts of paths."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from distill.core.errors import UserError

log = logging.getLogger(__name__)
# Names of what an interrupted write leaves behind: ``.<name>.tmp-<random><suffix>`` (atomic_write),
# ``.<name>.partial-<random>`` (a staged folder) and ``.<name>.old-<random>`` (a folder being replaced).
TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.tmp-[A-Za-z0-9_]+(\.[A-Za-z0-9]+)?$")
PARTIAL_DIR = re.compile(r"^\.(?P<name>.+)\.partial-[A-Za-z0-9_]+$")
OLD_DIR = re.compile(r"^\.(?P<name>.+)\.old-[A-Za-z0-9_]+$")
_OS_ERROR_IN_TEXT = re.compile(r"(?:I/O error: )?(?P<reason>[^:]+?) \(os error \d+\)")


def io_failure(e: BaseException) -> str | None:
    """The reason of a failed read or write (``No space left on device``), or None if ``e`` is not one.

    Besides OSError this recognises the errors of writers that wrap it in their own type
    (safetensors, and MindSpore's safetensors writer through it: ``... (os error 28)``).
    """
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    m = _OS_ERROR_IN_TEXT.search(str(e))
    return m.group("reason") if m and type(e).__name__ == "SafetensorError" else None


def atomic_write(path: Path, write: Callable[[str], object], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, then rename it over ``path``.

    ``suffix`` is the temp file's ending, for writers that add or require one (``np.savez``
    appends ``.npz``; MindSpore's safetensors writer wants ``.safetensors``). A failed write
    removes the temp file and leaves any previous ``path`` untouched; an OSError (e.g. a full
    disk) becomes a one-line UserError.
    """
    path = Path(path)
    tmp = ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        reason = io_failure(e)
        if reason is None:
            raise
        raise UserError(f"could not write {path}: {reason}") from e
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


def check_name(name: object, what: str) -> str:
    """``name`` if it can be one part of a path: not empty, no separator, not ``.``/``..``, no leading dot."""
    text = "" if name is None else str(name)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", text) or text in (".", ".."):
        raise UserError(f"{what}: name {text!r} is used in file names: letters, digits, _ . - only "
                        "(not empty, no path separator, no leading dot)")
    return text


def recover_folder(dest: Path) -> None:
    """Undo what an interrupted :func:`staged_folder` left beside ``dest``: a folder moved aside
    to be replaced comes back if ``dest`` is gone (else it is removed), partial folders are removed."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return
    for p in sorted(dest.parent.glob(f".{dest.name}.*")):
        old, partial = OLD_DIR.match(p.name), PARTIAL_DIR.match(p.name)
        if not p.is_dir() or not ((old or partial) and (old or partial).group("name") == dest.name):
            continue
        if old and not dest.exists():
            os.rename(p, dest)
            log.warning("restored %s, which an interrupted replacement had moved aside", dest)
        else:
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed %s left by an interrupted write", p)


def clean_leftovers(root: Path) -> None:
    """Remove the temp files and folders interrupted writes left anywhere under ``root`` and restore
    folders an interrupted replacement moved aside (call it only while holding the run's lock)."""
    root = Path(root)
    if not root.is_dir():
        return
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        for name in files:
            if TEMP_FILE.match(name):
                (here / name).unlink(missing_ok=True)
                log.info("removed %s left by an interrupted write", here / name)
        for name in list(dirs):
            m = OLD_DIR.match(name) or PARTIAL_DIR.match(name)
            if m:
                recover_folder(here / m.group("name"))
                dirs.remove(name)


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
    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        recover_folder(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        yield tmp
        for p in tmp.rglob("*"):  # mindspore writes owner-read-only files; a bundle is for sharing
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        _swap_into_place(tmp, dest, overwrite)
    except Exception as e:
        reason = io_failure(e)
        if reason is None:
            raise
        name = str(getattr(e, "filename", None) or "")
        where = dest / Path(name).relative_to(tmp) if tmp is not None and name.startswith(f"{tmp}/") else dest
        raise UserError(f"could not write {where}: {reason}") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
