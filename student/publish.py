"""``task=publish`` writes the student as a self-contained bundle; ``task=sample`` samples from one.

The bundle is built in a temporary sibling folder and renamed into place only when every
file is written and the manifest lists them, so a crash never leaves a half bundle; with
``publish.overwrite=true`` the old bundle is moved aside first and restored if the final
rename fails.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
from omegaconf import DictConfig

from distill.core import build
from distill.core.checkpoint import read_meta
from distill.core.errors import UserError
from distill.core.images import save_side_by_side_png
from student.bundle import (FORMAT, FORMAT_VERSION, MINDIR, SAMPLER_MINDIR, WEIGHTS, W_CONVENTION, Pretrained)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- atomic folder


# ----------------------------------------------------------------------------- bundle contents
def bundle_dir(cfg: DictConfig) -> Path:
    d = cfg.publish.get("dir")
    return Path(str(d)).expanduser() if d else build.run_dir(cfg) / "bundle"


def training_info(cfg: DictConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """What the checkpoints say about how the teacher and the student were trained (``meta``: the
    stage-one student's metadata; the progressive rounds are read from their summary)."""
    from teacher.loading import teacher_checkpoint_path

    tpath = teacher_checkpoint_path(cfg)
    teacher = read_meta(tpath) if tpath.is_file() else {}
    summary_path = build.run_dir(cfg) / "student" / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {"data": meta.get("data"), "teacher_steps": teacher.get("step"), "p_uncond": teacher.get("p_uncond"),
            "student_steps": meta.get("step"), "student_total_steps": meta.get("total_steps"),
            "loss": meta.get("loss"), "w_power": meta.get("w_power", 1.0),
            "w_loss_power": meta.get("w_loss_power", 0.0), "targets": summary.get("targets"),
            "weights": "EMA", "progressive": progressive_info(build.run_dir(cfg) / "progressive" / "rounds.json"),
            # a student of another target than plain CFG says so (older bundles: cfg)
            **({"target": meta["target"], "interval": meta.get("interval")} if meta.get("target", "cfg") != "cfg"
               else {}),
            **({"interval_input": True} if meta.get("interval_input") else {})}


def progressive_info(path: Path) -> Optional[list[dict[str, Any]]]:
    """(steps, teacher steps, training steps) of each progressive round, from ``rounds.json``."""
    if not path.is_file():
        return None
    try:
        rounds = json.loads(path.read_text())["rounds"]
        return [{"steps": int(r["steps"]), "teacher_steps": int(r["teacher_steps"])} for r in rounds]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"cannot read the progressive summary {path} ({e})") from e


def variant_name(num_steps: int) -> str:
    return f"{int(num_steps)}step"


def variant_weights(num_steps: int, default: bool) -> str:
    """The default variant's weights are ``model.safetensors``; the others ``model_<N>step.safetensors``."""
    return WEIGHTS if default else f"model_{variant_name(num_steps)}.safetensors"


def variants_entry(stages: list[tuple[int, str]], default_steps: int) -> dict[str, Any]:
    """config.json's ``variants``: name -> {weights, num_steps, stage}, for (steps, stage) of each student."""
    return {variant_name(n): {"weights": variant_weights(n, n == default_steps), "num_steps": int(n), "stage": stage}
            for n, stage in stages}


def bundle_config(cfg: DictConfig, net: Any, meta: dict[str, Any], mindir_batch: int,
                  stages: list[tuple[int, str]], stage_one_meta: dict[str, Any],
                  models: Optional[dict[int, dict[str, Any]]] = None,
                  w_intervals: Optional[dict[int, Optional[tuple[float, float]]]] = None) -> dict[str, Any]:
    """config.json for a bundle whose default student is ``net`` (``meta``: its checkpoint metadata);
    ``stages``: (sampling steps, stage) of every student in the bundle, the default one among them;
    ``models``: steps -> network config of each student (a variant whose network differs from the default's
    carries its own ``model``: the phase-two student, which takes negative classes); ``w_intervals``: steps ->
    the interval each student's w input follows (:func:`student.distill.input_interval`), which the bundle's
    sampler then applies (``guidance_interval``: w inside, 1 outside) for that variant."""
    import mindspore as ms

    ucfg = net.config
    own = {n: m for n, m in (models or {}).items() if m != ucfg.to_dict()}
    negative_variants = [variant_name(n) for n, m in own.items() if m.get("guidance_negative")]
    default_steps = int(meta.get("sampling_steps") or cfg.sampler.num_steps)
    intervals = {n: list(iv) for n, iv in (w_intervals or {}).items() if iv is not None}
    c, h = ucfg.in_channels, ucfg.image_size
    w_min, w_max = float(meta["w_min"]), float(meta["w_max"])
    settings = build.sampler_settings(cfg, default_steps)
    w = float(cfg.sampler.w)
    if not w_min <= w <= w_max:
        raise UserError(f"sampler.w={w:g} (the bundle's default) is outside the student's range [{w_min:g}, {w_max:g}]")
    b = int(mindir_batch)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": ucfg.to_dict(),
        "diffusion": {"schedule": meta["schedule"], "prediction": meta["prediction"],
                      "time": "continuous t in [0, 1], variance preserving, parametrised by logSNR"},
        "guidance": {"w_min": w_min, "w_max": w_max, "convention": W_CONVENTION,
                     "w_schedules": ["constant", "linear", "cosine"],
                     "negative_classes": bool(ucfg.guidance_negative) or bool(negative_variants),
                     **({"negative_variants": negative_variants} if negative_variants else {})},
        "classes": {"names": [str(n) for n in meta["class_names"]], "num_classes": ucfg.num_classes,
                    "null_class": ucfg.num_classes},
        "image": {"channels": c, "height": h, "width": h, "range": [-1.0, 1.0], "layout": "NCHW"},
        "sampler": {"kind": settings.kind, "num_steps": settings.num_steps, "eta": settings.eta, "w": w,
                    "w_schedule": settings.w_schedule, "clip_x0": settings.clip_x0,
                    "dynamic_threshold": settings.dynamic_threshold, "batch_size": int(cfg.sampler.batch_size),
                    **({"guidance_interval": intervals[default_steps]} if default_steps in intervals else {})},
        "weights": WEIGHTS,
        "default_variant": variant_name(default_steps),
        "variants": {name: dict(v, **({"model": own[v["num_steps"]]} if v["num_steps"] in own else {}),
                                **({"guidance_interval": intervals[v["num_steps"]]} if v["num_steps"] in intervals
                                   else {}))
                     for name, v in variants_entry(stages, default_steps).items()},
        "mindir": {"file": MINDIR, "role": "one network call; the sampling loop is the caller's",
                   "batch_size": b, "dynamic_shapes": False,
                   "inputs": [{"name": "x", "shape": [b, c, h, h], "dtype": "float32"},
                              {"name": "t", "shape": [b], "dtype": "float32"},
                              {"name": "y", "shape": [b], "dtype": "int32"},
                              {"name": "w", "shape": [b], "dtype": "float32"}],
                   "output": {"name": meta["prediction"], "shape": [b, c, h, h], "dtype": "float32"}},
        "mindir_sampler": None if settings.stochastic else {
            "file": SAMPLER_MINDIR, "role": "the whole sampler: noise, labels and w in, images out (no Python DDIM)",
            "batch_size": b, "dynamic_shapes": False, "num_steps": settings.num_steps, "kind": settings.kind,
            "w_schedule": settings.w_schedule, "null_class": ucfg.num_classes,
            "inputs": [{"name": "noise", "shape": [b, c, h, h], "dtype": "float32"},
                       {"name": "labels", "shape": [b], "dtype": "int32"},
                       {"name": "w", "shape": [b], "dtype": "float32"}],
            "output": {"name": "images", "shape": [b, c, h, h], "dtype": "float32", "range": [-1.0, 1.0]}},
        "training": training_info(cfg, stage_one_meta),
        "created_with": {"mindspore": ms.__version__},
    }


