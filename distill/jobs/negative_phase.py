"""``task=negative_phase``: add negative classes to the finished stage-one student without changing it.

The stage-one student (``student.negative=false``) is frozen; only the new negative path of
:func:`student.model.negative_phase_student` trains, on the two-pass teacher's
``out(neg) + w (out(y) - out(neg))`` with a negative class other than the label in every example (an
example with the null class would teach the path nothing: it adds exact zeros there). The result,
``<run>/student_negative/checkpoint.safetensors``, is the stage-one student bit for bit with the null
class, so evaluate, publish and sample use it in its place when ``negative_phase.enabled``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from distill.core import build
from distill.core.data import load_data
from distill.core.errors import UserError
from distill.core.training import CHECKPOINT_NAME
from distill.jobs.distill import online_batches
from distill.jobs.training_run import resumed_trainer, run_and_summarise
from student.distill import describe_w, w_distribution
from student.loading import load_student, negative_phase_checkpoint_path, negative_phase_meta
from student.model import is_negative_path, negative_phase_student
from teacher.loading import load_teacher
from teacher.objective import regression_loss
from teacher.unet import UNet, count_parameters

log = logging.getLogger(__name__)


def check_negative_phase(cfg: DictConfig) -> None:
    """The phase adds negative classes to a student trained without them (not to a jointly trained one)."""
    if bool(cfg.negative_phase.enabled) and bool(cfg.student.negative):
        raise UserError("negative_phase.enabled=true adds negative classes to a stage-one student without them: "
                        "set student.negative=false (or negative_phase.enabled=false for the jointly trained one)")


def run_negative_phase(cfg: DictConfig, follow_inputs: bool = False) -> Path:
    """Train the negative path in <run>/student_negative, resuming a checkpoint made with the same settings and
    inputs (``restart=true``, or ``follow_inputs`` when only the inputs changed: train it again)."""
    check_negative_phase(cfg)
    data = load_data(cfg.data)
    teacher = load_teacher(cfg, data)
    stage_one, _ = load_student(cfg, data)
    student = negative_phase_student(stage_one)
    ema = UNet(student.config)
    out = negative_phase_checkpoint_path(cfg).parent
    settings = build.train_settings(cfg.negative_phase.train, int(cfg.seed), bool(cfg.jit))
    trainer = resumed_trainer(cfg, student, ema, regression_loss, online_batches(cfg, data, teacher, settings.batch_size, 0.0),
                              settings, out, negative_phase_meta(student.config, cfg, data),
                              build.restart(cfg, follow_inputs), only=is_negative_path)
    trained = sum(int(p.size) for name, p in student.parameters_and_names() if is_negative_path(name))
    log.info("negative_phase: %d of %d parameters trained (the negative path), the rest frozen; %s, %d steps at "
             "batch %d, a class other than the label as every example's negative", trained,
             count_parameters(student), describe_w(*w_distribution(cfg.student)), settings.steps, settings.batch_size)
    run_and_summarise(trainer, "negative_phase", targets="online")
    return out / CHECKPOINT_NAME
