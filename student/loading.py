"""A distilled student on disk: its checkpoint path, metadata and loader (stage one and progressive rounds)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from distill.core import build, provenance
from distill.core.checkpoint import CHECKPOINT_NAME, read_meta
from distill.core.data import ImageData
from distill.core.errors import UserError
from distill.core.weights import load_ema_weights
from student.distill import distill_target, input_interval, w_distribution
from teacher.loading import teacher_checkpoint_path
from teacher.unet import UNet, UNetConfig


def student_checkpoint_path(cfg: DictConfig) -> Path:
    return build.run_dir(cfg) / "student" / CHECKPOINT_NAME


def negative_phase_checkpoint_path(cfg: DictConfig) -> Path:
    """The phase-two student (``task=negative_phase``): the stage-one student plus its negative path."""
    return build.run_dir(cfg) / "student_negative" / CHECKPOINT_NAME


def serving_student_path(cfg: DictConfig) -> Path:
    """The one-pass student that evaluate and publish use at the sampler's steps: the phase-two student when
    ``negative_phase.enabled`` (with the null class it is the stage-one student bit for bit), else stage one (always
    for ``student.target=cfgpp``: the negative phase is for CFG students)."""
    phase_two = bool(cfg.negative_phase.enabled) and str(cfg.student.get("target", "cfg")) != "cfgpp"
    return negative_phase_checkpoint_path(cfg) if phase_two else student_checkpoint_path(cfg)


def student_meta(ucfg: UNetConfig, cfg: DictConfig, data: ImageData) -> dict[str, Any]:
    s = cfg.student
    w_min, w_max, w_power = w_distribution(s)
    target, interval = distill_target(s)
    return {"kind": "student", "model": ucfg.to_dict(), "schedule": cfg.diffusion.schedule,
            "prediction": cfg.diffusion.prediction, "w_min": w_min, "w_max": w_max, "w_power": w_power,
            "w_convention": "uncond + w * (cond - uncond)", "loss": str(s.loss),
            "w_loss_power": float(s.w_loss_power), "ws_per_input": int(s.ws_per_input),
            "negative": bool(s.negative), "p_null_negative": float(s.p_null_negative),
            "target": target, **({"interval": list(interval)} if interval is not None else {}),
            **({"interval_input": True} if input_interval(s) is not None else {}),
            "data": str(cfg.data.name), "class_names": list(data.class_names),
            "provenance": provenance.record(cfg, "student", {
                "data": provenance.data_digest(data),
                "teacher": provenance.file_digest(teacher_checkpoint_path(cfg))})}


def negative_phase_meta(ucfg: UNetConfig, cfg: DictConfig, data: ImageData) -> dict[str, Any]:
    """The phase-two checkpoint's metadata: the student's, with every example's negative a real class, and its
    provenance (the stage-one student among its inputs)."""
    meta = student_meta(ucfg, cfg, data)
    meta.update(stage="negative_phase", negative=True, p_null_negative=0.0,
                provenance=provenance.record(cfg, "student_negative", {
                    "data": provenance.data_digest(data),
                    "teacher": provenance.file_digest(teacher_checkpoint_path(cfg)),
                    "student": provenance.file_digest(student_checkpoint_path(cfg))}))
    return meta


def load_student(cfg: DictConfig, data: ImageData, path: Path | None = None) -> tuple[UNet, dict[str, Any]]:
    """A distilled student (EMA weights) and its metadata."""
    path = path or student_checkpoint_path(cfg)
    if not path.is_file():
        if path == negative_phase_checkpoint_path(cfg) and not student_checkpoint_path(cfg).is_file():
            path = student_checkpoint_path(cfg)  # no stage-one student either: that comes first
        task = "negative_phase" if path == negative_phase_checkpoint_path(cfg) else "distill"
        hint = " or set negative_phase.enabled=false for the stage-one student" if task == "negative_phase" else ""
        raise UserError(f"student checkpoint not found: {path} (run task={task} first{hint})")
    meta = read_meta(path)
    if meta.get("kind") != "student" or "model" not in meta:
        raise UserError(f"{path} is not a student checkpoint (kind={meta.get('kind')})")
    net = UNet(UNetConfig.from_dict(meta["model"]))
    if net.config.image_size != data.image_shape[1] or net.config.num_classes != data.num_classes:
        raise UserError(f"student {path} was trained on {net.config.image_size}px images with "
                        f"{net.config.num_classes} classes, not on this data")
    load_ema_weights(path, net)
    net.set_train(False)
    return net, meta
