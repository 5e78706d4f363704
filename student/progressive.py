"""``task=progressive``: progressive step distillation of the one-pass student.

Stage two of Meng et al. (CVPR 2023), which is Salimans & Ho (ICLR 2022) applied to the
w-conditioned student. Round r has a teacher (round 1: the stage-one student, used at
``start_steps`` sampling steps; later rounds: the previous round's student) and a student
initialised from it. The student works on a grid of N = teacher steps / 2 steps: each
training example draws t = i/N on that grid, w as in stage one (range and w_power),
a class label and z_t = q_sample(x, t); the teacher makes two deterministic DDIM steps
t -> t - 1/(2N) -> s = t - 1/N with the one-pass guided prediction, and the student learns
the output whose ONE DDIM step from z_t lands on the same z_s
(:func:`distill.diffusion.two_step_ddim_target`). Steps halve each round down to ``min_steps``.

Each round is its own resumable training run in ``<run>/progressive/steps_{N}/`` with a
``checkpoint.safetensors`` of kind "student" (so ``load_student``, ``eval.student(s)`` and
``bench.student`` take it) plus ``sampling_steps`` and ``round`` in its metadata; a finished
round is skipped on restart.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import mindspore as ms
from omegaconf import DictConfig

from distill.core import build, provenance
from distill.core import diffusion as dm
from distill.core.checkpoint import read_meta
from distill.core.data import ImageData, step_batches
from distill.core.errors import UserError
from distill.core.runtime import data_share, shard
from distill.core.training import CHECKPOINT_NAME
from distill.core.weights import weights_digest
from student.distill import (check_w_loss_power, check_w_range, guidance_loss_weight, input_interval,
                             sample_negative, sample_w, w_distribution)
from student.loading import load_student, student_checkpoint_path
from teacher.loading import teacher_checkpoint_path

log = logging.getLogger(__name__)


def round_plan(start_steps: int, min_steps: int) -> list[int]:
    """The students' step counts, one per round: start/2, start/4, ..., min_steps."""
    if min_steps < 1 or start_steps <= min_steps:
        raise UserError(f"progressive: need start_steps > min_steps >= 1, got {start_steps} and {min_steps}")
    plan, n = [], start_steps
    while n > min_steps:
        if n % 2:
            raise UserError(f"progressive: start_steps {start_steps} must be min_steps {min_steps} times a "
                            f"power of two (halving reaches the odd count {n})")
        n //= 2
        plan.append(n)
    if plan[-1] != min_steps:
        raise UserError(f"progressive: halving start_steps {start_steps} skips min_steps {min_steps} "
                        f"(start_steps must be min_steps times a power of two)")
    return plan


def round_steps(p: Mapping[str, Any], plan: list[int], default: int) -> list[int]:
    """Training steps of each round of ``plan``: ``progressive.round_steps[r]`` for round r + 1 (e.g.
    ``[300, 700]`` for 16 -> 8 -> 4), ``default`` (``progressive.train.steps``) for every round after the
    list ends or when it is null; entries past the last round are unused."""
    table = p.get("round_steps")
    table = [] if table is None else list(table)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in table):
        raise UserError(f"progressive: round_steps {table} must be training steps per round, integers >= 1 "
                        f"(e.g. [300, 700])")
    return [int(table[r]) if r < len(table) else int(default) for r in range(len(plan))]


def check_w0_share(share: float) -> float:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= float(share) <= 1.0:
        raise UserError(f"progressive: w0_share {share!r} must be a number in [0, 1]")
    return float(share)


def progressive_dir(cfg: DictConfig) -> Path:
    return build.run_dir(cfg) / "progressive"


def source_checkpoint(cfg: DictConfig) -> Path:
    """The stage-one student the rounds start from: ``progressive.student``, else the run's student."""
    p = cfg.progressive
    return Path(str(p.student)).expanduser() if p.get("student") else student_checkpoint_path(cfg)


def round_checkpoint_path(cfg: DictConfig, num_steps: int) -> Path:
    return progressive_dir(cfg) / f"steps_{num_steps}" / CHECKPOINT_NAME


