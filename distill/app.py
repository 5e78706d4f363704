"""Dispatch ``task=...`` to its job; turn UserError into one line on stderr and exit 2."""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, Callable

from omegaconf import DictConfig

from distill.core.errors import UserError
from distill.core.runtime import current, is_main, setup_from_config
from distill.jobs.preflight import check_config

log = logging.getLogger("distill")

# task name -> "module:function"; imported lazily so `distill task=bench` loads only what it needs.
TASKS: dict[str, str] = {name: f"distill.jobs.{name}:run_{name}" for name in (
    "teacher", "targets", "distill", "progressive", "evaluate", "bench", "publish", "sample", "response", "pipeline")}
# Tasks every data-parallel worker runs (they train); the others run on rank 0 alone.
ALL_RANKS = ("teacher", "distill", "progressive", "pipeline")


def resolve_task(name: str) -> Callable[[DictConfig], Any]:
    if name not in TASKS:
        raise UserError(f"unknown task '{name}' (choose one of: {', '.join(TASKS)})")
    module, func = TASKS[name].split(":")
    try:
        job = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise UserError(f"task '{name}' is not available in this version ({e})") from e
    return job if name in ALL_RANKS or is_main() else _skipped_here(name)


def _skipped_here(name: str) -> Callable[[DictConfig], Any]:
    def skip(cfg: DictConfig) -> Any:
        log.info("rank %d: task %s runs on rank 0 only", current().rank, name)
        return None
    return skip


def run(cfg: DictConfig) -> Any:
    """Run one task; exits with status 2 and a one-line message on bad input."""
    try:
        resolve_task(str(cfg.task))  # an unknown task fails before any set-up
        check_config(cfg)  # every bad value fails here, before the first expensive step
        setup_from_config(cfg)
        return resolve_task(str(cfg.task))(cfg)  # after set-up: on ranks other than 0 report tasks are no-ops
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(UserError.exit_code)
