"""The trained teacher on disk: its architecture from the config, its checkpoint path, metadata and loader."""
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
    if cfg.teacher.checkpoint:
        return Path(str(cfg.teacher.checkpoint)).expanduser()
    return build.run_dir(cfg) / "teacher" / CHECKPOINT_NAME


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