def teacher_denoiser(predict: Callable[..., ms.Tensor], y: np.ndarray, w: np.ndarray, y_neg: np.ndarray,
                     prediction: str, clip_x0: bool, w_interval: Optional[tuple[float, float]] = None
                     ) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """``denoise(z, t, alpha, sigma) -> (x0, eps)`` of the teacher for a fixed batch (y, w, negative class);
    ``w_interval``: the teacher's w input is 1 at times outside it (an interval student, as it is sampled)."""
    y_t = ms.Tensor(y.astype(np.int32))
    y_neg_t = ms.Tensor(y_neg.astype(np.int32))

    def denoise(z: np.ndarray, t: np.ndarray, alpha: np.ndarray, sigma: np.ndarray):
        w_t = ms.Tensor(dm.interval_w(w, t, w_interval))
        out = predict(ms.Tensor(z.astype(np.float32)), ms.Tensor(t.astype(np.float32)), y_t, w_t, y_neg_t)
        a, s = alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
        x0, eps = dm.x0_eps_from_output(z, out.asnumpy().astype(np.float64), a, s, prediction)
        if clip_x0:  # as the sampler does with sampler.clip_x0
            x0 = np.clip(x0, -1.0, 1.0)
            eps = dm.eps_from_x0(z, x0, a, s)
        return x0, eps

    return denoise


def progressive_batches(data: ImageData, predict: Callable[..., ms.Tensor], num_steps: int, round_index: int,
                        batch_size: int, seed: int, schedule: str, prediction: str, loss_space: str,
                        w_min: float, w_max: float, w_power: float, clip_x0: bool, w_loss_power: float = 0.0,
                        p_null_negative: float = 1.0, w0_share: float = 0.0,
                        w_intervals: tuple[Optional[tuple[float, float]], Optional[tuple[float, float]]] = (None, None)
                        ) -> Callable[[int], Callable[[int], tuple[np.ndarray, ...]]]:
    """start_step -> step -> (z_t, t, y, w, y_neg, target, weight) for :func:`teacher.objective.regression_loss`.

    t is drawn on the N-step grid the sampler uses; all randomness comes from
    ``default_rng((seed, 3, round, step))``, so a resumed round replays the same batches.
    Under data parallelism each rank runs the teacher on its own slice of the global batch only.
    Each example's loss is weighted by ``(1 + w) ** -w_loss_power``, and its negative class drawn
    (:func:`student.distill.sample_negative`), as in stage one. With ``w0_share`` > 0 each example's w is
    set to exactly ``w_min`` with that probability (drawn after everything else, so a share of 0 leaves
    the batches of earlier versions unchanged). ``w_intervals``: (the teacher's, the student's) interval of t
    where their w input is w, 1 elsewhere (an interval student's rounds, :func:`round_w_intervals`); the
    loss weight follows the student's w input, as in stage one.
    """
    teacher_interval, student_interval = w_intervals
    check_w_range(w_min, w_max, w_power)
    check_w_loss_power(w_loss_power)
    w0_share = check_w0_share(w0_share)

    def factory(start: int) -> Callable[[int], tuple[np.ndarray, ...]]:
        draw = step_batches(data, batch_size, seed, start, 3, round_index, share=data_share())

        def make(step: int) -> tuple[np.ndarray, ...]:
            x, y, rng = draw(step)
            b = x.shape[0]
            i = rng.integers(1, num_steps + 1, b)
            w = sample_w(rng, b, w_min, w_max, w_power)
            eps = rng.standard_normal(x.shape).astype(np.float32)
            y_neg = sample_negative(rng, y, data.num_classes, p_null_negative)
            if w0_share > 0:
                w = np.where(rng.uniform(0.0, 1.0, b) < w0_share, np.float32(w_min), w).astype(np.float32)
            x, y, i, w, eps, y_neg = shard((x, y, i, w, eps, y_neg), batch_size)  # this rank's slice (data parallel)
            times = dm.progressive_times(num_steps, i)
            a_t, s_t = dm.grid_alpha_sigma(schedule, times[0])
            z = dm.noisy(x, eps, a_t, s_t)
            denoise = teacher_denoiser(predict, y, w, y_neg, prediction, clip_x0, teacher_interval)
            target, _, _ = dm.two_step_ddim_target(denoise, z, times, schedule, prediction)
            w = dm.interval_w(w, times[0], student_interval)
            weight = dm.output_space_weight(loss_space, prediction, a_t, s_t) * guidance_loss_weight(w, w_loss_power)
            return z, times[0], y.astype(np.int32), w, y_neg, target.astype(np.float32), weight

        return make

    return factory


