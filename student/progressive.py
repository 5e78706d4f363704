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

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import mindspore as ms
from omegaconf import DictConfig

from distill import build
from distill import diffusion as dm
from distill.checkpoint import read_meta
from distill.data import ImageData, iterate_batches, load_data
from distill.errors import UserError
from distill.fileio import atomic_write
from distill.runtime import is_main, shard
from distill.sampling import jit_predictor
from distill.training import CHECKPOINT_NAME, Trainer, copy_weights
from student.distill import check_w_range, describe_w, sample_w, w_distribution
from student.job import load_student, student_checkpoint_path
from teacher.guidance import ConditionalPrediction
from teacher.train import regression_loss
from teacher.unet import UNet

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


def progressive_dir(cfg: DictConfig) -> Path:
    return build.run_dir(cfg) / "progressive"


def round_checkpoint_path(cfg: DictConfig, num_steps: int) -> Path:
    return progressive_dir(cfg) / f"steps_{num_steps}" / CHECKPOINT_NAME


def teacher_denoiser(predict: Callable[..., ms.Tensor], y: np.ndarray, w: np.ndarray, null_class: int,
                     prediction: str, clip_x0: bool) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """``denoise(z, t, alpha, sigma) -> (x0, eps)`` of the one-pass teacher for a fixed batch (y, w)."""
    y_t, w_t = ms.Tensor(y.astype(np.int32)), ms.Tensor(w.astype(np.float32))
    y_null = ms.Tensor(np.full(len(y), null_class, np.int32))

    def denoise(z: np.ndarray, t: np.ndarray, alpha: np.ndarray, sigma: np.ndarray):
        out = predict(ms.Tensor(z.astype(np.float32)), ms.Tensor(t.astype(np.float32)), y_t, w_t, y_null)
        a, s = alpha.reshape(-1, 1, 1, 1), sigma.reshape(-1, 1, 1, 1)
        x0, eps = dm.x0_eps_from_output(z, out.asnumpy().astype(np.float64), a, s, prediction)
        if clip_x0:  # as the sampler does with sampler.clip_x0
            x0 = np.clip(x0, -1.0, 1.0)
            eps = dm.eps_from_x0(z, x0, a, s)
        return x0, eps

    return denoise


def progressive_batches(data: ImageData, predict: Callable[..., ms.Tensor], num_steps: int, round_index: int,
                        batch_size: int, seed: int, schedule: str, prediction: str, loss_space: str,
                        w_min: float, w_max: float, w_power: float, clip_x0: bool
                        ) -> Callable[[int], Callable[[int], tuple[np.ndarray, ...]]]:
    """start_step -> step -> (z_t, t, y, w, target, weight) for :func:`teacher.train.regression_loss`.

    t is drawn on the N-step grid the sampler uses; all randomness comes from
    ``default_rng((seed, 3, round, step))``, so a resumed round replays the same batches.
    Under data parallelism each rank runs the teacher on its own slice of the global batch only.
    """
    check_w_range(w_min, w_max, w_power)

    def factory(start: int) -> Callable[[int], tuple[np.ndarray, ...]]:
        stream = iterate_batches(data.train_images, data.train_labels, batch_size, seed, start)

        def make(step: int) -> tuple[np.ndarray, ...]:
            x, y = next(stream)
            rng = np.random.default_rng((seed, 3, round_index, step))
            b = x.shape[0]
            i = rng.integers(1, num_steps + 1, b)
            w = sample_w(rng, b, w_min, w_max, w_power)
            eps = rng.standard_normal(x.shape).astype(np.float32)
            x, y, i, w, eps = shard((x, y, i, w, eps), batch_size)  # this rank's slice (data parallel)
            times = dm.progressive_times(num_steps, i)
            a_t, s_t = dm.grid_alpha_sigma(schedule, times[0])
            z = dm.q_sample(x, eps, a_t.reshape(-1, 1, 1, 1), s_t.reshape(-1, 1, 1, 1)).astype(np.float32)
            denoise = teacher_denoiser(predict, y, w, data.num_classes, prediction, clip_x0)
            target, _, _ = dm.two_step_ddim_target(denoise, z, times, schedule, prediction)
            weight = dm.output_space_weight(loss_space, prediction, a_t, s_t)
            return z, times[0], y.astype(np.int32), w, target.astype(np.float32), weight

        return make

    return factory


def round_meta(source_meta: dict[str, Any], num_steps: int, round_index: int, teacher_path: Path,
               cfg: DictConfig) -> dict[str, Any]:
    """Stage-one metadata (model, w range, schedule, classes) plus what this round is."""
    p = cfg.progressive
    meta = {k: v for k, v in source_meta.items() if k not in ("step", "total_steps")}
    meta.update({"kind": "student", "stage": "progressive", "sampling_steps": int(num_steps),
                 "round": int(round_index), "teacher_steps": 2 * int(num_steps),
                 "teacher_checkpoint": str(teacher_path), "loss": str(p.loss), "clip_x0": bool(p.clip_x0)})
    return meta


