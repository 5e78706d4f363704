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

from distill.core import build
from distill.core.checkpoint import load_checkpoint
from distill.core.fileio import sha256, write_json
from distill.core.errors import UserError
from student.distill import w_distribution
from teacher.loading import teacher_checkpoint_path

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
    write_json(folder / MANIFEST, manifest)


def shard_ok(folder: Path, shard: dict[str, Any]) -> bool:
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