def round_w_settings(p: Mapping[str, Any], source_meta: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """(w_min, w_max, w_power, w_loss_power) of the rounds: the stage-one student's, unless the
    progressive config sets its own ``w_power`` / ``w_loss_power``."""
    w_min, w_max, w_power = w_distribution(source_meta)
    if p.get("w_power") is not None:
        w_power = float(p["w_power"])
    w_loss_power = p.get("w_loss_power")
    return w_min, w_max, w_power, float(source_meta.get("w_loss_power", 0.0) if w_loss_power is None else w_loss_power)


def round_w_intervals(source_meta: Mapping[str, Any], plan: list[int]
                      ) -> list[tuple[Optional[tuple[float, float]], Optional[tuple[float, float]]]]:
    """Per round of ``plan``: (its teacher's, its student's) interval of t where their w input is w and 1
    elsewhere. Round 1's teacher is the stage-one student (:func:`student.distill.input_interval`); each round's
    student takes w at every step that spans a teacher step taking w (:func:`distill.core.diffusion.round_interval`),
    and teaches the next round. All None for students that take w at every t."""
    out, interval = [], input_interval(source_meta)
    for n in plan:
        student = dm.round_interval(interval, n)
        out.append((interval, student))
        interval = student
    return out


def round_meta(source_meta: dict[str, Any], num_steps: int, round_index: int, teacher_path: Path,
               source_digest: str, cfg: DictConfig, data: ImageData,
               w_interval: Optional[tuple[float, float]] = None) -> dict[str, Any]:
    """Stage-one metadata (model, w range, schedule, classes) plus what this round is, which stage-one
    student it descends from (``source_digest``: the weights digest of that student) and its provenance
    (inputs: its teacher's file, that student, the data; round 1 from the CFG teacher: that file too).
    A round of a student whose w input follows an interval records its own (``w_interval``, None = w at every
    step), which :func:`student.distill.input_interval` reads."""
    p = cfg.progressive
    first = str(p.get("first_teacher", "student")) if round_index == 1 else "student"
    inputs = {"teacher": provenance.file_digest(teacher_path), "stage_one": str(source_digest),
              "data": provenance.data_digest(data)}
    if first == "cfg":
        inputs["cfg_teacher"] = provenance.file_digest(teacher_checkpoint_path(cfg))
    _, _, w_power, w_loss_power = round_w_settings(p, source_meta)
    meta = {k: v for k, v in source_meta.items() if k not in ("step", "total_steps")}
    meta.update({"kind": "student", "stage": "progressive", "sampling_steps": int(num_steps),
                 "round": int(round_index), "teacher_steps": 2 * int(num_steps),
                 "teacher_checkpoint": str(teacher_path), "source_digest": str(source_digest),
                 "loss": str(p.loss), "clip_x0": bool(p.clip_x0),
                 "first_teacher": first, "round_w_power": w_power, "round_w_loss_power": w_loss_power,
                 "round_w0_share": float(p.get("w0_share", 0.0)),
                 "provenance": provenance.record(cfg, "progressive", inputs)})
    if input_interval(source_meta) is not None:
        meta["w_interval"] = list(w_interval) if w_interval is not None else None
    return meta


def check_round(path: Path, model: dict[str, Any], num_steps: int, source_digest: str) -> dict[str, Any]:
    """The metadata of round checkpoint ``path``, after checking it is a round of this run: same model,
    ``num_steps`` sampling steps, distilled from the stage-one student whose weights digest is given."""
    if not path.is_file():
        raise UserError(f"progressive round of {num_steps} steps not found: {path} (run task=progressive first, "
                        f"or leave the rounds out: eval.progressive=false, publish.few_step=false)")
    meta = read_meta(path)
    if meta.get("kind") != "student" or meta.get("model") != model or meta.get("sampling_steps") != num_steps:
        raise UserError(f"{path} holds another run (kind {meta.get('kind')}, sampling_steps "
                        f"{meta.get('sampling_steps')}); use another run_dir or remove it")
    if meta.get("source_digest") != source_digest:
        raise UserError(f"{path} was distilled from another stage-one student (weights digest "
                        f"{meta.get('source_digest')}, the run's student has {source_digest}); remove "
                        f"{path.parent.parent} to distil the rounds again")
    return meta


def finished_round(path: Path, steps: int, meta: dict[str, Any], restart: provenance.Restart) -> bool:
    """True when ``path`` holds this round (``meta``: what it is made of now) fully trained; False when
    absent, part-trained or to be trained again (``restart``); made otherwise and no restart: a UserError."""
    if not path.is_file():
        return False
    found = read_meta(path)
    return provenance.may_resume(path, found, meta["provenance"], steps, restart) and int(found.get("step", 0)) >= steps




def verified_rounds(cfg: DictConfig, data: ImageData) -> list[tuple[int, Path]]:
    """(steps, checkpoint) of every round of the configured plan, each checked to descend from the
    run's stage-one student; a missing round or one of another student is a UserError."""
    p = cfg.progressive
    plan = round_plan(int(p.start_steps), int(p.min_steps))
    net, meta = load_student(cfg, data, source_checkpoint(cfg))
    digest = weights_digest(net)
    rounds = []
    for n in plan:
        path = round_checkpoint_path(cfg, n)
        check_round(path, meta["model"], n, digest)
        rounds.append((n, path))
    return rounds
