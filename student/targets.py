"""``task=targets``: the teacher's two-pass guided targets, made once and written to shards.

A shard holds ``per_shard`` consecutive distillation steps (inputs and target) as one
safetensors file. ``manifest.json`` lists the shards with SHA-256 checksums and a
fingerprint of everything the targets depend on; a restarted job verifies what is
there and continues with the first missing shard. ``task=distill`` with
``student.targets=shards`` reads them back instead of running the teacher.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from distill import build
from distill.checkpoint import load_checkpoint, save_checkpoint
from distill.fileio import atomic_write, sha256
from distill.data import load_data
from distill.errors import UserError
from distill.sampling import jit_predictor
from student.distill import distill_inputs, teacher_targets, w_distribution
from teacher.guidance import GuidanceBranches
from teacher.job import load_teacher, teacher_checkpoint_path

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FIELDS = ("z", "t", "y", "w", "alpha", "sigma", "target")


def targets_dir(cfg: DictConfig) -> Path:
    d = cfg.student.get("targets_dir")
    return Path(str(d)) if d else build.run_dir(cfg) / "targets"


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """What the targets depend on; a mismatch means the shards belong to another run."""
    s = cfg.student
    w_min, w_max, w_power = w_distribution(s)
    return {"teacher_sha256": sha256(teacher_checkpoint_path(cfg)), "seed": int(cfg.seed),
            "batch_size": int(s.train.batch_size), "schedule": str(cfg.diffusion.schedule),
            "prediction": str(cfg.diffusion.prediction), "w_min": w_min, "w_max": w_max, "w_power": w_power,
            "data": build.plain(cfg.data),
            # only when set, so shards made before the option existed still match
            **({"ws_per_input": int(s.ws_per_input)} if s.get("ws_per_input", 1) != 1 else {})}


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"no target shards in {folder} (run task=targets first, or set student.targets=online)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg})") from e


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))


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
        manifest["shards"] = [sh for sh in old["shards"] if _shard_ok(folder, sh)]
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


def _shard_ok(folder: Path, shard: dict[str, Any]) -> bool:
    path = folder / shard["file"]
    return path.is_file() and sha256(path) == shard["sha256"]


def shard_reader(cfg: DictConfig) -> Callable[[int], tuple[np.ndarray, ...]]:
    """step -> (inputs..., target) read from verified shards (one shard in memory at a time)."""
    folder = targets_dir(cfg)
    manifest = read_manifest(folder)
    if manifest.get("fingerprint") != fingerprint(cfg):
        raise UserError(f"target shards in {folder} were made for another teacher or config; rerun task=targets")
    shards = sorted(manifest["shards"], key=lambda sh: sh["start"])
    have = shards[-1]["stop"] if shards else 0
    if have < int(cfg.student.train.steps):
        raise UserError(f"target shards in {folder} cover {have} steps, the student needs "
                        f"{cfg.student.train.steps}; rerun task=targets")
    cache: dict[str, Any] = {}

    def read(step: int) -> tuple[np.ndarray, ...]:
        sh = next(sh for sh in shards if sh["start"] <= step < sh["stop"])
        if cache.get("file") != sh["file"]:
            path = folder / sh["file"]
            if not path.is_file() or sha256(path) != sh["sha256"]:
                raise UserError(f"target shard {path} is missing or fails its checksum; rerun task=targets")
            cache["file"], cache["tensors"] = sh["file"], load_checkpoint(path)[0]
        i = step - sh["start"]
        return tuple(cache["tensors"][name][i] for name in FIELDS)

    return read
