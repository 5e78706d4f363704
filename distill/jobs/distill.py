"""``task=distill``: train the one-pass student on the two-pass teacher's guided outputs."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
from omegaconf import DictConfig

from distill.core import build
from distill.core.data import ImageData, load_data
from distill.core.errors import UserError
from distill.core.runtime import data_share, local_batch_size, shard
from distill.core.sampling import jit_predictor
from distill.core.training import CHECKPOINT_NAME
from distill.jobs.training_run import resumed_trainer, run_and_summarise
from student.distill import (check_p_null_negative, check_w_loss_power, check_w_range, check_ws_per_input,
                             describe_target, describe_w, distill_inputs, distill_target, input_interval,
                             negative_draw, regression_batch, teacher_targets, w_distribution)
from student.loading import student_meta
from student.model import student_from_teacher
from teacher.guidance import GuidanceBranches
from teacher.loading import load_teacher
from teacher.objective import regression_loss
from teacher.unet import UNet

log = logging.getLogger(__name__)


def check_targets(targets: str) -> None:
    if targets not in ("online", "shards"):
        raise UserError(f"student: targets '{targets}' must be online or shards")


def distill_batches(cfg: DictConfig, data: ImageData, teacher: UNet | None
                    ) -> Callable[[int], Callable[[int], tuple[np.ndarray, ...]]]:
    """start_step -> step -> regression batch, with targets made online or read from shards."""
    s = cfg.student
    loss_space, prediction, w_loss_power = str(s.loss), str(cfg.diffusion.prediction), float(s.w_loss_power)
    if s.targets == "shards":
        from student.targets import shard_reader

        read = shard_reader(cfg)

        def from_shards(step: int) -> tuple[np.ndarray, ...]:
            *inputs, target = read(step)
            return regression_batch(tuple(inputs), target, loss_space, prediction, w_loss_power)
        return lambda start: from_shards
    check_targets(str(s.targets))
    return online_batches(cfg, data, teacher, int(s.train.batch_size), negative_draw(s))


def online_batches(cfg: DictConfig, data: ImageData, teacher: UNet, batch_size: int, p_null_negative: float
                   ) -> Callable[[int], Callable[[int], tuple[np.ndarray, ...]]]:
    """start_step -> step -> regression batch of ``batch_size`` examples with the teacher's targets made now, each
    example's negative class the null class with probability ``p_null_negative`` (the student section's w,
    loss and ws_per_input)."""
    s = cfg.student
    loss_space, prediction, w_loss_power = str(s.loss), str(cfg.diffusion.prediction), float(s.w_loss_power)
    branches = jit_predictor(GuidanceBranches(teacher), bool(cfg.jit))
    target, interval = distill_target(s)

    def factory(start: int) -> Callable[[int], tuple[np.ndarray, ...]]:
        make = distill_inputs(data, batch_size, int(cfg.seed), start, cfg.diffusion.schedule,
                              *w_distribution(s), s.ws_per_input, p_null_negative, data_share(), input_interval(s))

        def batch(step: int) -> tuple[np.ndarray, ...]:
            inputs = shard(make(step), batch_size)  # data parallel: targets for this rank's slice only
            out = teacher_targets(branches, inputs, s.ws_per_input, interval, target)
            return regression_batch(inputs, out, loss_space, prediction, w_loss_power)
        return batch

    return factory


def run_distill(cfg: DictConfig, follow_inputs: bool = False) -> Path:
    """Train the student in <run>/student, resuming a checkpoint made with the same settings and inputs
    (``restart=true``, or ``follow_inputs`` when only the inputs changed: train it again)."""
    s = cfg.student
    check_w_range(*w_distribution(s))
    check_w_loss_power(float(s.w_loss_power))
    check_p_null_negative(float(s.p_null_negative))
    check_ws_per_input(s.ws_per_input, local_batch_size(int(s.train.batch_size)))  # a rank's rows keep whole groups
    target = distill_target(s)
    ramp = float(s.class_ramp) if bool(s.class_gate) else 0.0  # the ramp scales the class gate: nothing without it
    if target[0] == "cfgpp" and ramp > 0:
        log.warning("distill: student.class_ramp=%g fades the class out towards lambda = 0, which weakens a CFG++ "
                    "student at every lambda below 1 (docs/experiments.md); student.class_ramp=0, the default of "
                    "target=cfgpp, is the measured choice", ramp)
    data = load_data(cfg.data)
    teacher = load_teacher(cfg, data)
    out = build.run_dir(cfg) / "student"
    student = student_from_teacher(teacher, int(s.embed_dim), float(s.w_scale), bool(s.class_gate), bool(s.film),
                                   bool(s.negative), uncond_head=target[0] == "cfgpp", class_ramp=ramp)
    ema = UNet(student.config)
    settings = build.train_settings(s.train, int(cfg.seed), bool(cfg.jit))
    trainer = resumed_trainer(cfg, student, ema, regression_loss, distill_batches(cfg, data, teacher), settings, out,
                              student_meta(student.config, cfg, data), build.restart(cfg, follow_inputs))
    log.info("distill: %s targets (%s), %s, loss %s x (1 + w)^-%g, %d steps at batch %d (%d inputs x %d w), %s",
             s.targets, describe_target(*target, input_interval(s) is not None), describe_w(*w_distribution(s)),
             s.loss, float(s.w_loss_power),
             settings.steps, settings.batch_size,
             settings.batch_size // s.ws_per_input, s.ws_per_input,
             f"negative class null with p={negative_draw(s):g}, else another class" if s.negative
             else "no negative-class input")
    run_and_summarise(trainer, "distill", targets=str(s.targets))
    return out / CHECKPOINT_NAME