def finished_round(path: Path, steps: int, model: dict[str, Any], num_steps: int) -> bool:
    """True when ``path`` holds this round fully trained (same model and step count)."""
    if not path.is_file():
        return False
    meta = read_meta(path)
    if meta.get("kind") != "student" or meta.get("model") != model or meta.get("sampling_steps") != num_steps:
        raise UserError(f"{path} holds another run (kind {meta.get('kind')}, sampling_steps "
                        f"{meta.get('sampling_steps')}); use another run_dir or remove it")
    return int(meta.get("step", 0)) >= steps


def run_progressive(cfg: DictConfig) -> Path:
    """Train the rounds that are not finished; returns the last round's checkpoint."""
    from tensorboardX import SummaryWriter

    p = cfg.progressive
    plan = round_plan(int(p.start_steps), int(p.min_steps))
    schedule, prediction = str(cfg.diffusion.schedule), str(cfg.diffusion.prediction)
    dm.output_space_weight(str(p.loss), prediction, np.ones(1), np.ones(1))  # validates the loss name early
    data = load_data(cfg.data)
    source = Path(str(p.student)).expanduser() if p.get("student") else student_checkpoint_path(cfg)
    _, source_meta = load_student(cfg, data, source)
    for key, want in (("schedule", schedule), ("prediction", prediction)):
        if source_meta.get(key, want) != want:
            raise UserError(f"student {source} was trained with {key}={source_meta[key]} but the config says {want}")
    if int(source_meta.get("step", 0)) < int(source_meta.get("total_steps", 0)):
        log.warning("progressive: stage-one student %s is only trained to step %s of %s", source,
                    source_meta.get("step"), source_meta.get("total_steps"))
    w_min, w_max, w_power = w_distribution(source_meta)
    settings = build.train_settings(p.train, int(cfg.seed), bool(cfg.jit))
    log.info("progressive: %d -> %s sampling steps, %s, %d steps per round at batch %d",
             int(p.start_steps), " -> ".join(map(str, plan)),
             describe_w(w_min, w_max, w_power), settings.steps, settings.batch_size)
    rounds: list[dict[str, Any]] = []
    teacher_path = source
    for round_index, num_steps in enumerate(plan, start=1):
        path = round_checkpoint_path(cfg, num_steps)
        entry: dict[str, Any] = {"round": round_index, "steps": num_steps, "teacher_steps": 2 * num_steps,
                                 "teacher": str(teacher_path), "checkpoint": str(path)}
        if finished_round(path, settings.steps, source_meta["model"], num_steps):
            log.info("progressive: round %d (%d -> %d steps) already done in %s, skipped",
                     round_index, 2 * num_steps, num_steps, path)
            rounds.append(dict(entry, status="skipped"))
            teacher_path = path
            continue
        writer = SummaryWriter(str(build.run_dir(cfg) / "tb" / f"progressive_steps_{num_steps}")) if is_main() else None
        entry.update(train_round(cfg, data, teacher_path, source_meta, num_steps, round_index, settings, writer))
        rounds.append(entry)
        teacher_path = path
    out = progressive_dir(cfg)
    summary = {"start_steps": int(p.start_steps), "min_steps": int(p.min_steps), "source": str(source),
               "w_min": w_min, "w_max": w_max, "rounds": rounds}
    if is_main():
        atomic_write(out / "rounds.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    return teacher_path


def train_round(cfg: DictConfig, data: ImageData, teacher_path: Path, source_meta: dict[str, Any],
                num_steps: int, round_index: int, settings: Any, writer: Any) -> dict[str, Any]:
    """One round: a copy of the teacher learns two teacher DDIM steps as one, on the N-step grid."""
    p = cfg.progressive
    teacher, _ = load_student(cfg, data, teacher_path)
    student, ema = UNet(teacher.config), UNet(teacher.config)
    copy_weights(teacher, student)
    predict = jit_predictor(ConditionalPrediction(teacher), bool(cfg.jit))
    factory = progressive_batches(
        data, predict, num_steps, round_index, settings.batch_size, settings.seed, str(cfg.diffusion.schedule),
        str(cfg.diffusion.prediction), str(p.loss), *w_distribution(source_meta),
        bool(p.clip_x0))
    out = round_checkpoint_path(cfg, num_steps).parent
    meta = round_meta(source_meta, num_steps, round_index, teacher_path, cfg)
    trainer = Trainer(student, ema, regression_loss, factory, settings, out, meta, writer)
    trainer.try_resume()
    log.info("progressive: round %d, %d -> %d sampling steps, from step %d of %d", round_index, 2 * num_steps,
             num_steps, trainer.step, settings.steps)
    start_step, t0 = trainer.step, time.perf_counter()
    losses = trainer.run()
    seconds = time.perf_counter() - t0
    if writer is not None:
        writer.close()
    ran = trainer.step - start_step
    result = {"status": "trained", "trained_steps": ran, "seconds": round(seconds, 1),
              "seconds_per_step": round(seconds / max(ran, 1), 4),
              "first_loss": float(np.mean(losses[:20])), "last_loss": float(np.mean(losses[-20:]))}
    if is_main():
        atomic_write(out / "train_summary.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    log.info("progressive: round %d done, %d steps in %.1f s, loss %.4f -> %.4f", round_index, ran, seconds,
             result["first_loss"], result["last_loss"])
    return result
