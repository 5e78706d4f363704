"""``task=pipeline``: teacher -> distill -> evaluate -> bench -> publish, each resumable.

Training stages resume from their checkpoints; report stages are skipped when their
output is newer than the checkpoints they were made from. The time of every stage goes
to ``<run>/pipeline.json``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from distill import build
from distill.report import write_json
from distill.runtime import is_main

log = logging.getLogger(__name__)


def is_fresh(outputs: list[Path], inputs: list[Path]) -> bool:
    """True when every output exists and none is older than any input."""
    if not all(p.exists() for p in outputs):
        return False
    newest_input = max((p.stat().st_mtime for p in inputs if p.exists()), default=0.0)
    return min(p.stat().st_mtime for p in outputs) >= newest_input


def stages(cfg: DictConfig) -> list[tuple[str, Callable[[DictConfig], Any], list[Path]]]:
    """(name, job, outputs that make it complete; [] = the job resumes or skips by itself)."""
    from distill.app import resolve_task

    run = build.run_dir(cfg)
    bundle = Path(str(cfg.publish.dir)) if cfg.publish.get("dir") else run / "bundle"
    return [
        ("teacher", resolve_task("teacher"), []),
        ("distill", resolve_task("distill"), []),
        ("evaluate", resolve_task("evaluate"), [run / "evaluate" / "report.json"]),
        ("bench", resolve_task("bench"), [run / "bench" / "bench.json"]),
        ("publish", resolve_task("publish"), [bundle / "manifest.json"]),
    ]


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    from student.job import student_checkpoint_path

    run = build.run_dir(cfg)
    timings: dict[str, Any] = {}
    t_all = time.perf_counter()
    for name, job, outputs in stages(cfg):
        if outputs and is_fresh(outputs, [student_checkpoint_path(cfg)]):
            log.info("pipeline: %s is up to date (%s), skipped", name, outputs[0])
            timings[name] = "skipped"
            continue
        log.info("pipeline: %s ...", name)
        t0 = time.perf_counter()
        job(cfg)
        timings[name] = round(time.perf_counter() - t0, 1)
        log.info("pipeline: %s done in %.1f s", name, timings[name])
    timings["total_seconds"] = round(time.perf_counter() - t_all, 1)
    if is_main():
        write_json(run / "pipeline.json", timings)
    log.info("pipeline: finished in %.1f s; outputs in %s", timings["total_seconds"], run)
    return timings
