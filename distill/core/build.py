"""Turn config sections into the objects the jobs use (one place, so jobs stay short)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf

from distill.core import diffusion as dm
from distill.core.errors import UserError
from distill.core.provenance import Restart
from distill.core.sampling import SamplerSettings
from distill.core.training import TrainSettings


def plain(section: Any) -> dict[str, Any]:
    """A config section as a plain dict (works for DictConfig and dicts)."""
    if OmegaConf.is_config(section):
        return OmegaConf.to_container(section, resolve=True)  # type: ignore[return-value]
    return dict(section)


def train_settings(train_cfg: Mapping[str, Any], seed: int, use_jit: bool) -> TrainSettings:
    try:
        s = TrainSettings(**plain(train_cfg), seed=seed, use_jit=use_jit)
    except TypeError as e:
        raise UserError(f"training config: {e}") from e
    s.validate()
    return s


def sampler_settings(cfg: Any, num_steps: int | None = None) -> SamplerSettings:
    s = cfg.sampler
    settings = SamplerSettings(
        num_steps=int(num_steps if num_steps is not None else s.num_steps), kind=s.kind, eta=float(s.eta),
        schedule=cfg.diffusion.schedule, prediction=cfg.diffusion.prediction, w_schedule=s.w_schedule,
        clip_x0=bool(s.clip_x0),
        dynamic_threshold=None if s.dynamic_threshold is None else float(s.dynamic_threshold),
        engine=str(s.get("engine", "step")), guidance=str(s.get("guidance", "cfg")),
        guidance_interval=dm.check_interval(s.get("guidance_interval")),
    )
    settings.validate()
    return settings


def restart(cfg: Any, follow_inputs: bool = False) -> Restart:
    """When a training stage starts over instead of refusing a checkpoint made otherwise: ``restart=true``
    always; ``follow_inputs`` (the pipeline) when only its inputs changed."""
    return Restart(settings=bool(cfg.restart), inputs=bool(cfg.restart) or follow_inputs)


def run_dir(cfg: Any) -> Path:
    """``run_dir`` if set, else Hydra's output dir: outputs/<run_name>/, or the job's folder under -m."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("run_dir"):
        return Path(str(cfg.run_dir))
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / str(cfg.run_name)
