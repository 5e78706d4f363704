"""What several jobs share: the evaluation classifier, the teacher's guided prediction, class-balanced guided
samples, the w check."""
from __future__ import annotations

import numpy as np
from mindspore import nn
from omegaconf import DictConfig

from distill.core import build
from distill.core.classifier import EvalClassifier, load_or_train_classifier
from distill.core.data import ImageData
from distill.core.errors import UserError
from distill.core.sampling import SamplerSettings, initial_noise, sample_in_batches
from teacher.guidance import ClassifierGuidedPrediction, GuidedPrediction
from teacher.loading import load_noisy_classifier
from teacher.unet import UNet


def evaluation_classifier(cfg: DictConfig, data: ImageData) -> EvalClassifier:
    """The classifier whose features and predictions judge samples; trained once per run and settings, cached,
    refused below ``eval.classifier.min_accuracy``."""
    path = build.run_dir(cfg) / "eval_classifier" / "classifier.safetensors"
    c = cfg.eval.classifier
    return load_or_train_classifier(path, data, steps=int(c.steps), batch_size=int(c.batch_size), seed=int(cfg.seed),
                                    min_accuracy=float(c.get("min_accuracy", 0.0)))


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


def guidance_scales(cfg: DictConfig, ws) -> list[float]:
    """The scales a job samples the teacher at: its w grid for CFG, ``sampler.guidance_lambda`` for CFG++,
    ``sampler.classifier_scale`` for classifier guidance."""
    guidance = str(cfg.sampler.get("guidance", "cfg"))
    if guidance == "cfgpp":
        return [float(cfg.sampler.guidance_lambda)]
    if guidance == "classifier":
        return [float(cfg.sampler.classifier_scale)]
    return [float(w) for w in ws]


def teacher_prediction(cfg: DictConfig, data: ImageData, net: UNet, guidance: str | None = None) -> nn.Cell:
    """The teacher's prediction cell for ``guidance`` (default ``sampler.guidance``): two-pass CFG / CFG++, or the
    unconditional teacher with the noise-aware classifier of ``task=classifier`` (refused when there is none)."""
    if (guidance or str(cfg.sampler.get("guidance", "cfg"))) == "classifier":
        return ClassifierGuidedPrediction(net, load_noisy_classifier(cfg, data))
    return GuidedPrediction(net)


def guided_samples(predict, data: ImageData, cfg: DictConfig, w: float, n: int, seed: int,
                   settings: SamplerSettings | None = None, across_ranks: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` class-balanced samples at guidance ``w`` from fixed noise (same seed, same noise).
    ``across_ranks``: every data-parallel worker calls it and draws its share (:func:`sample_in_batches`)."""
    settings = settings or build.sampler_settings(cfg)
    labels = balanced_labels(n, data.num_classes)
    noise = initial_noise(seed, n, data.image_shape)
    imgs = sample_in_batches(predict, noise, labels, check_w(w), settings,
                             uncond_labels(cfg, n, data.num_classes), int(cfg.sampler.batch_size), seed=seed,
                             across_ranks=across_ranks)
    return imgs, labels
