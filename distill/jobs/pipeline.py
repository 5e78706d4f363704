"""``task=pipeline``: teacher -> distill -> (negative_phase) -> progressive -> evaluate -> bench -> publish, each
made again exactly when what made it changed (negative_phase only with ``negative_phase.enabled``).

Every stage output records its provenance (distill.core.provenance): the config values and the
digests of the inputs that made it. Training stages resume from a checkpoint with the same record
and start over when only their inputs changed (an upstream stage was made again); a checkpoint made
with other settings of its own is refused unless ``restart=true``. Report stages (evaluate, bench,
publish) are skipped when the record in their output equals the one they would write now. The time
of every stage goes to ``<run>/pipeline.json``, with, under ``last_made``, the time of the last
invocation that made each stage (wrote into its folders), so a re-run that finds stages up to date
keeps their real times.
"""
from __future__ import annotations

import datetime
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig

from distill.core import build, provenance
from distill.core.data import ImageData, load_data
from distill.core.fileio import write_json
from distill.core.runtime import is_main, main_decides
from distill.jobs.preflight import check_config
from student.publish import bundle_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    job: Callable[[DictConfig], Any]
    output: Optional[Path] = None  # a report stage: the JSON file that records its provenance
    made_of: Optional[Callable[[DictConfig, ImageData], dict[str, Any]]] = None  # its provenance now
    all_ranks: bool = False  # under msrun every worker runs it (it splits its work), else rank 0 alone
    folders: tuple[Path, ...] = ()  # where it writes: a stage that changed a file there was made, not skipped


def stages(cfg: DictConfig) -> list[Stage]:
    from distill.jobs.bench import bench_provenance, run_bench
    from distill.jobs.distill import run_distill
    from distill.jobs.evaluate import evaluate_provenance, run_evaluate
    from distill.jobs.negative_phase import run_negative_phase
    from distill.jobs.progressive import run_progressive
    from distill.jobs.publish import publish_provenance, run_publish
    from distill.jobs.teacher import run_teacher

    run = build.run_dir(cfg)
    bundle = bundle_dir(cfg)
    own_bundle = bundle == run / "bundle"  # an out-of-date bundle elsewhere needs publish.overwrite=true
    negative = [Stage("negative_phase", functools.partial(run_negative_phase, follow_inputs=True),
                      folders=(run / "student_negative",))] if bool(cfg.negative_phase.enabled) else []
    return [
        Stage("teacher", functools.partial(run_teacher, follow_inputs=True),
              folders=(run / "teacher", run / "eval_classifier")),
        Stage("distill", functools.partial(run_distill, follow_inputs=True), folders=(run / "student",)),
        *negative,
        Stage("progressive", functools.partial(run_progressive, follow_inputs=True), folders=(run / "progressive",)),
        Stage("evaluate", run_evaluate, run / "evaluate" / "report.json", evaluate_provenance, all_ranks=True,
              folders=(run / "evaluate",)),
        Stage("bench", run_bench, run / "bench" / "bench.json", bench_provenance, folders=(run / "bench",)),
        Stage("publish", functools.partial(run_publish, replace=own_bundle), bundle / "config.json",
              publish_provenance, folders=(bundle,)),
    ]


def newest_write(folders: tuple[Path, ...]) -> int:
    """The newest modification time (ns) of any file under ``folders`` (0 when there is none)."""
    return max((p.stat().st_mtime_ns for f in folders if f.is_dir() for p in f.rglob("*") if p.is_file()),
               default=0)


def last_made(path: Path) -> dict[str, Any]:
    """The ``last_made`` record of an earlier pipeline.json (empty when absent or unreadable)."""
    try:
        made = json.loads(path.read_text()).get("last_made", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return made if isinstance(made, dict) else {}


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    check_config(cfg)  # every bad value before any training (the entry point did it too)
    run = build.run_dir(cfg)
    timings: dict[str, Any] = {}
    made = last_made(run / "pipeline.json")
    t_all = time.perf_counter()
    data: Optional[ImageData] = None
    for stage in stages(cfg):
        if stage.output is not None:  # a report stage, when out of date: rank 0 alone unless it splits its work
            if not (is_main() or stage.all_ranks):
                continue
            fresh = False
            if is_main():
                if data is None:
                    data = load_data(cfg.data)
                recorded = provenance.read_recorded(stage.output)
                now = stage.made_of(cfg, data)
                fresh = provenance.is_fresh(recorded, now)
                if not fresh and recorded is not None:
                    log.info("pipeline: %s is out of date (%s)", stage.name,
                             "; ".join(provenance.differences(recorded, now)[:4]))
            if stage.all_ranks:
                fresh = main_decides(fresh)  # rank 0 sees the files; every worker follows it
            if fresh:
                log.info("pipeline: %s is up to date (%s), skipped", stage.name, stage.output)
                timings[stage.name] = "skipped"
                continue
        log.info("pipeline: %s ...", stage.name)
        t0, before = time.perf_counter(), newest_write(stage.folders) if is_main() else 0
        stage.job(cfg)
        timings[stage.name] = round(time.perf_counter() - t0, 1)
        if is_main() and newest_write(stage.folders) != before:
            made[stage.name] = {"seconds": timings[stage.name],
                                "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        log.info("pipeline: %s done in %.1f s", stage.name, timings[stage.name])
    timings["total_seconds"] = round(time.perf_counter() - t_all, 1)
    if is_main():
        write_json(run / "pipeline.json", {**timings, "last_made": made})
    log.info("pipeline: finished in %.1f s; outputs in %s", timings["total_seconds"], run)
    return timings
