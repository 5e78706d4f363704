"""``task=targets``: the teacher's two-pass guided targets, made once and written to shards.

A shard holds ``per_shard`` consecutive distillation steps (inputs and target) as one
safetensors file; the shards sit on a fixed grid (``[0, n), [n, 2n), ...``) and each carries
the targets' fingerprint and its own content digest in its header. ``manifest.json`` lists the
shards with SHA-256 checksums and a fingerprint of everything the targets depend on, and is
always a partition of ``[0, covered steps)``: sorted, no gap, no overlap. A restarted job
regenerates in place every grid shard that is missing or fails its checksum. ``task=distill``
with ``student.targets=shards`` reads them back instead of running the teacher.
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
from student.distill import distill_target, input_interval, negative_draw, w_distribution
from teacher.loading import teacher_checkpoint_path

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FIELDS = ("z", "t", "y", "w", "y_neg", "alpha", "sigma", "target")


def targets_dir(cfg: DictConfig) -> Path:
    d = cfg.student.get("targets_dir")
    return Path(str(d)) if d else build.run_dir(cfg) / "targets"


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """What the targets depend on; a mismatch means the shards belong to another run."""
    s = cfg.student
    w_min, w_max, w_power = w_distribution(s)
    target, interval = distill_target(s)
    teacher = teacher_checkpoint_path(cfg)
    if not teacher.is_file():
        raise UserError(f"teacher checkpoint not found: {teacher} (run task=teacher first or set teacher.checkpoint)")
    return {"teacher_sha256": sha256(teacher), "seed": int(cfg.seed),
            "batch_size": int(s.train.batch_size), "schedule": str(cfg.diffusion.schedule),
            "prediction": str(cfg.diffusion.prediction), "w_min": w_min, "w_max": w_max, "w_power": w_power,
            # how the data is read (data.stream) does not change what it is
            "data": {k: v for k, v in build.plain(cfg.data).items() if k != "stream"},
            # only when set, so shards made before the option existed still match
            **({"ws_per_input": int(s.ws_per_input)} if s.get("ws_per_input", 1) != 1 else {}),
            **({"p_null_negative": negative_draw(s)} if negative_draw(s) < 1.0 else {}),
            **({"target": target} if target != "cfg" else {}),
            **({"interval": list(interval)} if interval is not None else {}),
            # only when set, so shards of interval students from before the option still match
            **({"interval_input": True} if input_interval(s) is not None else {})}


def shard_name(start: int, stop: int) -> str:
    return f"shard_{start:07d}_{stop:07d}.safetensors"


def shard_grid(total: int, per_shard: int) -> list[tuple[int, int]]:
    """The shards' (start, stop) for ``total`` steps: ``[0, n), [n, 2n), ...``, the last one shorter."""
    return [(start, min(start + per_shard, total)) for start in range(0, total, per_shard)]


def covered(shards: list[dict[str, Any]]) -> int | None:
    """The steps ``[0, k)`` the shards partition (sorted, no gap, no overlap): k, or None if they do not."""
    stop = 0
    for sh in shards:
        if int(sh["start"]) != stop or int(sh["stop"]) <= stop:
            return None
        stop = int(sh["stop"])
    return stop


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"no target shards in {folder} (run task=targets first, or set student.targets=online)")
    try:
        manifest = json.loads(path.read_text())
        shards = manifest["shards"]
        for sh in shards:
            str(sh["file"]), int(sh["start"]), int(sh["stop"]), str(sh["sha256"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is not a valid targets manifest ({type(e).__name__}: {e}); "
                        "rerun task=targets to rebuild it") from e
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_json(folder / MANIFEST, manifest)


def shard_ok(folder: Path, start: int, stop: int, listed: dict[tuple[int, int], str], fp: dict[str, Any]) -> bool:
    """Whether the grid shard (start, stop) in ``folder`` is whole and belongs to these targets: by its
    manifest checksum when ``listed`` has it, else (written but never listed: a kill between the shard
    and the manifest, or a lost manifest) by the digest and fingerprint in its own header."""
    path = folder / shard_name(start, stop)
    if not path.is_file():
        return False
    if (start, stop) in listed:
        return sha256(path) == listed[(start, stop)]
    try:
        tensors, meta = load_checkpoint(path)
    except UserError:
        return False
    return (meta.get("fingerprint") == fp and (meta.get("start"), meta.get("stop")) == (start, stop)
            and all(name in tensors and len(tensors[name]) == stop - start for name in FIELDS))


def shard_reader(cfg: DictConfig) -> Callable[[int], tuple[np.ndarray, ...]]:
    """step -> (inputs..., target) read from verified shards (one shard in memory at a time)."""
    folder = targets_dir(cfg)
    manifest = read_manifest(folder)
    if manifest.get("fingerprint") != fingerprint(cfg):
        raise UserError(f"target shards in {folder} were made for another teacher or config; rerun task=targets")
    shards = manifest["shards"]
    have = covered(shards)
    if have is None:
        raise UserError(f"target shards in {folder} leave a gap or overlap (manifest {MANIFEST}); rerun task=targets")
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
