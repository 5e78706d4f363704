"""Dispatch ``task=...`` to its job under the run dir's lock; turn UserError (and a failed read or
write) into one line on stderr and exit 2."""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError

from distill.core import build
from distill.core.config import config_error_line
from distill.core.errors import UserError
from distill.core.fileio import check_name, clean_leftovers, io_failure
from distill.core.runlock import run_lock
from distill.core.runtime import current, is_main, setup_from_config
from distill.jobs.preflight import check_config

log = logging.getLogger("distill")

# task name -> "module:function"; imported lazily so `distill task=bench` loads only what it needs.
TASKS: dict[str, str] = {name: f"distill.jobs.{name}:run_{name}" for name in (
    "teacher", "targets", "distill", "negative_phase", "progressive", "evaluate", "bench", "publish", "sample",
    "response", "classifier", "pipeline")}
# Tasks every data-parallel worker runs (they train, or split the samples or targets); the others run on rank 0 alone.
ALL_RANKS = ("teacher", "targets", "distill", "negative_phase", "progressive", "evaluate", "classifier", "pipeline")


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
    """Run one task; exits with status 2 and a one-line message on bad input.

    Rank 0 holds the run dir's lock while the task runs (one writer per run dir) and first removes
    what interrupted writes left behind; the other msrun workers do not write there."""
    try:
        resolve_task(str(cfg.task))  # an unknown task fails before any set-up
        check_name(cfg.run_name, "run_name")
        check_config(cfg)  # every bad value fails here, before the first expensive step
        setup_from_config(cfg)
        job = resolve_task(str(cfg.task))  # after set-up: on ranks other than 0 report tasks are no-ops
        if not is_main():
            return job(cfg)
        run_dir = build.run_dir(cfg)
        with run_lock(run_dir, str(cfg.task)):
            clean_leftovers(run_dir)
            return job(cfg)
    except UserError as e:
        fail(str(e))
    except InterpolationResolutionError as e:  # a value that resolves wrong when read (a row of student.by_target)
        fail(f"config: {config_error_line(e)}")
    except Exception as e:  # a read or write the job did not expect to fail (a full disk, a read-only folder)
        reason = io_failure(e)
        if reason is None:
            raise
        where = getattr(e, "filename", None)
        fail(f"could not read or write {where}: {reason}" if where else f"file I/O failed: {reason}")


def fail(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(UserError.exit_code)


class CheckNames(Callback):
    """Hydra callback: names that become paths are checked before Hydra creates the run dir from them."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    @staticmethod
    def _check(config: DictConfig) -> None:
        try:
            check_name(config.run_name, "run_name")
        except UserError as e:
            fail(str(e))
