"""Diffusion math as small pure functions (variance preserving, continuous time).

Time t in [0, 1] (t=1 is pure noise); z_t = alpha_t * x0 + sigma_t * eps with
alpha^2 + sigma^2 = 1, parametrised by logSNR = log(alpha^2 / sigma^2), in the
style of google-research ``diffusion_distillation/dpm.py``.

Schedule helpers run on the host with numpy (float64 inside, float32 out).
The conversion and sampler-step functions use only ``+ - * / **`` (and ``abs``),
so the same code works on numpy arrays and on MindSpore Tensors, including inside
a ``@mindspore.jit`` function. ``alpha``/``sigma`` may be scalars or broadcastable
arrays such as shape (B, 1, 1, 1).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import numpy as np
from mindspore import ops
from mindspore.ops import constexpr

from distill.core.errors import UserError

Array = Any  # numpy array or mindspore Tensor

PREDICTIONS = ("eps", "v")
GUIDANCE_KINDS = ("constant", "linear", "cosine")


# --------------------------------------------------------------------------- schedules
def logsnr_schedule(name: str, t, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> np.ndarray:
    """logSNR(t) for the ``cosine`` or ``linear`` (VP, beta 0.1 -> 20) schedule."""
    t = np.asarray(t, dtype=np.float64)
    if name == "cosine":
        b = math.atan(math.exp(-0.5 * logsnr_max))
        a = math.atan(math.exp(-0.5 * logsnr_min)) - b
        logsnr = -2.0 * np.log(np.tan(a * t + b))
    elif name == "linear":
        beta_0, beta_1 = 0.1, 20.0
        with np.errstate(divide="ignore"):
            logsnr = -np.log(np.expm1(beta_0 * t + 0.5 * (beta_1 - beta_0) * t**2))
        logsnr = np.clip(logsnr, logsnr_min, logsnr_max)
    else:
        raise UserError(f"unknown noise schedule '{name}' (choose cosine or linear)")
    return logsnr.astype(np.float32)


def alpha_sigma(logsnr) -> Tuple[np.ndarray, np.ndarray]:
    """(alpha, sigma) = (sqrt(sigmoid(logsnr)), sqrt(sigmoid(-logsnr))), computed stably."""
    logsnr = np.asarray(logsnr, dtype=np.float64)
    # sqrt(sigmoid(x)) = exp(-0.5 * log(1 + exp(-x))), never overflows.
    alpha = np.exp(-0.5 * np.logaddexp(0.0, -logsnr))
    sigma = np.exp(-0.5 * np.logaddexp(0.0, logsnr))
    return alpha.astype(np.float32), sigma.astype(np.float32)


def snr_weight_truncated(logsnr) -> np.ndarray:
    """Truncated-SNR loss weight max(SNR, 1) (Salimans & Ho)."""
    logsnr = np.asarray(logsnr, dtype=np.float64)
    return np.maximum(np.exp(logsnr), 1.0).astype(np.float32)


def sampling_times(num_steps: int) -> np.ndarray:
    """num_steps + 1 evenly spaced times from 1.0 (noise) down to 0.0 (data)."""
    if int(num_steps) != num_steps or num_steps < 1:
        raise UserError(f"number of sampling steps must be an integer >= 1, got {num_steps}")
    return np.linspace(1.0, 0.0, int(num_steps) + 1).astype(np.float32)


def guidance_schedule(kind: str, w: float, num_steps: int) -> np.ndarray:
    """Per-step guidance weight for steps i = 0..N-1 (i = 0 is the noisiest); mean is w."""
    if num_steps < 1:
        raise UserError(f"number of sampling steps must be >= 1, got {num_steps}")
    mid = (np.arange(num_steps, dtype=np.float64) + 0.5) / num_steps
    if kind == "constant":
        ws = np.full(num_steps, float(w))
    elif kind == "linear":
        ws = 2.0 * w * mid
    elif kind == "cosine":
        ws = w * (1.0 - np.cos(np.pi * mid))
    else:
        raise UserError(f"unknown guidance schedule '{kind}' (choose constant, linear or cosine)")
    return ws.astype(np.float32)


# --------------------------------------------------------------------------- conversions
def q_sample(x0: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """Forward process: z_t = alpha * x0 + sigma * eps."""
    return alpha * x0 + sigma * eps


def noisy(x0: np.ndarray, eps: np.ndarray, alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """z_t as float32 for a batch: :func:`q_sample` with per-example ``alpha``, ``sigma`` of shape (B,)."""
    col = (-1,) + (1,) * (np.ndim(x0) - 1)
    return q_sample(x0, eps, np.reshape(alpha, col), np.reshape(sigma, col)).astype(np.float32)


def noisy_at(schedule: str, x0: np.ndarray, eps: np.ndarray, t: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z_t, alpha_t, sigma_t) for a batch at per-example times ``t`` of the ``schedule`` (alpha, sigma: (B,))."""
    alpha, sigma = alpha_sigma(logsnr_schedule(schedule, t))
    return noisy(x0, eps, alpha, sigma), alpha, sigma


