"""Dispatch ``task=...`` to its job; turn UserError into one line on stderr and exit 2."""
from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, Callable

from omegaconf import DictConfig

from distill.errors import UserError
from distill.runtime import setup_runtime

log = logging.getLogger("distill")

# task name -> "module:function"; imported lazily so `distill task=bench` loads only what it needs.
TASKS: dict[str, str] = {
    "teacher": "teacher.job:run_teacher",
    "targets": "student.targets:run_targets",
    "distill": "student.job:run_distill",
    "evaluate": "distill.evaluate:run_evaluate",
    "bench": "distill.bench:run_bench",
    "publish": "student.publish:run_publish",
    "sample": "student.publish:run_sample",
    "pipeline": "distill.pipeline:run_pipeline",
}


def resolve_task(name: str) -> Callable[[DictConfig], Any]:
    if name not in TASKS:
        raise UserError(f"unknown task '{name}' (choose one of: {', '.join(TASKS)})")
    module, func = TASKS[name].split(":")
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise UserError(f"task '{name}' is not available in this version ({e})") from e


def run(cfg: DictConfig) -> Any:
    """Run one task; exits with status 2 and a one-line message on bad input."""
    try:
        task = resolve_task(str(cfg.task))
        setup_runtime(str(cfg.device), int(cfg.seed))
        return task(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(UserError.exit_code)
