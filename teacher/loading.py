"""The trained teacher and the noise-aware classifier that guides it, on disk: their architectures from the config,
checkpoint paths, metadata and loaders."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig

from distill.core import build, provenance
from distill.core.checkpoint import CHECKPOINT_NAME, read_meta
from distill.core.data import ImageData
from distill.core.errors import UserError
from distill.core.weights import load_ema_weights
from teacher.noisy_classifier import NoisyClassifier, NoisyClassifierConfig
from teacher.unet import UNet, UNetConfig

log = logging.getLogger(__name__)


def unet_config(model_cfg: Mapping[str, Any], data: ImageData, guidance_embed_dim: int = 0,
                guidance_scale: float = 100.0) -> UNetConfig:
    c, h, w = data.image_shape
    if h != w:
        raise UserError(f"model: images must be square, got {h}x{w}")
    cfg = UNetConfig.from_dict(dict(build.plain(model_cfg), in_channels=c, image_size=h, num_classes=data.num_classes,
                                    guidance_embed_dim=guidance_embed_dim, guidance_scale=guidance_scale))
    cfg.validate()
    return cfg


def teacher_meta(ucfg: UNetConfig, cfg: DictConfig, data: ImageData) -> dict[str, Any]:
    return {"kind": "teacher", "model": ucfg.to_dict(), "schedule": cfg.diffusion.schedule,
            "prediction": cfg.diffusion.prediction, "p_uncond": float(cfg.teacher.p_uncond),
            "data": str(cfg.data.name), "class_names": list(data.class_names),
            "provenance": provenance.record(cfg, "teacher", {"data": provenance.data_digest(data)})}


def teacher_checkpoint_path(cfg: DictConfig) -> Path:
    return _checkpoint_path(cfg, "teacher")


def _checkpoint_path(cfg: DictConfig, section: str) -> Path:
    """``<section>.checkpoint`` if set (a trained one to use), else the stage's own ``<run>/<section>/`` checkpoint."""
    given = cfg[section].checkpoint
    return Path(str(given)).expanduser() if given else build.run_dir(cfg) / section / CHECKPOINT_NAME


def load_teacher(cfg: DictConfig, data: ImageData) -> UNet:
    """The trained teacher's EMA weights, checked against this config's architecture and diffusion."""
    path = teacher_checkpoint_path(cfg)
    meta = read_meta(path) if path.is_file() else None
    if meta is None:
        raise UserError(f"teacher checkpoint not found: {path} (run task=teacher first or set teacher.checkpoint)")
    ucfg = unet_config(cfg.model, data)
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


# ----------------------------------------------------------------------------- the noise-aware classifier
def classifier_config(section: Mapping[str, Any], data: ImageData) -> NoisyClassifierConfig:
    c, h, _ = data.image_shape
    cfg = NoisyClassifierConfig(in_channels=c, image_size=h, num_classes=data.num_classes, width=int(section["width"]),
                                levels=int(section["levels"]), groups=int(section["groups"]))
    cfg.validate()
    return cfg


def classifier_meta(ccfg: NoisyClassifierConfig, cfg: DictConfig, data: ImageData) -> dict[str, Any]:
    return {"kind": "noisy_classifier", "model": ccfg.to_dict(), "schedule": str(cfg.diffusion.schedule),
            "num_classes": int(data.num_classes), "image_shape": [int(s) for s in data.image_shape],
            "data": str(cfg.data.name),
            "provenance": provenance.record(cfg, "classifier", {"data": provenance.data_digest(data)})}


def classifier_checkpoint_path(cfg: DictConfig) -> Path:
    return _checkpoint_path(cfg, "classifier")


def load_noisy_classifier(cfg: DictConfig, data: ImageData) -> NoisyClassifier:
    """The trained noise-aware classifier's EMA weights, refused when made for other data (classes, image shape)
    or another noise schedule."""
    path = classifier_checkpoint_path(cfg)
    if not path.is_file():
        raise UserError(f"classifier guidance needs a noise-aware classifier: {path} not found (make it with "
                        f"task=classifier, or set classifier.checkpoint)")
    meta = read_meta(path)
    if meta.get("kind") != "noisy_classifier":
        raise UserError(f"{path} is a '{meta.get('kind')}' checkpoint, not a noise-aware classifier (task=classifier)")
    have = (int(meta["num_classes"]), list(meta["image_shape"]))
    want = (int(data.num_classes), [int(s) for s in data.image_shape])
    if have != want:
        shape = lambda s: "x".join(map(str, s))  # noqa: E731
        raise UserError(f"classifier {path} was trained for {have[0]} classes of {shape(have[1])} images, the data has "
                        f"{want[0]} classes of {shape(want[1])} images; train one for this data with task=classifier")
    if meta.get("schedule") != str(cfg.diffusion.schedule):
        raise UserError(f"classifier {path} was trained on the {meta.get('schedule')} noise schedule, the config says "
                        f"{cfg.diffusion.schedule}")
    net = NoisyClassifier(NoisyClassifierConfig(**meta["model"]))
    load_ema_weights(path, net)
    net.set_train(False)
    return net
