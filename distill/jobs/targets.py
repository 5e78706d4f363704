"""``task=targets``: the teacher's guided targets for every distillation step, written once to checksummed shards.

Every run first checks each shard of the grid (:func:`student.targets.shard_grid`): one that is
missing or fails its checksum is generated again in place, one off the grid is removed, and the
manifest only ever lists a partition of ``[0, k)`` (the whole shards from the first step on), so an
interrupted run (a kill -9, a full disk) leaves a manifest the next run can trust.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from distill.core.checkpoint import save_checkpoint
from distill.core.data import load_data
from distill.core.errors import UserError
from distill.core.fileio import clean_leftovers, sha256
from distill.core.sampling import jit_predictor
from student.distill import distill_inputs, teacher_targets, w_distribution
from student.targets import (FIELDS, MANIFEST, fingerprint, read_manifest, shard_grid, shard_name, shard_ok,
                             targets_dir, write_manifest)
from teacher.guidance import GuidanceBranches
from teacher.loading import load_teacher

log = logging.getLogger(__name__)
SHARD_FILE = re.compile(r"^shard_(\d+)_(\d+)\.safetensors$")


def previous_shards(folder: Path, fp: dict[str, Any], per_shard: int) -> dict[tuple[int, int], str]:
    """(start, stop) -> SHA-256 of the shards the existing manifest lists; {} without a readable one.
    A manifest of another teacher, config or shard size is refused (nothing is overwritten)."""
    if not (folder / MANIFEST).is_file():
        return {}
    try:
        old = read_manifest(folder)
    except UserError as e:
        log.warning("targets: %s; checking the shards themselves", e)
        return {}
    if old.get("fingerprint") != fp or old.get("steps_per_shard") != per_shard:
        raise UserError(f"{folder} holds targets of another teacher or config; use another student.targets_dir")
    return {(int(sh["start"]), int(sh["stop"])): str(sh["sha256"]) for sh in old["shards"]}


def run_targets(cfg: DictConfig) -> Path:
    """Generate (or complete, or repair) the target shards for ``student.train.steps`` steps."""
    data = load_data(cfg.data)
    folder = targets_dir(cfg)
    s = cfg.student
    steps, per_shard = int(s.train.steps), int(s.targets_per_shard)
    if per_shard < 1:
        raise UserError(f"student: targets_per_shard {per_shard} must be >= 1")
    fp = fingerprint(cfg)
    listed = previous_shards(folder, fp, per_shard)
    clean_leftovers(folder)
    # shards made for more steps than asked now stay valid; the grid covers them all
    total = max([steps] + [stop for start, stop in listed if start % per_shard == 0])
    grid = shard_grid(total, per_shard)
    ok = {slot: shard_ok(folder, *slot, listed, fp) for slot in grid}
    sums = {slot: listed.get(slot) or sha256(folder / shard_name(*slot)) for slot in grid if ok[slot]}
    for path in sorted(folder.glob("shard_*.safetensors")):
        m = SHARD_FILE.match(path.name)
        if not m or (int(m.group(1)), int(m.group(2))) not in ok:
            path.unlink()
            log.info("targets: removed %s (not a shard of this grid)", path)
    missing = [slot for slot in grid if not ok[slot]]
    for start, stop in missing:
        if (folder / shard_name(start, stop)).exists():
            log.warning("targets: %s fails its checksum; generating it again", folder / shard_name(start, stop))
    write_manifest(folder, manifest(fp, per_shard, grid, sums))
    if not missing:
        log.info("targets: %d steps already in %s", total, folder)
        return folder
    teacher = load_teacher(cfg, data)
    branches = jit_predictor(GuidanceBranches(teacher), bool(cfg.jit))
    bar = tqdm(total=total, initial=total - sum(b - a for a, b in missing), desc="targets", unit="step",
               mininterval=2.0)
    for start, stop in missing:
        make = distill_inputs(data, int(s.train.batch_size), int(cfg.seed), start, cfg.diffusion.schedule,
                              *w_distribution(s), s.ws_per_input)
        rows = []
        for step in range(start, stop):
            inputs = make(step)
            rows.append(inputs + (teacher_targets(branches, data.num_classes, inputs, s.ws_per_input),))
            bar.update(1)
        shard = {name: np.stack([r[i] for r in rows]) for i, name in enumerate(FIELDS)}
        path = folder / shard_name(start, stop)
        save_checkpoint(path, shard, {"start": start, "stop": stop, "fingerprint": fp})
        sums[(start, stop)] = sha256(path)
        write_manifest(folder, manifest(fp, per_shard, grid, sums))
    bar.close()
    log.info("targets: %d steps in %s (%d shard(s) written)", total, folder, len(missing))
    return folder


def manifest(fp: dict[str, Any], per_shard: int, grid: list[tuple[int, int]],
             sums: dict[tuple[int, int], str]) -> dict[str, Any]:
    """The manifest of the whole grid shards (``sums``: their SHA-256) from the first step on: a
    partition of [0, k)."""
    shards = []
    for start, stop in grid:
        if (start, stop) not in sums:
            break
        shards.append({"file": shard_name(start, stop), "start": start, "stop": stop, "sha256": sums[(start, stop)]})
    return {"version": 1, "fingerprint": fp, "steps_per_shard": per_shard, "shards": shards}
