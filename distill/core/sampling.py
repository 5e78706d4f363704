"""DDIM / DDPM sampling with any number of steps, any w (or a per-step w schedule).

``predict(z, t, y, w, y_uncond) -> model output`` is either the teacher's two-pass
guided prediction or the student's one pass; the sampler does not care which.
All noise comes from a seeded numpy generator, so the same seed gives the same images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from distill.core import diffusion as dm
from distill.core import runtime
from distill.core.errors import UserError


@dataclass(frozen=True)
class SamplerSettings:
    num_steps: int = 32
    kind: str = "ddim"                 # ddim (eta as given) or ddpm (ancestral posterior steps)
    eta: float = 0.0
    schedule: str = "cosine"
    prediction: str = "v"
    w_schedule: str = "constant"       # constant | linear | cosine (each has mean w)
    clip_x0: bool = True
    dynamic_threshold: Optional[float] = None  # percentile, e.g. 0.995; None = plain clip

    def validate(self) -> None:
        if self.kind not in ("ddim", "ddpm"):
            raise UserError(f"sampler: unknown kind '{self.kind}' (choose ddim or ddpm)")
        if self.num_steps < 1:
            raise UserError(f"sampler: num_steps {self.num_steps} must be >= 1")
        if not 0.0 <= self.eta <= 1.0:
            raise UserError(f"sampler: eta {self.eta} must be in [0, 1]")
        if self.dynamic_threshold is not None and not 0.5 < self.dynamic_threshold <= 1.0:
            raise UserError(f"sampler: dynamic_threshold {self.dynamic_threshold} must be a percentile in (0.5, 1]")


NOISE_STREAM = 7  # a fixed sub-stream of the run's seed, apart from training's (seed, 1|2|3, step)


def initial_noise(seed: int, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """The starting noise of ``n`` samples: the same seed gives the same noise everywhere."""
    return np.random.default_rng((int(seed), NOISE_STREAM)).standard_normal((n, *shape)).astype(np.float32)


def jit_predictor(cell: nn.Cell, use_jit: bool = True) -> Callable[..., ms.Tensor]:
    def predict(z, t, y, w, y_uncond):
        return cell(z, t, y, w, y_uncond)
    return runtime.jit(predict) if use_jit else predict


def step_times(settings: SamplerSettings) -> list[tuple[float, float, float, float, float, float]]:
    """(t, s, alpha_t, sigma_t, alpha_s, sigma_s) for each step, noisiest first."""
    times = dm.sampling_times(settings.num_steps)
    alpha, sigma = dm.alpha_sigma(dm.logsnr_schedule(settings.schedule, times))
    alpha, sigma = alpha.astype(np.float64), sigma.astype(np.float64)
    alpha[-1], sigma[-1] = 1.0, 0.0  # the last step lands on clean data
    return [(float(times[i]), float(times[i + 1]), float(alpha[i]), float(sigma[i]),
             float(alpha[i + 1]), float(sigma[i + 1])) for i in range(settings.num_steps)]


def sample(
    predict: Callable[..., ms.Tensor],
    noise: np.ndarray,
    labels: np.ndarray,
    w: float,
    settings: SamplerSettings,
    uncond_labels: np.ndarray,
    seed: int = 0,
) -> np.ndarray:
    """Run the reverse process from ``noise`` (N,C,H,W) and return images in [-1, 1]."""
    settings.validate()
    b = noise.shape[0]
    rng = np.random.default_rng(seed)
    z = ms.Tensor(noise.astype(np.float32))
    y = ms.Tensor(labels.astype(np.int32))
    y_uncond = ms.Tensor(uncond_labels.astype(np.int32))
    ws = dm.guidance_schedule(settings.w_schedule, w, settings.num_steps)
    eta = 1.0 if settings.kind == "ddpm" else settings.eta
    for i, (t, _, a_t, s_t, a_s, s_s) in enumerate(step_times(settings)):
        t_vec = ms.Tensor(np.full(b, t, np.float32))
        w_vec = ms.Tensor(np.full(b, ws[i], np.float32))
        out = predict(z, t_vec, y, w_vec, y_uncond)
        x0, eps = dm.x0_eps_from_output(z, out, a_t, s_t, settings.prediction)
        if settings.dynamic_threshold is not None:
            x0 = dm.dynamic_threshold(x0, settings.dynamic_threshold)
        elif settings.clip_x0:
            x0 = ops.clamp(x0, -1.0, 1.0)
        if settings.dynamic_threshold is not None or settings.clip_x0:
            eps = dm.eps_from_x0(z, x0, a_t, s_t)
        if s_s == 0.0:
            z = x0
            break
        step_noise = ms.Tensor(rng.standard_normal(noise.shape).astype(np.float32)) if eta > 0 else None
        if settings.kind == "ddpm":
            z = dm.ddpm_step(z, x0, a_t, s_t, a_s, s_s, step_noise)
        else:
            z = dm.ddim_step(x0, eps, a_t, s_t, a_s, s_s, eta=eta, noise=step_noise)
    return np.clip(z.asnumpy(), -1.0, 1.0)


def sample_in_batches(
    predict: Callable[..., ms.Tensor],
    noise: np.ndarray,
    labels: np.ndarray,
    w: float,
    settings: SamplerSettings,
    uncond_labels: np.ndarray,
    batch_size: int,
    seed: int = 0,
) -> np.ndarray:
    """:func:`sample` over fixed-size chunks (the last one padded, so one compiled shape)."""
    out = []
    n = noise.shape[0]
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n  # pad by wrapping; dropped below
        imgs = sample(predict, noise[idx], labels[idx], w, settings, uncond_labels[idx], seed=seed + start)
        out.append(imgs[: min(batch_size, n - start)])
    return np.concatenate(out, axis=0)
