"""One writer per run dir: ``<run dir>/.lock``, held with ``flock`` and naming its owner (pid, host).

The kernel releases a ``flock`` when its process dies (even by ``kill -9``), so a lock left by a dead
process is free to take: the new owner logs that it took it over. A lock held by a live process
refuses the second run with one line naming the owner. The file stays in place between runs (an
unlinked lock file could be held by two processes at once); only its content changes.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from distill.core.errors import UserError
from distill.core.fileio import io_failure

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


def _owner(path: Path) -> dict[str, Any]:
    try:
        owner = json.loads(path.read_text() or "{}")
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("since", 0))))
    return f"pid {owner.get('pid')} on {owner.get('host')} (task={owner.get('task')}, since {since})"


@contextlib.contextmanager
def run_lock(run_dir: Path, task: str) -> Iterator[Path]:
    """Hold ``run_dir``'s lock while the block runs; a second holder is refused with a UserError."""
    path = Path(run_dir) / LOCK_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"could not write {path}: {io_failure(e)}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"run dir {run_dir} is in use by {_describe(_owner(path))}; wait for it to finish "
                            "or use another run_dir / run_name") from None
        previous = _owner(path)
        if previous:  # held by nobody, yet it names an owner: that process ended without releasing it
            log.warning("run dir %s: took over the lock of %s, which is no longer running", run_dir,
                        _describe(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "task": task, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # released: an empty lock file names nobody
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