def export_mindir(net: Any, path: Path, batch: int) -> None:
    """The one-pass network ``(x, t, y, w) -> output`` as MINDIR, traced at a fixed batch."""
    import mindspore as ms

    ucfg, rng = net.config, np.random.default_rng(0)
    x = rng.standard_normal((batch, ucfg.in_channels, ucfg.image_size, ucfg.image_size)).astype(np.float32)
    inputs = (ms.Tensor(x), ms.Tensor(np.full(batch, 0.5, np.float32)),
              ms.Tensor(np.arange(batch, dtype=np.int32) % ucfg.num_classes), ms.Tensor(np.ones(batch, np.float32)))
    _export(net, inputs, path)


def export_sampler_mindir(model: Pretrained, path: Path) -> None:
    """The bundle's default sampler as one graph ``(noise, labels, w) -> images`` (config ``mindir_sampler``)."""
    import mindspore as ms
    from distill.core.sampling import ServingSampler
    from teacher.guidance import ConditionalPrediction

    spec = model.config["mindir_sampler"]
    settings = model.settings(int(spec["num_steps"]), str(spec["w_schedule"]))
    cell = ServingSampler(ConditionalPrediction(model.net), settings, int(spec["null_class"]))
    cell.set_train(False)
    b = int(spec["batch_size"])
    inputs = (ms.Tensor(model.noise(b, 0)), ms.Tensor(np.arange(b, dtype=np.int32) % len(model.class_names)),
              ms.Tensor(np.full(b, float(model.config["sampler"]["w"]), np.float32)))
    _export(cell, inputs, path)


def _export(cell: Any, inputs: tuple[Any, ...], path: Path) -> None:
    import mindspore as ms

    try:
        ms.export(cell, *inputs, file_name=str(path), file_format="MINDIR")
    except (RuntimeError, ValueError, TypeError) as e:
        raise UserError(f"MINDIR export failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e


def read_report(cfg: DictConfig) -> Optional[dict[str, Any]]:
    path = build.run_dir(cfg) / "evaluate" / "report.json"
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the evaluation report {path} ({e})") from e
    return report if isinstance(report, dict) else {"report": report}


def write_sample_grid(model: Pretrained, path: Path, ws: list[float]) -> None:
    labels = np.arange(len(model.class_names))
    rows = [(f"w={w:g}", model.sample(labels, w, seed=0)) for w in ws]
    save_side_by_side_png(rows, path, nrow=len(labels))


def write_negative_grid(model: Pretrained, path: Path, w: float) -> None:
    """A grid drawn in one pass per step: row y = target class y, column 0 = guided away from the null class,
    column 1 + k = away from class k (blank where k = y); each row from one noise."""
    k = len(model.class_names)
    noise = model.noise(k, 0)
    cells = np.full((k, k + 1, *model.image_shape), -1.0, np.float32)
    cells[:, 0] = model.sample(np.arange(k), w, noise=noise)
    for neg in range(k):
        rows = np.array([y for y in range(k) if y != neg])
        cells[rows, 1 + neg] = model.sample(rows, w, noise=noise[rows], negative=neg)
    save_side_by_side_png([(f"class {model.class_names[y]}", cells[y]) for y in range(k)], path, nrow=k + 1)


# ----------------------------------------------------------------------------- task=sample