def x0_from_eps(z: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """x0 = (z - sigma * eps) / alpha."""
    return (z - sigma * eps) / alpha


def eps_from_x0(z: Array, x0: Array, alpha: Array, sigma: Array) -> Array:
    """eps = (z - alpha * x0) / sigma."""
    return (z - alpha * x0) / sigma


def v_from_x0_eps(x0: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """v = alpha * eps - sigma * x0."""
    return alpha * eps - sigma * x0


def x0_from_v(z: Array, v: Array, alpha: Array, sigma: Array) -> Array:
    """x0 = alpha * z - sigma * v."""
    return alpha * z - sigma * v


def eps_from_v(z: Array, v: Array, alpha: Array, sigma: Array) -> Array:
    """eps = sigma * z + alpha * v."""
    return sigma * z + alpha * v


@constexpr
def _check_prediction(prediction: str) -> None:
    # constexpr: runs in Python even under @mindspore.jit, whose parser rejects
    # `raise` of non-builtin exception types such as UserError.
    if prediction not in PREDICTIONS:
        raise UserError(f"unknown prediction '{prediction}' (choose eps or v)")


def x0_eps_from_output(z: Array, out: Array, alpha: Array, sigma: Array, prediction: str):
    """Network output (eps or v prediction) -> (x0, eps)."""
    _check_prediction(prediction)
    if prediction == "eps":
        return x0_from_eps(z, out, alpha, sigma), out
    return x0_from_v(z, out, alpha, sigma), eps_from_v(z, out, alpha, sigma)


def output_from_x0_eps(x0: Array, eps: Array, alpha: Array, sigma: Array, prediction: str) -> Array:
    """(x0, eps) -> what a network of this parametrisation should output (regression target)."""
    _check_prediction(prediction)
    if prediction == "eps":
        return eps
    return v_from_x0_eps(x0, eps, alpha, sigma)


def cfg_combine(cond: Array, uncond: Array, w) -> Array:
    """Classifier-free guidance: uncond + w * (cond - uncond) (w=0 uncond, w=1 cond)."""
    return uncond + w * (cond - uncond)


# --------------------------------------------------------------------------- guidance methods
GUIDANCE_METHODS = ("cfg", "cfgpp", "classifier")


def check_guidance(method: str) -> str:
    if method not in GUIDANCE_METHODS:
        raise UserError(f"sampler: unknown guidance '{method}' (choose {', '.join(GUIDANCE_METHODS)})")
    return method


def check_classifier_scale(scale: float, where: str = "sampler.classifier_scale") -> float:
    """Classifier guidance's scale s: a finite number >= 0 (0: the unconditional sampler)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale >= 0):
        raise UserError(f"{where}: classifier guidance scale {scale} must be a finite number >= 0")
    return float(scale)


def classifier_guided_output(out: Array, grad_log_p: Array, alpha: Array, sigma: Array, scale: Array,
                             prediction: str) -> Array:
    """Classifier guidance (Dhariwal & Nichol 2021) as the network output of its own parametrisation at z:
    eps_hat = eps - scale * sigma * grad_z log p(y | z, t). At fixed z, eps prediction moves by that shift
    and v prediction (eps = sigma z + alpha v) by the shift / alpha, so x0 moves by scale * sigma^2 / alpha *
    grad. Scale 0 returns ``out`` itself."""
    _check_prediction(prediction)
    shift = scale * sigma * grad_log_p
    return out - shift if prediction == "eps" else out - shift / alpha


def check_cfgpp_lambda(lam: float, where: str = "sampler.guidance_lambda") -> float:
    """CFG++'s guidance scale lambda must be a number in [0, 1] (0: unconditional, 1: conditional x0)."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
        raise UserError(f"{where}: CFG++ lambda {lam} must be a number in [0, 1]")
    return float(lam)


def check_interval(interval: Any, where: str = "sampler.guidance_interval") -> Optional[Tuple[float, float]]:
    """A guidance interval [t_lo, t_hi] in the sampler's time units (t = 1 noise, t = 0 data), or None."""
    if interval is None:
        return None
    bounds = tuple(interval)
    if (len(bounds) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
            or not 0.0 <= bounds[0] < bounds[1] <= 1.0):
        raise UserError(f"{where}: {list(bounds)} must be [t_lo, t_hi] with 0 <= t_lo < t_hi <= 1 "
                        f"(times t in [0, 1], t = 1 pure noise)")
    return float(bounds[0]), float(bounds[1])


def in_interval(times, interval: Optional[Tuple[float, float]]) -> np.ndarray:
    """Which sampler steps (by the time t the network sees) are guided: t_lo <= t <= t_hi; all without an interval."""
    times = np.asarray(times, np.float64)
    if interval is None:
        return np.ones(times.shape, bool)
    return (times >= interval[0]) & (times <= interval[1])


def interval_w(w: Any, t: Any, interval: Optional[Tuple[float, float]]) -> np.ndarray:
    """The guidance weight the interval teacher applies per example: ``w`` where its time t lies in ``interval``
    (:func:`in_interval`, the sampler's rule) and 1 (the conditional model) outside; ``w`` itself without one.
    ``interval_guided(cond, uncond, w, t, iv)`` is CFG at ``interval_w(w, t, iv)``."""
    return np.where(in_interval(t, interval), np.asarray(w, np.float32), np.float32(1.0)).astype(np.float32)


def round_interval(interval: Optional[Tuple[float, float]], num_steps: int) -> Optional[Tuple[float, float]]:
    """The interval of t where a progressive round's ``num_steps``-step student takes w (1 elsewhere), when its
    teacher samples twice the steps taking w only in ``interval`` (the sampler's rule, :func:`in_interval`).

    The student's step from t spans the teacher's steps at t and t - 1/(2N): where either takes w, the target
    depends on w, so the student must take it too; where neither does, it takes 1. Returned as [t_lo, t_hi] =
    [the lowest such step's t - 1/(2N), the highest such t], which holds exactly those steps of the N-step grid;
    None when every step takes w (no interval) or without an interval."""
    if interval is None:
        return None
    n = int(num_steps)
    fine = sampling_times(2 * n)
    guided = in_interval(fine[0:2 * n:2], interval) | in_interval(fine[1:2 * n:2], interval)
    if guided.all():
        return None
    if not guided.any():
        raise UserError(f"progressive: the guidance interval {list(interval)} holds no step of the {2 * n}-step "
                        f"grid the round's teacher samples")
    steps = np.flatnonzero(guided)
    return float(fine[2 * steps[-1] + 1]), float(fine[2 * steps[0]])


def interval_guided(cond: np.ndarray, uncond: np.ndarray, w, t, interval: Optional[Tuple[float, float]]
                    ) -> np.ndarray:
    """Guidance-interval output per example: ``uncond + w * (cond - uncond)`` where the example's time t lies in
    ``interval`` (t_lo <= t <= t_hi, :func:`in_interval`: the sampler's rule) and ``cond`` itself outside (w, t: one
    per example, or scalars). No interval: CFG at every t."""
    guided = cfg_combine(cond, uncond, np.asarray(w, np.float32).reshape(-1, *([1] * (np.ndim(cond) - 1))))
    inside = in_interval(np.asarray(t).reshape(-1), interval).reshape(-1, *([1] * (np.ndim(cond) - 1)))
    return np.where(inside, guided, cond)


def check_lambda_range(bounds: Any, where: str = "student.lambda_range") -> Tuple[float, float]:
    """A range [lo, hi] of CFG++ scales lambda, inside [0, 1] (the student's training range for target=cfgpp)."""
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise UserError(f"{where}={bounds!r} must be two numbers [lo, hi]") from None
    if not (0.0 <= lo <= hi <= 1.0):
        raise UserError(f"{where}=[{lo:g}, {hi:g}] must satisfy 0 <= lo <= hi <= 1 (CFG++ lambda lies in [0, 1])")
    return lo, hi


def cfgpp_heads(cond: np.ndarray, uncond: np.ndarray, lam) -> np.ndarray:
    """The two-head target of a CFG++ student, (B, 2C, ...): the guided output ``uncond + lam (cond - uncond)``
    (the x0 CFG++ takes) in the first C channels, ``uncond`` (the noise it re-noises with) in the last C;
    ``lam`` one per example or a scalar."""
    guided = cfg_combine(cond, uncond, np.asarray(lam, np.float32).reshape(-1, *([1] * (np.ndim(cond) - 1))))
    return np.concatenate([guided, uncond], axis=1)


def split_heads(out: Array) -> Tuple[Array, Array]:
    """(guided, uncond) halves of a two-head output (B, 2C, ...) along the channel axis."""
    c = out.shape[1] // 2
    return out[:, :c], out[:, c:]


def _clamp(x: Array, lo: float, hi: float) -> Array:
    return np.clip(x, lo, hi) if isinstance(x, np.ndarray) else ops.clamp(x, lo, hi)


def step_x0_eps(z: Array, out: Array, alpha: Array, sigma: Array, prediction: str, clip: bool = False,
                threshold: Optional[float] = None, uncond: Array = None) -> Tuple[Array, Array]:
    """(x0, eps) a sampler step uses, from the (guided) network output ``out`` at (z, t).

    x0 is clipped to [-1, 1] (``clip``) or dynamically thresholded (``threshold``, which wins), and eps
    is then made consistent with the clipped x0. CFG++ (Chung et al. 2024) passes the unconditional
    output ``uncond``: x0 stays the guided one, and the noise the update re-noises with is the
    unconditional eps_u. Under clipping that noise is eps_u moved by the clip's change of eps (the
    clipped-CFG eps + (eps_u - eps_guided)), so lambda = 0 is exactly CFG at w = 0 with the same clipping.
    """
    x0, eps_raw = x0_eps_from_output(z, out, alpha, sigma, prediction)
    eps = eps_raw
    if threshold is not None:
        x0 = dynamic_threshold(x0, threshold)
        eps = eps_from_x0(z, x0, alpha, sigma)
    elif clip:
        x0 = _clamp(x0, -1.0, 1.0)
        eps = eps_from_x0(z, x0, alpha, sigma)
    if uncond is None:
        return x0, eps
    _, eps_u = x0_eps_from_output(z, uncond, alpha, sigma, prediction)
    if threshold is None and not clip:
        return x0, eps_u
    return x0, eps + (eps_u - eps_raw)


# --------------------------------------------------------------------------- samplers
def _relu(x: Array) -> Array:
    """max(x, 0) with arithmetic and abs only (numpy and Tensor, jit-safe)."""
    return (x + abs(x)) * 0.5


def ddim_coefficients(alpha_t: Array, sigma_t: Array, alpha_s: Array, sigma_s: Array,
                      eta: float = 0.0) -> Tuple[Array, Array, Array]:
    """(c_x0, c_eps, c_noise) of a DDIM step t -> s: z_s = c_x0 * x0 + c_eps * eps + c_noise * noise.

    With abar = alpha^2: c_noise = eta * sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)),
    c_eps = sqrt(max(sigma_s^2 - c_noise^2, 0)), evaluated in the equivalent VP form
    sigma_s^2 / sigma_t^2 * ((1 - eta^2)(1 - a^2) + a^2 sigma_s^2), a = alpha_t / alpha_s,
    which avoids catastrophic cancellation near t = 1.
    """
    if isinstance(eta, (int, float)) and eta == 0:
        return alpha_s, sigma_s, 0.0
    ratio = sigma_s**2 / sigma_t**2
    one_minus_a2 = 1.0 - alpha_t**2 / alpha_s**2
    c = eta * _relu(ratio * one_minus_a2) ** 0.5
    eps_var = ratio * ((1.0 - eta**2) * one_minus_a2 + alpha_t**2 / alpha_s**2 * sigma_s**2)
    return alpha_s, _relu(eps_var) ** 0.5, c


def ddim_step(x0: Array, eps: Array, alpha_t: Array, sigma_t: Array, alpha_s: Array,
              sigma_s: Array, eta: float = 0.0, noise: Array = None) -> Array:
    """DDIM step from t to an earlier time s < t given predicted (x0, eps) (:func:`ddim_coefficients`).

    eta = 0 is deterministic; eta = 1 is ancestral (equals ``ddpm_step``).
    """
    c_x0, c_eps, c_noise = ddim_coefficients(alpha_t, sigma_t, alpha_s, sigma_s, eta)
    if isinstance(eta, (int, float)) and eta == 0:
        return c_x0 * x0 + c_eps * eps
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs noise")
    return c_x0 * x0 + c_eps * eps + c_noise * noise


def ddpm_coefficients(alpha_t: Array, sigma_t: Array, alpha_s: Array, sigma_s: Array) -> Tuple[Array, Array, Array]:
    """(c_z, c_x0, var) of the true posterior q(z_s | z_t, x0) = N(c_z z_t + c_x0 x0, var), s < t."""
    alpha_ts = alpha_t / alpha_s
    sigma2_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
    return (alpha_ts * sigma_s**2 / sigma_t**2), (alpha_s * sigma2_ts / sigma_t**2), sigma2_ts * sigma_s**2 / sigma_t**2


def ddpm_posterior(z_t: Array, x0: Array, alpha_t: Array, sigma_t: Array, alpha_s: Array,
                   sigma_s: Array):
    """Mean and variance of the true posterior q(z_s | z_t, x0) for s < t."""
    c_z, c_x0, var = ddpm_coefficients(alpha_t, sigma_t, alpha_s, sigma_s)
    return c_z * z_t + c_x0 * x0, var


def ddpm_step(z_t: Array, x0: Array, alpha_t: Array, sigma_t: Array, alpha_s: Array,
              sigma_s: Array, noise: Array) -> Array:
    """Ancestral sample z_s ~ q(z_s | z_t, x0) = mean + sqrt(var) * noise."""
    mean, var = ddpm_posterior(z_t, x0, alpha_t, sigma_t, alpha_s, sigma_s)
    return mean + _relu(var) ** 0.5 * noise


# --------------------------------------------------------------------------- thresholding
@constexpr
def _threshold_index(percentile: float, size: int) -> int:
    if not 0.0 <= percentile <= 1.0:
        raise UserError(f"dynamic threshold percentile must be in [0, 1], got {percentile}")
    return int(math.floor(percentile * (size - 1)))


def dynamic_threshold(x0: Array, percentile: float = 0.995) -> Array:
    """Imagen dynamic thresholding: s = max(q(|x0|), 1) per sample; clip to [-s, s], divide by s.

    The quantile is the sorted per-sample |x0| at index floor(percentile * (D - 1)), the
    same rule for numpy and MindSpore (``ops.quantile`` does not run on CPU).
    """
    batch = x0.shape[0]
    size = math.prod(x0.shape[1:])
    k = _threshold_index(percentile, size)
    bshape = (batch,) + (1,) * (len(x0.shape) - 1)
    if isinstance(x0, np.ndarray):
        q = np.sort(np.abs(x0).reshape(batch, size), axis=-1)[:, k]
        s = np.maximum(q, 1.0).reshape(bshape).astype(x0.dtype)
        return np.clip(x0, -s, s) / s
    q = ops.sort(ops.abs(x0).reshape(batch, size), axis=-1)[0][:, k]
    s = ops.maximum(q, 1.0).reshape(bshape)
    return ops.clamp(x0, -s, s) / s


# --------------------------------------------------------------------------- loss weighting
LOSS_SPACES = ("x_snr_trunc", "eps", "v")


def output_space_weight(loss_space: str, prediction: str, alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Per-example weight that turns an MSE on the network output into the chosen loss.

    The output is linear in x0, eps and v at fixed z, so ``||d x||^2 = (dx/dout)^2 ||d out||^2``:
    "x_snr_trunc" is the x-space loss with the truncated-SNR weight max(alpha^2/sigma^2, 1)
    (Salimans & Ho); "eps" and "v" are plain MSEs in those spaces.
    """
    _check_prediction(prediction)
    alpha = np.asarray(alpha, np.float64)
    sigma = np.asarray(sigma, np.float64)
    # d(space)/d(out) for out = v: x0 = alpha z - sigma v, eps = sigma z + alpha v.
    # for out = eps: x0 = (z - sigma eps) / alpha, v = alpha eps - sigma x0 = eps / alpha - sigma z / alpha.
    if prediction == "v":
        slope = {"x_snr_trunc": sigma, "eps": alpha, "v": np.ones_like(alpha)}
    else:
        slope = {"x_snr_trunc": sigma / alpha, "eps": np.ones_like(alpha), "v": 1.0 / alpha}
    if loss_space not in slope:
        raise UserError(f"unknown loss space '{loss_space}' (choose {', '.join(LOSS_SPACES)})")
    weight = slope[loss_space] ** 2
    if loss_space == "x_snr_trunc":
        weight = weight * np.maximum(alpha**2 / sigma**2, 1.0)
    return weight.astype(np.float32)


# --------------------------------------------------------------------------- progressive distillation
def grid_alpha_sigma(schedule: str, times) -> Tuple[np.ndarray, np.ndarray]:
    """(alpha, sigma) at sampler grid times, float64, with the sampler's convention that
    t = 0 is clean data exactly (alpha = 1, sigma = 0; see ``distill.sampling.step_times``)."""
    times = np.asarray(times, np.float32)
    alpha, sigma = alpha_sigma(logsnr_schedule(schedule, times))
    alpha, sigma = alpha.astype(np.float64), sigma.astype(np.float64)
    clean = times == 0.0
    return np.where(clean, 1.0, alpha), np.where(clean, 0.0, sigma)


def progressive_times(num_steps: int, i) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Times (t, t_mid, s) for step ``i`` (1..N, may be an array) of an N-step student.

    t = i/N, t_mid = t - 1/(2N), s = t - 1/N, taken from the very grids the sampler uses
    (:func:`sampling_times` of N and 2N steps), so training sees the sampler's float32 times.
    """
    i = np.asarray(i)
    if np.any(i < 1) or np.any(i > num_steps):
        raise UserError(f"progressive step index must be in 1..{num_steps}")
    coarse, fine = sampling_times(num_steps), sampling_times(2 * num_steps)
    return coarse[num_steps - i], fine[2 * (num_steps - i) + 1], coarse[num_steps - i + 1]


def ddim_x0_for_step(z_t: Array, z_s: Array, alpha_t: Array, sigma_t: Array, alpha_s: Array,
                     sigma_s: Array) -> Array:
    """The x0 for which ONE deterministic DDIM step from z_t (time t) lands exactly on z_s (s < t).

    A DDIM step is z_s = alpha_s x + sigma_s (z_t - alpha_t x) / sigma_t; solved for x with
    r = sigma_s / sigma_t: x = (z_s - r z_t) / (alpha_s - r alpha_t). At s = 0 (alpha_s = 1,
    sigma_s = 0) this is z_s itself. Salimans & Ho (2022), eq. 8 / ``dpm.py`` ``x_target``.
    """
    r = sigma_s / sigma_t
    return (z_s - r * z_t) / (alpha_s - r * alpha_t)


def output_target_from_x0(z_t: Array, x0: Array, alpha_t: Array, sigma_t: Array, prediction: str) -> Array:
    """The network output (eps or v) at (z_t, t) that means ``x0``: eps from z_t and x0, then convert."""
    return output_from_x0_eps(x0, eps_from_x0(z_t, x0, alpha_t, sigma_t), alpha_t, sigma_t, prediction)


def two_step_ddim_target(denoise, z_t: Array, times, schedule: str, prediction: str):
    """Progressive-distillation target: two deterministic teacher DDIM steps t -> t_mid -> s, as one step.

    ``denoise(z, t, alpha, sigma) -> (x0, eps)`` is the teacher at one time (numpy in, numpy out;
    per-example ``t``/``alpha``/``sigma`` of shape (B,), broadcast here to (B, 1, 1, 1)).
    ``times`` is ``(t, t_mid, s)`` from :func:`progressive_times`. Returns
    ``(target, x_tilde, z_s)``: the network output at (z_t, t) whose single DDIM step lands on
    the teacher's z_s, the x0 it implies, and z_s itself (all float64).
    """
    t, t_mid, s = (np.asarray(x, np.float32) for x in times)
    (a_t, s_t), (a_m, s_m), (a_s, s_s) = (grid_alpha_sigma(schedule, x) for x in (t, t_mid, s))
    col = lambda v: v.reshape(-1, *([1] * (np.ndim(z_t) - 1)))  # noqa: E731
    z_t = np.asarray(z_t, np.float64)
    x0, eps = denoise(z_t, t, a_t, s_t)
    z_mid = ddim_step(np.asarray(x0, np.float64), np.asarray(eps, np.float64), col(a_t), col(s_t), col(a_m), col(s_m))
    x0, eps = denoise(z_mid, t_mid, a_m, s_m)
    z_s = ddim_step(np.asarray(x0, np.float64), np.asarray(eps, np.float64), col(a_m), col(s_m), col(a_s), col(s_s))
    x_tilde = ddim_x0_for_step(z_t, z_s, col(a_t), col(s_t), col(a_s), col(s_s))
    return output_target_from_x0(z_t, x_tilde, col(a_t), col(s_t), prediction), x_tilde, z_s
