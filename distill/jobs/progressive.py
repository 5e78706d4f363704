"""``task=progressive``: halve the one-pass student's sampling steps round by round (16 -> 8 -> 4)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from distill.core import build
from distill.core import diffusion as dm
from distill.core.data import ImageData, load_data
from distill.core.errors import UserError
from distill.core.fileio import write_json
from distill.core.provenance import Restart
from distill.core.runtime import is_main
from distill.core.sampling import jit_predictor
from distill.core.weights import copy_weights, weights_digest
from student.distill import check_w_loss_power, check_w_range, describe_w, negative_draw
from student.loading import load_student
from student.model import check_one_head
from student.progressive import (check_w0_share, finished_round, progressive_batches, progressive_dir,
                                 round_checkpoint_path, round_meta, round_plan, round_steps, round_w_intervals,
                                 round_w_settings, source_checkpoint)
from teacher.guidance import ConditionalPrediction, GuidedPrediction
from teacher.loading import load_teacher
from distill.jobs.training_run import resumed_trainer, run_and_summarise
from teacher.objective import regression_loss
from teacher.unet import UNet

log = logging.getLogger(__name__)


def run_progressive(cfg: DictConfig, follow_inputs: bool = False) -> Path:
    """Train the rounds that are not finished; returns the last round's checkpoint. A round made with other
    settings or inputs is refused, or trained again (``restart=true``; ``follow_inputs``: when only its
    inputs changed, as in the pipeline)."""
    p = cfg.progressive
    plan = round_plan(int(p.start_steps), int(p.min_steps))
    first_teacher(p)
    schedule, prediction = str(cfg.diffusion.schedule), str(cfg.diffusion.prediction)
    dm.output_space_weight(str(p.loss), prediction, np.ones(1), np.ones(1))  # validates the loss name early
    data = load_data(cfg.data)
    source = source_checkpoint(cfg)
    source_net, source_meta = load_student(cfg, data, source)
    check_one_head(source_net, "progressive distillation")
    source_digest = weights_digest(source_net)
    for key, want in (("schedule", schedule), ("prediction", prediction)):
        if source_meta.get(key, want) != want:
            raise UserError(f"student {source} was trained with {key}={source_meta[key]} but the config says {want}")
    if int(source_meta.get("step", 0)) < int(source_meta.get("total_steps", 0)):
        log.warning("progressive: stage-one student %s is only trained to step %s of %s", source,
                    source_meta.get("step"), source_meta.get("total_steps"))
    w_min, w_max, w_power, w_loss_power = round_w_settings(p, source_meta)
    check_w_range(w_min, w_max, w_power)
    check_w_loss_power(w_loss_power)
    w0_share = check_w0_share(p.get("w0_share", 0.0))
    base = build.train_settings(p.train, int(cfg.seed), bool(cfg.jit))
    per_round = [dataclasses.replace(base, steps=n) for n in round_steps(p, plan, base.steps)]
    log.info("progressive: %d -> %s sampling steps, %s%s, %s steps per round at batch %d",
             int(p.start_steps), " -> ".join(map(str, plan)),
             describe_w(w_min, w_max, w_power) + f", loss x (1 + w)^-{w_loss_power:g}",
             f", {w0_share:g} of the examples at w = {w_min:g}" if w0_share else "",
             " / ".join(str(s.steps) for s in per_round), base.batch_size)
    restart = build.restart(cfg, follow_inputs)
    rounds: list[dict[str, Any]] = []
    teacher_path = source
    intervals = round_w_intervals(source_meta, plan)
    for round_index, (num_steps, settings, w_intervals) in enumerate(zip(plan, per_round, intervals), start=1):
        path = round_checkpoint_path(cfg, num_steps)
        entry: dict[str, Any] = {"round": round_index, "steps": num_steps, "teacher_steps": 2 * num_steps,
                                 "teacher": str(teacher_path), "checkpoint": str(path)}
        meta = round_meta(source_meta, num_steps, round_index, teacher_path, source_digest, cfg, data, w_intervals[1])
        if finished_round(path, settings.steps, meta, restart):
            log.info("progressive: round %d (%d -> %d steps) already done in %s, skipped",
                     round_index, 2 * num_steps, num_steps, path)
            rounds.append(dict(entry, status="skipped"))
            teacher_path = path
            continue
        entry.update(train_round(cfg, data, teacher_path, source_meta, meta, num_steps, round_index, settings,
                                 restart, w_intervals))
        rounds.append(entry)
        teacher_path = path
    out = progressive_dir(cfg)
    summary = {"start_steps": int(p.start_steps), "min_steps": int(p.min_steps), "source": str(source),
               "w_min": w_min, "w_max": w_max, "rounds": rounds}
    trained = any(r.get("status") != "skipped" for r in rounds)
    if is_main() and (trained or not (out / "rounds.json").is_file()):  # all skipped: keep the record of their training
        write_json(out / "rounds.json", summary)
    return teacher_path


def first_teacher(p: DictConfig) -> str:
    kind = str(p.get("first_teacher", "student"))
    if kind not in ("student", "cfg"):
        raise UserError(f"progressive: first_teacher '{kind}' must be student or cfg")
    return kind


def train_round(cfg: DictConfig, data: ImageData, teacher_path: Path, source_meta: dict[str, Any],
                meta: dict[str, Any], num_steps: int, round_index: int, settings: Any, restart: Restart,
                w_intervals: tuple[Any, Any] = (None, None)) -> dict[str, Any]:
    """One round: a copy of the teacher learns two teacher DDIM steps as one, on the N-step grid (``w_intervals``:
    the teacher's and the student's w-input intervals, :func:`student.progressive.round_w_intervals`)."""
    p = cfg.progressive
    teacher, _ = load_student(cfg, data, teacher_path)
    student, ema = UNet(teacher.config), UNet(teacher.config)
    copy_weights(teacher, student)
    # Round 1 learns two steps of the stage-one student, or (first_teacher=cfg) of the two-pass CFG teacher
    # itself, so the stage-one student's own error does not carry into the rounds.
    two_pass = round_index == 1 and first_teacher(p) == "cfg"
    guide = GuidedPrediction(load_teacher(cfg, data)) if two_pass else ConditionalPrediction(teacher)
    predict = jit_predictor(guide, bool(cfg.jit))
    w_min, w_max, w_power, w_loss_power = round_w_settings(p, source_meta)
    factory = progressive_batches(
        data, predict, num_steps, round_index, settings.batch_size, settings.seed, str(cfg.diffusion.schedule),
        str(cfg.diffusion.prediction), str(p.loss), w_min, w_max, w_power, bool(p.clip_x0), w_loss_power,
        negative_draw(source_meta), check_w0_share(p.get("w0_share", 0.0)), w_intervals)
    out = round_checkpoint_path(cfg, num_steps).parent
    trainer = resumed_trainer(cfg, student, ema, regression_loss, factory, settings, out, meta, restart,
                              tb_name=f"progressive_steps_{num_steps}")
    log.info("progressive: round %d, %d -> %d sampling steps, from step %d of %d%s", round_index, 2 * num_steps,
             num_steps, trainer.step, settings.steps, "" if "w_interval" not in meta else
             f" (w input 1 outside t in {meta['w_interval']})" if meta["w_interval"] else " (w input w at every step)")
    summary = run_and_summarise(trainer, f"progressive: round {round_index}")
    # rounds.json's "steps" are the round's sampling steps, not the training steps of the summary
    return {"status": "trained", **{k: v for k, v in summary.items() if k not in ("provenance", "steps")}}
