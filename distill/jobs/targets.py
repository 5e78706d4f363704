"""``task=targets``: the teacher's guided targets for every distillation step, written once to checksummed shards.

Every run first checks each shard of the grid (:func:`student.targets.shard_grid`): one that is
missing or fails its checksum is generated again in place, one off the grid is removed, and the
manifest only ever lists a partition of ``[0, k)`` (the whole shards from the first step on), so an
interrupted run (a kill -9, a full disk) leaves a manifest the next run can trust. Under msrun the
workers split the missing shards (:func:`run_targets`).
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
from distill.core.runtime import broadcast_from_main, current, gather_rows, is_main, my_items
from distill.core.sampling import jit_predictor
from student.distill import (distill_inputs, distill_target, input_interval, negative_draw, teacher_targets,
                             w_distribution)
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
    """Generate (or complete, or repair) the target shards for ``student.train.steps`` steps.

    Under msrun every worker runs it: rank 0 checks the folder and decides which grid shards are
    missing; the i-th missing shard is made by rank i mod world size (:func:`my_items`), each rank
    writing its shards and their checksums; rank 0 writes the manifest as its own shards land and
    once more after every rank has sent the checksums of its shards. A shard holds the same tensors
    whichever rank (or one process) makes it: its inputs come from the step's seed and the teacher
    runs at the same batch shape."""
    data = load_data(cfg.data)
    folder = targets_dir(cfg)
    s = cfg.student
    steps, per_shard = int(s.train.steps), int(s.targets_per_shard)
    if per_shard < 1:
        raise UserError(f"student: targets_per_shard {per_shard} must be >= 1")
    target, interval = distill_target(s)
    fp = fingerprint(cfg)
    grid, sums, missing = check_folder(folder, fp, steps, per_shard) if is_main() else ([], {}, [])
    grid, missing = agree_on_missing(grid, missing, per_shard)
    if not missing:
        log.info("targets: %d steps already in %s", grid[-1][1] if grid else 0, folder)
        return folder
    mine = [missing[i] for i in my_items(len(missing))]
    if mine:
        teacher = load_teacher(cfg, data)
        branches = jit_predictor(GuidanceBranches(teacher), bool(cfg.jit))
        bar = tqdm(total=sum(b - a for a, b in mine), desc="targets", unit="step", mininterval=2.0)
    for start, stop in mine:
        make = distill_inputs(data, int(s.train.batch_size), int(cfg.seed), start, cfg.diffusion.schedule,
                              *w_distribution(s), s.ws_per_input, negative_draw(s), w_interval=input_interval(s))
        rows = []
        for step in range(start, stop):
            inputs = make(step)
            rows.append(inputs + (teacher_targets(branches, inputs, s.ws_per_input, interval, target),))
            bar.update(1)
        shard = {name: np.stack([r[i] for r in rows]) for i, name in enumerate(FIELDS)}
        path = folder / shard_name(start, stop)
        save_checkpoint(path, shard, {"start": start, "stop": stop, "fingerprint": fp})
        sums[(start, stop)] = sha256(path)
        if is_main():  # the whole shards from the first step on; another rank's shards join at the end
            write_manifest(folder, manifest(fp, per_shard, grid, sums))
    if mine:
        bar.close()
    if current().world_size > 1:
        written = gathered_sums(missing, sums)  # waits for every rank to finish its shards
        if is_main():
            for slot, digest in written.items():
                if not (folder / shard_name(*slot)).is_file():
                    raise UserError(f"targets: {folder / shard_name(*slot)} written by another worker is not "
                                    f"visible to rank 0; put student.targets_dir on a folder all hosts share")
                sums[slot] = digest
            write_manifest(folder, manifest(fp, per_shard, grid, sums))
    log.info("targets: %d steps in %s (%d shard(s) written%s)", grid[-1][1], folder, len(mine),
             f" by rank {current().rank}, {len(missing)} by all {current().world_size} workers"
             if current().world_size > 1 else "")
    return folder


def check_folder(folder: Path, fp: dict[str, Any], steps: int, per_shard: int
                 ) -> tuple[list[tuple[int, int]], dict[tuple[int, int], str], list[tuple[int, int]]]:
    """Rank 0's look at the folder: (the grid, SHA-256 of its good shards, the missing or corrupt ones).
    Removes files off the grid and writes the manifest of the good shards from the first step on."""
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
    return grid, sums, missing


def agree_on_missing(grid: list[tuple[int, int]], missing: list[tuple[int, int]], per_shard: int
                     ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Rank 0's grid and missing shards on every rank (as they are in one process)."""
    if current().world_size == 1:
        return grid, missing
    total = int(broadcast_from_main([np.array([grid[-1][1] if grid else 0], np.float32)])[0][0])  # exact < 2**24
    grid = shard_grid(total, per_shard)
    flags = np.array([slot in set(missing) for slot in grid], np.float32) if is_main() else np.zeros(len(grid))
    flags = broadcast_from_main([flags.astype(np.float32)])[0]
    return grid, [slot for slot, f in zip(grid, flags) if f]


def gathered_sums(missing: list[tuple[int, int]], sums: dict[tuple[int, int], str]) -> dict[tuple[int, int], str]:
    """The SHA-256 of every shard in ``missing`` as the rank that wrote it computed it (a collective:
    it returns once every rank has written its shards)."""
    mine = my_items(len(missing))
    digests = np.array([list(bytes.fromhex(sums[missing[i]])) for i in mine], np.float32).reshape(len(mine), 32)
    everyone = gather_rows(digests, np.array(mine, np.int64), len(missing))
    return {slot: bytes(everyone[i].astype(np.uint8)).hex() for i, slot in enumerate(missing)}


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
