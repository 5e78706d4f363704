"""``task=evaluate``: student vs teacher on the same noise, classes and w grid."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from distill import build
from distill.classifier import EvalClassifier, load_or_train_classifier
from distill.data import ImageData


def evaluation_classifier(cfg: DictConfig, data: ImageData) -> EvalClassifier:
    """The classifier whose features and predictions judge samples; trained once per run, cached."""
    path = build.run_dir(cfg) / "eval_classifier" / "classifier.safetensors"
    c = cfg.eval.classifier
    return load_or_train_classifier(path, data, steps=int(c.steps), batch_size=int(c.batch_size), seed=int(cfg.seed))
