"""``task=pipeline``: teacher -> distill -> progressive -> evaluate -> bench -> publish, each resumable.

Training stages resume from their checkpoints (finished ones are skipped); report stages are
skipped when their output is newer than the student checkpoints they were made from. The time of every stage goes
to ``<run>/pipeline.json``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig

from distill.core import build
from distill.core.fileio import write_json
from distill.core.runtime import is_main, main_decides
from student.loading import student_checkpoint_path
from student.progressive import round_checkpoint_path, round_plan

log = logging.getLogger(__name__)


def is_fresh(outputs: list[Path], inputs: list[Path]) -> bool:
    """True when every output exists and none is older than any input."""
    if not all(p.exists() for p in outputs):
        return False
    newest_input = max((p.stat().st_mtime for p in inputs if p.exists()), default=0.0)
    return min(p.stat().st_mtime for p in outputs) >= newest_input


def stages(cfg: DictConfig) -> list[tuple[str, Callable[[DictConfig], Any], list[Path], bool]]:
    """(name, job, outputs that make it complete ([] = the job resumes or skips by itself), whether every
    msrun worker runs it (else rank 0 alone))."""
    from distill.jobs.bench import run_bench
    from distill.jobs.distill import run_distill
    from distill.jobs.evaluate import run_evaluate
    from distill.jobs.progressive import run_progressive
    from distill.jobs.publish import run_publish
    from distill.jobs.teacher import run_teacher

    run = build.run_dir(cfg)
    bundle = Path(str(cfg.publish.dir)) if cfg.publish.get("dir") else run / "bundle"
    return [
        ("teacher", run_teacher, [], True),
        ("distill", run_distill, [], True),
        ("progressive", run_progressive, [], True),
        ("evaluate", run_evaluate, [run / "evaluate" / "report.json"], True),  # every worker draws its share
        ("bench", run_bench, [run / "bench" / "bench.json"], False),
        ("publish", run_publish, [bundle / "manifest.json"], False),
    ]


def student_checkpoints(cfg: DictConfig) -> list[Path]:
    """The checkpoints the report stages are made from: stage one and every progressive round."""
    plan = round_plan(int(cfg.progressive.start_steps), int(cfg.progressive.min_steps))
    return [student_checkpoint_path(cfg)] + [round_checkpoint_path(cfg, n) for n in plan]


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    run = build.run_dir(cfg)
    inputs = student_checkpoints(cfg)  # also checks the progressive plan before any training
    timings: dict[str, Any] = {}
    t_all = time.perf_counter()
    for name, job, outputs, all_ranks in stages(cfg):
        if not all_ranks and not is_main():
            continue
        fresh = bool(outputs) and is_fresh(outputs, inputs)
        if outputs and all_ranks:
            fresh = main_decides(fresh)  # rank 0 sees the files; every rank follows it
        if fresh:
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
