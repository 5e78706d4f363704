"""``task=teacher``: train (or load) the CFG teacher, then check its guided samples."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from distill import build
from distill.checkpoint import read_meta
from distill.fileio import atomic_write
from distill.data import ImageData, load_data
from distill.errors import UserError
from distill.images import save_grid_png, save_samples_npz
from distill.runtime import is_main
from distill.sampling import SamplerSettings, initial_noise, jit_predictor, sample_in_batches
from distill.training import CHECKPOINT_NAME, Trainer, load_ema_weights
from teacher.guidance import GuidedPrediction
from teacher.train import regression_loss, teacher_batch_maker
from teacher.unet import UNet, UNetConfig, count_parameters

log = logging.getLogger(__name__)


def teacher_meta(ucfg: UNetConfig, cfg: DictConfig, data: ImageData) -> dict[str, Any]:
    return {"kind": "teacher", "model": ucfg.to_dict(), "schedule": cfg.diffusion.schedule,
            "prediction": cfg.diffusion.prediction, "p_uncond": float(cfg.teacher.p_uncond),
            "data": str(cfg.data.name), "class_names": list(data.class_names)}


def teacher_checkpoint_path(cfg: DictConfig) -> Path:
    if cfg.teacher.checkpoint:
        return Path(str(cfg.teacher.checkpoint)).expanduser()
    return build.run_dir(cfg) / "teacher" / CHECKPOINT_NAME


def load_teacher(cfg: DictConfig, data: ImageData) -> UNet:
    """The trained teacher's EMA weights, checked against this config's architecture and diffusion."""
    path = teacher_checkpoint_path(cfg)
    meta = read_meta(path) if path.is_file() else None
    if meta is None:
        raise UserError(f"teacher checkpoint not found: {path} (run task=teacher first or set teacher.checkpoint)")
    ucfg = build.unet_config(cfg.model, data)
    if meta.get("kind") not in ("teacher", None):
        raise UserError(f"{path} is a '{meta.get('kind')}' checkpoint, not a teacher")
    for key, want in (("schedule", cfg.diffusion.schedule), ("prediction", cfg.diffusion.prediction)):
        if key in meta and meta[key] != want:
            raise UserError(f"teacher {path} was trained with {key}={meta[key]} but the config says {want}")
    if "model" in meta and meta["model"] != ucfg.to_dict():
        diff = {k: (meta["model"].get(k), v) for k, v in ucfg.to_dict().items() if meta["model"].get(k) != v}
        raise UserError(f"teacher {path} has another architecture than the config: {diff} (checkpoint vs config)")
    if int(meta.get("step", 0)) < int(meta.get("total_steps", 0)):
        log.warning("teacher %s is only trained to step %s of %s", path, meta.get("step"), meta.get("total_steps"))
    net = UNet(ucfg)
    load_ema_weights(path, net)
    net.set_train(False)
    return net


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
    return (np.arange(n) % num_classes).astype(np.int32)


def uncond_labels(cfg: DictConfig, n: int, num_classes: int) -> np.ndarray:
    """The null class, or the configured negative class for negative-class guidance."""
    neg = cfg.sampler.get("negative_class")
    if neg is None:
        return np.full(n, num_classes, np.int32)
    if not 0 <= int(neg) < num_classes:
        raise UserError(f"sampler: negative_class {neg} is not a class index in [0, {num_classes})")
    return np.full(n, int(neg), np.int32)


def check_w(w: float) -> float:
    if not np.isfinite(w) or w < 0:
        raise UserError(f"guidance weight w={w} must be a finite number >= 0")
    return float(w)


def guided_samples(predict, data: ImageData, cfg: DictConfig, w: float, n: int, seed: int,
                   settings: SamplerSettings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` class-balanced samples at guidance ``w`` from fixed noise (same seed, same noise)."""
    settings = settings or build.sampler_settings(cfg)
    labels = balanced_labels(n, data.num_classes)
    noise = initial_noise(seed, n, data.image_shape)
    imgs = sample_in_batches(predict, noise, labels, check_w(w), settings,
                             uncond_labels(cfg, n, data.num_classes), int(cfg.sampler.batch_size), seed=seed)
    return imgs, labels


def run_teacher(cfg: DictConfig) -> Path:
    """Train the teacher in <run>/teacher (resuming if a checkpoint is there) or load teacher.checkpoint."""
    data = load_data(cfg.data)
    if cfg.teacher.checkpoint:
        load_teacher(cfg, data)  # validates; nothing to train
        log.info("using the trained teacher at %s", cfg.teacher.checkpoint)
        return teacher_checkpoint_path(cfg)
    from tensorboardX import SummaryWriter

    out = build.run_dir(cfg) / "teacher"
    ucfg = build.unet_config(cfg.model, data)
    net, ema = UNet(ucfg), UNet(ucfg)
    settings = build.train_settings(cfg.teacher.train, int(cfg.seed), bool(cfg.jit))
    p_uncond = float(cfg.teacher.p_uncond)

    def batches(start: int):
        return teacher_batch_maker(data, settings.batch_size, settings.seed, start, cfg.diffusion.schedule,
                                   cfg.diffusion.prediction, p_uncond)

    writer = SummaryWriter(str(build.run_dir(cfg) / "tb")) if is_main() else None  # rank 0 writes
    trainer = Trainer(net, ema, regression_loss, batches, settings, out, teacher_meta(ucfg, cfg, data), writer)
    trainer.try_resume()
    log.info("teacher: %d parameters, %d train images %s, %d steps at batch %d",
             count_parameters(net), len(data.train_images), data.image_shape, settings.steps, settings.batch_size)
    done_before = trainer.step >= settings.steps
    t0 = time.perf_counter()
    trainer.run()
    train_seconds = time.perf_counter() - t0
    ema.set_train(False)
    if writer is not None:  # rank 0 only; also after a restart that found training done but no report
        if not done_before or not (out / "report.json").is_file():
            check_teacher(cfg, data, ema, out, writer, train_seconds, trainer.step)
        writer.close()
    return out / CHECKPOINT_NAME


def check_teacher(cfg: DictConfig, data: ImageData, ema: UNet, out: Path, writer, train_seconds: float,
                  steps: int) -> dict[str, Any]:
    """Guided samples at a few w, judged by the evaluation classifier: does the teacher draw digits?"""
    from distill.evaluate import evaluation_classifier
    from distill.classifier import features_and_predictions
    from distill.metrics import accuracy

    clf = evaluation_classifier(cfg, data)
    predict = jit_predictor(GuidedPrediction(ema), bool(cfg.jit))
    n = int(cfg.teacher.check.num_samples)
    report: dict[str, Any] = {"train_seconds": round(train_seconds, 1), "steps": steps,
                              "sampler_steps": int(cfg.sampler.num_steps), "accuracy": {}}
    for w in cfg.teacher.check.ws:
        imgs, labels = guided_samples(predict, data, cfg, float(w), n, int(cfg.seed))
        _, pred = features_and_predictions(clf, imgs)
        acc = accuracy(pred, labels)
        report["accuracy"][str(float(w))] = round(acc, 4)
        save_grid_png(imgs[: 10 * data.num_classes], out / f"samples_w{float(w):g}.png", nrow=data.num_classes)
        save_samples_npz(out / f"samples_w{float(w):g}.npz", imgs, labels, w=float(w), model="teacher")
        writer.add_scalar("teacher/sample_accuracy", acc, int(10 * float(w)))
        log.info("teacher: w=%g class accuracy of %d guided samples = %.3f", float(w), n, acc)
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    return report
