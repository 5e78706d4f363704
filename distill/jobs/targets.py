"""``task=targets``: the teacher's guided targets for every distillation step, written once to checksummed shards."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from distill.core.checkpoint import save_checkpoint
from distill.core.data import load_data
from distill.core.errors import UserError
from distill.core.fileio import sha256
from distill.core.sampling import jit_predictor
from student.distill import distill_inputs, teacher_targets, w_distribution
from student.targets import FIELDS, MANIFEST, fingerprint, read_manifest, shard_ok, targets_dir, write_manifest
from teacher.guidance import GuidanceBranches
from teacher.loading import load_teacher

log = logging.getLogger(__name__)


def run_targets(cfg: DictConfig) -> Path:
    """Generate (or complete) the target shards for ``student.train.steps`` steps."""
    data = load_data(cfg.data)
    folder = targets_dir(cfg)
    s = cfg.student
    steps, per_shard = int(s.train.steps), int(s.targets_per_shard)
    if per_shard < 1:
        raise UserError(f"student: targets_per_shard {per_shard} must be >= 1")
    fp = fingerprint(cfg)
    manifest: dict[str, Any] = {"version": 1, "fingerprint": fp, "steps_per_shard": per_shard, "shards": []}
    if (folder / MANIFEST).is_file():
        old = read_manifest(folder)
        if old.get("fingerprint") != fp or old.get("steps_per_shard") != per_shard:
            raise UserError(f"{folder} holds targets of another teacher or config; use another student.targets_dir")
        manifest["shards"] = [sh for sh in old["shards"] if shard_ok(folder, sh)]
    done = sum(sh["stop"] - sh["start"] for sh in manifest["shards"])
    if done >= steps:
        log.info("targets: %d steps already in %s", done, folder)
        return folder
    teacher = load_teacher(cfg, data)
    branches = jit_predictor(GuidanceBranches(teacher), bool(cfg.jit))
    make = distill_inputs(data, int(s.train.batch_size), int(cfg.seed), done, cfg.diffusion.schedule,
                          *w_distribution(s), s.ws_per_input)
    bar = tqdm(total=steps, initial=done, desc="targets", unit="step", mininterval=2.0)
    for start in range(done, steps, per_shard):
        stop = min(start + per_shard, steps)
        rows = []
        for step in range(start, stop):
            inputs = make(step)
            rows.append(inputs + (teacher_targets(branches, data.num_classes, inputs, s.ws_per_input),))
            bar.update(1)
        shard = {name: np.stack([r[i] for r in rows]) for i, name in enumerate(FIELDS)}
        name = f"shard_{start:07d}_{stop:07d}.safetensors"
        save_checkpoint(folder / name, shard, {"start": start, "stop": stop})
        manifest["shards"].append({"file": name, "start": start, "stop": stop, "sha256": sha256(folder / name)})
        write_manifest(folder, manifest)
    bar.close()
    log.info("targets: %d steps written to %s", steps, folder)
    return folder
