"""``task=distill``: train the one-pass student on the two-pass teacher's guided outputs."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig

from distill.core import build
from distill.core.fileio import write_json
from distill.core.data import ImageData, load_data
from distill.core.errors import UserError
from distill.core.runtime import data_share, is_main, local_batch_size, shard
from distill.core.sampling import jit_predictor
from distill.core.training import CHECKPOINT_NAME, Trainer
from student.distill import (check_p_null_negative, check_w_loss_power, check_w_range, check_ws_per_input,
                             describe_target, describe_w, distill_inputs, distill_target, negative_draw,
                             regression_batch, teacher_targets, w_distribution)
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
    _, interval = distill_target(s)

    def factory(start: int) -> Callable[[int], tuple[np.ndarray, ...]]:
        make = distill_inputs(data, batch_size, int(cfg.seed), start, cfg.diffusion.schedule,
                              *w_distribution(s), s.ws_per_input, p_null_negative, data_share())

        def batch(step: int) -> tuple[np.ndarray, ...]:
            inputs = shard(make(step), batch_size)  # data parallel: targets for this rank's slice only
            target = teacher_targets(branches, inputs, s.ws_per_input, interval)
            return regression_batch(inputs, target, loss_space, prediction, w_loss_power)
        return batch

    return factory


def run_distill(cfg: DictConfig, follow_inputs: bool = False) -> Path:
    """Train the student in <run>/student, resuming a checkpoint made with the same settings and inputs
    (``restart=true``, or ``follow_inputs`` when only the inputs changed: train it again)."""
    from tensorboardX import SummaryWriter

    s = cfg.student
    check_w_range(*w_distribution(s))
    check_w_loss_power(float(s.w_loss_power))
    check_p_null_negative(float(s.p_null_negative))
    check_ws_per_input(s.ws_per_input, local_batch_size(int(s.train.batch_size)))  # a rank's rows keep whole groups
    target = distill_target(s)
    data = load_data(cfg.data)
    teacher = load_teacher(cfg, data)
    out = build.run_dir(cfg) / "student"
    student = student_from_teacher(teacher, int(s.embed_dim), float(s.w_scale), bool(s.class_gate), bool(s.film),
                                   bool(s.negative))
    ema = UNet(student.config)
    settings = build.train_settings(s.train, int(cfg.seed), bool(cfg.jit))
    writer = SummaryWriter(str(build.run_dir(cfg) / "tb")) if is_main() else None  # rank 0 writes
    meta = student_meta(student.config, cfg, data)
    trainer = Trainer(student, ema, regression_loss, distill_batches(cfg, data, teacher), settings, out, meta, writer)
    trainer.try_resume(build.restart(cfg, follow_inputs))
    log.info("distill: %s targets (%s), %s, loss %s x (1 + w)^-%g, %d steps at batch %d (%d inputs x %d w), %s",
             s.targets, describe_target(*target), describe_w(*w_distribution(s)), s.loss, float(s.w_loss_power),
             settings.steps, settings.batch_size,
             settings.batch_size // s.ws_per_input, s.ws_per_input,
             f"negative class null with p={negative_draw(s):g}, else another class" if s.negative
             else "no negative-class input")
    run_and_summarise(trainer, writer, "distill", str(s.targets))
    return out / CHECKPOINT_NAME


def run_and_summarise(trainer: Trainer, writer: Any, name: str, targets: str) -> None:
    """Run ``trainer``, close ``writer``, and (when it trained) write ``train_summary.json`` in its folder:
    steps, seconds, first and last loss."""
    start_step, t0 = trainer.step, time.perf_counter()
    losses = trainer.run()
    seconds = time.perf_counter() - t0
    if writer is not None:
        writer.close()
    if trainer.step > start_step and is_main():
        ran = trainer.step - start_step
        summary = {"provenance": trainer.meta["provenance"], "steps": trainer.step, "targets": targets,
                   "seconds": round(seconds, 1), "seconds_per_step": round(seconds / ran, 4),
                   "first_loss": losses[0], "last_loss": losses[-1]}
        write_json(trainer.out_dir / "train_summary.json", summary)
        log.info("%s: %d steps in %.1f s (%.3f s/step, %s targets), loss %.4g -> %.4g", name, ran, seconds,
                 seconds / ran, targets, float(np.mean(losses[:20])), float(np.mean(losses[-20:])))
