"""Every value check that needs no data and no model, run by the entry point before any work.

Hydra has already checked keys and types against the schema (distill/core/config.py); these are
the ranges and relations, each by the function of the floor that owns the value, so a bad
``eval.ws`` or ``progressive.min_steps`` fails in a second instead of after the teacher trained.
"""
from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from distill.core import build
from distill.core import diffusion as dm
from distill.core.config import check_known_keys, check_ranges
from distill.core.errors import UserError
from distill.jobs.bench import bench_options
from distill.jobs.distill import check_targets
from distill.jobs.methods import check_sampler_guidance, eval_methods
from distill.jobs.negative_phase import check_negative_phase
from distill.jobs.progressive import first_teacher
from student.distill import (check_p_null_negative, check_w_loss_power, check_w_range, check_ws_per_input,
                             distill_target, w_distribution)
from student.progressive import round_plan
from teacher.loading import classifier_checkpoint_path
from teacher.noisy_classifier import check_classifier_shape
from teacher.objective import check_p_uncond
from teacher.unet import check_class_ramp


# Tasks that take a CFG (or interval) student only: a student.target=cfgpp student runs task=distill, targets and
# evaluate (progressive rounds, the negative phase, the bench, response and the bundle read one output head).
CFG_STUDENT_TASKS = ("negative_phase", "progressive", "bench", "publish", "response", "pipeline")


def check_config(cfg: DictConfig) -> None:
    """Raise a one-line UserError for the first bad value of ``cfg``."""
    check_known_keys(cfg)
    check_ranges(cfg)
    dm.logsnr_schedule(str(cfg.diffusion.schedule), np.zeros(1))
    one = np.ones(1)
    for section in (cfg.teacher, cfg.student, cfg.negative_phase, cfg.progressive, cfg.classifier):
        build.train_settings(section.train, int(cfg.seed), bool(cfg.jit))
    build.sampler_settings(cfg)
    check_sampler_guidance(cfg)
    if str(cfg.sampler.guidance) == "classifier" and str(cfg.task) == "teacher" \
            and not classifier_checkpoint_path(cfg).is_file():  # the teacher check would fail after training
        raise UserError(f"sampler.guidance=classifier: the noise-aware classifier {classifier_checkpoint_path(cfg)} "
                        f"is not there yet; make it first with task=classifier")
    eval_methods(cfg)
    check_p_uncond(float(cfg.teacher.p_uncond))
    s = cfg.student
    check_w_range(*w_distribution(s))
    check_w_loss_power(float(s.w_loss_power))
    check_p_null_negative(float(s.p_null_negative))
    if bool(s.negative) and not bool(s.class_gate):
        raise UserError("student: negative=true needs class_gate=true (the negative class is the gate's offset)")
    check_class_ramp(float(s.class_ramp))
    check_ws_per_input(s.ws_per_input, int(s.train.batch_size))
    check_negative_phase(cfg)
    if bool(cfg.negative_phase.enabled):
        check_ws_per_input(s.ws_per_input, int(cfg.negative_phase.train.batch_size))
    check_targets(str(s.targets))
    target, _ = distill_target(s)
    if target == "cfgpp" and str(cfg.task) in CFG_STUDENT_TASKS:
        raise UserError(f"student.target=cfgpp: task={cfg.task} is not built for the CFG++ student's two heads; "
                        f"run task=distill, then task=evaluate eval.progressive=false (docs/sampling.md)")
    if target == "cfgpp" and str(cfg.task) == "evaluate" and bool(cfg.eval.progressive) \
            and not (cfg.eval.get("student") or cfg.eval.get("students")):
        raise UserError("student.target=cfgpp has no progressive rounds (not built for two heads): set "
                        "eval.progressive=false")
    if target == "cfgpp" and bool(s.negative):
        raise UserError("student.target=cfgpp takes no negative class: set student.negative=false")
    p = cfg.progressive
    round_plan(int(p.start_steps), int(p.min_steps))
    if first_teacher(p) == "cfg" and target != "cfg":
        raise UserError(f"progressive: first_teacher=cfg learns the two-pass CFG teacher, not the student's "
                        f"target={target}; use first_teacher=student")
    if p.w_power is not None:
        check_w_range(float(s.w_min), float(s.w_max), float(p.w_power))
    if p.w_loss_power is not None:
        check_w_loss_power(float(p.w_loss_power))
    for loss in (str(s.loss), str(p.loss)):
        dm.output_space_weight(loss, str(cfg.diffusion.prediction), one, one)
    bench_options(cfg.bench)
    check_classifier_shape(int(cfg.classifier.width), int(cfg.classifier.levels), int(cfg.classifier.groups))
